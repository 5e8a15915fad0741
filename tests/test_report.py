"""The label-quality report (selection/report.py): figures, warnings, the page."""
import numpy as np
import pytest

from selection.report import VersionProgress, given_vs_suggested, label_quality_report, label_warnings, noise_per_label

NAMES = ["benign", "malignant", "normal", "artefact"]


def _case(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 200)
    suggested = labels.copy()
    swap = (labels == 0) & (rng.random(200) < 0.6)          # half of 'benign' look 'malignant' ...
    suggested[swap] = 1
    swap = (labels == 1) & (rng.random(200) < 0.6)          # ... and the other way round
    suggested[swap] = 0
    prob = np.where(suggested != labels, 0.9, 0.05)
    return labels, suggested, prob


def test_figures_and_warnings_name_what_looks_wrong():
    labels, suggested, prob = _case()
    labels[:3] = -1                                          # no given label: left out
    noise, counts = noise_per_label(labels, prob, num_classes=4)
    assert counts.sum() == 197 and noise[2] == pytest.approx(0.05)
    trusted = labels == 3
    noise_t, counts_t = noise_per_label(labels, prob, num_classes=4, trusted_mask=trusted)
    assert counts_t[3] == 0 and np.isnan(noise_t[3])
    matrix = given_vs_suggested(labels, suggested, num_classes=4)
    assert matrix.sum() == 197 and matrix[2, 2] == (labels == 2).sum()
    warnings = label_warnings(labels, suggested, prob, class_names=NAMES)
    assert any("'benign' and 'malignant' look swapped" in w for w in warnings)
    assert not any("looks mostly wrong" in w for w in warnings)          # swapped says it all
    assert not any("normal" in w for w in warnings)


def test_the_page_shows_suspects_in_priority_order_with_links_and_progress():
    labels, suggested, prob = _case(1)
    priority = prob + np.linspace(0, 0.01, 200)
    trusted = np.zeros(200, dtype=bool)
    trusted[int(np.argmax(priority))] = True                # the top one was relabelled: no suspect any more
    ids = np.arange(1000, 1200)
    page = label_quality_report(labels, suggested, prob, class_names=NAMES, priority=priority, trusted_mask=trusted,
                                sample_ids=ids, links=[f"http://ls/projects/1/data?task={i}" for i in ids],
                                thumbnails=[f"http://ls/data/{i}.png" for i in ids], top=5,
                                history=[VersionProgress("alr-v1", 0, 0, 60.0, trained="from scratch"),
                                         VersionProgress("alr-v2", 10, 7, 52.5, trained="from scratch",
                                                         trained_because="The classes changed <a> & <b>")])
    expected = [i for i in np.argsort(-priority, kind="stable") if not trusted[i]][:5]
    shown = [int(part.split('"')[0]) for part in page.split('href="http://ls/projects/1/data?task=')[1:]]
    assert shown == [int(ids[i]) for i in expected]
    assert page.count('class="card"') == 5 and 'src="data:image/png;base64,' in page
    assert "look swapped" in page and "<td>70%</td>" in page
    assert "<small>The classes changed &lt;a&gt; &amp; &lt;b&gt;</small>" in page      # why, escaped
    with pytest.raises(ValueError, match="one entry per sample"):
        label_quality_report(labels, suggested, prob[:-1], class_names=NAMES, priority=priority)
    with pytest.raises(ValueError, match="-1"):
        label_quality_report(labels + 4, suggested, prob, class_names=NAMES, priority=priority)


def test_a_mapping_mistake_warns_but_a_rare_label_the_model_has_not_learnt_does_not():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 400)
    suggested = labels.copy()
    suggested[labels == 2] = 3                               # every 'normal' looks like 'artefact': mapping
    scatter = labels == 1                                    # 'malignant' unlearnt: suggestions all over
    suggested[scatter] = rng.integers(0, 4, int(scatter.sum()))
    prob = np.where(suggested != labels, 0.8, 0.1)
    warnings = label_warnings(labels, suggested, prob, class_names=NAMES)
    assert len(warnings) == 1 and "'normal' looks mostly wrong: 100%" in warnings[0] and "'artefact'" in warnings[0]


def test_label_names_with_dollar_signs_and_markup_are_drawn_and_shown_as_text():
    """"$x^$" would be matplotlib mathtext (a ParseException, the page a 500); "<b>" would be HTML."""
    labels, suggested, prob = _case(2)
    names = ["<b>benign</b>", "$x^$ & co", r"Fracture $\frac$", "artefact"]     # 0 and 1 look swapped
    page = label_quality_report(labels, suggested, prob, class_names=names, priority=prob)
    assert page.count('src="data:image/png;base64,') >= 2
    assert "<b>benign</b>" not in page and "&lt;b&gt;benign&lt;/b&gt;" in page and "$x^$ &amp; co" in page
