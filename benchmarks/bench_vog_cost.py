"""Cost of VoG tracking: Co-teaching epochs with and without the VoG snapshot, in one process.

    python benchmarks/bench_vog_cost.py            # digits 8 px and 32 px with the small CNN (~2 min)
    python benchmarks/bench_vog_cost.py --full     # also ResNet-18 at 32 px (slow on a CPU: ~40 s an epoch)

Data: digits, long-tailed ratio 20, 40% symmetric noise (model.datasets, via the
simulation's loader), seed 0.  For each case three training states are built from
the same seed (identical initial networks) and advanced epoch by epoch, the three
modes interleaved in a rotating order so that load on the shared machine hits them
alike:

* ``none``: train_one_epoch only (the cost of Co-teaching itself);
* ``last_layer``: EngineConfig(vog_source="eval_pass"): train_one_epoch + record_vog_snapshot (analytic VoG
  from an extra eval-mode pass);
* ``last_layer, train_pass``: the default, EngineConfig(vog_source="train_pass"): train_one_epoch(record_vog=True)
  writes p_y and h of the training forward pass into the buffers, then ``buffer.commit()``
  (no extra pass; its cost is inside train_one_epoch, so read "epoch vs no VoG" for it);
* ``input_gradient``: train_one_epoch + record_vog_snapshot (VoG of Agarwal et al.).

As in model.coteaching.train_coteaching, after Tk the VoG modes read the ring
buffers' scores (``VoGBuffer.scores``) and select with them; that read is timed
as part of the VoG overhead.  The first epoch (warm-up) is dropped; medians over
the rest.  Overhead = median(with) / median(none) - 1, and the snapshot's own
median time / median epoch time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import load_case, upscale  # noqa: E402
from _results import provenance, markdown_table, replace_section  # noqa: E402
from model import coteaching as ct  # noqa: E402
from model.config import EngineConfig  # noqa: E402
from model.data import to_tensor  # noqa: E402
from model.device import seed_everything  # noqa: E402

SECTION = "Engine: VoG tracking cost"
MODES = ("none", "last_layer", "last_layer_train_pass", "input_gradient")
MODE_LABELS = {"none": "none", "last_layer": "last_layer, eval pass",
               "last_layer_train_pass": "last_layer, train_pass", "input_gradient": "input_gradient, eval pass"}


def time_case(images, labels, *, arch: str, epochs: int, seed: int, forget_rate: float) -> dict:
    x, y = to_tensor(images), torch.from_numpy(labels)
    trusted = torch.zeros(len(y), dtype=torch.bool)
    device = torch.device("cpu")
    runs = {}
    for mode in MODES:
        config = EngineConfig(arch=arch, image_size=int(x.shape[-1]), epochs=epochs, seed=seed, device="cpu",
                              vog_method="input_gradient" if mode == "input_gradient" else "last_layer",
                              vog_source="train_pass" if mode == "last_layer_train_pass" else "eval_pass",
                              forget_rate=forget_rate)
        generator = seed_everything(seed)
        state = ct.new_training_state(x, 10, config, device, forget_rate, [forget_rate] * 10)
        runs[mode] = {"config": config, "state": state, "generator": generator,
                      "train": [], "snapshot": [], "scores": []}
    for epoch in range(1, epochs + 1):
        shift = epoch % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            run = runs[mode]
            config, state = run["config"], run["state"]
            # as train_coteaching: one ramp scales the overall and the per-label rates
            ramp = ct.forget_rate_schedule(epoch, forget_rate=1.0, tk=config.tk)
            rate = ramp * state.forget_rate
            class_rates = ramp * torch.tensor(state.class_forget_rates)
            t0 = time.perf_counter()
            vog = None
            if mode != "none" and epoch > config.tk and all(b.ready for b in state.vog_buffers):
                vog = [torch.from_numpy(b.scores()).float() for b in state.vog_buffers]
            t1 = time.perf_counter()
            ct.train_one_epoch(state, x, y, trusted, config=config, device=device, scaler=None,
                               generator=run["generator"], forget_rate=rate, vog_scores=vog,
                               class_forget_rates=class_rates, record_vog=config.vog_source == "train_pass",
                               progress_bar=False)
            t2 = time.perf_counter()
            if config.vog_source == "train_pass":
                for buffer in state.vog_buffers:
                    buffer.commit()
            elif mode != "none":
                ct.record_vog_snapshot(state, x, y, config=config, device=device)
            t3 = time.perf_counter()
            state.epoch = epoch
            if epoch > 1:  # the first epoch is warm-up
                run["train"].append(t2 - t1)
                run["snapshot"].append(t3 - t2)
                run["scores"].append(t1 - t0)
    out = {}
    base = statistics.median(runs["none"]["train"])
    for mode, run in runs.items():
        totals = [a + b + c for a, b, c in zip(run["train"], run["snapshot"], run["scores"])]
        out[mode] = {"epoch": statistics.median(totals), "train": statistics.median(run["train"]),
                     "snapshot": statistics.median(run["snapshot"]),
                     "scores": statistics.median(run["scores"]) if mode != "none" else 0.0}
        out[mode]["overhead_vs_none"] = out[mode]["epoch"] / base - 1.0
        out[mode]["snapshot_share"] = (out[mode]["snapshot"] + out[mode]["scores"]) / out["none"]["epoch"] \
            if "none" in out else float("nan")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also ResNet-18 at 32 px, and more epochs")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs per mode (default 16 for 8 px, 8 for 32 px; --full 30/20, ResNet 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads oversubscribe and "
                             "the timings scatter)")
    parser.add_argument("--resnet-only", action="store_true",
                        help="only ResNet-18 at 32 px (3 epochs), into its own section")
    parser.add_argument("--8px-only", dest="small_only", action="store_true",
                        help="only the 8 px case (default 40 timed epochs), into its own section: a longer, "
                             "steadier median for the cheap modes")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train, _ = load_case(seed=args.seed)
    # The forget rate is fixed (at the true noise rate) so that no estimation pass is timed.
    forget_rate = float((train.labels != train.labels_true).mean())
    cases = [("8 px (native)", 8, "smallcnn", 30 if args.full else 16),
             ("32 px (upscaled)", 32, "smallcnn", 20 if args.full else 8)]
    if args.full or args.resnet_only:
        cases.append(("32 px (upscaled)", 32, "resnet18", 4 if args.full else 3))
    if args.resnet_only:
        cases = cases[-1:]
    if args.small_only:
        cases = [("8 px (native)", 8, "smallcnn", 41)]
    rows = []
    for name, size, arch, epochs in cases:
        epochs = args.epochs or epochs
        figures = time_case(upscale(train.images, size), train.labels, arch=arch, epochs=epochs, seed=args.seed,
                            forget_rate=forget_rate)
        none = figures["none"]["epoch"]
        for mode in MODES:
            f = figures[mode]
            rows.append([name, arch, MODE_LABELS[mode], epochs - 1, f"{1000 * f['epoch']:.1f}", f"{1000 * f['train']:.1f}",
                         f"{1000 * (f['snapshot'] + f['scores']):.1f}",
                         "-" if mode == "none" else f"{100 * (f['snapshot'] + f['scores']) / none:.1f}%",
                         "-" if mode == "none" else f"{100 * f['overhead_vs_none']:+.1f}%"])
        print(f"done: {name} {arch}", file=sys.stderr, flush=True)
    table = markdown_table(["images", "network", "VoG", "timed epochs", "median epoch (ms)",
                            "median train_one_epoch (ms)", "median VoG work (ms)",
                            "VoG work / plain epoch", "epoch vs no VoG"], rows)
    body = "\n".join([
        provenance(), "",
        f"Digits, long-tailed ratio 20, 40% symmetric noise, seed {args.seed}: {len(train.labels)} training "
        f"samples; batch 128, two networks; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU. "
        "Modes interleaved epoch by epoch in one process from identical initial networks; first epoch dropped; "
        "medians. \"VoG work\" = record_vog_snapshot (both networks) + reading the buffers' scores after Tk; "
        "\"VoG work / plain epoch\" is the snapshot's own median time over the median epoch without VoG, "
        "\"epoch vs no VoG\" the ratio of the whole epochs' medians (noisier: it also carries the "
        "run-to-run spread of train_one_epoch). For \"train_pass\" (EngineConfig(vog_source=\"train_pass\")) the "
        "snapshot is written inside train_one_epoch (record_vog=True), so \"VoG work\" holds only the buffers' "
        "commit and score read and its real cost is the \"epoch vs no VoG\" column. Every mode runs every epoch "
        "(in train_coteaching snapshots start at epoch Tk-W+1). Target: VoG tracking < 10% of an epoch.", "",
        table])
    print(body)
    if not args.no_write:
        suffix = ", ResNet-18" if args.resnet_only else ", 8 px, longer run" if args.small_only else ""
        replace_section(SECTION + suffix, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
