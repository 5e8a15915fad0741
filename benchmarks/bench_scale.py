"""How far one worker goes: throughput and peak memory of training and scoring as the dataset grows.

    python benchmarks/bench_scale.py                 # 1k, 5k, 20k images of 32x32 RGB, streamed from PNG files
    python benchmarks/bench_scale.py --sizes 1000 5000 --image-size 64

Images are digits upscaled to --image-size with per-image noise, written once as
PNG files (the way a worker's image cache holds a project) and streamed with
model.sources.FileImages and DataLoader workers.  Each size runs in a fresh
process, so its peak resident memory (ru_maxrss, the process and its DataLoader
workers) is its own.  Training = one Co-teaching epoch of both networks plus
the VoG snapshot pass; scoring = model.engine's eval pass over every image.
Bounded memory means: peak RSS grows only by the per-sample arrays (labels,
VoG ring buffers: N x window x 129 floats per network for the small CNN), not
by the images.  Linear cost means: images per second roughly constant.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import provenance, replace_section  # noqa: E402

SECTION = "Engine: throughput and memory as the dataset grows"


def write_images(folder: Path, count: int, image_size: int) -> list[Path]:
    """count PNG files (digits, upscaled, RGB, with noise), written once and reused."""
    from PIL import Image

    from benchmarks._common import upscale
    from model.datasets import load_digits_dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        digits = load_digits_dataset()
        base = upscale(digits.images, image_size)[..., 0]
        rng = np.random.default_rng(0)
        for i in missing:
            grey = base[i % len(base)].astype(np.int16) + rng.integers(-20, 20, base.shape[1:])
            rgb = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            Image.fromarray(rgb).save(paths[i])
    return paths


def measure(count: int, image_size: int, folder: Path, num_workers: int) -> dict:
    """Runs in its own process: one epoch of training and one scoring pass over FileImages."""
    import torch

    from model import coteaching as ct
    from model.config import EngineConfig
    from model.device import make_grad_scaler, seed_everything, select_device
    from model.sources import FileImages

    paths = write_images(folder, count, image_size)
    images = FileImages(paths, image_size=image_size, channels=3)
    labels = torch.from_numpy(np.arange(count) % 10)
    config = EngineConfig(image_size=image_size, num_workers=num_workers, forget_rate=0.3, tk=2, vog_window=2)
    device = select_device(config.device)
    generator = seed_everything(0)
    state = ct.new_training_state(images, 10, config, device, forget_rate=0.3, class_forget_rates=[0.3] * 10)
    start = time.perf_counter()
    ct.train_one_epoch(state, images, labels, torch.zeros(count, dtype=torch.bool), config=config, device=device,
                       scaler=make_grad_scaler(device), generator=generator, forget_rate=0.3, vog_scores=None,
                       progress_bar=False)
    ct.record_vog_snapshot(state, images, labels, config=config, device=device)
    train_seconds = time.perf_counter() - start
    train_peak = _peak_mb()
    start = time.perf_counter()
    probs, _ = ct.predict(state.networks, images, config=config, device=device)
    score_seconds = time.perf_counter() - start
    return {"n": count, "train_images_per_s": count / train_seconds, "train_seconds": train_seconds,
            "train_peak_mb": train_peak, "score_images_per_s": count / score_seconds,
            "score_seconds": score_seconds, "peak_mb": _peak_mb(), "probs_rows": len(probs)}


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench_scale"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    folder = args.cache / f"{args.image_size}px"
    if args.measure:
        print(json.dumps(measure(args.measure, args.image_size, folder, args.num_workers)))
        return
    rows = []
    for count in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--measure", str(count), "--image-size", str(args.image_size),
                               "--num-workers", str(args.num_workers), "--cache", str(args.cache)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [provenance(), "",
             f"One worker process, CPU (2 cores, shared), small CNN, {args.image_size}x{args.image_size} RGB PNG files "
             f"streamed with {args.num_workers} DataLoader worker(s); training = one Co-teaching epoch of both "
             "networks + the VoG snapshot pass; scoring = the eval pass of both networks.", "",
             "| images | train images/s | train s | scoring images/s | scoring s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['train_images_per_s']:.0f} | {r['train_seconds']:.1f} | "
                     f"{r['score_images_per_s']:.0f} | {r['score_seconds']:.1f} | {r['peak_mb']:.0f} |")
    first, last = rows[0], rows[-1]
    lines += ["", f"From {first['n']} to {last['n']} images ({last['n'] / first['n']:.0f}x): training throughput "
              f"x{last['train_images_per_s'] / first['train_images_per_s']:.2f}, scoring throughput "
              f"x{last['score_images_per_s'] / first['score_images_per_s']:.2f}, peak memory "
              f"x{last['peak_mb'] / first['peak_mb']:.2f} ({last['peak_mb'] - first['peak_mb']:+.0f} MB)."]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(SECTION, table)


if __name__ == "__main__":
    main()
