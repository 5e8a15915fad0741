"""How far one worker goes: throughput and peak memory of training and scoring as the dataset grows.

    python benchmarks/bench_scale.py                 # 1k, 5k, 20k images of 32x32 RGB, both sources
    python benchmarks/bench_scale.py --sizes 1000 5000 --image-size 64 --sources decoded

Images are digits upscaled to --image-size with per-image noise, written once as
PNG files (the way a worker's image cache holds a project) and streamed with
DataLoader workers, from either source a large project's job uses: the PNG files
decoded per batch (model.sources.FileImages, where the disk has no room for the
other) or one file of the images decoded once (model.sources.DecodedImages, the
default; its one-off decoding is timed apart).  Each size and source runs in a fresh
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


def measure(count: int, image_size: int, folder: Path, num_workers: int, source: str) -> dict:
    """Runs in its own process: one epoch of training and one scoring pass over the images."""
    import torch

    from model import coteaching as ct
    from model.config import EngineConfig
    from model.device import make_grad_scaler, seed_everything, select_device
    from model.sources import DecodedImagesWriter, FileImages

    paths = write_images(folder, count, image_size)
    images = FileImages(paths, image_size=image_size, channels=3)
    decode_seconds = 0.0
    if source == "decoded":         # as the backend's image check does: each file decoded once, into one file
        start = time.perf_counter()
        writer = DecodedImagesWriter(folder / f"decoded-{count}.u8", image_shape=(3, image_size, image_size),
                                     capacity=count)
        for i in range(count):
            writer.append(images[i].permute(1, 2, 0).numpy())
        images = writer.finish()
        decode_seconds = time.perf_counter() - start
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
    if source == "decoded":
        Path(images.path).unlink()
    return {"n": count, "source": source, "decode_seconds": decode_seconds,
            "train_images_per_s": count / train_seconds, "train_seconds": train_seconds,
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
    parser.add_argument("--sources", nargs="+", choices=("files", "decoded"), default=["files", "decoded"])
    parser.add_argument("--source", choices=("files", "decoded"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench_scale"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    folder = args.cache / f"{args.image_size}px"
    if args.measure:
        print(json.dumps(measure(args.measure, args.image_size, folder, args.num_workers, args.source)))
        return
    rows = []
    for count in args.sizes:
        for source in args.sources:
            done = subprocess.run([sys.executable, __file__, "--measure", str(count), "--source", source,
                                   "--image-size", str(args.image_size), "--num-workers", str(args.num_workers),
                                   "--cache", str(args.cache)], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [provenance(), "",
             f"One worker process, CPU (2 cores, shared), small CNN, {args.image_size}x{args.image_size} RGB images "
             f"streamed with {args.num_workers} DataLoader worker(s) from the PNG files (files) or from one file of "
             "the images decoded once (decoded; its decoding, which the backend does while it checks the images, "
             "in the decode column); training = one Co-teaching epoch of both networks + the VoG snapshot pass; "
             "scoring = the eval pass of both networks.", "",
             "| images | source | decode once s | train images/s | train s | scoring images/s | scoring s "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['source']} | {r['decode_seconds']:.1f} | {r['train_images_per_s']:.0f} | "
                     f"{r['train_seconds']:.1f} | {r['score_images_per_s']:.0f} | {r['score_seconds']:.1f} | "
                     f"{r['peak_mb']:.0f} |")
    lines.append("")
    for source in args.sources if len(args.sizes) > 1 else ():
        mine = [r for r in rows if r["source"] == source]
        first, last = mine[0], mine[-1]
        lines.append(f"{source}: from {first['n']} to {last['n']} images ({last['n'] / first['n']:.0f}x), training "
                     f"throughput x{last['train_images_per_s'] / first['train_images_per_s']:.2f}, scoring "
                     f"throughput x{last['score_images_per_s'] / first['score_images_per_s']:.2f}, peak memory "
                     f"x{last['peak_mb'] / first['peak_mb']:.2f} ({last['peak_mb'] - first['peak_mb']:+.0f} MB).")
    if set(args.sources) == {"files", "decoded"}:
        by = {(r["n"], r["source"]): r for r in rows}
        ratios = [by[n, "decoded"]["train_images_per_s"] / by[n, "files"]["train_images_per_s"] for n in args.sizes]
        lines.append(f"Decoded once against decoding the files per batch: training throughput "
                     f"x{min(ratios):.2f}-{max(ratios):.2f} over the sizes.")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        replace_section(SECTION, table)


if __name__ == "__main__":
    main()
