"""The one configuration of the engine: training, VoG, selection and fine-tuning."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.data import MIN_TRAINING_SIDE, RESIZE_MODES
from model.networks import ARCHS, EMBEDDING_HEAD, RESNETS
from model.vog import VOG_METHODS
from selection.rank import DEFAULT_RARITY_WEIGHT

SELECTION_MODES = ("global", "class_balanced")
VOG_SOURCES = ("eval_pass", "train_pass")
AUGMENTATIONS = ("none", "shift", "shift_flip")


@dataclass(frozen=True)
class EngineConfig:
    """Hyperparameters, with defaults that suit small images on a CPU.

    The original MICCAI setting (ResNet-18 at 224 px, 50 epochs, batch 256, lr 0.01,
    Tk 10, W 5, mix 0.2) is reachable by setting the fields; the defaults differ
    where small data from scratch wants it (a higher learning rate, fewer epochs).
    """

    # network
    arch: str = "auto"                  # "auto" | "smallcnn" | "resnet18" | "resnet34" | "resnet50"
                                        # ("embedding_head": set by for_embedding_heads, not by users)
    image_size: int = 32                # images are resized to this square size by load_image
    resize: str = "stretch"             # how a non-square image becomes square: "stretch" | "pad" | "crop"
    pretrained_weights: str | None = None   # None | "imagenet" (torch cache only) | a file path
    dropout: float = 0.2
    frozen_backbone: bool = False       # fast mode: the ResNet (arch; "auto" = resnet18) is frozen and embeds each
                                        # image once; two small heads learn on the embeddings (model/embeddings.py)
    embedding_cache_dir: str | None = None  # fast mode: embeddings kept here by image and backbone; None = not kept
    # Phase 1: Co-teaching
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    forget_rate: float | None = None    # None = estimated from the data (see estimate_forget_rate)
    class_forget_rates: tuple[float, ...] | None = None  # the share of wrong labels within each given label, when
                                        # known (an audit): the class-balanced selection uses them instead of the
                                        # estimate; None = estimated
    max_forget_rate: float = 0.8        # cap on the estimate: Co-teaching must keep something to learn from
    estimate_logit_adjustment: float = 0.0  # tau > 0: the estimate's folds train on logits + tau * log(label share)
                                        # so that a rare class is learned, not called wrong; keeps more of the rare
                                        # classes' clean samples, costs AUROC under pair flips into rare labels
                                        # (model.coteaching.estimate_forget_rate); 0 = plain cross-entropy
    estimate_epochs: int = 4            # epochs of each cross-fitting fold when the forget rate is estimated
    estimate_min_steps: int = 60        # ... and at least this many optimiser steps per fold
    estimate_folds: int = 5             # folds of that cross-fitting
    estimate_max_samples: int = 10_000  # ... over at most this many untrusted samples (a uniform subset)
    tk: int = 10                        # epochs of the forget-rate ramp; VoG joins the selection after it
    vog_window: int = 5                 # W: snapshots per sample in the VoG ring buffer
    mix_ratio: float = 0.2              # share of the kept samples chosen by smallest VoG after Tk
    vog_method: str = "last_layer"      # "last_layer" (analytic, no backward) | "input_gradient" (Agarwal et al.)
    vog_source: str = "train_pass"      # "train_pass": reuse the training forward (no extra pass; augmented, train mode);
                                        # "eval_pass": an extra eval-mode forward on un-augmented images per epoch
    selection: str = "class_balanced"   # "class_balanced" (a quota per label) | "global" (the original)
    clean_set_window: int = 5           # the LNL clean set: picked in most of the last this many epochs (1 = last only)
    elr_weight: float = 1.0             # lambda of early-learning regularisation on each network's training loss
                                        # (model.coteaching.early_learning_penalty); 0 = plain Co-teaching
    elr_momentum: float = 0.7           # beta: each sample's target is this running average of the predictions
    augment: str = "shift"              # "none" | "shift" | "shift_flip" (flips are wrong for digits)
    # Phase 2: fine-tuning on the trusted set
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    # relabel ranking
    rarity_weight: float = DEFAULT_RARITY_WEIGHT  # 0.25: g of selection.rank.relabel_priority (0 = P(label wrong))
    # runtime
    device: str = "auto"                # "auto" | "cuda" | "mps" | "cpu"
    amp: bool = True                    # float16 mixed precision on CUDA only
    seed: int = 0
    eval_batch_size: int = 512
    num_workers: int = 0                # DataLoader worker processes for images streamed from files
    mc_dropout_passes: int = 0          # > 0: also compute MC-dropout probabilities (for BALD)

    def __post_init__(self):
        if self.class_forget_rates is not None:   # from_dict (a checkpoint, JSON) gives a list
            object.__setattr__(self, "class_forget_rates", tuple(float(r) for r in self.class_forget_rates))
        checks = [
            (self.arch in ("auto", *ARCHS, EMBEDDING_HEAD), f"arch must be one of {('auto', *ARCHS)}"),
            (not self.frozen_backbone or self.arch in ("auto", *RESNETS),
             f"frozen_backbone needs a ResNet backbone: arch must be 'auto' or one of {tuple(RESNETS)}"),
            (self.vog_method in VOG_METHODS, f"vog_method must be one of {VOG_METHODS}"),
            (self.vog_source in VOG_SOURCES, f"vog_source must be one of {VOG_SOURCES}"),
            (self.vog_source == "eval_pass" or self.vog_method == "last_layer",
             "vog_method 'input_gradient' needs vog_source='eval_pass' (input gradients need their own pass; "
             "the default vog_source is 'train_pass')"),
            (self.selection in SELECTION_MODES, f"selection must be one of {SELECTION_MODES}"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.finetune_epochs >= 0, "finetune_epochs must be >= 0"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.image_size >= MIN_TRAINING_SIDE, f"image_size must be >= {MIN_TRAINING_SIDE}"),
            (self.resize in RESIZE_MODES, f"resize must be one of {RESIZE_MODES}"),
            (self.forget_rate is None or 0.0 <= self.forget_rate < 1.0, "forget_rate must be in [0, 1)"),
            (self.class_forget_rates is None or (len(self.class_forget_rates) >= 2 and
                                                 all(0.0 <= r < 1.0 for r in self.class_forget_rates)),
             "class_forget_rates must be None or one rate in [0, 1) per class"),
            (0.0 <= self.max_forget_rate < 1.0, "max_forget_rate must be in [0, 1)"),
            (0.0 <= self.mix_ratio <= 1.0, "mix_ratio must be in [0, 1]"),
            (self.tk >= 1, "tk must be >= 1"),
            (self.elr_weight >= 0, "elr_weight must be >= 0 (0 = no early-learning regularisation)"),
            (self.estimate_logit_adjustment >= 0,
             "estimate_logit_adjustment must be >= 0 (0 = plain cross-entropy in the noise-rate estimate)"),
            (0.0 <= self.elr_momentum < 1.0, "elr_momentum must be in [0, 1)"),
            (self.clean_set_window >= 1, "clean_set_window must be >= 1 (1 = the final epoch's pick alone)"),
            (2 <= self.vog_window <= self.tk,
             "vog_window must be in [2, tk] so that VoG scores exist when they join the selection after tk"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.estimate_epochs >= 1, "estimate_epochs must be >= 1"),
            (self.estimate_folds >= 2, "estimate_folds must be >= 2"),
            (self.estimate_min_steps >= 0, "estimate_min_steps must be >= 0"),
            (self.estimate_max_samples >= 100, "estimate_max_samples must be >= 100"),
            (self.rarity_weight >= 0, "rarity_weight must be >= 0"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.mc_dropout_passes >= 0, "mc_dropout_passes must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid EngineConfig: {message}")

    @property
    def backbone_arch(self) -> str:
        """The frozen backbone's architecture (fast mode): "auto" means ResNet-18 at any image size."""
        return "resnet18" if self.arch == "auto" else self.arch

    def for_embedding_heads(self) -> "EngineConfig":
        """The configuration the two heads of fast mode train with, and that their checkpoint stores
        (the frozen backbone is stored beside it): embeddings in, so no augmentation and no weights file."""
        return dataclasses.replace(self, arch=EMBEDDING_HEAD, frozen_backbone=False, pretrained_weights=None,
                                   augment="none")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown EngineConfig fields: {sorted(unknown)}")
        return cls(**values)
