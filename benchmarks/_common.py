"""The benchmark cases: the same data as ``python -m selection.simulate`` with the given options."""
from __future__ import annotations

import numpy as np


def load_case(*, seed: int, noise_rate: float = 0.4, noise: str = "symmetric", imbalance_ratio: float = 20.0,
              imbalance: str = "long_tailed", test_fraction: float = 0.25):
    """(train, test) LabelledImages of digits exactly as selection.simulate builds them for these options."""
    from selection import simulate

    args = simulate.build_parser().parse_args([
        "--out", "unused", "--seed", str(seed), "--noise-rate", str(noise_rate), "--noise", noise,
        "--imbalance-ratio", str(imbalance_ratio), "--imbalance", imbalance, "--test-fraction", str(test_fraction)])
    return simulate.load_case(args)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, C) uint8, bilinear (torch): the VoG cost and detection at 32 px."""
    import torch
    import torch.nn.functional as F

    if images.shape[1] == size:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
