"""A study before its vessels: the padding and HU scale, the bolus's arrival and the baseline
frames, a scan begun after the bolus, and the brain to fit.

:func:`study_start` reads all of it for :func:`~ctperf.perfusion.run_perfusion`;
:func:`check_scan_start` refuses, for an estimate that fits no AIF (the U-Net), exactly the
studies that ``run_perfusion`` refuses for their start.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ctperf import masks
from ctperf.errors import ValidationError
from ctperf.perfusion.curves import (
    ARRIVAL_NOISE_GAIN,
    bolus_started_message,
    brief_peak,
    enhanced_at_start,
    second_difference_sd,
    smooth_time,
)
from ctperf.perfusion.inputs import voxel_noise_sd
from ctperf.types import CTPSeries

log = logging.getLogger(__name__)

__all__ = ["MIN_BOLUS_SNR", "bolus_arrival_s", "check_scan_start", "check_vessels_at_start",
           "enhancement", "pre_bolus_frames", "study_start", "without_still"]


class _Onset(NamedTuple):
    """Per voxel (Z, Y, X), of the curves smoothed over time: how far the first frame stands
    above the lowest value (``height``), the range (``span``), the frame of the highest value,
    whether the curve as acquired peaks for a frame or two only (``brief``,
    :func:`~ctperf.perfusion.curves.brief_peak`); and the smoothed curves' noise SD, HU."""

    height: np.ndarray
    span: np.ndarray
    lowest: np.ndarray
    peak_at: np.ndarray
    brief: np.ndarray
    noise_sd: float


#: Longest span (s) of the two frames :func:`pre_bolus_frames` leaves between the baseline and
#: the bolus's smoothed arrival; wider frames leave one.
MARGIN_SPAN_S = 3.0


def pre_bolus_frames(hu: np.ndarray, rise: np.ndarray, *, noise_sd: float = 0.0,
                     share: float = 0.25, most: int = 5000, percentile: float = 5.0,
                     times: np.ndarray | None = None, sustained: bool = False) -> int:
    """Frames before the bolus: two less than an early percentile of the arrival frames of the
    voxels rising by at least ``share`` of the largest ``rise`` (Z, Y, X), at most ``most`` of
    them (one less where those two frames span more than :data:`MARGIN_SPAN_S` of ``times``,
    s); arrival is where a curve, smoothed over time, first exceeds 20 % of its own rise above
    its start, and four times the smoothed curves' noise (``noise_sd`` of one frame, HU), so
    that a weak vessel's noise does not cross for it. ``sustained``: arrival is where the run
    of such frames that holds the curve's peak begins, so that a spike before the bolus (one
    frame of a motion artefact in a given AIF) is not read as it."""
    flat = rise.ravel()
    n = min(most, int(np.count_nonzero(flat >= share * flat.max())))
    top = np.argpartition(flat, flat.size - max(n, 1))[-max(n, 1):]
    c = smooth_time(hu.reshape(hu.shape[0], -1)[:, top])
    rel = c - np.median(c[: min(3, c.shape[0])], axis=0)
    smoothed_sd = noise_sd * ARRIVAL_NOISE_GAIN
    above = rel > np.maximum(0.2 * rel.max(axis=0), 4.0 * smoothed_sd)
    # a curve that never crosses has no arrival (argmax would read its first frame: a poor
    # injection's noisy tissue among the strongest risers had ended the baseline at frame 1)
    crossed = above.any(axis=0)
    if not crossed.any():
        return 1
    first = np.argmax(above[:, crossed], axis=0)
    if sustained:  # the frame after the last one below the level before the peak
        frame = np.arange(rel.shape[0])[:, None]
        before = ~above[:, crossed] & (frame < np.argmax(rel[:, crossed], axis=0))
        first = np.where(before.any(axis=0),
                         rel.shape[0] - np.argmax(before[::-1], axis=0), 0)
    arrival = int(np.percentile(first, percentile))
    # two frames early: the smoothing (one frame's SD) moves a crossing by up to a frame; one
    # where frames are seconds apart (3 s frames had kept 1 of 3 pre-bolus frames)
    margin = 2
    if times is not None and arrival >= 2 and times[arrival] - times[arrival - 2] > MARGIN_SPAN_S:
        margin = 1
    return max(1, arrival - margin)


def _bolus_baseline(vhu: np.ndarray, times: np.ndarray, *, spacing: tuple[float, float, float],
                    offset: float = 0.0) -> tuple[int, np.ndarray, _Onset]:
    """Frames before the bolus, the voxels next to bone (bool (Z, Y, X)), and what
    :func:`check_vessels_at_start` needs; ``offset`` (HU) is taken off before bone and soft tissue
    are told apart by their attenuation.

    Bolus arrival from the enhancing vessels, arteries and veins alike: partial volume can leave
    the arteries weaker than a large sinus, so every voxel rising by a quarter of the strongest
    rise counts, and an early percentile of their arrivals (not the single earliest, which noise
    can make) ends the baseline, two frames early. Only voxels of soft tissue or blood in the
    first frame, away from bone, whose rise washes out count: where the head moved, or frames
    were resampled to correct it, air and bone edges step by hundreds of HU at any time. Rises
    and arrivals are read from the curves smoothed over time (:data:`ARRIVAL_SMOOTH_FRAMES`):
    in a noisy study whose arteries are diluted by partial volume, the largest excursion of
    noise alone reaches a quarter of the arteries' rise, and such voxels' random "arrivals"
    ended the baseline at the first frames. Curves raised for a frame or two only
    (:func:`~ctperf.perfusion.curves.brief_peak`: bone a jerk of the head carried in) are no
    bolus: their rise of a thousand HU had set the quarter above every vessel's, and the jerk's
    frame had ended the baseline.
    """
    first, last, top, low = (np.empty(vhu.shape[1:], dtype=np.float32) for _ in range(4))
    peak_at = np.empty(vhu.shape[1:], dtype=np.int64)
    brief = np.empty(vhu.shape[1:], dtype=bool)
    for z in range(vhu.shape[1]):  # 16 rows at a time: no smoothed copy, and cache-sized
        for y in range(0, vhu.shape[2], 16):
            rows = vhu[:, z, y:y + 16]
            brief[z, y:y + 16] = brief_peak(rows.reshape(rows.shape[0], -1),
                                            times).reshape(rows.shape[1:])
            sm = smooth_time(rows)
            first[z, y:y + 16], last[z, y:y + 16], top[z, y:y + 16] = sm[0], sm[-1], sm.max(0)
            low[z, y:y + 16], peak_at[z, y:y + 16] = sm.min(0), sm.argmax(0)
    rise = top - first
    if not float(rise.max()) > 5.0:
        raise ValidationError("flat curves: no voxel enhances by more than 5 HU over time")
    bone_rim = masks.near_bone(first - offset, spacing=spacing)
    calm = (first > -100 + offset) & (first < 200 + offset) & (last - first <= 0.5 * rise)
    calm &= top - low > masks.STILL_HU  # padding (a stripped study's 0 HU) has no noise to read
    calm &= ~bone_rim
    if calm.sum() < 20:  # too few such voxels: every voxel counts
        calm = np.ones_like(calm)
    # the frames' noise, from the curves of up to 4,096 of those voxels, evenly spaced
    where = np.flatnonzero(calm)
    sample = where[np.linspace(0, where.size - 1, min(where.size, 4096)).astype(np.int64)]
    noise = voxel_noise_sd(vhu.reshape(vhu.shape[0], -1)[:, sample], 0)
    onset = _Onset(first - low, top - low, low, peak_at, brief, noise * ARRIVAL_NOISE_GAIN)
    return (pre_bolus_frames(vhu, np.where(calm & ~brief, rise, -np.inf), noise_sd=noise,
                             times=times), bone_rim, onset)


def check_vessels_at_start(onset: _Onset, region: np.ndarray, *, remedy: str = "") -> None:
    """Refuse a study whose arteries were already enhanced at the first frame.

    The vessels are the voxels of ``region`` (bool (Z, Y, X): inside the head, away from bone)
    never below -100 HU whose curves span at least a quarter of the strongest span there
    (99.9th percentile) and ten times the smoothed noise, whatever their first frame: an artery
    imaged from the middle of its bolus rises little after it, so it is found by its span, not
    by its rise. Their earliest-peaking tenth are arteries; when most of those stand at their
    first frame more than :data:`~ctperf.perfusion.curves.BOLUS_AT_START` of their span, and
    five times the smoothed noise, above their lowest value (contrast only adds attenuation:
    the lowest is the unenhanced value), the scan began after the contrast arrived. Curves
    that peak for a frame or two only (``onset.brief``: a jerk of the head) are no vessels.
    ``remedy`` ends the refusal's message.
    """
    soft = region & (onset.lowest > -100) & ~onset.brief
    if not soft.any():
        return
    span = onset.span
    strong = soft & (span >= max(0.25 * float(np.percentile(span[soft], 99.9)),
                                 10.0 * onset.noise_sd))
    if strong.sum() < 10:
        return
    when = onset.peak_at[strong]
    early = when <= np.percentile(when, 10)
    height, reach = onset.height[strong][early], span[strong][early]
    level = height / np.maximum(reach, 1e-12)
    started = enhanced_at_start(height, reach, onset.noise_sd)
    if started.mean() > 0.5:
        raise ValidationError(bolus_started_message(
            f"{started.mean():.0%} of the earliest-peaking vessels are enhanced at it, by a "
            f"median {np.median(level):.0%} of their range") + remedy)


class _Brain(NamedTuple):
    """The brain fitted and the region searched for vessels (bool (Z, Y, X)); the HU below which
    a voxel's temporal mean left it out as CSF and the share of the brain it left out (None: no
    such cut)."""

    fitted: np.ndarray
    search: np.ndarray
    csf_cut: float | None = None
    csf_share: float | None = None


def _brain(base: np.ndarray, mean: np.ndarray, given: np.ndarray | None, *,
           spacing: tuple[float, float, float], offset: float = 0.0,
           padding: np.ndarray | None = None) -> _Brain:
    """The automatic brain less CSF (the smoothed pre-bolus ``base`` below 15 HU, then voxels
    darker than :func:`~ctperf.masks.tissue_csf_midpoint` in their temporal ``mean``), and the
    automatic brain with the CSF and with what it encloses in each slice for the search
    (vessels still bright from an earlier injection, such as an angiogram's, are above the brain
    mask's bone threshold before this bolus); or the given mask for both, with no cut. The
    thresholds apply to HU less ``offset`` (:func:`~ctperf.masks.hu_offset`); ``padding``
    (:func:`~ctperf.masks.padding_mask`) is read as air."""
    if given is not None:
        brain = masks.as_region(given, base.shape, "brain mask")
        if not brain.any():
            raise ValidationError("the brain mask given selects no voxel")
        return _Brain(brain, brain)
    if offset:
        base, mean = base - offset, mean - offset
    base, mean = masks.as_air(base, padding), masks.as_air(mean, padding)
    whole = masks.brain_mask(base, spacing=spacing, exclude_csf=False)
    csf = masks.csf_mask(base, spacing=spacing, padding=padding)
    brain = whole & ~csf
    cut = masks.tissue_csf_midpoint(mean, whole, csf)
    share = None
    if cut is not None:
        before = int(brain.sum())
        brain &= mean >= cut
        share = 1.0 - int(brain.sum()) / before
    if not brain.any():
        solid = base[base > masks.AIR_HU] + offset
        where = (f"{float(np.median(solid)):.0f} HU" if solid.size
                 else f"all below {masks.AIR_HU:g} HU")
        raise ValidationError(
            f"no brain voxels found: no tissue at brain densities (15-120 HU) before the bolus "
            f"(the median of what is not air: {where}); check that the study is in HU, or give "
            f"the region to fit with --brain-mask (brain_mask=)")
    return _Brain(brain, masks.fill_holes_in_plane(whole | _still_bright(base, mean, whole)),
                  None if cut is None else cut + offset, share)


#: Rise (HU) of a voxel's temporal mean over its pre-bolus mean that tells blood still bright
#: from an earlier injection from bone, which does not enhance: a vein's mean over the scan
#: rises by 60-80 HU, a quarter of it in a voxel it shares with bone.
STILL_BRIGHT_RISE_HU = 20.0


def _still_bright(base: np.ndarray, mean: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """Vessels above the brain mask's bone threshold before the bolus that enhance with it,
    joined to the brain ``whole``: an angiogram's contrast, still in the blood minutes later,
    puts the sinus over :data:`~ctperf.masks.SOFT_TISSUE_MAX_HU`, and a sinus at the brain's
    edge, not enclosed by it, was lost from the vessels' search (the VOF then taken from its
    partial-volume rim: CBF +37 %, no flag)."""
    bright = (base >= masks.SOFT_TISSUE_MAX_HU) & (mean - base >= STILL_BRIGHT_RISE_HU)
    if not bright.any():
        return bright
    labels, _ = ndimage.label(bright)
    touching = np.unique(labels[ndimage.binary_dilation(whole) & bright])
    return np.isin(labels, touching[touching > 0])


class _Start(NamedTuple):
    """What :func:`run_perfusion` and :func:`check_scan_start` read of a study before its
    vessels: the padding (:func:`~ctperf.masks.padding_mask`), the brain's unenhanced level and
    the HU scale's offset (:func:`~ctperf.masks.hu_offset`), the baseline frames, the voxels
    next to bone and the arrivals (:func:`_bolus_baseline`), the pre-bolus and temporal means,
    and the brain (:func:`_brain`)."""

    padding: np.ndarray | None
    level: float | None
    offset: float
    n_base: int
    bone_rim: np.ndarray
    onset: _Onset
    base: np.ndarray
    mean: np.ndarray
    region: _Brain


def study_start(hu: np.ndarray, vhu: np.ndarray, times: np.ndarray, *,
                spacing: tuple[float, float, float], brain_mask: np.ndarray | None) -> _Start:
    """:class:`_Start` of a study ``hu`` (T, Z, Y, X) at ``times`` (s), its vessels read on
    ``vhu``."""
    padding = masks.padding_mask(hu)
    level, offset = masks.hu_offset(masks.as_air(hu[0], padding), spacing=spacing)
    n_base, bone_rim, onset = _bolus_baseline(vhu, times, spacing=spacing, offset=offset)
    base = hu[:n_base].mean(axis=0)
    mean = hu.mean(axis=0, dtype=np.float32)
    region = _brain(base, mean, brain_mask, spacing=spacing, offset=offset, padding=padding)
    return _Start(padding, level, offset, n_base, bone_rim, onset, base, mean, region)


def bolus_arrival_s(series: CTPSeries, start: _Start | None = None) -> float:
    """When the bolus reaches the study, s after its first frame, as the maps read it: the time
    of the first frame after the pre-bolus frames (:func:`study_start`, or ``start`` when the
    caller has it; they do not depend on the brain). :func:`check_scan_start` returns it too."""
    if start is None:
        start = study_start(series.hu, series.hu, series.times, spacing=series.spacing,
                            brain_mask=None)
    return _arrival_s(start.n_base, series.times)


def _arrival_s(n_base: int, times: np.ndarray) -> float:
    return float(times[min(n_base, times.size - 1)] - times[0])


def enhancement(hu: np.ndarray, vhu: np.ndarray, search: np.ndarray, *, base: np.ndarray,
                 n_base: int) -> tuple[np.ndarray, np.ndarray]:
    """Enhancement (T, N) of the searched voxels in the study and in the vessel study (the same
    array when there is no separate vessel study)."""
    enh = hu[:, search] - base[search]
    venh = enh if vhu is hu else vhu[:, search] - vhu[:n_base, search].mean(axis=0)
    return enh, venh


#: A bolus in :func:`check_scan_start`: the mean curve's peak over the noise of that curve
MIN_BOLUS_SNR = 5.0


def check_scan_start(series: CTPSeries, brain_mask: np.ndarray | None = None) -> float:
    """Refuse a study with no bolus to map, for an estimate that fits no AIF (the U-Net): begun
    after the contrast reached its arteries, exactly as :func:`~ctperf.perfusion.run_perfusion`
    refuses it (the same search region: its automatic brain, or ``brain_mask``), or whose
    searched voxels' mean curve does not rise above its noise (no contrast, no head). Returns
    the bolus's arrival, s (:func:`bolus_arrival_s`), read on the way."""
    hu, spacing = series.hu, series.spacing
    start = study_start(hu, hu, series.times, spacing=spacing, brain_mask=brain_mask)
    n_base, bone_rim, base = start.n_base, start.bone_rim, start.base
    search = start.region.search
    check_vessels_at_start(start.onset, masks.fill_holes_in_plane(search | bone_rim) & ~bone_rim)
    # a bolus at all: the searched voxels' mean curve rises clearly above its noise (pure
    # noise: within about 3 of its SDs; a probe's faint bolus over 100 voxels: 7.5). That
    # noise: the curve's own second differences, or one voxel's over the root of their number
    # where a short series' bolus bends them
    enh, _ = enhancement(hu, hu, search, base=base, n_base=n_base)
    mean = enh.mean(axis=1, dtype=np.float64)
    noise = min(float(second_difference_sd(mean[:, None])[0]),
                voxel_noise_sd(enh[:, ::7], 0) / np.sqrt(enh.shape[1]))
    if not mean.max() >= max(1.0, MIN_BOLUS_SNR * noise):
        raise ValidationError(
            f"no bolus: the head's mean curve rises by {max(mean.max(), 0.0):.2f} HU at most, "
            f"less than {MIN_BOLUS_SNR:g} times its noise ({noise:.2f} HU): no bolus to map in "
            "these frames (pure noise reaches about 3 times)")
    return _arrival_s(n_base, series.times)


def without_still(brain: np.ndarray, onset: _Onset) -> np.ndarray:
    """``brain`` less the voxels whose value never changes over the frames
    (:data:`~ctperf.masks.STILL_HU`): no CT noise and no contrast, nothing to fit (a noise-free
    phantom's background, values a pipeline replaced). Fitted, every method read CBF 0 there,
    but bSVD a Tmax of 0 s, the box fit 20 s and bayes 46 s: a probe's tile phantom on a still
    30 HU background read a core of 0, 236 and 160 mL. Said in a warning."""
    still = brain & (onset.span <= masks.STILL_HU)
    if not still.any():
        return brain
    if still.all():
        raise ValidationError("every brain voxel keeps one value in every frame: no CT noise "
                              "and no contrast, nothing to fit")
    log.warning("%d brain voxels keep one value in every frame (no CT noise and no contrast: a "
                "noise-free phantom's background, or values a pipeline replaced): left out of "
                "the maps and lesions", int(still.sum()))
    return brain & ~still
