"""Rigid motion correction: every frame registered to the first with SimpleITK.

Follows the registration of Gava et al. 2023 (doi:10.3389/fninf.2023.852105), done there with
Elastix: 6 degrees of freedom, two resolution levels (8x down-sampled in plane, then full), sum of
squared differences, 2,000 and 8,000 random samples, 300 iterations per level.

SimpleITK equivalents used here: mean squares metric; random sampling (a fixed random subset per
level, whereas Elastix redraws the samples every iteration); ITK's regular step gradient descent
(a deterministic step that halves when the gradient reverses) as the nearest robust stand-in for
Elastix's stochastic gradient descent; parameter scales from physical shift, so that rotations and
shifts take comparable steps. The pyramid is built per axis, so thick slices are not shrunk
further: with 0.45 x 0.45 x 5 mm voxels the coarse level is 3.6 x 3.6 x 5 mm.

Where the metric is evaluated (the paper does not say; these choices are what makes the fit
reliable on studies with a contrast bolus):

- The brain grown in plane by ``rim_mm`` (12 mm): skull and scalp, with their edges to the brain
  and to the air, are the strongest rigid features of the head and do not enhance. The brain's
  interior alone (0.5-1.5 HU texture under 8 HU noise, 2,000 samples) gave a flat, noisy metric:
  frames before any contrast arrived moved by 0.5-1 mm, bolus frames by up to 8 mm.
- Less the voxels that enhance: a voxel's largest value over time is compared with the largest
  value of the first frame within ``reach_mm`` of it. Motion can only bring in values found
  nearby, so an excess over that neighbourhood maximum is contrast (arteries, veins, sinuses),
  whereas a moving skull edge is never taken for enhancement. The set is grown by ``reach_mm``.
- Intensities are not clipped: clipping bone (e.g. to 150 HU) no longer lets vessels dominate,
  but makes the linear interpolation of thick slices inconsistent with the data through plane
  (interpolated-then-clipped differs from clipped-then-interpolated at the skull), which biased
  the through-plane shift by about 1 mm.
- The coarse level keeps at least ``min_coarse_px`` (64) pixels in plane: 8x of a 512 matrix as
  in the paper, but only 2x of a 128 matrix (8x of 128 px left 16 px, too coarse to converge).
- A study of one slice is registered in plane only (rotation about z, shifts in x and y): nothing
  in a single slice fixes the other three parameters.

**A transform must earn its place.** An optimiser always returns *some* transform, and on a still
study it returns noise: interpolation smooths the moving frame's noise, so sub-voxel shifts lower
the mean squares of pure noise, and a featureless or bolus-dominated image holds no fit. Each
frame's fit is therefore checked before it is used (docs/preprocessing.md has the figures):

- Check metric: mean squared difference between the first frame and the frame read at a
  candidate transform, both smoothed by a Gaussian of ``check_sigma_px`` (2 voxels in plane and
  through plane, none along a single slice), over the metric's voxels that stay inside the
  volume under every candidate (the same voxels for every candidate). Smoothing after
  resampling takes away the noise that interpolation removes: for white noise at most
  ``(1 - exp(-1 / (4 s^2))) / 2`` of the smoothed noise variance per axis (s the sigma in
  voxels), 3 %, so a noise-only metric drops by at most about 4.5 % at any transform.
- Candidates, simplest first: the identity, the fit's in-plane part (rotation about z, shifts
  in x and y), the whole fit. One replaces a simpler one only if it lowers the check metric by
  more than ``min_gain`` (25 %) of it (``min_gain_through_plane``, 10 %, from the in-plane part
  to the whole fit) *and* by more than three standard errors of the gain (block sums over
  in-plane blocks of 8 sigmas, since smoothed noise is correlated), or by half the metric or
  more, which noise never reaches.
- Only plausible candidates are considered: rotations up to ``max_rotation_deg`` (15 degrees)
  and shifts up to ``max_shift_mm`` (20 mm), a head in a head holder.
- The decision ("reference", "identity", "in-plane" or "rigid") and the check metric of every
  candidate are kept per frame in :class:`MotionResult`, with the fit itself. A frame whose
  fit is beyond the plausible range but lowers the check metric as clearly as a kept transform
  must is "uncorrected": it moved, its motion is left in the study, and ``uncorrected_mm``
  holds how far (the QC flag ``motion_uncorrected`` of the maps says so).

Transforms and their parameters follow :mod:`ctperf.preprocess.transforms`; the centre of
rotation is the centre of the volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import SimpleITK as sitk

from ctperf.errors import ValidationError
from ctperf.parallel import map_chunks
from ctperf.preprocess.transforms import (
    THROUGH_PLANE,
    FrameCheck,
    choose_transform,
    frame_displacement,
    make_check,
    make_transform,
    static_bone,
    to_sitk_image,
)
from ctperf.types import CTPSeries

__all__ = ["MotionResult", "correct_motion"]

log = logging.getLogger(__name__)


#: Decisions recorded per frame: the first frame, and which candidate each other frame keeps.
DECISIONS = ("reference", "identity", "in-plane", "rigid", "uncorrected")

@dataclass(frozen=True, eq=False)
class MotionResult:
    """Result of :func:`correct_motion`.

    Attributes
    ----------
    series : CTPSeries
        The registered study, same grid and times as the input.
    parameters : ndarray, float64, shape (T, 6)
        Per frame (rx, ry, rz) in degrees and (tx, ty, tz) in mm, as applied: the candidate
        each frame's decision kept (zeros for the identity); frame 0 is all zeros.
    center_mm : ndarray, float64, shape (3,)
        Centre of rotation in patient mm.
    displacement_mm : ndarray, float64, shape (T,)
        Mean displacement over the brain of each frame relative to the first, in mm.
    max_displacement_mm : ndarray, float64, shape (T,)
        Largest displacement over the brain, in mm.
    metric : ndarray, float64, shape (T,)
        The optimiser's final mean-squares metric at full resolution (HU^2, on its random
        samples); NaN for frame 0.
    fitted_parameters : ndarray, float64, shape (T, 6)
        The optimiser's result for each frame, before the decision.
    decision : tuple of str, length T
        Per frame one of :data:`DECISIONS`.
    check_identity, check_in_plane, check_fitted : ndarray, float64, shape (T,)
        Check metric (mean squared difference of the smoothed frames over the same voxels,
        HU^2) at the identity, at the fit's in-plane part and at the whole fit; NaN for frame 0
        and for candidates that were not plausible.
    min_gain, min_gain_through_plane : float
        Relative decrease of the check metric a transform needed over the identity, and the
        whole fit over its in-plane part.
    uncorrected_mm : ndarray, float64, shape (T,)
        Mean displacement over the brain of the fit of each "uncorrected" frame, mm (0 for
        the others): motion measured and left in the study.
    """

    series: CTPSeries
    parameters: np.ndarray
    center_mm: np.ndarray
    displacement_mm: np.ndarray
    max_displacement_mm: np.ndarray
    metric: np.ndarray
    fitted_parameters: np.ndarray
    decision: tuple[str, ...]
    check_identity: np.ndarray
    check_in_plane: np.ndarray
    check_fitted: np.ndarray
    min_gain: float
    min_gain_through_plane: float
    uncorrected_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def transforms(self) -> list[sitk.Euler3DTransform]:
        """One SimpleITK Euler3DTransform per frame (fixed -> moving point mapping)."""
        return [make_transform(p, self.center_mm) for p in self.parameters]

    def record(self) -> dict:
        """The per-frame decisions as plain numbers and lists (JSON-ready; None for NaN)."""
        def plain(a: np.ndarray) -> list:
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        return {
            "rule": "keep a transform only if it is plausible and lowers the check metric "
                    "(mean squared difference of the smoothed frames, HU^2) by more than "
                    "min_gain of the identity's (min_gain_through_plane of the in-plane "
                    "part's for the whole fit) and by three standard errors, or by half "
                    "of it or more",
            "min_gain": self.min_gain,
            "min_gain_through_plane": self.min_gain_through_plane,
            "decision": list(self.decision),
            "check_identity": plain(self.check_identity),
            "check_in_plane": plain(self.check_in_plane),
            "check_fitted": plain(self.check_fitted),
            "fitted_parameters": [plain(p) for p in self.fitted_parameters],
            "uncorrected_mm": plain(self.uncorrected_mm),
        }


def _shrink_factors(spacing_xyz: np.ndarray, level: int) -> list[int]:
    """Per-axis shrink so the finest axis is shrunk ``level`` times and no axis beyond that size."""
    target = level * spacing_xyz.min()
    return [max(1, round(target / s)) for s in spacing_xyz]


def _effective_levels(levels: Sequence[int], size_xyz: Sequence[int],
                      min_size: int) -> list[int]:
    """Levels capped so that the smallest in-plane side keeps at least ``min_size`` pixels."""
    side = min(size_xyz[:2])
    cap = max(1, side // max(int(min_size), 1))
    return [max(1, min(int(level), cap)) for level in levels]


def _pyramid(img: sitk.Image, levels: Sequence[int]) -> list[sitk.Image]:
    spacing = np.asarray(img.GetSpacing())
    out = []
    for level in levels:
        factors = [min(f, n) for f, n in zip(_shrink_factors(spacing, level), img.GetSize(),
                                             strict=True)]
        out.append(sitk.BinShrink(img, factors) if max(factors) > 1 else img)
    return out


def _register_frame(fixed_pyr: list[sitk.Image], mask_pyr: list[sitk.Image],
                    mask_fraction: float, moving_img: sitk.Image, levels: Sequence[int],
                    samples: Sequence[int], iterations: int, center: Sequence[float],
                    seed: int, in_plane: bool) -> tuple[np.ndarray, float]:
    """Fit one frame; returns its parameters (6,) (degrees, mm) and the final metric (HU^2)."""
    moving_pyr = _pyramid(moving_img, levels)
    tx = sitk.Euler3DTransform()
    tx.SetCenter(list(center))
    metric = float("nan")
    for fixed_l, mask_l, moving_l, n_samples, level in zip(fixed_pyr, mask_pyr, moving_pyr,
                                                           samples, levels, strict=True):
        reg = sitk.ImageRegistrationMethod()
        reg.SetNumberOfThreads(1)  # one ITK thread per frame: frames run in parallel
        reg.SetMetricAsMeanSquares()
        # Gradients by central differences at the samples only: no whole-image gradient filter
        # (faster with sparse samples, and works on the 1-2 slices of a coarse level).
        reg.SetMetricUseFixedImageGradientFilter(False)
        reg.SetMetricUseMovingImageGradientFilter(False)
        reg.SetShrinkFactorsPerLevel([1])
        reg.SetSmoothingSigmasPerLevel([0.0])
        reg.SetMetricFixedMask(mask_l)
        # ITK draws samples over the whole grid and drops those outside the mask
        n_vox = int(np.prod(fixed_l.GetSize())) * mask_fraction
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # the frame's own seed (SimpleITK reads 0 as 'wall clock': callers pass seeds >= 1)
        reg.SetMetricSamplingPercentage(min(1.0, n_samples / max(n_vox, 1.0)), seed)
        reg.SetInterpolator(sitk.sitkLinear)
        # Initial step of one voxel of the level, down to 1/10,000 of it.
        step = float(min(fixed_l.GetSpacing()))
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=step, minStep=step * 1e-4, numberOfIterations=iterations,
            relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        if in_plane:
            weights = [1.0] * 6
            for i in THROUGH_PLANE:
                weights[i] = 0.0
            reg.SetOptimizerWeights(weights)
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(fixed_l, moving_l)
        metric = float(reg.GetMetricValue())
        log.debug("level %d: %d iterations, metric %.3g", level, reg.GetOptimizerIteration(),
                  metric)
    p = np.asarray(tx.GetParameters(), dtype=np.float64)
    return np.r_[np.rad2deg(p[:3]), p[3:]], metric


def _frame(t: int, fixed_pyr: list[sitk.Image], mask_pyr: list[sitk.Image],
           mask_fraction: float, moving: np.ndarray, affine: np.ndarray, fit: dict,
           check: FrameCheck) -> tuple[np.ndarray, np.ndarray, float, str, np.ndarray, np.ndarray]:
    """Fit and check frame ``t``: (frame, fitted, metric, decision, parameters kept, checks)."""
    moving_img = to_sitk_image(moving, affine)
    fitted, metric = _register_frame(fixed_pyr, mask_pyr, mask_fraction, moving_img,
                                     seed=fit["seed"] + t, **{k: v for k, v in fit.items()
                                                              if k != "seed"})
    decision, kept, frame, checks = choose_transform(check, moving_img, fitted, workers=1)
    log.debug("frame %d: %s (check %s, fit %s)", t, decision, np.round(checks, 2),
              np.round(fitted, 3))
    return frame, fitted, metric, decision, kept, checks


@dataclass(frozen=True, eq=False)
class _Frames:
    """Per-frame results, filled in place by the workers (each writes its own frames)."""

    hu: np.ndarray                                     # (T, Z, Y, X) registered frames
    fitted: np.ndarray                                 # (T, 6)
    parameters: np.ndarray                             # (T, 6)
    metric: np.ndarray                                 # (T,)
    checks: np.ndarray                                 # (T, 3)
    decision: list[str] = field(default_factory=list)  # (T,)

    @classmethod
    def start(cls, series: CTPSeries) -> _Frames:
        n = series.n_frames
        hu = np.empty_like(series.hu)
        hu[0] = series.hu[0]
        return cls(hu=hu, fitted=np.zeros((n, 6)), parameters=np.zeros((n, 6)),
                   metric=np.full(n, np.nan), checks=np.full((n, 3), np.nan),
                   decision=["reference"] * n)


def _register_frames(first: int, stop: int, *, series: CTPSeries,
                     shared: tuple[list[sitk.Image], list[sitk.Image], float], fit: dict,
                     check: FrameCheck, frames: _Frames) -> None:
    """Fit and check frames first + 1 to stop (frame 0 is the reference), into ``frames``."""
    for t in range(first + 1, stop + 1):
        (frames.hu[t], frames.fitted[t], frames.metric[t], frames.decision[t],
         frames.parameters[t], frames.checks[t]) = _frame(t, *shared, series.hu[t],
                                                          series.affine, fit, check)


def _registration_mask(series: CTPSeries, mask: np.ndarray | None) -> np.ndarray:
    """The brain of the first frame (bool (Z, Y, X)); soft tissue by threshold as a fallback."""
    if mask is None:
        from ctperf.masks import brain_mask, first_frame_as_air

        first = first_frame_as_air(series.hu)
        try:
            mask = brain_mask(first, spacing=series.spacing)
        except ValidationError:
            mask = None
        if mask is None or mask.sum() < 1000:
            mask = (first > -20) & (first < 100)
        if mask.sum() < 1000:  # no recognisable brain: use every voxel
            mask = np.ones(series.shape[1:], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != series.shape[1:]:
        raise ValidationError(f"mask shape {mask.shape} differs from the study grid "
                              f"{series.shape[1:]} (Z, Y, X)")
    return mask


def _head_region(mask: np.ndarray, spacing_zyx: Sequence[float], rim_mm: float) -> np.ndarray:
    """The brain grown in plane by ``rim_mm``: brain, skull and scalp with its edge to the air."""
    from scipy import ndimage

    if rim_mm <= 0 or mask.all():
        return mask
    # distances within each slice only: an (almost) infinite spacing through plane
    dist = ndimage.distance_transform_edt(~mask, sampling=(1e9, *spacing_zyx[1:]))
    return dist <= rim_mm


def _enhancing(hu: np.ndarray, spacing_zyx: Sequence[float], *, reach_mm: float,
               threshold_hu: float) -> np.ndarray:
    """Voxels that enhance more than motion of up to ``reach_mm`` can explain (bool (Z, Y, X)).

    A voxel's largest value over time (3-frame running mean, against noise) is compared with the
    largest value of the first frame within ``reach_mm`` in plane and one slice through plane: a
    shift of the head can only bring in values found nearby in the first frame, so an excess
    over that neighbourhood maximum is contrast, not motion. The set is grown by ``reach_mm``
    because the vessels of a moved frame lie up to that far from where the first frame has them.
    """
    from scipy import ndimage

    n = max(1, round(reach_mm / min(spacing_zyx[1:])))
    size = (3, 2 * n + 1, 2 * n + 1)
    t_max = np.full(hu.shape[1:], -np.inf, dtype=np.float32)
    nt = hu.shape[0]
    for t in range(nt):
        lo, hi = max(0, t - 1), min(nt, t + 2)
        np.maximum(t_max, hu[lo:hi].mean(axis=0), out=t_max)
    reach = ndimage.maximum_filter(hu[0], size=size)
    enhancing = (t_max - reach) > threshold_hu
    return ndimage.maximum_filter(enhancing, size=size)


def _mask_points(series: CTPSeries, mask: np.ndarray) -> np.ndarray:
    """Patient-mm coordinates of the mask's voxels (at most ~100,000, evenly strided)."""
    zyx = np.argwhere(mask)
    zyx = zyx[:: max(1, len(zyx) // 100_000)]
    ijk1 = np.c_[zyx[:, ::-1], np.ones(len(zyx))]
    return (ijk1 @ series.affine.T)[:, :3]


def correct_motion(series: CTPSeries, *, levels: Sequence[int] = (8, 1),
                   samples: Sequence[int] = (2000, 8000), iterations: int = 300,
                   workers: int | None = None, seed: int = 0, mask: np.ndarray | None = None,
                   rim_mm: float = 12.0, enhancement_hu: float | None = 40.0,
                   reach_mm: float = 5.0, min_coarse_px: int = 64, min_gain: float = 0.25,
                   min_gain_through_plane: float = 0.10,
                   check_sigma_px: Sequence[float] = (2.0, 2.0, 2.0),
                   max_rotation_deg: float = 15.0, max_shift_mm: float = 20.0,
                   progress: bool = False) -> MotionResult:
    """Rigidly register every frame of a study to its first frame, keeping only clear gains.

    Each frame is fitted, then checked: the fit (or its in-plane part) replaces the identity
    only when it lowers the check metric by more than ``min_gain`` and is plausible (see the
    module notes). A still study therefore keeps its frames as they are.

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    levels : sequence of int
        Shrink factor of the finest axis at each resolution level, coarse to fine (capped by
        ``min_coarse_px``).
    samples : sequence of int
        Random metric samples per level (one per level).
    iterations : int
        Maximum optimiser iterations per level.
    workers : int, optional
        Frames registered at once (threads: SimpleITK releases the GIL); default the number of
        CPU cores. Results do not depend on it.
    seed : int
        Seed of the random sampling (>= 0); frame t samples with seed + t + 1, so every frame
        has its own fixed samples and results are reproducible.
    mask : ndarray of bool, shape (Z, Y, X), optional
        Brain of the first frame. The metric is evaluated on it grown by ``rim_mm`` (skull and
        scalp included) less the enhancing voxels; displacements are averaged over it.
        Default :func:`ctperf.masks.brain_mask` of the first frame.
    rim_mm : float
        In-plane margin around the brain included in the metric, mm.
    enhancement_hu : float or None
        Voxels whose enhancement exceeds this (HU) beyond what motion of ``reach_mm`` explains
        are left out of the metric, with a margin of ``reach_mm``; None keeps them.
    reach_mm : float
        Largest motion expected, mm (see ``enhancement_hu``).
    min_coarse_px : int
        The coarse levels keep at least this many pixels along each in-plane side.
    min_gain : float
        Relative decrease of the check metric a transform needs over the identity, in (0, 1).
    min_gain_through_plane : float
        Relative decrease the whole fit needs over its in-plane part once that is kept, in
        (0, 1).
    check_sigma_px : sequence of 3 float
        Smoothing of the check metric along x, y, z in voxels (none along a single slice).
    max_rotation_deg, max_shift_mm : float
        Largest plausible rotation about each axis (degrees) and shift (mm); a fit beyond is
        not used.
    progress : bool
        Show a progress bar.

    Returns
    -------
    MotionResult
    """
    _validate(levels, samples, rim_mm, reach_mm, min_coarse_px,
              (min_gain, min_gain_through_plane), check_sigma_px, seed)
    n = series.n_frames
    fixed = to_sitk_image(series.hu[0], series.affine)
    size = np.asarray(fixed.GetSize(), dtype=np.float64)
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    levels = _effective_levels(levels, fixed.GetSize(), min_coarse_px)
    mask = _registration_mask(series, mask)
    metric_mask = _metric_mask(series, mask, rim_mm=rim_mm, enhancement_hu=enhancement_hu,
                               reach_mm=reach_mm)
    mask_img = sitk.Cast(to_sitk_image(metric_mask.astype(np.float32), series.affine),
                         sitk.sitkUInt8)
    check = make_check(fixed, metric_mask, series.affine, center, sigma_px=check_sigma_px,
                       reach_mm=reach_mm, min_gain=min_gain,
                       min_gain_through_plane=min_gain_through_plane,
                       max_rotation_deg=max_rotation_deg, max_shift_mm=max_shift_mm,
                       bone=static_bone(series.hu, series.affine))
    fit = {"levels": list(levels), "samples": list(samples), "iterations": int(iterations),
           "center": center.tolist(), "seed": int(seed) + 1,
           "in_plane": series.shape[1] == 1}
    # BinShrink of 0/1 keeps only cells fully inside the mask
    shared = (_pyramid(fixed, levels), _pyramid(mask_img, levels), float(metric_mask.mean()))
    frames = _Frames.start(series)
    map_chunks(partial(_register_frames, series=series, shared=shared, fit=fit, check=check,
                       frames=frames), n - 1, chunk=1, workers=workers, progress=progress,
               desc="registration", unit="frame")
    params, checks, decision = frames.parameters, frames.checks, frames.decision
    points = _mask_points(series, mask)
    mean_d, max_d = frame_displacement(params, center, points)
    missed = np.array([d == "uncorrected" for d in decision])
    uncorrected = np.where(missed, frame_displacement(frames.fitted, center, points)[0], 0.0)
    log.info("motion: %d of %d frames moved, max mean displacement %.2f mm (frame %d)",
             sum(d in ("in-plane", "rigid") for d in decision), n - 1, mean_d.max(),
             int(mean_d.argmax()))
    if missed.any():
        log.warning("motion: %d frames moved by up to %.1f mm (frame %d) and were not "
                    "corrected: their fit is beyond the plausible %g deg / %g mm; maps made "
                    "from them carry the flag motion_uncorrected",
                    int(missed.sum()), uncorrected.max(), int(uncorrected.argmax()),
                    max_rotation_deg, max_shift_mm)
    meta = dict(series.meta)
    meta["motion_corrected"] = True
    return MotionResult(series=series.replace(hu=frames.hu, meta=meta), parameters=params,
                        center_mm=center, displacement_mm=mean_d, max_displacement_mm=max_d,
                        metric=frames.metric, fitted_parameters=frames.fitted,
                        decision=tuple(decision), check_identity=checks[:, 0],
                        check_in_plane=checks[:, 1], check_fitted=checks[:, 2],
                        min_gain=float(min_gain),
                        min_gain_through_plane=float(min_gain_through_plane),
                        uncorrected_mm=uncorrected)


def _validate(levels: Sequence[int], samples: Sequence[int], rim_mm: float,
              reach_mm: float, min_coarse_px: int, gains: tuple[float, float],
              check_sigma_px: Sequence[float], seed: int) -> None:
    if len(levels) != len(samples) or not levels:
        raise ValidationError(f"levels {tuple(levels)} and samples {tuple(samples)} must be "
                              "non-empty and of equal length (one sample count per level)")
    if not (rim_mm >= 0 and reach_mm > 0 and min_coarse_px >= 1):
        raise ValidationError(f"rim_mm must be >= 0, reach_mm > 0 and min_coarse_px >= 1; got "
                              f"{rim_mm}, {reach_mm} and {min_coarse_px}")
    if not all(0.0 < g < 1.0 for g in gains):
        raise ValidationError(f"min_gain and min_gain_through_plane must lie in (0, 1), got "
                              f"{gains[0]} and {gains[1]}")
    if len(check_sigma_px) != 3 or min(check_sigma_px) < 0:
        raise ValidationError(f"check_sigma_px must be 3 sigmas >= 0 (x, y, z voxels), got "
                              f"{tuple(check_sigma_px)}")
    if seed < 0:
        raise ValidationError(f"seed must be >= 0, got {seed}")


def _metric_mask(series: CTPSeries, mask: np.ndarray, *, rim_mm: float,
                 enhancement_hu: float | None, reach_mm: float) -> np.ndarray:
    """The metric's voxels: the brain grown by ``rim_mm`` less the enhancing voxels."""
    metric_mask = _head_region(mask, series.spacing, rim_mm).copy()  # never the caller's
    if enhancement_hu is not None and series.n_frames > 1:
        enhancing = _enhancing(series.hu, series.spacing, reach_mm=reach_mm,
                               threshold_hu=enhancement_hu)
        log.debug("metric mask: %d voxels, %d enhancing left out", metric_mask.sum(),
                  (metric_mask & enhancing).sum())
        if (metric_mask & ~enhancing).sum() >= 1000:
            metric_mask &= ~enhancing
    return metric_mask
