"""Task images: resolve the URL, download once into an on-disk cache, decode.

Supported URLs: Label Studio uploads (``/data/upload/...``, relative), local-files storage
(``http://<ls-host>/data/local-files/?d=...``) - both fetched with the API key - and plain
http(s) URLs (fetched without it).  A broken or missing image raises ``ImageError`` with a
message; callers skip the task and log it, they never stop.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .ls_client import LabelStudioClient, LabelStudioError

logger = logging.getLogger(__name__)


class ImageError(ValueError):
    """An image could not be fetched or decoded (the message says which and why)."""


class ImageCache:
    """Downloads task images into ``cache_dir`` (file name = sha256 of the URL)."""

    def __init__(self, cache_dir: str | os.PathLike, client: LabelStudioClient, *,
                 max_bytes: int = 64 * 1024 * 1024):
        self.cache_dir = Path(cache_dir)
        self.client = client
        self.max_bytes = max_bytes

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / digest

    def fetch(self, url: str) -> Path:
        """Local path of the image at ``url``, downloading it on first use."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task has no image URL (got {url!r})")
        path = self.path_for(url)
        if path.exists():
            return path
        try:
            data = self.client.download(url, max_bytes=self.max_bytes)
        except LabelStudioError as exc:
            raise ImageError(f"cannot download image: {exc}") from None
        if not data:
            raise ImageError(f"image is empty: {url[:120]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dl-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return path

    def load(self, url: str, load_image: Callable, *, image_size: int, channels: int) -> np.ndarray:
        """Decoded (H, W, C) uint8 image; ImageError when it cannot be fetched or decoded."""
        path = self.fetch(url)
        try:
            return load_image(path, image_size=image_size, channels=channels)
        except ValueError as exc:
            # keep the broken download out of the cache so a fixed file is fetched again
            path.unlink(missing_ok=True)
            raise ImageError(f"cannot decode image {url[:120]}: {exc}") from None


def load_task_images(tasks: list[dict], image_field: str, cache: ImageCache, load_image: Callable,
                     *, image_size: int, channels: int, workers: int = 8
                     ) -> tuple[list[int], np.ndarray, dict[int, str]]:
    """Images of ``tasks``; broken ones are skipped with a warning.

    Returns
    -------
    ok_idx : positions in ``tasks`` whose image loaded.
    images : (len(ok_idx), image_size, image_size, channels) uint8.
    errors : task id -> reason, for the skipped ones.
    """
    from concurrent.futures import ThreadPoolExecutor

    def fetch(task):          # network in parallel; decoding stays in this thread
        url = (task.get("data") or {}).get(image_field)
        try:
            cache.fetch(url)
            return url, None
        except ImageError as exc:
            return url, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        fetched = list(pool.map(fetch, tasks))
    ok_idx, arrays, errors = [], [], {}
    for i, (task, (url, error)) in enumerate(zip(tasks, fetched)):
        try:
            if error is not None:
                raise ImageError(error)
            arrays.append(cache.load(url, load_image, image_size=image_size, channels=channels))
            ok_idx.append(i)
        except ImageError as exc:
            errors[int(task["id"])] = str(exc)
    if errors:
        sample = list(errors.items())[:5]
        logger.warning("skipped %d task(s) whose image could not be used, e.g. %s",
                       len(errors), sample)
    if arrays:
        images = np.stack(arrays).astype(np.uint8, copy=False)
    else:
        images = np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    return ok_idx, images, errors
