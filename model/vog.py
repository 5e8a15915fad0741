"""Variance of Gradients (VoG), tracked cheaply during training.

Two gradient snapshots are offered; both feed the same ring buffer and score.

``"last_layer"`` (default, what the MICCAI 2024 code measures): the per-sample
gradient of the cross-entropy under the given label with respect to the last
layer's row of that label, ``[dL/db_y, dL/dW_y]``.  For softmax cross-entropy
``dL/dz_y = p_y - 1`` and ``dz_y/dW_y = h``, so the snapshot is
``(p_y - 1) * [1, h]``: it needs only ``p_y`` and the penultimate features ``h``
from a forward pass, no backward pass and no per-sample gradient library.  It is
taken in eval mode on un-augmented images, so BatchNorm statistics and random
augmentation do not add variance of their own, and it carries no 1/B factor
from a mean-reduced loss.

``"input_gradient"`` (Agarwal et al., CVPR 2022): the gradient of the labelled
class's pre-softmax logit with respect to the input pixels.  It costs one
backward pass per snapshot and C*H*W floats per sample in the buffer: use it on
small images.

The score at an epoch is, per sample, the population standard deviation over
the last ``window`` snapshots of each dimension, averaged over dimensions.
"""
from __future__ import annotations

import numpy as np
import torch

VOG_METHODS = ("last_layer", "input_gradient")


def last_layer_gradient(probs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of CE(labels) w.r.t. the classifier row of the label: (N, 1 + D).

    Column 0 is the bias gradient, columns 1..D the weight row's gradient.
    """
    coefficient = probs.gather(1, labels.view(-1, 1)) - 1.0  # (N, 1): dL/dz_y
    return torch.cat([coefficient, coefficient * features], dim=1)


def input_gradient(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the labelled class's logit w.r.t. the input pixels, flattened: (N, C*H*W).

    Samples are independent in eval mode, so one backward pass of the summed
    logits gives every per-sample gradient at once.
    """
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)
        logits = network(images)
        selected = logits.gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, images)
    return grad.flatten(1)


class VoGBuffer:
    """Ring buffer of the last ``window`` gradient snapshots of every sample.

    Memory is ``num_samples * window * dim`` float32 values on the CPU (ResNet-18's
    last layer: 513 dims, so 10k samples x 5 snapshots = 103 MB per network).
    Snapshots of one epoch are written batch by batch with :meth:`write`, then
    :meth:`commit` closes the epoch.
    """

    def __init__(self, num_samples: int, dim: int, window: int):
        if window < 2:
            raise ValueError(f"the VoG window must hold at least 2 snapshots, got {window}")
        self.window = window
        self.snapshots = torch.zeros(num_samples, window, dim, dtype=torch.float32)
        self.epochs_recorded = 0

    @property
    def num_samples(self) -> int:
        return self.snapshots.shape[0]

    @property
    def ready(self) -> bool:
        """True once ``window`` snapshots have been committed."""
        return self.epochs_recorded >= self.window

    def write(self, sample_idx: torch.Tensor, snapshot: torch.Tensor) -> None:
        slot = self.epochs_recorded % self.window
        self.snapshots[sample_idx.cpu(), slot] = snapshot.detach().float().cpu()

    def commit(self) -> None:
        self.epochs_recorded += 1

    def scores(self, *, chunk_size: int = 4096) -> np.ndarray:
        """(N,) VoG score per sample; NaN until ``window`` snapshots exist."""
        if not self.ready:
            return np.full(self.num_samples, np.nan)
        out = np.empty(self.num_samples)
        for start in range(0, self.num_samples, chunk_size):
            chunk = self.snapshots[start:start + chunk_size].double()
            out[start:start + chunk_size] = chunk.std(dim=1, correction=0).mean(dim=1).numpy()
        return out

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots, "epochs_recorded": self.epochs_recorded, "window": self.window}

    @classmethod
    def from_state_dict(cls, state: dict) -> "VoGBuffer":
        snapshots = state["snapshots"]
        buffer = cls(snapshots.shape[0], snapshots.shape[2], int(state["window"]))
        buffer.snapshots.copy_(snapshots)
        buffer.epochs_recorded = int(state["epochs_recorded"])
        return buffer
