"""The paper's protocol with an oracle, on any dataset with ground truth.

    python -m selection.simulate --out runs/digits                     # digits, LT 20, 40% noise
    python -m selection.simulate --npz CASE.npz --out DIR --rounds 5 --budget 20 --sampler all

Phase 1 (Co-teaching + VoG) on the noisy labels, then ``--rounds`` rounds of
``--budget`` relabels chosen by ``--sampler`` from the samples LNL discarded,
answered by the oracle (labels_true), with fine-tuning on the trusted set after
each round.  Only relabelled samples ever change label (the original gave the
whole LNL clean set its true labels for free).

Writes into --out: scores.npz (Phase 1 per-sample results, ../shared/INTERFACES.md),
results.json (every figure), summary.md, the plots budget_curve.png,
clean_kept_per_class.png and test_metrics.png, and report.html (the label-quality page the ML
backend serves per project: noise per label, given vs suggested, the suspects with their images).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from model.config import SELECTION_MODES, VOG_SOURCES, EngineConfig
from model.data import MIN_TRAINING_SIDE, own_image_size, shrink_images
from model.vog import VOG_METHODS
from selection import metrics, rank

logger = logging.getLogger("selection.simulate")

SAMPLERS = ("priority", "random", "entropy", "least_confidence", "margin", "bald", "coreset", "loss")
RANKINGS = ("priority", "prob_label_wrong", "loss", "vog", "random")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selection.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--npz", type=Path, help="a .npz case (images, labels_noisy[, labels_true, "
                        "class_names, test_images, test_labels]); no noise or imbalance is added")
    source.add_argument("--image-folder", type=Path, help="root/<class>/<images>; folder names are the truth")
    source.add_argument("--hdf5", type=Path, help="the original's HDF5 training file (dataset/images, "
                        "dataset/targets); --hdf5-test for its test file")
    parser.add_argument("--hdf5-test", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imbalance-ratio", type=float, default=20.0,
                        help="largest / smallest class, for digits, --image-folder and --hdf5 (default 20; 1 = none)")
    parser.add_argument("--imbalance", choices=("long_tailed", "step"), default="long_tailed")
    parser.add_argument("--noise-rate", type=float, default=0.4, help="label noise to inject (default 0.4)")
    parser.add_argument("--noise", choices=("symmetric", "class_dependent", "pair_random"), default="symmetric")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="clean test share held out per class before imbalance and noise (default 0.25)")
    parser.add_argument("--image-size", type=int, default=EngineConfig.image_size,
                        help="the side images train at: --image-folder resizes every image to it; .npz, HDF5 "
                             "images larger than it are shrunk to it (aspect kept), smaller ones keep their size "
                             f"(default {EngineConfig.image_size}: the small CNN on a CPU in minutes; larger means "
                             "ResNet-18 and hours without a GPU)")
    parser.add_argument("--epochs", type=int, default=EngineConfig.epochs)
    parser.add_argument("--rounds", type=int, default=0, help="relabelling rounds (default 0: Phase 1 only)")
    parser.add_argument("--budget", type=int, default=20, help="relabels per round (default 20)")
    parser.add_argument("--sampler", choices=(*SAMPLERS, "all"), default="priority")
    parser.add_argument("--finetune-epochs", type=int, default=EngineConfig.finetune_epochs)
    parser.add_argument("--forget-rate", type=float, default=None, help="default: estimated from the data")
    parser.add_argument("--class-forget-rates", type=float, nargs="+", default=None, metavar="RATE",
                        help="the share of wrong labels within each given label, one per class in class order, when "
                             "an audit measured it (default: estimated from the data)")
    parser.add_argument("--estimate-logit-adjustment", type=float, default=EngineConfig.estimate_logit_adjustment,
                        help="tau of the forget-rate estimate's logit-adjusted folds (0 = plain cross-entropy)")
    parser.add_argument("--selection", choices=SELECTION_MODES, default=EngineConfig.selection)
    parser.add_argument("--vog-method", choices=VOG_METHODS, default=EngineConfig.vog_method)
    parser.add_argument("--vog-source", choices=VOG_SOURCES, default=EngineConfig.vog_source)
    parser.add_argument("--mix-ratio", type=float, default=EngineConfig.mix_ratio)
    parser.add_argument("--elr-weight", type=float, default=EngineConfig.elr_weight,
                        help="weight of early-learning regularisation in Co-teaching (0 = plain Co-teaching)")
    parser.add_argument("--rarity-weight", type=float, default=EngineConfig.rarity_weight,
                        help="weight of class rarity in the relabel priority (0 = probability the label is wrong)")
    parser.add_argument("--arch", default=EngineConfig.arch)
    parser.add_argument("--device", default=EngineConfig.device)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def load_case(args):
    """(train, test) LabelledImages from the arguments; noise and imbalance as asked."""
    from model import datasets

    if args.image_size < MIN_TRAINING_SIDE:
        raise ValueError(f"--image-size must be >= {MIN_TRAINING_SIDE}, got {args.image_size}")
    if args.npz is not None:
        full, test = datasets.load_npz(args.npz)
        return _shrunk(full, args.image_size), _shrunk(test, args.image_size)
    if args.image_folder is not None:
        full = datasets.load_image_folder(args.image_folder, image_size=args.image_size, channels=1)
        test = None
    elif args.hdf5 is not None:
        full = datasets.load_hdf5(args.hdf5)
        test = datasets.load_hdf5(args.hdf5_test, class_names=full.class_names) if args.hdf5_test else None
        full, test = _shrunk(full, args.image_size), _shrunk(test, args.image_size)
    else:
        full, test = datasets.load_digits_dataset(), None
    if test is None and args.test_fraction > 0:
        train_idx, test_idx = datasets.stratified_split(full.labels, fraction=args.test_fraction, seed=args.seed)
        full, test = full.subset(train_idx), full.subset(test_idx)
    if args.imbalance_ratio > 1:
        full = datasets.make_imbalanced(full, imbalance_ratio=args.imbalance_ratio, kind=args.imbalance,
                                        seed=args.seed)
    if args.noise_rate > 0:
        full = datasets.inject_noise(full, rate=args.noise_rate, kind=args.noise, seed=args.seed)
    return full, test


def _shrunk(case, max_size: int):
    """``case`` with its images no larger than ``max_size`` px on their larger side (model.data.shrink_images);
    None for no case."""
    if case is None:
        return None
    images = shrink_images(case.images, max_size=max_size)
    if images is not case.images:
        logger.info("Images of %d x %d px shrunk to %d x %d to train (--image-size %d; a larger size trains at "
                    "the cost of its pixels, with ResNet-18 above 32 px)", *case.images.shape[1:3],
                    *images.shape[1:3], max_size)
    return replace(case, images=images)


def phase1_figures(train, result, *, num_classes: int, seed: int) -> dict:
    """Detection AUROCs, clean-set quality, per-class kept rates and static budget figures."""
    figures = {"forget_rate_used": result.forget_rate}
    if train.labels_true is None:
        return figures
    wrong = train.labels != train.labels_true
    correct = ~wrong
    counts = np.bincount(train.labels_true, minlength=num_classes)
    ranking_scores = {
        "priority": result.priority, "prob_label_wrong": result.prob_label_wrong, "loss": result.loss,
        "vog": result.vog_scores, "random": np.random.default_rng([seed, 103]).random(len(wrong))}
    kept = metrics.per_class_kept_rate(train.labels_true, result.lnl_clean_mask, correct, num_classes=num_classes)
    precision, recall = metrics.clean_set_precision_recall(result.lnl_clean_mask, correct)
    figures.update({
        "true_noise_rate": float(wrong.mean()),
        "num_wrong_labels": int(wrong.sum()),
        "auroc": {name: metrics.auroc(np.nan_to_num(s, nan=0.0), wrong) for name, s in ranking_scores.items()},
        "lnl_clean_precision": precision, "lnl_clean_recall": recall,
        "lnl_clean_size": int(result.lnl_clean_mask.sum()),
        "clean_kept_per_class": kept.tolist(),
        "clean_kept_minority_over_majority": metrics.minority_majority_ratio(kept, counts),
        "class_counts": counts.tolist(),
        "minority_classes": np.flatnonzero(metrics.minority_classes(counts)).tolist(),
    })
    curves, to_80 = {}, {}
    for name, s in ranking_scores.items():
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
        curves[name] = metrics.errors_found_curve(order, wrong).tolist()
        to_80[name] = metrics.relabels_to_find(order, wrong, 0.8)
    to_80["random_expected"] = metrics.random_relabels_to_find(len(wrong), 0.8)
    figures["ranking_curves"] = curves
    figures["relabels_to_find_80pct"] = to_80
    return figures


def test_figures(checkpoint, test, num_classes):
    from model.engine import score_images

    if test is None:
        return None
    predicted = score_images(checkpoint, test.images).predicted_labels
    return metrics.classification_report(test.labels, predicted, num_classes=num_classes)


def run_rounds(train, test, phase1, *, sampler: str, args, config, out: Path, num_classes: int) -> dict:
    """Phase 2 with one sampler: rounds of relabelling by the oracle and fine-tuning."""
    from model.engine import train_and_score

    wrong = train.labels != train.labels_true
    labels = train.labels.copy()
    relabelled = np.zeros(len(labels), bool)
    result, previous = phase1, out / "checkpoints" / "phase1.pt"
    checkpoint = out / "checkpoints" / f"phase2_{sampler}.pt"
    rounds = [{"round": 0, "relabels": 0, "errors_fixed": 0.0, "test": test_figures(previous, test, num_classes)}]
    for round_number in range(1, args.rounds + 1):
        pool = ~result.lnl_clean_mask & ~relabelled
        chosen = rank.rank_for_relabel(labels, result.pred_probs, method=sampler, budget=args.budget,
                                       pool_mask=pool, embeddings=result.embeddings,
                                       mc_pred_probs=result.mc_pred_probs, rarity_weight=config.rarity_weight,
                                       seed=args.seed + round_number)
        if len(chosen) == 0:
            logger.info("[%s] round %d: the pool is empty, stopping", sampler, round_number)
            break
        labels[chosen] = train.labels_true[chosen]  # the oracle answers for these samples only
        relabelled[chosen] = True
        result = train_and_score(train.images, labels, class_names=train.class_names, trusted_mask=relabelled,
                                 previous_checkpoint=previous, checkpoint_path=checkpoint, config=config,
                                 progress_bar=not args.quiet)
        previous = checkpoint
        fixed = float((relabelled & wrong).sum() / max(wrong.sum(), 1))
        rounds.append({"round": round_number, "relabels": int(relabelled.sum()),
                       "wrong_in_batch": int(wrong[chosen].sum()), "errors_fixed": fixed,
                       "test": test_figures(checkpoint, test, num_classes)})
        logger.info("[%s] round %d: %d relabels, %d were wrong; %.1f%% of all label errors fixed", sampler,
                    round_number, len(chosen), int(wrong[chosen].sum()), 100 * fixed)
    spent = rounds[-1]["relabels"]
    return {"rounds": rounds,
            "errors_fixed_per_relabel": float((relabelled & wrong).sum() / spent) if spent else None}


def write_summary(out: Path, report: dict) -> None:
    p1 = report["phase1"]
    lines = ["# Simulation summary", "", f"Command: `{report['command']}`", "",
             f"- samples: {report['dataset']['num_samples']}, classes: {report['dataset']['num_classes']}, "
             f"class counts: {report['dataset']['class_counts']}",
             f"- forget rate used: {p1['forget_rate_used']:.3f}"]
    if "true_noise_rate" in p1:
        lines += [
            f"- true noise rate: {p1['true_noise_rate']:.3f} ({p1['num_wrong_labels']} wrong labels)",
            f"- LNL clean set: {p1['lnl_clean_size']} samples, precision {p1['lnl_clean_precision']:.3f}, "
            f"recall {p1['lnl_clean_recall']:.3f}",
            f"- clean samples kept, minority / majority classes: {p1['clean_kept_minority_over_majority']:.3f}",
            "", "| ranking | AUROC (wrong labels) | relabels to find 80% |", "|---|---|---|"]
        for name, value in p1["auroc"].items():
            lines.append(f"| {name} | {value:.4f} | {p1['relabels_to_find_80pct'][name]} |")
        lines.append(f"| random (expected) | 0.5 | {p1['relabels_to_find_80pct']['random_expected']:.0f} |")
    if report.get("phase1_test"):
        lines += ["", "Test after Phase 1: " + ", ".join(f"{k} {v:.4f}" for k, v in report["phase1_test"].items())]
    if report.get("phase2"):
        lines += ["", "| sampler | relabels | errors fixed | per relabel | test bal. acc. | test macro-F1 |",
                  "|---|---|---|---|---|---|"]
        for sampler, run in report["phase2"].items():
            last = run["rounds"][-1]
            test = last["test"] or {}
            per = run["errors_fixed_per_relabel"]
            lines.append(f"| {sampler} | {last['relabels']} | {last['errors_fixed']:.3f} | "
                         f"{'-' if per is None else f'{per:.3f}'} | {test.get('balanced_accuracy', float('nan')):.4f} | "
                         f"{test.get('macro_f1', float('nan')):.4f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_plots(out: Path, report: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    p1 = report["phase1"]
    if "ranking_curves" in p1:
        fig, axes = plt.subplots(1, 2 if report.get("phase2") else 1, figsize=(12 if report.get("phase2") else 6, 4.5),
                                 squeeze=False)
        ax = axes[0, 0]
        for name, curve in p1["ranking_curves"].items():
            ax.plot(np.arange(len(curve)), curve, label=name)
        ax.set(xlabel="relabels spent (ranking all samples by the Phase 1 score)",
               ylabel="fraction of label errors found", title="Static ranking")
        ax.axhline(0.8, color="grey", lw=0.5, ls="--")
        ax.legend()
        if report.get("phase2"):
            ax = axes[0, 1]
            for sampler, run in report["phase2"].items():
                ax.plot([r["relabels"] for r in run["rounds"]], [r["errors_fixed"] for r in run["rounds"]],
                        marker="o", label=sampler)
            ax.set(xlabel="relabels spent", ylabel="fraction of label errors fixed",
                   title="Active label cleaning rounds")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "budget_curve.png", dpi=120)
        plt.close(fig)
        written.append("budget_curve.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        kept = np.asarray(p1["clean_kept_per_class"], dtype=float)
        minority = set(p1["minority_classes"])
        colours = ["tab:red" if c in minority else "tab:blue" for c in range(len(kept))]
        ax.bar(np.arange(len(kept)), np.nan_to_num(kept), color=colours)
        ax.set_xticks(np.arange(len(kept)),
                      [f"{name}\n(n={n})" for name, n in zip(report["dataset"]["class_names"], p1["class_counts"])],
                      parse_math=False)        # class names are text, even with "$" in them
        ax.set(ylim=(0, 1.05), ylabel="share of correctly labelled samples kept",
               title=f"LNL clean set per class (red = minority); minority/majority = "
                     f"{p1['clean_kept_minority_over_majority']:.2f}")
        fig.tight_layout()
        fig.savefig(out / "clean_kept_per_class.png", dpi=120)
        plt.close(fig)
        written.append("clean_kept_per_class.png")
    if report.get("phase2") and any(r["test"] for run in report["phase2"].values() for r in run["rounds"]):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, ax in zip(("balanced_accuracy", "macro_f1"), axes):
            for sampler, run in report["phase2"].items():
                ax.plot([r["round"] for r in run["rounds"]], [r["test"][key] for r in run["rounds"]], marker="o",
                        label=sampler)
            ax.set(xlabel="round", ylabel=key.replace("_", " "), title=f"clean test set: {key.replace('_', ' ')}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "test_metrics.png", dpi=120)
        plt.close(fig)
        written.append("test_metrics.png")
    return written


def run(args) -> dict:
    from model.engine import train_and_score

    train, test = load_case(args)
    num_classes = len(train.class_names)
    samplers = SAMPLERS if args.sampler == "all" else (args.sampler,)
    if args.rounds > 0 and train.labels_true is None:
        raise ValueError("relabelling rounds need the oracle's labels (labels_true in the .npz)")
    config = EngineConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, forget_rate=args.forget_rate,
                          class_forget_rates=None if args.class_forget_rates is None else tuple(args.class_forget_rates),
                          estimate_logit_adjustment=args.estimate_logit_adjustment,
                          selection=args.selection, vog_method=args.vog_method, vog_source=args.vog_source,
                          mix_ratio=args.mix_ratio, elr_weight=args.elr_weight,
                          arch=args.arch, device=args.device, seed=args.seed, rarity_weight=args.rarity_weight,
                          image_size=own_image_size(train.images),
                          mc_dropout_passes=20 if "bald" in samplers and args.rounds > 0 else 0)
    out = args.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    logger.info("Phase 1 on %d samples, %d classes (counts %s)", len(train.labels), num_classes,
                np.bincount(train.labels, minlength=num_classes).tolist())
    phase1 = train_and_score(train.images, train.labels, class_names=train.class_names,
                             checkpoint_path=out / "checkpoints" / "phase1.pt", config=config,
                             progress_bar=not args.quiet)
    phase1.save_scores(out / "scores.npz")
    truth = train.labels_true if train.labels_true is not None else train.labels
    report = {
        "command": getattr(args, "command", "python -m selection.simulate"),
        "config": config.to_dict(),
        "dataset": {"num_samples": len(train.labels), "num_classes": num_classes,
                    "class_names": list(train.class_names),
                    "class_counts": np.bincount(truth, minlength=num_classes).tolist(),
                    "test_samples": None if test is None else len(test.labels)},
        "phase1": phase1_figures(train, phase1, num_classes=num_classes, seed=args.seed),
        "phase1_history": phase1.history,
        "phase1_test": test_figures(out / "checkpoints" / "phase1.pt", test, num_classes),
        "phase2": {},
    }
    if args.rounds > 0:
        for sampler in samplers:
            report["phase2"][sampler] = run_rounds(train, test, phase1, sampler=sampler, args=args, config=config,
                                                   out=out, num_classes=num_classes)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=_json_default))
    write_summary(out, report)
    report["plots"] = [] if args.no_plots else write_plots(out, report) + [write_quality_report(out, train, phase1)]
    return report


def write_quality_report(out: Path, train, phase1) -> str:
    """report.html: the label-quality page the ML backend serves per project, for Phase 1, with
    the suspects' own images inline."""
    from selection.report import label_quality_report, suspect_order

    thumbnails: list[str | None] = [None] * len(train.labels)
    for i in suspect_order(train.labels, phase1.priority, top=24).tolist():
        thumbnails[i] = _data_uri(train.images[i])
    page = label_quality_report(train.labels, phase1.predicted_labels, np.nan_to_num(phase1.prob_label_wrong),
                                class_names=list(train.class_names), priority=phase1.priority,
                                thumbnails=thumbnails, title="Label quality (simulation, Phase 1)",
                                subtitle=f"{len(train.labels)} samples; {out}")
    (out / "report.html").write_text(page, encoding="utf-8")
    return "report.html"


def _data_uri(image: np.ndarray) -> str:
    """A (H, W, C) image, uint8 or float in [0, 1], as a PNG data URI, enlarged to at least 96 px for a thumbnail."""
    import base64
    import io

    from PIL import Image

    if image.dtype != np.uint8:
        image = np.round(image * 255).astype(np.uint8)
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    picture = Image.fromarray(np.ascontiguousarray(pixels))
    scale = max(1, 96 // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = "python -m selection.simulate " + " ".join(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        logger.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out}/results.json, summary.md, scores.npz"
          + "".join(f", {p}" for p in report["plots"]))
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
