"""Quality-control flags stored with the maps: each flag is a short name, a bool and a reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.masks import (
    AIR_TOLERANCE_HU,
    HYPERDENSE_HU,
    HYPERDENSE_MAX_HU,
    HYPERDENSE_MIN_ML,
    IN_RANGE_AIR_TOLERANCE_HU,
    IN_RANGE_BRAIN_OFF_HU,
    NOMINAL_PARENCHYMA_HU,
    PARENCHYMA_HU,
    SKULL_SHARE,
)
from ctperf.perfusion.boxnlr import DEFAULT_BOUNDS
from ctperf.perfusion.curves import (
    TRUNCATED_END,
    baseline_fall,
    bolus_arrival_frame,
    enhanced_at_start,
    second_difference_sd,
    smooth_time,
    start_climb,
    start_level,
)

__all__ = [
    "ARRIVAL_SDS",
    "CORE_OFF_MIRROR_ALWAYS_ML",
    "CORE_OFF_MIRROR_ML",
    "CORE_OFF_MIRROR_SHARE",
    "EARLIER_BOLUS_MIN_VOF",
    "MAX_AIF_LEAD_S",
    "MAX_OSVD_STEP_S",
    "MAX_SKULL_SHIFT_PX",
    "WIDESPREAD_HYPO_SHARE",
    "WIDESPREAD_SIDE_SHARE",
    "aif_lag",
    "check_first_pass_sampled",
    "core_off_mirror_flag",
    "first_pass",
    "flat_edge_share",
    "frame_gaps",
    "qc_flags",
    "raised_flags",
    "skull_shift_px",
    "widespread_hypoperfusion_flag",
]


#: How many seconds the brain's bolus may arrive before the AIF's (``aif_after_tissue``): none.
#: Tissue is fed by its arteries and arrives after them (on ctperf's phantoms by 2-4 s at
#: frames 0.5-3 s apart); an AIF arriving a frame or more after the brain's mean curve is a vein
#: or an artery downstream of much of it. A 2 s allowance had passed a sinus chosen in place of
#: partial-volume-diluted arteries (arriving 1 s after the brain: CBF 6x, Tmax negative).
MAX_AIF_LEAD_S = 0.0


#: How many SDs of its noise a curve's rise must pass for :func:`aif_lag` to read its arrival.
ARRIVAL_SDS = 5.0


def aif_lag(times: np.ndarray, aif: np.ndarray, tissue_mean: np.ndarray) -> float | None:
    """Seconds by which the AIF's bolus arrives after the mean brain curve's (each smoothed
    over time and rising past 20 % of its peak and :data:`ARRIVAL_SDS` SDs of its noise, so
    that the mean of a few noisy voxels does not arrive by noise alone); None when either
    never rises."""
    try:
        return float(times[bolus_arrival_frame(aif, fraction=0.2, noise_sds=ARRIVAL_SDS)]
                     - times[bolus_arrival_frame(tissue_mean, fraction=0.2,
                                                 noise_sds=ARRIVAL_SDS)])
    except ValidationError:  # a curve that never rises: nothing to judge
        return None


#: A step between frames more than this many times the local pace (the median of the three
#: steps on each side), and longer than :data:`GAP_MIN_S`, is a gap: frames missing from an
#: interrupted acquisition, not a protocol changing pace (0.5 s, then 3 s frames).
GAP_FACTOR = 2.5
GAP_MIN_S = 2.0


def frame_gaps(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``t[i] -> t[i + 1]`` that are gaps: their indices ``i`` and the local pace (s)."""
    steps = np.diff(np.asarray(times, dtype=np.float64))
    n = steps.size
    pace = np.array([np.median(np.r_[steps[max(0, i - 3):i], steps[i + 1:i + 4]])
                     if n > 1 else steps[i] for i in range(n)])
    gaps = np.flatnonzero((steps > GAP_FACTOR * pace) & (steps > GAP_MIN_S))
    return gaps, pace[gaps]


#: Largest shift of the skull's edges between frames (pixels, :func:`skull_shift_px`) of a
#: study that was not registered. On ctperf's phantoms moved by the "mild" class (1.2-1.4 mm
#: mean displacement, under the registration's 2 mm flag) it read 0.45-0.64 px at 128 px and
#: 0.56 px at 256 px, and 1.46-1.87 px on the "severe" class (5-8 mm); it reads low on large
#: through-plane motion and saturates at one to two pixels (an edge's width), so it detects
#: motion rather than measures it.
MAX_SKULL_SHIFT_PX = 1.0


def skull_shift_px(hu: np.ndarray, *, n_base: int, noise_sd: float,
                   offset: float = 0.0) -> float | None:
    """How far the skull's edges move, in the image plane, between the pre-bolus mean and any
    frame (pixels): head motion that no registration corrected. None without enough bone
    (tiles, a skull-stripped study).

    On the edges of the pre-bolus mean (in-plane gradient above 150 HU per pixel, above 300 HU
    less ``offset``), a frame's mean absolute difference from that mean, less what its noise
    gives, over the mean gradient is the edges' mean shift along their normal (times pi / 2
    for shifts in any direction). Contrast does not reach bone.

    Parameters
    ----------
    hu : ndarray, shape (T, Z, Y, X)
    n_base : int
        Frames before the bolus, averaged as the reference.
    noise_sd : float
        Noise SD of one frame, HU.
    offset : float
        Offset of the study's HU scale (:func:`ctperf.masks.hu_offset`).
    """
    ref = hu[:max(1, n_base)].mean(axis=0, dtype=np.float32)
    grad = np.hypot(np.gradient(ref, axis=1), np.gradient(ref, axis=2))  # HU per pixel
    edge = (grad > 150.0) & (ref > 300.0 + offset)
    if edge.sum() < 200:
        return None
    slope = float(grad[edge].mean())
    floor = noise_sd * np.sqrt(2.0 / np.pi) * np.sqrt(1.0 + 1.0 / max(1, n_base))
    change = np.array([np.abs(frame[edge] - ref[edge]).mean() for frame in hu])
    return float(np.max(np.clip(change - floor, 0.0, None))) / slope * np.pi / 2


#: Frame interval (s) at which ``noisy_voxelwise`` of :func:`qc_flags` takes the noise as
#: measured; at another pace it is scaled by the square root of the ratio (the same noise per
#: second of the passage).
NOISE_STEP_S = 0.5
#: Arterial peak enhancement (HU) at which ``noisy_voxelwise`` takes the noise as measured;
#: under a weaker bolus (the AIF corrected for partial volume by a VOF, so its true height) it
#: is scaled by this over the AIF's peak (the same contrast-to-noise). A stronger bolus does not
#: lower it: the flag's limit was set on phantoms whose AIFs peak at 410-540 HU.
NOISE_AIF_PEAK_HU = 400.0

#: Share of its rise that an AIF must fall under after its highest frame for its first pass to
#: count as measured (:func:`check_first_pass_sampled`): half, as the automatic search asks of
#: its candidates (an AIF mask on a scan ending 3 s after the peak, the AIF at 75 % of it, had
#: read the core's CBF at the fit's bound and no lesion).
PEAK_PASSED = 0.5


def _rise(aif: np.ndarray) -> tuple[np.ndarray, int]:
    """An AIF's rise over its first frames (up to three) and the frame of its peak."""
    c = np.asarray(aif, dtype=np.float64)
    rise = c - np.median(c[: max(1, min(3, c.size))])
    return rise, int(np.argmax(rise))


#: Longest time (s) an AIF may stand at or above half its peak rise before ``aif_wide``
#: (:func:`aif_half_width_s`): ctperf's phantoms, whose boluses are shaped by injections of
#: 7-12 s, span 7.5-13 s; low cardiac output, a slow injection or a split bolus spans more.
AIF_WIDE_S = 14.0


#: Longest step (s) between the samples oSVD deconvolves before ``osvd_coarse_frames``: its
#: oscillation index (Wu 2003) averages the residue's second differences over the samples, so
#: the residue's own onset and fall weigh more on fewer samples and the index asks for a
#: harder truncation than the noise does (docs/validation.md, section 3).
MAX_OSVD_STEP_S = 1.5


def aif_half_width_s(times: np.ndarray, aif: np.ndarray) -> float | None:
    """Seconds from the AIF's first rise past half its peak rise to its last fall below it
    (interpolated between frames): its full width at half maximum, or the span of both peaks
    of a split bolus. None for a flat curve."""
    t = np.asarray(times, dtype=np.float64)
    rise, peak = _rise(aif)
    half = 0.5 * rise[peak]
    if not half > 0:
        return None
    above = np.flatnonzero(rise >= half)
    first, last = int(above[0]), int(above[-1])
    up = t[0] if first == 0 else t[first - 1] + (half - rise[first - 1]) / (
        rise[first] - rise[first - 1]) * (t[first] - t[first - 1])
    down = t[-1] if last == t.size - 1 else t[last] + (rise[last] - half) / (
        rise[last] - rise[last + 1]) * (t[last + 1] - t[last])
    return float(down - up)


def split_bolus(aif: np.ndarray) -> bool:
    """Whether the AIF has two first passes: after its first frame above half its peak rise it
    falls under :data:`SPLIT_DIP` of it and rises again past :data:`SPLIT_AGAIN` (a split or
    repeated injection; recirculation stays under that)."""
    rise, peak = _rise(aif)
    if not rise[peak] > 0:
        return False
    r = rise / rise[peak]
    start = int(np.flatnonzero(r >= 0.5)[0])
    dips = np.flatnonzero(r[start:] < SPLIT_DIP)
    return bool(dips.size) and bool(np.any(r[start + int(dips[0]):] > SPLIT_AGAIN))


#: A split bolus (:func:`split_bolus`): the AIF falls under this share of its peak rise
#: between two passes that each pass :data:`SPLIT_AGAIN` of it.
SPLIT_DIP = 0.45
SPLIT_AGAIN = 0.6


def first_pass(aif: np.ndarray) -> tuple[int, int]:
    """Frames of the AIF's first pass: the last before it rises past 10 % of its peak rise,
    and the first after its peak below half of it (the last frame if none)."""
    start = max(0, bolus_arrival_frame(np.asarray(aif, dtype=np.float64), fraction=0.1) - 1)
    rise, peak = _rise(aif)
    below = np.flatnonzero(rise[peak:] < 0.5 * rise[peak])
    return start, peak + int(below[0]) if below.size else rise.size - 1


def check_first_pass_sampled(times: np.ndarray, aif: np.ndarray) -> None:
    """Refuse an AIF whose peak was not measured: frame times with a gap (:func:`frame_gaps`)
    in its first pass (an interrupted scan; a phantom with 11 s missing over the arterial peak
    read CBF 2.6 times the truth), or a scan that ended before the AIF came down from its peak
    (no frame after its highest below :data:`PEAK_PASSED` of its rise: a probe's scan ending
    at the arterial peak, given an AIF mask, read penumbra CBF +1264 % and no core, only
    flagged). The first pass sets CBF, CBV and every delay."""
    t = np.asarray(times, dtype=np.float64)
    gaps, pace = frame_gaps(t)
    try:
        start, end = first_pass(aif)
    except ValidationError:  # an AIF that never rises is refused elsewhere
        return
    rise, peak = _rise(aif)
    if not (rise[peak:] < PEAK_PASSED * rise[peak]).any():
        raise ValidationError(
            f"the arterial curve had not come down from its peak by the scan's last frame "
            f"({t[-1] - t[0]:.1f} s; its highest at {t[peak] - t[0]:.1f} s, nothing after it "
            f"under {PEAK_PASSED:.0%} of its rise): the bolus's first pass was not measured, so "
            "CBF, CBV and delays cannot be (a scan too short, or started too late for this "
            "bolus)")
    for i, local in zip(gaps, pace, strict=True):
        if start <= i < end:
            raise ValidationError(
                f"frames missing during the arterial bolus: {t[i + 1] - t[i]:.1f} s between "
                f"frames {i} and {i + 1} ({t[i]:.1f} and {t[i + 1]:.1f} s), where the frames "
                f"around are {local:.2g} s apart, within the AIF's first pass "
                f"({t[start]:.1f}-{t[end]:.1f} s): its peak and upslope were not measured, so "
                "CBF and delays cannot be (an interrupted acquisition)")


def flat_edge_share(hu: np.ndarray, brain: np.ndarray, *, n_base: int,
                    noise_sd: float) -> float:
    """The largest share, over the slices of a (T, Z, Y, X) study, of the image's edge pixels
    that lie in the ``brain`` (Z, Y, X) where those voxels' median curve shows no bolus (its
    rise within 5 SDs of its noise, ``noise_sd`` per voxel; the median, so that an artery or
    a tile that touches the edge does not speak for the background around it): 0 for a head
    (skull and scalp between brain and edge) and for a brain cut by the field of view (its
    edge enhances), 1 for a tile phantom's flat background mapped as brain."""
    b = np.asarray(brain, dtype=bool)
    frame = np.zeros(b.shape[1:], dtype=bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    share = 0.0
    for z in range(b.shape[0]):
        edge = b[z] & frame
        if not edge.any():
            continue
        curve = np.median(hu[:, z][:, edge], axis=1).astype(np.float64)
        rise = float(curve[n_base:].max() - curve[:max(n_base, 1)].mean())
        if rise <= 5.0 * 1.25 * noise_sd / np.sqrt(edge.sum()):  # a median's SD: 1.25 x
            share = max(share, float(edge.sum()) / float(frame.sum()))
    return share


#: CBV (mL/100 g) of a lesion region's mean curve under which it held no bolus
#: (``lesion_no_bolus``): acute core keeps some blood (CBV 0.2-0.6 times normal tissue's, 0.4
#: and more), while tissue without any (an old infarct, gliosis, a cyst denser than the CSF
#: cut) reads 0 within the mean curve's noise.
NO_BOLUS_CBV = 0.2
#: The least region (mL) whose mean curve ``lesion_no_bolus`` reads.
NO_BOLUS_MIN_ML = 1.0


def lesion_no_bolus_ml(tissue: np.ndarray, aif: np.ndarray, times: np.ndarray,
                       regions: np.ndarray, *, n_base: int, voxel_ml: float, rho: float,
                       kh: float) -> float | None:
    """Volume (mL) of the lesion regions whose mean curve holds no bolus: the CBV of the mean
    of each region's curves, ``100 kH / rho x area(curve) / area(AIF)``, within
    +-:data:`NO_BOLUS_CBV` by two of its standard errors, over the regions of
    :data:`NO_BOLUS_MIN_ML` or more. The standard error is the mean curve's noise (from its
    second differences) carried through the area: the baseline mean's error, common to every
    later frame, and each frame's own. Noise alone makes small lesions of voxels whose
    baseline it raised: their mean curve stands below its baseline (CBV -0.4 to -2.4 on an
    unfiltered 64 px phantom at 2 s frames), which no tissue without blood does.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Enhancement curves (baseline subtracted).
    aif : ndarray, shape (T,)
        The AIF as the fits used it.
    times : ndarray, shape (T,)
    regions : ndarray of int, shape (N,)
        Each curve's lesion region (connected component), 0 for none.
    n_base : int
        Baseline frames whose mean was subtracted from the curves.
    voxel_ml, rho, kh : float

    Returns
    -------
    float or None
        None when the AIF has no positive area.
    """
    t = np.asarray(times, dtype=np.float64)
    area = float(np.trapezoid(np.asarray(aif, dtype=np.float64), t))
    if not area > 0:
        return None
    labels = np.asarray(regions)
    sizes = np.bincount(labels.ravel())
    to_cbv = 100.0 * kh / rho / area
    # the area's error per unit of the curve's noise: the baseline's mean error spans every
    # frame after it, each frame's own error its trapezoid weight
    weights = np.zeros(t.size)
    if t.size > 1:
        weights[:-1] += 0.5 * np.diff(t)
        weights[1:] += 0.5 * np.diff(t)
    base = max(int(n_base), 1)
    spread = float(np.sqrt(float(weights[base:].sum()) ** 2 / base + float(np.sum(weights ** 2))))
    volume = 0.0
    for k in np.flatnonzero(sizes * voxel_ml >= NO_BOLUS_MIN_ML):
        if k == 0:
            continue
        mean = tissue[:, labels == k].mean(axis=1, dtype=np.float64)
        cbv = to_cbv * float(np.trapezoid(mean, t))
        error = to_cbv * float(second_difference_sd(mean)) * spread
        if abs(cbv) + 2.0 * error < NO_BOLUS_CBV:
            volume += float(sizes[k]) * voxel_ml
    return volume


def lesion_no_bolus_flag(volume_ml: float | None) -> dict[str, Any]:
    """The ``lesion_no_bolus`` QC entry of :func:`lesion_no_bolus_ml`'s volume."""
    return {"flag": bool(volume_ml), "value": volume_ml,
            "reason": f"lesion regions whose mean curve holds no bolus (CBV within "
                      f"+-{NO_BOLUS_CBV:g} mL/100 g; the value is their volume, mL): tissue "
                      "without blood (an old infarct, gliosis, a cyst denser than the CSF cut) "
                      "or that the bolus never reached; an acute core keeps some blood. Its CBF "
                      "counts it as core and its Tmax is read from noise; the volumes include "
                      "it: read the unenhanced images"}


#: ``earlier_bolus`` is judged on a VOF that rises by at least this share of the AIF's peak.
EARLIER_BOLUS_MIN_VOF = 0.5
#: ``widespread_hypoperfusion``: the hypoperfused share of the less affected side of the
#: midline above which it is said (the twelve lesion and healthy phantoms of docs/methods.md:
#: 1 % at most), and of the whole brain where no midline was found.
WIDESPREAD_SIDE_SHARE = 0.10
WIDESPREAD_HYPO_SHARE = 0.6


def widespread_hypoperfusion_flag(share: float | None, sides: Mapping[str, float] | None,
                                  reference: str | None) -> dict[str, Any]:
    """The ``widespread_hypoperfusion`` QC entry: ``share`` of the brain (outside vessels)
    hypoperfused, each side's share (``sides``, ``{"left": ..., "right": ...}`` from the
    lesions' mid-sagittal plane; None without it) and the lesions' core reference
    (``thresholds["core"]["reference"]``). None share: not judged."""
    from ctperf.perfusion.lesions import MIN_NORMAL_SHARE, NO_NORMAL_TISSUE

    value = None if share is None else round(min(sides.values()) if sides else share, 4)
    raised = value is not None and (
        value > (WIDESPREAD_SIDE_SHARE if sides else WIDESPREAD_HYPO_SHARE)
        or reference == NO_NORMAL_TISSUE)
    return {"flag": bool(raised), "value": value,
            "reason": f"more than {WIDESPREAD_SIDE_SHARE:.0%} of the less affected side of the "
                      "midline is hypoperfused too (the value is its share; without a midline, "
                      f"more than {WIDESPREAD_HYPO_SHARE:.0%} of the brain): bilateral disease, "
                      "or a delay of the whole brain (an AIF taken early or in the wrong "
                      "vessel, poor cardiac output; bSVD's Tmax, late by 1.5-2.5 s in healthy "
                      "tissue, adds to it; noisy unfiltered maps) or a --tmax below healthy "
                      "tissue's, rather than a one-sided stroke (a probe's brain 3-5 s late: "
                      "246-309 mL hypoperfused against 14-32). With under "
                      f"{MIN_NORMAL_SHARE:.0%} of the brain at a normal Tmax, the core's "
                      "relative CBF was taken against the brain's median CBF (the thresholds "
                      "say so) and the core may be too small. Check the AIF's curve and the "
                      "Tmax map, or use --core-cbv"}


#: ``core_off_mirror``: the hypoperfused volume (mL) whose mirror image is mostly hypoperfused
#: too or outside the brain at or above which it is said, when it is also this share of the
#: hypoperfused volume or more (noisy bSVD maps of one-sided strokes over 16 slices: 11-34
#: mL, 3-5 %), or whatever its share from :data:`CORE_OFF_MIRROR_ALWAYS_ML` (a review's
#: 14.5 mL core beside a hemisphere's stroke: 63 mL, 8.6 %).
CORE_OFF_MIRROR_ML = 10.0
CORE_OFF_MIRROR_SHARE = 0.1
CORE_OFF_MIRROR_ALWAYS_ML = 50.0


def core_off_mirror_flag(volume_ml: float | None,
                         hypoperfused_ml: float | None = None) -> dict[str, Any]:
    """The ``core_off_mirror`` QC entry: the hypoperfused ``volume_ml`` whose mirror image
    across the midline is mostly hypoperfused too or outside the brain
    (``thresholds["core"]["hypoperfused_off_mirror_ml"]``), of ``hypoperfused_ml`` (default:
    ``volume_ml``). None: not judged (a core by CBV)."""
    whole = volume_ml if hypoperfused_ml is None else hypoperfused_ml
    raised = (volume_ml is not None and whole is not None and volume_ml >= CORE_OFF_MIRROR_ML
              and (volume_ml >= CORE_OFF_MIRROR_SHARE * whole
                   or volume_ml >= CORE_OFF_MIRROR_ALWAYS_ML))
    return {"flag": bool(raised), "value": volume_ml,
            "reason": f"{CORE_OFF_MIRROR_ML:g} mL or more of the hypoperfused tissue, and "
                      f"{CORE_OFF_MIRROR_SHARE:.0%} of it or {CORE_OFF_MIRROR_ALWAYS_ML:g} mL or "
                      "more (the value: its volume, mL), has a mirror image across the "
                      "midline that is mostly hypoperfused tissue or no brain: the other side "
                      "is hypoperfused too (both MCAs, a basilar or PCA stroke across the "
                      "midline, both ACAs), or lies outside "
                      "the image, or --core-reference global was asked. The core's relative "
                      "CBF there is taken against the median CBF of all normally perfused "
                      "brain, mostly white matter's flow, or against what normal tissue lies "
                      "at the mirror's edge, so grey matter's core there is read too small (a "
                      "probe's bilateral cores: 38.7 mL for 78.7 with nlr-fast, 57.3 with "
                      "bayes; a basilar-top core 11.5 and 23.9 for 43.8). Read the core as a "
                      "lower bound: check the CBF and CBV maps, or use --core-cbv with a "
                      "threshold below the white matter's CBV"}


def raised_flags(flags: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the raised flags among :func:`qc_flags`' (``provenance["qc"]``)."""
    return [name for name, flag in flags.items() if flag["flag"]]


def qc_flags(
    *,
    times: np.ndarray,
    aif: np.ndarray,
    vof: np.ndarray | None = None,
    venous: np.ndarray | None = None,
    tissue_mean: np.ndarray | None = None,
    late_mean: np.ndarray | None = None,
    brain_mean: np.ndarray | None = None,
    baseline_sd: float | None = None,
    baseline_frames: int | None = None,
    brain_voxels: int | None = None,
    voxel_ml: float | None = None,
    pv_factor: float | None = None,
    displacement_mm: np.ndarray | None = None,
    uncorrected_mm: np.ndarray | None = None,
    skull_shift: float | None = None,
    hyperdense_ml: float | None = None,
    pv_corrected: bool | None = None,
    box_mtt: np.ndarray | None = None,
    csf_cut_share: float | None = None,
    hu_offset: float | None = None,
    end_fraction: float = TRUNCATED_END,
    min_aif_peak_hu: float = 100.0,
    late_aif_fraction: float = 0.6,
    max_aif_lead_s: float = MAX_AIF_LEAD_S,
    max_baseline_sd_hu: float = 15.0,
    min_start_fraction: float = 0.05,
    min_baseline_frames: int = 3,
    pv_range: tuple[float, float] = (0.8, 4.0),
    min_brain_ml: float = 20.0,
    max_motion_mm: float = 2.0,
    max_mtt_floor_share: float = 0.02,
    max_csf_cut_share: float = 0.10,
    brain_slice_share: np.ndarray | None = None,
    min_brain_slice_share: float = 0.75,
    exposed_share: float | None = None,
    max_exposed_share: float = 0.005,
    skull_share: float | None = None,
    edge_share: float | None = None,
    max_edge_share: float = 0.5,
    voxelwise: bool | None = None,
    max_voxelwise_sd_hu: float = 4.0,
    max_below_fraction: float = 0.05,
    osvd_step_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Flags that warn a reader when the maps may mislead.

    Parameters
    ----------
    times : ndarray, shape (T,)
    aif : ndarray, shape (T,)
        Measured (uncorrected) AIF enhancement, HU.
    vof : ndarray, shape (T,), optional
        The VOF that scaled the AIF (enhancement, HU).
    venous : ndarray, shape (T,), optional
        The VOF found, whether or not it scaled the AIF (default ``vof``): ``earlier_bolus``
        judges its baseline frames.
    tissue_mean : ndarray, shape (T,), optional
        Mean brain enhancement, vessels left out, HU.
    late_mean : ndarray, shape (T,), optional
        Mean enhancement of the tissue of long Tmax (the hypoperfused region, vessels left
        out), HU: its last frame is judged for ``truncation`` as the other curves' are (the
        brain's mean hides a lesion whose bolus the scan's end cut off).
    brain_mean : ndarray, shape (T,), optional
        Mean enhancement of the whole fitted brain, vessels included (whatever an AIF chose
        as vessels), HU: ``below_baseline`` where, after the baseline frames, it falls below 0
        by more than ``max_below_fraction`` of its peak.
    baseline_sd : float, optional
        Median over brain voxels of the pre-bolus standard deviation, HU.
    baseline_frames : int, optional
        Frames before the bolus whose mean was subtracted from every curve.
    brain_voxels : int, optional
    voxel_ml : float, optional
    pv_factor : float, optional
        AIF scale from the VOF (VOF area / AIF area).
    displacement_mm : ndarray, shape (T,), optional
        Mean frame-wise displacement from motion correction.
    uncorrected_mm : ndarray, shape (T,), optional
        Mean frame-wise displacement measured by motion correction and not corrected.
    skull_shift : float, optional
        :func:`skull_shift_px` of a study that was not registered, pixels.
    hyperdense_ml : float, optional
        Volume of the brain that was blood-dense before the bolus
        (:func:`ctperf.masks.hyperdense_mask`), mL.
    pv_corrected : bool, optional
        Whether a VOF corrected the AIF for partial volume (False: none found, or rejected).
    box_mtt : ndarray, shape (N,), optional
        The box model's MTT of the tissue curves with a positive CBV (``nlr``, ``nlr-fast``;
        vessels left out), s: its share on the fit's lower MTT bound is judged.
    brain_slice_share : ndarray, shape (Z',), optional
        Per slice that cuts the head well, the brain mask's share of what the skull encloses,
        over that share's median across the slices: a slice far below the others lost brain
        to an artefact (metal streaks, a cut-off field of view).
    exposed_share : float, optional
        Share of the brain nearer to air or the image's edge than to bone (the field of view
        cuts the head there).
    skull_share : float, optional
        Share of the unenhanced study's voxels above bone density: ``no_skull`` under
        :data:`~ctperf.masks.SKULL_SHARE`.
    edge_share : float, optional
        The largest share, over the slices, of the image's edge pixels inside the brain with
        no bolus in them (:func:`flat_edge_share`): with no skull, above ``max_edge_share`` the
        "brain" is a flat background (``no_head_outline``).
    voxelwise : bool, optional
        Whether each voxel's curve was fitted alone (the box and SVD methods; ``bayes`` pools
        neighbours): its pre-bolus noise, as it would be at :data:`NOISE_STEP_S` frames under
        an AIF of at least :data:`NOISE_AIF_PEAK_HU` (where ``pv_corrected``: the AIF times
        ``pv_factor``), is then judged against ``max_voxelwise_sd_hu``
        (``noisy_voxelwise``'s value), and the
        AIF's width against :data:`AIF_WIDE_S` (``aif_wide``).
    csf_cut_share : float, optional
        Share of the brain (less the smoothed CSF) that its voxels' temporal mean left out as
        CSF (:func:`ctperf.masks.tissue_csf_midpoint`).
    hu_offset : float, optional
        Offset of the study's HU scale (:func:`ctperf.masks.hu_offset`; 0: calibrated), HU.
    osvd_step_s : float, optional
        The step (s) between the samples oSVD deconvolved (the frames, or the uniform grid
        they were put on), for maps made with ``osvd``: ``osvd_coarse_frames`` above
        :data:`MAX_OSVD_STEP_S` (its value; None for the other methods).

    Returns
    -------
    dict
        ``{name: {"flag": bool, "value": float | None, "reason": str}}`` for ``truncation``,
        ``aif_low_peak``, ``aif_late_peak``, ``aif_wide``, ``aif_after_tissue``,
        ``noisy_baseline``,
        ``short_baseline``, ``bolus_at_start``, ``earlier_bolus``, ``frame_gap``,
        ``aif_vof_ratio``, ``no_vof``,
        ``few_brain_voxels``, ``motion``, ``motion_uncorrected``, ``motion_unregistered``,
        ``below_baseline``, ``hyperdense``,
        ``mtt_floor``, ``csf_cut``,
        ``hu_offset``, ``brain_slice_gap``, ``fov_cut``, ``no_skull``, ``no_head_outline``,
        ``noisy_voxelwise`` and ``osvd_coarse_frames``;
        a flag that cannot be judged has ``value`` None. ``hu_offset``'s value is
        ``hu_offset``, ``fov_cut``'s ``exposed_share``, ``no_skull``'s ``skull_share``.
        ``aif_after_tissue``'s value is how many seconds the mean brain curve's arrival
        precedes the AIF's (:func:`aif_lag`: each curve smoothed over time and rising past
        20 % of its peak and :data:`ARRIVAL_SDS` SDs of its noise). ``mtt_floor``'s value is
        the share of ``box_mtt`` on the lower bound, ``csf_cut``'s ``csf_cut_share``,
        ``brain_slice_gap``'s the lowest of ``brain_slice_share``, ``frame_gap``'s the longest
        gap after the AIF's arrival (s; 0 for none).
    """
    t = np.asarray(times, dtype=np.float64)
    flags: dict[str, dict[str, Any]] = {}

    def put(name: str, flag: bool, value: float | None, reason: str) -> None:
        flags[name] = {"flag": bool(flag), "value": None if value is None else float(value),
                       "reason": reason}

    # each curve smoothed over time as arrivals are read: one noisy last frame had turned the
    # flag on and off between noise draws of one patient (0.29-0.34 about 0.30)
    smoothed = [smooth_time(np.asarray(c, dtype=np.float64))
                for c in (aif, vof, tissue_mean, late_mean) if c is not None]
    ends = [float(c[-1] / c.max()) for c in smoothed if c.max() > 0]
    end = max(ends) if ends else None
    put("truncation", end is not None and end > end_fraction, end,
        f"the last frame (smoothed over time) of the AIF, the VOF, the tissue's mean curve or "
        f"the mean curve of the tissue of long Tmax (where most of its neighbours are late "
        f"too, not the voxels read late by their noise alone, and when that mean holds a "
        f"bolus) is above {end_fraction:.0%} of "
        "its peak: "
        "bolus not washed out (a scan too short), or a baseline drifting upwards, so CBV and "
        "MTT are biased (the "
        "area after the last frame is missing; fits extrapolate it, in either direction), and "
        "a late core's flow may read high enough to lose it (core_unseen is not judged where "
        "the scan ends before a core's passage peaks)")
    below = None
    if brain_mean is not None and np.max(brain_mean) > 0 and baseline_frames is not None:
        after = np.asarray(brain_mean)[baseline_frames:]
        below = float(np.min(after) / np.max(brain_mean)) if after.size else None
    put("below_baseline", below is not None and below < -max_below_fraction, below,
        f"the brain's mean curve falls below its pre-bolus level by more than "
        f"{max_below_fraction:.0%} of its peak, which contrast cannot do: the baseline drifts "
        "(beam hardening, a scanner's calibration) or the head moved, so every curve carries "
        "the drift and the maps and lesion volumes are biased (a phantom with a -10 HU drift "
        "over the scan read a core four times the truth); check the frames, and rescan or "
        "leave the drifting frames out")
    gaps, _ = frame_gaps(t)
    try:
        arrival = first_pass(aif)[0]
    except ValidationError:
        arrival = 0
    late = [float(t[i + 1] - t[i]) for i in gaps if i >= arrival]
    put("frame_gap", bool(late), max(late, default=0.0),
        f"frames missing after the bolus arrived (steps over {GAP_FACTOR:g} times the frames "
        f"around them and over {GAP_MIN_S:g} s; the value is the longest, s): the tissue "
        "curves' passage is sampled incompletely, which biases CBV "
        "and the lesion volumes (a phantom missing 11 s of its venous phase: box-model CBV "
        "+24 %, bayes hypoperfused volume 30 mL against 49)")
    peak = float(np.max(aif))
    put("aif_low_peak", peak < min_aif_peak_hu, peak,
        f"AIF peak below {min_aif_peak_hu:.0f} HU: poor injection or partial volume")
    when = float(t[int(np.argmax(aif))] - t[0])
    put("aif_late_peak", when > late_aif_fraction * (t[-1] - t[0]), when,
        f"AIF peaks after {late_aif_fraction:.0%} of the acquisition: late bolus, risk of "
        "truncation")
    width = aif_half_width_s(t, aif)
    wide = width is not None and (width > AIF_WIDE_S or split_bolus(aif))
    put("aif_wide", bool(voxelwise) and wide, width if voxelwise else None,
        f"the AIF stands above half its peak for more than {AIF_WIDE_S:g} s, or in two "
        "passes (low cardiac output, a slow injection or a split bolus; the value is the span "
        "in s from its first rise past half its peak to its last fall below it) with a method that "
        "fits each voxel alone (the box and SVD methods): the SVD methods' truncation then "
        "keeps less of its "
        "spectrum, so CBF reads low and the core shrinks (a probe's low-output head, 16 s: "
        "bSVD grey matter CBF -56 %, core 0.7 mL for 11.4, oSVD 2.6; a split bolus, peaks 8 s "
        "apart: oSVD CBF -57 %, bSVD core 0), while the box model's core grows (17.5 mL); "
        "bayes held (10.7 mL)")
    lead = None if tissue_mean is None else aif_lag(t, aif, tissue_mean)
    lead_text = f"more than {max_aif_lead_s:g} s before " if max_aif_lead_s > 0 else "before "
    put("aif_after_tissue", lead is not None and lead > max_aif_lead_s, lead,
        f"the brain's bolus arrives {lead_text}the AIF's: the AIF "
        "was taken downstream of much of the brain, so delays, Tmax and CBF are unreliable "
        "(choose an earlier artery)")
    put("noisy_baseline", baseline_sd is not None and baseline_sd > max_baseline_sd_hu,
        baseline_sd, f"pre-bolus noise above {max_baseline_sd_hu:.0f} HU")
    put("short_baseline", baseline_frames is not None and baseline_frames < min_baseline_frames,
        baseline_frames, f"fewer than {min_baseline_frames} frames taken as the baseline (the "
        "value; the frames before the bolus's arrival less two, or one where those two span "
        "more than 3 s: docs/methods.md, \"Baseline\"): each "
        "curve's unenhanced value is the mean of so few frames, and its error is in every later "
        "frame (noisier CBV and CBF; with the box model on a one-frame baseline a phantom's "
        "core read 47 mL against a true 7, bayes 5 mL); start the scan a few seconds before "
        "the contrast arrives")
    rise, span, noise = start_level(aif)
    begun = span > 0 and bool(enhanced_at_start(rise, span, noise, fraction=min_start_fraction))
    climb = start_climb(aif, t, baseline_frames or 0)
    put("bolus_at_start", begun or climb > min_start_fraction,
        max(rise / span, climb) if span > 0 else None,
        f"the AIF's first frame stands more than {min_start_fraction:.0%} of its rise above its "
        f"lowest values, or it climbs from its first frame through its baseline frames by "
        f"more than {min_start_fraction:.0%} of its rise (a line through them, rising by more "
        "than five times its noise and from the start; the value is the larger share; or a "
        "baseline drifting upwards, which biases the maps too: check the frames): the "
        "bolus had begun when the scan "
        "started (the scan began on its upslope), so the baseline holds "
        "contrast and CBV and CBF are wrong: low with the box model and bayes (a phantom whose "
        "AIF stood at 8 % of its peak: CBV -19 to -23 %, the hypoperfused volume 37 mL "
        "against 60 with bayes), high with the SVD methods (a probe's noise-free curves: CBV "
        "+38 % at 5 % of the rise, +118 % at 10 %); start the scan earlier (at 20 % the study "
        "is refused). Contrast left in the blood by an earlier injection (a CT angiogram just "
        "before), washing out through the scan, raises it too, with below_baseline; a "
        "probe's maps were then within 1 mL of its lesions without that contrast")
    vein = vof if venous is None else venous
    fall = None
    above = False
    if vein is not None and baseline_frames is not None:
        height, rise, noise = baseline_fall(vein, baseline_frames)
        # a vein rising under half the AIF's peak is too weak to read (noise correlated over
        # three frames raised it in 3-5 % of such curves)
        if rise > 0 and rise >= EARLIER_BOLUS_MIN_VOF * float(np.max(aif)):
            fall, above = height / rise, bool(height > 5.0 * noise)
    put("earlier_bolus", fall is not None and fall > min_start_fraction and above, fall,
        f"the VOF's first frame stands more than {min_start_fraction:.0%} of its rise above "
        "the level its baseline frames end at (the value is that share; raised where it is "
        "also over five times its noise; not judged, no value, where the VOF rises less than "
        f"{EARLIER_BOLUS_MIN_VOF:.0%} of the AIF's peak): it falls through the frames before the "
        "bolus, as the tail of an earlier injection washes out of the veins (a test bolus, or "
        "a CT angiogram shortly before), so every curve's baseline holds contrast and the "
        "maps and lesion volumes are biased (a probe's test bolus of 30 % of the main one, "
        "25 s before it: the core +21 to +28 % with nlr-fast, +10 % with bayes, no other flag "
        "with its VOF used; 20 s before: +93 % with nlr-fast). A test bolus 30-40 s before, or "
        "of 10-20 %, leaves too little in the veins to be told from noise, and can still move "
        "nlr-fast's core (docs/methods.md). Leave the contrast time to clear between "
        "injections")
    put("aif_vof_ratio", pv_factor is not None and not pv_range[0] <= pv_factor <= pv_range[1],
        pv_factor, f"VOF/AIF area ratio outside [{pv_range[0]}, {pv_range[1]}]: wrong AIF or VOF "
        "choice (judged on a VOF that was used; with none, no_vof is raised and this flag "
        "has no value: summary.json's partial_volume has the rejected VOF's ratio)")
    put("no_vof", pv_corrected is False, None if pv_corrected is None else float(pv_corrected),
        "AIF not corrected for partial volume (no plausible VOF): CBF and CBV read high by "
        "as much as the measured AIF is diluted by the arteries' partial volume")
    vol = None if brain_voxels is None or voxel_ml is None else brain_voxels * voxel_ml
    put("few_brain_voxels", vol is not None and vol < min_brain_ml, vol,
        f"brain mask under {min_brain_ml:.0f} mL: a partial scan, or a phantom of separate "
        "regions (tiles), of which the automatic mask keeps the largest; give the region to "
        "fit with --brain-mask (with --aif-mask and --vof-mask for vessels outside it)")
    motion = None if displacement_mm is None else float(np.max(displacement_mm))
    put("motion", motion is not None and motion > max_motion_mm, motion,
        f"frame-wise displacement above {max_motion_mm} mm: if part of it was through plane, "
        "resampling thick slices biases CBF and CBV even after correction (the README's "
        "known limitations)")
    left = (None if uncorrected_mm is None or np.size(uncorrected_mm) == 0
            else float(np.max(uncorrected_mm)))
    put("motion_uncorrected", left is not None and left > max_motion_mm, left,
        f"frames moved by more than {max_motion_mm} mm and were not corrected (beyond the "
        "registration's plausible range): their curves mix tissues, which biases every map "
        "there; check the frames, leave the moved ones out, or rescan")
    put("motion_unregistered", skull_shift is not None and skull_shift > MAX_SKULL_SHIFT_PX,
        skull_shift, f"the skull's edges move by more than {MAX_SKULL_SHIFT_PX:g} pixel between "
        "frames (estimated from the images; the value in pixels) and the study was not "
        "registered: the head moved, "
        "so voxels' curves mix tissues and vessels, which biases every map and the lesion "
        "volumes; register it (--register)")
    put("hyperdense", bool(hyperdense_ml), hyperdense_ml,
        f"brain tissue at {HYPERDENSE_HU:g}-{HYPERDENSE_MAX_HU:g} HU before the bolus, in "
        f"regions of {HYPERDENSE_MIN_ML:g} mL or more: blood-dense (a haemorrhage or a "
        "thrombosed sinus; or a metal or beam-hardening streak's bright band, which "
        "brain_slice_gap may then name too), which no perfusion threshold can call ischaemic; "
        "it was left out "
        "of the lesions (the value is its volume, mL): read the unenhanced images")
    floor_s = DEFAULT_BOUNDS[1][0]
    share = None
    if box_mtt is not None:
        mtt = np.asarray(box_mtt, dtype=np.float64)
        mtt = mtt[np.isfinite(mtt)]
        share = float(np.mean(mtt <= floor_s * (1.0 + 1e-6))) if mtt.size else None
    put("mtt_floor", share is not None and share > max_mtt_floor_share, share,
        f"box fits ended on the shortest MTT allowed ({floor_s:g} s) in more than "
        f"{max_mtt_floor_share:.0%} of the tissue curves: a shorter box placed later fits "
        "them as well, so there MTT is set by the bound, not the data, and their CBF (CBV / "
        "MTT) reads several times too high (their CBV, the curve's area, less so, but a box "
        "that short leaves out a long-tailed residue's tail: 43 % low in a probe's white "
        "matter of exponential residues at 2 HU, unfiltered; the value is their share). "
        "It comes with low contrast-to-noise (an unfiltered study: filter it as the paper "
        "did, or use bayes), "
        "with box-like residues under a wide bolus (docs/methods.md, \"The MTT floor\"), and "
        "with an arterial curve whose peak was cut flat (the VOF restores its area, not its "
        "shape: check the AIF's curve in summary.json)")
    put("csf_cut", csf_cut_share is not None and csf_cut_share > max_csf_cut_share,
        csf_cut_share, f"more than {max_csf_cut_share:.0%} of the brain was darker than the "
        "midpoint of its CSF and tissue and was left out as CSF: a large hypodense region (an "
        "old infarct, oedema), atrophy's wide sulci and ventricles (then the mask is right), "
        "or HU that are not HU. Tissue below 15 HU before the bolus, "
        "CSF's own density, is left out as CSF before that and is not counted (only a rim "
        "the smoothing lifts above 15 HU is): an old infarct that dense may raise no flag. "
        "Check the brain mask, or pass your own (--brain-mask)")
    low, high = PARENCHYMA_HU
    put("hu_offset", bool(hu_offset), hu_offset,
        f"the brain's median before the bolus lies outside the {low:g}-{high:g} HU of unenhanced "
        f"brain and the air is as far off (by {AIR_TOLERANCE_HU:g} HU or more; or there is no "
        f"air to read), or inside it but {IN_RANGE_BRAIN_OFF_HU:g} HU or more off its nominal "
        f"{NOMINAL_PARENCHYMA_HU:g} HU with the air {IN_RANGE_AIR_TOLERANCE_HU:g} HU or more "
        "off the same way: the study's HU scale is offset by the value (a RescaleIntercept of "
        "-1000 applied for -1024, an uncalibrated scanner, a conversion that added a constant). "
        "Bone, brain and CSF were found on the scale moved back, and the maps use only "
        "differences from the baseline, but check the conversion and the brain mask "
        "(lesions/brain.nii.gz)")
    lowest = (None if brain_slice_share is None or np.size(brain_slice_share) == 0
              else float(np.min(brain_slice_share)))
    put("brain_slice_gap", lowest is not None and lowest < min_brain_slice_share, lowest,
        f"a slice's brain mask covers less than {min_brain_slice_share:.0%} of the share of "
        "the skull's interior that the other slices' cover: an artefact (metal streaks, beam "
        "hardening), a cut-off field of view, or bone and air near the skull base took brain "
        "out of it, and its lesions are missing from the volumes; check the brain mask "
        "(lesions/brain.nii.gz), or pass your own (--brain-mask)")
    put("fov_cut", exposed_share is not None and exposed_share > max_exposed_share,
        exposed_share, f"more than {max_exposed_share:.1%} of the brain meets air or the "
        "image's edge with no skull between: the field of view cuts the head, so the brain "
        "beyond it is missing from the lesion volumes, and the mid-sagittal plane and the "
        "contralateral reference are read from part of a head; reconstruct with a field of "
        "view that holds the whole head")
    no_skull = skull_share is not None and skull_share < SKULL_SHARE
    put("no_skull", no_skull, skull_share,
        "no skull in the study (a skull-stripped study, or a phantom without one): the "
        "superior sagittal sinus, where the VOF that scales the AIF for partial volume is best "
        "measured, usually goes with the skull, and a cortical vein taken instead is diluted "
        "itself (a probe's stripped study: CBV and CBF 36 % high, no other flag); fov_cut "
        "cannot be judged; the lesions leave out the brain's outer 2 mm, here the cortex's "
        "surface. Check the VOF's voxels (summary.json), or give --vof-mask on the sinus of "
        "the unstripped study")
    put("no_head_outline", no_skull and edge_share is not None and edge_share > max_edge_share,
        edge_share if no_skull else None,
        f"no skull, and the brain found covers more than {max_edge_share:.0%} of the image's "
        "edges in a slice, with no bolus there: no head's outline (a phantom of tiles on a "
        "flat tissue-like background): its background was mapped as brain, so the lesion "
        "volumes, the mid-sagittal plane and the contralateral reference include it and mean "
        "nothing (a tile phantom's 684 mL of core, 63 mL of it in the tiles); the tiles' maps "
        "stand. Give --brain-mask on the tiles for lesions of the tiles only")
    # Noise per frame weighs with the frames' pace: at 2 s frames a curve holds a quarter of the
    # frames of a 0.5 s study over the same passage, as if each were twice as noisy. The median
    # step after the arrival: one delayed frame at the end adds a sample, not noise
    # Tissue enhances in proportion to the arterial concentration, so the same noise over a
    # bolus half as high is the noise of twice as many HU over a typical one (a probe's AIF of
    # 170 HU at 2 HU per 1 s frame: bSVD's hypoperfused volume +50 %, its core -95 %, where
    # the same contrast-to-noise at 400 HU raised the flag). Only an AIF that a VOF corrected
    # tells the bolus's height: one diluted by partial volume (no_vof) reads low at any dose
    paced = None
    if baseline_sd is not None and t.size > arrival + 1:
        step = float(np.median(np.diff(t[arrival:])))
        arterial = float(np.max(aif)) * (pv_factor or 1.0)
        weak = NOISE_AIF_PEAK_HU / arterial if pv_corrected and arterial > 0 else 1.0
        paced = (baseline_sd * float(np.sqrt(max(step, 1e-9) / NOISE_STEP_S))
                 * max(1.0, weak))
    put("noisy_voxelwise", bool(voxelwise) and paced is not None
        and paced > max_voxelwise_sd_hu, paced if voxelwise else None,
        f"pre-bolus noise above {max_voxelwise_sd_hu:g} HU per {NOISE_STEP_S:g} s frame (the "
        "noise per frame times the square root of the median frame interval after the bolus's "
        f"arrival over {NOISE_STEP_S:g} s: 2 HU at 2 s frames counts as 4; and, under an AIF "
        f"that a VOF corrected for partial volume peaking below {NOISE_AIF_PEAK_HU:g} HU, times "
        f"{NOISE_AIF_PEAK_HU:g} HU over its peak: 2 HU under a 200 HU bolus counts as 4) with a "
        "method that fits each voxel alone: at this "
        "noise the SVD methods' Tmax and the box model's CBF scatter so widely that lesion "
        "volumes are unreliable either way (unfiltered 150 mAs phantoms, 8 HU: bSVD "
        "read 25 mL hypoperfused in a lesion-free head and no core where the truth held 2.5-16.8 "
        "mL, nlr-fast three times the true core); filter the study first as the paper did "
        "(--register --filter), or use bayes")
    put("osvd_coarse_frames", osvd_step_s is not None and osvd_step_s > MAX_OSVD_STEP_S,
        osvd_step_s, f"oSVD on samples more than {MAX_OSVD_STEP_S:g} s apart: its "
        "oscillation index averages the residue's second differences over fewer samples, so "
        "the residue's own rise and fall push it over its limit and it truncates harder than "
        "the noise asks; CBF reads low (noise-free curves at 2 s frames: -26 % in the median "
        "on a probe's 31-frame series, -45 to -57 % on curves from another group's forward "
        "model with an 8.6 s wide bolus, where bSVD read -15 and -26 to -38 %): use bsvd or "
        "bayes")
    return flags
