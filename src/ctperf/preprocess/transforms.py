"""Rigid transforms of a study's frames: SimpleITK images and transforms, displacement, resampling,
and the check that decides whether a fitted transform is kept (see :mod:`.registration`).

A frame's transform follows ITK: it maps a point of the first frame (patient mm, in the frame of
the series' affine) to the same anatomy in that frame. Parameters are (rx, ry, rz) in degrees
and (tx, ty, tz) in mm, rotating about a centre in mm.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ctperf.errors import ValidationError
from ctperf.masks import BONE_HU, SOFT_TISSUE_MAX_HU
from ctperf.parallel import usable_cores
from ctperf.types import CTPSeries

__all__ = ["BONE_FILL_HU", "THROUGH_PLANE", "FrameCheck", "StaticBone", "apply_transforms",
           "choose_transform", "fill_bone", "frame_displacement", "make_check", "make_transform",
           "resample_frame", "static_bone", "to_sitk_image"]

log = logging.getLogger(__name__)

#: Parameters (rx, ry, tz) that a single slice cannot fix; zero in the in-plane candidate.
THROUGH_PLANE = [0, 1, 5]

#: Where a bone voxel has no soft tissue within a few voxels in its slice (inside the skull's
#: tables), it reads this while the frame is resampled (HU): between CSF and brain.
BONE_FILL_HU = 20.0
#: Tissue that fills the bone lies above this (HU): fat and everything denser, not air.
_FILL_MIN_HU = -100.0
#: A moved frame's voxel is bone while it is resampled if the first frame's bone, read there by
#: the inverse transform, covers this share of it: a quarter, so that a voxel only partly bone
#: is filled too.
_BONE_WEIGHT = 0.25
#: A resampled voxel within this reach (slices, rows, columns) of the first frame's bone or air
#: is read by linear interpolation; elsewhere by cubic B-spline, which keeps a small artery's
#: peak (linear interpolation halfway between voxels averages it with the tissue beside it)
#: but would ring next to the skull's remaining edge and the air.
_EDGE_REACH = (1, 2, 2)


def to_sitk_image(volume: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A (Z, Y, X) array as a SimpleITK image with spacing, origin and direction from ``affine``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(a[:3, 3].tolist())
    img.SetDirection((a[:3, :3] / spacing).ravel().tolist())
    return img


def make_transform(parameters: Sequence[float] | np.ndarray,
                   center_mm: Sequence[float] | np.ndarray) -> sitk.Euler3DTransform:
    """Euler3DTransform from (rx, ry, rz) degrees, (tx, ty, tz) mm and a centre in mm."""
    p = np.asarray(parameters, dtype=np.float64)
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(c) for c in center_mm])
    tx.SetParameters([*np.deg2rad(p[:3]).tolist(), *p[3:].tolist()])
    return tx


def frame_displacement(parameters: np.ndarray, center_mm: np.ndarray,
                       points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max displacement |T(x) - x| in mm over points, for each frame.

    Parameters
    ----------
    parameters : ndarray, shape (T, 6)
        Rotations in degrees, shifts in mm.
    center_mm : ndarray, shape (3,)
    points_mm : ndarray, shape (N, 3)
        Points in patient mm (e.g. the brain's voxel centres).

    Returns
    -------
    mean, max : ndarray, float64, shape (T,)
    """
    params = np.atleast_2d(np.asarray(parameters, dtype=np.float64))
    pts = np.asarray(points_mm, dtype=np.float64) - np.asarray(center_mm, dtype=np.float64)
    means = np.zeros(len(params))
    maxes = np.zeros(len(params))
    for i, p in enumerate(params):
        tx = make_transform(p, np.zeros(3))
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        d = pts @ (m - np.eye(3)).T + p[3:]
        norm = np.linalg.norm(d, axis=1)
        means[i], maxes[i] = (norm.mean(), norm.max()) if norm.size else (0.0, 0.0)
    return means, maxes


@dataclass(frozen=True, eq=False)
class StaticBone:
    """The first frame's bone, which a moved frame's resampling takes from there (read only).

    Bone does not enhance, so the first frame holds what every frame has there. Read by linear
    interpolation, a moved frame's skull (1,000-2,000 HU) leaks into the brain voxels next to
    it: a voxel a tenth of a voxel off the inner table takes in 100 HU or more in every moved
    frame, which tissue curves read as late enhancement (long Tmax at the brain's edge) or as
    a lower baseline. :func:`resample_frame` therefore reads a moved frame with its bone filled
    in from the soft tissue next to it (:func:`fill_bone`) and adds back what the first frame
    has there above its own fill.
    """

    mask: sitk.Image  # the first frame's bone, 0/1 float32, on the study's grid
    excess: np.ndarray  # (Z, Y, X) float32: the first frame less its fill (0 off the bone)
    voxels: int  # voxels of bone
    near_edges: np.ndarray  # (Z, Y, X) bool: within _EDGE_REACH of bone or air, read linearly


def fill_bone(volume: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """``volume`` (Z, Y, X) with its ``bone`` voxels filled in from the soft tissue around them.

    Each bone voxel takes the Gaussian-weighted mean (sigma one voxel, in plane) of the soft
    tissue around it (not bone, and above :data:`_FILL_MIN_HU`: air next to the skull, in the
    sinuses and mastoid cells, never fills it); one with none within reach (inside the skull's
    tables) takes :data:`BONE_FILL_HU`. The fill meets the tissue without a step, whether the
    skull's edge is sharp (a voxel partly bone next to CSF) or blurred over several voxels, so
    linear interpolation across it mixes tissue with tissue-like values.
    """
    from scipy import ndimage

    source = ~bone & (volume > _FILL_MIN_HU)
    soft = source.astype(np.float32)
    sigma = (0.0, 1.0, 1.0)
    num = ndimage.gaussian_filter(np.where(source, volume, np.float32(0.0)), sigma,
                                  truncate=3.0)
    den = ndimage.gaussian_filter(soft, sigma, truncate=3.0)
    reached = den > 1e-3
    fill = np.where(reached, num / np.where(reached, den, 1.0), np.float32(BONE_FILL_HU))
    return np.where(bone, fill, volume).astype(np.float32, copy=False)


def static_bone(hu: np.ndarray, affine: np.ndarray) -> StaticBone:
    """The first frame's bone, with its partial volume, from a study (T, Z, Y, X) in HU (or from
    one frame (Z, Y, X)).

    Bone is what reads :data:`~ctperf.masks.SOFT_TISSUE_MAX_HU` or more in the first frame and
    in at least half of the frames, next to (within one voxel of) a voxel that reads
    :data:`~ctperf.masks.BONE_HU` or more there and in at least half of the frames: noise in
    the brain is never bone, nor an artery that a late start caught full of contrast, even in
    its canal.
    """
    from scipy import ndimage

    hu = np.asarray(hu)
    frames = hu if hu.ndim == 4 else hu[None]
    ref = np.asarray(frames[0], dtype=np.float32)
    dense, steady = np.zeros((2, *ref.shape), dtype=np.int32)
    for frame in frames:
        dense += frame >= SOFT_TISSUE_MAX_HU
        steady += frame >= BONE_HU
    half = (len(frames) + 1) // 2
    bone = ((ref >= SOFT_TISSUE_MAX_HU) & (dense >= half)
            & ndimage.binary_dilation((ref >= BONE_HU) & (steady >= half),
                                      np.ones((3, 3, 3), dtype=bool)))
    # the edges as the first frame has them: bone by that frame alone (a head that moved for
    # good after it keeps its skull's edge there in few frames), and air
    edges = (ref >= SOFT_TISSUE_MAX_HU) | (ref < _FILL_MIN_HU)
    near = ndimage.binary_dilation(edges, np.ones([2 * r + 1 for r in _EDGE_REACH], dtype=bool))
    return StaticBone(mask=to_sitk_image(bone.astype(np.float32), affine),
                      excess=ref - fill_bone(ref, bone), voxels=int(bone.sum()),
                      near_edges=near)


def _resample(moving_img: sitk.Image, tx: sitk.Transform, workers: int,
              interpolator: int = sitk.sitkLinear) -> np.ndarray:
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(workers)
    resampler.SetReferenceImage(moving_img)
    resampler.SetTransform(tx)
    resampler.SetInterpolator(interpolator)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(moving_img)).astype(np.float32, copy=False)


def resample_frame(moving_img: sitk.Image, tx: sitk.Transform, workers: int,
                   bone: StaticBone | None = None) -> np.ndarray:
    """The moving frame on its own grid, read at T(x), nearest beyond the slab; ``workers``
    ITK threads.

    Without ``bone``, by linear interpolation (how the registration compares candidates).
    With ``bone`` (the first frame's, :func:`static_bone`), the frame's bone (the first frame's
    moved to this frame by the inverse transform) is filled in from the tissue around it
    (:func:`fill_bone`) before it is read, and the first frame's bone added back after: the
    bone is the first frame's, and what leaks from it is tissue (:class:`StaticBone`). The
    frame is then read by cubic B-spline, which keeps the peak of an artery a few voxels
    wide, except near the first frame's bone and air (:data:`_EDGE_REACH`), read linearly, as
    is a study of two slices.
    """
    if bone is None:
        return _resample(moving_img, tx, workers)
    source = moving_img
    if bone.voxels:
        try:
            inverse = tx.GetInverse()
        except RuntimeError:  # a B-spline or displacement field without an inverse
            log.warning("resample_frame: the transform has no inverse to move the first "
                        "frame's bone with; the frame is read plainly, and the skull's edge "
                        "leaks into the brain next to it")
            return _resample(moving_img, tx, workers)
        here = _resample(bone.mask, inverse, workers) >= _BONE_WEIGHT
        frame = sitk.GetArrayFromImage(moving_img).astype(np.float32, copy=False)
        source = sitk.GetImageFromArray(fill_bone(frame, here))
        source.CopyInformation(moving_img)
    if source.GetSize()[2] == 2:
        # SimpleITK's B-spline reads a study of two slices from outside it at random (NaN,
        # infinities or 1e38 in whole rows); one slice, or three and more, it reads right
        return _resample(source, tx, workers) + bone.excess
    out = _resample(source, tx, workers, sitk.sitkBSpline)
    near = bone.near_edges | ~np.isfinite(out)
    if near.any():
        out = np.where(near, _resample(source, tx, workers), out)
    return out + bone.excess


def apply_transforms(series: CTPSeries, transforms: Sequence[sitk.Transform | None], *,
                     workers: int | None = None) -> CTPSeries:
    """Bring every frame back onto the first frame's grid with known transforms.

    The resampling :func:`correct_motion` ends with, for transforms found elsewhere: saved
    ones (``MotionResult.transforms``), or a phantom's true motion. Read as
    :func:`resample_frame` reads it (cubic B-spline, linear near bone and air);
    points that left the slab take the nearest slice; the bone of every resampled frame is the
    first frame's (:class:`StaticBone`).

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    transforms : sequence of SimpleITK transforms or None, one per frame
        Each maps a point of the first frame (patient mm, in the frame of the series' affine)
        to the same anatomy in that frame; None or the identity leaves the frame as it is.
        A transform without an inverse (a B-spline) is applied with the frame read plainly.
    workers : int, optional
        Threads of the resampler; default the number of CPU cores.

    Returns
    -------
    CTPSeries
        Same grid, times and metadata, ``meta["motion_corrected"]`` set.
    """
    if len(transforms) != series.n_frames:
        raise ValidationError(f"{len(transforms)} transforms for {series.n_frames} frames")
    workers = int(workers or usable_cores())
    out = series.hu.copy()
    corners = [tuple(series.affine[:3, :3] @ ijk + series.affine[:3, 3])
               for ijk in itertools.product(*[(0, n - 1) for n in series.shape[:0:-1]])]
    # a frame kept at the identity is left as it is, as correct_motion leaves it (a linear
    # transform that keeps the corners keeps every point)
    moved = [(t, tx) for t, tx in enumerate(transforms) if tx is not None and not (
        tx.IsLinear() and all(np.allclose(tx.TransformPoint(c), c, atol=1e-6) for c in corners))]
    bone = static_bone(series.hu, series.affine) if moved else None
    for t, tx in moved:
        out[t] = resample_frame(to_sitk_image(series.hu[t], series.affine), tx, workers,
                                bone=bone)
    meta = dict(series.meta)
    meta["motion_corrected"] = True
    return series.replace(hu=out, meta=meta)


@dataclass(frozen=True, eq=False)
class FrameCheck:
    """What the check of every frame shares (read only, so threads can share it)."""

    index: tuple[np.ndarray, ...]  # (Z, Y, X) indices of the check voxels, each shape (N,)
    points_mm: np.ndarray  # (N, 3) their patient mm
    fixed: np.ndarray  # (N,) the smoothed first frame there
    sigma_zyx: tuple[float, float, float]  # smoothing Gaussian along z, y, x in voxels
    world_to_index: np.ndarray  # (4, 4) patient mm -> continuous (x, y, z) index
    size_xyz: np.ndarray  # (3,)
    center_mm: np.ndarray  # (3,)
    block: np.ndarray  # (N,) in-plane block of each voxel, for the gain's standard error
    reach_max: np.ndarray  # (Z, Y, X) smoothed first frame's maximum within reach
    reach_size: tuple[int, int, int]  # the reach as a (Z, Y, X) box of voxels
    bone: StaticBone  # the first frame's bone, which the kept transform's frame takes
    min_gain: float
    min_gain_through_plane: float
    max_rotation_deg: float
    max_shift_mm: float


#: A candidate's gain must also exceed this many standard errors of the gain (sampling noise)...
_MIN_Z = 3.0
#: ... unless it takes away this share of the check metric or more: far beyond what
#: interpolation takes from noise (4.5 % at most), and a head moved by millimetres gains most at
#: the skull, in a few blocks, where the standard error is largest (a 64 px, 3-slice phantom
#: moved 4 mm: 97 % of the metric gained at 2.8 standard errors, and the frame was kept as it
#: was, unflagged).
_CLEAR_GAIN = 0.5

#: A voxel brighter than the first frame anywhere within reach by this many noise SDs (and at
#: least _ENHANCED_HU) has taken up contrast in this frame and is left out of its check.
_ENHANCED_SD, _ENHANCED_HU = 5.0, 5.0


def _smooth(volume: np.ndarray, sigma_zyx: Sequence[float]) -> np.ndarray:
    """The volume (Z, Y, X) smoothed by a Gaussian of the given sigmas in voxels, float32."""
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), list(sigma_zyx),
                                   truncate=3.0, mode="nearest")


def make_check(fixed: sitk.Image, metric_mask: np.ndarray, affine: np.ndarray,
               center: np.ndarray, *, sigma_px: Sequence[float], reach_mm: float,
               min_gain: float, min_gain_through_plane: float, max_rotation_deg: float,
               max_shift_mm: float, bone: StaticBone) -> FrameCheck:
    """What :func:`choose_transform` needs for every frame of a study.

    Parameters
    ----------
    fixed : SimpleITK image
        The first frame.
    metric_mask : ndarray of bool, shape (Z, Y, X)
        Voxels of the registration metric; the check uses at most ~200,000 of them, evenly
        strided.
    affine : ndarray, shape (4, 4)
        Voxel (x, y, z) index -> patient mm.
    center : ndarray, shape (3,)
        Centre of rotation, mm.
    sigma_px : sequence of 3 float
        Smoothing sigma along x, y, z in voxels (none along an axis of one voxel).
    reach_mm : float
        Largest motion expected (mm): a frame brighter than the first frame anywhere within
        reach has taken up contrast there, which motion cannot explain.
    min_gain : float
        Relative decrease of the check metric a transform needs over the identity.
    min_gain_through_plane : float
        Relative decrease the whole fit needs over its in-plane part, once that is kept.
    max_rotation_deg, max_shift_mm : float
        Plausible rotation about each axis (degrees) and shift (mm).
    bone : StaticBone
        The first frame's bone (:func:`static_bone`), which the kept transform's frame takes.
    """
    spacing = np.asarray(fixed.GetSpacing())
    size = np.asarray(fixed.GetSize())
    # no smoothing along an axis of one voxel (a single slice)
    sigma = tuple(float(s) if n > 1 else 0.0 for s, n in zip(sigma_px, size, strict=True))[::-1]
    zyx = np.argwhere(metric_mask)
    zyx = zyx[:: max(1, len(zyx) // 200_000)]
    index = tuple(zyx.T)
    points = (np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ np.asarray(affine).T)[:, :3]
    from scipy import ndimage

    smoothed = _smooth(sitk.GetArrayViewFromImage(fixed), sigma)
    ref = smoothed[index].astype(np.float64)
    n = max(1, round(reach_mm / float(min(spacing[:2]))))
    reach = (3, 2 * n + 1, 2 * n + 1)
    # blocks of 8 smoothing sigmas in plane, one slice deep: nearly independent noise
    side = max(4, round(8 * max(sigma_px[:2])))
    nb_y, nb_x = (-(-np.asarray(metric_mask.shape[1:]) // side)).tolist()
    block = (zyx[:, 0] * nb_y + zyx[:, 1] // side) * nb_x + zyx[:, 2] // side
    return FrameCheck(index=index, points_mm=points, fixed=ref,
                      sigma_zyx=sigma,  # type: ignore[arg-type]
                      world_to_index=np.linalg.inv(affine), size_xyz=size, center_mm=center,
                      block=np.unique(block, return_inverse=True)[1],
                      reach_max=ndimage.maximum_filter(smoothed, size=reach), reach_size=reach,
                      bone=bone,
                      min_gain=min_gain, min_gain_through_plane=min_gain_through_plane,
                      max_rotation_deg=max_rotation_deg, max_shift_mm=max_shift_mm)


def _inside(check: FrameCheck, params: np.ndarray) -> np.ndarray:
    """Check voxels whose transformed position lies inside the volume (bool (N,))."""
    tx = make_transform(params, check.center_mm)
    rot = np.asarray(tx.GetMatrix()).reshape(3, 3)
    # point -> moved point -> continuous index, as one affine map
    w = check.world_to_index
    lin = w[:3, :3] @ rot
    off = w[:3, :3] @ (check.center_mm + params[3:] - rot @ check.center_mm) + w[:3, 3]
    ijk = check.points_mm @ lin.T + off
    pad = np.where(check.size_xyz == 1, 0.5, 1e-6)
    return np.all((ijk >= -pad) & (ijk <= check.size_xyz - 1 + pad), axis=1)


def _enhanced(check: FrameCheck, smoothed: np.ndarray) -> np.ndarray:
    """Check voxels near where this frame took up contrast (bool (N,)).

    The smoothed frame is compared with the smoothed first frame's maximum within reach:
    motion within reach cannot exceed it, contrast can. The excess must pass five noise SDs
    (from the median absolute frame difference over the check voxels) and 5 HU; the set is
    grown by the reach, since a candidate transform reads the frame up to that far away.
    """
    from scipy import ndimage

    diff = smoothed[check.index] - check.fixed
    sd = 1.4826 * float(np.median(np.abs(diff - np.median(diff))))
    excess = smoothed - check.reach_max
    threshold = max(_ENHANCED_HU, _ENHANCED_SD * sd)
    grown = ndimage.maximum_filter(excess > threshold, size=check.reach_size)
    return grown[check.index]


def _plausible(check: FrameCheck, params: np.ndarray) -> bool:
    return bool(np.all(np.abs(params[:3]) <= check.max_rotation_deg)
                and np.linalg.norm(params[3:]) <= check.max_shift_mm)


def choose_transform(check: FrameCheck, moving_img: sitk.Image, fitted: np.ndarray,
                     workers: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Keep the identity, the fit's in-plane part or the whole fit for one frame.

    Simplest first, a plausible candidate replaces the one kept so far only if it lowers the
    check metric (mean squared difference of the smoothed frames over the same voxels) by more
    than ``check.min_gain`` of it (``check.min_gain_through_plane`` from the in-plane part to
    the whole fit) and by more than three standard errors of the gain.

    Parameters
    ----------
    check : FrameCheck
        From :func:`make_check`.
    moving_img : SimpleITK image
        The frame.
    fitted : ndarray, shape (6,)
        The registration's parameters (degrees, mm).
    workers : int
        Threads of the resampling filter.

    Returns
    -------
    decision : str
        "identity", "in-plane" or "rigid"; "uncorrected" where the identity is kept although a
        fit beyond the plausible range lowers the check metric as clearly as a kept transform
        must (``check.min_gain`` and three standard errors): the frame moved, and the motion
        was not corrected.
    parameters : ndarray, float64, shape (6,)
        The parameters kept (zeros for the identity).
    frame : ndarray, float32, shape (Z, Y, X)
        The frame read at them, its bone the first frame's (:class:`StaticBone`); the
        candidates are compared as read plainly, since the skull is what places them.
    check_values : ndarray, float64, shape (3,)
        Check metric (HU^2) at the identity, the in-plane part and the whole fit; NaN for an
        implausible candidate.
    """
    in_plane = fitted.copy()
    in_plane[THROUGH_PLANE] = 0.0
    through = bool(np.any(fitted[THROUGH_PLANE] != 0.0))
    candidates = [(name, p, _plausible(check, p))
                  for name, p in [("in-plane", in_plane), ("rigid", fitted)]
                  if through or name == "in-plane"]
    frame = sitk.GetArrayFromImage(moving_img)
    smoothed = _smooth(frame, check.sigma_zyx)
    valid = ~_enhanced(check, smoothed)
    for _, p, plausible in candidates:
        if plausible:
            valid &= _inside(check, p)
    ref, block = check.fixed[valid], check.block[valid]

    def squares(smooth: np.ndarray) -> np.ndarray:
        return (smooth[check.index][valid].astype(np.float64) - ref) ** 2

    best = still = squares(smoothed)
    values = {"identity": float(best.mean()) if best.size else np.nan,
              "in-plane": np.nan, "rigid": np.nan}
    decision, kept, missed = "identity", np.zeros(6), False
    for name, p, plausible in candidates:
        moved = resample_frame(moving_img, make_transform(p, check.center_mm), workers)
        sq = squares(_smooth(moved, check.sigma_zyx))
        if not plausible:
            # beyond the plausible range: never applied, but a frame it fits as clearly as a
            # kept transform must have moved
            gain, se = _mean_and_se(still - sq, block)
            missed |= _clear(gain, se, check.min_gain, values["identity"])
            continue
        values[name] = float(sq.mean()) if sq.size else np.nan
        gain, se = _mean_and_se(best - sq, block)
        log.debug("%s: gain %.3g HU^2 of %.3g, standard error %.3g", name, gain,
                  values[decision], se)
        # a simpler candidate stands unless this one clearly beats it (NaN never does)
        needed = check.min_gain if decision == "identity" else check.min_gain_through_plane
        if _clear(gain, se, needed, values[decision]):
            decision, kept, frame, best = name, p, moved, sq
    if decision == "identity" and missed:
        decision = "uncorrected"
    if decision in ("in-plane", "rigid"):
        frame = resample_frame(moving_img, make_transform(kept, check.center_mm), workers,
                               bone=check.bone)
    if not through:
        values["rigid"] = values["in-plane"]  # the fit has no through-plane part
    checks = np.array([values["identity"], values["in-plane"], values["rigid"]])
    return decision, kept, frame.astype(np.float32, copy=False), checks


def _clear(gain: float, se: float, needed: float, metric: float) -> bool:
    """Whether a candidate's gain over the check ``metric`` is clear: more than ``needed`` of
    it and more than :data:`_MIN_Z` standard errors, or :data:`_CLEAR_GAIN` of it or more
    (False for NaN)."""
    return bool(gain > needed * metric and (gain > _MIN_Z * se or gain >= _CLEAR_GAIN * metric))


def _mean_and_se(x: np.ndarray, block: np.ndarray) -> tuple[float, float]:
    """Mean of x (N,) and its standard error from block sums (spatially correlated x)."""
    if x.size == 0:
        return np.nan, np.nan
    n = np.bincount(block, minlength=1).astype(np.float64)
    sums = np.bincount(block, weights=x, minlength=1)
    keep = n > 0
    n, sums = n[keep], sums[keep]
    mean = float(sums.sum() / n.sum())
    k = len(n)
    if k < 2:
        return mean, np.inf
    var = k / (k - 1) * np.sum((sums - mean * n) ** 2) / n.sum() ** 2
    return mean, float(np.sqrt(var))
