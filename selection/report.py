"""A label-quality report people can look at: one self-contained HTML page.

Numpy in, an HTML string out (plots as inline PNG, no JavaScript), so that the ML backend
serves it per project and the simulation writes it next to its results::

    html = label_quality_report(labels, suggested, prob_label_wrong, class_names=names,
                                priority=priority, trusted_mask=trusted)

What it shows: the estimated noise rate per given label (a bar per label, so the rare ones are
visible), given vs suggested label (a heat map), the most suspicious samples as thumbnails
(given / suggested label, P(label wrong), each linking where the caller says), progress over
versions, and warnings for labels that look mostly wrong or swapped (the signature of a label
mapping mistake rather than annotator noise).
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from selection._validation import check_labels

MOSTLY_WRONG = 0.5          # mean P(wrong) and the share suggested as one other label above this: mostly wrong
SWAPPED_SHARE = 0.4         # both ways at least this share of a label suggested as the other: swapped
MIN_SAMPLES = 5             # labels with fewer samples get no warning (too few to tell)


@dataclass(frozen=True)
class VersionProgress:
    """One model version: relabels trusted so far, how many changed the given label, the errors
    the version estimates are left (sum of P(label wrong) over the untrusted), and how it was
    trained (e.g. "fine-tuned", "from scratch"; "" = not said) and why, where the caller knows."""
    name: str
    relabels: int
    changed: int
    errors_left: float
    trained: str = ""
    trained_because: str = ""


def noise_per_label(labels: np.ndarray, prob_label_wrong: np.ndarray, *, num_classes: int,
                    trusted_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(estimated noise rate, sample count) per given label, over the untrusted samples;
    NaN for a label with none.  Samples without a given label (-1) are left out."""
    labels = np.asarray(labels)
    untrusted = labels >= 0
    if trusted_mask is not None:
        untrusted &= ~np.asarray(trusted_mask, dtype=bool)
    counts = np.bincount(labels[untrusted], minlength=num_classes)
    sums = np.bincount(labels[untrusted], weights=np.asarray(prob_label_wrong, dtype=float)[untrusted],
                       minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def given_vs_suggested(labels: np.ndarray, suggested: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Counts, rows = given label, columns = suggested label (samples without a given label left out)."""
    labels, suggested = np.asarray(labels), np.asarray(suggested)
    keep = labels >= 0
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels[keep], suggested[keep]), 1)
    return matrix


def label_warnings(labels: np.ndarray, suggested: np.ndarray, prob_label_wrong: np.ndarray, *,
                   class_names: Sequence[str], trusted_mask: np.ndarray | None = None) -> list[str]:
    """Plain-language warnings for the signature of a label-mapping mistake, not of annotator
    noise or of a model that has not learnt a rare class yet (whose suggestions scatter): a
    label whose samples mostly look like ONE other label, and two labels that look swapped."""
    k = len(class_names)
    noise, counts = noise_per_label(labels, prob_label_wrong, num_classes=k, trusted_mask=trusted_mask)
    matrix = given_vs_suggested(labels, suggested, num_classes=k)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    np.fill_diagonal(share, 0.0)
    out = []
    swapped = set()
    for a in range(k):
        for b in range(a + 1, k):
            if (min(matrix[a].sum(), matrix[b].sum()) >= MIN_SAMPLES
                    and share[a, b] >= SWAPPED_SHARE and share[b, a] >= SWAPPED_SHARE):
                swapped |= {a, b}
                out.append(f"Labels '{class_names[a]}' and '{class_names[b]}' look swapped: {share[a, b]:.0%} of "
                           f"'{class_names[a]}' look like '{class_names[b]}' and {share[b, a]:.0%} the other way. "
                           f"Check the label mapping before relabelling one by one.")
    for a in range(k):
        b = int(np.argmax(share[a]))
        if a not in swapped and counts[a] >= MIN_SAMPLES and noise[a] > MOSTLY_WRONG and share[a, b] > MOSTLY_WRONG:
            out.append(f"Label '{class_names[a]}' looks mostly wrong: {share[a, b]:.0%} of its {matrix[a].sum()} "
                       f"samples look like '{class_names[b]}' (mean P(label wrong) {noise[a]:.0%}). Check the "
                       f"label mapping before relabelling one by one.")
    return out


def suspect_order(labels: np.ndarray, priority: np.ndarray, *, trusted_mask: np.ndarray | None = None,
                  top: int | None = None) -> np.ndarray:
    """Indices of the samples to look at first: untrusted, with a given label, highest priority
    first (ties by index), the first ``top``."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if trusted_mask is not None:
        keep &= ~np.asarray(trusted_mask, dtype=bool)
    candidates = np.flatnonzero(keep)
    order = candidates[np.argsort(-np.nan_to_num(np.asarray(priority, dtype=float)[candidates], nan=-np.inf),
                                  kind="stable")]
    return order if top is None else order[:top]


def label_quality_report(labels: np.ndarray, suggested: np.ndarray, prob_label_wrong: np.ndarray, *,
                         class_names: Sequence[str], priority: np.ndarray,
                         trusted_mask: np.ndarray | None = None, sample_ids: np.ndarray | None = None,
                         thumbnails: Sequence[str | None] | None = None, links: Sequence[str | None] | None = None,
                         history: Sequence[VersionProgress] = (), title: str = "Label quality",
                         subtitle: str = "", top: int = 24) -> str:
    """The report as one HTML page.

    ``labels`` are the given labels (-1: none), ``suggested`` the model's, ``priority`` orders
    the suspects (higher = look first; trusted samples are never suspects).  ``thumbnails``
    (image URLs or ``data:`` URIs) and ``links`` (where a click goes) are per sample, optional.
    """
    k = len(class_names)
    labels = check_labels(labels)
    if labels.size and (labels.min() < -1 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) or be -1 (no given label)")
    n = len(labels)
    suggested = check_labels(suggested, k, name="suggested")
    prob_label_wrong = np.asarray(prob_label_wrong, dtype=float)
    priority = np.asarray(priority, dtype=float)
    trusted = np.zeros(n, dtype=bool) if trusted_mask is None else np.asarray(trusted_mask, dtype=bool)
    if not (len(suggested) == len(prob_label_wrong) == len(priority) == len(trusted) == n):
        raise ValueError("labels, suggested, prob_label_wrong, priority and trusted_mask must have one entry per sample")
    ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
    noise, counts = noise_per_label(labels, prob_label_wrong, num_classes=k, trusted_mask=trusted)
    matrix = given_vs_suggested(labels, suggested, num_classes=k)
    warnings = label_warnings(labels, suggested, prob_label_wrong, class_names=class_names, trusted_mask=trusted)
    errors_left = float(prob_label_wrong[~trusted & (labels >= 0)].sum())

    order = suspect_order(labels, priority, trusted_mask=trusted, top=top)
    cards = []
    for i in order:
        src = thumbnails[i] if thumbnails is not None else None
        href = links[i] if links is not None else None
        image = f'<img src="{html.escape(src)}" alt="sample {ids[i]}">' if src else '<div class="noimg">no image</div>'
        body = (f'{image}<div class="cap">#{ids[i]} &middot; given <b>{html.escape(str(class_names[labels[i]]))}</b>'
                f' &rarr; suggested <b>{html.escape(str(class_names[suggested[i]]))}</b><br>'
                f'P(label wrong) {prob_label_wrong[i]:.2f}</div>')
        cards.append(f'<a class="card" href="{html.escape(href)}" target="_blank" rel="noopener">{body}</a>'
                     if href else f'<div class="card">{body}</div>')

    rows = "".join(f"<tr><td>{html.escape(v.name)}</td><td>{v.relabels}</td><td>{v.changed}</td>"
                   f"<td>{f'{v.changed / v.relabels:.0%}' if v.relabels else '-'}</td>"
                   f"<td>{v.errors_left:.1f}</td>"
                   f'<td class="trained">{html.escape(v.trained or "-")}'
                   f'{f"<br><small>{html.escape(v.trained_because)}</small>" if v.trained_because else ""}</td></tr>'
                   for v in history)
    progress = (f'<table id="progress"><tr><th>version</th><th>relabels</th><th>changed the label</th>'
                f'<th>hit rate</th><th>estimated errors left</th><th class="trained">trained</th></tr>{rows}</table>'
                if history else "<p>No earlier versions yet.</p>")
    warning_html = "".join(f'<div class="warning">{html.escape(w)}</div>' for w in warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ margin-bottom: 0; }} .sub {{ color: #666; margin-top: 4px; }}
.warning {{ background: #fff3cd; border: 1px solid #e0b000; padding: 8px 12px; margin: 8px 0; }}
.plots img {{ max-width: 48%; vertical-align: top; }}
#suspects {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.card {{ width: 150px; border: 1px solid #ccc; padding: 6px; text-decoration: none; color: #222; font-size: 12px; }}
.card img, .noimg {{ width: 150px; height: 150px; object-fit: contain; background: #000; display: block; }}
.noimg {{ color: #aaa; text-align: center; line-height: 150px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
.trained {{ text-align: left; max-width: 40em; }} td.trained small {{ color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>
<p id="summary">{n} samples, {int(trusted.sum())} with a trusted label; estimated wrong labels left (the sum
of P(label wrong)): <b>{errors_left:.1f}</b> ({errors_left / max(int((~trusted & (labels >= 0)).sum()), 1):.1%} of
the untrusted); the model suggests another label for {int((suggested != labels)[~trusted & (labels >= 0)].sum())}.</p>
<div id="warnings">{warning_html}</div>
<div class="plots">
<img id="noise-per-label" alt="mean P(label wrong) per given label" src="{_noise_plot(noise, counts, class_names)}">
<img id="confusion" alt="given vs suggested label" src="{_confusion_plot(matrix, class_names)}">
</div>
<h2>Most suspicious first</h2><div id="suspects">{"".join(cards) or "<p>No untrusted samples.</p>"}</div>
<h2>Progress over versions</h2>{progress}
</body></html>
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _noise_plot(noise: np.ndarray, counts: np.ndarray, class_names: Sequence[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(len(class_names))
    values = np.nan_to_num(noise, nan=0.0)
    bars = ax.bar(x, values, color=["#c0392b" if v > MOSTLY_WRONG else "#2c7fb8" for v in values])
    for bar, count in zip(bars, counts):        # the sample count on each bar: rare labels stay visible
        ax.annotate(f"n={count}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(x, [str(c) for c in class_names], rotation=45 if len(class_names) > 12 else 0, fontsize=8,
                  parse_math=False)        # a label is text, even with "$" in it (matplotlib's mathtext)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean P(label wrong)")
    ax.set_title("Estimated noise per given label: mean P(label wrong), untrusted samples")
    return _png(fig)


def _confusion_plot(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.4))
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(matrix / rows, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, [str(c) for c in class_names], fontsize=7, rotation=90 if len(class_names) > 12 else 0,
                  parse_math=False)
    ax.set_yticks(ticks, [str(c) for c in class_names], fontsize=7, parse_math=False)
    ax.set_xlabel("suggested label")
    ax.set_ylabel("given label")
    ax.set_title("Given vs suggested (share of each given label)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)
