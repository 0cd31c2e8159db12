"""Optional training augmentation: horizontal flips, small rotations and input noise.

Parameters are drawn first from an explicit numpy generator and handed to a deterministic function,
so a seeded run is reproducible (and a resumed run draws the same parameters).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["apply_augmentation", "draw_augmentation"]


def draw_augmentation(rng: np.random.Generator, n: int, *, max_degrees: float = 10.0,
                      noise_sd: float = 0.05) -> dict[str, np.ndarray]:
    """Per-sample parameters: ``flip`` (bool), ``degrees`` (uniform +-max) and ``noise_sd``."""
    return {"flip": rng.random(n) < 0.5,
            "degrees": rng.uniform(-max_degrees, max_degrees, n),
            "noise_sd": np.full(n, noise_sd),
            "noise_seed": rng.integers(0, 2**31 - 1, n)}


def apply_augmentation(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                       params: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Apply drawn parameters to inputs (B, t, H, W), targets (B, C, H, W) and masks (B, 1, H, W).

    Inputs and targets are rotated bilinearly, masks by nearest neighbour; noise (standardised
    input units) is added to the inputs only.
    """
    b = x.shape[0]
    rad = torch.as_tensor(np.deg2rad(params["degrees"]), dtype=x.dtype, device=x.device)
    sign = torch.as_tensor(np.where(params["flip"], -1.0, 1.0), dtype=x.dtype, device=x.device)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = torch.cos(rad) * sign
    theta[:, 0, 1] = -torch.sin(rad)
    theta[:, 1, 0] = torch.sin(rad) * sign
    theta[:, 1, 1] = torch.cos(rad)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    rot = lambda v, mode: F.grid_sample(v, grid, mode=mode, padding_mode="zeros",  # noqa: E731
                                        align_corners=False)
    x, y, m = rot(x, "bilinear"), rot(y, "bilinear"), rot(m, "nearest")
    noise = torch.stack([
        torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
        for s in params["noise_seed"]]).to(x.device, x.dtype)
    sd = torch.as_tensor(params["noise_sd"], dtype=x.dtype, device=x.device).view(b, 1, 1, 1)
    return x + sd * noise, y, m

