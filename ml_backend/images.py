"""Task images: resolve the URL, download once into an on-disk cache, decode.

Supported URLs: Label Studio uploads (``/data/upload/...``, relative), local-files storage
(``http://<ls-host>/data/local-files/?d=...``) - both fetched with the API key - and plain
http(s) URLs (fetched without it).  A broken or missing image raises ``ImageError`` with a
message; callers skip the task and log it, they never stop.  A host that does not answer, or
answers "not now" (429, 5xx), is another matter: the image is not broken, its host is.  Such a
download is tried again (``attempts``), then raises :class:`ImageHostError`; and where a job
must not train on what is left (``max_unreachable``), more such images than it allows stop
the downloads and raise :class:`ImageHostDown`.

The cache is bounded (``max_cache_bytes``, ALR_IMAGE_CACHE_MAX_MB).  The rule, which holds
across processes and machines that share the cache directory:

* a file is "in use" while any job may still read it: every job touches (mtime) each image
  it uses when it fetches it, and a job runs at most ``protect_seconds`` (ALR_JOB_TIMEOUT), so
  a file touched less than ``protect_seconds`` ago, or touched by this cache object, is
  never evicted;
* eviction runs only just before a download would push the cache over the cap, and removes
  the least recently used files (oldest mtime) that are not in use, down to 90 % of the cap;
* when the files in use alone exceed the cap the download goes ahead (the job needs them) and
  a warning says so: the cap is then exceeded by at most the jobs' own working sets.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from model.files import atomic_write

from .ls_client import LabelStudioClient, LabelStudioError, retry_transient

logger = logging.getLogger(__name__)


def task_image_url(task: dict, image_field: str) -> str | None:
    """The URL of a task's image.  A cloud-storage URI (``s3://``, ``gs://``, ``azure-blob://``:
    what Label Studio's API gives with ``resolve_uri=false``) becomes Label Studio's own
    ``/tasks/<id>/resolve/?fileuri=<base64>``, which answers with the bytes (proxy mode) or a
    redirect to a presigned URL of that storage (followed: see LabelStudioClient.download): the
    storage's credentials stay in Label Studio."""
    url = (task.get("data") or {}).get(image_field)
    if not isinstance(url, str) or "://" not in url or url.startswith(("http://", "https://")):
        return url
    encoded = base64.urlsafe_b64encode(url.encode()).decode()
    return f"/tasks/{int(task['id'])}/resolve/?fileuri={encoded}"


class ImageError(ValueError):
    """An image could not be fetched or decoded (the message says which and why)."""


class ImageHostError(ImageError):
    """An image's host did not answer, or failed, on every attempt: the image itself may be fine."""


class ImageHostDown(RuntimeError):
    """More images than a job allows could not be fetched because their host failed (the message
    says how many, an example, and what to do)."""


class ImageCache:
    """Downloads task images into ``cache_dir`` (file name = sha256 of the URL), bounded in size.

    Parameters
    ----------
    max_bytes : the largest single image accepted.
    max_cache_bytes : cap on the directory's total size; None or 0 = unbounded.  See the
        module docstring for which files eviction may remove.
    protect_seconds : files touched less than this long ago are never evicted (the job
        timeout: a file that recent may belong to a job still running elsewhere).
    attempts : tries per download when the host does not answer or answers 429/5xx, waiting
        ``retry_wait`` seconds, then twice that, ... in between (a training job rides out a
        blip of the image host; a web request should try once).
    """

    _LOW_WATER = 0.9          # eviction frees down to this share of the cap, not just below it

    def __init__(self, cache_dir: str | os.PathLike, client: LabelStudioClient, *,
                 max_bytes: int = 64 * 1024 * 1024, max_cache_bytes: int | None = None,
                 protect_seconds: float = 0.0, attempts: int = 3, retry_wait: float = 0.5):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.cache_dir = Path(cache_dir)
        self.attempts = attempts
        self.retry_wait = retry_wait
        self.client = client
        self.max_bytes = max_bytes
        self.max_cache_bytes = max_cache_bytes or None
        self.protect_seconds = float(protect_seconds)
        self._lock = threading.Lock()
        self._in_use: set[Path] = set()
        self._total: int | None = None      # bytes in the cache as last measured + our downloads since
        self._next_check = 0                # over-cap totals below this skip a rescan (see _make_room)
        self.evicted = 0                    # files removed by this object (for logs and tests)

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / digest

    def fetch(self, url: str) -> Path:
        """Local path of the image at ``url``, downloading it on first use; marks it in use."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task has no image URL (got {url!r})")
        path = self.path_for(url)
        with self._lock:
            self._in_use.add(path)
        if path.exists():
            try:
                os.utime(path)                # recently used: last in line for eviction
                return path
            except FileNotFoundError:         # evicted by another process just now: download again
                pass
        data = self._download(url)
        if not data:
            raise ImageError(f"image is empty: {url[:120]}")
        self._make_room(len(data))
        atomic_write(path, lambda out: out.write(data), durable=False)
        return path

    def _download(self, url: str) -> bytes:
        try:
            return retry_transient(lambda: self.client.download(url, max_bytes=self.max_bytes),
                                   attempts=self.attempts, first_wait=self.retry_wait)
        except LabelStudioError as exc:
            if exc.untrusted_certificate:      # the host, not the image: every image of it fails the same way
                raise ImageHostError(f"cannot download image: {exc}") from None
            if not exc.transient:
                raise ImageError(f"cannot download image: {exc}") from None
            raise ImageHostError(f"cannot download image: {exc} "
                                 f"({self.attempts} attempt{'s' if self.attempts > 1 else ''})") from None

    def release(self, path: Path) -> None:
        """``path`` is no longer needed by this job (a broken download, say)."""
        with self._lock:
            self._in_use.discard(path)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used files not in use so that ``incoming`` more bytes fit the cap."""
        cap = self.max_cache_bytes
        if cap is None:
            return
        with self._lock:
            if self._total is None:
                self._total = sum(size for _, _, size in self._scan())
            self._total += incoming
            if self._total <= cap or self._total < self._next_check:
                return
            entries = sorted(self._scan(), key=lambda entry: entry[1])       # oldest first
            total = sum(size for _, _, size in entries) + incoming
            protected_since = time.time() - self.protect_seconds
            target = int(cap * self._LOW_WATER)
            for path, mtime, size in entries:
                if total <= target:
                    break
                if path in self._in_use or mtime >= protected_since:
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                total -= size
                self.evicted += 1
            self._total = total
            if total > cap:
                # only files in use are left over the cap: rescan again after 10 % more growth,
                # not before every download
                self._next_check = total + max(cap // 10, 1)
                logger.warning("image cache %s holds %.0f MB, over its cap of %.0f MB "
                               "(ALR_IMAGE_CACHE_MAX_MB), but every remaining file is in use by a job",
                               self.cache_dir, total / 2**20, cap / 2**20)
            else:
                self._next_check = 0

    def _scan(self) -> list[tuple[Path, float, int]]:
        """(path, mtime, size) of the cached images (downloads in progress excluded)."""
        out = []
        if not self.cache_dir.is_dir():
            return out
        for sub in self.cache_dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(".dl-") or not entry.is_file():
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((Path(entry.path), st.st_mtime, st.st_size))
        return out

    def load(self, url: str, load_image: Callable, *, image_size: int, channels: int) -> np.ndarray:
        """Decoded (H, W, C) uint8 image; ImageError when it cannot be fetched or decoded."""
        path = self.fetch(url)
        try:
            return load_image(path, image_size=image_size, channels=channels)
        except ValueError as exc:
            # keep the broken download out of the cache so a fixed file is fetched again
            path.unlink(missing_ok=True)
            self.release(path)
            raise ImageError(f"cannot decode image {url[:120]}: {exc}") from None


def load_task_images(tasks: list[dict], image_field: str, cache: ImageCache, load_image: Callable,
                     *, image_size: int, channels: int, workers: int = 8, max_unreachable: int | None = None
                     ) -> tuple[list[int], np.ndarray, dict[int, str]]:
    """Images of ``tasks``, decoded into memory; broken ones are skipped with a warning.

    ``max_unreachable``: how many images whose host failed (:class:`ImageHostError`) may be
    skipped like broken ones; one more stops the downloads and raises :class:`ImageHostDown`.
    None: any number (skipped).

    Returns
    -------
    ok_idx : positions in ``tasks`` whose image loaded.
    images : (len(ok_idx), image_size, image_size, channels) uint8.
    errors : task id -> reason, for the skipped ones.
    """
    arrays: list[np.ndarray] = []
    ok_idx, _, errors = _fetch_and_check(tasks, image_field, cache, load_image, image_size=image_size,
                                         channels=channels, workers=workers, keep=arrays.append,
                                         max_unreachable=max_unreachable)
    if arrays:
        images = np.stack(arrays).astype(np.uint8, copy=False)
    else:
        images = np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    return ok_idx, images, errors


def cache_task_images(tasks: list[dict], image_field: str, cache: ImageCache, load_image: Callable,
                      *, image_size: int, channels: int, workers: int = 8, max_unreachable: int | None = None,
                      keep: Callable[[np.ndarray], None] | None = None) -> tuple[list[int], list[str], dict[int, str]]:
    """Like :func:`load_task_images`, but returns the cached files' paths, not the pixels.

    Every image is decoded once here, so that a broken one is skipped now rather than failing
    a DataLoader worker mid-training; only one image is in memory at a time (large projects:
    ``model.sources.FileImages`` streams the files into training).  ``keep`` is given each
    usable image's pixels, in the order of the returned paths (a
    ``model.sources.DecodedImagesWriter.append``, so that training need not decode them again).
    """
    return _fetch_and_check(tasks, image_field, cache, load_image, image_size=image_size,
                            channels=channels, workers=workers, keep=keep, max_unreachable=max_unreachable)


def _fetch_and_check(tasks, image_field, cache, load_image, *, image_size, channels, workers, keep,
                     max_unreachable):
    from concurrent.futures import ThreadPoolExecutor

    unreachable: dict[int, str] = {}             # task id -> why, for the images whose host failed
    lock = threading.Lock()

    def fetch(task):          # network in parallel; decoding stays in this thread
        url = task_image_url(task, image_field)
        if max_unreachable is not None and len(unreachable) > max_unreachable:
            return url, "not fetched: the image host failed for too many images"
        try:
            cache.fetch(url)
            return url, None
        except ImageHostError as exc:
            with lock:
                unreachable[int(task["id"])] = str(exc)
            return url, str(exc)
        except ImageError as exc:
            return url, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        fetched = list(pool.map(fetch, tasks))
    if max_unreachable is not None and len(unreachable) > max_unreachable:
        tid, why = next(iter(unreachable.items()))
        raise ImageHostDown(
            f"{len(unreachable)} image(s) could not be downloaded because their host did not answer or failed "
            f"(at most {max_unreachable} of these {len(tasks)} tasks may be skipped), e.g. task {tid}: {why}. "
            f"The downloads stopped there. Check that the image host (Label Studio, its cloud storage, or "
            f"an ALR_IMAGE_HOSTS server) is up and reachable from here.")
    ok_idx, paths, errors = [], [], {}
    for i, (task, (url, error)) in enumerate(zip(tasks, fetched)):
        try:
            if error is not None:
                raise ImageError(error)
            array = cache.load(url, load_image, image_size=image_size, channels=channels)
            if keep is not None:
                keep(array)
            ok_idx.append(i)
            paths.append(str(cache.path_for(url)))
        except ImageError as exc:
            errors[int(task["id"])] = str(exc)
    if errors:
        sample = list(errors.items())[:5]
        logger.warning("skipped %d task(s) whose image could not be used, e.g. %s",
                       len(errors), sample)
    return ok_idx, paths, errors
