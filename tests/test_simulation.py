"""The simulation end to end on imbalanced, noisy digits (CPU, well under 2 minutes)."""
import json

import numpy as np
import pytest

from selection import simulate


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    code = simulate.main(["--out", str(out), "--noise-rate", "0.4", "--imbalance-ratio", "20", "--epochs", "20",
                          "--rounds", "2", "--budget", "25", "--sampler", "all", "--finetune-epochs", "4",
                          "--quiet"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_exist_as_documented(digits_run):
    out, report = digits_run
    for name in ("results.json", "summary.md", "scores.npz", "budget_curve.png", "clean_kept_per_class.png",
                 "test_metrics.png", "report.html"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()        # the backend's label-quality page, suspects' images inline
    assert page.count('class="card"') == 24 and page.count('src="data:image/png;base64,') == 2 + 24
    with np.load(out / "scores.npz") as scores:
        n = report["dataset"]["num_samples"]
        assert scores["priority"].shape == (n,) and scores["pred_probs"].shape == (n, 10)
        assert scores["lnl_clean_mask"].dtype == bool
        np.testing.assert_allclose(scores["ls_score"], 1 - scores["priority"])


def test_figures_are_honest(digits_run):
    _, report = digits_run
    p1 = report["phase1"]
    assert 0.3 < p1["true_noise_rate"] < 0.45
    assert p1["auroc"]["priority"] > 0.8          # far above chance (0.5)
    assert abs(p1["auroc"]["random"] - 0.5) < 0.1
    assert p1["lnl_clean_precision"] > 0.85       # well above 1 - noise rate
    assert p1["relabels_to_find_80pct"]["priority"] < 0.75 * p1["relabels_to_find_80pct"]["random_expected"]
    phase2 = report["phase2"]
    assert phase2["priority"]["rounds"][-1]["errors_fixed"] > phase2["random"]["rounds"][-1]["errors_fixed"]
    assert phase2["priority"]["rounds"][-1]["relabels"] == 50


def test_npz_interface_and_bad_input(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels_true = np.repeat(np.arange(3), 40)
    images = np.zeros((120, 8, 8), np.uint8)
    for i, label in enumerate(labels_true):
        images[i, :, label * 2:label * 2 + 3] = 220
    labels_noisy = labels_true.copy()
    labels_noisy[::5] = (labels_noisy[::5] + 1) % 3
    case = tmp_path / "case.npz"
    np.savez(case, images=images, labels_noisy=labels_noisy, labels_true=labels_true,
             class_names=np.array(["x", "y", "z"]))
    out = tmp_path / "out"
    assert simulate.main(["--npz", str(case), "--out", str(out), "--epochs", "6", "--quiet", "--no-plots"]) == 0
    with np.load(out / "scores.npz") as scores:
        assert scores["vog"].shape == (120,)
    # float images in [0, 1], larger than --image-size: shrunk to train, and drawn in the report
    float_case = tmp_path / "float.npz"
    np.savez(float_case, images=np.repeat(np.repeat(images, 2, 1), 2, 2) / 255.0, labels_noisy=labels_noisy,
             labels_true=labels_true)
    float_out = tmp_path / "float"
    assert simulate.main(["--npz", str(float_case), "--out", str(float_out), "--epochs", "4", "--quiet",
                          "--image-size", "8"]) == 0
    assert json.loads((float_out / "results.json").read_text())["config"]["image_size"] == 8
    assert (float_out / "report.html").read_text().count("data:image/png;base64,") > 0
    two_rates = ["--npz", str(case), "--out", str(tmp_path / "r"), "--quiet", "--class-forget-rates", "0.2", "0.2"]
    assert simulate.main(two_rates) == 2                    # 3 classes: a clear error, no training
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=images, labels_noisy=np.full(120, -3))
    assert simulate.main(["--npz", str(bad), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    missing = tmp_path / "missing.npz"
    np.savez(missing, images=images)
    assert simulate.main(["--npz", str(missing), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    not_npz = tmp_path / "labels.csv"
    not_npz.write_text("image,label\n")
    assert simulate.main(["--npz", str(not_npz), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "is not a .npz file" in capsys.readouterr().err
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=images[:0], labels_noisy=labels_noisy[:0])
    assert simulate.main(["--npz", str(empty), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "holds no samples" in capsys.readouterr().err


def test_pair_random_noise_flips_each_class_to_one_fixed_other_class():
    from model.datasets import inject_noise, load_digits_dataset

    data = load_digits_dataset()
    noisy = inject_noise(data, rate=0.3, kind="pair_random", seed=4)
    wrong = noisy.labels != noisy.labels_true
    assert 0.25 < wrong.mean() < 0.35
    partner = {}
    for true, given in zip(noisy.labels_true[wrong], noisy.labels[wrong]):
        assert partner.setdefault(int(true), int(given)) == int(given)     # one partner per class
    assert sorted(partner) == list(range(10)) and sorted(partner.values()) == list(range(10))
    assert all(c != p for c, p in partner.items())
    again = inject_noise(data, rate=0.3, kind="pair_random", seed=4)
    np.testing.assert_array_equal(noisy.labels, again.labels)
