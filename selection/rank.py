"""Which samples an expert should relabel first, and the score Label Studio sorts by.

Samplers (``method`` of :func:`rank_for_relabel`): the original's random,
entropy, least confidence, margin, BALD (real MC dropout) and coreset
(k-center greedy), the plain label-loss ranking, and this project's
``priority`` (:func:`relabel_priority`).  Every score runs one way: higher =
relabel sooner.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from selection import scores
from selection._validation import check_labels_and_probs, check_mask

logger = logging.getLogger(__name__)

# g of relabel_priority.  0.25 since early-learning regularisation (issue 9): with the networks no longer
# memorising wrong labels, 0.5 cost up to 0.007 of priority AUROC against 0 (symmetric 40%, long-tailed 20:1,
# seed 11: 0.989 vs 0.996) and 0.25 at most 0.005 (0.992); engine 79390eb, benchmarks/RESULTS.md's history.
DEFAULT_RARITY_WEIGHT = 0.25


def relabel_priority(labels: np.ndarray, pred_probs: np.ndarray, *,
                     rarity_weight: float = DEFAULT_RARITY_WEIGHT) -> np.ndarray:
    """Expected value of sending each sample to the expert: (N,) in [0, 1], higher = sooner.

    A relabel is worth something only if the label is wrong, and a wrong label
    costs most where classes are rare: it takes a sample away from its true class
    k and puts noise into its given class y, and either hurts a class with few
    samples more than a common one.  So, with q the calibrated probabilities
    (:func:`selection.scores.calibrated_pred_probs`, which already undo the
    classifier's bias against rare classes)::

        priority_i = sum_{k != y_i} q_ik * (1 + g * (r_k + r_{y_i}) / 2) / (1 + g)

    where r_k = sqrt(n_min / n_k) in (0, 1] is the rarity of class k (n_k the
    expected number of samples truly of class k, sum_i q_ik; the rarest class
    has r = 1) and g = ``rarity_weight``.  With g = 0 the priority is exactly
    the probability that the label is wrong; with g = 1 a likely error between
    two rare classes is worth up to twice one between two common classes, but
    rarity never lifts a sample whose label is probably right above one whose
    label is probably wrong by more than that factor.  The square root keeps a
    20:1 imbalance from becoming a 20:1 weight, which would rank rare-class
    samples with correct labels above common-class errors.

    Measured against the other samplers in benchmarks/RESULTS.md.
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    if rarity_weight < 0:
        raise ValueError(f"rarity_weight must be >= 0, got {rarity_weight}")
    return _relabel_priority(labels, pred_probs, rarity_weight)


def _relabel_priority(labels, pred_probs, rarity_weight):
    calibrated = scores._calibrate(labels, pred_probs)
    expected_counts = np.maximum(calibrated.sum(axis=0), 1e-6)
    rarity = np.sqrt(expected_counts.min() / expected_counts)  # (K,)
    value = 1.0 + rarity_weight * (rarity[None, :] + rarity[labels][:, None]) / 2.0  # (N, K)
    wrong = calibrated.copy()
    wrong[np.arange(len(labels)), labels] = 0.0
    return np.clip((wrong * value).sum(axis=1) / (1.0 + rarity_weight), 0.0, 1.0)


def priority_to_ls_score(priority: np.ndarray) -> np.ndarray:
    """Label Studio prediction score from relabel priority: 1 - priority, in [0, 1].

    Label Studio's "Uncertainty sampling" serves the task with the LOWEST score
    first and the Data Manager sorts ascending, so the most urgent task gets the
    lowest score; a trusted (already reviewed) task with priority 0 gets 1.
    """
    priority = np.asarray(priority, dtype=np.float64)
    if priority.ndim != 1:
        raise ValueError(f"priority must be 1-D, got shape {priority.shape}")
    if priority.size and (not np.isfinite(priority).all() or priority.min() < 0 or priority.max() > 1):
        raise ValueError("priority must be finite and lie in [0, 1]")
    return 1.0 - priority


# --------------------------------------------------------------------------- samplers

def _random(context):
    return context["rng"].random(len(context["labels"]))


def _require(context, key, method):
    if context.get(key) is None:
        raise ValueError(f"method {method!r} needs {key}")
    return context[key]


SAMPLERS: dict[str, Callable[[dict], np.ndarray]] = {
    "random": _random,
    "entropy": lambda c: scores._entropy(c["pred_probs"]),
    "least_confidence": lambda c: scores._least_confidence(c["pred_probs"]),
    "margin": lambda c: scores._margin(c["pred_probs"]),
    "bald": lambda c: scores.bald(_require(c, "mc_pred_probs", "bald")),
    "loss": lambda c: scores._label_loss(c["labels"], c["pred_probs"]),
    "priority": lambda c: _relabel_priority(c["labels"], c["pred_probs"], c["rarity_weight"]),
}
METHODS = (*SAMPLERS, "coreset")


def rank_for_relabel(labels: np.ndarray, pred_probs: np.ndarray, *, method: str = "priority",
                     budget: int | None = None, pool_mask: np.ndarray | None = None,
                     embeddings: np.ndarray | None = None, mc_pred_probs: np.ndarray | None = None,
                     rarity_weight: float = DEFAULT_RARITY_WEIGHT, seed: int = 0) -> np.ndarray:
    """Indices of the pool samples to relabel, most urgent first: (min(budget, pool size),).

    Parameters
    ----------
    labels : (N,) the current labels (given, or the expert's where relabelled).
    pred_probs : (N, K).
    method : one of ``METHODS``.
    budget : how many to return; None = the whole pool, ranked.  A budget larger
        than the pool returns the whole pool (logged), since there is nothing more
        to relabel.
    pool_mask : (N,) bool, the samples that may be chosen (e.g. those the LNL
        phase discarded and nobody has relabelled); None = all.
    embeddings : (N, D), for "coreset": the chosen samples are those farthest
        (k-center greedy, Euclidean) from every sample outside the pool.
    mc_pred_probs : (T, N, K), for "bald".
    """
    labels, pred_probs = check_labels_and_probs(labels, pred_probs)
    num_samples = len(labels)
    pool_mask = np.ones(num_samples, bool) if pool_mask is None else check_mask(pool_mask, num_samples,
                                                                                  name="pool_mask")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    pool_idx = np.flatnonzero(pool_mask)
    if budget is None:
        budget = len(pool_idx)
    elif budget > len(pool_idx):
        logger.info("Budget %d is larger than the pool (%d samples): returning the whole pool", budget,
                    len(pool_idx))
        budget = len(pool_idx)
    if method == "coreset":
        if embeddings is None or len(embeddings) != num_samples:
            raise ValueError("method 'coreset' needs embeddings of shape (N, D)")
        return _k_center_greedy(np.asarray(embeddings, dtype=np.float64), pool_mask, budget)
    context = {"labels": labels, "pred_probs": pred_probs, "mc_pred_probs": mc_pred_probs,
               "rarity_weight": rarity_weight, "rng": np.random.default_rng([seed, 104])}
    pool_scores = SAMPLERS[method](context)[pool_idx]
    order = np.argsort(-pool_scores, kind="stable")
    return pool_idx[order[:budget]]


def _k_center_greedy(embeddings: np.ndarray, pool_mask: np.ndarray, budget: int) -> np.ndarray:
    """Greedy k-center: repeatedly take the pool sample farthest from every centre so far."""
    centres = embeddings[~pool_mask]
    pool_idx = np.flatnonzero(pool_mask)
    pool = embeddings[pool_idx]
    if len(centres):
        min_dist = np.full(len(pool_idx), np.inf)
        for start in range(0, len(centres), 1024):
            block = centres[start:start + 1024]
            dist = ((pool[:, None, :] - block[None, :, :]) ** 2).sum(-1)
            min_dist = np.minimum(min_dist, dist.min(axis=1))
    else:
        min_dist = ((pool - pool.mean(axis=0)) ** 2).sum(-1)
    chosen = []
    for _ in range(budget):
        pick = int(np.argmax(min_dist))
        chosen.append(pool_idx[pick])
        min_dist = np.minimum(min_dist, ((pool - pool[pick]) ** 2).sum(-1))
        min_dist[pick] = -np.inf
    return np.asarray(chosen, dtype=np.int64)
