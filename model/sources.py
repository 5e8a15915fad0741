"""Where training images come from: a tensor in memory, or files streamed from disk.

Small projects (digits, a few thousand thumbnails) live in one (N, C, H, W)
float tensor and are sliced per batch.  Large projects pass a
:class:`FileImages`: each batch is decoded from disk by DataLoader worker
processes, so memory holds a few batches, not the dataset; only the per-sample
arrays (labels, scores, VoG buffers) grow with N.

Every function below accepts either kind, so the training code has one path.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from model.data import load_image

ImageSource = torch.Tensor | Dataset


class FileImages(Dataset):
    """Images decoded from files on demand and resized to ``image_size`` square, ``channels`` deep.

    Items are (C, H, W) float32 tensors in [0, 1].  Decode errors name the file
    (a DataLoader worker re-raises them in the training process), so check the
    files once before training where a broken one must be skipped instead.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, image_size: int, channels: int,
                 resize: str = "stretch"):
        if not len(paths):
            raise ValueError("no image files given")
        self.paths = [os.fspath(p) for p in paths]
        self.image_size = image_size
        self.channels = channels
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = load_image(self.paths[index], image_size=self.image_size, channels=self.channels, resize=self.resize)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def num_images(images: ImageSource) -> int:
    return len(images)


def image_shape(images: ImageSource) -> tuple[int, int, int]:
    """(C, H, W) of the source's images."""
    if isinstance(images, torch.Tensor):
        return tuple(images.shape[1:])
    return tuple(images[0].shape)


def take(images: ImageSource, idx: torch.Tensor) -> ImageSource:
    """The images at ``idx``, of the same kind (a tensor slice, or a lazy Subset)."""
    if isinstance(images, torch.Tensor):
        return images[idx]
    return Subset(images, idx.tolist())


def iterate_batches(images: ImageSource, batches: Sequence[torch.Tensor], *, device: torch.device,
                    num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (idx, images[idx] on ``device``) for each index tensor in ``batches``, in order."""
    if isinstance(images, torch.Tensor):
        for idx in batches:
            yield idx, images[idx].to(device, non_blocking=True)
        return
    # A generator of its own: a DataLoader iterator otherwise draws its worker seed from torch's
    # global generator, which shifts dropout and so makes streamed training differ from in-memory.
    loader = DataLoader(images, batch_sampler=[idx.tolist() for idx in batches], num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    for idx, x in zip(batches, loader):
        yield idx, x.to(device, non_blocking=True)


def sequential_batches(count: int, batch_size: int, *, offset: int = 0, stride: int = 1) -> list[torch.Tensor]:
    """Index batches over offset, offset + stride, ... < count (stride > 1 shards across ranks)."""
    idx = torch.arange(offset, count, stride)
    return list(idx.split(batch_size))


def stats_sample(images: ImageSource, *, max_count: int = 2048, seed: int = 0) -> torch.Tensor:
    """Up to ``max_count`` images as one tensor, for the per-channel normalisation statistics."""
    count = num_images(images)
    if isinstance(images, torch.Tensor) and count <= max_count:
        return images
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(count, size=min(count, max_count), replace=False))
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(idx)]
    return torch.stack([images[int(i)] for i in idx])
