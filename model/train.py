"""Train on a .npz case from the command line, on one process or several (torchrun).

    python -m model.train --npz CASE.npz --out DIR [--epochs 30] [--forget-rate F] [--seed S]
    torchrun --nproc_per_node 2 -m model.train --npz CASE.npz --out DIR     # 2 GPUs (NCCL) or 2 CPU ranks (gloo)

CASE.npz is the simulation's input (../shared/INTERFACES.md: images, labels_noisy,
optional class_names).  Writes DIR/checkpoint.pt and DIR/scores.npz (rank 0).
Every rank runs the same code; model/distributed.py says how Co-teaching's
selection and the VoG buffers stay correct across ranks.

What an ML backend training job adds (ml_backend/training.py launches it so):

    torchrun --standalone --nproc_per_node N -m model.train --npz JOB.npz --out DIR \\
        --config-json CONFIG.json [--previous-checkpoint OLD.pt] [--checkpoint NEW.pt]

* optional npz keys ``sample_ids`` (N,) int and ``trusted_mask`` (N,) bool (expert labels,
  already written into ``labels_noisy``);
* instead of ``images``, ``image_paths`` (N,) str with ``channels`` (): the images are
  streamed from those files by a :class:`model.sources.FileImages` at the config's
  ``image_size`` (large projects: no rank holds the decoded dataset); or ``decoded_images``
  () str, ``decoded_shape`` (4,) and optional ``decoded_rows`` (N,): a file of images decoded
  once, read by a :class:`model.sources.DecodedImages`;
* ``--config-json``: the whole EngineConfig (``EngineConfig.to_dict()``) as a JSON string or
  the path of a JSON file.  Hyperparameter flags given explicitly override its fields; the
  device is chosen per rank (``cuda:<LOCAL_RANK>`` or the CPU);
* ``--previous-checkpoint``: Phase 2 fine-tuning of that checkpoint instead of Phase 1;
* ``--checkpoint``: where the new checkpoint goes (default DIR/checkpoint.pt);
* ``--exit-with-pid PID``: the rank ends within seconds of process PID (the job that started
  torchrun).  torchrun starts each rank in a session of its own, so a job killed with SIGKILL
  (a worker killed, the OOM killer) would otherwise leave the ranks training on its GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

from model.config import AUGMENTATIONS, SELECTION_MODES, EngineConfig
from model.data import own_image_size
from model.processes import exit_with

logger = logging.getLogger("model.train")

# flag -> EngineConfig field; a flag left out keeps the field of --config-json (or the default)
_CONFIG_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "forget_rate": "forget_rate",
                 "selection": "selection", "augment": "augment", "seed": "seed"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=None, help=f"default {EngineConfig.epochs}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {EngineConfig.batch_size}")
    parser.add_argument("--forget-rate", type=float, default=None, help="default: estimated from the data")
    parser.add_argument("--selection", choices=SELECTION_MODES, default=None,
                        help=f"default {EngineConfig.selection}")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None, help=f"default {EngineConfig.augment}")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--device", default=None, help="auto | cuda | mps | cpu (default: the config's, auto)")
    parser.add_argument("--config-json", default=None,
                        help="the full EngineConfig as a JSON object, or the path of a JSON file holding it")
    parser.add_argument("--previous-checkpoint", type=Path, default=None,
                        help="fine-tune this checkpoint (Phase 2) instead of training from scratch")
    parser.add_argument("--checkpoint", type=Path, default=None, help="output checkpoint (default OUT/checkpoint.pt)")
    parser.add_argument("--exit-with-pid", type=int, default=None,
                        help="end this process within seconds of process PID (the job that started it)")
    args = parser.parse_args(argv)
    if args.exit_with_pid is not None:
        exit_with(args.exit_with_pid)

    from model import distributed

    try:
        base = _base_config(args.config_json)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: --config-json: {error}", file=sys.stderr)
        return 2
    ctx, device = distributed.init_from_env(args.device or (base or EngineConfig()).device)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s")
    from model.engine import train_and_score
    code = _train(args, base, ctx, device, train_and_score)
    distributed.shutdown(ctx)  # on an exception the rank dies and torchrun reports the run failed
    return code


def _train(args, base: EngineConfig | None, ctx, device: str, train_and_score) -> int:
    try:
        case = _load_case(args.npz, base)
        overrides = {field: getattr(args, flag) for flag, field in _CONFIG_FLAGS.items()
                     if getattr(args, flag) is not None}
        if base is None:
            base = EngineConfig(image_size=case["image_size"])
        config = dataclasses.replace(base, device=device, **overrides)
        checkpoint = args.checkpoint or args.out / "checkpoint.pt"
        args.out.mkdir(parents=True, exist_ok=True)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        result = train_and_score(case["images"], case["labels"], sample_ids=case["sample_ids"],
                                 class_names=case["class_names"], trusted_mask=case["trusted_mask"],
                                 previous_checkpoint=args.previous_checkpoint, checkpoint_path=checkpoint,
                                 config=config, progress_bar=ctx.is_main)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if ctx.is_main:
        result.save_scores(args.out / "scores.npz")
        logger.info("Wrote %s and %s (world size %d); LNL kept %d of %d samples", checkpoint,
                    args.out / "scores.npz", ctx.world_size, int(np.sum(result.lnl_clean_mask)),
                    len(result.lnl_clean_mask))
    return 0


def _base_config(value: str | None) -> EngineConfig | None:
    """EngineConfig from a JSON string or file (None when not given)."""
    if value is None:
        return None
    text = value if value.lstrip().startswith("{") else Path(value).read_text()
    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object, got {type(values).__name__}")
    return EngineConfig.from_dict(values)


def _load_case(path: Path, config: EngineConfig | None) -> dict:
    """The arrays of a simulation case or of a backend job (see the module docstring)."""
    from model.datasets import _int_labels, load_npz
    from model.sources import DecodedImages, FileImages

    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        extra = {key: data[key] for key in ("sample_ids", "trusted_mask", "image_paths", "channels", "decoded_images",
                                            "decoded_shape", "decoded_rows", "labels_noisy", "class_names")
                 if key in files}
    if "image_paths" in extra or "decoded_images" in extra:
        if config is None:
            raise ValueError(f"{path} holds image files: give --config-json (its image_size sizes them)")
        if "labels_noisy" not in extra:
            raise ValueError(f"{path} lacks labels_noisy")
        labels = _int_labels(extra["labels_noisy"], "labels_noisy")
        if "decoded_images" in extra:
            images = DecodedImages(str(extra["decoded_images"]), shape=extra["decoded_shape"].tolist(),
                                   rows=extra.get("decoded_rows"))
        else:
            images = FileImages([str(p) for p in extra["image_paths"]], image_size=config.image_size,
                                channels=int(extra.get("channels", 3)), resize=config.resize)
        class_names = tuple(str(c) for c in extra["class_names"]) if "class_names" in extra else \
            tuple(str(c) for c in range(int(labels.max()) + 1))
        image_size = config.image_size
    else:
        train, _ = load_npz(path)
        images, labels, class_names = train.images, train.labels, train.class_names
        image_size = own_image_size(train.images)
    return {"images": images, "labels": labels, "class_names": list(class_names), "image_size": image_size,
            "sample_ids": extra.get("sample_ids"),
            "trusted_mask": None if "trusted_mask" not in extra else extra["trusted_mask"].astype(bool)}


if __name__ == "__main__":
    sys.exit(main())
