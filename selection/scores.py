"""Per-sample scores from predicted probabilities.

Direction, everywhere in selection/: a higher score means MORE likely
mislabelled (or more uncertain, for the active-learning scores).  The Label
Studio score, which runs the other way, is made once, in
:func:`selection.rank.priority_to_ls_score`.

All functions take ``labels`` (N,) int and/or ``pred_probs`` (N, K) and return
numpy arrays; the predicted probabilities should not come from a model that
memorised the given labels (Co-teaching networks, or out-of-fold predictions).
"""
from __future__ import annotations

import numpy as np

from selection._validation import check_labels_and_probs, check_pred_probs

_EPS = 1e-12


def label_loss(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Cross-entropy of each sample under its given label, -log p[y]: (N,)."""
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    return _label_loss(labels, pred_probs)


def entropy(pred_probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats: (N,)."""
    pred_probs = check_pred_probs(pred_probs)
    return _entropy(pred_probs)


def least_confidence(pred_probs: np.ndarray) -> np.ndarray:
    """1 - max_k p_k: (N,)."""
    return _least_confidence(check_pred_probs(pred_probs))


def margin(pred_probs: np.ndarray) -> np.ndarray:
    """1 - (p_first - p_second): (N,), so that a small margin ranks high like the other scores."""
    return _margin(check_pred_probs(pred_probs))


def bald(mc_pred_probs: np.ndarray) -> np.ndarray:
    """BALD mutual information from T stochastic passes (T, N, K): H[mean p] - mean H[p]: (N,).

    Only meaningful when the passes really differ (MC dropout active at
    prediction time, as model.coteaching.mc_dropout_probs does).
    """
    mc_pred_probs = np.asarray(mc_pred_probs, dtype=np.float64)
    if mc_pred_probs.ndim != 3 or mc_pred_probs.shape[0] < 2:
        raise ValueError(f"mc_pred_probs must be (T >= 2, N, K), got shape {mc_pred_probs.shape}")
    for pass_probs in mc_pred_probs:
        check_pred_probs(pass_probs, name="mc_pred_probs[t]")
    mean_entropy = np.mean([_entropy(p) for p in mc_pred_probs], axis=0)
    return np.maximum(_entropy(mc_pred_probs.mean(axis=0)) - mean_entropy, 0.0)


def class_thresholds(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Per class k, the mean predicted probability of k over the samples labelled k: (K,).

    A class the model finds hard (often a rare one) gets a low threshold.  A
    class with no sample keeps the uniform 1/K.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    return _class_thresholds(labels, pred_probs)


def self_confidence(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Per class k, sum p_k^2 / sum p_k over the samples labelled k: (K,).

    The mean self-confidence of the samples labelled k weighted by the
    probability that their label is right (p_k): the typical confidence of the
    model in class k's TRUE members, which the calibration divides by.  A class
    with no sample, or whose samples all have p_k = 0, keeps the uniform 1/K.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    return _self_confidence(labels, pred_probs)


def calibrated_pred_probs(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """pred_probs divided by each class's typical self-confidence and renormalised: (N, K).

    Imbalance pushes a classifier's probabilities towards the common classes, so a
    clean sample of a rare class looks unlikely under its label.  Dividing by
    each class's own typical self-confidence removes that bias before the
    probabilities are read as evidence.

    The self-confidence of class k is the mean of p_k over the samples labelled
    k, each weighted by p_k itself (:func:`self_confidence`), not the plain mean
    of confident learning's threshold (:func:`class_thresholds`).  The plain
    mean counts the wrong labels as under-confidence: where most samples
    labelled k are wrong (symmetric noise on a rare class: 60% noise with a 10:1
    step put 85-95% wrong labels in each rare label) their p_k is near 0, the
    plain mean falls to 0.1, and dividing by it multiplied the rare classes'
    probabilities tenfold, so that a common-class sample given a rare label
    looked right even where the model said otherwise (issue 9; engine 4cf662c,
    benchmarks/RESULTS.md's git history).  The weights take the samples the
    model believes mislabelled out of the mean, and leave it as it was where the
    labels are mostly right.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    return _calibrate(labels, pred_probs)


def prior_matched_pred_probs(labels: np.ndarray, pred_probs: np.ndarray, *, max_iter: int = 1000,
                             tol: float = 1e-3) -> np.ndarray:
    """pred_probs re-weighted per class until each class's total probability equals its number of given
    labels: (N, K).

    p_ik is multiplied by a weight w_k and each row renormalised; the weights are
    found by the fixed-point iteration of prior-shift adjustment (Saerens et al.
    2002) with the given labels' share as the target prior, stopping when every
    class's total is within ``tol * N`` of its label count (or after
    ``max_iter`` rounds).  A label nobody gave gets weight 0.

    Why: a classifier trained out of fold on imbalanced noisy labels under-
    predicts the rare classes (it cannot learn a class of a handful of images
    from four fifths of them), so reading its argmax as the true class calls the
    rare labels' clean samples wrong.  Matching its class totals to the label
    counts moves only the samples the model is unsure about, and a confident
    prediction stays where it was.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    if max_iter < 0 or not tol > 0:
        raise ValueError(f"max_iter must be >= 0 and tol > 0, got {max_iter} and {tol}")
    num_classes = pred_probs.shape[1]
    target = np.bincount(labels, minlength=num_classes).astype(np.float64)
    probs = np.clip(pred_probs, _EPS, None)
    weights = (target > 0).astype(np.float64)
    matched = pred_probs
    for _ in range(max_iter):
        matched = probs * weights
        matched /= matched.sum(axis=1, keepdims=True)
        totals = matched.sum(axis=0)
        if np.abs(totals - target).max() <= tol * max(len(labels), 1):
            break
        weights *= np.divide(target, totals, out=np.zeros_like(target), where=totals > 0)
    return matched


def prob_label_wrong(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Probability that the given label is wrong, 1 - calibrated p[y]: (N,) in [0, 1]."""
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    return 1.0 - _given_label_probs(labels, _calibrate(labels, pred_probs))


def estimate_noise_rate(labels: np.ndarray, pred_probs: np.ndarray, *, method: str = "disagreement") -> float:
    """Estimated share of wrong labels, from out-of-sample ``pred_probs``.

    ``method``:

    * "disagreement" (default): the share of samples whose most probable class
      is not the given label.  It counts the model's own errors as noise too,
      so it runs high by about the out-of-sample error rate on clean data.
    * "confident_joint": confident learning's estimate.  A sample counts towards
      class j -> k when k is the most probable of the classes whose probability
      reaches their threshold; each row is rescaled to the number of samples
      labelled j, and the off-diagonal mass over N is the estimate.  On small,
      imbalanced data it ran higher than "disagreement" (benchmarks/RESULTS.md):
      the rescaling spreads a rare class's unlearnable samples like its noise.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    if method not in _NOISE_RATE_ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {tuple(_NOISE_RATE_ESTIMATORS)}")
    return float(_NOISE_RATE_ESTIMATORS[method](labels, pred_probs))


def _disagreement_rate(labels, pred_probs):
    return np.mean(pred_probs.argmax(axis=1) != labels)


def _confident_joint_rate(labels, pred_probs):
    num_classes = pred_probs.shape[1]
    thresholds = _class_thresholds(labels, pred_probs)
    above = pred_probs >= thresholds[None, :] - 1e-9
    confident = above.any(axis=1)
    confident_class = np.where(above, pred_probs, -np.inf).argmax(axis=1)
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (labels[confident], confident_class[confident]), 1.0)
    label_counts = np.bincount(labels, minlength=num_classes).astype(float)
    row_sums = joint.sum(axis=1)
    calibrated = np.divide(joint * label_counts[:, None], row_sums[:, None],
                           out=np.zeros_like(joint), where=row_sums[:, None] > 0)
    # rows with no confident sample: assume those labels are right
    calibrated[row_sums == 0] = np.diag(label_counts)[row_sums == 0]
    return 1.0 - np.trace(calibrated) / max(len(labels), 1)


_NOISE_RATE_ESTIMATORS = {"disagreement": _disagreement_rate, "confident_joint": _confident_joint_rate}


def _given_label_probs(labels, pred_probs):
    return pred_probs[np.arange(len(labels)), labels]


def _least_confidence(pred_probs):
    return 1.0 - pred_probs.max(axis=1)


def _margin(pred_probs):
    top2 = np.sort(pred_probs, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def _label_loss(labels, pred_probs):
    return -np.log(np.clip(_given_label_probs(labels, pred_probs), _EPS, 1.0))


def _entropy(pred_probs):
    return -np.sum(pred_probs * np.log(np.clip(pred_probs, _EPS, 1.0)), axis=1)


def _class_thresholds(labels, pred_probs):
    num_classes = pred_probs.shape[1]
    counts = np.bincount(labels, minlength=num_classes)
    sums = np.zeros(num_classes)
    np.add.at(sums, labels, _given_label_probs(labels, pred_probs))
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0 / num_classes)


def _self_confidence(labels, pred_probs):
    num_classes = pred_probs.shape[1]
    given = _given_label_probs(labels, pred_probs)
    weights = np.bincount(labels, weights=given, minlength=num_classes)
    weighted = np.bincount(labels, weights=given * given, minlength=num_classes)
    return np.where(weights > _EPS, weighted / np.maximum(weights, _EPS), 1.0 / num_classes)


def _calibrate(labels, pred_probs):
    scaled = pred_probs / np.clip(_self_confidence(labels, pred_probs), _EPS, None)[None, :]
    return scaled / scaled.sum(axis=1, keepdims=True)
