"""Phase 1 (Co-teaching with loss + VoG sample selection) and Phase 2 fine-tuning.

Read ../shared/ALGORITHM.md first.  The named steps:

* :func:`forget_rate_schedule` - the linear ramp from 0 to tau over the first Tk epochs;
* :func:`select_clean_batch` - which samples of a mini-batch a network believes clean;
* :func:`train_one_epoch` - one Co-teaching epoch, each network updated on its peer's pick;
* :func:`early_learning_penalty` - the regulariser that keeps the networks from memorising wrong labels;
* :func:`record_vog_snapshot` - the eval-mode pass that feeds the VoG ring buffers;
* :func:`estimate_forget_rate` - tau from the data when the user does not give it;
* :func:`train_coteaching` - Phase 1 from start (or a checkpoint) to the LNL clean set;
* :func:`finetune` - Phase 2 on the trusted set, with a cosine schedule over its own epochs;
* :func:`predict` - eval-mode probabilities and features, handed on as numpy;
* :func:`save_checkpoint` / :func:`load_checkpoint` - one dict, written atomically.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from model import distributed
from model.config import EngineConfig
from model.data import apply_augmentation, channel_stats, draw_augmentation
from model.device import (autocast, global_rng_state, make_grad_scaler, restore_global_rng_state, seed_everything,
                          select_device, to_device)
from model.distributed import DistContext
from model.files import atomic_write
from model.networks import build_network, default_input_pools, default_small_input_stem
from model.sources import ImageSource, image_shape, iterate_batches, num_images, sequential_batches, stats_sample, take
from model.vog import VoGBuffer, input_gradient, last_layer_gradient
from selection.metrics import macro_f1
from selection.scores import estimate_noise_rate, prior_matched_pred_probs

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CLASS_RATE_PRIOR = 30.0  # pseudo-samples pulling a label's estimated noise rate towards the overall rate
                         # (10 until issue 9's pair flips: see estimate_forget_rate)
Progress = Callable[[str, float], None]


# --------------------------------------------------------------------------- schedule and selection

def forget_rate_schedule(epoch: int, *, forget_rate: float, tk: int) -> float:
    """Forget rate at ``epoch`` (1-based): 0 at epoch 1, rising linearly to tau at epoch tk, then tau."""
    if tk <= 1:
        return forget_rate
    return forget_rate * min((epoch - 1) / (tk - 1), 1.0)


def select_clean_batch(losses: torch.Tensor, vog_scores: torch.Tensor | None, labels: torch.Tensor,
                       trusted: torch.Tensor, *, forget_rate: float, mix_ratio: float,
                       class_balanced: bool, class_forget_rates: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the samples of one batch that a network believes clean.

    Trusted (expert-labelled) samples are always kept and take no part in the
    ranking.  Of the B untrusted samples, n = int((1 - forget_rate) * B) are kept:
    with ``vog_scores`` None, the n smallest losses; otherwise the
    int(n * (1 - mix_ratio)) smallest losses plus the int(n * mix_ratio) smallest
    VoG scores among the rest.  ``class_balanced`` applies the same rule within
    each given label, keeping ceil((1 - r_c) * B_c) of class c, where r_c is
    ``class_forget_rates[c]`` (the share of wrong labels within label c) or
    ``forget_rate`` when no per-class rates are given: with int() a class seen
    once in a batch would never be kept, which is exactly the minority loss the
    per-class variant exists to prevent.

    Tensor operations only, no host synchronisation (on CUDA a per-class loop
    waits for the device several times a batch): quotas from a bincount in
    float64 (as Python computes them), ranks within each group from one stable
    sort by (group, loss), then the same for VoG among each group's remainder.
    Ties go to the lower index.
    """
    device = losses.device
    untrusted = ~trusted
    groups = labels.long() if class_balanced else torch.zeros_like(labels, dtype=torch.long)
    if not class_balanced:
        num_groups = 1
    elif class_forget_rates is not None:
        num_groups = class_forget_rates.numel()            # known without asking the device
    else:
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
    counts = torch.bincount(groups[untrusted], minlength=num_groups).double()
    if class_balanced:
        rates = torch.full((num_groups,), float(forget_rate), dtype=torch.float64, device=device) \
            if class_forget_rates is None else class_forget_rates.to(device=device, dtype=torch.float64)
        n_keep = torch.ceil((1.0 - rates) * counts)
    else:
        n_keep = torch.floor((1.0 - forget_rate) * counts)
    n_vog = torch.floor(n_keep * mix_ratio) if vog_scores is not None else torch.zeros_like(n_keep)
    n_loss = n_keep - n_vog

    def rank_within_group(values, eligible):
        """Rank of each eligible sample among its group's eligible samples by ``values`` (others: inf)."""
        score = torch.where(eligible, values.double(), torch.full_like(values, float("inf"), dtype=torch.float64))
        by_value = torch.argsort(score, stable=True)
        order = by_value[torch.argsort(groups[by_value], stable=True)]
        sizes = torch.bincount(groups, minlength=num_groups)       # the eligible come first in each group
        starts = torch.cumsum(sizes, 0) - sizes
        ranks = torch.empty_like(order)
        position = torch.arange(order.numel(), device=device)
        ranks[order] = position - starts[groups[order]]
        return torch.where(eligible, ranks, torch.full_like(ranks, order.numel()))

    by_loss = rank_within_group(losses, untrusted) < n_loss[groups]
    keep = trusted | (untrusted & by_loss)
    if vog_scores is not None:
        rest = untrusted & ~by_loss
        keep |= rest & (rank_within_group(vog_scores, rest) < n_vog[groups])
    return keep


# --------------------------------------------------------------------------- state

@dataclass
class TrainingState:
    """Everything Phase 1 needs to resume and everything scoring needs afterwards."""

    networks: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    vog_buffers: list[VoGBuffer]
    network_spec: dict
    forget_rate: float                  # tau overall: the global selection's rate after the ramp
    class_forget_rates: list[float]     # tau within each given label: the class-balanced selection's rates
    epoch: int = 0
    phase: str = "coteaching"           # "coteaching" while Phase 1 runs, then "trained"
    lnl_clean_mask: torch.Tensor | None = None
    recent_picks: torch.Tensor | None = None  # (clean_set_window, N) int8: network 1's last picks (-1: none yet)
    elr_targets: list[torch.Tensor] | None = None  # per network (N, K) float32: early-learning targets (0: unseen)
    best_states: list[dict] | None = None
    best_score: float = -math.inf
    history: list[dict] = field(default_factory=list)
    generator_state: torch.Tensor | None = None  # the data order and augmentation generator, after the last epoch
    rng_state: dict | None = None       # torch's global random state (dropout) after the last epoch
    wrapped: list[nn.Module] | None = None  # DistributedDataParallel wrappers while training on several ranks

    @property
    def trainable(self) -> list[nn.Module]:
        """The modules to call in a training step: the DDP wrappers when distributed."""
        return self.wrapped or self.networks


def build_networks(network_spec: dict, config: EngineConfig, device: torch.device) -> list[nn.Module]:
    """The two Co-teaching networks; different random initialisations from one seed."""
    return [to_device(build_network(config.arch, dropout=config.dropout, pretrained_weights=config.pretrained_weights,
                                    **network_spec), device) for _ in range(2)]


def _sgd(network: nn.Module, lr: float, config: EngineConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(network.parameters(), lr=lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def network_spec_for(images: ImageSource, num_classes: int, config: EngineConfig) -> dict:
    """What build_network needs besides the config, derived from the training images."""
    mean, std = channel_stats(stats_sample(images, seed=config.seed))
    channels, _, image_size = image_shape(images)
    return {"num_classes": num_classes, "in_channels": int(channels), "image_size": int(image_size),
            "mean": mean, "std": std,
            "small_input_stem": default_small_input_stem(image_size, config.pretrained_weights),
            "input_pools": input_pools_for(images)}


def input_pools_for(images: ImageSource) -> int:
    """The small CNN's input pools for these images, from their short side (a long image must keep its height)."""
    _, height, width = image_shape(images)
    return default_input_pools(min(height, width))


def new_training_state(images: ImageSource, num_classes: int, config: EngineConfig,
                       device: torch.device, forget_rate: float, class_forget_rates: list[float]) -> TrainingState:
    network_spec = network_spec_for(images, num_classes, config)
    networks = build_networks(network_spec, config, device)
    optimizers = [_sgd(net, config.lr, config) for net in networks]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs) for opt in optimizers]
    dim = _vog_dim(networks[0], images, config)
    buffers = [VoGBuffer(num_images(images), dim, config.vog_window) for _ in networks]
    return TrainingState(networks, optimizers, schedulers, buffers, network_spec, forget_rate,
                         list(class_forget_rates))


def _vog_dim(network: nn.Module, images: ImageSource, config: EngineConfig) -> int:
    if config.vog_method == "input_gradient":
        return int(np.prod(image_shape(images)))
    return network.classifier.in_features + 1


# --------------------------------------------------------------------------- early-learning regularisation

ELR_PROB_CLAMP = 1e-4   # probabilities are kept in [1e-4, 1 - 1e-4] so that log(1 - <p, t>) stays finite


def label_log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of each class's share of ``labels``, add-one smoothed so that an absent class stays finite."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float() + 1.0
    return torch.log(counts / counts.sum())


def ensure_elr_targets(state: TrainingState, num_samples: int, device: torch.device) -> None:
    """Zero targets for both networks unless the state holds targets for these samples already."""
    num_classes = state.network_spec["num_classes"]
    if state.elr_targets is None or tuple(state.elr_targets[0].shape) != (num_samples, num_classes):
        state.elr_targets = [torch.zeros(num_samples, num_classes) for _ in state.networks]
    state.elr_targets = [t.to(device) for t in state.elr_targets]


def early_learning_penalty(logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, *, momentum: float,
                           ctx: DistContext = DistContext()) -> torch.Tensor:
    """Early-learning regularisation (Liu et al., NeurIPS 2020): log(1 - <p_i, t_i>) per sample of the batch.

    ``targets`` (N, K) holds, per sample, a running average of the network's own
    predictions (``momentum`` beta); the batch's rows ``idx`` are updated in
    place first, from every rank's slice, then the penalty is taken on this
    rank's slice.  A network fits the clean majority of each class before it
    memorises the wrong labels, so the average keeps pointing at the class the
    image looks like; the penalty falls as p_i moves towards t_i, which keeps a
    sample's probabilities there even when its (wrong) label pulls elsewhere.

    Why here: Co-teaching alone keeps some wrong labels in each pick, and the
    small network memorises them within a few epochs (training longer lowered
    the detection AUROC, issue 9).  In rare labels that are mostly wrong the
    memorised ones looked right at the end.  With the penalty (weight 1) the
    priority AUROC on digits (seeds 10-12) rose from 0.93-0.97 to 0.98-0.99
    under pair flips to a random partner, from 0.97-0.98 to 0.98-1.00 under
    step imbalance with 50-60% noise, and stayed at 0.99-1.00 on the symmetric
    long-tailed case (engine 79390eb; in benchmarks/RESULTS.md's git history).
    A class whose realised flip share reaches one half is a tie it cannot
    break.  It costs one softmax and an (N, K) table per network.
    """
    probs = torch.softmax(logits.float(), dim=1).clamp(ELR_PROB_CLAMP, 1.0 - ELR_PROB_CLAMP)
    normalised = (probs / probs.sum(dim=1, keepdim=True)).detach()
    rows = idx.to(targets.device)
    targets[rows] = momentum * targets[rows] + (1.0 - momentum) * distributed.gather_rows(normalised, ctx, idx.numel())
    local_rows = rows[ctx.rank::ctx.world_size]
    return torch.log(1.0 - (targets[local_rows] * probs).sum(dim=1))


# --------------------------------------------------------------------------- one epoch

def train_one_epoch(state: TrainingState, images: ImageSource, labels: torch.Tensor, trusted: torch.Tensor,
                    *, config: EngineConfig, device: torch.device, scaler, generator: torch.Generator,
                    forget_rate: float, vog_scores: list[torch.Tensor] | None,
                    class_forget_rates: torch.Tensor | None = None, record_vog: bool = False,
                    ctx: DistContext = DistContext(), progress_bar: bool = True) -> dict:
    """One Co-teaching epoch.  Returns the epoch's figures and network 1's clean mask.

    Each network ranks the batch with its own losses (and VoG); network 1 is
    updated on network 2's pick and vice versa, with the loss summed over the
    pick and divided by its size.  On several ranks each computes its slice of
    the batch and the selection runs on the gathered losses (model/distributed.py).
    With ``record_vog`` the training forward pass's p_y and h are written into
    the VoG buffers (``vog_source="train_pass"``); the caller commits them.
    """
    for net in state.trainable:
        net.train()
    num_samples = num_images(images)
    if config.elr_weight > 0:
        ensure_elr_targets(state, num_samples, device)
    order = torch.randperm(num_samples, generator=generator)
    # BatchNorm cannot train on a batch of one, nor a rank on an empty slice
    batches = [b for b in order.split(config.batch_size) if b.numel() >= 2 * ctx.world_size]
    thetas = [draw_augmentation(b.numel(), mode=config.augment, generator=generator) for b in batches]
    local_batches = [b[ctx.rank::ctx.world_size] for b in batches]
    clean_mask_net1 = torch.zeros(num_samples, dtype=torch.bool)
    totals = {"loss": 0.0, "kept": 0, "seen": 0}
    loader = iterate_batches(images, local_batches, device=device, num_workers=config.num_workers)
    for idx, theta, (_, x) in tqdm(zip(batches, thetas, loader), total=len(batches), desc=f"epoch {state.epoch + 1}",
                                   leave=False, disable=not progress_bar or not ctx.is_main):
        local = slice(ctx.rank, None, ctx.world_size)
        x = apply_augmentation(x, None if theta is None else theta[local])
        y = labels[idx].to(device)
        with autocast(device, enabled=config.amp):
            outputs = [net(x, return_features=True) for net in state.trainable]
            local_losses = [F.cross_entropy(logits.float(), y[local], reduction="none") for logits, _ in outputs]
        if record_vog:
            for (logits, features), buffer in zip(outputs, state.vog_buffers):
                snapshot = last_layer_gradient(torch.softmax(logits.detach().float(), dim=1),
                                               features.detach().float(), y[local])
                buffer.write(idx, distributed.gather_rows(snapshot, ctx, idx.numel()))
        losses = [distributed.gather_rows(loss.detach(), ctx, idx.numel()) for loss in local_losses]
        picks = [select_clean_batch(loss, None if vog_scores is None else vog[idx].to(device), y,
                                    trusted[idx].to(device), forget_rate=forget_rate, mix_ratio=config.mix_ratio,
                                    class_balanced=config.selection == "class_balanced",
                                    class_forget_rates=class_forget_rates)
                 for loss, vog in zip(losses, vog_scores or [None, None])]
        # Co-teaching: each network learns from the samples its PEER believes clean.  The local sum
        # over the global count, times the world size (DDP averages over ranks), is the global mean.
        scale = ctx.world_size / torch.stack([p.sum() for p in picks]).clamp_min(1).float()
        train_losses = local_losses
        if config.elr_weight > 0:
            rows = idx.to(device)   # once for both networks
            train_losses = [loss + config.elr_weight * early_learning_penalty(
                                logits, targets, rows, momentum=config.elr_momentum, ctx=ctx)
                            for loss, (logits, _), targets in zip(local_losses, outputs, state.elr_targets)]
        total = (train_losses[0][picks[1][local]].sum() * scale[1]
                 + train_losses[1][picks[0][local]].sum() * scale[0])
        for opt in state.optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            for opt in state.optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            for opt in state.optimizers:
                opt.step()
        clean_mask_net1[idx[picks[0].cpu()]] = True
        totals["loss"] += float((losses[0][picks[1]].sum() + losses[1][picks[0]].sum()) / 2)
        totals["kept"] += int(picks[0].sum())
        totals["seen"] += idx.numel()
    for sched in state.schedulers:
        sched.step()
    return {"train_loss": totals["loss"] / max(totals["kept"], 1),
            "kept_fraction": totals["kept"] / max(totals["seen"], 1),
            "clean_mask": clean_mask_net1}


# --------------------------------------------------------------------------- eval passes

def _eval_pass(network: nn.Module, images: ImageSource, *, device, config, ctx: DistContext,
               compute: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Eval-mode pass over un-augmented images, sharded over ranks and gathered on every rank.

    ``compute(idx, x)`` returns per-sample rows for its batch; the result holds
    every output for all N samples, in sample order, on the CPU.
    """
    network.eval()
    total = num_images(images)
    batches = sequential_batches(total, config.eval_batch_size, offset=ctx.rank, stride=ctx.world_size)
    parts: dict[str, list[torch.Tensor]] = {}
    for idx, x in iterate_batches(images, batches, device=device, num_workers=config.num_workers):
        for key, rows in compute(idx, x).items():
            parts.setdefault(key, []).append(rows.float())
    return {key: distributed.gather_rows(torch.cat(rows), ctx, total).cpu() for key, rows in parts.items()}


def _probs_and_features(network: nn.Module, x: torch.Tensor, config: EngineConfig, device) -> tuple:
    with torch.inference_mode(), autocast(device, enabled=config.amp):
        features = network.forward_features(x)
        logits = network.head(features)
    return torch.softmax(logits.float(), dim=1), features.float()


def record_vog_snapshot(state: TrainingState, images: ImageSource, labels: torch.Tensor, *,
                        config: EngineConfig, device: torch.device, ctx: DistContext = DistContext()) -> None:
    """Write this epoch's gradient snapshot of every sample into each network's ring buffer."""
    for net, buffer in zip(state.networks, state.vog_buffers):
        if config.vog_method == "input_gradient":
            def compute(idx, x, net=net):
                return {"snapshot": input_gradient(net, x, labels[idx].to(device))}
        else:
            def compute(idx, x, net=net):
                probs, features = _probs_and_features(net, x, config, device)
                return {"snapshot": last_layer_gradient(probs, features, labels[idx].to(device))}
        snapshot = _eval_pass(net, images, device=device, config=config, ctx=ctx, compute=compute)["snapshot"]
        buffer.write(torch.arange(len(snapshot)), snapshot)
        buffer.commit()


def predict(networks: list[nn.Module], images: ImageSource, *, config: EngineConfig, device: torch.device,
            ctx: DistContext = DistContext()) -> tuple[np.ndarray, np.ndarray]:
    """Mean softmax of the networks (N, K) and network 1's penultimate features (N, D), as numpy."""
    outputs = [_eval_pass(net, images, device=device, config=config, ctx=ctx,
                          compute=lambda _idx, x, net=net: dict(zip(
                              ("probs", "features"), _probs_and_features(net, x, config, device))))
               for net in networks]
    probs = torch.stack([out["probs"].double() for out in outputs]).mean(dim=0)
    return probs.numpy(), outputs[0]["features"].numpy()


def mc_dropout_probs(networks: list[nn.Module], images: ImageSource, *, passes: int, config: EngineConfig,
                     device: torch.device, ctx: DistContext = DistContext()) -> np.ndarray:
    """(passes, N, K) softmax with dropout active and BatchNorm frozen, for BALD.

    The features are computed once per network in eval mode; only the dropout
    before the classifier is sampled, which is where the networks have dropout.
    """
    samples = []
    for net in networks:
        features = _eval_pass(net, images, device=device, config=config, ctx=ctx,
                              compute=lambda _idx, x, net=net: {"features": _probs_and_features(
                                  net, x, config, device)[1]})["features"].to(device)
        net.dropout.train()
        with torch.inference_mode():
            for _ in range(max(passes // len(networks), 1)):
                samples.append(torch.softmax(net.head(features).float(), dim=1).cpu().double())
        net.dropout.eval()
    return torch.stack(samples).numpy()


# --------------------------------------------------------------------------- forget rate

def estimate_forget_rate(images: ImageSource, labels: torch.Tensor, trusted: torch.Tensor, num_classes: int,
                         *, config: EngineConfig, device: torch.device, generator: torch.Generator,
                         progress: Progress | None = None) -> tuple[float, list[float]]:
    """Estimate the share of wrong labels among the untrusted samples, overall and within each label.

    K-fold cross-fitting (``estimate_folds``): a network is trained with plain
    cross-entropy on the other folds and predicts the held-out one, so every
    sample gets an out-of-sample probability; the share of samples whose
    predicted class differs from the given label is the estimate
    (selection.scores.estimate_noise_rate), capped at ``max_forget_rate``.

    The out-of-fold probabilities are first prior-matched to the given labels
    (selection.scores.prior_matched_pred_probs): the folds under-predict the
    rare classes (c+1 pair flips, seed 1: the labels of 9, 10 and 9 samples got
    1, 1 and 0 predictions), which called their clean samples wrong; matching
    moves only the samples the fold is unsure about.  On digits, seeds 0-15 of
    six kinds (long-tailed 20:1 with 30% pair flips c+1 and to a random partner,
    symmetric 40%; symmetric 60% step 5:1 and 10:1, 50% step 20:1), 96 runs:
    mean priority AUROC up in all six kinds (random partner 0.983 -> 0.986,
    symmetric 40% 0.9969 -> 0.9971), minority clean kept under 0.9x the
    majority's rate in 7 runs rather than 14 (c+1: 5 of 16 -> 0, seed 10:
    0.76 -> 0.96), step 5:1 seed 1 AUROC 0.977 -> 0.996.  AUROC stays under
    0.98 in 7 runs; six of them are near ties, a class with 11-16 of 24-34
    labels flipped to one other class (c+1 seeds 1, 6, 9; random partner
    seeds 1, 9, 14), which the folds split by the larger label's pull.
    Matching lifts those (c+1 seed 6: 0.962 -> 0.978, seed 9: 0.937 -> 0.952)
    but does not mend them.

    Within each given label the same share is taken, shrunk towards the overall
    rate with ``CLASS_RATE_PRIOR`` pseudo-samples so that a label seen a handful
    of times does not get a rate of 0 or 1 from chance.  Symmetric noise on
    long-tailed data is what makes per-label rates matter: every label receives
    about the same NUMBER of wrong labels, so the share of wrong labels is small
    within a common label and large within a rare one, and one global rate both
    keeps noise in the rare labels and drops clean samples of the common ones.
    It counts the folds' own errors as noise too, so it runs high when the data
    are too few to learn from (measured in benchmarks/RESULTS.md), and most on
    the rarest labels, which a fold cannot learn: 30 pseudo-samples rather than
    10 hold those back.  On 27 paired runs of digits (long-tailed 20:1 with
    pair flips c+1 and to a random partner at 30%, seeds 0-6, and symmetric
    40%, seeds 0-2 and 10-12; symmetric 60% step 10:1, seeds 0-2 and 4; step
    5:1 and 20:1, 3 runs), minority clean kept under 0.9x the majority's rate
    fell from 13 runs to 3 (mean 0.90 -> 0.99) and priority AUROC under 0.98
    from 5 to 3 (mean 0.986 -> 0.991; pair flip c+1 seed 6: 0.914 -> 0.972,
    random partner seed 3: 0.962 -> 0.991); the clean set's precision at
    symmetric 40% fell by about 0.02 (0.933-0.960 -> 0.909-0.940) and its
    AUROC stayed >= 0.993.  50 kept still more of the rare classes but cost
    precision 0.04-0.05 there.

    With ``estimate_logit_adjustment`` tau > 0 the folds train on logit-adjusted
    cross-entropy (logits + tau * log(label share), Menon et al. 2021) and judge
    by their raw logits.  With plain cross-entropy (tau 0, the default) a fold
    cannot learn a class of a handful of images from four fifths of them and
    calls their clean samples wrong: on digits the 6-12-image labels got rates
    of 0.67-0.8, and Co-teaching then dropped most of their clean samples
    (with 10 pseudo-samples: minority clean kept under 0.9x the majority's rate
    in 8 of 18 runs, seeds 10-12 of six hard cases, and in 10 of 11 runs on
    other seeds; with tau 1, in 2 of 18 and 4 of 11).  Tau 1 is not the default because a rare label
    flooded by one common class's flips then looks like a class of its own:
    under pair flips to a random partner (30%, long-tailed 20:1) the priority
    AUROC fell on 6 of 8 seeds, to 0.921 and 0.946 on two of them (0.962 and
    0.986 with tau 0).  Use it where the rare classes matter more than that risk.

    Each fold trains for ``estimate_epochs`` epochs but at least
    ``estimate_min_steps`` optimiser steps: on a few hundred images, a few
    epochs are a dozen steps, and an untrained fold model calls every label
    wrong; much longer, and it memorises the noise and calls too few wrong.
    Measured on digits (LT 20, 40% symmetric noise, 3 seeds), the estimate ran
    +0.20 high with 2 folds and >= 150 steps, +0.06 with 5 folds and >= 60.
    Cost: about ``estimate_epochs * (K - 1)`` epochs of one network over at most
    ``estimate_max_samples`` untrusted samples (a seeded uniform subset beyond that,
    so that on large projects the estimate costs a fixed time, not a share of N).
    """
    untrusted_idx = torch.nonzero(~trusted, as_tuple=True)[0]
    if untrusted_idx.numel() > config.estimate_max_samples:
        subset = torch.randperm(untrusted_idx.numel(), generator=generator)[:config.estimate_max_samples]
        untrusted_idx = untrusted_idx[subset.sort().values]
        logger.info("noise-rate estimate on a uniform subset of %d untrusted samples (estimate_max_samples)",
                    untrusted_idx.numel())
    if untrusted_idx.numel() < 4 * num_classes:
        logger.info("Too few untrusted samples (%d) to estimate the noise rate; using forget rate 0",
                    untrusted_idx.numel())
        return 0.0, [0.0] * num_classes
    folds = config.estimate_folds
    fold_of = torch.randperm(untrusted_idx.numel(), generator=generator) % folds
    out_of_fold = np.zeros((untrusted_idx.numel(), num_classes))
    spec = network_spec_for(images, num_classes, config)
    for fold in range(folds):
        train_idx = untrusted_idx[fold_of != fold]
        steps_per_epoch = max(math.ceil(train_idx.numel() / config.batch_size), 1)
        epochs = max(config.estimate_epochs, math.ceil(config.estimate_min_steps / steps_per_epoch))
        net = to_device(build_network(config.arch, dropout=config.dropout, pretrained_weights=config.pretrained_weights,
                                      **spec), device)
        logit_adjustment = ((config.estimate_logit_adjustment * label_log_prior(labels[train_idx], num_classes))
                            .to(device) if config.estimate_logit_adjustment else None)
        opt = _sgd(net, config.lr, config)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        for epoch in range(epochs):
            _train_plain_epoch([net], [opt], take(images, train_idx), labels[train_idx], config=config,
                               device=device, generator=generator, logit_adjustment=logit_adjustment)
            sched.step()
            if progress:
                progress("estimating noise rate", (fold + (epoch + 1) / epochs) / folds)
        held_out = (fold_of == fold).numpy()
        probs, _ = predict([net], take(images, untrusted_idx[fold_of == fold]), config=config, device=device)
        out_of_fold[held_out] = probs
    given = labels[untrusted_idx].numpy()
    out_of_fold = prior_matched_pred_probs(given, out_of_fold)
    rate = estimate_noise_rate(given, out_of_fold)
    disagree = out_of_fold.argmax(axis=1) != given
    counts = np.bincount(given, minlength=num_classes)
    wrong = np.bincount(given, weights=disagree, minlength=num_classes)
    class_rates = (wrong + CLASS_RATE_PRIOR * rate) / (counts + CLASS_RATE_PRIOR)
    capped = min(rate, config.max_forget_rate)
    class_capped = np.minimum(class_rates, config.max_forget_rate).tolist()
    logger.info("Estimated noise rate %.3f from %d untrusted samples (%d-fold cross-fitting); forget rate %.3f, "
                "within each label %s. Set forget_rate to override.", rate, untrusted_idx.numel(), folds, capped,
                [round(r, 2) for r in class_capped])
    return capped, class_capped


def given_forget_rates(labels: torch.Tensor, trusted: torch.Tensor, num_classes: int,
                       config: EngineConfig) -> list[float]:
    """[overall, *per label] from ``config.class_forget_rates``; the overall rate is ``forget_rate`` or
    else the per-label rates weighted by the untrusted samples of each label."""
    per_class = list(config.class_forget_rates)
    if len(per_class) != num_classes:
        raise ValueError(f"class_forget_rates has {len(per_class)} rates for {num_classes} classes")
    counts = np.bincount(labels[~trusted].numpy(), minlength=num_classes)
    overall = config.forget_rate if config.forget_rate is not None else \
        float(np.dot(counts, per_class) / max(counts.sum(), 1))
    logger.info("Forget rate %.3f, within each label %s (given: class_forget_rates)", overall,
                [round(r, 2) for r in per_class])
    return [overall, *per_class]


def _train_plain_epoch(nets, optimizers, images: ImageSource, labels, *, config, device, generator,
                       ctx: DistContext = DistContext(), logit_adjustment: torch.Tensor | None = None):
    """One epoch of plain cross-entropy for each network (noise-rate folds, Phase 2 fine-tuning).

    With ``logit_adjustment`` (K,) the loss is taken on logits + logit_adjustment
    (logit-adjusted cross-entropy, Menon et al., ICLR 2021).
    """
    for net, opt in zip(nets, optimizers):
        net.train()
        order = torch.randperm(num_images(images), generator=generator)
        batches = [b for b in order.split(config.batch_size) if b.numel() >= 2 * ctx.world_size]
        thetas = [draw_augmentation(b.numel(), mode=config.augment, generator=generator) for b in batches]
        local = slice(ctx.rank, None, ctx.world_size)
        loader = iterate_batches(images, [b[local] for b in batches], device=device, num_workers=config.num_workers)
        for idx, theta, (_, x) in zip(batches, thetas, loader):
            x = apply_augmentation(x, None if theta is None else theta[local])
            with autocast(device, enabled=config.amp):
                logits = net(x).float()
                if logit_adjustment is not None:
                    logits = logits + logit_adjustment
                loss = F.cross_entropy(logits, labels[idx[local]].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


# --------------------------------------------------------------------------- Phase 1

def clean_set_vote(state: TrainingState, picked: torch.Tensor, epoch: int, window: int) -> torch.Tensor:
    """The LNL clean set after ``epoch``: the samples network 1 picked in most of the last ``window`` epochs.

    ``picked`` (N,) is this epoch's pick; it goes into ``state.recent_picks``
    (a ring of ``window`` rows, saved in the checkpoint so that a resumed run
    votes as an uninterrupted one).  A sample is clean when it was picked in
    more than half of the epochs the ring holds (all of them once ``epoch`` >=
    ``window``; window 1 is the final epoch's pick alone, the original's rule).

    Why a vote: each epoch's pick ranks a sample against the others of its
    random batch, so a sample near its label's quota is in one epoch and out the
    next.  On digits (long-tailed and step imbalance, symmetric and pair-flip
    noise, 24 runs) a 5-epoch majority raised both the precision and the recall
    of the clean set in nearly every run (e.g. 40% symmetric, ratio 20:
    precision 0.92/0.91/0.91 -> 0.96/0.94/0.95, recall 0.93/0.94/0.91 ->
    0.95/0.94/0.95 on seeds 0-2), where a union of epochs buys recall with
    precision (issue 9; engine 4cf662c, benchmarks/RESULTS.md's git history).
    """
    picked = picked.to(torch.bool).cpu()
    if state.recent_picks is None or state.recent_picks.shape != (window, picked.numel()):
        state.recent_picks = torch.full((window, picked.numel()), -1, dtype=torch.int8)  # -1: no epoch yet
    state.recent_picks[(epoch - 1) % window] = picked.to(torch.int8)
    held = int((state.recent_picks[:, 0] >= 0).sum())
    return (state.recent_picks == 1).sum(dim=0) > held // 2

def train_coteaching(images: ImageSource, labels: torch.Tensor, *, num_classes: int,
                     trusted: torch.Tensor | None = None, config: EngineConfig,
                     val_images: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
                     checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
                     checkpoint_extra: dict | None = None, progress: Progress | None = None,
                     progress_bar: bool = True) -> TrainingState:
    """Phase 1: Co-teaching with loss selection up to Tk, loss U VoG selection after.

    ``images`` (N, C, H, W) uint8, or float in [0, 1] (or a model.sources.FileImages), where
    model.sources.place put them, and ``labels`` (N,) long on the CPU; batches move to the
    device and become float there.  Under
    torchrun every rank runs this same function (model/distributed.py).  With validation data the networks of the
    epoch with the best ensemble macro-F1 are kept for Phase 2 (the original went
    on from the last epoch).  The LNL clean set is what network 1 selected in most
    of the last ``clean_set_window`` epochs (:func:`clean_set_vote`; the original took
    the final epoch's selection), plus every trusted sample.  With ``checkpoint_path`` a checkpoint
    is written atomically after every epoch; ``resume`` continues from it.
    """
    device = select_device(config.device)
    ctx = distributed.current()
    generator = seed_everything(config.seed)
    trusted = torch.zeros(len(labels), dtype=torch.bool) if trusted is None else trusted
    scaler = make_grad_scaler(device, enabled=config.amp)
    if resume and checkpoint_path and Path(checkpoint_path).is_file():
        state, _ = load_checkpoint(checkpoint_path, device=device, config=config)
        if state.generator_state is not None:
            generator.set_state(state.generator_state)
        restore_global_rng_state(state.rng_state)
        logger.info("Resuming Phase 1 from %s at epoch %d/%d", checkpoint_path, state.epoch, config.epochs)
    else:
        if config.class_forget_rates is not None:
            rates = given_forget_rates(labels, trusted, num_classes, config)
        elif config.forget_rate is not None:
            rates = [config.forget_rate] * (num_classes + 1)
        else:
            rates = [0.0] * (num_classes + 1)
            if ctx.is_main:  # one rank estimates, the others wait for its figures
                overall, per_class = estimate_forget_rate(images, labels, trusted, num_classes, config=config,
                                                          device=device, generator=generator, progress=progress)
                rates = [overall, *per_class]
            rates = distributed.broadcast_floats(rates, ctx, device)
            generator = seed_everything(config.seed + 1)  # every rank continues from the same stream
        state = new_training_state(images, num_classes, config, device, rates[0], rates[1:])
    state.wrapped = [distributed.wrap(net, ctx, device) for net in state.networks] if ctx.enabled else None
    first_vog_epoch = max(1, config.tk - config.vog_window + 1)
    while state.epoch < config.epochs:
        epoch = state.epoch + 1
        ramp = forget_rate_schedule(epoch, forget_rate=1.0, tk=config.tk)
        rate = ramp * state.forget_rate
        use_vog = epoch > config.tk and config.mix_ratio > 0 and all(b.ready for b in state.vog_buffers)
        vog_scores = [torch.from_numpy(b.scores()).float() for b in state.vog_buffers] if use_vog else None
        track_vog = epoch >= first_vog_epoch
        stats = train_one_epoch(state, images, labels, trusted, config=config, device=device, scaler=scaler,
                                generator=generator, forget_rate=rate, vog_scores=vog_scores, ctx=ctx,
                                class_forget_rates=ramp * torch.tensor(state.class_forget_rates),
                                record_vog=track_vog and config.vog_source == "train_pass",
                                progress_bar=progress_bar)
        if track_vog and config.vog_source == "eval_pass":
            record_vog_snapshot(state, images, labels, config=config, device=device, ctx=ctx)
        elif track_vog:
            for buffer in state.vog_buffers:
                buffer.commit()
        state.epoch = epoch
        state.lnl_clean_mask = clean_set_vote(state, stats.pop("clean_mask"), epoch, config.clean_set_window) | trusted
        record = {"epoch": epoch, "forget_rate": rate, "vog_selection": use_vog, **stats}
        if val_images is not None:
            val_probs, _ = predict(state.networks, val_images, config=config, device=device, ctx=ctx)
            record["val_macro_f1"] = macro_f1(val_labels.numpy(), val_probs.argmax(1), num_classes=num_classes)
            if record["val_macro_f1"] > state.best_score:
                state.best_score = record["val_macro_f1"]
                state.best_states = [copy.deepcopy(net.state_dict()) for net in state.networks]
        logger.info("epoch %d/%d: forget rate %.3f, kept %.3f, loss %.4f%s%s", epoch, config.epochs, rate,
                    stats["kept_fraction"], stats["train_loss"], ", VoG selection" if use_vog else "",
                    f", val macro-F1 {record['val_macro_f1']:.4f}" if "val_macro_f1" in record else "")
        state.history.append(record)
        state.generator_state = generator.get_state()
        state.rng_state = global_rng_state()
        if progress:
            progress("co-teaching", epoch / config.epochs)
        if checkpoint_path and ctx.is_main:
            save_checkpoint(state, checkpoint_path, config=config, extra=checkpoint_extra)
        distributed.barrier(ctx)
    state.wrapped = None
    if state.best_states is not None:
        for net, best in zip(state.networks, state.best_states):
            net.load_state_dict(best)
    state.phase = "trained"
    return state


# --------------------------------------------------------------------------- Phase 2

def finetune(state: TrainingState, images: ImageSource, labels: torch.Tensor, train_mask: torch.Tensor, *,
             config: EngineConfig, progress: Progress | None = None) -> None:
    """Phase 2: fine-tune both networks with cross-entropy on the trusted set.

    A fresh SGD optimiser per round with a cosine schedule over this round's own
    ``finetune_epochs`` (the original used the number of rounds as the period).
    """
    train_idx = torch.nonzero(train_mask, as_tuple=True)[0]
    if train_idx.numel() < 2:
        raise ValueError(f"the trusted set has {train_idx.numel()} samples; fine-tuning needs at least 2")
    device = select_device(config.device)
    ctx = distributed.current()
    generator = seed_everything(config.seed + state.epoch + 1)
    x, y = take(images, train_idx), labels[train_idx]
    nets = [distributed.wrap(net, ctx, device) for net in state.networks]
    optimizers = [_sgd(net, config.finetune_lr, config) for net in state.networks]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.finetune_epochs, 1))
                  for opt in optimizers]
    for epoch in range(config.finetune_epochs):
        _train_plain_epoch(nets, optimizers, x, y, config=config, device=device, generator=generator, ctx=ctx)
        for sched in schedulers:
            sched.step()
        if progress:
            progress("fine-tuning", (epoch + 1) / config.finetune_epochs)
    state.epoch += config.finetune_epochs


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(state: TrainingState, path: str | os.PathLike, *, config: EngineConfig,
                    extra: dict | None = None) -> None:
    """Write one checkpoint dict atomically: a temporary file in the same folder, then rename.

    A reader never sees a half-written file, and a crash mid-write leaves the
    previous checkpoint intact.
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "network_spec": state.network_spec,
        "networks": [net.state_dict() for net in state.networks],
        "optimizers": [opt.state_dict() for opt in state.optimizers],
        "schedulers": [sched.state_dict() for sched in state.schedulers],
        "vog_buffers": [buffer.state_dict() for buffer in state.vog_buffers],
        "forget_rate": state.forget_rate,
        "class_forget_rates": state.class_forget_rates,
        "epoch": state.epoch,
        "phase": state.phase,
        "lnl_clean_mask": state.lnl_clean_mask,
        "recent_picks": state.recent_picks,
        "elr_targets": None if state.elr_targets is None else [t.cpu() for t in state.elr_targets],
        "best_states": state.best_states,
        "best_score": state.best_score,
        "history": state.history,
        "generator_state": state.generator_state,
        "rng_state": state.rng_state,
        **(extra or {}),
    }
    atomic_write(path, lambda out: torch.save(checkpoint, out))


def load_checkpoint(path: str | os.PathLike, *, device: torch.device | None = None,
                    config: EngineConfig | None = None) -> tuple[TrainingState, dict]:
    """Rebuild the training state from a checkpoint; returns it and the raw dict (for extras).

    Loaded with ``weights_only=True``: a checkpoint is data, never code.  The
    networks are rebuilt from the stored spec and loaded strictly.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this version (format {checkpoint.get('format')!r})")
    saved_config = EngineConfig.from_dict(checkpoint["config"])
    config = config or saved_config
    device = device or select_device(config.device)
    spec = {"input_pools": 0, **checkpoint["network_spec"]}   # checkpoints from before input_pools: none
    networks = [build_network(saved_config.arch, dropout=saved_config.dropout, pretrained_weights=None, **spec)
                for _ in range(2)]
    for net, weights in zip(networks, checkpoint["networks"]):
        net.load_state_dict(weights, strict=True)
        to_device(net, device)
    optimizers = [_sgd(net, config.lr, config) for net in networks]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs) for opt in optimizers]
    for opt, sched, opt_state, sched_state in zip(optimizers, schedulers, checkpoint["optimizers"],
                                                  checkpoint["schedulers"]):
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    state = TrainingState(
        networks=networks, optimizers=optimizers, schedulers=schedulers,
        vog_buffers=[VoGBuffer.from_state_dict(b) for b in checkpoint["vog_buffers"]],
        network_spec=spec, forget_rate=float(checkpoint["forget_rate"]),
        class_forget_rates=list(checkpoint["class_forget_rates"]), epoch=int(checkpoint["epoch"]),
        phase=checkpoint["phase"], lnl_clean_mask=checkpoint["lnl_clean_mask"],
        recent_picks=checkpoint.get("recent_picks"), elr_targets=checkpoint.get("elr_targets"),
        best_states=checkpoint["best_states"], best_score=float(checkpoint["best_score"]),
        history=list(checkpoint["history"]), generator_state=checkpoint.get("generator_state"),
        rng_state=checkpoint.get("rng_state"))
    return state, checkpoint
