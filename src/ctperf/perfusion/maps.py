"""From a CTP series to perfusion maps: the whole model-based pipeline in one call.

:func:`run_perfusion` reads like its table of contents: check the inputs, find the bolus
arrival, mask the brain, subtract baselines, take or choose the AIF and VOF and correct the AIF
for partial volume (:mod:`ctperf.perfusion.inputs`), mark vessels, fit or deconvolve every brain
voxel, assemble the maps, raise QC flags, record the provenance and segment lesions. Each step is
a small function: here, in :mod:`ctperf.perfusion.onset` (the study before its vessels:
baseline, scan start, brain) or in :mod:`ctperf.perfusion.voxelfit` (the fits).
:func:`compute_maps` returns only the maps.

The provenance's ``partial_volume`` entry and the ``no_vof`` QC flag record whether the AIF was
corrected for partial volume, and why not.

Frames need not be evenly spaced. Baseline, arrival and AIF/VOF choice work on the frames as
acquired; the fits (and the box and SVD methods' TTP, whose smoothing is in seconds) see tissue
and AIF linearly interpolated onto a uniform grid at the finest frame interval
(:func:`uniform_grid`), so the box model's exact fast objective applies and the SVD methods do
not fall back to a coarser median step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ctperf import masks
from ctperf.errors import AIFRefused, InputError, ValidationError
from ctperf.io.integrity import check_hu_plausible, frame_spacing_problem
from ctperf.io.nifti import study_space
from ctperf.perfusion.aif import early_tissue_peak_time, tissue_curve
from ctperf.perfusion.boxnlr import BOX_METHODS
from ctperf.perfusion.curves import (
    MIN_AIF_SNR,
    TTP_SMOOTH_S,
    check_constants,
    on_frame_times,
    sample_step,
    second_difference_sd,
    smooth_time,
    start_level,
)
from ctperf.perfusion.inputs import (
    CurveOrigin,
    arterial_input,
    check_aif_area,
    partial_volume,
    pre_bolus_noise_sd,
    venous_output,
    vessel_info,
)
from ctperf.perfusion.lesions import (
    THRESHOLDS_ONLY,
    LesionOptions,
    LesionResult,
    segment_lesions,
)
from ctperf.perfusion.onset import (
    check_vessels_at_start,
    enhancement,
    pre_bolus_frames,
    study_start,
    without_still,
)
from ctperf.perfusion.qc import (
    MAX_AIF_LEAD_S,
    aif_lag,
    core_off_mirror_flag,
    flat_edge_share,
    lesion_no_bolus_flag,
    lesion_no_bolus_ml,
    qc_flags,
    skull_shift_px,
    widespread_hypoperfusion_flag,
)
from ctperf.perfusion.sensitivity import core_contrast, core_unseen_flag, normal_cbv
from ctperf.perfusion.voxelfit import SD_MAPS, check_bayes_options, fit_voxels
from ctperf.types import MAP_UNITS, METHODS, CTPSeries, PerfusionMaps, non_axial_slices

log = logging.getLogger(__name__)

__all__ = ["METHODS", "SD_MAPS", "PerfusionResult", "compute_maps", "run_perfusion"]

MIN_FRAMES = 10

#: A curve that peaks, smoothed over time, above this share of the AIF's peak is a vessel's
#: (:func:`vessel_curves`): tissue, whose blood is a few per cent of it, stays far below.
VESSEL_FRACTION = 0.25


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
    vessel_fraction: float = VESSEL_FRACTION,
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
        Voxels to average instead of the automatic choice (nonzero is inside, as a mask file
        is read). A given VOF (curve or mask) that
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
    aif_mask, vof_mask, brain_mask = (
        None if m is None else masks.as_region(m, series.shape[1:], what)
        for m, what in ((aif_mask, "AIF mask"), (vof_mask, "VOF mask"),
                        (brain_mask, "brain mask")))
    check_bayes_options(bayes_options, method)
    check_constants(rho, kh)
    series, slice_shift = on_frame_times(series)
    if vessel_series is not None:
        vessel_series, _ = on_frame_times(vessel_series)
    if slice_shift:
        log.info("slices taken up to %.2f s from their frame's time: curves interpolated onto "
                 "the frame times", slice_shift)
    hu, t, spacing = series.hu, series.times, series.spacing
    vhu = hu if vessel_series is None else vessel_series.hu

    start = study_start(hu, vhu, t, spacing=spacing, brain_mask=brain_mask)
    padding, offset, n_base, bone_rim, onset = (start.padding, start.offset, start.n_base,
                                                start.bone_rim, start.onset)
    hu_scale = None if start.level is None else offset
    base, mean, region = start.base, start.mean, start.region
    brain, search = without_still(region.fitted, onset), region.search
    # inside the head: the brain found, and what it and the bone enclose in each slice (an
    # artery already bright at the first frames is no brain to the brain mask)
    inside = masks.fill_holes_in_plane(search | bone_rim)
    if aif is None and aif_mask is None:
        # a given AIF is judged on its own curve (arterial_input): the study's other vessels
        # can hold metal streaks that peak at any frame, the first too
        check_vessels_at_start(onset, inside & ~bone_rim, remedy=(
            "; if the arteries are unenhanced at the first frame and something else peaks there "
            "(metal streaks), give the artery's mask (--aif-mask): a given AIF is judged on its "
            "own curve"))
    slice_share = _brain_slice_share(brain, inside, bone=bone_rim)
    exposed = masks.exposed_share(brain, masks.as_air(base - offset, padding), spacing=spacing)
    enh, venh = enhancement(hu, vhu, search, base=base, n_base=n_base)

    # Vessel voxels next to bone take in some of its 1000+ HU whenever the head moves or frames
    # are resampled: spikes, dips and raised tails that are not the bolus.
    bony = bone_rim[search]
    searched = ("voxels of the brain mask given (the automatic AIF is searched there)"
                if brain_mask is not None else "voxels of the head searched (the automatic "
                "brain mask with what it encloses)")
    aif_raw, aif_from = arterial_input(aif, aif_mask, vhu, venh, t, n_base=n_base,
                                       exclude=bony, region=searched, check_area=False)
    # the baseline ends before the AIF's own bolus: small veins, rising late, can outnumber the
    # arteries among the study's strongest risers and end it seconds after the arteries' bolus
    # began (a review's AIF then dipped 34 HU below zero, silently, or was refused as having
    # no area)
    before_aif = pre_bolus_frames(aif_raw[:, None], np.ones(1), times=t, sustained=True,
                                  noise_sd=float(second_difference_sd(aif_raw)))
    if before_aif < n_base:
        log.warning("the baseline (%d frames, read from the study's vessels) runs into the "
                    "AIF's bolus: shortened to the %d frames before it", n_base, before_aif)
        n_base = before_aif
        base = hu[:n_base].mean(axis=0)
        enh, venh = enhancement(hu, vhu, search, base=base, n_base=n_base)
        aif_raw, aif_from = arterial_input(aif, aif_mask, vhu, venh, t, n_base=n_base,
                                           exclude=bony, region=searched, check_area=False)
    check_aif_area(aif_raw, t, aif_from)
    # a voxel of the AIF is never the venous reference: an artery peaking late on its noise
    # would otherwise pass the VOF's timing rule and scale the AIF by itself
    arterial = (aif_mask[search] if aif_mask is not None and aif is None
                else np.zeros_like(bony))
    if aif_from.selection is not None:  # (a new array either way: indexing copies)
        arterial[aif_from.selection.indices] = True
    vof_curve, vof_from = venous_output(vof, vof_mask, vhu, venh, t, n_base=n_base,
                                        exclude=bony | arterial, aif=aif_raw,
                                        aif_curve_given=aif is not None, search=search,
                                        spacing=spacing)
    aif_used, pv_info = partial_volume(aif_raw, vof_curve, vof_from, t, n_base=n_base,
                                       tissue_peak_s=early_tissue_peak_time(venh[:, ::7], t))
    vof_used = vof_curve if pv_info["corrected"] else None

    tissue = enh[:, brain[search]]  # (T, N): every brain voxel
    vessels = _vessels(brain, venh[:, brain[search]], aif_raw, vessel_fraction)
    not_vessel = (~vessels[brain]).astype(np.float32)
    # the brain's mean curve, vessels left out: the AIF's timing is judged against it
    tissue_mean = (tissue @ not_vessel) / not_vessel.sum() if not_vessel.any() else None
    brain_mean = tissue.mean(axis=1, dtype=np.float64)  # vessels too: drift is in every voxel
    _check_aif_feeds_tissue(t, aif_raw, tissue[:, ::7], tissue_mean, aif_from.source)
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

    # Noise from every 7th brain voxel: a median needs no more, and the gather is (T, N).
    noise_sd = pre_bolus_noise_sd(hu.reshape(t.size, -1)[:, np.flatnonzero(brain.ravel())[::7]],
                                  n_base)
    flags = _qc(hu, tissue_mean, brain_mean, t, brain=brain, n_base=n_base, aif_raw=aif_raw,
                base_sd=noise_sd,
                late_mean=_late_mean(tissue, values.get("tmax"), ~vessels[brain],
                                     brain=brain, spacing=spacing,
                                     voxel_ml=series.voxel_ml),
                vof_used=vof_used, vof_found=vof_curve, pv_info=pv_info, motion_mm=motion_mm,
                uncorrected_motion_mm=uncorrected_motion_mm, slice_share=slice_share,
                exposed_share=exposed, skull_share=masks.skull_share(base - offset),
                box_mtt=(values["mtt"][~vessels[brain] & (values["cbv"] > 0)]
                         if method in BOX_METHODS else None),
                csf_cut_share=region.csf_share, hu_offset=hu_scale, voxelwise=method != "bayes",
                voxel_volume_ml=series.voxel_ml,
                hyperdense_ml=float(dense.sum()) * series.voxel_ml,
                pv_asked=not (aif_from.source == "given curve" and vof_curve is None),
                osvd_step_s=sample_step(t, grid) if method == "osvd" else None)
    options = THRESHOLDS_ONLY if lesion_options is None else lesion_options
    threshold = options.core_rcbf if options.core_cbv is None else None  # None: core by CBV
    healthy_cbv = normal_cbv(values["cbv"], values["tmax"], ~vessels[brain], options.tmax_hypo)
    judged = (method != "bayes" and threshold is not None and 0.0 < threshold < 1.0
              and noise_sd is not None and healthy_cbv is not None)  # 0: no core sought
    flags["core_unseen"] = core_unseen_flag(
        core_contrast(method, aif_used, t, noise_sd=noise_sd or 0.0, n_base=n_base,
                      healthy_cbv=healthy_cbv, threshold=options.core_rcbf, rho=rho, kh=kh,
                      device=device) if judged else None, threshold)
    provenance = _provenance(method, t, rho=rho, kh=kh, grid=grid, n_base=n_base,
                             aif=(aif_from, aif_raw, aif_used), vof=(vof_from, vof_curve, vof_used),
                             pv_info=pv_info, search=search, brain=brain, vessels=vessels,
                             csf_cut=region.csf_cut, flags=flags) | fitted
    if slice_shift:
        provenance["slice_times_interpolated_s"] = round(slice_shift, 3)
    if series.meta.get("timing_source"):   # where the frame times came from, as read
        provenance["timing_source"] = str(series.meta["timing_source"])
    provenance.update(study_space(series.meta))  # the NIfTI space its written maps keep
    pmaps = PerfusionMaps(maps=maps, affine=series.affine, units=units, provenance=provenance)
    lesions = _lesions(pmaps, brain=brain, search=search, vessels=vessels | dense, rim_mm=rim_mm,
                       options=options)
    # lesions with no bolus at all: brain without blood is no acute core (its Tmax is noise)
    regions = ndimage.label((lesions.core | lesions.hypoperfused) & ~vessels)[0][brain]
    flags["lesion_no_bolus"] = lesion_no_bolus_flag(lesion_no_bolus_ml(
        tissue, aif_used, t, regions, n_base=n_base, voxel_ml=series.voxel_ml, rho=rho, kh=kh))
    tissue_voxels = int(np.count_nonzero(brain & ~vessels))
    flags["widespread_hypoperfusion"] = widespread_hypoperfusion_flag(
        int(np.count_nonzero(lesions.hypoperfused)) / tissue_voxels if tissue_voxels else None,
        (lesions.thresholds["midsagittal_plane"] or {}).get("hypoperfused_share_by_side"),
        lesions.thresholds["core"].get("reference"))
    flags["core_off_mirror"] = core_off_mirror_flag(
        lesions.thresholds["core"].get("hypoperfused_off_mirror_ml"),
        lesions.volumes_ml["hypoperfused"])
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


#: An AIF must enhance at its peak at least this many times the brain's mean curve (vessels left
#: out): arteries enhance 5-20 times as much as tissue (4 times for an automatic AIF of arteries
#: diluted by partial volume until a sinus outshone them); a mask on tissue enhances as much.
MIN_AIF_OVER_TISSUE = 2.0


def _check_aif_feeds_tissue(t: np.ndarray, aif: np.ndarray, brain: np.ndarray,
                            tissue_mean: np.ndarray | None, source: str) -> None:
    """Refuse an AIF (automatic, from a mask or given as a curve) that cannot be an artery
    feeding the brain: its bolus arrives after ``tissue_mean``'s (the brain's mean curve,
    vessels left out; more than :data:`MAX_AIF_LEAD_S`), or it enhances less than
    :data:`MIN_AIF_OVER_TISSUE` times the mean of ``brain``'s (T, N) tissue curves
    (:func:`~ctperf.perfusion.aif.tissue_curve`, vessels left out whatever the AIF: the vessel
    mask is drawn from the AIF's height, so an AIF on tissue leaves none). Maps on it would read
    every delay, Tmax and CBF wrong (a sinus as the AIF: CBF 6x, Tmax negative; a mask on
    tissue: no normal tissue left for the lesions' reference)."""
    automatic = source == "automatic"
    what = "the automatic AIF" if automatic else f"the AIF ({source})"
    def remedy(given: str) -> str:
        return ("no artery feeding the brain was found (a poor injection, or arteries too small "
                "for the pixels); give an AIF mask on an artery (--aif-mask)" if automatic else
                f"it is not an artery feeding the brain ({given}); give an AIF on an artery")

    refused = AIFRefused if automatic else ValidationError
    lag = None if tissue_mean is None else aif_lag(t, aif, tissue_mean)
    if lag is not None and lag > MAX_AIF_LEAD_S:
        raise refused(f"{what}'s bolus arrives {lag:.1f} s after the brain's: "
                      f"{remedy('a vein?')}")
    peak, tissue_peak = float(np.max(aif)), float(np.max(tissue_curve(brain, t)))
    if tissue_peak > 0 and peak < MIN_AIF_OVER_TISSUE * tissue_peak:
        why = remedy("tissue, or a mask far wider than the artery?")
        raise refused(
            f"{what} enhances by {peak:.0f} HU at its peak, under {MIN_AIF_OVER_TISSUE:g} times "
            f"the brain's {tissue_peak:.0f} HU: {why}")


def _brain_slice_share(brain: np.ndarray, inside: np.ndarray, *,
                       bone: np.ndarray | None = None) -> np.ndarray | None:
    """Per slice, the brain's share of ``inside``, what the skull encloses, ``bone`` left out
    (a slice grazing the skull's vault holds mostly bone: on a whole-brain study of 12-16 cm
    such a slice read a quarter of the brain it held), over its median across the slices that
    cut the head well (a quarter of the largest slice's area or more); None with fewer than
    two such slices."""
    if bone is not None:
        inside = inside & ~bone
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
    # as the readers check a file's values: a series built in Python of stored values (HU +
    # 1024) had been refused as "no arterial candidates", asking for a command line option
    try:
        check_hu_plausible(series.hu, lambda t, z: ("series.hu", f"frame {t}, slice {z}: "))
    except InputError as exc:  # no file here: the series' values
        raise ValidationError(str(exc)) from None
    if np.array_equal(series.affine, np.eye(4)):
        # CTPSeries(hu, times) without an affine: on a probe's 2.4 x 2.4 x 5 mm study the
        # hypoperfused volume read 1.6 mL for 50.8, the VOF was rejected and CBF read 2.3x
        log.warning("the study's affine is the identity (1 mm voxels at the origin): unless "
                    "that is its geometry, volumes (mL), the lesions' clean-up (mm) and the "
                    "vessel search are wrong; give CTPSeries(hu, times, affine)")
    problem = non_axial_slices(series.affine)
    if problem is not None:
        raise ValidationError(problem)
    n_t = series.hu.shape[0]
    if n_t < MIN_FRAMES:
        raise ValidationError(f"a perfusion study needs at least {MIN_FRAMES} frames, got {n_t}")
    if vessel_series is not None and vessel_series.shape != series.shape:
        raise ValidationError(f"vessel_series shape {vessel_series.shape} differs from the "
                              f"study's {series.shape}")


def vessel_curves(enhancement: np.ndarray, aif: np.ndarray,
                  fraction: float = VESSEL_FRACTION) -> np.ndarray:
    """Which curves of ``enhancement`` (T, N), smoothed over time (:func:`smooth_time`), peak
    above ``fraction`` of the measured AIF's (enhancement) peak: vessels, bool (N,). Smoothed,
    because the highest single frame of a tissue curve is its noise's highest: at low dose with
    a partial-volume diluted AIF that alone carried tissue over the threshold (docs/methods.md,
    "Vessel voxels")."""
    return smooth_time(enhancement).max(axis=0) > fraction * float(np.max(aif))


def _vessels(brain: np.ndarray, peaks_of: np.ndarray, aif: np.ndarray,
             vessel_fraction: float, *, chunk: int = 1 << 16) -> np.ndarray:
    """Brain voxels (bool (Z, Y, X)) whose enhancement ``peaks_of`` (T, N brain voxels) is a
    vessel's (:func:`vessel_curves`), ``chunk`` voxels at a time."""
    n = peaks_of.shape[1]
    hit = np.empty(n, dtype=bool)
    for s in range(0, n, chunk):
        hit[s:s + chunk] = vessel_curves(peaks_of[:, s:s + chunk], aif, vessel_fraction)
    vessels = np.zeros(brain.shape, dtype=bool)
    vessels[brain] = hit
    return vessels


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


def _late_mean(tissue: np.ndarray, tmax: np.ndarray | None, kept: np.ndarray, *,
               brain: np.ndarray, spacing: tuple[float, float, float],
               voxel_ml: float) -> np.ndarray | None:
    """The mean curve of the tissue (``kept`` of ``tissue`` (T, N), the voxels of ``brain``)
    whose Tmax is over :data:`LATE_TMAX_S` as most of its kept neighbours' are (within
    :data:`LATE_SMOOTH_MM` in-plane: the default lesion clean-up's median, thresholded), when
    that holds :data:`LATE_MIN_ML` or more; else None. Voxels read late by their noise alone,
    scattered over the brain, are left out: on a 512 px study at 12 HU they had been 75 of
    120 mL, and the mean of a lesion cut short by the scan's end had fallen to 0.28 of its
    peak, under the flag's 0.3. Vessels crossing a lesion do not cut it up (they are not
    counted among the neighbours)."""
    if tmax is None:
        return None
    with np.errstate(invalid="ignore"):
        late = kept & (tmax > LATE_TMAX_S)
    grid, valid = np.zeros(brain.shape, np.float32), np.zeros(brain.shape, np.float32)
    grid[brain], valid[brain] = late, kept
    _, dy, dx = spacing
    size = (1, *(2 * max(1, round(LATE_SMOOTH_MM / d)) + 1 for d in (dy, dx)))
    near_late = ndimage.uniform_filter(grid, size=size, mode="constant")
    near_kept = ndimage.uniform_filter(valid, size=size, mode="constant")
    regional = (late & (near_late > 0.5 * near_kept)[brain]).astype(np.float32)
    if regional.sum() * voxel_ml < LATE_MIN_ML:
        return None
    mean = (tissue @ regional) / regional.sum()
    # a mean with no bolus (tissue of little blood, read late by its noise: a probe's high
    # slab, 507 voxels of 4 % tissue) has nothing to cut off; its smoothed last frame had
    # stood at its peak, truncation 1.00, on a study that washed out
    _, span, noise = start_level(mean)
    return mean if span > MIN_AIF_SNR * noise else None


#: Tmax (s) over which tissue counts as late for the ``truncation`` flag: the lesions' default
#: hypoperfusion threshold.
LATE_TMAX_S = LesionOptions.tmax_hypo
#: The least volume of late tissue (mL) whose mean curve the ``truncation`` flag reads.
LATE_MIN_ML = 1.0
#: In-plane reach (mm) of the neighbours whose majority must be late too: the default lesion
#: clean-up's median (:class:`~ctperf.lesion_options.LesionOptions` ``smooth_mm``).
LATE_SMOOTH_MM = LesionOptions.smooth_mm


def _qc(hu: np.ndarray, tissue_mean: np.ndarray | None, brain_mean: np.ndarray,
        t: np.ndarray, *, brain: np.ndarray, base_sd: float | None,
        late_mean: np.ndarray | None,
        n_base: int, aif_raw: np.ndarray, vof_used: np.ndarray | None,
        vof_found: np.ndarray | None,
        pv_info: dict[str, Any], pv_asked: bool, motion_mm: np.ndarray | None,
        uncorrected_motion_mm: np.ndarray | None, slice_share: np.ndarray | None,
        exposed_share: float | None, skull_share: float,
        voxelwise: bool, voxel_volume_ml: float, box_mtt: np.ndarray | None,
        csf_cut_share: float | None, hu_offset: float | None,
        hyperdense_ml: float, osvd_step_s: float | None) -> dict[str, Any]:
    """The QC flags of :func:`~ctperf.perfusion.qc_flags`; ``pv_asked`` is false when a given
    AIF curve came without a VOF (nothing to correct it with); ``box_mtt``: the box model's
    MTT of the tissue voxels (vessels left out), None for the other methods; ``osvd_step_s``
    the step of the samples oSVD deconvolved, None for the other methods; ``vof_found`` the VOF
    found, used or not (``vof_used`` scaled the AIF); ``base_sd`` the brain voxels' noise (HU
    per frame, :func:`~ctperf.perfusion.inputs.pre_bolus_noise_sd`)."""
    shift = None
    if motion_mm is None:  # not registered: is the skull still?
        shift = skull_shift_px(hu, n_base=n_base, noise_sd=base_sd or 0.0,
                               offset=hu_offset or 0.0)
    return qc_flags(times=t, aif=aif_raw, vof=vof_used, venous=vof_found,
                    tissue_mean=tissue_mean,
                    late_mean=late_mean, brain_mean=brain_mean,
                    baseline_sd=base_sd, baseline_frames=n_base,
                    brain_voxels=int(brain.sum()), voxel_ml=voxel_volume_ml,
                    pv_factor=pv_info["factor"], displacement_mm=motion_mm,
                    uncorrected_mm=uncorrected_motion_mm, skull_shift=shift,
                    hyperdense_ml=hyperdense_ml,
                    brain_slice_share=slice_share,
                    exposed_share=exposed_share, skull_share=skull_share,
                    edge_share=flat_edge_share(hu, brain, n_base=n_base,
                                               noise_sd=base_sd or 0.0),
                    pv_corrected=bool(pv_info["corrected"]) if pv_asked else None,
                    box_mtt=box_mtt, csf_cut_share=csf_cut_share,
                    hu_offset=hu_offset, voxelwise=voxelwise, osvd_step_s=osvd_step_s)


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

