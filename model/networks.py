"""Network factory: a small CNN for small images and torchvision ResNets.

Every network returned by :func:`build_network` has the same interface:

* ``forward(x)`` -> logits (N, K);
* ``forward_features(x)`` -> penultimate features h (N, D), after dropout is *not* applied;
* ``classifier`` -> the last ``nn.Linear(D, K)``, whose rows VoG tracks;
* ``head(h)`` -> logits from features (dropout, then the classifier).

``"embedding_head"`` is the network of the frozen-backbone (fast) mode: its
"images" are (D, 1, 1) embeddings of a frozen pretrained backbone
(model/embeddings.py), standardised per dimension, and its backbone is one
hidden layer; Co-teaching and VoG treat it like any other network.

Inputs are float images in [0, 1]; each network normalises them itself with the
per-channel mean and std it was built with (kept as buffers, so a checkpoint
carries them and scoring needs nothing else).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models

logger = logging.getLogger(__name__)

RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}
ARCHS = ("smallcnn", *RESNETS)
EMBEDDING_HEAD = "embedding_head"   # the heads of the frozen-backbone mode, on (D, 1, 1) embeddings
EMBEDDING_HEAD_WIDTH = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX_SIZE = 32


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class _Classifier(nn.Module):
    """Normalise -> backbone -> features h -> dropout -> linear classifier."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *,
                 mean, std, dropout: float, expand_to_rgb: bool = False):
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.backbone = backbone
        self.expand_to_rgb = expand_to_rgb
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(self.normalize(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or (logits, features) with ``return_features`` (one pass feeds training and VoG)."""
        features = self.forward_features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


def _small_cnn_backbone(in_channels: int, *, input_pools: int, width: int = 32) -> tuple[nn.Module, int]:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = [*block(in_channels, width), *[nn.MaxPool2d(2)] * input_pools, *block(width, width), nn.MaxPool2d(2),
              *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
              *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width


def _embedding_head_backbone(embedding_dim: int, width: int = EMBEDDING_HEAD_WIDTH) -> tuple[nn.Module, int]:
    layers = [nn.Flatten(), nn.Linear(embedding_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), width


def _resnet_backbone(arch: str, *, small_input_stem: bool, pretrained_weights: str | None) -> tuple[nn.Module, int]:
    factory, weights_enum = RESNETS[arch]
    net = factory(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if pretrained_weights:
        state = torch.load(_find_pretrained_file(pretrained_weights, weights_enum), map_location="cpu",
                           weights_only=True)
        # The ImageNet classifier is replaced by ours; every other weight must match.
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    if small_input_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, feature_dim


def _find_pretrained_file(pretrained_weights: str, weights_enum) -> Path:
    """A local weights file, or ``"imagenet"`` = torchvision's file in the torch hub cache.

    Never downloads: the machines this runs on may have no route to the internet.
    """
    if pretrained_weights != "imagenet":
        path = Path(pretrained_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file {path} does not exist")
        return path
    filename = os.path.basename(weights_enum.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights requested but {filename} is not in the torch cache ({path.parent}). "
            f"Copy the file there (it is {weights_enum.url}), pass a local file path instead, "
            "or train from random initialisation (pretrained_weights=None).")
    return path


def default_input_pools(image_size: int) -> int:
    """The small CNN halves an image this many times after its first block: 0 up to 15 px, 1 from 16, 2 from 32
    (``image_size``: the short side of a non-square image).

    Its body (four blocks, two max-pools) then always sees an image of 8-15 px,
    the size it is built for.  Without them its last block sees 24 px of a 32 px
    image, and it learns one so slowly that the noise estimate's short folds
    call the rare labels' clean samples wrong.  Digits upscaled to 32 px, 30%
    noise: minority clean kept 0.69x (symmetric, 5:1) and priority AUROC 0.91
    (pair flips, 20:1) without them, 1.00x and 0.9996 with two pools, in a
    third of the time (benchmarks/RESULTS.md).
    """
    return max(int(image_size).bit_length() - 4, 0)


def default_small_input_stem(image_size: int, pretrained_weights: str | None) -> bool:
    """ResNets on images up to 64 px get a 3x3 stride-1 stem without max-pool.

    The ImageNet stem (7x7 stride 2 + max-pool) leaves a 2x2 map before the last
    stage of a 64 px image.  Pretrained weights keep their own stem.
    """
    return image_size <= 2 * SMALL_IMAGE_MAX_SIZE and not pretrained_weights


def resolve_arch(arch: str, image_size: int) -> str:
    """"auto" picks the small CNN for images up to 32 px and ResNet-18 above."""
    if arch == "auto":
        return "smallcnn" if image_size <= SMALL_IMAGE_MAX_SIZE else "resnet18"
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {('auto', *ARCHS)}")
    return arch


def build_network(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                  mean=None, std=None, dropout: float = 0.2,
                  pretrained_weights: str | None = None, small_input_stem: bool | None = None,
                  input_pools: int | None = None) -> nn.Module:
    """Build a classifier with the interface described in the module docstring.

    Parameters
    ----------
    arch : "auto", "smallcnn", "resnet18", "resnet34", "resnet50", or "embedding_head"
        (inputs (D, 1, 1) embeddings, ``in_channels`` = D).
    in_channels : 1 (grey) or 3 (RGB). ResNets repeat a grey channel to RGB.
    mean, std : per-channel normalisation of [0, 1] inputs; ImageNet's when
        pretrained weights are loaded, 0.5 / 0.25 when neither is given.
    dropout : dropout before the classifier; it also makes MC-dropout BALD real.
    pretrained_weights : None, "imagenet" (torch hub cache only) or a file path;
        ResNets only.
    small_input_stem : ResNets only; None = :func:`default_small_input_stem`.  A
        checkpoint stores the resolved value so that it rebuilds the same network.
    input_pools : the small CNN only; None = :func:`default_input_pools`, stored
        like ``small_input_stem`` (checkpoints from before it have none: 0; their
        next training runs Phase 1 again, model.engine).
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if arch == EMBEDDING_HEAD:
        if pretrained_weights:
            raise ValueError("the embedding head has no pretrained weights (its backbone is the frozen one)")
        backbone, feature_dim = _embedding_head_backbone(in_channels)
        return _Classifier(backbone, feature_dim, num_classes, mean=_per_channel(0.0 if mean is None else mean, in_channels),
                           std=_per_channel(1.0 if std is None else std, in_channels), dropout=dropout)
    arch = resolve_arch(arch, image_size)
    if in_channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {in_channels}")
    if arch == "smallcnn":
        if pretrained_weights:
            raise ValueError("pretrained weights are only available for the ResNets")
        if input_pools is None:
            input_pools = default_input_pools(image_size)
        backbone, feature_dim = _small_cnn_backbone(in_channels, input_pools=input_pools)
        expand = False
    else:
        if small_input_stem is None:
            small_input_stem = default_small_input_stem(image_size, pretrained_weights)
        backbone, feature_dim = _resnet_backbone(arch, small_input_stem=small_input_stem,
                                                 pretrained_weights=pretrained_weights)
        expand = in_channels == 1
    if pretrained_weights:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels = 3 if expand else in_channels
    mean = _per_channel(mean if mean is not None else 0.5, channels)
    std = _per_channel(std if std is not None else 0.25, channels)
    return _Classifier(backbone, feature_dim, num_classes, mean=mean, std=std,
                       dropout=dropout, expand_to_rgb=expand)


def _per_channel(value, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"expected {channels} normalisation values, got {len(values)}")
    return values
