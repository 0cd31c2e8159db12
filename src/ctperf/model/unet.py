"""The U-Net of Gava et al. 2023 (doi:10.3389/fninf.2023.852105) and its frame selection.

The network maps one CT perfusion slice, its ``t`` time frames stacked as channels (t, H, W), to one
or more perfusion maps in [0, 1] (sigmoid output). At the default settings it has five resolution
levels of 64, 128, 256, 512 and 1,024 filters, two convolutions per level, 2 x 2 average pooling,
2 x 2 up-convolutions, concatenated skip connections and a final 1 x 1 convolution, as in the
paper. Convolutions use 2 x 2 kernels; an even kernel cannot be centred, so each convolution pads
one row and one column on one side ("same" size, shifted by half a pixel). The first convolution
of a block pads the bottom/right side and the second the top/left side, so the two half-pixel
shifts cancel and every block's receptive field is centred on its output pixel (a shift on the
same side in both would accumulate to a pixel per block, and to ``2**level`` pixels at the deeper
levels). ``kernel_size=3`` gives the usual centred variant.

Sizes that are not a multiple of ``2 ** (depth - 1)`` are reflect-padded up to one and the output
is cropped back, so any H x W works.

``baseline_frames=k > 0`` (off in the paper) makes the network look at contrast enhancement rather
than raw attenuation: the first input channel becomes the mean of the first ``k`` frames (the
pre-contrast anatomy) and channels 1 .. t-1 the enhancement of frames 1 .. t-1 over it, times
``contrast_gain``. The subtraction is part of the network, so a checkpoint carries it and
inference needs nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctperf.errors import ValidationError

__all__ = ["UNet", "input_times", "resample_frames", "select_frames", "subsample_indices",
           "unet_flops"]

_NORMS = ("none", "batch", "group")
# Floor of the slice's enhancement level (input units) that ``enhancement_quantile`` divides by:
# a slice with no enhancement (air, or frames before the bolus) is not blown up.
_MIN_LEVEL = 1e-3


def check_enhancement_quantile(q: float, baseline_frames: int) -> None:
    """Raise :class:`ValidationError` unless ``q`` is 0 (off) or in (0, 1] with a baseline."""
    if not 0.0 <= q <= 1.0 or (q and not baseline_frames):
        raise ValidationError(f"enhancement_quantile must be 0 or in (0, 1] with "
                              f"baseline_frames > 0, got {q}")


def subsample_indices(n_available: int, n_frames: int) -> np.ndarray:
    """Frame indices ``arange(0, T, floor(T / n))[:n]``: the authors' temporal subsampling.

    Parameters
    ----------
    n_available : int
        Frames in the study, T.
    n_frames : int
        Frames the network takes, n <= T.

    Returns
    -------
    ndarray of int, shape (n,)
    """
    if n_frames < 1:
        raise ValidationError(f"the number of frames must be >= 1, got {n_frames}")
    if n_available < n_frames:
        raise ValidationError(
            f"the model takes {n_frames} frames but the study has only {n_available}; "
            "use fewer frames (a model trained on fewer, train --frames N) or resample them "
            "(frame_mode='resample', train --frame-mode resample)")
    return np.arange(0, n_available, n_available // n_frames)[:n_frames]


def resample_frames(hu: np.ndarray, times: np.ndarray, *, n_frames: int,
                    frame_interval: float) -> np.ndarray:
    """Linearly interpolate every voxel's curve onto the grid ``times[0] + k * frame_interval``.

    Samples after the last frame repeat the last frame.

    Parameters
    ----------
    hu : ndarray, shape (T, ...)
        Curves along the first axis, in HU.
    times : ndarray, shape (T,)
        Acquisition times in s, strictly increasing.
    n_frames : int
        Number of grid points n.
    frame_interval : float
        Grid step in s.

    Returns
    -------
    ndarray, float32, shape (n, ...)
    """
    times = np.asarray(times, dtype=np.float64)
    if frame_interval <= 0:
        raise ValidationError(f"frame_interval must be > 0 s, got {frame_interval}")
    grid = times[0] + frame_interval * np.arange(n_frames)
    grid = np.clip(grid, times[0], times[-1])
    right = np.clip(np.searchsorted(times, grid, side="right"), 1, len(times) - 1)
    left = right - 1
    span = times[right] - times[left]
    w = np.clip((grid - times[left]) / np.where(span > 0, span, 1.0), 0.0, 1.0)
    shape = (n_frames,) + (1,) * (hu.ndim - 1)
    out = hu[left] * (1 - w).reshape(shape) + hu[right] * w.reshape(shape)
    return out.astype(np.float32, copy=False)


def select_frames(hu: np.ndarray, times: np.ndarray, *, n_frames: int, mode: str = "subsample",
                  frame_interval: float | None = None) -> np.ndarray:
    """The network's input frames from a (T, ...) series: subsampled or resampled in time.

    ``mode="subsample"`` keeps frames :func:`subsample_indices` (the authors' choice, blind to
    the times); ``mode="resample"`` interpolates onto a uniform grid of ``frame_interval`` s.
    """
    if mode == "subsample":
        return np.asarray(hu[subsample_indices(hu.shape[0], n_frames)], dtype=np.float32)
    if mode == "resample":
        if frame_interval is None:
            raise ValidationError("frame_mode='resample' needs a frame_interval in s")
        return resample_frames(hu, times, n_frames=n_frames, frame_interval=frame_interval)
    raise ValidationError(f"frame mode must be 'subsample' or 'resample', got {mode!r}")


def input_step(times: np.ndarray, *, n_frames: int, mode: str = "subsample",
               frame_interval: float | None = None) -> float:
    """Median time step, s, between the frames :func:`select_frames` gives the network."""
    if mode == "resample" and frame_interval is not None:
        return float(frame_interval)
    t = np.asarray(times, dtype=np.float64)[subsample_indices(len(times), n_frames)]
    return float(np.median(np.diff(t))) if t.size > 1 else 0.0


def input_times(times: np.ndarray, *, n_frames: int, mode: str = "subsample",
                frame_interval: float | None = None) -> np.ndarray:
    """The times, s, of the frames :func:`select_frames` gives the network (a resampled grid
    runs on past a study that ends before it, as its repeated last frame does)."""
    t = np.asarray(times, dtype=np.float64)
    if mode == "resample" and frame_interval is not None:
        return t[0] + float(frame_interval) * np.arange(n_frames)
    return t[subsample_indices(t.size, n_frames)]


def _same_pad(kernel_size: int, *, flip: bool = False) -> tuple[int, int, int, int]:
    """Zero padding (left, right, top, bottom) keeping the size; an even kernel pads one side
    more: the bottom/right side, or the top/left side with ``flip``."""
    total = kernel_size - 1
    before = total // 2
    if flip:
        before = total - before
    return (before, total - before, before, total - before)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for i, c in enumerate((cin, cout)):  # opposite sides: the half-pixel shifts cancel
            layers += [nn.ZeroPad2d(_same_pad(kernel_size, flip=i == 1)),
                       nn.Conv2d(c, cout, kernel_size, bias=norm == "none"),
                       _norm(norm, cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net from (B, t, H, W) frames to (B, C, H, W) maps in [0, 1].

    Parameters
    ----------
    in_frames : int
        Input channels t (time frames).
    out_channels : int
        Output maps C (1 per model in the paper).
    width : int
        Filters at the first level; level ``i`` has ``width * 2**i`` (64 -> 1,024 by default).
    depth : int
        Resolution levels (5 in the paper).
    kernel_size : int
        Convolution kernel (2 in the paper; 3 for the usual variant).
    norm : {"none", "batch", "group"}
        Normalisation after each convolution ("none" in the paper).
    baseline_frames : int
        0 (the paper): frames enter as given. ``k`` in 1 .. t-1: the input becomes the mean of
        the first ``k`` frames followed by the enhancement of frames 1 .. t-1 over that mean.
    contrast_gain : float
        Factor applied to the enhancement channels (e.g. standardised units -> units of 20 HU).
    enhancement_quantile : float
        0 (default): off. ``q`` in (0, 1] (needs ``baseline_frames``): the enhancement channels
        are divided by the ``q``-quantile over the slice of every pixel's mean enhancement
        (``q = 1``: the slice's most enhancing pixel, a vessel), so the network sees tissue
        enhancement relative to the slice's vessels, whatever the injection.
    """

    def __init__(self, in_frames: int, *, out_channels: int = 1, width: int = 64, depth: int = 5,
                 kernel_size: int = 2, norm: str = "none", baseline_frames: int = 0,
                 contrast_gain: float = 1.0, enhancement_quantile: float = 0.0) -> None:
        super().__init__()
        if in_frames < 1 or out_channels < 1 or width < 1 or depth < 1 or kernel_size < 1:
            raise ValidationError(
                f"UNet sizes must be >= 1: in_frames={in_frames}, out_channels={out_channels}, "
                f"width={width}, depth={depth}, kernel_size={kernel_size}")
        if norm not in _NORMS:
            raise ValidationError(f"norm must be one of {_NORMS}, got {norm!r}")
        if baseline_frames and not 1 <= baseline_frames < in_frames:
            raise ValidationError(f"baseline_frames must be 0 or in 1 .. {in_frames - 1} (the "
                                  f"input has {in_frames} frames), got {baseline_frames}")
        if not (math.isfinite(contrast_gain) and contrast_gain > 0):
            raise ValidationError(f"contrast_gain must be > 0, got {contrast_gain}")
        check_enhancement_quantile(enhancement_quantile, baseline_frames)
        self.config: dict[str, Any] = {
            "in_frames": in_frames, "out_channels": out_channels, "width": width, "depth": depth,
            "kernel_size": kernel_size, "norm": norm, "baseline_frames": baseline_frames,
            "contrast_gain": contrast_gain, "enhancement_quantile": enhancement_quantile}
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_frames
        for c in chans:
            self.down.append(_DoubleConv(cin, c, kernel_size, norm))
            cin = c
        self.pool = nn.AvgPool2d(2)
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.upconv.append(nn.ConvTranspose2d(2 * c, c, 2, stride=2))
            self.up.append(_DoubleConv(2 * c, c, kernel_size, norm))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """Input sizes that are a multiple of this need no padding."""
        return int(2 ** (self.config["depth"] - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config["in_frames"]:
            raise ValidationError(
                f"UNet expects input (B, {self.config['in_frames']}, H, W), got {tuple(x.shape)}")
        k = int(self.config["baseline_frames"])
        if k:
            base = x[:, :k].mean(dim=1, keepdim=True)
            enh = (x[:, 1:] - base) * float(self.config["contrast_gain"])
            q = float(self.config["enhancement_quantile"])
            if q:
                level = torch.quantile(enh.mean(dim=1).flatten(1).float(), q, dim=1)
                enh = enh / level.clamp(min=_MIN_LEVEL).to(enh.dtype)[:, None, None, None]
            x = torch.cat([base, enh], dim=1)
        h, w = x.shape[-2:]
        m = int(self.multiple)
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = block(torch.cat([skips.pop(), upconv(x)], dim=1))
        return torch.sigmoid(self.head(x))[..., :h, :w]

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def unet_flops(*, in_frames: int, size: int | Sequence[int], out_channels: int = 1,
               width: int = 64, depth: int = 5, kernel_size: int = 2) -> int:
    """Floating-point operations of one forward pass on one slice (2 per multiply-add).

    Counts convolutions, up-convolutions and the 1 x 1 head (the operations
    ``torch.utils.flop_counter`` counts); pooling, activations and biases are ignored (< 1 %).

    Parameters
    ----------
    in_frames, out_channels, width, depth, kernel_size
        As for :class:`UNet`.
    size : int or (int, int)
        Slice size H x W in pixels (padded up to a multiple of ``2**(depth-1)`` as the net does).
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    m = 2 ** (depth - 1)
    h, w = math.ceil(h / m) * m, math.ceil(w / m) * m
    k2 = kernel_size**2
    chans = [width * 2**i for i in range(depth)]
    macs = 0
    cin = in_frames
    for i, c in enumerate(chans):
        px = (h >> i) * (w >> i)
        macs += px * k2 * (cin * c + c * c)
        cin = c
    for i in reversed(range(depth - 1)):
        c = chans[i]
        px = (h >> i) * (w >> i)
        macs += (px // 4) * (2 * c) * c * 4  # ConvTranspose 2x2 stride 2 from the coarser level
        macs += px * k2 * (2 * c * c + c * c)
    macs += h * w * chans[0] * out_channels
    return 2 * macs
