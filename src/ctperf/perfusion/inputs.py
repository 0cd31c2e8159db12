"""The arterial input and venous output of a study, as :func:`~ctperf.perfusion.run_perfusion`
takes them.

Each curve is given (a (T,) curve in HU enhancement), averaged over a given mask, or chosen by
ctperf (:func:`~ctperf.perfusion.select_aif`, :func:`~ctperf.perfusion.select_vof`). The
partial-volume correction only ever enlarges the AIF. An automatic VOF that
:func:`~ctperf.perfusion.assess_vof` finds implausible (peaking no later than the AIF, lost in
noise, or holding clearly less area than the AIF) is dropped with a logged warning and the maps
are computed from the AIF as measured; a VOF the user gave (curve or mask) that fails the same
checks is refused with an error, since the user asked for that vein.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import chi2

from ctperf import masks
from ctperf.errors import AIFRefused, ValidationError
from ctperf.perfusion.aif import (
    VesselCurve,
    assess_vof,
    select_aif,
    select_vof,
    tissue_peak_time,
)
from ctperf.perfusion.curves import (
    aif_arrival,
    check_bolus_present,
    check_bolus_start,
    check_peak_not_clipped,
    finite_aif,
    off_zero_before,
    positive_area,
    second_difference_sd,
)
from ctperf.perfusion.qc import check_first_pass_sampled

__all__ = ["CurveOrigin", "arterial_input", "partial_volume", "pre_bolus_noise_sd",
           "venous_output", "vessel_info", "voxel_noise_sd"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveOrigin:
    """Where a vessel curve came from: ``source`` is "given curve", "mask", "automatic" (then
    ``selection`` holds the voxels chosen), "none" or "none found"; ``note`` says what the
    automatic choice had to correct, if anything."""

    source: str
    selection: VesselCurve | None = None
    note: str | None = None


def arterial_input(aif: np.ndarray | None, aif_mask: np.ndarray | None, vhu: np.ndarray,
                   venh: np.ndarray, t: np.ndarray, *, n_base: int,
                   exclude: np.ndarray, region: str = "voxels searched",
                   check_area: bool = True) -> tuple[np.ndarray, CurveOrigin]:
    """The measured AIF: the given curve, the mean of the given mask, or ctperf's choice.

    Parameters
    ----------
    aif : ndarray, shape (T,), optional
        A given curve, HU enhancement.
    aif_mask : ndarray of bool, shape (Z, Y, X), optional
        Voxels to average (baseline subtracted) when no curve is given.
    vhu : ndarray, shape (T, Z, Y, X)
        The study in which vessels are measured, HU.
    venh : ndarray, shape (T, N)
        Enhancement (HU) of the N searched voxels of ``vhu``, for the automatic choice.
    t : ndarray, shape (T,)
        Frame times, s.
    n_base : int
        Pre-bolus frames.
    exclude : ndarray of bool, shape (N,)
        Searched voxels never chosen (next to bone).
    region : str
        What the searched voxels are, for the error raised when none is an artery.
    check_area : bool
        Refuse a curve without a positive area (:func:`check_aif_area`); off where the
        caller checks the baseline against the curve first.

    Returns
    -------
    curve : ndarray, shape (T,)
        HU enhancement, with a positive area (``check_area``).
    origin : CurveOrigin
    """
    if aif is not None:
        curve, origin = finite_aif(aif, t), CurveOrigin("given curve")
        _check_given_enhancement(curve, curve, "aif", 0.05)
    elif aif_mask is not None:
        curve, origin = _curve_from_mask(vhu, aif_mask, n_base, "AIF"), CurveOrigin("mask")
    else:
        sel = select_aif(venh, t, exclude=exclude, region=region)
        origin = CurveOrigin("automatic", sel)
        # Arteries peak before the tissue they feed (every 7th voxel: its mean is as steady).
        # A choice peaking after it is a vein that outshone partial-volume-diluted arteries:
        # chosen again among the voxels peaking no later, or refused.
        tissue_peak = tissue_peak_time(venh[:, ::7], t)
        if sel.ttp > tissue_peak:
            note = (f"the first choice ({sel.indices.size} voxels) peaked at {sel.ttp:.1f} s, "
                    f"after the tissue's bolus at {tissue_peak:.1f} s (a vein, not an "
                    "artery); chosen again among the voxels peaking no later than the tissue")
            log.warning("automatic AIF: %s", note)
            sel = select_aif(venh, t, exclude=exclude, latest_s=tissue_peak, region=region)
            origin = CurveOrigin("automatic", sel, note)
        curve = sel.curve
    if origin.source == "automatic" and origin.selection is not None:
        try:
            check_bolus_present(curve, what=f"the automatic AIF ({origin.selection.indices.size}"
                                            " voxels)",
                                remedy="no artery stands out of the noise at these pixels and "
                                       "this dose: give an AIF mask on an artery (--aif-mask)")
        except ValidationError as exc:
            raise AIFRefused(str(exc)) from None
    else:
        check_bolus_present(curve)
    check_bolus_start(curve)
    check_peak_not_clipped(curve, t, remedy="give an AIF mask on an artery whose voxels are "
                                          "not saturated (--aif-mask)")
    check_first_pass_sampled(t, curve)
    if check_area:
        check_aif_area(curve, t, origin)
    return curve, origin


def check_aif_area(curve: np.ndarray, t: np.ndarray, origin: CurveOrigin) -> None:
    """Refuse an AIF (T,) whose area over the frame times ``t`` is not positive."""
    if not np.trapezoid(np.asarray(curve, dtype=np.float64), t) > 0:
        raise ValidationError(
            f"the AIF ({origin.source}) has no positive area: its curve sits below its "
            "pre-bolus baseline, as when the head moved between the baseline and the bolus; "
            "correct motion first (--register) or give an AIF mask (--aif-mask)")


def venous_output(vof: np.ndarray | None, vof_mask: np.ndarray | None, vhu: np.ndarray,
                  venh: np.ndarray, t: np.ndarray, *, n_base: int, exclude: np.ndarray,
                  aif: np.ndarray, aif_curve_given: bool, search: np.ndarray | None = None,
                  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
                  ) -> tuple[np.ndarray | None, CurveOrigin]:
    """The VOF: the given curve, the mean of the given mask, ctperf's choice, or none.

    Parameters
    ----------
    vof, vof_mask, vhu, venh, t, n_base, exclude
        As for :func:`arterial_input`.
    aif : ndarray, shape (T,)
        The measured AIF: an automatic VOF must peak after it.
    aif_curve_given : bool
        The AIF was given as a curve: without a VOF curve or mask, none is looked for.
    search : ndarray of bool, shape (Z, Y, X), optional
        Where the N voxels of ``venh`` lie, on a grid of ``spacing`` (z, y, x) mm: with pixels
        of 1.5 mm or less, the automatic choice then ranks voxels by the mean area of the
        other voxels within 1.5 mm in plane (:func:`select_vof`'s ``area``), which holds no
        error of the voxel's own baseline; coarser pixels, whose noise is lower and whose
        neighbours may be outside a thin vein, rank by their own area.

    Returns
    -------
    curve : ndarray, shape (T,), or None
        HU enhancement; None with a given AIF curve alone, or when no vein qualifies (logged).
    origin : CurveOrigin
    """
    if vof is not None:
        curve = finite_aif(vof, t, name="vof")
        _check_given_enhancement(curve, aif, "vof", 0.05)
        return curve, CurveOrigin("given curve")
    if vof_mask is not None:
        return _curve_from_mask(vhu, vof_mask, n_base, "VOF"), CurveOrigin("mask")
    if aif_curve_given:
        return None, CurveOrigin("none")
    aif_ttp = float(t[np.argmax(aif)] - t[0])
    noise_sd = voxel_noise_sd(venh[:, ::7], n_base)
    try:
        area = None if search is None else _neighbourhood_area(venh, t, search, spacing)
        sel = select_vof(venh, t, aif_ttp=aif_ttp, exclude=exclude, noise_sd=noise_sd,
                         area=area, aif=aif)
    except ValidationError as exc:
        log.warning("%s; the AIF is not corrected for partial volume, so CBF and CBV "
                    "may be overestimated", exc)
        return None, CurveOrigin("none found")
    return sel.curve, CurveOrigin("automatic", sel)


#: Half-width (mm) of the in-plane neighbourhood whose mean area ranks venous voxels.
VOF_NEIGHBOURHOOD_MM = 1.5


def _neighbourhood_area(venh: np.ndarray, t: np.ndarray, search: np.ndarray,
                        spacing: tuple[float, float, float]) -> np.ndarray | None:
    """Per searched voxel (N,), the mean area (HU s) of the other searched voxels within
    :data:`VOF_NEIGHBOURHOOD_MM` in plane (a square); None when pixels are too coarse for any
    (each voxel then ranks by its own area)."""
    from scipy import ndimage

    k = int(VOF_NEIGHBOURHOOD_MM // min(spacing[1:]))
    if k < 1:
        return None
    size = (1, 2 * k + 1, 2 * k + 1)
    n = float((2 * k + 1) ** 2)
    area = np.zeros(search.shape, dtype=np.float64)
    area[search] = positive_area(venh, t)
    inside = search.astype(np.float64)
    total = ndimage.uniform_filter(area, size=size, mode="constant") * n - area
    count = ndimage.uniform_filter(inside, size=size, mode="constant") * n - inside
    return (total / np.maximum(count, 0.5))[search]


def partial_volume(aif: np.ndarray, vof: np.ndarray | None, vof_origin: CurveOrigin,
                   t: np.ndarray, *, n_base: int, tissue_peak_s: float | None = None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """The AIF to use and what was done about partial volume (for the provenance).

    A VOF that :func:`~ctperf.perfusion.assess_vof` rejects is refused with an error when the
    user gave it (they asked for that vein explicitly), and dropped with a warning when it was
    chosen automatically: the maps are then computed from the AIF as measured.

    Parameters
    ----------
    aif : ndarray, shape (T,)
        The measured AIF, HU enhancement.
    vof : ndarray, shape (T,), optional
        The VOF, HU enhancement.
    vof_origin : CurveOrigin
        Where the VOF came from.
    t : ndarray, shape (T,)
        Frame times, s.
    n_base : int
        Pre-bolus frames.
    tissue_peak_s : float, optional
        When the tissue's bolus peaks (s from the first frame): a VOF peaking before it is no
        vein (:func:`~ctperf.perfusion.assess_vof`).

    Returns
    -------
    aif : ndarray, shape (T,)
        Scaled up to the VOF's area, or as measured.
    info : dict
        ``corrected``, ``factor`` (None when not corrected), ``reason`` and, with a VOF,
        ``area_ratio`` and ``snr``.
    """
    if vof is None:
        reason = ("no VOF found" if vof_origin.source == "none found"
                  else "no VOF given with the AIF curve")
        return aif, {"corrected": False, "factor": None, "reason": reason}
    check = assess_vof(aif, vof, t, n_baseline=n_base, tissue_peak_s=tissue_peak_s)
    info: dict[str, Any] = {"area_ratio": None if not np.isfinite(check.ratio)
                            else round(check.ratio, 4), "snr": round(min(check.snr, 1e6), 2)}
    if not check.ok:
        if vof_origin.source != "automatic":
            what = "mask on" if vof_origin.source == "mask" else "curve of"
            raise ValidationError(
                f"the given VOF ({vof_origin.source}) cannot correct the AIF for partial "
                f"volume: {check.reason}; give a VOF {what} a large vein (e.g. the superior "
                "sagittal sinus), or none")
        log.warning("automatic VOF rejected (%s); the AIF is not corrected for partial volume, "
                    "so CBF and CBV may be overestimated", check.reason)
        return aif, {**info, "corrected": False, "factor": None,
                     "reason": f"automatic VOF rejected: {check.reason}"}
    return aif * check.factor, {**info, "corrected": True, "factor": check.factor,
                                "reason": "AIF area scaled to the VOF's" if check.factor > 1
                                else "VOF area agrees with the AIF's: no scaling"}


def vessel_info(origin: CurveOrigin, coords: np.ndarray, curve: np.ndarray | None
                ) -> dict[str, Any]:
    """A vessel curve's source, values (HU, rounded) and, when chosen automatically, voxels
    (z, y, x); ``coords`` (3, N) are the indices of the N searched voxels."""
    info: dict[str, Any] = {"source": origin.source}
    if curve is not None:
        info["curve_hu"] = np.round(np.asarray(curve, dtype=np.float64), 3).tolist()
    if origin.selection is not None:
        info["voxels_zyx"] = coords[:, origin.selection.indices].T.tolist()
    if origin.note is not None:
        info["note"] = origin.note
    return info


def _check_given_enhancement(curve: np.ndarray, aif: np.ndarray, name: str, share: float
                             ) -> None:
    """Refuse a curve given as enhancement that stands off zero before the AIF's bolus
    arrives (:func:`~ctperf.perfusion.curves.off_zero_before`), as ``ctperf curves`` refuses
    one: an AIF still at its unenhanced 40 HU had read CBV 20 % low, with no flag."""
    k = aif_arrival(aif)
    if k is None:
        return  # no arrival: the bolus checks speak
    off = off_zero_before(curve, k, share)
    if off is not None:
        raise ValidationError(
            f"{name} given stands at {off[0]:.3g} before the AIF's bolus arrives, against a "
            f"rise of {off[1]:.3g}: a given curve is enhancement (its pre-bolus level "
            "subtracted), as the tissue's curves are")


def _curve_from_mask(hu: np.ndarray, region: np.ndarray, n_base: int, what: str) -> np.ndarray:
    """Mean enhancement (T,) HU of the voxels of ``region`` (Z, Y, X)."""
    region = masks.as_region(region, hu.shape[1:], f"{what} mask")
    if not region.any():
        raise ValidationError(f"{what} mask is empty")
    c = hu[:, region].astype(np.float64)
    return (c - c[:n_base].mean(axis=0)).mean(axis=1)


def pre_bolus_noise_sd(curves: np.ndarray, n_base: int) -> float | None:
    """The noise SD (HU per frame) of single-voxel curves (T, N) from their first ``n_base``
    (pre-bolus) frames, unbiased for Gaussian noise: the median of the voxels' sample variances,
    divided by the median of chi-square over its degrees of freedom (the median SD of 6 frames
    reads 0.84 sigma, and the SD with n rather than n - 1 lower still). Under three baseline
    frames, the median of the curves' second-difference SDs over every frame
    (:func:`~ctperf.perfusion.curves.second_difference_sd`, robust to the bolus: frames 3 s
    apart had left one baseline frame, and a 10 HU study was not flagged noisy); None under
    three frames in all."""
    if n_base < 3:
        c = np.asarray(curves, dtype=np.float64)
        return float(np.median(second_difference_sd(c))) if c.shape[0] >= 3 else None
    var = np.var(np.asarray(curves[:n_base], dtype=np.float64), axis=0, ddof=1)
    k = n_base - 1
    return float(np.sqrt(np.median(var) * k / chi2.ppf(0.5, k)))


def voxel_noise_sd(curves: np.ndarray, n_base: int) -> float:
    """Median noise SD (HU) of single-voxel curves (T, N): pre-bolus SD when there are three or
    more baseline frames, never below the SD implied by the median absolute second difference."""
    c = np.asarray(curves, dtype=np.float64)
    sd = float(np.median(second_difference_sd(c)))
    if n_base >= 3:
        sd = max(sd, float(np.median(c[:n_base].std(axis=0, ddof=1))))
    return sd
