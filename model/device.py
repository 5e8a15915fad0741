"""Device selection, mixed precision and seeding.

Nothing here touches CUDA at import time: rq forks a child per job and gunicorn
``--preload`` forks workers, and a CUDA context created in the parent does not
survive a fork.
"""
from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to train on: CUDA, then Apple MPS, then the CPU.

    ``preference`` may name a device ("cuda", "cuda:1", "mps", "cpu"); asking for
    one that is not there is an error rather than a silent fall back to the CPU,
    because a job that was meant for a GPU and runs 50x slower is worse than one
    that fails at once.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        logger.info("Training device: %s (auto-selected)", device)
        return device
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {preference!r} requested but Apple MPS is not available; use 'auto' or 'cpu'")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unsupported device {preference!r}; choose one of {DEVICE_CHOICES}")
    return device


def amp_dtype(device: torch.device) -> torch.dtype:
    """The mixed-precision type on CUDA: bfloat16 where the GPU has it (float32's range, so no
    loss scaling), float16 otherwise."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device, *, enabled: bool = True) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 mixed precision on CUDA; None with bfloat16, on CPU and MPS.
    Logs the precision chosen."""
    if not (enabled and device.type == "cuda"):
        return None
    if amp_dtype(device) == torch.bfloat16:
        logger.info("mixed precision: bfloat16 autocast on %s (no loss scaling needed)", torch.cuda.get_device_name(device))
        return None
    logger.info("mixed precision: float16 autocast with a GradScaler on %s (no bfloat16 there)",
                torch.cuda.get_device_name(device))
    return torch.amp.GradScaler("cuda")


def autocast(device: torch.device, *, enabled: bool = True):
    """Mixed-precision autocast on CUDA (:func:`amp_dtype`); a no-op context on CPU and MPS (where
    it buys nothing reliable)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=amp_dtype(device))
    return contextlib.nullcontext()


def to_device(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` on ``device``; channels_last on CUDA, where convolutions run fastest in it."""
    if device.type == "cuda":
        return network.to(device, memory_format=torch.channels_last)
    return network.to(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch CPU generator for data order and augmentation.

    With the same seed, runs on the CPU are reproducible bit for bit (the tests rely
    on it); cuDNN kernels are not all deterministic, so GPU runs are only close.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def global_rng_state() -> dict:
    """torch's global random state (dropout masks draw from it), CPU and every CUDA device, for a checkpoint."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_global_rng_state(state: dict | None) -> None:
    """Put back what :func:`global_rng_state` saved; CUDA states only where this machine has as many devices."""
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
