"""From a CTP series to perfusion maps: the whole model-based pipeline in one call.

:func:`run_perfusion` reads like its table of contents: check the inputs, find the bolus
arrival, mask the brain, subtract baselines, take or choose the AIF and VOF and correct the AIF
for partial volume (:mod:`ctperf.perfusion.inputs`), mark vessels, fit or deconvolve every brain
voxel, assemble the maps, raise QC flags, record the provenance and segment lesions. Each step is
a small function of this module. :func:`compute_maps` returns only the maps.

The provenance's ``partial_volume`` entry and the ``no_vof`` QC flag record whether the AIF was
corrected for partial volume, and why not.

Frames need not be evenly spaced. Baseline, arrival and AIF/VOF choice work on the frames as
acquired; the fits (and the box and SVD methods' TTP, whose smoothing is in seconds) see tissue
and AIF linearly interpolated onto a uniform grid at the finest frame interval
(:func:`uniform_grid`), so the box model's exact fast objective applies and the SVD methods do
not fall back to a coarser median step.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from ctperf import masks
from ctperf.errors import ValidationError
from ctperf.io.integrity import frame_spacing_problem
from ctperf.perfusion.bayes import fit_bayes
from ctperf.perfusion.boxnlr import BOX_METHODS, fit_box_nlr
from ctperf.perfusion.curves import (
    ARRIVAL_NOISE_GAIN,
    TTP_SMOOTH_S,
    bolus_started_message,
    check_constants,
    enhanced_at_start,
    on_frame_times,
    resample,
    second_difference_sd,
    smooth_time,
    time_to_peak,
    uniform_grid,
)
from ctperf.perfusion.inputs import (
    CurveOrigin,
    arterial_input,
    partial_volume,
    pre_bolus_noise_sd,
    venous_output,
    vessel_info,
    voxel_noise_sd,
)
from ctperf.perfusion.lesions import (
    THRESHOLDS_ONLY,
    LesionOptions,
    LesionResult,
    segment_lesions,
)
from ctperf.perfusion.qc import MAX_AIF_LEAD_S, aif_lag, qc_flags, skull_shift_px
from ctperf.perfusion.svd import svd_deconvolve
from ctperf.types import MAP_UNITS, CTPSeries, PerfusionMaps

log = logging.getLogger(__name__)

__all__ = ["METHODS", "SD_MAPS", "PerfusionResult", "check_scan_start", "compute_maps",
           "run_perfusion"]

METHODS = ("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes")
#: Posterior standard deviations written beside the maps by ``bayes``.
SD_MAPS = ("cbf_sd", "cbv_sd", "mtt_sd", "tmax_sd")
MIN_FRAMES = 10


_SMOOTHED_TTP = (f"peak of the tissue curve smoothed over time (Gaussian, SD {TTP_SMOOTH_S} s) "
                 "after the bolus's arrival, from the first frame")
_CONVENTIONS: dict[str, dict[str, str]] = {
    "nlr": {"tmax": "delay + MTT/4 (box model, calibrated to the residue's peak)",
            "ttp": _SMOOTHED_TTP,
            "delay": "box start after the AIF"},
    "svd": {"tmax": "time of the residue's peak",
            "ttp": _SMOOTHED_TTP,
            "delay": "equal to tmax for SVD methods"},
    "bayes": {"tmax": "delay + first peak of the dispersed residue, posterior median",
              "ttp": "peak of the fitted tissue curve, from the first frame, posterior mean",
              "delay": "residue start after the AIF",
              "sd": "posterior standard deviations in <map>_sd"},
}


@dataclass(frozen=True)
class PerfusionResult:
    """Maps plus what the CLI writes beside them: lesions, brain and vessel masks (Z, Y, X) bool,
    the AIF (partial-volume corrected) and VOF curves (T,) in HU."""

    maps: PerfusionMaps
    lesions: LesionResult
    brain: np.ndarray
    vessels: np.ndarray
    aif: np.ndarray
    vof: np.ndarray | None
    times: np.ndarray


def run_perfusion(
    series: CTPSeries,
    *,
    method: str = "nlr-fast",
    aif: np.ndarray | None = None,
    vof: np.ndarray | None = None,
    aif_mask: np.ndarray | None = None,
    vof_mask: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
    rho: float = 1.04,
    kh: float = 0.733,
    motion_mm: np.ndarray | None = None,
    uncorrected_motion_mm: np.ndarray | None = None,
    vessel_fraction: float = 0.25,
    rim_mm: float = 2.0,
    lesion_options: LesionOptions | None = None,
    vessel_series: CTPSeries | None = None,
    device: str | None = None,
    bayes_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> PerfusionResult:
    """Model-based perfusion analysis of one study.

    Parameters
    ----------
    series : CTPSeries
        HU (T, Z, Y, X), at least 10 frames, the bolus arriving after the first frame.
    method : {"nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes"}
    aif, vof : ndarray, shape (T,), optional
        Given input/output curves (HU enhancement). A given AIF is used as is unless a VOF (curve
        or mask) is given too, then it is scaled up to the VOF's area.
    aif_mask, vof_mask : ndarray of bool, shape (Z, Y, X), optional
        Voxels to average instead of the automatic choice. A given VOF (curve or mask) that
        :func:`~ctperf.perfusion.aif.assess_vof` rejects raises ValidationError.
    brain_mask : ndarray of bool, shape (Z, Y, X), optional
        Brain mask; default :func:`ctperf.masks.brain_mask` of the pre-bolus mean, CSF
        excluded.
    rho, kh : float
        Brain density (g/mL) and haematocrit ratio; written into the provenance.
    motion_mm : ndarray, shape (T,), optional
        Frame-wise displacement from motion correction, for the QC flags.
    uncorrected_motion_mm : ndarray, shape (T,), optional
        Frame-wise displacement that motion correction measured and left in the study
        (``uncorrected_mm`` of :func:`~ctperf.preprocess.correct_motion`), for the QC flags.
    vessel_fraction : float
        Brain voxels whose curve, smoothed over time, peaks above this fraction of the measured
        AIF peak are vessels: mapped, but excluded from lesions.
    rim_mm : float
        Brain voxels closer than this (in-plane, mm) to the brain's outer surface are left out
        of the lesions (0 keeps them).
    lesion_options : LesionOptions, optional
        Thresholds and clean-up of :func:`~ctperf.perfusion.segment_lesions`; default
        :data:`~ctperf.perfusion.THRESHOLDS_ONLY` (the thresholds on the maps as they are).
    vessel_series : CTPSeries, optional
        The same study before spatial filtering (same grid and times). AIF, VOF and vessel
        voxels are then found and measured on it, while tissue is fitted on ``series``: a
        bilateral filter mixes 2-4 mm vessels with the tissue around them, which lowers the
        AIF's peak and the VOF's area.
    device : str, optional
        Where the box-model fits run (:func:`~ctperf.perfusion.fit_box_nlr`): None or "cpu"
        with NumPy, "cuda" (or "cuda:N") with PyTorch on that GPU, "auto" on a GPU when torch
        sees one. The SVD methods always run with NumPy.
    bayes_options : dict, optional
        More keyword arguments of :func:`~ctperf.perfusion.fit_bayes` for ``method="bayes"``
        (for example ``{"learn_shapes": True}``); recorded in the provenance.
    progress : bool
        Progress bar over voxel chunks.

    Returns
    -------
    PerfusionResult
    """
    _check_inputs(series, method=method, vessel_series=vessel_series)
    _check_bayes_options(bayes_options, method)
    check_constants(rho, kh)
    series, slice_shift = on_frame_times(series)
    if vessel_series is not None:
        vessel_series, _ = on_frame_times(vessel_series)
    if slice_shift:
        log.info("slices taken up to %.2f s from their frame's time: curves interpolated onto "
                 "the frame times", slice_shift)
    hu, t, spacing = series.hu, series.times, series.spacing
    vhu = hu if vessel_series is None else vessel_series.hu

    start = _study_start(hu, vhu, spacing=spacing, brain_mask=brain_mask)
    padding, offset, n_base, bone_rim, onset = (start.padding, start.offset, start.n_base,
                                                start.bone_rim, start.onset)
    hu_scale = None if start.level is None else offset
    base, mean, region = start.base, start.mean, start.region
    brain, search = _without_still(region.fitted, onset), region.search
    # inside the head: the brain found, and what it and the bone enclose in each slice (an
    # artery already bright at the first frames is no brain to the brain mask)
    inside = masks.fill_holes_in_plane(search | bone_rim)
    _check_scan_start(onset, inside & ~bone_rim)
    slice_share = _brain_slice_share(brain, inside)
    exposed = masks.exposed_share(brain, masks.as_air(base - offset, padding), spacing=spacing)
    enh, venh = _enhancement(hu, vhu, search, base=base, n_base=n_base)

    # Vessel voxels next to bone take in some of its 1000+ HU whenever the head moves or frames
    # are resampled: spikes, dips and raised tails that are not the bolus.
    bony = bone_rim[search]
    searched = ("voxels of the brain mask given (the automatic AIF is searched there)"
                if brain_mask is not None else "voxels of the head searched (the automatic "
                "brain mask with what it encloses)")
    aif_raw, aif_from = arterial_input(aif, aif_mask, vhu, venh, t, n_base=n_base,
                                       exclude=bony, region=searched)
    vof_curve, vof_from = venous_output(vof, vof_mask, vhu, venh, t, n_base=n_base,
                                        exclude=bony, aif=aif_raw,
                                        aif_curve_given=aif is not None, search=search,
                                        spacing=spacing)
    aif_used, pv_info = partial_volume(aif_raw, vof_curve, vof_from, t, n_base=n_base)
    vof_used = vof_curve if pv_info["corrected"] else None

    tissue = enh[:, brain[search]]  # (T, N): every brain voxel
    vessels = _vessels(brain, venh[:, brain[search]], aif_raw, vessel_fraction)
    not_vessel = (~vessels[brain]).astype(np.float32)
    # the brain's mean curve, vessels left out: the AIF's timing is judged against it
    tissue_mean = (tissue @ not_vessel) / not_vessel.sum() if not_vessel.any() else None
    brain_mean = tissue.mean(axis=1, dtype=np.float64)  # vessels too: drift is in every voxel
    if aif_from.source == "automatic" and tissue_mean is not None:
        _check_aif_leads(t, aif_raw, tissue_mean)
    del enh, venh  # the search region's curves: tissue and vessels are all that is needed now
    # bayes pools amplitudes among neighbours of similar temporal mean (the paper's guide)
    guide = mean if method == "bayes" else None
    values, grid, fitted = fit_voxels(method, tissue, aif_used, t, rho=rho, kh=kh,
                                      brain=brain, spacing=spacing, device=device,
                                      progress=progress, n_base=n_base, guide=guide,
                                      vessels=vessels[brain], bayes_options=bayes_options)
    maps, units = _assemble(values, brain)
    # blood-dense before the bolus (a haemorrhage): no ischaemic lesion is called there
    dense = masks.hyperdense_mask(base, brain, spacing=spacing, offset=offset, exclude=vessels)

    flags = _qc(hu, tissue_mean, brain_mean, t, brain=brain, n_base=n_base, aif_raw=aif_raw,
                vof_used=vof_used, pv_info=pv_info, motion_mm=motion_mm,
                uncorrected_motion_mm=uncorrected_motion_mm, slice_share=slice_share,
                exposed_share=exposed, skull_share=masks.skull_share(base - offset),
                box_mtt=(values["mtt"][~vessels[brain] & (values["cbv"] > 0)]
                         if method in BOX_METHODS else None),
                csf_cut_share=region.csf_share, hu_offset=hu_scale, voxelwise=method != "bayes",
                voxel_volume_ml=series.voxel_ml,
                hyperdense_ml=float(dense.sum()) * series.voxel_ml,
                pv_asked=not (aif_from.source == "given curve" and vof_curve is None))
    provenance = _provenance(method, t, rho=rho, kh=kh, grid=grid, n_base=n_base,
                             aif=(aif_from, aif_raw, aif_used), vof=(vof_from, vof_curve, vof_used),
                             pv_info=pv_info, search=search, brain=brain, vessels=vessels,
                             csf_cut=region.csf_cut, flags=flags) | fitted
    if slice_shift:
        provenance["slice_times_interpolated_s"] = round(slice_shift, 3)
    if series.meta.get("timing_source"):   # where the frame times came from, as read
        provenance["timing_source"] = str(series.meta["timing_source"])
    pmaps = PerfusionMaps(maps=maps, affine=series.affine, units=units, provenance=provenance)
    lesions = _lesions(pmaps, brain=brain, search=search, vessels=vessels | dense, rim_mm=rim_mm,
                       options=THRESHOLDS_ONLY if lesion_options is None else lesion_options)
    pmaps = pmaps.replace(provenance={**provenance, "lesions": lesions.summary()})
    return PerfusionResult(maps=pmaps, lesions=lesions, brain=brain, vessels=vessels,
                           aif=aif_used, vof=vof_used, times=t)


def compute_maps(series: CTPSeries, **options: Any) -> PerfusionMaps:
    """Perfusion maps of a study: the ``maps`` of :func:`run_perfusion`, which documents the
    keyword options.

    Returns
    -------
    PerfusionMaps
        ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt``, ``ttp``, ``tmax``, ``delay`` s, and
        ``residual`` HU for the NLR methods; NaN outside the brain, never Inf. The provenance
        holds the method, constants, AIF/VOF voxels and curves, QC flags and lesion volumes.
    """
    return run_perfusion(series, **options).maps


def _check_aif_leads(t: np.ndarray, aif: np.ndarray, tissue_mean: np.ndarray) -> None:
    """Refuse an automatic AIF whose bolus arrives more than :data:`MAX_AIF_LEAD_S` after the
    brain's mean curve (vessels left out): no artery was found, and maps on it would read
    every delay, Tmax and CBF wrong."""
    lag = aif_lag(t, aif, tissue_mean)
    if lag is not None and lag > MAX_AIF_LEAD_S:
        raise ValidationError(
            f"the automatic AIF's bolus arrives {lag:.1f} s after the brain's: no artery "
            "feeding the brain was found (a poor injection, or arteries too small for the "
            "pixels); give an AIF mask on an artery (--aif-mask)")


def _without_still(brain: np.ndarray, onset: _Onset) -> np.ndarray:
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


def _brain_slice_share(brain: np.ndarray, inside: np.ndarray) -> np.ndarray | None:
    """Per slice, the brain's share of what the skull encloses, over its median across the
    slices that cut the head well (a quarter of the largest slice's area or more); None with
    fewer than two such slices."""
    area = inside.sum(axis=(1, 2)).astype(np.float64)
    cut = area >= 0.25 * area.max() if area.max() > 0 else np.zeros(area.shape, dtype=bool)
    if cut.sum() < 2:
        return None
    share = brain.sum(axis=(1, 2))[cut] / area[cut]
    typical = float(np.median(share))
    return share / typical if typical > 0 else None


def _check_inputs(series: CTPSeries, *, method: str, vessel_series: CTPSeries | None) -> None:
    if not isinstance(series, CTPSeries):
        raise ValidationError(f"the study must be a CTPSeries (ctperf.io.read_study, or "
                              f"CTPSeries(hu, times, affine)), got {type(series).__name__}")
    # the readers check this; a series built in Python is checked here (times in ms had given
    # CBF 0.04 and MTT 8351 s with no flag)
    problem = frame_spacing_problem(series.times)
    if problem is not None:
        raise ValidationError(f"series.times: {problem}; CTPSeries times are in seconds")
    if method not in METHODS:
        raise ValidationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    n_t = series.hu.shape[0]
    if n_t < MIN_FRAMES:
        raise ValidationError(f"a perfusion study needs at least {MIN_FRAMES} frames, got {n_t}")
    if vessel_series is not None and vessel_series.shape != series.shape:
        raise ValidationError(f"vessel_series shape {vessel_series.shape} differs from the "
                              f"study's {series.shape}")


class _Onset(NamedTuple):
    """Per voxel (Z, Y, X), of the curves smoothed over time: how far the first frame stands
    above the lowest value (``height``), the range (``span``), the frame of the highest value;
    and the smoothed curves' noise SD, HU."""

    height: np.ndarray
    span: np.ndarray
    lowest: np.ndarray
    peak_at: np.ndarray
    noise_sd: float


def _bolus_baseline(vhu: np.ndarray, *, spacing: tuple[float, float, float], offset: float = 0.0
                    ) -> tuple[int, np.ndarray, _Onset]:
    """Frames before the bolus, the voxels next to bone (bool (Z, Y, X)), and what
    :func:`_check_scan_start` needs; ``offset`` (HU) is taken off before bone and soft tissue
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
    ended the baseline at the first frames.
    """
    first, last, top, low = (np.empty(vhu.shape[1:], dtype=np.float32) for _ in range(4))
    peak_at = np.empty(vhu.shape[1:], dtype=np.int64)
    for z in range(vhu.shape[1]):  # 16 rows at a time: no smoothed copy, and cache-sized
        for y in range(0, vhu.shape[2], 16):
            sm = smooth_time(vhu[:, z, y:y + 16])
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
    onset = _Onset(first - low, top - low, low, peak_at,
                   noise * ARRIVAL_NOISE_GAIN)
    return (pre_bolus_frames(vhu, np.where(calm, rise, -np.inf), noise_sd=noise), bone_rim,
            onset)


def _check_scan_start(onset: _Onset, region: np.ndarray) -> None:
    """Refuse a study whose arteries were already enhanced at the first frame.

    The vessels are the voxels of ``region`` (bool (Z, Y, X): inside the head, away from bone)
    never below -100 HU whose curves span at least a quarter of the strongest span there
    (99.9th percentile) and ten times the smoothed noise, whatever their first frame: an artery
    imaged from the middle of its bolus rises little after it, so it is found by its span, not
    by its rise. Their earliest-peaking tenth are arteries; when most of those stand at their
    first frame more than :data:`~ctperf.perfusion.curves.BOLUS_AT_START` of their span, and
    five times the smoothed noise, above their lowest value (contrast only adds attenuation:
    the lowest is the unenhanced value), the scan began after the contrast arrived.
    """
    soft = region & (onset.lowest > -100)
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
            f"median {np.median(level):.0%} of their range"))


#: A bolus in :func:`check_scan_start`: the mean curve's peak over the noise of that curve
MIN_BOLUS_SNR = 5.0


def check_scan_start(series: CTPSeries, brain_mask: np.ndarray | None = None) -> None:
    """Refuse a study with no bolus to map, for an estimate that fits no AIF (the U-Net): begun
    after the contrast reached its arteries, exactly as :func:`run_perfusion` refuses it (the
    same search region: its automatic brain, or ``brain_mask``), or whose searched voxels'
    mean curve does not rise above its noise (no contrast, no head)."""
    hu, spacing = series.hu, series.spacing
    start = _study_start(hu, hu, spacing=spacing, brain_mask=brain_mask)
    n_base, bone_rim, base = start.n_base, start.bone_rim, start.base
    search = start.region.search
    _check_scan_start(start.onset, masks.fill_holes_in_plane(search | bone_rim) & ~bone_rim)
    # a bolus at all: the searched voxels' mean curve rises clearly above its noise (pure
    # noise: within about 3 of its SDs; a probe's faint bolus over 100 voxels: 7.5). That
    # noise: the curve's own second differences, or one voxel's over the root of their number
    # where a short series' bolus bends them
    enh, _ = _enhancement(hu, hu, search, base=base, n_base=n_base)
    mean = enh.mean(axis=1, dtype=np.float64)
    noise = min(float(second_difference_sd(mean[:, None])[0]),
                voxel_noise_sd(enh[:, ::7], 0) / np.sqrt(enh.shape[1]))
    if not mean.max() >= max(1.0, MIN_BOLUS_SNR * noise):
        raise ValidationError(
            f"no bolus: the head's mean curve rises by {max(mean.max(), 0.0):.2f} HU at most, "
            f"less than {MIN_BOLUS_SNR:g} times its noise ({noise:.2f} HU): no bolus to map in "
            "these frames (pure noise reaches about 3 times)")


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


def _study_start(hu: np.ndarray, vhu: np.ndarray, *, spacing: tuple[float, float, float],
                 brain_mask: np.ndarray | None) -> _Start:
    """:class:`_Start` of a study ``hu`` (T, Z, Y, X), its vessels read on ``vhu``."""
    padding = masks.padding_mask(hu)
    level, offset = masks.hu_offset(masks.as_air(hu[0], padding), spacing=spacing)
    n_base, bone_rim, onset = _bolus_baseline(vhu, spacing=spacing, offset=offset)
    base = hu[:n_base].mean(axis=0)
    mean = hu.mean(axis=0, dtype=np.float32)
    region = _brain(base, mean, brain_mask, spacing=spacing, offset=offset, padding=padding)
    return _Start(padding, level, offset, n_base, bone_rim, onset, base, mean, region)


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
        brain = np.asarray(given, dtype=bool)
        if brain.shape != base.shape:
            raise ValidationError(f"brain mask shape {brain.shape} differs from the study grid "
                                  f"{base.shape} (Z, Y, X)")
        if not brain.any():
            raise ValidationError("the brain mask given selects no voxel")
        return _Brain(brain, brain)
    if offset:
        base, mean = base - offset, mean - offset
    base, mean = masks.as_air(base, padding), masks.as_air(mean, padding)
    whole = masks.brain_mask(base, spacing=spacing, exclude_csf=False)
    csf = masks.csf_mask(base, spacing=spacing)
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
    return _Brain(brain, masks.fill_holes_in_plane(whole),
                  None if cut is None else cut + offset, share)


def _enhancement(hu: np.ndarray, vhu: np.ndarray, search: np.ndarray, *, base: np.ndarray,
                 n_base: int) -> tuple[np.ndarray, np.ndarray]:
    """Enhancement (T, N) of the searched voxels in the study and in the vessel study (the same
    array when there is no separate vessel study)."""
    enh = hu[:, search] - base[search]
    venh = enh if vhu is hu else vhu[:, search] - vhu[:n_base, search].mean(axis=0)
    return enh, venh


def _vessels(brain: np.ndarray, peaks_of: np.ndarray, aif: np.ndarray,
             vessel_fraction: float, *, chunk: int = 1 << 16) -> np.ndarray:
    """Brain voxels (bool (Z, Y, X)) whose enhancement ``peaks_of`` (T, N brain voxels),
    smoothed over time (:func:`smooth_time`), peaks above ``vessel_fraction`` of the measured
    AIF's peak. Smoothed, because the highest single frame of a tissue curve is its noise's
    highest: at low dose with a partial-volume diluted AIF that alone carried tissue over the
    threshold (docs/methods.md, "Vessel voxels"). ``chunk`` voxels at a time."""
    n = peaks_of.shape[1]
    peak = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        peak[s:s + chunk] = smooth_time(peaks_of[:, s:s + chunk]).max(axis=0)
    vessels = np.zeros(brain.shape, dtype=bool)
    vessels[brain] = peak > vessel_fraction * float(np.max(aif))
    return vessels


#: fit_bayes's arguments that run_perfusion sets itself
_BAYES_SET = frozenset({"tissue", "aif", "times", "rho", "kh", "mask", "spacing",
                        "baseline_frames", "guide", "vessels", "progress"})


def _check_bayes_options(options: dict[str, Any] | None, method: str) -> None:
    if not options:
        return
    if method != "bayes":
        raise ValidationError(f"bayes_options apply to method 'bayes', not {method!r}")
    known = set(inspect.signature(fit_bayes).parameters) - _BAYES_SET
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValidationError(f"bayes_options: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")


def fit_voxels(method: str, tissue: np.ndarray, aif: np.ndarray, t: np.ndarray, *,
               rho: float, kh: float, brain: np.ndarray | None,
               spacing: tuple[float, float, float], device: str | None, progress: bool,
               n_base: int | None, guide: np.ndarray | None = None,
               vessels: np.ndarray | None = None,
               bayes_options: dict[str, Any] | None = None
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, Any]]:
    """Values (N,) of every brain voxel by map name, the uniform grid the fits saw (None
    when the frames are evenly spaced) and what the provenance should add (``bayes``: its
    options, and the residue shapes' prior weights when it learned them). ``guide`` (Z, Y, X):
    the temporal mean image, for ``bayes``'s amplitude pooling; ``vessels`` (N,): the
    voxels ``bayes`` leaves out of its neighbourhoods' averages. ``brain`` None: curves
    without an image (``bayes`` fits each on its own); ``n_base`` None: no baseline was
    subtracted.

    Unevenly spaced frames (fast, then slow sampling): the box model and SVD see the curves
    linearly interpolated onto a uniform grid at the finest step, from the first frame. Delay,
    MTT and Tmax are durations after the AIF, so they need no mapping back; TTP is read on the
    grid too (smoothing in seconds needs even spacing) and counts from the first frame, where
    the grid starts. ``bayes`` handles any frame spacing and fits the frames as acquired.
    """
    grid = uniform_grid(t)
    values: dict[str, np.ndarray]
    fitted: dict[str, Any] = {}
    if method not in BOX_METHODS and device not in (None, "auto", "cpu"):
        log.warning("%s runs on the CPU: the device (%s) is for the box-model fits (%s) only",
                    method, device, ", ".join(BOX_METHODS))
    if method == "bayes":
        options = dict(bayes_options or {})
        post = fit_bayes(tissue, aif, t, rho=rho, kh=kh, mask=brain, spacing=spacing,
                         baseline_frames=n_base, guide=guide, vessels=vessels,
                         progress=progress, **options)
        values = {name: getattr(post, name) for name in
                  ("cbf", "cbv", "mtt", "ttp", "tmax", "delay", "residual", *SD_MAPS)}
        if options:
            fitted["bayes_options"] = options
        if post.shape_weights is not None:
            fitted["residue_shape_weights"] = {k: round(v, 4)
                                               for k, v in post.shape_weights.items()}
        fitted["bayes_delay_range_s"] = [round(v, 3) for v in post.delay_range]
    else:
        fit_t, fit_tissue, fit_aif = t, tissue, aif
        if grid is not None:
            fit_t, fit_tissue, fit_aif = grid, resample(tissue, t, grid), np.interp(grid, t, aif)
        if method in BOX_METHODS:
            fit = fit_box_nlr(fit_tissue, fit_aif, fit_t, method=method, rho=rho, kh=kh,
                              device=device, progress=progress)
            values = {"cbf": fit.cbf, "cbv": fit.cbv, "mtt": fit.mtt, "tmax": fit.tmax,
                      "delay": fit.delay, "residual": fit.residual}
        else:
            res = svd_deconvolve(fit_tissue, fit_aif, fit_t, method=method, rho=rho, kh=kh,
                                 progress=progress)
            values = {"cbf": res.cbf, "cbv": res.cbv, "mtt": res.mtt, "tmax": res.tmax,
                      "delay": res.tmax}
        # searched from the bolus's arrival (the baseline's end) on
        start = 0 if not n_base else int(np.searchsorted(fit_t, t[min(n_base, t.size - 1)]))
        values["ttp"] = time_to_peak(fit_tissue, fit_t, smooth_s=TTP_SMOOTH_S,
                                     start=min(start, fit_t.size - 1))
    return values, grid, fitted


def _assemble(values: dict[str, np.ndarray], brain: np.ndarray
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Volumes float32 (Z, Y, X), NaN outside the brain and where a fit failed, and the units
    of the maps beyond :data:`~ctperf.types.MAP_UNITS`."""
    maps: dict[str, np.ndarray] = {}
    for name in ("cbf", "cbv", "mtt", "ttp", "tmax", "delay", "residual", *SD_MAPS):
        if name in values:
            vol = np.full(brain.shape, np.nan, dtype=np.float32)
            v = np.asarray(values[name], dtype=np.float32)
            vol[brain] = np.where(np.isfinite(v), v, np.nan)
            maps[name] = vol
    units = {"residual": "HU"} if "residual" in maps else {}
    units.update({sd: MAP_UNITS[sd.removesuffix("_sd")] for sd in SD_MAPS if sd in maps})
    return maps, units


def _qc(hu: np.ndarray, tissue_mean: np.ndarray | None, brain_mean: np.ndarray,
        t: np.ndarray, *, brain: np.ndarray,
        n_base: int, aif_raw: np.ndarray, vof_used: np.ndarray | None,
        pv_info: dict[str, Any], pv_asked: bool, motion_mm: np.ndarray | None,
        uncorrected_motion_mm: np.ndarray | None, slice_share: np.ndarray | None,
        exposed_share: float | None, skull_share: float,
        voxelwise: bool, voxel_volume_ml: float, box_mtt: np.ndarray | None,
        csf_cut_share: float | None, hu_offset: float | None,
        hyperdense_ml: float) -> dict[str, Any]:
    """The QC flags of :func:`~ctperf.perfusion.qc_flags`; ``pv_asked`` is false when a given
    AIF curve came without a VOF (nothing to correct it with); ``box_mtt``: the box model's
    MTT of the tissue voxels (vessels left out), None for the other methods."""
    n_t = hu.shape[0]
    # Noise from every 7th brain voxel: a median needs no more, and the gather is (T, N).
    sample = np.flatnonzero(brain.ravel())[::7]
    base_sd = pre_bolus_noise_sd(hu.reshape(n_t, -1)[:, sample], n_base)
    shift = None
    if motion_mm is None:  # not registered: is the skull still?
        noise = base_sd
        if noise is None:  # too few baseline frames: the first two frames' difference
            first_two = hu.reshape(n_t, -1)[:2, sample]
            noise = float(np.median(np.abs(first_two[1] - first_two[0]))
                          / (0.6745 * np.sqrt(2.0)))
        shift = skull_shift_px(hu, n_base=n_base, noise_sd=noise, offset=hu_offset or 0.0)
    return qc_flags(times=t, aif=aif_raw, vof=vof_used, tissue_mean=tissue_mean,
                    brain_mean=brain_mean,
                    baseline_sd=base_sd, baseline_frames=n_base,
                    brain_voxels=int(brain.sum()), voxel_ml=voxel_volume_ml,
                    pv_factor=pv_info["factor"], displacement_mm=motion_mm,
                    uncorrected_mm=uncorrected_motion_mm, skull_shift=shift,
                    hyperdense_ml=hyperdense_ml,
                    brain_slice_share=slice_share,
                    exposed_share=exposed_share, skull_share=skull_share,
                    pv_corrected=bool(pv_info["corrected"]) if pv_asked else None,
                    box_mtt=box_mtt, csf_cut_share=csf_cut_share,
                    hu_offset=hu_offset, voxelwise=voxelwise)


def _provenance(method: str, t: np.ndarray, *, rho: float, kh: float, grid: np.ndarray | None,
                n_base: int, aif: tuple[CurveOrigin, np.ndarray, np.ndarray],
                vof: tuple[CurveOrigin, np.ndarray | None, np.ndarray | None],
                pv_info: dict[str, Any], search: np.ndarray, brain: np.ndarray,
                vessels: np.ndarray, csf_cut: float | None,
                flags: dict[str, Any]) -> dict[str, Any]:
    """What was done, with which constants and curves: JSON-ready. ``aif`` is (origin,
    measured, used) and ``vof`` (origin, curve, used)."""
    coords = np.array(np.nonzero(search))
    aif_from, aif_raw, aif_used = aif
    vof_from, vof_curve, vof_used = vof
    return {
        "method": method,
        "constants": {"rho_g_per_ml": rho, "kh": kh},
        "conventions": _CONVENTIONS["nlr" if method.startswith("nlr")
                                    else "svd" if method.endswith("svd") else method],
        "times_s": t.tolist(),
        "fit_grid_step_s": None if grid is None else float(grid[1] - grid[0]),
        "baseline_frames": n_base,
        "aif": {**vessel_info(aif_from, coords, aif_used), "pv_factor": pv_info["factor"],
                "measured_hu": np.round(aif_raw, 3).tolist()},
        "vof": {**vessel_info(vof_from, coords, vof_curve), "used": vof_used is not None},
        "partial_volume": pv_info,
        "brain_voxels": int(brain.sum()),
        "csf_cut_hu": None if csf_cut is None else round(csf_cut, 1),
        "vessel_voxels": int(vessels.sum()),
        "qc": flags,
    }


def _lesions(maps: PerfusionMaps, *, brain: np.ndarray, search: np.ndarray,
             vessels: np.ndarray, rim_mm: float, options: LesionOptions) -> LesionResult:
    """Lesions, leaving out vessels and the brain's outer rim, where partial volume with
    cortical veins and bone makes Tmax unreliable."""
    exclude = vessels.copy()
    if rim_mm > 0:
        depth = ndimage.distance_transform_edt(search, sampling=(1e6, *maps.spacing[1:]))
        exclude |= brain & (depth <= rim_mm)
    return segment_lesions(maps, brain=brain, exclude=exclude, options=options)


def pre_bolus_frames(hu: np.ndarray, rise: np.ndarray, *, noise_sd: float = 0.0,
                     share: float = 0.25, most: int = 5000, percentile: float = 5.0) -> int:
    """Frames before the bolus: two less than an early percentile of the arrival frames of the
    voxels rising by at least ``share`` of the largest ``rise`` (Z, Y, X), at most ``most`` of
    them; arrival is where a curve, smoothed over time, first exceeds 20 % of its own rise
    above its start, and four times the smoothed curves' noise (``noise_sd`` of one frame, HU),
    so that a weak vessel's noise does not cross for it."""
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
    arrival = np.argmax(above[:, crossed], axis=0)
    # two frames early: the smoothing (one frame's SD) moves a crossing by up to a frame
    return max(1, int(np.percentile(arrival, percentile)) - 2)
