"""selection/: scores, samplers, priority, metrics, on small arrays with known answers."""
import numpy as np
import pytest

from selection import metrics, rank, scores

LABELS = np.array([0, 0, 1, 1])
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.5, 0.5]])


def test_label_loss_and_uncertainty_scores():
    np.testing.assert_allclose(scores.label_loss(LABELS, PROBS), -np.log([0.9, 0.2, 0.7, 0.5]))
    np.testing.assert_allclose(scores.least_confidence(PROBS), [0.1, 0.2, 0.3, 0.5])
    np.testing.assert_allclose(scores.margin(PROBS), [0.2, 0.4, 0.6, 1.0])
    assert np.argmax(scores.entropy(PROBS)) == 3


def test_bald_is_zero_when_passes_agree_and_positive_when_they_disagree():
    agree = np.stack([PROBS, PROBS])
    np.testing.assert_allclose(scores.bald(agree), 0.0, atol=1e-12)
    disagree = np.stack([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])])
    assert scores.bald(disagree)[0] == pytest.approx(np.log(2))


def test_calibration_undoes_a_bias_against_a_rare_class():
    # class 1 is rare and the model is timid about it: p(1) ~ 0.4 even when right
    labels = np.array([0] * 8 + [1] * 2)
    probs = np.array([[0.95, 0.05]] * 8 + [[0.6, 0.4]] * 2)
    raw_wrong = 1 - probs[np.arange(10), labels]
    calibrated_wrong = scores.prob_label_wrong(labels, probs)
    assert raw_wrong[9] > 0.5 > calibrated_wrong[9]


def test_calibration_is_not_fooled_by_a_rare_label_full_of_wrong_labels():
    # label 1 is rare and mostly wrong: one true 1 and eight common-class samples given label 1, which the
    # model (rightly) calls class 0.  The plain mean of p(1) over label 1 counts those eight as timidity
    # about class 1 and would inflate class 1 sevenfold; the self-confidence weights them out.
    labels = np.array([0] * 8 + [1] + [1] * 8)
    probs = np.array([[0.95, 0.05]] * 8 + [[0.2, 0.8]] + [[0.95, 0.05]] * 8)
    assert scores.class_thresholds(labels, probs)[1] < 0.15
    assert scores.self_confidence(labels, probs)[1] > 0.5
    wrong = scores.prob_label_wrong(labels, probs)
    assert wrong[9:].min() > 0.9 and wrong[8] < 0.2
    # with the labels right, the weighting changes little: the timid rare class is still lifted
    clean = np.array([0] * 8 + [1] * 2)
    timid = np.array([[0.95, 0.05]] * 8 + [[0.6, 0.4]] * 2)
    assert scores.self_confidence(clean, timid) == pytest.approx(scores.class_thresholds(clean, timid))


def test_prior_matching_gives_a_timid_rare_class_its_samples_back_and_keeps_confident_calls():
    # class 1 is rare (10 of 100) and the out-of-fold model is timid about it: p(1) = 0.4 on its clean samples,
    # so the argmax calls all ten wrong.  Two common-class samples carry label 1 and the model is sure they are 0.
    labels = np.array([0] * 88 + [1] * 2 + [1] * 10)
    probs = np.array([[0.97, 0.03]] * 90 + [[0.6, 0.4]] * 10)
    matched = scores.prior_matched_pred_probs(labels, probs)
    np.testing.assert_allclose(matched.sum(axis=0), np.bincount(labels), atol=1e-3 * len(labels))
    np.testing.assert_allclose(matched.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1)[90:] == 0).all() and (matched.argmax(axis=1)[90:] == 1).all()
    assert (matched.argmax(axis=1)[:90] == 0).all()      # the confident calls, the two wrong labels among them
    assert scores.estimate_noise_rate(labels, probs) == pytest.approx(0.12)
    assert scores.estimate_noise_rate(labels, matched) == pytest.approx(0.02)


def test_prior_matching_leaves_matched_probabilities_alone_and_drops_a_label_nobody_gave():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    matched = scores.prior_matched_pred_probs(labels, probs)
    assert (matched[:, 2] < 1e-6).all()
    np.testing.assert_allclose(matched.sum(axis=0), [2, 2, 0], atol=4e-3)
    np.testing.assert_array_equal(matched.argmax(axis=1), labels)
    with pytest.raises(ValueError, match="max_iter"):
        scores.prior_matched_pred_probs(labels, probs, tol=0)
    with pytest.raises(ValueError, match="rows"):
        scores.prior_matched_pred_probs(labels[:3], probs)


def test_noise_rate_estimate_is_exact_for_perfect_out_of_sample_probabilities():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    labels = truth.copy()
    flip = rng.random(400) < 0.3
    labels[flip] = (truth[flip] + 1) % 4
    probs = np.eye(4)[truth] * 0.96 + 0.01
    for method in ("disagreement", "confident_joint"):
        assert scores.estimate_noise_rate(labels, probs, method=method) == pytest.approx(flip.mean(), abs=1e-9)


def test_priority_reduces_to_probability_wrong_and_favours_rare_classes():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=50)
    labels = rng.integers(0, 3, 50)
    np.testing.assert_allclose(rank.relabel_priority(labels, probs, rarity_weight=0.0),
                               scores.prob_label_wrong(labels, probs))
    # two equally likely errors: the one whose true class is rare ranks first
    labels = np.array([0] * 20 + [1] * 2 + [0, 0])
    probs = np.array([[0.9, 0.1]] * 20 + [[0.1, 0.9]] * 2 + [[0.3, 0.7], [0.3, 0.7]])
    probs3 = np.hstack([probs * 0.98, np.full((24, 1), 0.02)])
    labels = np.append(labels, 2)
    probs3 = np.vstack([probs3, [0.02, 0.02, 0.96]])
    priority = rank.relabel_priority(labels, probs3)
    assert priority.min() >= 0 and priority.max() <= 1
    assert priority[22] > priority[0]


def test_ls_score_runs_the_other_way_and_validates():
    np.testing.assert_allclose(rank.priority_to_ls_score(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])
    with pytest.raises(ValueError):
        rank.priority_to_ls_score(np.array([1.5]))


@pytest.mark.parametrize("method", ["priority", "entropy", "least_confidence", "margin", "loss", "random"])
def test_samplers_return_budget_pool_members_without_repeats(method):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=40)
    labels = rng.integers(0, 4, 40)
    pool = rng.random(40) < 0.5
    chosen = rank.rank_for_relabel(labels, probs, method=method, budget=5, pool_mask=pool)
    assert len(chosen) == 5 and len(set(chosen)) == 5 and pool[chosen].all()


def test_budget_larger_than_pool_returns_the_whole_pool():
    chosen = rank.rank_for_relabel(LABELS, PROBS, budget=100, pool_mask=np.array([True, False, True, False]))
    assert sorted(chosen) == [0, 2]


def test_uncertainty_sampler_order_is_known():
    assert list(rank.rank_for_relabel(LABELS, PROBS, method="least_confidence")) == [3, 2, 1, 0]


def test_coreset_picks_the_far_points_first():
    embeddings = np.array([[0.0], [0.1], [5.0], [10.0]])
    pool = np.array([False, True, True, True])
    assert list(rank.rank_for_relabel(np.zeros(4, int), np.full((4, 2), 0.5), method="coreset", budget=2,
                                      pool_mask=pool, embeddings=embeddings)) == [3, 2]


def test_bald_and_coreset_demand_their_inputs():
    with pytest.raises(ValueError, match="mc_pred_probs"):
        rank.rank_for_relabel(LABELS, PROBS, method="bald")
    with pytest.raises(ValueError, match="embeddings"):
        rank.rank_for_relabel(LABELS, PROBS, method="coreset")


def test_bad_inputs_get_named_errors():
    with pytest.raises(ValueError, match="labels must lie in"):
        scores.label_loss(np.array([0, 5]), PROBS[:2])
    with pytest.raises(ValueError, match="rows"):
        scores.label_loss(LABELS, PROBS[:3])
    with pytest.raises(ValueError, match="sum to 1"):
        scores.entropy(np.ones((2, 2)))
    with pytest.raises(ValueError, match="unknown method"):
        rank.rank_for_relabel(LABELS, PROBS, method="magic")


def test_auroc_known_values_and_ties():
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert metrics.auroc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    rng = np.random.default_rng(3)
    assert abs(metrics.auroc(rng.random(4000), rng.random(4000) < 0.3) - 0.5) < 0.03


def test_classification_metrics_known_values():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 2, 1])
    assert metrics.balanced_accuracy(truth, pred, num_classes=3) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert metrics.matthews_corrcoef(truth, truth, num_classes=3) == pytest.approx(1.0)
    f1 = [2 * 2 / (2 * 2 + 1), 2 * 1 / (2 + 1 + 1), 2 * 1 / (2 + 1)]
    assert metrics.macro_f1(truth, pred, num_classes=3) == pytest.approx(np.mean(f1))


def test_clean_set_and_budget_metrics():
    clean = np.array([True, True, False, False])
    correct = np.array([True, False, True, False])
    assert metrics.clean_set_precision_recall(clean, correct) == (0.5, 0.5)
    wrong = np.array([False, True, True, False])
    np.testing.assert_allclose(metrics.errors_found_curve([1, 0, 2, 3], wrong), [0, 0.5, 0.5, 1.0, 1.0])
    assert metrics.relabels_to_find([1, 0, 2, 3], wrong, 0.8) == 3
    kept = metrics.per_class_kept_rate(np.array([0, 0, 1, 1]), np.array([True, False, True, True]),
                                       np.ones(4, bool), num_classes=2)
    np.testing.assert_allclose(kept, [0.5, 1.0])
    assert metrics.minority_majority_ratio(kept, np.array([10, 2])) == 2.0
