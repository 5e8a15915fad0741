"""Fast mode: a frozen pretrained backbone embeds each image once; Co-teaching trains two small heads.

On a CPU-only server a ResNet-18 at 224 px trains at a few images a second, so a
project of thousands of scans takes hours per version.  Frozen, the same ResNet
only runs forward, once per image and backbone: its embeddings are kept on disk
and every later training (a retraining after relabels, a change of labels) reads
them back and trains two one-hidden-layer heads (``model.networks``'s
"embedding_head") with the same Co-teaching + VoG selection, in seconds.

The named steps:

* :class:`FrozenBackbone` - the ResNet trunk without its classifier, and its fingerprint;
* :func:`image_keys` - one content key per image: the file's bytes and how it is decoded, or the pixels;
* :class:`EmbeddingCache` - one ``.npy`` file per (backbone, image), written atomically;
* :func:`embed_images` - embeddings of a whole source, from the cache where present.

A cached embedding is found again only for the same image content AND the same
backbone (architecture, weights, input size and normalisation): a changed file
or a changed weights file invalidates it by construction, never by a date.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from model.config import EngineConfig
from model.device import autocast, to_device
from model.files import atomic_write
from model.networks import build_network, default_small_input_stem
from model.sources import FileImages, ImageSource, image_shape, iterate_batches, num_images

logger = logging.getLogger(__name__)

#: images per forward pass on the CPU (the activations of a 224 px ResNet batch of 64 take ~1 GB)
CPU_EMBED_BATCH = 64
_FORMAT = "alr-embedding-1"   # part of every key: a change of how embeddings are made starts a new cache


class FrozenBackbone:
    """The trunk of a ResNet (normalisation + convolutions + pooling), in eval mode, never trained.

    ``fingerprint`` hashes everything that shapes an embedding: the architecture,
    the input (channels, size, stem), the normalisation and every weight.
    """

    def __init__(self, network: nn.Module, spec: dict):
        self.network = network.eval().requires_grad_(False)
        self.spec = spec
        self.fingerprint = _fingerprint(network, spec)

    @property
    def embedding_dim(self) -> int:
        return self.network.classifier.in_features

    @classmethod
    def build(cls, config: EngineConfig, *, in_channels: int, image_size: int,
              device: torch.device) -> "FrozenBackbone":
        """From the config: ``config.backbone_arch`` with ``config.pretrained_weights`` (a file or the torch
        cache's ImageNet weights).  Without weights the backbone is random (seeded by ``config.seed``):
        it runs, but its embeddings only separate what random features separate (logged)."""
        if not config.pretrained_weights:
            logger.warning("fast mode with a RANDOMLY initialised %s: the frozen embeddings are generic random "
                           "features; bring pretrained weights (pretrained_weights / ALR_PRETRAINED_WEIGHTS) for "
                           "the quality this mode is meant for", config.backbone_arch)
        spec = {"arch": config.backbone_arch, "in_channels": int(in_channels), "image_size": int(image_size),
                "small_input_stem": default_small_input_stem(image_size, config.pretrained_weights)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network = build_network(spec["arch"], num_classes=2, in_channels=spec["in_channels"],
                                    image_size=spec["image_size"], dropout=0.0,
                                    pretrained_weights=config.pretrained_weights,
                                    small_input_stem=spec["small_input_stem"])
        return cls(to_device(network, device), spec)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "FrozenBackbone":
        """The backbone a checkpoint stored (see :meth:`state_dict`), weights included: scoring needs no file."""
        spec = dict(state["spec"])
        network = build_network(spec["arch"], num_classes=2, in_channels=spec["in_channels"],
                                image_size=spec["image_size"], dropout=0.0, small_input_stem=spec["small_input_stem"])
        network.load_state_dict(state["weights"], strict=True)
        backbone = cls(to_device(network, device), spec)
        if backbone.fingerprint != state["fingerprint"]:
            raise ValueError("the checkpoint's frozen backbone does not match its fingerprint (a damaged file?)")
        return backbone

    def state_dict(self) -> dict:
        return {"spec": dict(self.spec), "weights": self.network.state_dict(), "fingerprint": self.fingerprint}

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images in [0, 1] on the backbone's device -> (B, D) float32 embeddings."""
        with autocast(x.device):
            return self.network.forward_features(x).float()


def _fingerprint(network: nn.Module, spec: dict) -> str:
    digest = hashlib.sha256(repr((_FORMAT, sorted(spec.items()))).encode())
    for module in (network.normalize, network.backbone):       # not the (unused, random) classifier
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def image_keys(images: ImageSource) -> list[str]:
    """A content key per image.  Files: the sha256 of their bytes with the decoding options (size,
    channels, resize), so a file is read but not decoded; tensors and other datasets: the pixels."""
    if isinstance(images, FileImages):
        options = f"{images.image_size}:{images.channels}:{images.resize}".encode()
        return [_file_key(path, options) for path in images.paths]
    if isinstance(images, torch.Tensor):
        images = images.cpu()
        return [_pixels_key(images[i]) for i in range(len(images))]
    return [_pixels_key(images[i]) for i in range(num_images(images))]


def _file_key(path: str, options: bytes) -> str:
    digest = hashlib.sha256(options)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pixels_key(image: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(image.shape)}:{image.dtype}".encode())
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Embeddings on disk: ``root/<backbone fingerprint>/<key[:2]>/<key>.npy``.

    Each file is written to a temporary name and renamed, so concurrent jobs
    (two projects with the same backbone) and a crash mid-write never leave a
    half file; an unreadable one is treated as missing and replaced.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.folder = Path(root) / fingerprint[:32]

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("unreadable cached embedding %s (%s): computing it again", path, exc)
            return None

    def put(self, key: str, embedding: np.ndarray) -> None:
        atomic_write(self._path(key), lambda out: np.save(out, embedding, allow_pickle=False), durable=False)


def embed_images(backbone: FrozenBackbone, images: ImageSource, *, config: EngineConfig, device: torch.device,
                 progress: Callable[[str, float], None] | None = None,
                 progress_bar: bool = True) -> torch.Tensor:
    """(N, D, 1, 1) float32 embeddings on the CPU, in input order: the "images" the heads train on.

    With ``config.embedding_cache_dir`` each image's embedding is read from the
    cache when this backbone has embedded the same image before, and computed
    and stored otherwise; without it every image is embedded.
    """
    expected = (backbone.spec["in_channels"], backbone.spec["image_size"], backbone.spec["image_size"])
    if image_shape(images) != expected:
        raise ValueError(f"images are {image_shape(images)} but the frozen backbone takes {expected} (C, H, W)")
    start = time.perf_counter()
    count = num_images(images)
    out = torch.empty((count, backbone.embedding_dim), dtype=torch.float32)
    cache = EmbeddingCache(config.embedding_cache_dir, backbone.fingerprint) if config.embedding_cache_dir else None
    keys = image_keys(images) if cache else []
    missing = []
    for i in range(count):
        cached = cache.get(keys[i]) if cache else None
        if cached is not None and cached.shape == (backbone.embedding_dim,):
            out[i] = torch.from_numpy(cached)
        else:
            missing.append(i)
    compute_start = time.perf_counter()
    if missing:
        batch = config.eval_batch_size if device.type == "cuda" else min(config.eval_batch_size, CPU_EMBED_BATCH)
        batches = list(torch.tensor(missing, dtype=torch.long).split(batch))
        loader = iterate_batches(images, batches, device=device, num_workers=config.num_workers)
        done = 0
        for rows, x in tqdm(loader, total=len(batches), desc="embedding", leave=False, disable=not progress_bar):
            vectors = backbone(x).cpu()
            out[rows] = vectors
            if cache:
                try:
                    for row, vector in zip(rows.tolist(), vectors.numpy()):
                        cache.put(keys[row], vector)
                except OSError as exc:       # a full or read-only disk costs the next training time, not this one
                    logger.warning("cannot write the embedding cache in %s (%s): this training goes on without "
                                   "it; the next one embeds these images again. Free space there or move "
                                   "MODEL_DIR / embedding_cache_dir", cache.folder, exc)
                    cache = None
            done += len(rows)
            if progress:
                progress("embedding", done / len(missing))
    end = time.perf_counter()
    logger.info("fast mode: %d embeddings from the cache, %d computed by the frozen %s in %.1f s%s%s",
                count - len(missing), len(missing), backbone.spec["arch"], end - start,
                f" ({len(missing) / (end - compute_start):.0f} images/s)" if missing else "",
                "" if cache else "; no embedding_cache_dir: nothing kept for the next training")
    return out.view(count, backbone.embedding_dim, 1, 1)
