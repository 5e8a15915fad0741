"""Images in, tensors out: validation, decoding, resizing and augmentation."""
from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

#: larger images are refused before they are decoded (decompression bombs); 40 MP covers scans
#: of 6,000 x 6,000 pixels and more
MAX_IMAGE_PIXELS = 40_000_000
#: the smallest side the networks train on (EngineConfig.image_size's lower bound)
MIN_TRAINING_SIDE = 8


def as_image_array(images) -> np.ndarray:
    """Validate images and return them as one (N, H, W, C) array, uint8 or float32 in [0, 1].

    Accepts an array (N, H, W) / (N, H, W, C) or a sequence of (H, W) / (H, W, C)
    arrays.  Images of different sizes or channel counts are refused with the
    index of the first odd one: resize them first (``load_image`` does it for
    files) rather than let torch fail deep inside a batch.
    """
    if isinstance(images, np.ndarray):
        array = images
    else:
        items = [np.asarray(image) for image in images]
        if not items:
            raise ValueError("no images given")
        first = _with_channels(items[0]).shape
        for index, item in enumerate(items):
            if _with_channels(item).shape != first:
                raise ValueError(
                    f"images have different sizes or channels: image 0 is {first} (H, W, C) and image "
                    f"{index} is {_with_channels(item).shape}; resize them to one size (load_image(path, "
                    "image_size=..., channels=...) does) before training")
        array = np.stack([_with_channels(item) for item in items])
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("no images given")
    if array.shape[-1] not in (1, 3):
        if array.shape[1] in (1, 3) and array.shape[-1] > 4:
            raise ValueError(f"images look channels-first {array.shape}; give them as (N, H, W, C)")
        raise ValueError(f"images must have 1 or 3 channels, got {array.shape[-1]} (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"images must be uint8 (0-255) or float (0-1), got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("images contain NaN or infinite values")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"float images must lie in [0, 1], got range [{array.min():.3g}, {array.max():.3g}]; "
                         "scale them (or pass uint8)")
    return array.astype(np.float32, copy=False)


def shrink_images(images: np.ndarray, *, max_size: int, chunk: int = 1024) -> np.ndarray:
    """(N, H, W, C) images, uint8 or float in [0, 1], whose larger side is over ``max_size``, shrunk
    so that it is ``max_size`` (aspect ratio kept, antialiased bilinear, as PIL's resize); smaller
    images are returned as they are, and no side is shrunk below ``MIN_TRAINING_SIDE``.  The dtype is kept.

    The array counterpart of ``load_image(image_size=...)``: the training cost grows with the
    pixels (the small CNN trains 6-7x slower at 64 px than at 32 px on a CPU), and the networks
    are chosen by the size that reaches them (:func:`model.networks.resolve_arch`).
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    height, width = images.shape[1:3]
    scale = max_size / max(height, width)
    if scale >= 1:
        return images
    # a very long image keeps its short side up to MIN_TRAINING_SIDE (the networks' poolings need it)
    size = tuple(max(min(side, MIN_TRAINING_SIDE), round(side * scale)) for side in (height, width))
    out = np.empty((len(images), *size, images.shape[3]), images.dtype)
    for start in range(0, len(images), chunk):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).permute(0, 3, 1, 2).float()
        small = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
        small = small.permute(0, 2, 3, 1)
        out[start:start + chunk] = (small.round().clamp(0, 255).to(torch.uint8) if images.dtype == np.uint8
                                    else small.clamp(0.0, 1.0)).numpy()
    return out


def own_image_size(images: np.ndarray) -> int:
    """EngineConfig.image_size for (N, H, W, C) images trained at their own size: their height, at least
    ``MIN_TRAINING_SIDE``."""
    return max(int(images.shape[1]), MIN_TRAINING_SIDE)


def _with_channels(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def to_storage(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 or float in [0, 1] -> (N, C, H, W) tensor of the same kind: uint8
    images stay uint8 (a quarter of float32's bytes in memory and in every host-to-GPU copy);
    :func:`as_float` converts a batch where it is used."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return tensor if tensor.dtype == torch.uint8 else tensor.float()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (on any device) -> float32 in [0, 1]; float images as they are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 or float in [0, 1] -> float32 tensor (N, C, H, W) in [0, 1]."""
    return as_float(to_storage(images))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) images, for the network's normalisation."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


RESIZE_MODES = ("stretch", "pad", "crop")


def load_image(source: str | os.PathLike | bytes | BinaryIO, *, image_size: int, channels: int,
               resize: str = "stretch") -> np.ndarray:
    """Decode one image file and return it resized to (image_size, image_size, channels) uint8.

    ``resize`` makes a non-square image square: "stretch" (the aspect ratio is lost), "pad"
    (the whole image, letter-boxed in black: geometry kept) or "crop" (the centre square).
    Grey images become RGB and RGB become grey as ``channels`` asks; 16-bit images are
    scaled from their own minimum-maximum to 8 bits; palette images are converted; the EXIF
    orientation is applied.  A file that cannot be
    decoded, or of more than ``MAX_IMAGE_PIXELS`` pixels (checked from its header, before
    decoding), raises ValueError naming it, so a caller can skip it and say which one.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    name = source if isinstance(source, (str, os.PathLike)) else "<bytes>"
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width} x {image.height} pixels is more than MAX_IMAGE_PIXELS="
                                 f"{MAX_IMAGE_PIXELS} (a decompression bomb?)")
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                span = max(pixels.max() - pixels.min(), 1.0)
                image = Image.fromarray(((pixels - pixels.min()) / span * 255).astype(np.uint8))
            image = image.convert("L" if channels == 1 else "RGB")
            size = (image_size, image_size)
            if resize == "pad":
                image = ImageOps.pad(image, size, method=Image.BILINEAR, color=0)
            elif resize == "crop":
                image = ImageOps.fit(image, size, method=Image.BILINEAR)
            else:
                image = image.resize(size, Image.BILINEAR)
            array = np.array(image, dtype=np.uint8)      # a writable copy (torch warns on read-only arrays)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    return array[..., None] if channels == 1 else array


def draw_augmentation(count: int, *, mode: str, generator: torch.Generator) -> torch.Tensor | None:
    """Affine parameters (count, 2, 3) for a random translation by up to 1/8 of the image
    (and a horizontal flip with "shift_flip"); None for "none".

    Drawn for a whole batch from the shared generator, so that ranks of a
    distributed run, each applying its own slice, augment exactly as one process.
    """
    if mode == "none":
        return None
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * 0.25  # affine_grid units: 0.25 = 1/8 image
    scale_x = torch.ones(count)
    if mode == "shift_flip":
        scale_x = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = scale_x
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    return theta


def apply_augmentation(images: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """Resample the batch with the affine parameters, on the batch's own device (no-op for None)."""
    if theta is None:
        return images
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
