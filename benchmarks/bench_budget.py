"""Budget curves of every sampler: label errors fixed and clean-test quality vs relabels spent.

    python benchmarks/bench_budget.py           # 4 rounds of 20 relabels, 3 seeds (a few minutes)
    python benchmarks/bench_budget.py --full    # 9 rounds of 20 relabels (the original's round count)

For each seed, one ``selection.simulate.run`` with ``--rounds R --sampler all``:
digits, long-tailed ratio 20, 40% symmetric noise, 25% of each class held out as a
clean test set; Phase 1 (Co-teaching + VoG, default EngineConfig: class-balanced
selection with per-label forget rates, rarity_weight 0.25) once, then per
sampler R rounds of ``--budget`` relabels drawn from the samples LNL discarded,
answered by the oracle, with fine-tuning on the trusted set after each round.
Reports per round: the fraction of all label errors fixed, and the clean test
set's balanced accuracy and macro-F1 (means ± std over seeds), and draws
benchmarks/budget_curves.png.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _results import provenance, markdown_table, mean_std, replace_section  # noqa: E402
from model.config import EngineConfig  # noqa: E402
from selection import simulate  # noqa: E402

SECTION = "Engine: relabel budget curves (all samplers)"
PLOT = Path(__file__).resolve().parent / "budget_curves.png"


def run_seed(seed: int, args, out: Path) -> dict:
    argv = ["--out", str(out), "--seed", str(seed), "--rounds", str(args.rounds), "--budget", str(args.budget),
            "--sampler", "all", "--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--noise-rate", str(args.noise_rate), "--noise", args.noise, "--device", "cpu",
            "--quiet", "--no-plots"]
    args_sim = simulate.build_parser().parse_args(argv)
    args_sim.command = "python -m selection.simulate " + " ".join(argv)  # run() reads it (set by simulate.main)
    return simulate.run(args_sim)


def curves(reports: list[dict]) -> dict:
    """{sampler: {"relabels": (R+1,), metric: (seeds, R+1)}} padded with NaN where a pool ran dry."""
    out = {}
    for sampler in reports[0]["phase2"]:
        runs = [rep["phase2"][sampler]["rounds"] for rep in reports]
        length = max(len(r) for r in runs)
        entry = {}
        for key, get in (("relabels", lambda r: r["relabels"]), ("errors_fixed", lambda r: r["errors_fixed"]),
                         ("balanced_accuracy", lambda r: r["test"]["balanced_accuracy"]),
                         ("macro_f1", lambda r: r["test"]["macro_f1"])):
            values = np.full((len(runs), length), np.nan)
            for i, run in enumerate(runs):
                values[i, :len(run)] = [get(r) for r in run]
            entry[key] = values
        out[sampler] = entry
    return out


def plot(data: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for sampler, entry in data.items():
        x = np.nanmean(entry["relabels"], axis=0)
        for ax, key in zip(axes, ("errors_fixed", "balanced_accuracy", "macro_f1")):
            mean, std = np.nanmean(entry[key], axis=0), np.nanstd(entry[key], axis=0)
            style = dict(lw=2.5, color="black") if sampler == "priority" else dict(lw=1.2)
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=sampler, **style)
            ax.fill_between(x, mean - std, mean + std, alpha=0.12, color=line.get_color())
    for ax, label in zip(axes, ("fraction of all label errors fixed", "clean test balanced accuracy",
                                "clean test macro-F1")):
        ax.set(xlabel="relabels spent", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="9 rounds (default 4)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--noise", choices=("symmetric", "class_dependent"), default="symmetric")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1 on a shared machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; no RESULTS.md section, no PNG")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (9 if args.full else 4)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            t0 = time.perf_counter()
            reports.append(run_seed(seed, args, Path(tmp) / f"seed{seed}"))
            print(f"seed {seed}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    data = curves(reports)
    samplers = list(data)
    rounds = range(args.rounds + 1)
    relabels = [r * args.budget for r in rounds]

    def table(key, fmt):
        rows = [[s, *[mean_std(data[s][key][:, r], fmt) if r < data[s][key].shape[1] else "-" for r in rounds]]
                for s in samplers]
        return markdown_table(["sampler", *[str(n) for n in relabels]], rows)

    per_relabel = [[s, mean_std([rep["phase2"][s]["errors_fixed_per_relabel"] for rep in reports], "{:.2f}"),
                    mean_std([rep["phase2"][s]["rounds"][-1]["errors_fixed"] for rep in reports])]
                   for s in samplers]
    pool = [rep["dataset"]["num_samples"] - rep["phase1"]["lnl_clean_size"] for rep in reports]
    wrong_in_pool = [int(rep["phase1"]["num_wrong_labels"]) for rep in reports]
    body = "\n".join([
        provenance(), "",
        f"Digits, long-tailed ratio 20 ({reports[0]['dataset']['num_samples']} training samples, "
        f"{reports[0]['dataset']['test_samples']} clean test samples), {int(args.noise_rate * 100)}% {args.noise} "
        f"noise ({mean_std(wrong_in_pool, '{:.0f}')} wrong labels), seeds {args.seeds}; Phase 1: {args.epochs} "
        f"epochs, default EngineConfig (class-balanced selection with per-label forget rates, VoG snapshot from "
        f"the {EngineConfig.vog_source.replace('_', ' ')}, early-learning regularisation weight "
        f"{EngineConfig.elr_weight:g}, relabel priority rarity_weight {EngineConfig.rarity_weight:g}); then "
        f"{args.rounds} rounds of {args.budget} relabels from the LNL-discarded "
        f"pool ({mean_std(pool, '{:.0f}')} samples), {args.finetune_epochs} fine-tuning epochs per round. "
        "Columns: relabels spent. Mean ± std over seeds. Plot: benchmarks/budget_curves.png.", "",
        "### Fraction of all label errors fixed", "", table("errors_fixed", "{:.3f}"), "",
        "### Clean test balanced accuracy", "", table("balanced_accuracy", "{:.3f}"), "",
        "### Clean test macro-F1", "", table("macro_f1", "{:.3f}"), "",
        "### Wrong labels among the relabelled samples (hit rate) after the last round", "",
        markdown_table(["sampler", "errors fixed per relabel", "fraction of errors fixed"], per_relabel),
    ])
    print(body)
    if not args.no_write:
        replace_section(SECTION, body)
        plot(data, PLOT, f"digits LT20, {int(args.noise_rate * 100)}% {args.noise} noise, seeds {args.seeds}, "
                          f"{args.rounds} rounds x {args.budget} relabels (mean ± std)")
        print(f"wrote {PLOT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
