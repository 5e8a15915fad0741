"""Train on a .npz case from the command line, on one process or several (torchrun).

    python -m model.train --npz CASE.npz --out DIR [--epochs 30] [--forget-rate F] [--seed S]
    torchrun --nproc_per_node 2 -m model.train --npz CASE.npz --out DIR     # 2 GPUs (NCCL) or 2 CPU ranks (gloo)

CASE.npz is the simulation's input (../shared/INTERFACES.md: images, labels_noisy,
optional class_names).  Writes DIR/checkpoint.pt and DIR/scores.npz (rank 0).
Every rank runs the same code; model/distributed.py says how Co-teaching's
selection and the VoG buffers stay correct across ranks.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from model.config import AUGMENTATIONS, SELECTION_MODES, EngineConfig

logger = logging.getLogger("model.train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--forget-rate", type=float, default=None)
    parser.add_argument("--selection", choices=SELECTION_MODES, default=EngineConfig.selection)
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=EngineConfig.augment)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from model import distributed
    from model.datasets import load_npz
    from model.engine import train_and_score

    ctx, device = distributed.init_from_env(args.device)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s")
    try:
        train, _ = load_npz(args.npz)
        config = EngineConfig(epochs=args.epochs, batch_size=args.batch_size, forget_rate=args.forget_rate,
                              selection=args.selection, augment=args.augment, seed=args.seed, device=device,
                              image_size=max(int(train.images.shape[1]), 8))
        args.out.mkdir(parents=True, exist_ok=True)
        result = train_and_score(train.images, train.labels, class_names=train.class_names,
                                 checkpoint_path=args.out / "checkpoint.pt", config=config,
                                 progress_bar=ctx.is_main)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if ctx.is_main:
        result.save_scores(args.out / "scores.npz")
        logger.info("Wrote %s and %s (world size %d); LNL kept %d of %d samples", args.out / "checkpoint.pt",
                    args.out / "scores.npz", ctx.world_size, int(np.sum(result.lnl_clean_mask)),
                    len(result.lnl_clean_mask))
    return 0


if __name__ == "__main__":
    sys.exit(main())
