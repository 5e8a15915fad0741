"""Where training images come from: a tensor in memory, or files streamed from disk.

Small projects (digits, a few thousand thumbnails) live in one (N, C, H, W)
tensor, uint8 when the images came as uint8, sliced per batch and made float
on the device that uses them (on CUDA, resident on the GPU when they fit:
:func:`place`).  Large projects pass a
:class:`FileImages`: each batch is decoded from disk by DataLoader worker
processes, so memory holds a few batches, not the dataset; only the per-sample
arrays (labels, scores, VoG buffers) grow with N.  Where the disk has room they
are decoded once into a :class:`DecodedImages` file instead, so that each epoch
copies bytes rather than decoding every image again.

Every function below accepts either kind, so the training code has one path.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from model.data import as_float, load_image

ImageSource = torch.Tensor | Dataset

logger = logging.getLogger(__name__)


class FileImages(Dataset):
    """Images decoded from files on demand and resized to ``image_size`` square, ``channels`` deep.

    Items are (C, H, W) uint8 tensors (made float on the device, like in-memory images).  Decode errors name the file
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
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DecodedImages(Dataset):
    """Images decoded once into a raw uint8 file of shape ``shape`` (N, C, H, W), read back
    through the operating system's page cache: a streamed project's epochs copy bytes instead
    of decoding every file again, and memory holds a few batches, as with :class:`FileImages`.
    ``rows`` picks and orders the images used (default: all).  Written by
    :class:`DecodedImagesWriter`; items are (C, H, W) uint8 tensors, as FileImages'.
    """

    def __init__(self, path: str | os.PathLike, *, shape: Sequence[int], rows: Sequence[int] | None = None):
        self.path = os.fspath(path)
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) != 4:
            raise ValueError(f"shape must be (N, C, H, W), got {self.shape}")
        self.rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= self.shape[0]):
            raise ValueError(f"rows must lie in [0, {self.shape[0]})")
        expected = int(np.prod(self.shape))
        if os.path.getsize(self.path) != expected:
            raise ValueError(f"{self.path} holds {os.path.getsize(self.path)} bytes, not the {expected} of "
                             f"{self.shape} images")
        self._array = None

    def select(self, positions: Sequence[int]) -> DecodedImages:
        """The images at ``positions`` of this one (same file)."""
        return DecodedImages(self.path, shape=self.shape, rows=self.rows[np.asarray(positions, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.rows)

    def _mapped(self) -> np.ndarray:
        if self._array is None:       # opened in each process that reads (DataLoader workers too)
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._mapped()[self.rows[index]]))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """A DataLoader batch in one read (rows in file order, then put back in the asked order)."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        batch = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        batch[order] = self._mapped()[rows[order]]
        return list(torch.from_numpy(batch).unbind(0))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}      # a worker maps the file itself

    def load(self, device: torch.device, *, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """All the images as one (N, C, H, W) uint8 tensor on ``device``, copied a chunk at a time
        (host memory holds one chunk, not the dataset)."""
        out = torch.empty((len(self), *self.shape[1:]), dtype=torch.uint8, device=device)
        per_chunk = max(1, chunk_bytes // int(np.prod(self.shape[1:])))
        for start in range(0, len(self), per_chunk):
            rows = self.rows[start:start + per_chunk]
            out[start:start + len(rows)] = torch.from_numpy(np.ascontiguousarray(self._mapped()[rows])).to(device)
        return out


class DecodedImagesWriter:
    """Appends decoded (H, W, C) uint8 images to a raw file for :class:`DecodedImages`.

    Writes are plain file writes, so a full disk is an ``OSError`` (a memory-mapped write would
    be a SIGBUS that kills the process).  When the disk has no room for ``capacity`` images (plus
    ``reserve_bytes``), or a write fails, the writer logs why, deletes what it wrote, ignores
    further images and :meth:`finish` returns None: the caller streams the files instead.
    """

    def __init__(self, path: str | os.PathLike, *, image_shape: Sequence[int], capacity: int,
                 reserve_bytes: int = 256 * 2**20):
        self.path = os.fspath(path)
        self.image_shape = tuple(int(d) for d in image_shape)      # (C, H, W)
        self.count = 0
        self._file = None
        needed = capacity * int(np.prod(self.image_shape))
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        if needed + reserve_bytes > free:
            logger.warning("not decoding the images into %s: %.0f MB needed, %.0f MB free; each epoch decodes the "
                           "image files again instead (slower, same result)", self.path, needed / 2**20, free / 2**20)
            return
        self._file = open(self.path, "wb")

    def append(self, image: np.ndarray) -> None:
        if self._file is None:
            return
        chw = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        if chw.shape != self.image_shape:
            raise ValueError(f"image of shape {chw.shape} (C, H, W), expected {self.image_shape}")
        try:
            self._file.write(chw.tobytes())
        except OSError as exc:
            self._give_up(exc)
            return
        self.count += 1

    def finish(self) -> DecodedImages | None:
        """The images written, or None where the writer gave up (or had none)."""
        if self._file is None:
            return None
        try:
            self._file.close()
        except OSError as exc:       # the last buffered bytes did not fit either
            self._file = None
            self._give_up(exc)
            return None
        self._file = None
        if self.count == 0:
            os.unlink(self.path)
            return None
        return DecodedImages(self.path, shape=(self.count, *self.image_shape))

    def _give_up(self, exc: OSError) -> None:
        logger.warning("decoding the images into %s failed after %d (%s); each epoch decodes the image files again "
                       "instead (slower, same result)", self.path, self.count, exc)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


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
    if isinstance(images, torch.Tensor) and images.is_pinned() and device.type == "cuda":
        yield from _prefetched_batches(images, batches, device)
        return
    if isinstance(images, torch.Tensor):
        for idx in batches:
            yield idx, _for_device(as_float(images[idx].to(device, non_blocking=True)), device)
        return
    # A generator of its own: a DataLoader iterator otherwise draws its worker seed from torch's
    # global generator, which shifts dropout and so makes streamed training differ from in-memory.
    loader = DataLoader(images, batch_sampler=[idx.tolist() for idx in batches], num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    for idx, x in zip(batches, loader):
        yield idx, _for_device(as_float(x.to(device, non_blocking=True)), device)


def _prefetched_batches(images: torch.Tensor, batches: Sequence[torch.Tensor],
                        device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pinned host images to CUDA with the next batch's copy on a side stream, overlapping the
    current batch's compute: each batch is gathered into pinned memory (an index of a pinned
    tensor would be pageable again) and copied asynchronously."""
    stream = torch.cuda.Stream(device)

    def start_copy(idx):
        staged = torch.empty((idx.numel(), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
        torch.index_select(images, 0, idx, out=staged)
        with torch.cuda.stream(stream):
            return staged.to(device, non_blocking=True)

    upcoming = start_copy(batches[0]) if len(batches) else None
    for position, idx in enumerate(batches):
        torch.cuda.current_stream(device).wait_stream(stream)
        x = upcoming
        x.record_stream(torch.cuda.current_stream(device))     # made on the side stream, used on this one
        upcoming = start_copy(batches[position + 1]) if position + 1 < len(batches) else None
        yield idx, _for_device(as_float(x), device)


def _for_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on CUDA (the layout its convolutions run fastest in), as it is elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def place(images: ImageSource, device: torch.device, *, max_share: float = 0.5) -> ImageSource:
    """Where the images live while a job runs.  On CUDA an in-memory set, or a file of decoded
    images (:class:`DecodedImages`), that takes at most ``max_share`` of the GPU's free memory
    moves there once (each batch is then an index, not a copy); a larger in-memory set is pinned,
    so that batch copies are truly asynchronous, and a larger file stays streamed.  Elsewhere,
    and for image files, as it is.  The choice is logged."""
    if device.type != "cuda" or not isinstance(images, (torch.Tensor, DecodedImages)):
        return images
    if isinstance(images, DecodedImages):
        size = len(images) * int(np.prod(images.shape[1:]))
    else:
        size = images.element_size() * images.numel()
    free, _ = torch.cuda.mem_get_info(device)
    if size <= max_share * free:
        logger.info("images resident on the GPU: %.0f MB of %.0f MB free", size / 2**20, free / 2**20)
        return images.load(device) if isinstance(images, DecodedImages) else images.to(device)
    if isinstance(images, DecodedImages):
        logger.info("images streamed from %s: %.0f MB > %.0f%% of the GPU's %.0f MB free", images.path,
                    size / 2**20, 100 * max_share, free / 2**20)
        return images
    logger.info("images in pinned host memory: %.0f MB > %.0f%% of the GPU's %.0f MB free", size / 2**20,
                100 * max_share, free / 2**20)
    return images.pin_memory()


def sequential_batches(count: int, batch_size: int, *, offset: int = 0, stride: int = 1) -> list[torch.Tensor]:
    """Index batches over offset, offset + stride, ... < count (stride > 1 shards across ranks)."""
    idx = torch.arange(offset, count, stride)
    return list(idx.split(batch_size))


def stats_sample(images: ImageSource, *, max_count: int = 2048, seed: int = 0) -> torch.Tensor:
    """Up to ``max_count`` images as one tensor, for the per-channel normalisation statistics."""
    count = num_images(images)
    if isinstance(images, torch.Tensor) and count <= max_count:
        return as_float(images)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(count, size=min(count, max_count), replace=False))
    if isinstance(images, torch.Tensor):
        return as_float(images[torch.from_numpy(idx)])
    return as_float(torch.stack([images[int(i)] for i in idx]))
