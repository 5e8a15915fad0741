"""Figures of merit: detection of wrong labels, the LNL clean set, classification, relabel budgets.

All take numpy arrays; ``*_mask`` arguments are boolean (N,).
"""
from __future__ import annotations

import numpy as np

from selection._validation import check_labels, check_mask


def auroc(scores: np.ndarray, positive_mask: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for ``positive_mask``.

    The Mann-Whitney statistic with average ranks for ties; NaN when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive_mask = check_mask(positive_mask, len(scores), name="positive_mask")
    n_pos, n_neg = int(positive_mask.sum()), int((~positive_mask).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positive_mask].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def clean_set_precision_recall(clean_mask: np.ndarray, label_correct_mask: np.ndarray) -> tuple[float, float]:
    """Precision (share of kept samples whose label is right) and recall (share of right labels kept)."""
    clean_mask = check_mask(clean_mask, len(clean_mask), name="clean_mask")
    label_correct_mask = check_mask(label_correct_mask, len(clean_mask), name="label_correct_mask")
    kept_correct = np.sum(clean_mask & label_correct_mask)
    precision = kept_correct / max(clean_mask.sum(), 1)
    recall = kept_correct / max(label_correct_mask.sum(), 1)
    return float(precision), float(recall)


def per_class_kept_rate(labels_true: np.ndarray, clean_mask: np.ndarray, label_correct_mask: np.ndarray, *,
                        num_classes: int) -> np.ndarray:
    """Per true class, the share of its correctly labelled samples that LNL kept: (K,), NaN if none."""
    labels_true = check_labels(labels_true, num_classes, name="labels_true")
    clean_mask = check_mask(clean_mask, len(labels_true), name="clean_mask")
    label_correct_mask = check_mask(label_correct_mask, len(labels_true), name="label_correct_mask")
    rates = np.full(num_classes, np.nan)
    for c in range(num_classes):
        correct_c = label_correct_mask & (labels_true == c)
        if correct_c.any():
            rates[c] = clean_mask[correct_c].mean()
    return rates


def minority_classes(class_counts: np.ndarray) -> np.ndarray:
    """Boolean (K,): the floor(K/2) classes with the fewest samples (ties broken by class index)."""
    class_counts = np.asarray(class_counts)
    minority = np.zeros(len(class_counts), bool)
    minority[np.argsort(class_counts, kind="stable")[: len(class_counts) // 2]] = True
    return minority


def minority_majority_ratio(per_class_values: np.ndarray, class_counts: np.ndarray) -> float:
    """Mean over minority classes / mean over majority classes (NaN-aware)."""
    minority = minority_classes(class_counts)
    values = np.asarray(per_class_values, dtype=np.float64)
    return float(np.nanmean(values[minority]) / np.nanmean(values[~minority]))


def confusion_matrix(labels_true: np.ndarray, labels_pred: np.ndarray, *, num_classes: int) -> np.ndarray:
    labels_true = check_labels(labels_true, num_classes, name="labels_true")
    labels_pred = check_labels(labels_pred, num_classes, name="labels_pred")
    if len(labels_true) != len(labels_pred):
        raise ValueError("labels_true and labels_pred differ in length")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels_true, labels_pred), 1)
    return matrix


def balanced_accuracy(labels_true, labels_pred, *, num_classes: int) -> float:
    """Mean per-class recall over the classes present in labels_true."""
    matrix = confusion_matrix(labels_true, labels_pred, num_classes=num_classes)
    support = matrix.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def macro_f1(labels_true, labels_pred, *, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in labels_true or labels_pred."""
    matrix = confusion_matrix(labels_true, labels_pred, num_classes=num_classes)
    tp = np.diag(matrix).astype(float)
    denom = matrix.sum(axis=0) + matrix.sum(axis=1)
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present]))


def matthews_corrcoef(labels_true, labels_pred, *, num_classes: int) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K); 0 when undefined."""
    matrix = confusion_matrix(labels_true, labels_pred, num_classes=num_classes).astype(float)
    t, p = matrix.sum(axis=1), matrix.sum(axis=0)
    n, correct = matrix.sum(), np.trace(matrix)
    denom = np.sqrt((n**2 - p @ p) * (n**2 - t @ t))
    return float((correct * n - t @ p) / denom) if denom > 0 else 0.0


def classification_report(labels_true, labels_pred, *, num_classes: int) -> dict:
    return {"balanced_accuracy": balanced_accuracy(labels_true, labels_pred, num_classes=num_classes),
            "macro_f1": macro_f1(labels_true, labels_pred, num_classes=num_classes),
            "mcc": matthews_corrcoef(labels_true, labels_pred, num_classes=num_classes)}


def errors_found_curve(ranked_idx: np.ndarray, wrong_mask: np.ndarray) -> np.ndarray:
    """After the first j relabels of ``ranked_idx``, the share of all wrong labels found: (len+1,), starts at 0."""
    wrong_mask = np.asarray(wrong_mask, dtype=bool)
    found = np.concatenate([[0], np.cumsum(wrong_mask[np.asarray(ranked_idx, dtype=np.int64)])])
    return found / max(int(wrong_mask.sum()), 1)


def relabels_to_find(ranked_idx: np.ndarray, wrong_mask: np.ndarray, fraction: float) -> int | None:
    """Relabels needed to find ``fraction`` of the wrong labels; None if the ranking never gets there."""
    curve = errors_found_curve(ranked_idx, wrong_mask)
    reached = np.flatnonzero(curve >= fraction - 1e-12)
    return int(reached[0]) if len(reached) else None


def random_relabels_to_find(num_samples: int, fraction: float) -> float:
    """Expected relabels a random order needs to find ``fraction`` of the wrong labels: fraction * N."""
    return fraction * num_samples
