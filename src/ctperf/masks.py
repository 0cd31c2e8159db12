"""Brain mask of a CT perfusion study by attenuation thresholds and morphology.

Skull stripping on non-contrast-like CT: the temporal mean of the series (or a given 3D volume) is
smoothed in-plane, soft tissue is kept between an air and a bone threshold, a margin around the
bone is removed, thin bridges to the scalp are cut by an erosion, the largest connected component
is kept (every component where there is no skull: a skull-stripped study) and grown back, holes
are filled slice by slice and, optionally, cerebrospinal fluid is removed. A study's padding
(:func:`padding_mask`) is read as air. Everything is :mod:`scipy.ndimage` on whole volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from scipy import ndimage

from ctperf.errors import ValidationError
from ctperf.types import CTPSeries

__all__ = [
    "AIR_HU",
    "AIR_TOLERANCE_HU",
    "BONE_HU",
    "EXPOSED_MM",
    "HYPERDENSE_HU",
    "HYPERDENSE_MAX_HU",
    "HYPERDENSE_MIN_ML",
    "IN_RANGE_AIR_TOLERANCE_HU",
    "IN_RANGE_BRAIN_OFF_HU",
    "NOMINAL_CSF_HU",
    "NOMINAL_PARENCHYMA_HU",
    "PARENCHYMA_HU",
    "SKULL_SHARE",
    "SOFT_TISSUE_MAX_HU",
    "STILL_HU",
    "air_level",
    "as_air",
    "as_region",
    "brain_mask",
    "csf_mask",
    "exposed_share",
    "fill_holes_in_plane",
    "first_frame_as_air",
    "hu_offset",
    "hyperdense_mask",
    "near_bone",
    "offset_said_once",
    "padding_mask",
    "skull_present",
    "skull_share",
    "tissue_csf_midpoint",
]

log = logging.getLogger(__name__)

# What :func:`hu_offset` has said inside :func:`offset_said_once` (None: outside, say all).
_SAID: ContextVar[set[str] | None] = ContextVar("ctperf_hu_offset_said", default=None)


@contextmanager
def offset_said_once() -> Iterator[None]:
    """Inside the block (and blocks nested in it), each of :func:`hu_offset`'s warnings is
    logged once: a step that reads a study's HU scale several times (its scan-start check, its
    arrival, its motion, its input) says its offset once."""
    token = _SAID.set(set()) if _SAID.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _SAID.reset(token)


def _say(text: str) -> None:
    said = _SAID.get()
    if said is not None:
        if text in said:
            return
        said.add(text)
    log.warning("%s", text)

#: Below this a voxel of an unenhanced head is air (or padding), above :data:`BONE_HU` bone.
AIR_HU = -500.0
BONE_HU = 300.0
#: Soft tissue's upper bound in :func:`brain_mask` (bone and its partial volume above).
SOFT_TISSUE_MAX_HU = 120.0

#: Median HU of an unenhanced adult brain (grey and white matter, some CSF) that a calibrated
#: scanner can read at 70-140 kV: white matter 22-32 HU, grey matter 32-45 HU.
PARENCHYMA_HU: tuple[float, float] = (18.0, 50.0)
#: Where a study whose brain reads outside :data:`PARENCHYMA_HU` is moved to (80 kV).
NOMINAL_PARENCHYMA_HU = 32.0
#: CSF's level (HU) where a study shows too little of it to read (water is 0; CSF 5-15 HU).
NOMINAL_CSF_HU = 8.0

# Connectivity in-plane only (for hole filling slice by slice).
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _as_volume(
    series_or_volume: CTPSeries | np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    if isinstance(series_or_volume, CTPSeries):
        hu = series_or_volume.hu
        vol = as_air(hu.mean(axis=0, dtype=np.float64).astype(np.float32), padding_mask(hu))
        sp = series_or_volume.spacing if spacing is None else tuple(spacing)
    else:
        vol = np.asarray(series_or_volume, dtype=np.float32)
        if vol.ndim == 4:
            vol = as_air(vol.mean(axis=0, dtype=np.float64).astype(np.float32),
                         padding_mask(vol))
        sp = (1.0, 1.0, 1.0) if spacing is None else tuple(spacing)
    if vol.ndim != 3:
        raise ValidationError(
            f"brain_mask needs a CTPSeries, a (T, Z, Y, X) or a (Z, Y, X) array, got shape "
            f"{vol.shape}"
        )
    if len(sp) != 3 or not all(float(s) > 0 for s in sp):
        raise ValidationError(f"spacing must be three positive mm values (dz, dy, dx), got {sp}")
    if not np.all(np.isfinite(vol)):
        raise ValidationError("brain_mask: the volume contains NaN or Inf")
    dz, dy, dx = (float(s) for s in sp)
    return vol, (dz, dy, dx)


def _smooth_in_plane(vol: np.ndarray, pixel: tuple[float, float], sigma_mm: float, *,
                     skull: bool | None = None,
                     padding: np.ndarray | None = None) -> np.ndarray:
    """``vol`` (Z, Y, X) smoothed in-plane by a Gaussian of SD ``sigma_mm`` (``pixel`` (dy, dx)
    mm). In a volume with no skull (:func:`skull_present`: a skull-stripped study) air is left
    out (a normalised convolution over the voxels at or above :data:`AIR_HU`, air kept as it
    is): there the brain meets air, whose -1000 HU averaged into the cortex beside it took a
    ring of brain for air or CSF. A head's scalp meets air too, and there air averaged into
    its edge helps cut it from the brain. ``skull``: :func:`skull_present` of ``vol`` when
    the caller has it; ``padding`` (bool, or None): left out whatever the skull (outside a
    field of view that cuts the head the brain meets it with no scalp between)."""
    sigma = (0.0, sigma_mm / pixel[0], sigma_mm / pixel[1])
    solid = vol >= AIR_HU
    if solid.all() or (skull_present(vol) if skull is None else skull):
        if padding is None or not padding.any():
            return ndimage.gaussian_filter(vol, sigma=sigma)
        solid = ~padding
    weight = ndimage.gaussian_filter(solid.astype(np.float32), sigma=sigma)
    total = ndimage.gaussian_filter(np.where(solid, vol, np.float32(0.0)), sigma=sigma)
    return np.where(solid, total / np.maximum(weight, np.float32(1e-6)), vol)


def as_region(mask: object, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A mask given through the API as a bool array of ``shape``: nonzero is inside, as a mask
    file is read (nibabel gives 0/1 masks as uint8, int16 or float). Another shape, NaN or a
    non-numeric array is refused, naming ``what``: an integer AIF mask had been taken for
    indices (a 96 px study asked for 50 GiB) and a uint8 brain mask failed deep in numpy."""
    arr = np.asarray(mask)
    if arr.dtype != bool and arr.dtype.kind not in "iuf":
        raise ValidationError(f"{what} must be an array of bool (or 0/1 numbers), got dtype "
                              f"{arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValidationError(f"{what} shape {arr.shape} differs from the study grid "
                              f"{tuple(shape)} (Z, Y, X)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValidationError(f"{what} contains NaN or Inf; a mask is nonzero inside, 0 outside")
    return arr != 0


def brain_mask(
    series_or_volume: CTPSeries | np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    air_hu: float = -10.0,
    bone_hu: float = SOFT_TISSUE_MAX_HU,
    bone_margin_mm: float = 0.5,
    erode_mm: float = 2.5,
    smooth_mm: float = 1.0,
    exclude_csf: bool = False,
    csf_hu: float = 15.0,
    csf_smooth_mm: float = 1.5,
) -> np.ndarray:
    """Mask of brain (and optionally CSF-free) voxels.

    Parameters
    ----------
    series_or_volume : CTPSeries or ndarray, shape (T, Z, Y, X) or (Z, Y, X)
        A study (its temporal mean is used) or one volume in HU.
    spacing : sequence of 3 float, optional
        Voxel size (dz, dy, dx) in mm; taken from the series' affine, 1 mm for a bare array.
    air_hu, bone_hu : float
        Soft tissue lies in (air_hu, bone_hu) HU after in-plane smoothing.
    bone_margin_mm : float
        Voxels closer than this to bone are removed (partial volume at the inner table).
    erode_mm : float
        Erosion depth that cuts thin bridges between the brain and the scalp before the largest
        connected component is taken (every component without a skull); it is then grown
        back by the same depth.
    smooth_mm : float
        In-plane Gaussian sigma in mm before the air and CSF thresholds (bone is thresholded
        unsmoothed); without a skull, air is left out of it (:func:`_smooth_in_plane`).
    exclude_csf : bool
        Remove voxels below ``csf_hu`` after smoothing with ``csf_smooth_mm`` (ventricles, sulci).
    csf_hu, csf_smooth_mm : float
        CSF threshold in HU and its in-plane smoothing sigma in mm.

    Returns
    -------
    ndarray of bool, shape (Z, Y, X)
        True inside the brain. Empty when no soft tissue is found (the caller decides if that is
        an error).
    """
    vol, (dz, dy, dx) = _as_volume(series_or_volume, spacing)
    sampling = (dz, dy, dx)
    skull = skull_present(vol)
    smooth = _smooth_in_plane(vol, (dy, dx), smooth_mm, skull=skull)
    # Bone from the unsmoothed volume: smoothing would spread 1000+ HU bone millimetres inwards.
    bone = vol >= bone_hu
    if bone.any() and bone_margin_mm > 0:
        near_bone = ndimage.distance_transform_edt(~bone, sampling=sampling) <= bone_margin_mm
    else:
        near_bone = bone
    soft = (smooth > air_hu) & ~near_bone
    if not soft.any():
        log.warning("brain_mask: no voxel between %.0f and %.0f HU", air_hu, bone_hu)
        return np.zeros(vol.shape, dtype=bool)
    # In-plane erosion only: slices are thick (5 mm), a 3D erosion would eat whole slices. A huge
    # z spacing makes the Euclidean distance transform measure within each slice.
    plane = (1e6, dy, dx)
    depth = ndimage.distance_transform_edt(soft, sampling=plane) if erode_mm > 0 else None
    core = soft if depth is None else depth > erode_mm
    if not core.any():
        core = soft
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros(vol.shape, dtype=bool)
    if skull:  # the brain, not the scalp or what lies beyond the skull
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        largest = labels == int(np.argmax(sizes))
    else:  # what a mask kept (a stripped study), or a phantom's tiles and vessels: every part
        largest = core
    if depth is not None:
        grown = ndimage.distance_transform_edt(~largest, sampling=plane) <= erode_mm + 1e-6
        largest = grown & soft
    # Holes (ventricles with contrast-enhanced vessels, bone-free islands) filled slice by slice;
    # air enclosed by the brain (a mask's NaN read as air, pneumocephalus) is no brain.
    mask = fill_holes_in_plane(largest)
    mask &= ~bone & (vol >= AIR_HU)
    if exclude_csf:
        mask &= ~csf_mask(vol, spacing=sampling, csf_hu=csf_hu, smooth_mm=csf_smooth_mm)
    log.info("brain_mask: %d voxels (%.1f mL)", int(mask.sum()), mask.sum() * dz * dy * dx / 1e3)
    return mask


def hu_offset(
    volume: np.ndarray, *, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[float | None, float]:
    """The brain's median HU in an unenhanced ``volume`` (Z, Y, X) and the offset of the study's
    HU scale (0: calibrated), logged as a warning when not 0.

    Every attenuation threshold (air, CSF, bone) assumes calibrated HU; a study whose values were
    shifted (a RescaleIntercept of -1000 applied for -1024, a conversion that added an offset)
    loses its brain to the CSF threshold or keeps its CSF. A brain whose median lies outside
    :data:`PARENCHYMA_HU` raises the question; air, which a scanner calibrates to -1000 HU,
    answers it (:func:`air_level`): air read as far off in the same direction gives the offset;
    air at -1000 HU says the scale is right and the brain is unusual (atrophy, oedema), which
    is left alone. A brain inside the range is moved by the air's offset only when the air is
    :data:`IN_RANGE_AIR_TOLERANCE_HU` or more off and the brain off
    :data:`NOMINAL_PARENCHYMA_HU` by :data:`IN_RANGE_BRAIN_OFF_HU` or more and by at least
    half of the air's offset, the same way. Without air to read, the offset is the brain's
    distance from :data:`NOMINAL_PARENCHYMA_HU`. (None, 0) when no brain is found, or when
    the volume lacks the air or padding (under :data:`AIR_HU`) and bone (over
    :data:`BONE_HU`) of a head in HU: what is not a CT head is not moved into one. The brain
    is found with a low air threshold (-60 HU), on the scale the air gives when that finds
    none (a scale shifted down by more than about 80 HU).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if np.mean(vol < AIR_HU) < 0.01 or np.mean(vol > BONE_HU) < 0.002:
        return None, 0.0
    brain = brain_mask(vol, spacing=spacing, air_hu=-60.0)
    air = None
    if brain.sum() < 100:
        air = air_level(vol)
        if air is not None and abs(air + 1000.0) >= AIR_TOLERANCE_HU:
            # a scale shifted so far that the brain reads below -60 HU: looked for where the
            # air says the scale lies
            brain = brain_mask(vol - np.float32(air + 1000.0), spacing=spacing, air_hu=-60.0)
        if brain.sum() < 100:
            return None, 0.0
    level = float(np.median(vol[brain]))
    low, high = PARENCHYMA_HU
    guess = level - NOMINAL_PARENCHYMA_HU
    air = air_level(vol) if air is None else air
    if low <= level <= high:
        # a usual brain: an offset only where the air reads one beyond a calibrated scanner's
        # tolerance and the brain is far off its nominal level, by at least half of it the same
        # way (+20 HU put a 30 HU brain at 50, inside the range, and moved the CSF cut and the
        # lesions; a calibrated scan's air 9-10 HU off beside an 80 kV brain at 37-40 HU, or a
        # child's at 22-24 HU, is left alone)
        shift = None if air is None else air + 1000.0
        if (shift is None or abs(shift) < IN_RANGE_AIR_TOLERANCE_HU
                or abs(guess) < IN_RANGE_BRAIN_OFF_HU or guess / shift < 0.5):
            return level, 0.0
        _say(f"air reads {air:.0f} HU and the brain {level:.0f} HU before the bolus ({guess:+.0f} "
             f"HU from its nominal {NOMINAL_PARENCHYMA_HU:g} HU): the study's HU scale looks "
             f"offset by {shift:+.0f} HU, and is read moved back by it")
        return level, shift
    if air is not None:
        if abs(air + 1000.0) < AIR_TOLERANCE_HU or (air + 1000.0) * guess < 0:
            _say(f"the brain reads {level:.0f} HU before the bolus, outside the {low:.0f}-"
                 f"{high:.0f} HU of unenhanced brain, but air reads {air:.0f} HU: the HU scale "
                 "is taken as calibrated and the brain as unusual")
            return level, 0.0
        offset, how = air + 1000.0, f"air reads {air:.0f} HU"
    else:
        offset, how = guess, f"no air to read, {NOMINAL_PARENCHYMA_HU:g} HU taken as the brain's"
    _say(f"the brain reads {level:.0f} HU before the bolus, outside the {low:.0f}-{high:.0f} HU "
         f"of unenhanced brain, and {how}: the study's HU scale looks offset by {offset:+.0f} "
         "HU, and is read moved back by it")
    return level, offset


#: Air further than this from -1000 HU confirms an offset of the HU scale in its direction.
AIR_TOLERANCE_HU = 8.0
#: With the brain inside :data:`PARENCHYMA_HU`, the air must be this far off (beyond the
#: few HU a calibrated scanner's air may read off -1000) and the brain
#: :data:`IN_RANGE_BRAIN_OFF_HU` off its nominal level for the scale to be taken as offset.
IN_RANGE_AIR_TOLERANCE_HU = 15.0
IN_RANGE_BRAIN_OFF_HU = 10.0


def air_level(volume: np.ndarray) -> float | None:
    """Median HU of the air in ``volume``: values within 300 HU of -1000, less any single value
    that fills over 5 % of the volume (padding outside the reconstruction circle, which scanners
    store as a constant such as -1024); None when under 1 % of the volume is left."""
    vol = np.asarray(volume)
    air = vol[(vol > -1300.0) & (vol < -700.0)]
    values, counts = np.unique(air, return_counts=True)
    padding = values[counts > 0.05 * vol.size]
    if padding.size:
        air = air[~np.isin(air, padding)]
    return float(np.median(air)) if air.size >= 0.01 * vol.size else None


#: In-plane distance (mm) from air or the image's border within which a brain voxel with no
#: bone nearer is exposed: a skull and scalp keep a whole head's brain 5.7-8 mm from air in the
#: phantoms.
EXPOSED_MM = 10.0


def exposed_share(brain: np.ndarray, volume: np.ndarray, *,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float | None:
    """Share of the ``brain``'s voxels nearer (in plane, within :data:`EXPOSED_MM`) to air,
    padding or the image's border than to bone in an unenhanced ``volume`` (Z, Y, X) in HU:
    where the field of view cuts the head, the brain meets its edge with no skull between.
    None for an empty brain, and for a volume with no skull (:func:`skull_present`): a
    skull-stripped study, whose whole brain meets air by design."""
    n = int(np.count_nonzero(brain))
    if n == 0 or not skull_present(volume):
        return None
    outside = np.asarray(volume) < AIR_HU
    outside[:, [0, -1], :] = True
    outside[:, :, [0, -1]] = True
    # only air joined in-plane to the image's border: a pocket inside the head (air after
    # surgery, a voxel read as air) cuts no field of view (a probe's one NaN voxel had)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(outside, structure=in_plane)
    border = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0])
    plane = (1e6, float(spacing[1]), float(spacing[2]))
    to_edge = ndimage.distance_transform_edt(~outside, sampling=plane)
    bone = np.asarray(volume) > BONE_HU
    to_bone = (ndimage.distance_transform_edt(~bone, sampling=plane) if bone.any()
               else np.full(bone.shape, np.inf))
    return int(np.count_nonzero(brain & (to_edge <= EXPOSED_MM) & (to_edge < to_bone))) / n


#: A volume with less than this share of its voxels above :data:`BONE_HU` has no skull (a
#: skull-stripped study); a slab of 8 slices over the vertex holds a few per cent.
SKULL_SHARE = 0.005


def skull_share(volume: np.ndarray) -> float:
    """Share of an unenhanced ``volume``'s (HU) voxels above :data:`BONE_HU`."""
    return float(np.mean(np.asarray(volume) > BONE_HU))


def skull_present(volume: np.ndarray) -> bool:
    """Whether an unenhanced ``volume`` (HU) holds a skull: at least :data:`SKULL_SHARE` of
    its voxels above :data:`BONE_HU` (:func:`skull_share`)."""
    return skull_share(volume) >= SKULL_SHARE


#: A voxel whose value changes by no more than this (HU) over the frames holds no CT noise.
STILL_HU = 1e-3


def padding_mask(hu: np.ndarray) -> np.ndarray | None:
    """What a study (T, Z, Y, X) in HU holds of padding, bool (Z, Y, X), or None for none: the
    voxels whose value never changes over the frames (:data:`STILL_HU`: no CT noise) and lies
    below CSF's 15 HU, joined in-plane to the image's border. Padding is what a pipeline left
    outside a mask or the matrix (0 HU around a skull-stripped brain or a padded image, -1024
    or -2048 outside the field of view); stored as 0 HU it passes for soft tissue. A
    noise-free phantom's still tissue and CSF lie above 15 HU or within its skull, and are not
    padding."""
    x = np.asarray(hu)
    low = x.min(axis=0)
    still = (x.max(axis=0) - low <= STILL_HU) & (low < 15.0)
    if not still.any():
        return None
    labels, _ = ndimage.label(still, structure=_PLANE)
    edge = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(),
                                     labels[:, :, [0, -1]].ravel()]))
    padding = np.isin(labels, edge[edge > 0])
    return padding if padding.any() else None


def as_air(volume: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """``volume`` (Z, Y, X) with its ``padding`` voxels (:func:`padding_mask`) set to air,
    -1000 HU."""
    return volume if padding is None else np.where(padding, np.float32(-1000.0), volume)


def first_frame_as_air(hu: np.ndarray) -> np.ndarray:
    """A study's (T, Z, Y, X) first frame with its padding (:func:`padding_mask`) read as air:
    the unenhanced volume the HU scale and a brain are read from."""
    return as_air(np.asarray(hu)[0], padding_mask(hu))


def fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """``mask`` (Z, Y, X) with what it encloses in each slice filled in."""
    return ndimage.binary_fill_holes(mask, structure=_PLANE)


def csf_mask(
    volume: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    csf_hu: float = 15.0,
    smooth_mm: float = 1.5,
    padding: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels below ``csf_hu`` after in-plane Gaussian smoothing (CSF, air), bool (Z, Y, X).

    The smoothing leaves air out in a skull-stripped study, and ``padding``
    (:func:`padding_mask`) in any (:func:`_smooth_in_plane`): averaged in, the padding outside
    a field of view that cuts the head took the brain within about 3.5 mm of it for CSF, and
    with it that brain's lesions.

    Parameters
    ----------
    volume : ndarray, shape (Z, Y, X)
        HU (e.g. the pre-contrast mean of a study).
    spacing : (dz, dy, dx) mm
    csf_hu, smooth_mm : float
        Threshold in HU and smoothing sigma in mm.
    padding : ndarray of bool, shape (Z, Y, X), optional
        :func:`padding_mask` of the study.
    """
    _, dy, dx = (float(v) for v in spacing)
    vol = np.asarray(volume, dtype=np.float32)
    return _smooth_in_plane(vol, (dy, dx), smooth_mm, padding=padding) < csf_hu


def tissue_csf_midpoint(
    mean: np.ndarray,
    brain: np.ndarray,
    csf: np.ndarray,
    *,
    csf_hu: float = 15.0,
    min_gap_hu: float = 10.0,
    min_voxels: int = 20,
) -> float | None:
    """HU halfway between the study's CSF and its tissue in ``mean`` (Z, Y, X), or None.

    :func:`csf_mask` smooths before it thresholds, so CSF narrower than its smoothing (sulci, the
    rim of the ventricles) stays in the brain, where it has no flow to measure. A voxel's own
    temporal mean over the whole study is precise enough to test it alone (89 frames average the
    noise down ninefold), and CSF does not enhance while tissue does: a voxel darker than the
    midpoint of the CSF's median (``brain & csf``) and the tissue's (``brain & ~csf``) is more
    CSF than tissue. The CSF's median is taken as at most ``csf_hu``, the threshold that found
    it: above it, its voxels carry tissue's enhancement (a filtered study averages it across
    their edge), and a CSF level read too high would cut into tissue. With fewer than
    ``min_voxels`` CSF voxels (a thin rim that the smoothing lifted above ``csf_hu``: a few
    slices over the vertex) the CSF level is :data:`NOMINAL_CSF_HU`. None when the tissue has
    fewer than ``min_voxels`` voxels or the two lie less than ``min_gap_hu`` apart (nothing to
    tell apart).
    """
    brain = np.asarray(brain, dtype=bool)
    fluid, tissue = brain & csf & (mean >= AIR_HU), brain & ~csf  # not air a mask left within
    if tissue.sum() < min_voxels:
        return None
    # too little CSF to read its level (a slab over the vertex, where the smoothing lifted the
    # thin CSF rim above the threshold): CSF's nominal level
    low = float(np.median(mean[fluid])) if fluid.sum() >= min_voxels else NOMINAL_CSF_HU
    high = float(np.median(mean[tissue]))
    if high - low < min_gap_hu:
        return None
    return 0.5 * (min(low, csf_hu) + high)


def near_bone(
    volume: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    bone_hu: float = BONE_HU,
    margin_mm: float = 2.0,
    margin_voxels: float = 1.0,
) -> np.ndarray:
    """Voxels within an in-plane margin of bone, bool (Z, Y, X).

    Static partial volume with bone cancels in the baseline subtraction, but once the head
    moves, or frames are resampled to correct it, a voxel next to bone takes in a little of
    the bone's 1000+ HU in some frames: a step of tens of HU that a venous curve's area must
    not include. The margin is ``margin_voxels`` in-plane voxels (how far interpolation
    reaches, whatever the voxel size) plus ``margin_mm`` (blur and residual misalignment).

    Parameters
    ----------
    volume : ndarray, shape (Z, Y, X)
        Pre-contrast HU (contrast-filled vessels must not count as bone).
    spacing : (dz, dy, dx) mm
    bone_hu : float
        Bone threshold in HU.
    margin_mm, margin_voxels : float
        The two parts of the margin around bone (added).
    """
    _, dy, dx = (float(v) for v in spacing)
    bone = np.asarray(volume) > bone_hu
    if not bone.any():
        return bone
    dist = ndimage.distance_transform_edt(~bone, sampling=(1e6, dy, dx))
    return dist <= margin_mm + margin_voxels * min(dy, dx)


#: Unenhanced brain tissue above this (HU, smoothed in-plane over 1.5 mm) is blood-dense: a
#: haemorrhage or a thrombosed sinus, not parenchyma that perfusion maps can call infarcted.
#: Grey matter reads 35-50 HU at 80 kV, so a haemorrhage at 50-60 HU is not told from it.
HYPERDENSE_HU = 60.0
#: Denser than a blood clot (HU): calcification or bone, cut by a slice or not; hyperdense
#: regions are sought only beyond 3 mm from it.
HYPERDENSE_MAX_HU = 120.0
#: Smallest connected hyperdense region counted (mL): ctperf's healthy phantoms hold pieces of
#: at most 0.34 mL above :data:`HYPERDENSE_HU` beside their vessels.
HYPERDENSE_MIN_ML = 1.0
#: A hyperdense region's edge: within :data:`HYPERDENSE_EDGE_MM` of it in-plane, brain still
#: above this (HU, smoothed) is the haemorrhage in partial volume with the brain beside it
#: (grey matter reads 35-40 HU at 80 kV); a 62-70 HU haemorrhage's edge had been read as 1-3
#: mL of core.
HYPERDENSE_EDGE_HU = 45.0
HYPERDENSE_EDGE_MM = 3.0


def hyperdense_mask(base: np.ndarray, brain: np.ndarray, *, spacing: Sequence[float],
                    offset: float = 0.0, exclude: np.ndarray | None = None) -> np.ndarray:
    """Brain voxels that were blood-dense before the bolus, bool (Z, Y, X): the pre-bolus
    volume ``base`` (less ``offset``) smoothed in-plane over soft tissue (Gaussian SD 1.5 mm)
    between :data:`HYPERDENSE_HU` and :data:`HYPERDENSE_MAX_HU`, more than 3 mm from anything
    denser (bone, calcification) and outside ``exclude`` (the vessels), in connected regions
    of :data:`HYPERDENSE_MIN_ML` or more, with their edge (:data:`HYPERDENSE_EDGE_HU` within
    :data:`HYPERDENSE_EDGE_MM` in-plane)."""
    dz, dy, dx = (float(v) for v in spacing)
    vol = np.asarray(base, dtype=np.float32) - np.float32(offset)
    # smoothed over soft tissue only: bone's (and a calcified falx's) HU must not spread into
    # the brain beside it; what lies within 3 mm of anything denser than blood clots is left
    # out (bone cut by a thick slice reads 90-300 HU over the orbits and the skull base)
    soft = ((vol > AIR_HU) & (vol < HYPERDENSE_MAX_HU)).astype(np.float32)
    sigma = (0.0, 1.5 / dy, 1.5 / dx)
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = (ndimage.gaussian_filter(vol * soft, sigma=sigma)
                  / ndimage.gaussian_filter(soft, sigma=sigma))
    hot = brain & (smooth > HYPERDENSE_HU) & (smooth < HYPERDENSE_MAX_HU) & ~near_bone(
        vol, spacing=spacing, bone_hu=HYPERDENSE_MAX_HU, margin_mm=3.0, margin_voxels=0.0)
    if exclude is not None:
        hot &= ~exclude
    labels, n = ndimage.label(hot)
    if n == 0:
        return hot
    sizes = np.bincount(labels.ravel()) * dz * dy * dx / 1e3
    sizes[0] = 0.0
    dense = sizes[labels] >= HYPERDENSE_MIN_ML
    if not dense.any():
        return dense
    # its edge, where the smoothing mixed it with the brain beside it
    edge = brain & (smooth > HYPERDENSE_EDGE_HU) & (smooth < HYPERDENSE_MAX_HU)
    if exclude is not None:
        edge &= ~exclude
    near = ndimage.distance_transform_edt(~dense, sampling=(1e6, dy, dx)) <= HYPERDENSE_EDGE_MM
    return dense | (edge & near)
