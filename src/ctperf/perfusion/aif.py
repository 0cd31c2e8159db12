"""Automatic arterial and venous input functions, and the partial-volume correction.

Arterial candidates are ranked by early peak, high peak and narrow bolus, truncated curves are
dropped, and the best ``n_voxels`` (100, as in Gava et al. 2023) that agree on timing are
averaged: the best quarter's timing, or that of a group among them filling clearly earlier
(a vein cannot fill before its artery). Arteries feed the
tissue and peak before it: a choice that peaks after the tissue's bolus (:func:`tissue_peak_time`)
is a vein (the sinuses can outshine partial-volume-diluted arteries, and their late, broad curve
would shift every delay and Tmax by seconds), and the choice is made again among the voxels
peaking no later than the tissue (``latest_s``; no later rather than before, so that frames a
few seconds apart, which can hold an artery's and the tissue's peak in one frame, keep their
arteries). The venous output
comes from late, high-area voxels (the dural sinuses). Arterial voxels are smaller than the blur
of the arteries, so the AIF is scaled until its area matches the VOF's over the same stretch of
the bolus (the VOF's window shifted back by the arterio-venous delay).

The correction fails safe: it may only enlarge the AIF (a vein cannot carry less contrast than a
partial-volume-diluted artery), and :func:`assess_vof` rejects a VOF that peaks no later than
the AIF, does not stand above its noise, or holds clearly less area than the AIF. Without a
plausible VOF the AIF is used as measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from ctperf.errors import AIFRefused, ValidationError
from ctperf.perfusion.curves import (
    TRUNCATED_END,
    TTP_SMOOTH_S,
    brief_peak,
    gaussian_time,
    positive_area,
    second_difference_sd,
    spiky,
)

__all__ = [
    "VesselCurve",
    "VofCheck",
    "assess_vof",
    "correct_partial_volume",
    "curve_features",
    "curve_noise_sd",
    "early_tissue_peak_time",
    "select_aif",
    "select_vof",
    "tissue_curve",
    "tissue_peak_time",
]

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
    """Peak (HU), time to peak (s), half-rise time (s), full width at half maximum (s), area
    (HU s), end fraction.

    Parameters
    ----------
    enh : ndarray, shape (T, N)
        Enhancement curves in HU.
    times : ndarray, shape (T,)

    Returns
    -------
    dict of ndarray, each (N,)
        ``peak``, ``ttp``, ``rise`` (when the curve first reaches half its peak, interpolated
        between frames: unlike ``ttp`` not tied to the frames, which can be seconds apart),
        ``fwhm``, ``area``, ``end`` (last-frame value / peak: a truncated or recirculating
        bolus ends high).
    """
    t = np.asarray(times, dtype=np.float64)
    peak_i = np.argmax(enh, axis=0)
    peak = enh[peak_i, np.arange(enh.shape[1])].astype(np.float64)
    dt = np.gradient(t)
    above = enh >= 0.5 * peak
    fwhm = (above * dt[:, None]).sum(axis=0)
    cols = np.arange(enh.shape[1])
    i = np.argmax(above, axis=0)
    i0 = np.maximum(i - 1, 0)
    lo, hi = enh[i0, cols].astype(np.float64), enh[i, cols].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(hi > lo, (0.5 * peak - lo) / (hi - lo), 0.0)
    rise = t[i0] + np.clip(frac, 0.0, 1.0) * (t[i] - t[i0]) - t[0]
    area = positive_area(enh, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        end = np.where(peak > 0, enh[-1] / peak, 1.0)
    return {"peak": peak, "ttp": t[peak_i] - t[0], "rise": rise, "fwhm": fwhm, "area": area,
            "end": end}


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks in [0, 1]; equal values share their mean rank (times to peak fall on frames, so
    many voxels tie: their order in the volume must not rank them)."""
    return (rankdata(x, method="average") - 1.0) / max(x.size - 1, 1)


def select_aif(
    enh: np.ndarray,
    times: np.ndarray,
    *,
    n_voxels: int = 100,
    min_peak_hu: float = 80.0,
    pool_fraction: float = 0.3,
    max_end: float = 0.5,
    min_relative_peak: float = 0.7,
    exclude: np.ndarray | None = None,
    latest_s: float | None = None,
    region: str = "voxels searched",
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
    min_relative_peak : float
        Of the best-ranked voxels, keep those peaking at least this fraction of the median peak
        of the five highest (the artery's core, not its partial-volume rim).
    exclude : ndarray of bool, shape (N,), optional
        Voxels never chosen (e.g. next to bone, see :func:`ctperf.masks.near_bone`).
    latest_s : float, optional
        The tissue's bolus peak, s from the first frame (:func:`tissue_peak_time`): only
        voxels peaking no later are candidates (the peak threshold is set by all).
    region : str
        What the N voxels are, for the error raised when none is a candidate.

    Returns
    -------
    VesselCurve
    """
    n_t = enh.shape[0]
    t = np.asarray(times, dtype=np.float64)
    peak_i = np.argmax(enh, axis=0)
    peak_all = np.take_along_axis(enh, peak_i[None], axis=0)[0]
    # Curves that do not wash out (steps where the head moved, truncated boluses) or peak for
    # a frame or two (bone carried in by a jerk of the head) set no threshold and are never
    # chosen.
    unwashed = enh[-1] > max_end * peak_all
    peak_seen = peak_all
    off = unwashed | brief_peak(enh, t)
    if exclude is not None:
        off |= np.asarray(exclude, dtype=bool)
    peak_all = np.where(off, -np.inf, peak_all)
    top = float(np.percentile(peak_all[np.isfinite(peak_all)], 99.9)) \
        if np.isfinite(peak_all).any() else 0.0
    # Curves peaking after the tissue's are never chosen, but still set the threshold (the
    # brightest vessels tell how strongly the study enhances).
    if latest_s is not None:
        peak_all = np.where(t[peak_i] - t[0] > latest_s, -np.inf, peak_all)
    # Features only for the strong voxels (a study has ~10^6 brain voxels, ~10^3 candidates).
    strong = np.flatnonzero(peak_all >= max(min_peak_hu, pool_fraction * top))
    f = curve_features(enh[:, strong], times)
    keep = (f["end"] <= max_end) & (np.argmax(enh[:, strong], axis=0) < n_t - 2)
    f = {k: v[keep] for k, v in f.items()}
    strong = strong[keep]
    pool = np.arange(strong.size)
    if pool.size == 0:
        need = max(min_peak_hu, pool_fraction * top)
        when = "" if latest_s is None else f" peaking by the tissue's peak ({latest_s:.1f} s)"
        cut = int((unwashed & (peak_seen >= need)).sum())
        ended = (f" ({cut} enhance so but stand above {max_end:.0%} of their peak at the last "
                 f"frame, {t[-1] - t[0]:.1f} s: the scan may have ended before the bolus "
                 "passed)") if cut else ""
        raise AIFRefused(
            f"no arterial candidates: none of the {enh.shape[1]} {region}{when} enhances by "
            f"{need:.0f} HU with a complete bolus{ended}; give an AIF mask (--aif-mask)")
    # Early, high, narrow: equal weights on the ranks; arrival counts twice, veins are high too.
    score = (2.0 * _rank(f["ttp"][pool]) + _rank(-f["peak"][pool]) + _rank(f["fwhm"][pool]))
    chosen = pool[np.argsort(score, kind="stable")[: max(1, int(n_voxels))]]
    # Keep those that agree on timing with the best ones (one artery tree, no stray veins):
    # within two frame steps plus a second of the best quarter's median time to peak (a
    # voxel's own time, so that the reference voxel itself always stays).
    # With frames seconds apart two frame steps can hold an artery's and a vein's peaks, so the
    # half-rise times (between frames) must also agree within half a step plus 1.5 s.
    best = chosen[: max(1, chosen.size // 4)]
    ttp0, rise0, step = _timing(f, best, t)
    # An artery with fewer voxels than the best quarter loses that median to a larger vein of
    # similar rank (a sinus a few seconds later); a vein cannot fill before the artery that
    # feeds it, so a group of the chosen filling clearly earlier is the artery.
    early = _earlier_group(f["rise"][chosen], rise0 - (0.5 * step + 1.5),
                           size=max(3, chosen.size // 20), width=0.5 * step + 1.5)
    if early is not None:
        log.info("AIF: %d voxels fill %.1f s before the best-ranked ones (a vein's timing): "
                 "the artery is taken from those", early.size,
                 rise0 - float(np.median(f["rise"][chosen[early]])))
        ttp0, rise0, step = _timing(f, chosen[early], t)
    chosen = chosen[(np.abs(f["ttp"][chosen] - ttp0) <= 2.0 * step + 1.0)
                    & (np.abs(f["rise"][chosen] - rise0) <= 0.5 * step + 1.5)]
    # And those that peak nearly as high as the best few: when an artery has fewer voxels than
    # n_voxels, its partial-volume rim would otherwise dilute the curve, and without a VOF
    # nothing corrects that dilution later.
    top_peaks = np.sort(f["peak"][chosen])[::-1][:5]
    chosen = chosen[f["peak"][chosen] >= min_relative_peak * float(np.median(top_peaks))]
    chosen = strong[chosen]
    curve = enh[:, chosen].mean(axis=1, dtype=np.float64)
    log.info("AIF: %d voxels, peak %.0f HU at %.1f s", chosen.size, curve.max(), ttp0)
    return _vessel(chosen, curve, times)


def _timing(f: dict[str, np.ndarray], group: np.ndarray, t: np.ndarray
            ) -> tuple[float, float, float]:
    """Median time to peak and half-rise time of a group of candidates, and the frame step
    around that peak (the steps around it: frames need not be evenly spaced)."""
    ttp0 = float(np.sort(f["ttp"][group])[(group.size - 1) // 2])
    rise0 = float(np.sort(f["rise"][group])[(group.size - 1) // 2])
    k = int(np.clip(np.searchsorted(t - t[0], ttp0), 1, t.size - 1))
    return ttp0, rise0, float(np.max(np.diff(t)[max(0, k - 2):k + 1]))


def _earlier_group(rise: np.ndarray, before: float, *, size: int, width: float
                   ) -> np.ndarray | None:
    """Positions of the earliest ``size`` or more half-rise times within ``width`` s of one
    another that all fill before ``before``; None when no such group exists."""
    order = np.argsort(rise, kind="stable")
    r = rise[order]
    n_early = int(np.searchsorted(r, before, side="left"))
    if n_early < size:
        return None
    # the first time whose window [r_i, r_i + width] holds `size` early fills
    ends = np.searchsorted(r[:n_early], r[:n_early] + width, side="right")
    hits = np.flatnonzero(ends - np.arange(n_early) >= size)
    if hits.size == 0:
        return None
    i = int(hits[0])
    return order[i:ends[i]]


def tissue_curve(enh: np.ndarray, times: np.ndarray, *, vessel_quantile: float = 0.95
                 ) -> np.ndarray:
    """The tissue's mean curve (T,): the mean of the curves ``enh`` (T, N) that enhance no
    more than the ``vessel_quantile`` of their peaks (the vessels left out, arteries and veins
    alike, whatever the AIF). Voxels that do not enhance (CSF, a loose mask) lower its height,
    not its timing. Curves raised for a frame or two only
    (:func:`~ctperf.perfusion.curves.brief_peak`) are left out as well: bone a jerk of the head
    carried in before the bolus had put the tissue's peak at the jerk, before every artery."""
    return _tissue_only(enh, times, vessel_quantile).mean(axis=1, dtype=np.float64)


def _tissue_only(enh: np.ndarray, times: np.ndarray, vessel_quantile: float) -> np.ndarray:
    """The curves of ``enh`` (T, N) that enhance no more than the ``vessel_quantile`` of their
    peaks and do not peak briefly (all of them when none is left)."""
    t = np.asarray(times, dtype=np.float64)
    c = np.asarray(enh)
    peaks = c.max(axis=0)
    use = (peaks <= np.quantile(peaks, vessel_quantile)) & ~brief_peak(c, t)
    return c[:, use] if use.any() else c


def tissue_peak_time(enh: np.ndarray, times: np.ndarray, *, vessel_quantile: float = 0.95
                     ) -> float:
    """Time (s from the first frame) at which the tissue's bolus peaks: the peak of
    :func:`tissue_curve`."""
    t = np.asarray(times, dtype=np.float64)
    mean = tissue_curve(enh, t, vessel_quantile=vessel_quantile)
    return float(t[int(np.argmax(mean))] - t[0])


def early_tissue_peak_time(enh: np.ndarray, times: np.ndarray, *, quantile: float = 0.25,
                           vessel_quantile: float = 0.95) -> float:
    """When the earliest tissue's bolus peaks (s from the first frame): the ``quantile`` of
    the tissue curves' times to peak, each smoothed over :data:`TTP_SMOOTH_S` (the vessels,
    above ``vessel_quantile`` of the peaks, and brief peaks left out). Unlike the mean
    curve's peak (:func:`tissue_peak_time`) it stays with the well-perfused tissue when most
    of the brain is delayed (a large stroke): that tissue is what a vein's peak follows."""
    t = np.asarray(times, dtype=np.float64)
    step = float(np.median(np.diff(t))) if t.size > 1 else 1.0
    smooth = gaussian_time(np.ascontiguousarray(_tissue_only(enh, t, vessel_quantile),
                                                dtype=np.float32), max(TTP_SMOOTH_S / step, 0.5))
    return float(np.quantile(t[np.argmax(smooth, axis=0)] - t[0], quantile))


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
    noise_sd: float | None = None,
    min_snr: float = 8.0,
    exclude: np.ndarray | None = None,
    area: np.ndarray | None = None,
    aif: np.ndarray | None = None,
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
    noise_sd : float, optional
        Noise SD of one voxel's curve, HU (e.g. the median pre-bolus SD of brain voxels). Each
        candidate must then peak at least ``min_snr`` times above it: with no vein in view, the
        latest, largest noise excursions of tissue voxels are not a VOF.
    min_snr : float
        See ``noise_sd``.
    exclude : ndarray of bool, shape (N,), optional
        Voxels never chosen (e.g. next to bone, see :func:`near_bone`).
    area : ndarray, shape (N,), optional
        The areas to rank by, HU s; default each curve's own. A voxel's own area holds its
        baseline's error in every frame, so the largest areas are partly the voxels whose
        baseline noise made them large, and their mean curve reads high (Kudo-style tiles
        with a vein tile of the AIF's area: 7 % at 3 HU per voxel, 25 % at 10 HU);
        :func:`ctperf.perfusion.inputs.venous_output` ranks by the mean area of each voxel's
        in-plane neighbourhood, whose noise is a third.
    aif : ndarray, shape (T,), optional
        The measured AIF (enhancement, HU), which sets how sharp a peak a bolus on these
        frames can have. Candidates holding a spike are never chosen
        (:func:`~ctperf.perfusion.curves.spiky`, judged on each curve's own noise): a voxel at
        the skull's edge in a registered study reads bone in the frames that moved (a probe's:
        394 HU late in a vein of 240 HU, the AIF then scaled 2.1 times, CBF and CBV halved).

    Raises
    ------
    ValidationError
        When no voxel qualifies.
    """
    t = np.asarray(times, dtype=np.float64)
    peak_i = np.argmax(enh, axis=0)
    peak_all = enh[peak_i, np.arange(enh.shape[1])]
    # Late and clearly enhancing voxels only (a study has ~10^6 brain voxels).
    bolus_like = (enh[-1] <= max_tail * peak_all) & (enh.min(axis=0) >= -max_tail * peak_all)
    if exclude is not None:
        bolus_like &= ~np.asarray(exclude, dtype=bool)
    need = max(min_peak_hu, min_snr * noise_sd if noise_sd is not None else 0.0)
    late = np.flatnonzero((t[peak_i] - t[0] >= aif_ttp + min_lag_s) & (peak_all >= need)
                          & bolus_like)
    spikes = (spiky(enh[:, late], second_difference_sd(enh[:, late]), t, aif) if late.size
              else np.zeros(0, dtype=bool))
    if spikes.any():
        log.info("VOF: %d of %d candidate voxels left out for a spike", int(spikes.sum()),
                 late.size)
    late = late[~spikes]
    area = (positive_area(enh[:, late], t) if area is None
            else np.asarray(area, dtype=np.float64)[late])
    if late.size == 0:
        peaked = (t[peak_i] - t[0] >= aif_ttp + min_lag_s) & (peak_all >= need)
        if exclude is not None:
            peaked &= ~np.asarray(exclude, dtype=bool)
        why = (f"; {int(peaked.sum())} voxels that peak so had not come back under "
               f"{max_tail:.0%} of their peak by the last frame (a scan that ends early), "
               "dipped below their baseline by as much, or held a spike (motion, or bone "
               "moved into them)" if peaked.any() else "")
        raise ValidationError(f"no venous candidates: no voxel peaks after the AIF by "
                              f"{need:.0f} HU or more and washes out{why}; give a VOF mask "
                              "(--vof-mask)")
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


def curve_noise_sd(curve: np.ndarray, *, n_baseline: int | None = None) -> float:
    """Noise SD of one curve, HU: the larger of the pre-bolus frames' SD (when there are three
    or more) and the SD implied by the median absolute second difference over all frames
    (which a smooth bolus barely raises).

    Parameters
    ----------
    curve : ndarray, shape (T,)
        Enhancement or attenuation, HU.
    n_baseline : int, optional
        Number of pre-bolus frames.
    """
    c = np.asarray(curve, dtype=np.float64)
    sd = float(second_difference_sd(c))
    if n_baseline is not None and n_baseline >= 3:
        sd = max(sd, float(np.std(c[:n_baseline], ddof=1)))
    return sd


@dataclass(frozen=True)
class VofCheck:
    """Whether a VOF may scale the AIF.

    ``ok``; ``ratio`` the VOF/AIF area ratio over the same part of the bolus (NaN when either
    has no positive area); ``factor`` the scale to apply to the AIF (``max(ratio, 1)`` when
    ok, else 1); ``snr`` the VOF's peak over its noise SD; ``reason`` why it was rejected
    ("" when ok).
    """

    ok: bool
    ratio: float
    factor: float
    snr: float
    reason: str


def assess_vof(
    aif: np.ndarray,
    vof: np.ndarray,
    times: np.ndarray,
    *,
    n_baseline: int | None = None,
    noise_sd: float | None = None,
    min_snr: float = 8.0,
    min_area_ratio: float = 0.9,
    min_lag_s: float = 1.0,
    tissue_peak_s: float | None = None,
) -> VofCheck:
    """Judge whether a VOF is a plausible venous outflow of this AIF.

    A vein drains the whole arterial input, so its area is at least the area of the (possibly
    partial-volume diluted) AIF, it peaks after the AIF, and it stands far above the noise.
    A VOF is rejected when any of these fails:

    - its time to peak is not later than the AIF's, or its first moment (the centre of its
      positive part) is less than ``min_lag_s`` after the AIF's (an arterial voxel whose noisy
      peak came late);
    - it peaks before the tissue it drains: more than a frame, and more than 1 s, before
      ``tissue_peak_s`` (s from the first frame: :func:`early_tissue_peak_time`; a probe's
      downstream artery taken for the vein had scaled the AIF by 1.3-1.4, CBF and CBV 23-28 %
      low);
    - its peak is below ``min_snr`` times its noise SD (:func:`curve_noise_sd`);
    - it holds a spike (:func:`~ctperf.perfusion.curves.spiky`);
    - its area over the same part of the bolus (see :func:`correct_partial_volume`) is below
      ``min_area_ratio`` times the AIF's. Between that and 1 the VOF agrees with an undiluted
      AIF within noise: it is accepted and the AIF left as is (factor 1).

    Parameters
    ----------
    aif, vof : ndarray, shape (T,)
        Measured enhancement, HU.
    times : ndarray, shape (T,)
        s, strictly increasing, not necessarily uniform.
    n_baseline : int, optional
        Pre-bolus frames, for the noise estimate.
    noise_sd : float, optional
        The VOF's noise SD in HU, when known; default estimated from the curve.
    min_snr, min_area_ratio, min_lag_s : float
        See above.
    tissue_peak_s : float, optional
        When the tissue's bolus peaks, s from the first frame (None: not judged).

    Returns
    -------
    VofCheck
    """
    t = np.asarray(times, dtype=np.float64)
    a = np.asarray(aif, dtype=np.float64)
    v = np.asarray(vof, dtype=np.float64)
    sd = curve_noise_sd(v, n_baseline=n_baseline) if noise_sd is None else float(noise_sd)
    peak = float(v.max())
    snr = peak / sd if sd > 0 else float("inf")
    ratio = _area_ratio(a, v, t)
    ttp_a, ttp_v = float(t[np.argmax(a)] - t[0]), float(t[np.argmax(v)] - t[0])
    reason = ""
    if not np.isfinite(ratio):
        reason = "the VOF has no positive area"
    elif ttp_v <= ttp_a:
        reason = (f"the VOF peaks at {ttp_v:.1f} s, not after the AIF ({ttp_a:.1f} s): "
                  "not a vein")
    elif (lag := _centroid(v, t) - _centroid(a, t)) < min_lag_s:
        when = (f"only {lag:.1f} s after" if round(lag, 1) > 0 else
                "no later than" if round(lag, 1) == 0 else f"{-lag:.1f} s before")
        reason = (f"the VOF's bolus is centred {when} the AIF's (less than {min_lag_s:g} s "
                  "after): an artery, not a vein")
    elif tissue_peak_s is not None and ttp_v < tissue_peak_s - max(
            1.0, float(np.max(np.diff(t))) if t.size > 1 else 0.0):
        reason = (f"the VOF peaks at {ttp_v:.1f} s, before the tissue's bolus "
                  f"({tissue_peak_s:.1f} s): a vein drains the tissue and peaks after it "
                  "(an artery, or another vessel)")
    elif not snr >= min_snr:
        reason = (f"the VOF's peak ({peak:.0f} HU) is only {snr:.1f} times its noise SD "
                  f"({sd:.1f} HU), below {min_snr:g}: noise, not a vein")
    elif spiky(v[:, None], np.array([sd]), t, a)[0]:
        reason = ("one of the VOF's frames stands off its neighbours as no bolus on these "
                  "frames can (a spike: motion, or bone moved into the vein's voxels by "
                  "registration); its area would scale the AIF wrongly")
    elif ratio < min_area_ratio and v[-1] > TRUNCATED_END * peak:
        reason = (f"the VOF's bolus is cut off by the scan's end (its last frame at "
                  f"{v[-1] / peak:.0%} of its peak): its area, {ratio:.2f} times the AIF's, "
                  "cannot be measured, nor the AIF's partial volume with it")
    elif ratio < min_area_ratio:
        reason = (f"the VOF's area is {ratio:.2f} times the AIF's: a vein holds at least the "
                  "arterial area, so it is partial-volume diluted itself (or not a vein)")
        tail = v[-max(3, v.size // 10):]
        if float(tail.mean()) < -3.0 * sd / np.sqrt(tail.size):
            reason += (f", or its baseline drifts down (its last frames {-float(tail.mean()):.0f}"
                       " HU below it: contrast left from an earlier injection washing out), "
                       "which takes area from the later curve")
    ok = not reason
    return VofCheck(ok=ok, ratio=ratio, factor=max(ratio, 1.0) if ok else 1.0, snr=snr,
                    reason=reason)


def _centroid(c: np.ndarray, t: np.ndarray) -> float:
    p = np.clip(c, 0, None)
    return float(np.trapezoid(p * t, t) / np.trapezoid(p, t))


def _area_ratio(a: np.ndarray, v: np.ndarray, t: np.ndarray) -> float:
    """Area of the VOF over [t0, t_end] / area of the AIF over [t0, t_end - lag] (NaN when
    either curve has no positive area)."""
    a, v = np.clip(a, 0, None), np.clip(v, 0, None)
    area_a, area_v = np.trapezoid(a, t), np.trapezoid(v, t)
    if not (area_a > 0 and area_v > 0):
        return float("nan")
    lag = max(0.0, float(np.trapezoid(v * t, t) / area_v - np.trapezoid(a * t, t) / area_a))
    cut = t[-1] - lag
    grid = np.linspace(t[0], cut, 4 * t.size)
    area_a_cut = float(np.trapezoid(np.interp(grid, t, a), grid))
    return float(area_v / area_a_cut) if area_a_cut > 0 else float(area_v / area_a)


def correct_partial_volume(aif: np.ndarray, vof: np.ndarray, times: np.ndarray
                           ) -> tuple[np.ndarray, float]:
    """Scale the AIF so its area equals the VOF's over the same part of the bolus, never down.

    The VOF is the AIF delayed and dispersed by the brain's transit, so within the acquisition
    window the VOF has lost the last ``lag`` seconds of its bolus that the AIF still shows. The
    areas are compared as ``area(VOF on [t0, t_end]) / area(AIF on [t0, t_end - lag])`` with
    ``lag`` the difference of the curves' first moments. A ratio below 1 would say the vein
    carries less contrast than the artery, which partial volume cannot cause: the AIF is then
    returned unscaled (factor 1). Check the VOF first with :func:`assess_vof`.

    Parameters
    ----------
    aif, vof : ndarray, shape (T,)
        Enhancement in HU.
    times : ndarray, shape (T,)

    Returns
    -------
    scaled_aif : ndarray, shape (T,)
    factor : float
        The scale applied, at least 1 (above 1 when the measured AIF was too low).
    """
    t = np.asarray(times, dtype=np.float64)
    ratio = _area_ratio(np.asarray(aif, dtype=np.float64), np.asarray(vof, dtype=np.float64), t)
    if not np.isfinite(ratio):
        raise ValidationError("AIF or VOF has no positive area; cannot correct partial volume")
    factor = max(1.0, ratio)
    return np.asarray(aif, dtype=np.float64) * factor, factor
