"""Fast mode (a frozen backbone + two heads) against the full network: time, memory and detection quality.

    python benchmarks/bench_fast_mode.py                          # 1k, 5k, 20k images of 224 px; quality on 3 seeds
    python benchmarks/bench_fast_mode.py --sizes 1000 --seeds 0   # the quick variant

Speed and memory.  Each size runs in a fresh process (its own peak RSS: VmHWM of
the process, ru_maxrss of its DataLoader worker) on RGB JPEG files of 224 px (digits,
upscaled and tinted, with per-image noise), written once and streamed with
model.sources.FileImages as the backend streams a large project:

* fast mode, for real: the first training (embedding every image with the frozen
  ResNet-18 + the heads' Phase 1 + scoring), then a retraining after 20 relabels
  (the 20 highest priorities get their true label, trusted; Phase 2 from the first
  checkpoint, embeddings read back from the cache), and the decode check the
  backend runs on every image before each job (timed on 500 files, scaled);
* the full network (two ResNet-18s trained end to end at 224 px), EXTRAPOLATED:
  running it at these sizes takes days on this CPU, so the run measures its two
  rates on 128 images (one Co-teaching step of both networks, and the eval pass of
  both) and applies them to the work the engine does at each size with the default
  EngineConfig: the noise-rate estimate (5 folds, >= 4 epochs and >= 60 steps each,
  on at most 10,000 samples), 30 Co-teaching epochs and the scoring pass; a
  retraining is 10 fine-tuning epochs of both networks on the LNL clean set + the
  scoring pass.  Decoding is left out of the full network's figure (DataLoader
  workers overlap it); it is inside the fast mode's.

Quality.  Digits long-tailed 20:1, 40% symmetric noise, the benchmark cases of
bench_detection.py: the default engine (small CNN at the native 8 px) against fast
mode at 224 px (frozen ResNet-18, randomly initialised: nothing may be downloaded
here, so these are random features; ImageNet or domain weights are what a user
brings).  AUROC of the default priority for the truly wrong labels and the
minority/majority ratio of clean samples kept.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import markdown_table, mean_std, provenance, replace_section  # noqa: E402

SECTION = "Engine: fast mode (frozen backbone) vs the full network, 224 px"
IMAGE_SIZE = 224
RELABELS = 20
RATE_SAMPLES = 128


def write_images(folder: Path, count: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """``count`` RGB JPEGs of 224 px (digits cycled, tinted, noisy), written once; (paths, given, truth)
    with 30% of the labels flipped uniformly to another class."""
    from PIL import Image

    from benchmarks._common import upscale
    from model.datasets import load_digits_dataset

    digits = load_digits_dataset()
    truth = np.asarray(digits.labels)[np.arange(count) % len(digits.labels)]
    rng = np.random.default_rng(0)
    given = truth.copy()
    flip = rng.random(count) < 0.3
    given[flip] = (truth[flip] + rng.integers(1, 10, count)[flip]) % 10
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        base = upscale(digits.images, IMAGE_SIZE)[..., 0].astype(np.int16)
        pixel_rng = np.random.default_rng(1)
        for i in missing:
            grey = np.clip(base[i % len(base)] + pixel_rng.integers(-20, 20, base.shape[1:]), 0, 255)
            rgb = np.stack([grey, 40 + grey * 0.7, 90 + grey * 0.4], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(paths[i], quality=90)
    return paths, given, truth


class _EmbeddingSeconds(logging.Handler):
    """Reads the embedding time from model.embeddings' summary line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = []

    def emit(self, record):
        if record.msg.startswith("fast mode: %d embeddings"):
            self.seconds.append(float(record.args[3]))


def measure(count: int, folder: Path, num_workers: int) -> dict:
    """In its own process: fast mode's first training and retraining, for real, at ``count`` images."""
    import torch

    from model.config import EngineConfig
    from model.engine import train_and_score
    from model.sources import FileImages

    paths, given, truth = write_images(folder, count)
    images = FileImages(paths, image_size=IMAGE_SIZE, channels=3)
    handler = _EmbeddingSeconds()
    logging.getLogger("model.embeddings").addHandler(handler)
    logging.getLogger("model.embeddings").setLevel(logging.INFO)
    names = [str(c) for c in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig(image_size=IMAGE_SIZE, frozen_backbone=True, embedding_cache_dir=f"{tmp}/embeddings",
                              num_workers=num_workers, device="cpu")
        start = time.perf_counter()
        first = train_and_score(images, given, class_names=names, checkpoint_path=f"{tmp}/v1.pt", config=config,
                                progress_bar=False)
        first_seconds = time.perf_counter() - start
        labels, trusted = given.copy(), np.zeros(count, bool)
        top = np.argsort(-first.priority)[:RELABELS]
        labels[top], trusted[top] = truth[top], True
        start = time.perf_counter()
        second = train_and_score(images, labels, class_names=names, trusted_mask=trusted,
                                 previous_checkpoint=f"{tmp}/v1.pt", checkpoint_path=f"{tmp}/v2.pt", config=config,
                                 progress_bar=False)
        retrain_seconds = time.perf_counter() - start
    # the backend decodes every image once per job before training (a broken file is skipped there, not
    # mid-training): linear in the images, timed on up to 500 of them
    from model.data import load_image

    checked = paths[:500]
    start = time.perf_counter()
    for path in checked:
        load_image(path, image_size=IMAGE_SIZE, channels=3)
    check_seconds = (time.perf_counter() - start) * count / len(checked)
    wrong = given != truth
    from selection import metrics

    own_mb, worker_mb = _peak_mb()
    return {"n": count, "first_seconds": first_seconds, "embed_seconds": handler.seconds[0],
            "retrain_seconds": retrain_seconds, "retrain_embed_seconds": handler.seconds[1],
            "check_seconds": check_seconds,
            "clean": int(second.lnl_clean_mask.sum()), "forget_rate": float(first.forget_rate),
            "auroc": metrics.auroc(first.priority, wrong), "peak_mb": own_mb, "worker_peak_mb": worker_mb,
            "threads": torch.get_num_threads()}


def full_network_rates(folder: Path) -> dict:
    """Images per second of the full network at 224 px on this machine: one Co-teaching epoch of two
    ResNet-18s over 128 in-memory images (one step), and their eval pass."""
    import torch

    from model import coteaching as ct
    from model.config import EngineConfig
    from model.device import seed_everything
    from model.sources import FileImages

    paths, given, _ = write_images(folder, RATE_SAMPLES)
    files = FileImages(paths, image_size=IMAGE_SIZE, channels=3)
    images = torch.stack([files[i] for i in range(RATE_SAMPLES)])          # decoding left out
    labels = torch.from_numpy(given)
    config = EngineConfig(image_size=IMAGE_SIZE, device="cpu", arch="resnet18")
    device = torch.device("cpu")
    state = ct.new_training_state(images, 10, config, device, forget_rate=0.3, class_forget_rates=[0.3] * 10)
    start = time.perf_counter()
    ct.train_one_epoch(state, images, labels, torch.zeros(RATE_SAMPLES, dtype=torch.bool), config=config,
                       device=device, scaler=None, generator=seed_everything(0), forget_rate=0.3, vog_scores=None,
                       record_vog=True, progress_bar=False)
    train_rate = RATE_SAMPLES / (time.perf_counter() - start)
    start = time.perf_counter()
    ct.predict(state.networks, images, config=config, device=device)
    eval_rate = RATE_SAMPLES / (time.perf_counter() - start)
    return {"coteaching_images_per_s": train_rate, "eval_images_per_s": eval_rate}


def full_network_seconds(count: int, clean: int, rates: dict) -> tuple[float, float]:
    """(first training, retraining) of the full network at ``count`` images, from the measured rates
    and the work of the default EngineConfig (see the module docstring)."""
    from model.config import EngineConfig

    cfg = EngineConfig()
    step = rates["coteaching_images_per_s"]          # two networks per image: one network runs at 2x
    estimate_n = min(count, cfg.estimate_max_samples)
    fold_train = estimate_n * (cfg.estimate_folds - 1) / cfg.estimate_folds
    fold_epochs = max(cfg.estimate_epochs, math.ceil(cfg.estimate_min_steps / max(math.ceil(fold_train / cfg.batch_size), 1)))
    estimate = cfg.estimate_folds * fold_epochs * fold_train / (2 * step) + estimate_n / (2 * rates["eval_images_per_s"])
    coteaching = cfg.epochs * count / step
    scoring = count / rates["eval_images_per_s"]
    finetune = cfg.finetune_epochs * clean / step
    return estimate + coteaching + scoring, finetune + scoring


def quality(seeds: list[int]) -> list[dict]:
    """The default engine and fast mode at 224 px on the digits cases, per seed."""
    import torch

    from benchmarks._common import load_case, upscale
    from model.config import EngineConfig
    from model.engine import train_and_score
    from selection import metrics

    out = []
    for seed in seeds:
        train, _ = load_case(seed=seed, noise_rate=0.4)
        wrong = train.labels != train.labels_true
        counts = np.bincount(train.labels_true, minlength=10)
        row = {"seed": seed}
        with tempfile.TemporaryDirectory() as tmp:
            for name, images, config in (
                    ("full", train.images, EngineConfig(image_size=8, seed=seed, device="cpu")),
                    ("fast", upscale(train.images, IMAGE_SIZE),
                     EngineConfig(image_size=IMAGE_SIZE, frozen_backbone=True, seed=seed, device="cpu"))):
                start = time.perf_counter()
                result = train_and_score(images, train.labels, class_names=train.class_names,
                                         checkpoint_path=f"{tmp}/{name}.pt", config=config, progress_bar=False)
                kept = metrics.per_class_kept_rate(train.labels_true, result.lnl_clean_mask, ~wrong, num_classes=10)
                row[name] = {"auroc": metrics.auroc(result.priority, wrong),
                             "min_maj": metrics.minority_majority_ratio(kept, counts),
                             "seconds": time.perf_counter() - start}
        print(f"quality seed {seed}: full AUROC {row['full']['auroc']:.3f}, fast {row['fast']['auroc']:.3f}",
              file=sys.stderr, flush=True)
        out.append(row)
    return out


def _peak_mb() -> tuple[float, float]:
    """(this process's peak RSS, its largest DataLoader worker's), MB.  The process's from /proc
    (VmHWM: since its exec; ru_maxrss would carry over the parent's peak through fork + exec); a
    worker's counts the pages it shares with this process too."""
    status = Path("/proc/self/status").read_text()
    own_kb = int(status.split("VmHWM:", 1)[1].split()[0])
    return own_kb / 1024.0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="quality seeds (none: skip)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers decoding the files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice; 1 on a "
                        "machine shared with other work, where idle threads spinning make small steps 20x slower)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench_fast_mode"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rates", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    folder = args.cache / f"{IMAGE_SIZE}px"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, folder, args.num_workers)))
        return
    if args.rates:
        write_images(folder, max([*args.sizes, RATE_SAMPLES]))
        print(json.dumps(full_network_rates(folder)))
        return
    logging.basicConfig(level=logging.WARNING)

    def in_child(*extra) -> dict:
        """Each step in a process of its own, so that no step's peak memory is another's."""
        done = subprocess.run([sys.executable, __file__, *extra, "--num-workers", str(args.num_workers),
                               "--cache", str(args.cache), "--threads", str(args.threads),
                               "--sizes", *map(str, args.sizes)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rates = in_child("--rates")               # also writes the images, once
    print(f"full network at {IMAGE_SIZE} px: {rates}", file=sys.stderr, flush=True)
    rows = []
    for count in args.sizes:
        rows.append(in_child("--measure", str(count)))
        print(rows[-1], file=sys.stderr, flush=True)
    speed_rows = []
    for r in rows:
        full_first, full_retrain = full_network_seconds(r["n"], r["clean"], rates)
        speed_rows.append([r["n"], f"{r['first_seconds']:.0f} (embedding {r['embed_seconds']:.0f})",
                           f"{r['retrain_seconds']:.1f} (+ {r['check_seconds']:.0f})", f"{full_first / 3600:.1f} h", f"{full_retrain / 3600:.1f} h",
                           f"{full_first / r['first_seconds']:.0f}x", f"{full_retrain / r['retrain_seconds']:.0f}x",
                           f"{r['peak_mb']:.0f} (+ worker {r['worker_peak_mb']:.0f})"])
    lines = [provenance(), "",
             f"CPU ({rows[0]['threads'] if rows else '?'} torch threads, shared 2-core machine), RGB JPEG files of "
             f"{IMAGE_SIZE} px streamed (FileImages, {args.num_workers} DataLoader worker), 30% symmetric noise, "
             f"ResNet-18, default EngineConfig otherwise. Fast mode measured; the full network extrapolated from its "
             f"rates measured in the same run: {rates['coteaching_images_per_s']:.1f} images/s for a Co-teaching "
             f"step of both networks, {rates['eval_images_per_s']:.1f} images/s for their eval pass (see the "
             "script's docstring for the work counted). Retraining = after "
             f"{RELABELS} relabels, Phase 2 from the previous checkpoint.", "",
             markdown_table(["images", "fast: first training s", f"fast: retraining after {RELABELS} relabels s "
                             "(+ the backend's decode check)",
                             "full: first training", "full: retraining", "first: full / fast",
                             "retraining: full / fast", "fast: peak RSS MB (process + its decoding worker)"],
                            speed_rows)]
    if rows:
        first, last = rows[0], rows[-1]
        lines += ["", f"Fast mode from {first['n']} to {last['n']} images ({last['n'] / first['n']:.0f}x): first "
                  f"training x{last['first_seconds'] / first['first_seconds']:.1f}, retraining "
                  f"x{last['retrain_seconds'] / first['retrain_seconds']:.1f} (of which reading the cached embeddings "
                  f"back {last['retrain_embed_seconds']:.1f} s), peak memory x{last['peak_mb'] / first['peak_mb']:.2f} "
                  f"({last['peak_mb'] - first['peak_mb']:+.0f} MB)."]
        big = next((row for row in rows if row["n"] >= 20000), None)
        lines[-1] += (" Target: a retraining of a 20k-image project in under 10 minutes on this CPU in fast mode: "
                      + (f"{big['retrain_seconds'] + big['check_seconds']:.0f} s at {big['n']} images with the "
                         "backend's decode check of every image." if big else
                         "not measured in this run (no size of 20,000 or more)."))
    if args.seeds:
        results = quality(args.seeds)
        lines += ["", f"Detection quality: digits long-tailed 20:1, 40% symmetric noise, seeds {args.seeds} "
                  "(mean ± std). Fast mode's ResNet-18 is randomly initialised here (no weights may be downloaded); "
                  "with ImageNet or domain weights its embeddings are what this mode is for.", "",
                  markdown_table(["engine", "priority AUROC", "minority / majority clean kept", "seconds per run"], [
                      [label, mean_std([r[key]["auroc"] for r in results]),
                       mean_std([r[key]["min_maj"] for r in results], "{:.2f}"),
                       mean_std([r[key]["seconds"] for r in results], "{:.0f}")]
                      for key, label in (("full", "full network (default: small CNN, 8 px native)"),
                                         ("fast", f"fast mode (frozen random ResNet-18, {IMAGE_SIZE} px)"))])]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(SECTION, table)


if __name__ == "__main__":
    main()
