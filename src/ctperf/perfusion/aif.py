"""Automatic arterial and venous input functions, and the partial-volume correction.

Arterial candidates are ranked by early peak, high peak and narrow bolus, truncated curves are
dropped, and the best ``n_voxels`` (100, as in Gava et al. 2023) are averaged. The venous output
comes from late, high-area voxels (the dural sinuses). Arterial voxels are smaller than the blur
of the arteries, so the AIF is scaled until its area matches the VOF's over the same stretch of
the bolus (the VOF's window shifted back by the arterio-venous delay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ctperf.errors import ValidationError

__all__ = ["VesselCurve", "correct_partial_volume", "curve_features", "select_aif", "select_vof"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VesselCurve:
    """A selected input/output function.

    ``indices`` (K,) columns of the (T, N) matrix that were averaged; ``curve`` (T,) their mean
    enhancement in HU; ``ttp`` s from the first frame; ``area`` HU s.
    """

    indices: np.ndarray
    curve: np.ndarray
    ttp: float
    area: float


def curve_features(enh: np.ndarray, times: np.ndarray) -> dict[str, np.ndarray]:
    """Peak (HU), time to peak (s), full width at half maximum (s), area (HU s), end fraction.

    Parameters
    ----------
    enh : ndarray, shape (T, N)
        Enhancement curves in HU.
    times : ndarray, shape (T,)

    Returns
    -------
    dict of ndarray, each (N,)
        ``peak``, ``ttp``, ``fwhm``, ``area``, ``end`` (last-frame value / peak: a truncated
        or recirculating bolus ends high).
    """
    t = np.asarray(times, dtype=np.float64)
    peak_i = np.argmax(enh, axis=0)
    peak = enh[peak_i, np.arange(enh.shape[1])].astype(np.float64)
    dt = np.gradient(t)
    above = enh >= 0.5 * peak
    fwhm = (above * dt[:, None]).sum(axis=0)
    area = np.trapezoid(np.clip(enh, 0, None), t, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        end = np.where(peak > 0, enh[-1] / peak, 1.0)
    return {"peak": peak, "ttp": t[peak_i] - t[0], "fwhm": fwhm, "area": area, "end": end}


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r / max(x.size - 1, 1)


def select_aif(
    enh: np.ndarray,
    times: np.ndarray,
    *,
    n_voxels: int = 100,
    min_peak_hu: float = 80.0,
    pool_fraction: float = 0.3,
    max_end: float = 0.5,
    exclude: np.ndarray | None = None,
) -> VesselCurve:
    """Pick arterial voxels and average their curves.

    Parameters
    ----------
    enh : ndarray, shape (T, N)
        Enhancement (HU above baseline) of the candidate voxels.
    times : ndarray, shape (T,)
    n_voxels : int
        How many of the best-ranked voxels to average.
    min_peak_hu : float
        Candidates peak at least this high and at least ``pool_fraction`` x the 99.9th
        percentile of all peaks.
    max_end : float
        Drop voxels whose last frame is still above this fraction of their peak (truncated).
    exclude : ndarray of bool, shape (N,), optional
        Voxels never chosen (e.g. next to bone, see :func:`ctperf.preprocess.mask.near_bone`).

    Returns
    -------
    VesselCurve
    """
    n_t = enh.shape[0]
    peak_all = enh.max(axis=0)
    # Curves that do not wash out (steps where the head moved, truncated boluses) set no
    # threshold and are never chosen.
    off = enh[-1] > max_end * peak_all
    if exclude is not None:
        off |= np.asarray(exclude, dtype=bool)
    peak_all = np.where(off, -np.inf, peak_all)
    top = float(np.percentile(peak_all[np.isfinite(peak_all)], 99.9)) \
        if np.isfinite(peak_all).any() else 0.0
    # Features only for the strong voxels (a study has ~10^6 brain voxels, ~10^3 candidates).
    strong = np.flatnonzero(peak_all >= max(min_peak_hu, pool_fraction * top))
    f = curve_features(enh[:, strong], times)
    keep = (f["end"] <= max_end) & (np.argmax(enh[:, strong], axis=0) < n_t - 2)
    f = {k: v[keep] for k, v in f.items()}
    strong = strong[keep]
    pool = np.arange(strong.size)
    if pool.size == 0:
        need = max(min_peak_hu, pool_fraction * top)
        raise ValidationError(
            f"no arterial candidates: no voxel enhances by {need:.0f} HU with a complete bolus; "
            "give an AIF mask (--aif-mask)")
    # Early, high, narrow: equal weights on the ranks; arrival counts twice, veins are high too.
    score = (2.0 * _rank(f["ttp"][pool]) + _rank(-f["peak"][pool]) + _rank(f["fwhm"][pool]))
    chosen = pool[np.argsort(score, kind="stable")[: max(1, int(n_voxels))]]
    # Keep those that agree on timing with the best ones (one artery tree, no stray veins).
    ttp0 = float(np.median(f["ttp"][chosen[: max(1, chosen.size // 4)]]))
    chosen = chosen[np.abs(f["ttp"][chosen] - ttp0) <= 2.0 * float(np.median(np.diff(times)))
                    + 1.0]
    # And those that peak at least half as high as the best: when an artery has fewer voxels
    # than n_voxels, its partial-volume rim would otherwise dilute the curve.
    chosen = chosen[f["peak"][chosen] >= 0.5 * f["peak"][chosen].max()]
    chosen = strong[chosen]
    curve = enh[:, chosen].mean(axis=1, dtype=np.float64)
    log.info("AIF: %d voxels, peak %.0f HU at %.1f s", chosen.size, curve.max(), ttp0)
    return _vessel(chosen, curve, times)


def select_vof(
    enh: np.ndarray,
    times: np.ndarray,
    *,
    aif_ttp: float,
    n_voxels: int = 20,
    min_lag_s: float = 1.5,
    min_peak_hu: float = 50.0,
    pool_fraction: float = 0.7,
    max_tail: float = 0.5,
    exclude: np.ndarray | None = None,
) -> VesselCurve:
    """Pick venous voxels (late peak, largest area) and average their curves.

    Parameters
    ----------
    enh : ndarray, shape (T, N)
    times : ndarray, shape (T,)
    aif_ttp : float
        The AIF's time to peak, s; veins peak at least ``min_lag_s`` later.
    n_voxels : int
        How many of the largest-area late voxels to average, at most.
    min_peak_hu : float
        Venous candidates enhance by at least this much.
    pool_fraction : float
        Keep only those with at least this fraction of the largest late area.
    max_tail : float
        Candidates must wash out: last frame and deepest dip within this fraction of the peak
        (a voxel at a bone or vessel edge left misaligned by residual motion shows a step or a
        dip, not a bolus, and its large area would inflate the partial-volume correction).
    exclude : ndarray of bool, shape (N,), optional
        Voxels never chosen (e.g. next to bone, see :func:`near_bone`).
    """
    t = np.asarray(times, dtype=np.float64)
    peak_i = np.argmax(enh, axis=0)
    peak_all = enh[peak_i, np.arange(enh.shape[1])]
    # Late and clearly enhancing voxels only (a study has ~10^6 brain voxels).
    bolus_like = (enh[-1] <= max_tail * peak_all) & (enh.min(axis=0) >= -max_tail * peak_all)
    if exclude is not None:
        bolus_like &= ~np.asarray(exclude, dtype=bool)
    late = np.flatnonzero((t[peak_i] - t[0] >= aif_ttp + min_lag_s) & (peak_all >= min_peak_hu)
                          & bolus_like)
    area = np.trapezoid(np.clip(enh[:, late], 0, None), t, axis=0)
    if late.size == 0:
        raise ValidationError("no venous candidates: no voxel peaks after the AIF; "
                              "give a VOF mask (--vof-mask)")
    order = np.argsort(-area, kind="stable")[: max(1, int(n_voxels))]
    # Only voxels close to the largest area: a vein smaller than n_voxels must not be diluted by
    # tissue or partial-volume rims.
    chosen = late[order[area[order] >= pool_fraction * area[order[0]]]]
    curve = enh[:, chosen].mean(axis=1, dtype=np.float64)
    log.info("VOF: %d voxels, peak %.0f HU", chosen.size, curve.max())
    return _vessel(chosen, curve, times)


def _vessel(indices: np.ndarray, curve: np.ndarray, times: np.ndarray) -> VesselCurve:
    t = np.asarray(times, dtype=np.float64)
    return VesselCurve(indices=np.asarray(indices), curve=curve,
                       ttp=float(t[np.argmax(curve)] - t[0]),
                       area=float(np.trapezoid(np.clip(curve, 0, None), t)))


def correct_partial_volume(aif: np.ndarray, vof: np.ndarray, times: np.ndarray
                           ) -> tuple[np.ndarray, float]:
    """Scale the AIF so its area equals the VOF's over the same part of the bolus.

    The VOF is the AIF delayed and dispersed by the brain's transit, so within the acquisition
    window the VOF has lost the last ``lag`` seconds of its bolus that the AIF still shows. The
    areas are compared as ``area(VOF on [t0, t_end]) / area(AIF on [t0, t_end - lag])`` with
    ``lag`` the difference of the curves' first moments.

    Parameters
    ----------
    aif, vof : ndarray, shape (T,)
        Enhancement in HU.
    times : ndarray, shape (T,)

    Returns
    -------
    scaled_aif : ndarray, shape (T,)
    factor : float
        The scale applied (>1 when the measured AIF was too low).
    """
    t = np.asarray(times, dtype=np.float64)
    a, v = np.clip(aif, 0, None), np.clip(vof, 0, None)
    area_a, area_v = np.trapezoid(a, t), np.trapezoid(v, t)
    if not (area_a > 0 and area_v > 0):
        raise ValidationError("AIF or VOF has no positive area; cannot correct partial volume")
    lag = max(0.0, float(np.trapezoid(v * t, t) / area_v - np.trapezoid(a * t, t) / area_a))
    cut = t[-1] - lag
    grid = np.linspace(t[0], cut, 4 * t.size)
    area_a_cut = float(np.trapezoid(np.interp(grid, t, a), grid))
    factor = float(area_v / area_a_cut) if area_a_cut > 0 else float(area_v / area_a)
    return np.asarray(aif, dtype=np.float64) * factor, factor
