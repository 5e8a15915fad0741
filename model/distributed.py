"""torch.distributed for Co-teaching: one process per GPU (NCCL) or per CPU worker (gloo).

Launched by torchrun (``torchrun --nproc_per_node N -m model.train ...``), which
sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT.  Without those the
code runs as one process and every helper here is a no-op.

How the method stays correct across ranks: every rank draws the same sample
order and augmentation from the same seed; each global batch is split
``idx[rank::world]``; the per-sample losses are gathered so that every rank
runs the same selection on the whole batch; the update loss is the local sum
over the selected samples divided by the GLOBAL number selected, times the
world size (DDP averages gradients over ranks), which is exactly the
single-process mean.  Eval passes (VoG snapshots, scoring) are sharded and
gathered, so every rank holds the full VoG buffers.  BatchNorm is synchronised
with SyncBatchNorm on CUDA; on the CPU (gloo) PyTorch has no SyncBatchNorm,
so each rank normalises with its shard's statistics and the result differs
slightly from one process (the tolerance is in tests/test_distributed.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_preference: str = "auto") -> tuple[DistContext, str]:
    """Join the process group torchrun set up; returns the context and the device to use.

    NCCL and ``cuda:<LOCAL_RANK>`` when CUDA is there, gloo and the CPU otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), device_preference
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    logger.info("Rank %d of %d on %s (%s backend)", rank, world_size, device, dist.get_backend())
    return DistContext(rank, world_size, local_rank), device


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def wrap(network: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel (with SyncBatchNorm on CUDA) when distributed, else the network itself."""
    if not ctx.enabled:
        return network
    if device.type == "cuda":
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        return torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(network)


def gather_rows(local: torch.Tensor, ctx: DistContext, total: int) -> torch.Tensor:
    """Reassemble rows sharded as ``global[rank::world]`` into the full (total, ...) tensor."""
    if not ctx.enabled:
        return local
    max_rows = (total + ctx.world_size - 1) // ctx.world_size
    padded = torch.zeros((max_rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    full = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for rank, part in enumerate(parts):
        rows = len(range(rank, total, ctx.world_size))
        full[rank::ctx.world_size] = part[:rows]
    return full


def broadcast_floats(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Rank 0's values on every rank (every rank passes a list of the same length)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Wait for every rank, then leave the process group.

    A rank that exits while gloo's threads still run aborts ("terminate called
    without an active exception", exit -6) and torchrun reports the whole run failed.
    """
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
