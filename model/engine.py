"""The engine's front door: train (Phase 1 or Phase 2) and score, arrays in, arrays out.

ml_backend/ and selection.simulate call only this module.  It knows nothing of
Label Studio: samples are identified by ``sample_ids`` (task ids there, row
numbers in a simulation) so that a later fine-tuning round can find the LNL
clean set and VoG scores of the samples an earlier round saw.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from torch.utils.data import Dataset

from model import distributed
from model.coteaching import (TrainingState, finetune, input_pools_for, load_checkpoint, mc_dropout_probs, predict,
                              save_checkpoint, train_coteaching)
from model.config import EngineConfig
from model.data import as_image_array, load_image, to_storage, to_tensor
from model.device import select_device
from model.embeddings import FrozenBackbone, embed_images
from model.networks import resolve_arch
from model.sources import DecodedImages, DecodedImagesWriter, FileImages, ImageSource, image_shape, num_images, place
from selection import rank, scores
from selection._validation import check_labels

logger = logging.getLogger(__name__)

__all__ = ["DecodedImages", "DecodedImagesWriter", "EngineConfig", "EngineResult", "FileImages", "load_image",
           "train_and_score", "score_images"]


def as_source(images, device: str = "auto") -> ImageSource:
    """A FileImages (or any Dataset of (C, H, W) tensors) as it is; arrays validated into one
    tensor (uint8 stays uint8) and DecodedImages placed for the configured device
    (:func:`model.sources.place`: on a GPU, resident when they fit)."""
    if isinstance(images, DecodedImages):
        return place(images, select_device(device))
    if isinstance(images, Dataset):
        return images
    return place(to_storage(as_image_array(images)), select_device(device))


@dataclass
class EngineResult:
    """Per-sample results, all (N,) in input order unless noted.  Higher priority = review sooner."""

    sample_ids: np.ndarray
    class_names: list[str]
    labels: np.ndarray            # the labels trained on (-1 where unknown)
    pred_probs: np.ndarray        # (N, K), mean of the two networks, eval mode, un-augmented
    predicted_labels: np.ndarray
    loss: np.ndarray              # cross-entropy under `labels` (NaN where unknown)
    vog_scores: np.ndarray        # mean of the two networks' VoG (NaN where not tracked)
    prob_label_wrong: np.ndarray  # in [0, 1] (NaN where unknown)
    priority: np.ndarray          # in [0, 1]; 0 for trusted samples (already reviewed)
    ls_score: np.ndarray          # 1 - priority: lower = review sooner (Label Studio's order)
    lnl_clean_mask: np.ndarray    # bool: kept by the LNL phase (trusted samples included)
    trusted_mask: np.ndarray      # bool: expert labels
    embeddings: np.ndarray | None = None      # (N, D) network 1 features, for coreset
    mc_pred_probs: np.ndarray | None = None   # (T, N, K) when config.mc_dropout_passes > 0
    forget_rate: float | None = None
    history: list[dict] | None = None
    phase: int = 0                # train_and_score: 1 = Co-teaching from scratch, 2 = previous checkpoint
                                  # fine-tuned; 0 = score_images (no training)
    phase_reason: str = ""        # why a previous checkpoint was not fine-tuned ("" when it was, or none given)

    def save_scores(self, path: str | os.PathLike) -> None:
        """The per-sample results as .npz, with the keys of ../shared/INTERFACES.md (scores.npz), plus
        ``phase`` and ``phase_reason`` (0-d) for a caller that passed a previous checkpoint."""
        np.savez(path, priority=self.priority, ls_score=self.ls_score, loss=self.loss, vog=self.vog_scores,
                 pred_probs=self.pred_probs, lnl_clean_mask=self.lnl_clean_mask,
                 prob_label_wrong=self.prob_label_wrong, predicted_labels=self.predicted_labels,
                 sample_ids=self.sample_ids, phase=self.phase, phase_reason=self.phase_reason)


def train_and_score(images, labels, *, sample_ids=None, class_names, trusted_mask=None,
                    previous_checkpoint: str | os.PathLike | None = None,
                    checkpoint_path: str | os.PathLike, config: EngineConfig | None = None,
                    val_images=None, val_labels=None,
                    progress: Callable[[str, float], None] | None = None,
                    progress_bar: bool = True) -> EngineResult:
    """Phase 1 (Co-teaching) without ``previous_checkpoint``, Phase 2 fine-tuning with it; then score.

    Parameters
    ----------
    images : (N, H, W[, C]) uint8 or float in [0, 1], one size for all; or a
        :class:`model.sources.DecodedImages` / :class:`model.sources.FileImages` that streams
        them from disk (large projects).
    labels : (N,) int in [0, K): the given labels, with the experts' labels
        already written in where ``trusted_mask`` is set.
    sample_ids : (N,) int, stable ids (default 0..N-1).
    class_names : K >= 2 names.
    trusted_mask : (N,) bool, expert labels: always in the training set, never
        discarded by the selection, priority 0.
    previous_checkpoint : a checkpoint of an earlier call on (mostly) the same
        samples.  Phase 2 fine-tunes it on its LNL clean set plus every trusted
        sample.  A checkpoint of other classes or image shape is not
        fine-tunable: Phase 1 runs again, with a log line saying why.
    checkpoint_path : where the new checkpoint is written (atomically).
    val_images, val_labels : optional clean validation data; Phase 1 keeps the
        epoch with the best macro-F1 on it.

    With ``config.frozen_backbone`` (fast mode) the images are embedded once by
    the frozen backbone (model/embeddings.py) and everything above happens to
    two small heads on the embeddings; the checkpoint stores the heads and the
    backbone, so scoring needs nothing else.
    """
    config = config or EngineConfig()
    class_names = [str(name) for name in class_names]
    if len(class_names) < 2:
        raise ValueError(f"at least 2 classes are needed to train a classifier, got {class_names}")
    backbone = None
    if config.frozen_backbone:
        backbone, x = _embedded(images, config, progress=progress, progress_bar=progress_bar)
        if val_images is not None:
            _, val_images = _embedded(val_images, config, backbone=backbone, progress_bar=False)
        config = config.for_embedding_heads()
    else:
        x = as_source(images, config.device)
    labels = check_labels(labels, len(class_names))
    if len(labels) != num_images(x):
        raise ValueError(f"{num_images(x)} images but {len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the labels name a single class ({class_names[labels[0]]!r}); the noise-robust "
                         "training needs samples of at least 2 classes")
    sample_ids = np.arange(len(labels)) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
    if sample_ids.shape != labels.shape or len(np.unique(sample_ids)) != len(sample_ids):
        raise ValueError("sample_ids must be (N,) and unique")
    trusted_mask = np.zeros(len(labels), bool) if trusted_mask is None else np.asarray(trusted_mask, bool)
    if trusted_mask.shape != labels.shape:
        raise ValueError(f"trusted_mask must have shape {labels.shape}, got {trusted_mask.shape}")

    y, trusted = torch.from_numpy(labels), torch.from_numpy(trusted_mask)
    val = (None, None) if val_images is None else (
        val_images if backbone else to_tensor(as_image_array(val_images)),
        torch.from_numpy(check_labels(val_labels, len(class_names))))
    previous, phase_reason = _fine_tunable(previous_checkpoint, class_names, x, config, backbone)
    if phase_reason:
        logger.warning("%s: running Phase 1 again instead of fine-tuning", phase_reason)
    extra = {"class_names": class_names, "sample_ids": torch.from_numpy(sample_ids),
             "labels": y, "trusted_mask": trusted}
    if backbone is not None:
        extra["frozen_backbone"] = backbone.state_dict()
    if previous is None:
        state = train_coteaching(x, y, num_classes=len(class_names), trusted=trusted, config=config,
                                 val_images=val[0], val_labels=val[1], checkpoint_path=checkpoint_path,
                                 checkpoint_extra=extra, progress=progress, progress_bar=progress_bar)
        vog = np.mean([buffer.scores() for buffer in state.vog_buffers], axis=0)
    else:
        state, saved = previous
        position = _positions(saved["sample_ids"].numpy(), sample_ids)
        seen = position >= 0
        clean = np.zeros(len(labels), bool)
        clean[seen] = saved["lnl_clean_mask"].numpy()[position[seen]]
        state.lnl_clean_mask = torch.from_numpy(clean | trusted_mask)
        logger.info("Phase 2: fine-tuning on %d trusted samples (%d LNL clean, %d expert labels) of %d",
                    int(state.lnl_clean_mask.sum()), int(clean.sum()), int(trusted_mask.sum()), len(labels))
        finetune(state, x, y, state.lnl_clean_mask, config=config, progress=progress)
        vog = np.full(len(labels), np.nan)
        vog[seen] = saved["vog_scores"].numpy()[position[seen]]
    extra["vog_scores"] = torch.from_numpy(vog)
    ctx = distributed.current()
    if ctx.is_main:
        save_checkpoint(state, checkpoint_path, config=config, extra=extra)
    distributed.barrier(ctx)
    result = _score(state, x, labels, sample_ids, class_names, trusted_mask, vog, config)
    result.history = state.history
    result.phase, result.phase_reason = (1, phase_reason) if previous is None else (2, "")
    return result


def score_images(checkpoint_path: str | os.PathLike, images, labels=None, *, sample_ids=None,
                 config: EngineConfig | None = None, num_workers: int | None = None) -> EngineResult:
    """Forward pass only, for samples the model has never seen.

    ``labels`` may be None or hold -1 where the given label is unknown; those
    samples get NaN loss and probability-wrong and a priority from the model's
    uncertainty alone (least confidence), so they still sort sensibly.
    ``num_workers``: DataLoader worker processes decoding image files (None =
    the configuration's); 0 decodes them in this process, as a web request
    scoring a few images should rather than fork workers.
    """
    state, saved = load_checkpoint(checkpoint_path, device=None if config is None else select_device(config.device))
    config = config or EngineConfig.from_dict(saved["config"])
    if num_workers is not None:
        config = replace(config, num_workers=num_workers)
    class_names = list(saved["class_names"])
    if "frozen_backbone" in saved:      # fast mode: the heads score the stored backbone's embeddings
        backbone = FrozenBackbone.from_state_dict(saved["frozen_backbone"], select_device(config.device))
        _, x = _embedded(images, config, backbone=backbone, progress_bar=False)
        config = config.for_embedding_heads()
    else:
        x = as_source(images, config.device)
    count = num_images(x)
    labels = np.full(count, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if labels.shape != (count,) or labels.min(initial=0) < -1 or labels.max(initial=0) >= len(class_names):
        raise ValueError(f"labels must be (N,) in [-1, {len(class_names)}), -1 = unknown")
    spec = state.network_spec
    expected = (spec["in_channels"], spec["image_size"], spec["image_size"])
    if image_shape(x) != expected:
        raise ValueError(f"images are {image_shape(x)} but the model was trained on {expected} (C, H, W)")
    sample_ids = np.arange(count) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
    return _score(state, x, labels, sample_ids, class_names, np.zeros(count, bool), np.full(count, np.nan), config)


def _embedded(images, config: EngineConfig, *, backbone: FrozenBackbone | None = None, progress=None,
              progress_bar: bool = True) -> tuple[FrozenBackbone, torch.Tensor]:
    """Fast mode: the frozen backbone (built from ``config`` unless given) and the images' embeddings,
    (N, D, 1, 1) on the CPU, where the heads' training places its data."""
    source = as_source(images, "cpu")          # read on the host, batch by batch to the device
    device = select_device(config.device)
    if backbone is None:
        channels, _, size = image_shape(source)
        backbone = FrozenBackbone.build(config, in_channels=channels, image_size=size, device=device)
    return backbone, embed_images(backbone, source, config=config, device=device, progress=progress,
                                  progress_bar=progress_bar)


def _fine_tunable(previous_checkpoint, class_names, images: ImageSource, config: EngineConfig,
                  backbone: FrozenBackbone | None) -> tuple[tuple[TrainingState, dict] | None, str]:
    """The previous checkpoint's (state, saved dict) when Phase 2 can fine-tune it on ``images``, else
    None and the reason it cannot ("" when there is no previous checkpoint)."""
    if previous_checkpoint is None:
        return None, ""
    try:
        state, saved = load_checkpoint(previous_checkpoint, device=select_device(config.device), config=config)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        return None, f"The previous checkpoint {previous_checkpoint} cannot be read ({type(exc).__name__}: {exc})"
    spec = state.network_spec
    saved_backbone = saved.get("frozen_backbone", {}).get("fingerprint")
    if saved_backbone != (backbone.fingerprint if backbone else None):
        return None, (f"The previous checkpoint was trained {_mode(saved_backbone)} and this training is "
                      f"{_mode(backbone and backbone.fingerprint)}")
    if list(saved["class_names"]) != class_names:
        return None, f"The classes changed ({list(saved['class_names'])} -> {class_names})"
    channels, _, size = image_shape(images)
    if (spec["in_channels"], spec["image_size"]) != (channels, size):
        return None, (f"The image shape changed ({spec['in_channels']} x {spec['image_size']} px -> "
                      f"{channels} x {size} px, channels x size)")
    saved_arch = EngineConfig.from_dict(saved["config"]).arch
    pools = input_pools_for(images)
    if saved_arch in ("auto", "smallcnn") and resolve_arch(saved_arch, size) == "smallcnn" \
            and spec["input_pools"] != pools:
        return None, (f"The previous checkpoint's small CNN has {spec['input_pools']} input pools where this "
                      f"version builds {pools} for {size} px images (it learns them faster and keeps more of the "
                      "rare labels' clean samples)")
    return (state, saved), ""


def _mode(fingerprint: str | None) -> str:
    return f"on the frozen backbone {fingerprint[:12]}" if fingerprint else "as a full network (no frozen backbone)"


def _positions(saved_ids: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """For each sample id, its row in the saved ids, or -1."""
    lookup = {int(sid): row for row, sid in enumerate(saved_ids)}
    return np.asarray([lookup.get(int(sid), -1) for sid in sample_ids], dtype=np.int64)


def _score(state: TrainingState, images: ImageSource, labels: np.ndarray, sample_ids, class_names,
           trusted_mask, vog, config: EngineConfig) -> EngineResult:
    device = select_device(config.device)
    ctx = distributed.current()
    pred_probs, embeddings = predict(state.networks, images, config=config, device=device, ctx=ctx)
    pred_probs = pred_probs / pred_probs.sum(axis=1, keepdims=True)
    known = labels >= 0
    loss = np.full(len(labels), np.nan)
    wrong = np.full(len(labels), np.nan)
    priority = scores.least_confidence(pred_probs)
    if known.sum() > 0:
        loss[known] = scores.label_loss(labels[known], pred_probs[known])
        wrong[known] = scores.prob_label_wrong(labels[known], pred_probs[known])
        priority[known] = rank.relabel_priority(labels[known], pred_probs[known],
                                                 rarity_weight=config.rarity_weight)
    priority[trusted_mask] = 0.0
    mc = None
    if config.mc_dropout_passes > 0:
        mc = mc_dropout_probs(state.networks, images, passes=config.mc_dropout_passes, config=config,
                              device=device, ctx=ctx)
    clean = state.lnl_clean_mask.numpy() if state.lnl_clean_mask is not None and \
        len(state.lnl_clean_mask) == len(labels) else np.zeros(len(labels), bool)
    return EngineResult(
        sample_ids=sample_ids, class_names=class_names, labels=labels, pred_probs=pred_probs,
        predicted_labels=pred_probs.argmax(axis=1), loss=loss, vog_scores=vog, prob_label_wrong=wrong,
        priority=priority, ls_score=rank.priority_to_ls_score(priority), lnl_clean_mask=clean,
        trusted_mask=trusted_mask, embeddings=embeddings, mc_pred_probs=mc, forget_rate=state.forget_rate)
