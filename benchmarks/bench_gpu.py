"""Where a training's time goes on the device it runs on: Co-teaching vs one plain network.

    python benchmarks/bench_gpu.py             # CUDA: 8,192 digits at 224 px (ResNet-18) and 32 px (SmallCNN)
                                               # CPU: a small run (256 ResNet-18 / 2,048 SmallCNN, 32 px)
    python benchmarks/bench_gpu.py --quick     # fewer images and epochs, for a smoke run

Data: digits (long-tailed 20:1, 40% symmetric noise, seed 0), tiled to the count and upscaled,
RGB, batch 128, the engine's own functions (``model.coteaching.train_one_epoch``,
``record_vog_snapshot``, ``predict``, ``_train_plain_epoch``) on the images as
``model.engine.as_source`` stores and places them (uint8; on CUDA resident on the GPU when
they fit).  Medians of the timed epochs after one warm-up.  Rows:

* Co-teaching epoch (two networks, AMP on CUDA) and, for reference, one network's plain epoch on
  the same data path; their ratio (goal on an H100: <= 1.25 x two plain epochs at 224 px);
* VoG: the eval-pass snapshot's share of an epoch, and the training-pass default's overhead;
* predict with the two networks;
* the float32 storage the engine used before, as a ratio to uint8 storage (the CPU must not slow);
* ``select_clean_batch`` per call (tensor operations only: no host synchronisation on CUDA);
* ``train_and_score`` end to end (CUDA: ResNet-18 at 224 px, the default config, 30 epochs; CPU: the
  small CNN, 4 epochs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import load_case, upscale  # noqa: E402
from _results import markdown_table, provenance, replace_section  # noqa: E402
from model import coteaching as ct  # noqa: E402
from model.config import EngineConfig  # noqa: E402
from model.device import make_grad_scaler, seed_everything, select_device  # noqa: E402
from model.engine import as_source, train_and_score  # noqa: E402

SECTION = "Engine: where the time goes, per device"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def case_images(count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    train, _ = load_case(seed=0)
    reps = int(np.ceil(count / len(train.labels)))
    images = np.concatenate([train.images] * reps)[:count]
    labels = np.concatenate([train.labels] * reps)[:count]
    return np.repeat(upscale(images, size), 3, axis=-1), labels


def measure(images: np.ndarray, labels: np.ndarray, *, arch: str, epochs: int, device: torch.device) -> dict:
    size = images.shape[1]
    y = torch.from_numpy(labels)
    trusted = torch.zeros(len(y), dtype=torch.bool)
    out = {}
    for storage in ("uint8", "float32"):
        x = as_source(images if storage == "uint8" else images.astype(np.float32) / 255.0, device.type)
        for vog_source in (("eval_pass", "train_pass") if storage == "uint8" else ("eval_pass",)):
            config = EngineConfig(arch=arch, image_size=size, epochs=epochs, batch_size=128, forget_rate=0.4,
                                  vog_source=vog_source, device=device.type)
            generator = seed_everything(0)
            state = ct.new_training_state(x, 10, config, device, 0.4, [0.4] * 10)
            scaler = make_grad_scaler(device, enabled=config.amp)
            epoch_s, snapshot_s = [], []
            for epoch in range(epochs + 1):
                seconds = timed(lambda: ct.train_one_epoch(
                    state, x, y, trusted, config=config, device=device, scaler=scaler, generator=generator,
                    forget_rate=0.4, vog_scores=None, record_vog=vog_source == "train_pass", progress_bar=False),
                    device)
                snap = timed(lambda: ct.record_vog_snapshot(state, x, y, config=config, device=device), device) \
                    if vog_source == "eval_pass" else 0.0
                if epoch:                          # epoch 0 is the warm-up
                    epoch_s.append(seconds)
                    snapshot_s.append(snap)
            out[(storage, vog_source)] = statistics.median(epoch_s), statistics.median(snapshot_s)
            if storage == "uint8" and vog_source == "eval_pass":
                out["predict"] = statistics.median(
                    timed(lambda: ct.predict(state.networks, x, config=config, device=device), device)
                    for _ in range(3))
                net, opt = state.networks[0], state.optimizers[0]
                plain = [timed(lambda: ct._train_plain_epoch([net], [opt], x, y, config=config, device=device,
                                                             generator=generator), device)
                         for _ in range(epochs + 1)][1:]
                out["plain"] = statistics.median(plain)
    return out


def selection_cost(device: torch.device, *, batch: int = 128, calls: int = 300) -> float:
    """ms per select_clean_batch call on ``device``, class-balanced with VoG."""
    g = torch.Generator().manual_seed(0)
    losses, vog = torch.rand(batch, generator=g).to(device), torch.rand(batch, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    trusted = torch.zeros(batch, dtype=torch.bool, device=device)
    options = dict(forget_rate=0.4, mix_ratio=0.2, class_balanced=True,
                   class_forget_rates=torch.full((10,), 0.4, device=device))
    ct.select_clean_batch(losses, vog, labels, trusted, **options)
    return timed(lambda: [ct.select_clean_batch(losses, vog, labels, trusted, **options) for _ in range(calls)],
                 device) / calls * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    device = select_device("auto")
    cuda = device.type == "cuda"
    if cuda:
        cases = [("ResNet-18, 224 px", "resnet18", 224, 8192, 3), ("SmallCNN, 32 px", "smallcnn", 32, 8192, 3)]
    else:
        # two ResNet-18s take ~40 s an epoch for 128 images at 64 px on 2 CPU cores: a token ResNet case
        cases = [("ResNet-18, 32 px", "resnet18", 32, 256, 1), ("SmallCNN, 32 px", "smallcnn", 32, 2048, 3)]
    if args.quick:
        cases = [(name, arch, size, count // 4, 1) for name, arch, size, count, _ in cases]
    figures = {}
    for name, arch, size, count, epochs in cases:
        images, labels = case_images(count, size)
        print(f"{name}: {count} images ...", flush=True)
        figures[name] = measure(images, labels, arch=arch, epochs=epochs, device=device)
        figures[name]["count"] = count
    rows = []

    def row(what, fn):
        rows.append([what, *[fn(figures[name]) for name, *_ in cases]])

    row("Co-teaching epoch (two networks)", lambda f: f"{f[('uint8', 'eval_pass')][0]:.2f} s = "
        f"{f['count'] / f[('uint8', 'eval_pass')][0]:,.0f} img/s")
    row("one network, plain epoch (same data path)", lambda f: f"{f['plain']:.2f} s = {f['count'] / f['plain']:,.0f} img/s")
    row("Co-teaching / (2 x one network)", lambda f: f"{f[('uint8', 'eval_pass')][0] / (2 * f['plain']):.2f} x")
    row("VoG eval-pass snapshot, share of an epoch", lambda f: f"{f[('uint8', 'eval_pass')][1] / f[('uint8', 'eval_pass')][0]:.1%}")
    row("vog_source=train_pass (default), epoch overhead",
        lambda f: f"{f[('uint8', 'train_pass')][0] / f[('uint8', 'eval_pass')][0] - 1:+.1%}")
    row("predict (two networks)", lambda f: f"{f['predict']:.2f} s = {f['count'] / f['predict']:,.0f} img/s")
    row("float32 storage (before) / uint8 storage, epoch", lambda f: f"{f[('float32', 'eval_pass')][0] / f[('uint8', 'eval_pass')][0]:.2f} x")
    rows.append(["select_clean_batch per call, batch 128", *[f"{selection_cost(device):.3f} ms"] * len(cases)])
    title, arch, size, count, _ = cases[0] if cuda else cases[-1]      # a ResNet's estimate folds crawl on a CPU
    images, labels = case_images(count, size)
    config = EngineConfig(arch=arch, image_size=size, epochs=1 if args.quick else 30 if cuda else 4)
    end_to_end = timed(lambda: train_and_score(images, labels, class_names=[str(k) for k in range(10)],
                                               checkpoint_path=Path("/tmp") / "bench_gpu.pt", config=config,
                                               progress_bar=False), device)
    rows.append([f"train_and_score end to end, {config.epochs} epochs, forget rate estimated",
                 *[f"{end_to_end:.1f} s" if name == title else "-" for name, *_ in cases]])
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    body = (f"{provenance()}\n\nDevice: {name}, torch {torch.__version__}. Medians of the timed epochs after a "
            f"warm-up; images {', '.join(f'{c[3]:,} for {c[0]}' for c in cases)}.\n\n"
            + markdown_table(["what", *[c[0] for c in cases]], rows))
    print(body)
    if not args.no_write:
        replace_section(SECTION + (" (quick)" if args.quick else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
