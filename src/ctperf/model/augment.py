"""Optional training augmentation: horizontal flips, small rotations, input noise, contrast gain
and a shift in time.

The contrast gain multiplies every frame's enhancement over the pre-contrast baseline by one factor
per slice, as a different injection (dose, cardiac output) would: CBV, CBF, MTT and delay are
ratios to the arterial input, so the targets do not change. The time shift moves the whole study
by a few frames, as an earlier or later start of the acquisition would: maps measured from the
arterial input (delay, Tmax) do not change, TTP (counted from the first frame) would.

Parameters are drawn first from an explicit numpy generator and handed to a deterministic function,
so a seeded run is reproducible (and a resumed run draws the same parameters).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["apply_augmentation", "draw_augmentation", "shift_frames"]


def draw_augmentation(rng: np.random.Generator, n: int, *, max_degrees: float = 10.0,
                      noise_sd: float = 0.05, max_log_gain: float = 0.0,
                      max_shift: int = 0) -> dict[str, np.ndarray]:
    """Per-sample parameters: ``flip`` (bool), ``degrees`` (uniform +-max), ``noise_sd``, the
    contrast ``gain`` (``exp`` of a uniform draw in +-``max_log_gain``; 1 by default) and, with
    ``max_shift`` > 0, the ``shift`` in frames (whole numbers uniform in +-``max_shift``, drawn
    last so that the other draws stay those of a run without it)."""
    params = {"flip": rng.random(n) < 0.5,
              "degrees": rng.uniform(-max_degrees, max_degrees, n),
              "noise_sd": np.full(n, noise_sd),
              "noise_seed": rng.integers(0, 2**31 - 1, n)}
    params["gain"] = np.exp(rng.uniform(-max_log_gain, max_log_gain, n))
    if max_shift > 0:
        params["shift"] = rng.integers(-int(max_shift), int(max_shift) + 1, n)
    return params


def shift_frames(x: torch.Tensor, shifts: np.ndarray) -> torch.Tensor:
    """Move each sample of (B, t, H, W) by ``shifts[i]`` frames: later (> 0) with its first
    frame repeated in front, earlier (< 0) with its last frame repeated at the end."""
    t = x.shape[1]
    index = np.clip(np.arange(t)[None, :] - np.asarray(shifts)[:, None], 0, t - 1)  # (B, t)
    index = torch.as_tensor(index, device=x.device)[:, :, None, None].expand_as(x)
    return torch.gather(x, 1, index)


def apply_augmentation(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                       params: dict[str, np.ndarray], *,
                       baseline_frames: int = 1) -> tuple[torch.Tensor, ...]:
    """Apply drawn parameters to inputs (B, t, H, W), targets (B, C, H, W) and masks (B, 1, H, W).

    The inputs are first shifted in time (``shift``, when drawn). The contrast gain scales each
    frame's difference from the mean of the first
    ``baseline_frames`` frames (the baseline itself is kept). Inputs and targets are then rotated
    bilinearly, masks by nearest neighbour; noise (standardised input units) is added to the
    inputs only.
    """
    b = x.shape[0]
    if "shift" in params and np.any(params["shift"] != 0):
        x = shift_frames(x, params["shift"])
    if "gain" in params and not np.all(params["gain"] == 1.0):
        base = x[:, :max(int(baseline_frames), 1)].mean(dim=1, keepdim=True)
        gain = torch.as_tensor(params["gain"], dtype=x.dtype, device=x.device).view(b, 1, 1, 1)
        x = base + gain * (x - base)
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

