"""A throwaway stand-in for model.engine used by the fast backend tests (nearest centroid).

It follows the engine contract (load_image, train_and_score, score_images, EngineConfig,
EngineResult) so the backend's plumbing can be tested in seconds; the real engine is used
by the end-to-end tests.  ALR_FAKE_ENGINE_SLEEP (seconds) makes training take a while, for
the coalescing tests.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class EngineConfig:
    arch: str = "auto"
    image_size: int = 32
    epochs: int = 30
    finetune_epochs: int = 10
    batch_size: int = 128
    forget_rate: float | None = None
    seed: int = 0


@dataclass
class EngineResult:
    sample_ids: np.ndarray
    class_names: list
    labels: np.ndarray
    pred_probs: np.ndarray
    predicted_labels: np.ndarray
    loss: np.ndarray
    vog_scores: np.ndarray
    prob_label_wrong: np.ndarray
    priority: np.ndarray
    ls_score: np.ndarray
    lnl_clean_mask: np.ndarray
    trusted_mask: np.ndarray


def load_image(path_or_file, *, image_size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path_or_file) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _result(ids, class_names, labels, centroids, images, trusted):
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    logits = -d * 5.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    known = labels >= 0
    safe = np.where(known, labels, 0)
    p_given = probs[np.arange(len(x)), safe]
    p_wrong = np.where(known, 1.0 - p_given, 1.0 - probs.max(1))
    return EngineResult(
        sample_ids=np.asarray(ids, dtype=np.int64), class_names=list(class_names), labels=labels,
        pred_probs=probs, predicted_labels=probs.argmax(1),
        loss=np.where(known, -np.log(np.clip(p_given, 1e-12, 1)), np.nan),
        vog_scores=np.full(len(x), np.nan), prob_label_wrong=p_wrong, priority=p_wrong,
        ls_score=1.0 - p_wrong, lnl_clean_mask=p_wrong < 0.5, trusted_mask=trusted)


def train_and_score(images, labels, *, sample_ids, class_names, trusted_mask=None,
                    previous_checkpoint=None, checkpoint_path, config=None, progress=None):
    config = config or EngineConfig()
    labels = np.asarray(labels, dtype=np.int64)
    trusted = np.zeros(len(labels), bool) if trusted_mask is None else np.asarray(trusted_mask, bool)
    delay = float(os.environ.get("ALR_FAKE_ENGINE_SLEEP", "0"))
    if progress:
        progress("train", 0.0)
    time.sleep(delay)
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    centroids = np.stack([x[labels == k].mean(0) if (labels == k).any() else np.zeros(x.shape[1])
                          for k in range(len(class_names))])
    buf = io.BytesIO()
    np.savez(buf, centroids=centroids, class_names=np.array(class_names),
             meta=np.array(json.dumps({"previous": str(previous_checkpoint) if previous_checkpoint else None,
                                       "n": int(len(labels)), "n_trusted": int(trusted.sum())})))
    tmp = f"{checkpoint_path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, checkpoint_path)
    if progress:
        progress("train", 1.0)
    return _result(sample_ids, class_names, labels, centroids, images, trusted)


def score_images(checkpoint_path, images, labels=None):
    with np.load(checkpoint_path) as ck:
        centroids, class_names = ck["centroids"], [str(c) for c in ck["class_names"]]
    n = len(images)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    return _result(np.arange(n), class_names, labels, centroids, images, np.zeros(n, bool))
