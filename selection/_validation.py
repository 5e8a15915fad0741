"""Input checks shared by the public entry points of selection/ (run once, at the entry)."""
from __future__ import annotations

import numpy as np


def check_labels(labels, num_classes: int | None = None, *, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise TypeError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"{name} must lie in [0, {num_classes}); found {np.unique(bad)[:10].tolist()}")
    return labels


def check_pred_probs(pred_probs, *, num_samples: int | None = None, name: str = "pred_probs") -> np.ndarray:
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {pred_probs.shape}")
    if num_samples is not None and pred_probs.shape[0] != num_samples:
        raise ValueError(f"{name} has {pred_probs.shape[0]} rows but labels has {num_samples}")
    if pred_probs.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got {pred_probs.shape[1]}")
    if not np.isfinite(pred_probs).all() or pred_probs.min() < 0:
        raise ValueError(f"{name} must be finite and non-negative")
    if pred_probs.size and not np.allclose(pred_probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"each row of {name} must sum to 1 (softmax output)")
    return pred_probs


def check_labels_and_probs(labels, pred_probs) -> tuple[np.ndarray, np.ndarray]:
    pred_probs = check_pred_probs(pred_probs, num_samples=len(np.asarray(labels)))
    return check_labels(labels, pred_probs.shape[1]), pred_probs


def check_mask(mask, num_samples: int, *, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (num_samples,) or mask.dtype != bool:
        raise ValueError(f"{name} must be a boolean array of shape ({num_samples},), got {mask.dtype} {mask.shape}")
    return mask
