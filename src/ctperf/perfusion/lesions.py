"""Ischaemic core, hypoperfused tissue and penumbra from perfusion maps.

The thresholds are the fields of :class:`LesionOptions`. Core: relative CBF below
``core_rcbf`` (30 %) of normal tissue, or, when ``core_cbv`` is given, CBV below it (e.g.
2.0 mL/100 g). Hypoperfused: Tmax above ``tmax_hypo`` (6 s); Tmax above ``tmax_severe`` (10 s)
is reported too. Penumbra = hypoperfused minus core; mismatch ratio = hypoperfused / core
volume; hypoperfusion intensity ratio = the volume of Tmax above ``tmax_severe`` / hypoperfused,
given only at its defining 10 and 6 s (Olivot et al., Stroke 2014: a high ratio, such as above
0.4, goes with poor collaterals).

By default the core is kept inside the hypoperfused region (``core_within_hypoperfused``):
tissue whose flow has collapsed is also late, and low CBF in tissue with a normal Tmax is noise
or partial volume with CSF rather than infarct.

Normal-tissue reference for rCBF: ``"contralateral"`` (default) mirrors CBF across the brain's
mid-sagittal plane and averages normally perfused mirrored tissue in a Gaussian neighbourhood
(so grey and white matter each meet a similar reference); ``"global"`` is the median CBF of all
normally perfused brain; an array gives each voxel's own reference. The mid-sagittal plane is
estimated from the brain mask's mirror symmetry (:func:`midsagittal_plane`): a head turned about
the vertical axis (yaw) or tilted sideways (roll) is mirrored about its own midline, not about
the image's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ctperf.errors import ValidationError
from ctperf.lesion_options import THRESHOLDS_ONLY, LesionOptions
from ctperf.masks import as_region
from ctperf.parallel import map_chunks
from ctperf.types import PerfusionMaps, orientation_known, refuse_masked

__all__ = ["MIDPLANE_MAX_YAW_DEG", "MIN_NORMAL_SHARE", "MIRROR_SUPPORT", "NO_NORMAL_TISSUE",
           "THRESHOLDS_ONLY",
           "LesionOptions", "LesionResult", "MidPlane", "in_patient_terms", "left_right_angle",
           "midsagittal_plane", "normal_cbf_reference", "segment_lesions"]

log = logging.getLogger(__name__)

#: The core's reference (``thresholds["core"]["reference"]``) where no tissue is normally
#: perfused: the brain's median CBF.
NO_NORMAL_TISSUE = "brain median: no normally perfused tissue"
#: A voxel's mirror supports its core's reference when the tissue not hypoperfused at the
#: mirror is at least this share of the brain in the voxel's own neighbourhood
#: (:func:`segment_lesions`' ``hypoperfused_off_mirror_ml``).
MIRROR_SUPPORT = 0.5
#: Below this share of the brain with a normal Tmax, the core's reference is the brain's
#: median CBF (:data:`NO_NORMAL_TISSUE`).
MIN_NORMAL_SHARE = 0.05


@dataclass(frozen=True)
class LesionResult:
    """Lesion masks (bool, (Z, Y, X)), volumes in mL, mismatch and hypoperfusion intensity
    ratios (None where their denominator is 0 mL; the latter also when the Tmax thresholds are
    not 6 and 10 s) and thresholds used.

    ``thresholds`` holds numbers, each with a readable ``label``: ``core`` (``rcbf_below`` and
    the ``reference``, or ``cbv_below_ml_per_100g``), ``hypoperfused`` and ``tmax10``
    (``tmax_above_s``), plus ``reference_cbf_median``, ``smooth_mm``, ``min_component_ml``,
    ``core_within_hypoperfused`` and ``midsagittal_plane``.
    """

    core: np.ndarray
    hypoperfused: np.ndarray
    penumbra: np.ndarray
    tmax_severe: np.ndarray
    volumes_ml: dict[str, float]
    mismatch_ratio: float | None
    thresholds: dict[str, Any] = field(default_factory=dict)
    volumes_sd_ml: dict[str, float] | None = None
    hypoperfusion_intensity_ratio: float | None = None

    def masks(self) -> dict[str, np.ndarray]:
        """The four masks by file name (``core``, ``hypoperfused``, ``penumbra``, ``tmax10``)."""
        return {"core": self.core, "hypoperfused": self.hypoperfused,
                "penumbra": self.penumbra, "tmax10": self.tmax_severe}

    def summary(self) -> dict[str, Any]:
        """JSON-ready volumes, mismatch and hypoperfusion intensity ratios and thresholds."""
        out = {"volumes_ml": dict(self.volumes_ml), "mismatch_ratio": self.mismatch_ratio,
               "hypoperfusion_intensity_ratio": self.hypoperfusion_intensity_ratio,
               "thresholds": dict(self.thresholds)}
        if self.volumes_sd_ml is not None:
            out["volumes_sd_ml"] = dict(self.volumes_sd_ml)
        return out


@dataclass(frozen=True)
class MidPlane:
    """The brain's mid-sagittal plane, slice by slice.

    In slice ``z`` the plane cuts the midline ``(x - xc) dx cos(angle) + (y - yc) dy sin(angle)
    = offset[z]``, with voxel indices ``(y, x)``, ``(yc, xc)`` = ``centre`` and ``(dy, dx)`` =
    ``spacing`` (mm): ``angle`` (radians) is the direction of the midline's normal (the
    head's left-right axis) in the slice plane, measured from the rows (array x) towards the
    columns (array y) in millimetres, shared by all slices; ``offset`` (mm, (Z,)) the midline's
    distance from the slice centre, which changes linearly from slice to slice when the head is
    tilted sideways (roll). With the default ``spacing`` (1, 1) both are in voxels. ``score``
    is the mirror overlap of the brain mask at the optimum (1 = perfectly symmetric).
    """

    angle: float
    offset: np.ndarray
    centre: tuple[float, float]
    score: float
    spacing: tuple[float, float] = (1.0, 1.0)

    def distance(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Signed distance (mm) of every voxel of a (Z, Y, X) grid from the plane, (Z, Y, X)."""
        _, ny, nx = shape
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
        dy, dx = self.spacing
        c, s = np.cos(self.angle), np.sin(self.angle)
        return ((xx - self.centre[1]) * dx * c + (yy - self.centre[0]) * dy * s)[None] \
            - np.asarray(self.offset, dtype=np.float64)[:, None, None]

    def mirror(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Mirror position (y, x) of every voxel of a (Z, Y, X) grid, two float arrays (Z, Y, X)."""
        _, ny, nx = shape
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
        dy, dx = self.spacing
        dist = self.distance(shape)
        return (yy[None] - 2.0 * dist * np.sin(self.angle) / dy,
                xx[None] - 2.0 * dist * np.cos(self.angle) / dx)


def left_right_angle(affine: np.ndarray) -> float:
    """Direction (radians, in (-pi/2, pi/2]) of the patient's left-right axis in the slice
    plane of a (Z, Y, X) array with the RAS ``affine``, as :class:`MidPlane` measures angles:
    0 when the rows run left-right (axial slices as scanners store them), pi/2 when the
    columns do (the in-plane axes swapped)."""
    a = np.asarray(affine, dtype=np.float64)
    along_x, along_y = (a[0, j] / max(float(np.linalg.norm(a[:3, j])), 1e-12) for j in (0, 1))
    angle = math.atan2(along_y, along_x)
    if angle > math.pi / 2:
        angle -= math.pi
    elif angle <= -math.pi / 2:
        angle += math.pi
    return angle


def in_patient_terms(plane: MidPlane, affine: np.ndarray) -> tuple[float, np.ndarray, bool]:
    """The mid-sagittal plane as the patient's head stands, whatever the array's storage order:
    its yaw (degrees, about the head-foot axis: the angle of the head's left-to-right
    axis from the scanner's towards anterior, positive when the patient's right side is turned
    forward, the nose towards the patient's left), each slice's midline offset (mm, (Z,),
    positive to the patient's right of the slice's centre), and whether the plane's positive
    side (``plane.distance > 0``) is the patient's right. ``affine``: the maps' RAS affine."""
    a = np.asarray(affine, dtype=np.float64)[:3, :2]
    cols = a / np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    normal = cols[:, 0] * math.cos(plane.angle) + cols[:, 1] * math.sin(plane.angle)
    sign = 1.0 if normal[0] >= 0 else -1.0  # the normal turned to point to the patient's right
    turn = math.degrees(math.atan2(sign * normal[1], sign * normal[0]))
    return turn, sign * np.asarray(plane.offset, dtype=np.float64), sign > 0


#: Yaw (degrees) searched either side of the affine's left-right axis for the mid-sagittal
#: plane; a result at the limit is logged (the head may be turned further).
MIDPLANE_MAX_YAW_DEG = 20.0


def midsagittal_plane(
    image: np.ndarray,
    *,
    spacing: tuple[float, float] = (1.0, 1.0),
    base_angle: float = 0.0,
    max_angle_deg: float = MIDPLANE_MAX_YAW_DEG,
    angle_step_deg: float = 0.5,
    pixel_mm: float = 0.9,
) -> MidPlane:
    """Estimate the mid-sagittal plane as the one about which ``image`` is most symmetric.

    The slices are resampled on square pixels of a fixed size, rotated so that a midline at
    the trial angle stands vertical; the mirror overlap for every midline position is then one
    self-convolution along the rotated x (an FFT), so all angles and offsets are scored at
    once. The angle maximising the summed overlap of all slices is kept, refined between the
    grid's steps by a parabola through its neighbours' scores, and the per-slice
    offsets (to a fraction of a pixel, from a parabola through the scores) are fitted by a
    straight line in z, weighted by brain area, which absorbs a sideways tilt (roll) without
    letting a small end slice swing the midline.

    Parameters
    ----------
    image : ndarray, shape (Z, Y, X)
        A left-right symmetric view of the anatomy, e.g. the brain mask (bool) or the temporal
        mean of the study; negative values are treated as 0.
    spacing : (dy, dx)
        Pixel size in mm (rows may differ from columns); the plane's offsets are in mm.
    base_angle : float
        Direction of the patient's left-right axis in the slice (radians;
        :func:`left_right_angle` of the study's affine); the yaw is searched around it.
    max_angle_deg, angle_step_deg : float
        Yaw angles searched about ``base_angle``, degrees.
    pixel_mm : float
        The search grid's pixel, mm (the image's own when coarser), twice that for the first
        pass over every angle: fixed, so that a wider field of view does not change the
        search's resolution.

    Returns
    -------
    MidPlane
    """
    img = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0.0, None)
    if img.ndim != 3:
        raise ValidationError(f"image must be (Z, Y, X), got shape {img.shape}")
    dy, dx = (float(v) for v in spacing)
    if not (dy > 0 and dx > 0):
        raise ValidationError(f"spacing must be two pixel sizes > 0 in mm, got {spacing}")
    nz, ny, nx = img.shape
    area = img.sum(axis=(1, 2))
    if not area.sum() > 0:
        raise ValidationError("no brain voxels to estimate the mid-sagittal plane from")
    # searched about the image's centroid over the extent it fills, so that air added or cut
    # around the head (another field of view) samples the head on the same grid; the offsets
    # are given from the slice's centre at the end
    centre = ((ny - 1) / 2.0, (nx - 1) / 2.0)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    plane_sum = img.sum(axis=0)
    about = (float((plane_sum * yy).sum() / plane_sum.sum()),
             float((plane_sum * xx).sum() / plane_sum.sum()))
    filled = plane_sum > 0
    reach = float(np.hypot((yy[filled] - about[0]) * dy, (xx[filled] - about[1]) * dx).max())
    extent = 2.0 * reach + 4.0 * max(dy, dx, pixel_mm)
    angles = base_angle + np.deg2rad(np.arange(-max_angle_deg, max_angle_deg + 1e-9,
                                               angle_step_deg))

    def grid(pix: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        """A square grid of ``pix`` mm pixels over the image's extent about its centroid: its
        (y, x) in mm from the centroid, its pixel and its centre index."""
        pix = max(min(dy, dx), pix)
        n = int(np.ceil(extent / pix))
        c0 = (n - 1) / 2.0
        yr, xr = ((v - c0) * pix for v in np.mgrid[0:n, 0:n].astype(np.float64))
        return yr, xr, pix, c0

    def view(th: float, on: tuple[np.ndarray, np.ndarray, float, float]
             ) -> tuple[np.ndarray, np.ndarray]:
        """Mirror overlaps (Z, 2n) for every midline position, and the view's energy (Z,),
        of the rotated view R(y', x') = I(centre + Rot(th) (x', y')) (mm) on the grid ``on``,
        in which a midline whose normal points at angle th stands vertical."""
        yr, xr, _, _ = on
        c, s = np.cos(th), np.sin(th)
        x_src = about[1] + (xr * c - yr * s) / dx
        y_src = about[0] + (xr * s + yr * c) / dy
        rot = np.stack([ndimage.map_coordinates(sl, [y_src, x_src], order=1, cval=0.0)
                        for sl in img])
        length = 2 * rot.shape[2]
        spec = np.fft.rfft(rot, n=length, axis=2)
        # sum_y sum_x R(x) R(m - x): overlap with the mirror about x' = m / 2.
        return (np.fft.irfft(spec * spec, n=length, axis=2).sum(axis=1),
                np.maximum((rot**2).sum(axis=(1, 2)), 1e-12))

    weight = area / area.sum()

    def symmetry(th: float, on: tuple[np.ndarray, np.ndarray, float, float]) -> float:
        overlaps, energy = view(th, on)
        return float((overlaps.max(axis=1) / energy * weight).sum())

    # every angle on the coarse grid; the best one's neighbourhood (two steps each side) on
    # the fine grid, its best refined between the steps by a parabola through three scores
    coarse, fine = grid(2.0 * pixel_mm), grid(pixel_mm)
    k = int(np.argmax([symmetry(th, coarse) for th in angles]))
    near = np.arange(max(k - 2, 0), min(k + 3, angles.size))
    fine_scores = np.array([symmetry(angles[j], fine) for j in near])
    i = int(np.argmax(fine_scores))
    angle = float(angles[near[i]])
    if 0 < i < near.size - 1:
        left, mid, right = fine_scores[i - 1:i + 2]
        if left - 2 * mid + right < 0:
            step = float(angles[1] - angles[0])
            angle += step * float(np.clip(0.5 * (left - right) / (left - 2 * mid + right),
                                          -0.5, 0.5))
    best, energy = view(angle, fine)
    pix, c0, length = fine[2], fine[3], best.shape[1]
    m = np.argmax(best, axis=1)
    left, mid, right = (best[np.arange(nz), np.clip(m + d, 0, length - 1)] for d in (-1, 0, 1))
    curv = left - 2 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(curv < 0, 0.5 * (left - right) / curv, 0.0)
    axis_x = (m + np.clip(frac, -0.5, 0.5)) / 2.0  # midline column in the rotated view
    # from the centroid, then from the slice's centre (MidPlane's origin)
    offset = (axis_x - c0) * pix + ((about[1] - centre[1]) * dx * np.cos(angle)
                                    + (about[0] - centre[0]) * dy * np.sin(angle))
    w = area / area.max()
    keep = w > 0.05
    if keep.sum() >= 2:
        zz = np.arange(nz, dtype=np.float64)
        slope, inter = np.polyfit(zz[keep], offset[keep], 1, w=np.sqrt(w[keep]))
        offset = inter + slope * zz
    else:
        offset = np.full(nz, float(np.average(offset, weights=w)))
    score = float((mid / energy * weight).sum())
    return MidPlane(angle=angle, offset=offset, centre=centre, score=score, spacing=(dy, dx))


def normal_cbf_reference(
    cbf: np.ndarray,
    normal: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    mode: str = "contralateral",
    sigma_mm: float = 8.0,
    symmetry: np.ndarray | None = None,
    plane: MidPlane | None = None,
) -> np.ndarray:
    """Normal-tissue CBF reference per voxel, (Z, Y, X) mL/100 g/min.

    Parameters
    ----------
    cbf : ndarray, shape (Z, Y, X)
    normal : ndarray of bool, shape (Z, Y, X)
        Normally perfused brain voxels (the only ones averaged).
    spacing : (dz, dy, dx) mm
    mode : {"contralateral", "global"}
    sigma_mm : float
        In-plane Gaussian neighbourhood of the contralateral average.
    symmetry : ndarray, shape (Z, Y, X), optional
        Image whose mirror symmetry defines the mid-sagittal plane (the brain mask is best: it
        holds no lesion); default ``normal``.
    plane : MidPlane, optional
        A known mid-sagittal plane instead of estimating one.
    """
    if not normal.any():
        raise ValidationError("no normally perfused brain voxels to take a CBF reference from")
    values = np.where(normal, cbf, 0.0)
    overall = float(np.median(cbf[normal]))
    if mode == "global":
        return np.full(cbf.shape, overall)
    if mode != "contralateral":
        raise ValidationError(
            f"reference must be 'contralateral', 'global' or an array, got {mode!r}")
    if plane is None:
        plane = midsagittal_plane(normal if symmetry is None else symmetry,
                                  spacing=(spacing[1], spacing[2]))
    num = _mirrored_neighbourhood(values, plane, spacing, sigma_mm)
    den = _mirrored_neighbourhood(normal, plane, spacing, sigma_mm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0.05, num / den, overall)


def _neighbourhood(image: np.ndarray, spacing: tuple[float, float, float],
                   sigma_mm: float) -> np.ndarray:
    """In-plane Gaussian sum (SD ``sigma_mm``) of ``image`` (Z, Y, X), zero outside it."""
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float64),
                                   (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2]),
                                   mode="constant")


def _mirrored_neighbourhood(image: np.ndarray, plane: MidPlane,
                            spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """:func:`_neighbourhood` of ``image`` mirrored across ``plane`` (zero beyond the image):
    at each voxel, what lies around its mirror image."""
    my, mx = plane.mirror(image.shape)
    zz = np.broadcast_to(np.arange(image.shape[0], dtype=np.float64)[:, None, None], image.shape)
    mirrored = ndimage.map_coordinates(np.asarray(image, dtype=np.float64), [zz, my, mx],
                                       order=1, mode="constant", cval=0.0)
    return _neighbourhood(mirrored, spacing, sigma_mm)


def _mirror_support(timely: np.ndarray, brain: np.ndarray, plane: MidPlane,
                    spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """(Z, Y, X) in [0, 1]: the ``timely`` tissue (not hypoperfused) in each voxel's mirror
    image's neighbourhood over the ``brain`` in its own, so 1 where the mirror is healthy
    brain and 0 where it is hypoperfused too, or outside the image (a field of view cut),
    whatever the voxel's distance to the brain's edge."""
    there = _mirrored_neighbourhood(timely, plane, spacing, sigma_mm)
    own = _neighbourhood(brain, spacing, sigma_mm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.where(own > 0, there / own, 0.0), 0.0, 1.0)


def segment_lesions(
    maps: PerfusionMaps,
    *,
    brain: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    options: LesionOptions = THRESHOLDS_ONLY,
    reference: str | np.ndarray | float | None = None,
    sigma_mm: float = 8.0,
    uncertainty_mm: float = 3.0,
    samples: int = 24,
) -> LesionResult:
    """Segment core, hypoperfused tissue and penumbra.

    Parameters
    ----------
    maps : PerfusionMaps
        Needs ``cbf`` and ``tmax`` (and ``cbv`` when ``options.core_cbv`` is set).
    brain : ndarray of bool, shape (Z, Y, X), optional
        Where lesions may lie; default where the maps are finite, less a background value
        reaching the image's edge (:func:`ctperf.io.maps.edge_background`: maps written with
        0 outside the head had put the midline at the image's centre and the reference CBF
        among the zeros).
    exclude : ndarray of bool, shape (Z, Y, X), optional
        Voxels never labelled (vessels, CSF).
    options : LesionOptions
        Thresholds and clean-up; default :data:`THRESHOLDS_ONLY`.
    reference : "contralateral", "global", float or ndarray (Z, Y, X), optional
        Normal CBF for rCBF (see module docstring); default ``options.reference``.
    sigma_mm : float
        Neighbourhood of the contralateral reference.
    uncertainty_mm, samples : float, int
        When the maps carry posterior standard deviations (``cbf_sd``, ``tmax_sd``), the
        volumes' SDs come from ``samples`` draws of the maps, each perturbed by its SD times a
        Gaussian field correlated over ``uncertainty_mm`` in-plane (the estimator's
        neighbourhood), thresholded as the maps are.

    Returns
    -------
    LesionResult
    """
    o = options
    if reference is None:
        reference = o.reference
    refuse_masked(reference, "reference", "normal CBF; give it without them")
    cbf, tmax = maps["cbf"].astype(np.float64), maps["tmax"].astype(np.float64)
    valid = np.isfinite(cbf) & np.isfinite(tmax)
    if brain is None:  # maps written with 0 (or -1) outside the head: that is no brain
        from ctperf.io.maps import edge_background

        valid &= ~edge_background(maps["cbf"], maps["tmax"])
    else:
        valid &= as_region(brain, cbf.shape, "brain mask")
    region = valid.copy()  # the brain's outline and ventricles: symmetric, lesion or not
    if exclude is not None:
        valid &= ~as_region(exclude, cbf.shape, "exclude mask")
    rad = (o.smooth_mm / maps.spacing[1], o.smooth_mm / maps.spacing[2])
    cbf, tmax = _smooth(cbf, valid, rad), _smooth(tmax, valid, rad)
    hypo = valid & (tmax > o.tmax_hypo)
    severe = valid & (tmax > o.tmax_severe)
    label = asked = reference if isinstance(reference, str) else "given"
    # the midline, whatever the core's rule: the contralateral reference mirrors about it, and
    # each side's hypoperfused share (a brain late on both sides) is read from it
    plane, mid_info, right = _midline(region, maps, warn=o.core_cbv is None
                                      and reference == "contralateral"
                                      ) if valid.any() else (None, None, None)
    if o.core_cbv is not None:
        cbv = _smooth(maps["cbv"].astype(np.float64), valid, rad)
        core = valid & (cbv < o.core_cbv) & np.isfinite(cbv)
        core_value, core_sd = cbv, maps["cbv_sd"] if "cbv_sd" in maps.names else None
        limit = np.full(cbv.shape, o.core_cbv)
        ref_value: float | None = None
        off_mirror_ml = None
    else:
        normal = _normal_tissue(cbf, valid & ~hypo, o.core_rcbf)
        timely = int(np.count_nonzero(valid & ~hypo))
        if isinstance(reference, str) and valid.any() and (
                timely < MIN_NORMAL_SHARE * np.count_nonzero(valid) or not normal.any()):
            # (almost) every voxel late (a global delay, a threshold below healthy Tmax): the
            # few timely voxels left are noise (a probe's whole brain 7 s late kept 1.7 mL of
            # them, flowing a third as much as the brain: the core read 2.5 mL for 15), so
            # the brain's median CBF stands for normal flow
            reference = float(np.median(cbf[valid]))
            label = NO_NORMAL_TISSUE
            log.warning("%.1f %% of the brain has Tmax <= %g s, too little to give the core's "
                        "CBF reference: the brain's median CBF (%.1f mL/100 g/min) stands for "
                        "it, and the core may be too small; check the AIF (a late artery "
                        "delays every voxel) or use --core-cbv",
                        100.0 * timely / np.count_nonzero(valid), o.tmax_hypo, reference)
        # the mirror's support of the reference: none for the global rule or the brain's
        # median, whole for a reference given
        support = np.full(cbf.shape, float(label != NO_NORMAL_TISSUE))
        if isinstance(reference, str):
            contralateral = reference == "contralateral"
            ref = normal_cbf_reference(np.where(valid, cbf, 0.0), normal,
                                       spacing=maps.spacing, mode=reference, sigma_mm=sigma_mm,
                                       plane=plane if contralateral else None)
            support = (_mirror_support(valid & ~hypo, valid, plane, maps.spacing, sigma_mm)
                       if contralateral and plane is not None else np.zeros(cbf.shape))
        else:
            ref = np.broadcast_to(np.asarray(reference, dtype=np.float64), cbf.shape)
        # hypoperfused tissue whose mirror is mostly hypoperfused too or outside the brain
        # (both sides diseased, a lesion across the midline, the other side cut off): its
        # reference is the brain's median, mostly white matter's flow, or what normal tissue
        # lies at the mirror's edge
        off_mirror_ml = round(float(np.count_nonzero(hypo & (support < MIRROR_SUPPORT)))
                              * maps.voxel_ml, 2)
        core = valid & (cbf < o.core_rcbf * ref)
        core_value, core_sd, limit = cbf, maps["cbf_sd"] if "cbf_sd" in maps.names else None, \
            o.core_rcbf * ref
        ref_value = float(np.median(ref[valid])) if valid.any() else None
    if o.core_within_hypoperfused:
        core &= hypo
    voxel_ml = maps.voxel_ml
    min_voxels = o.min_component_ml / voxel_ml
    if min_voxels > 0:
        hypo, severe, core = (_drop_small(m, min_voxels) for m in (hypo, severe, core))
    penumbra = hypo & ~core
    if right is not None and mid_info is not None:  # each side's share: a whole brain late?
        # a file that set no orientation: its left and right are the reader's guess
        sides = (("left", "right") if orientation_known(maps.provenance)
                 else ("left (orientation guessed)", "right (orientation guessed)"))
        mid_info["hypoperfused_share_by_side"] = {
            name: round(int(np.count_nonzero(hypo & s))
                        / max(int(np.count_nonzero(valid & s)), 1), 4)
            for name, s in zip(sides, (~right, right), strict=True)}
    volumes = {"core": float(core.sum() * voxel_ml), "hypoperfused": float(hypo.sum() * voxel_ml),
               "penumbra": float(penumbra.sum() * voxel_ml),
               "tmax10": float(severe.sum() * voxel_ml)}
    ratio = volumes["hypoperfused"] / volumes["core"] if volumes["core"] > 0 else None
    # Olivot's ratio is that of Tmax > 10 s to Tmax > 6 s: with other thresholds it is not it
    standard = (o.tmax_hypo, o.tmax_severe) == (6.0, 10.0)
    hir = (volumes["tmax10"] / volumes["hypoperfused"]
           if standard and volumes["hypoperfused"] > 0 else None)
    thresholds = _thresholds(o, label, ref_value=ref_value, midplane=mid_info, asked=asked,
                             off_mirror_ml=off_mirror_ml)
    sd_ml = None
    if "tmax_sd" in maps.names and core_sd is not None:
        sd_ml = _volume_sd(core_value, tmax, core_sd, maps["tmax_sd"], valid,
                           limit, o, min_voxels=min_voxels,
                           sigma_vox=(uncertainty_mm / maps.spacing[1],
                                      uncertainty_mm / maps.spacing[2]),
                           samples=samples, voxel_ml=voxel_ml)
    return LesionResult(core=core, hypoperfused=hypo, penumbra=penumbra, tmax_severe=severe,
                        volumes_ml=volumes, mismatch_ratio=ratio, thresholds=thresholds,
                        volumes_sd_ml=sd_ml, hypoperfusion_intensity_ratio=hir)


def _midline(region: np.ndarray, maps: PerfusionMaps, *, warn: bool
             ) -> tuple[MidPlane, dict[str, Any], np.ndarray]:
    """The brain's mid-sagittal plane, what the thresholds say of it and the voxels on the
    patient's right of it; ``warn`` when its yaw reached the search's limit (the
    contralateral reference may then be off the mirror)."""
    base = left_right_angle(maps.affine)
    plane = midsagittal_plane(region, spacing=(maps.spacing[1], maps.spacing[2]),
                              base_angle=base)
    yaw = float(np.rad2deg(plane.angle - base))  # from the header's left-right
    turn, shift, faces_right = in_patient_terms(plane, maps.affine)
    info = {"yaw_deg": round(turn, 2), "offset_mm": np.round(shift, 2).tolist(),
            "mirror_overlap": round(plane.score, 4),
            "yaw_at_search_limit": abs(yaw) >= MIDPLANE_MAX_YAW_DEG - 0.5}
    if info["yaw_at_search_limit"] and warn:
        log.warning("the mid-sagittal plane's yaw (%.1f deg) reached the search's limit of %g "
                    "deg: the head may be turned further, or the brain mask be lopsided (a "
                    "craniectomy's swelling, a large old infarct), and the contralateral "
                    "reference be taken off the mirror; check the midline, or use --core-cbv",
                    yaw, MIDPLANE_MAX_YAW_DEG)
    positive = plane.distance(region.shape) > 0
    return plane, info, positive if faces_right else ~positive


def _normal_tissue(cbf: np.ndarray, timely: np.ndarray, core_rcbf: float) -> np.ndarray:
    """The tissue the core's CBF reference averages: ``timely`` (Tmax not above the
    hypoperfusion threshold) less what flows as little as a core would against the median of
    that tissue (an old infarct, or partial volume with CSF, on the side the reference is
    mirrored from: a probe's old contralateral infarct had made the acute core's reference
    its own low CBF, and 36.7 mL of core read 1.0)."""
    if not timely.any():
        return timely
    return timely & (cbf >= core_rcbf * float(np.median(cbf[timely])))


def _thresholds(o: LesionOptions, reference: str, *, ref_value: float | None,
                midplane: dict[str, Any] | None, asked: str | None = None,
                off_mirror_ml: float | None = None) -> dict[str, Any]:
    """The summary's thresholds: numbers, each rule with a readable label; ``reference`` the
    core's reference used, ``asked`` the one asked for (default the options'),
    ``off_mirror_ml`` the hypoperfused volume whose mirror image is mostly hypoperfused too or
    outside the brain."""
    core: dict[str, Any] = (
        {"cbv_below_ml_per_100g": o.core_cbv, "label": f"CBV < {o.core_cbv} mL/100g"}
        if o.core_cbv is not None else
        {"rcbf_below": o.core_rcbf, "reference": reference,
         "reference_asked": o.reference if asked is None else asked,
         "hypoperfused_off_mirror_ml": off_mirror_ml,
         "label": f"rCBF < {o.core_rcbf} ({reference} reference)"})
    return {
        "core": core,
        "hypoperfused": {"tmax_above_s": o.tmax_hypo, "label": f"Tmax > {o.tmax_hypo} s"},
        "tmax10": {"tmax_above_s": o.tmax_severe, "label": f"Tmax > {o.tmax_severe} s"},
        "reference_cbf_median": ref_value, "smooth_mm": o.smooth_mm,
        "min_component_ml": o.min_component_ml,
        "core_within_hypoperfused": o.core_within_hypoperfused, "midsagittal_plane": midplane,
    }


def _volume_sd(value: np.ndarray, tmax: np.ndarray, value_sd: np.ndarray, tmax_sd: np.ndarray,
               valid: np.ndarray, core_limit: np.ndarray, o: LesionOptions, *,
               min_voxels: float,
               sigma_vox: tuple[float, float], samples: int, voxel_ml: float
               ) -> dict[str, float]:
    """SD of each lesion volume (mL) over draws of the maps from their posterior SDs.

    Each draw perturbs the maps the lesions were thresholded on (``value``, the core's CBF or
    CBV, below ``core_limit``, and ``tmax``, after the lesions' median) and goes through the
    rest of what the estimate went through: the thresholds of ``o`` and the clean-up of
    components under ``min_voxels`` (without it, a
    core of 0 mL had read an SD of 0.5 mL). The median is not drawn again: 24 medians of a
    512 x 512 x 8 study cost 8 times the lesions' own time, and with noise correlated over
    the estimator's neighbourhood (wider than the median's disk) they change the SD little.

    The Gaussian fields are drawn and smoothed only over the valid voxels' bounding box,
    widened by the smoothing kernel's reach (scipy's truncation at 4 SD), which gives them the
    same statistics there as fields over the whole image; they are scaled to unit variance by
    the kernel's own norm. The draws run in threads, each from its own seed."""
    names = ("core", "hypoperfused", "penumbra", "tmax10")
    if not valid.any():
        return dict.fromkeys(names, 0.0)
    sig = (0.0, *sigma_vox)
    reach = [int(4.0 * sd + 0.5) for sd in sig]
    box = []
    for axis, r in enumerate(reach):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(valid.any(axis=other))
        box.append(slice(max(int(idx[0]) - r, 0), min(int(idx[-1]) + 1 + r, valid.shape[axis])))
    sl = tuple(box)
    inside = valid[sl]
    gain = 1.0
    for sd, r in zip(sig, reach, strict=True):
        if sd > 0:
            k = np.exp(-0.5 * (np.arange(-r, r + 1) / sd) ** 2)
            gain /= math.sqrt(float((k * k).sum())) / float(k.sum())

    def voxels(a: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.asarray(a)[sl][inside].astype(np.float64))

    c, t0, c_sd, t_sd, limit = (voxels(a) for a in (value, tmax, value_sd, tmax_sd, core_limit))

    def kept(mask: np.ndarray) -> np.ndarray:
        if min_voxels <= 0:
            return mask
        vol = np.zeros(inside.shape, dtype=bool)
        vol[inside] = mask
        return _drop_small(vol, min_voxels)[inside]

    def draw(start: int, stop: int) -> list[tuple[int, int, int, int]]:
        counts = []
        for i in range(start, stop):
            rng = np.random.default_rng([0, i])  # draw i is the same in every run and thread
            f_t, f_c = (ndimage.gaussian_filter(
                rng.standard_normal(inside.shape, dtype=np.float32), sig)[inside] * gain
                for _k in range(2))
            t = t0 + t_sd * f_t
            hypo = t > o.tmax_hypo
            core = c + c_sd * f_c < limit
            if o.core_within_hypoperfused:
                core &= hypo
            hypo, core, severe = kept(hypo), kept(core), kept(t > o.tmax_severe)
            counts.append((int(core.sum()), int(hypo.sum()), int((hypo & ~core).sum()),
                           int(severe.sum())))
        return counts

    rows = np.array([r for part in map_chunks(draw, samples, chunk=1) for r in part],
                    dtype=np.float64).reshape(-1, len(names))
    return {k: float(np.std(rows[:, j], ddof=1) * voxel_ml) for j, k in enumerate(names)}


def _smooth(values: np.ndarray, valid: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    """In-plane median over a disk of ``radius`` voxels (ry, rx) of the ``valid`` values only;
    NaN outside ``valid``.

    A median, not a mean: noisy CBF is strongly right-skewed (noise fitted as narrow, tall
    boxes), and a mean would lift low-flow tissue out of the core. Where the disk lies wholly
    in ``valid`` it is a plain median filter; next to invalid voxels (the brain's edge,
    vessels, CSF) the median of the disk's valid values (the mean of the two middle ones when
    they are even in number), so that the result does not depend on the image's orientation.
    """
    # a spacing stored in float32 (0.4000000059 mm) must not drop the disk's rim voxels
    ry, rx = (round(float(r), 6) for r in radius)
    if ry <= 0 and rx <= 0:
        return values
    ny, nx = int(np.floor(ry)), int(np.floor(rx))
    yy, xx = np.mgrid[-ny:ny + 1, -nx:nx + 1]
    disk = ((yy / max(ry, 1e-9)) ** 2 + (xx / max(rx, 1e-9)) ** 2) <= 1.0
    ok = valid & np.isfinite(values)
    out = np.full(values.shape, np.nan)
    whole = ndimage.binary_erosion(ok, structure=disk[None], border_value=0)
    out[whole] = ndimage.median_filter(np.where(ok, values, 0.0), footprint=disk[None],
                                       mode="nearest")[whole]
    edge = np.nonzero(valid & ~whole)
    dy, dx = yy[disk], xx[disk]
    # in blocks of about SMOOTH_BLOCK (voxel, disk offset) pairs: all at once, a 10 mm disk
    # on a 512 px study had asked for some 30 GB
    step = max(1, SMOOTH_BLOCK // dy.size)
    for start in range(0, edge[0].size, step):
        z, y, x = (a[start:start + step] for a in edge)
        ys, xs = y[:, None] + dy[None, :], x[:, None] + dx[None, :]
        inside = (ys >= 0) & (ys < values.shape[1]) & (xs >= 0) & (xs < values.shape[2])
        at = (z[:, None], np.clip(ys, 0, values.shape[1] - 1),
              np.clip(xs, 0, values.shape[2] - 1))
        use = inside & ok[at]
        near = np.sort(np.where(use, values[at], np.inf), axis=1)
        n, rows = use.sum(axis=1), np.arange(z.size)
        mid = 0.5 * (near[rows, np.maximum(n - 1, 0) // 2] + near[rows, n // 2])
        out[z, y, x] = np.where(n > 0, mid, np.nan)
    return out


#: (voxel, disk offset) pairs :func:`_smooth` gathers at once next to invalid voxels (about
#: 200 MB of working arrays).
SMOOTH_BLOCK = 1 << 22


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
