"""Perfusion parameters of curves rather than of a study: regions' or voxels' time curves with
their AIF (and, optionally, a VOF), as exported from other software, drawn on a workstation or
published as reference data.

:func:`fit_curves` runs the same fits as the maps (:func:`~ctperf.perfusion.run_perfusion`,
through the same per-method code), with the same baseline handling and partial-volume
correction; what it cannot do without an image is find the vessels, the brain and the lesions.
``bayes`` then fits each curve on its own (no neighbourhood prior).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.io.integrity import fit_times, frame_spacing_problem
from ctperf.perfusion.boxnlr import BOX_METHODS, DEFAULT_BOUNDS
from ctperf.perfusion.curves import (
    ARRIVAL_NOISE_GAIN,
    SPIKE_SDS,
    TRUNCATED_END,
    aif_arrival,
    bandlimit,
    check_bolus_present,
    check_bolus_start,
    check_constants,
    check_peak_not_clipped,
    off_zero_before,
    resample,
    sample_step,
    second_difference_sd,
    smooth_time,
    spiky,
    start_climb,
    to_enhancement,
)
from ctperf.perfusion.inputs import CurveOrigin, partial_volume, voxel_noise_sd
from ctperf.perfusion.maps import MIN_FRAMES, vessel_curves
from ctperf.perfusion.onset import pre_bolus_frames
from ctperf.perfusion.qc import (
    check_first_pass_sampled,
    core_off_mirror_flag,
    lesion_no_bolus_flag,
    qc_flags,
    widespread_hypoperfusion_flag,
)
from ctperf.perfusion.sensitivity import core_unseen_flag
from ctperf.perfusion.voxelfit import SD_MAPS, fit_voxels, measured_ttp
from ctperf.types import METHODS, refuse_masked

__all__ = ["CURVE_FLAGS", "CURVE_PARAMETERS", "CurveFit", "curve_flags", "fit_curves",
           "flag_reference"]

#: The QC flags (:func:`~ctperf.perfusion.qc_flags`) that curves in any unit can be judged by
#: (the AIF's peak height and the baseline's noise are judged in HU, the brain's size and the
#: motion need an image).
CURVE_QC: tuple[str, ...] = ("truncation", "frame_gap", "aif_late_peak", "aif_wide",
                             "aif_after_tissue", "short_baseline", "bolus_at_start",
                             "earlier_bolus",
                             "below_baseline", "aif_vof_ratio", "no_vof", "mtt_floor",
                             "osvd_coarse_frames")

#: Per-curve plausibility flags (:func:`curve_flags`) and what each means.
CURVE_FLAGS: dict[str, str] = {
    "below_baseline": "falls below its pre-bolus level by more than its noise allows (contrast "
                      "only adds attenuation: drift, motion, or contrast in the baseline frames); "
                      "its values are not reliable",
    "no_enhancement": "never rises above its pre-bolus level by more than its noise allows: "
                      "its values are mostly noise",
    "truncated": f"its last frame stands above {TRUNCATED_END:.0%} of its peak (and above its "
                 "noise): the scan ended before its bolus washed out, so the area after it is "
                 "missing and its CBV, MTT and CBF are biased (a long transit, a late arrival, "
                 "or a baseline drifting upwards)",
    "peaks_before_aif": "peaks before the AIF does by more than 1 s or a frame interval, "
                        "whichever is longer, which tissue fed by that artery cannot: the AIF "
                        "was taken downstream of it (a vein, or an artery past a delay); its "
                        "delay, Tmax and CBF are not reliable",
    "tmax_before_aif": "its Tmax is below 0 by more than 1 s or a frame interval, whichever "
                       "is longer: its residue peaks before its input does, which tissue fed "
                       "by that artery cannot (healthy tissue is reached at most about a "
                       "second before a distant artery): the AIF was taken downstream of it; "
                       "its delay, Tmax and CBF are not reliable",
    "spike": "one frame stands apart from both its neighbours by more than "
             f"{SPIKE_SDS:g} SDs of its noise and by more of the curve's peak than a bolus "
             "sampled on those frames can (motion, or a streak through that frame): its values "
             "are not reliable",
    "tmax_after_peak": "its Tmax (s after the AIF) comes after its own peak (s after the first "
                       "frame), which no residue function can: the deconvolved residue's "
                       "maximum is noise or a lag wrapped round the circular window; its Tmax "
                       "and delay are not reliable",
    "vessel": "it peaks, smoothed over time, above a quarter of the AIF's peak, as only a "
              "vessel does (tissue holds a few per cent of blood): a vessel's region, the AIF "
              "itself, or the AIF and tissue columns swapped; its values are not tissue "
              "perfusion (the maps leave such voxels out of the lesions)",
    "at_bound": "the box model's fit ended on a bound of CBF, MTT or delay (DEFAULT_BOUNDS of "
                "ctperf.perfusion.boxnlr), or at no flow for a curve that enhances; or bayes's "
                "posterior holds 20 % or more of its mass on its grid's first or last MTT or "
                "delay (MTT 1 or 30 s, delay -3 s or 12 s, or as extended for late curves): the "
                "curve does not determine it, the simplex stopped there, or the curve asks for "
                "more than the grid holds; its values are not reliable",
}

#: How many SDs of a time-smoothed curve's noise ``below_baseline`` of :func:`curve_flags`
#: needs (each curve's noise is estimated from its own frames, so fewer raise false alarms).
CURVE_FLAG_SDS = 5.0

#: The posterior mass on the grid's first or last MTT or delay over which ``bayes`` flags a
#: curve ``at_bound``.
EDGE_MASS = 0.2
#: How many SDs a curve must rise by to escape ``no_enhancement``: lower than
#: :data:`CURVE_FLAG_SDS`, because after a short baseline the baseline mean's error dominates
#: the level, and at 5 SDs real grey-matter curves (peaks of 7 noise SDs at 2 s frames) were
#: flagged.
NO_ENHANCEMENT_SDS = 3.5

#: The parameters of every method, in the order they are reported.
CURVE_PARAMETERS: tuple[str, ...] = ("cbf", "cbv", "mtt", "tmax", "delay", "ttp")


@dataclass(frozen=True)
class CurveFit:
    """Per-curve results, each an ndarray (N,) float64: ``cbf`` mL/100 g/min, ``cbv``
    mL/100 g, ``mtt``, ``tmax``, ``delay``, ``ttp`` s (``delay`` is the SVD methods' Tmax, as
    in the maps); ``sd`` the posterior SDs of ``bayes`` by map name (``cbf_sd``...), else
    empty; ``flags`` one tuple per curve of the names of :data:`CURVE_FLAGS` it raised;
    ``provenance`` the method, constants, baseline frames, partial-volume step and the
    QC flags of :data:`CURVE_QC` (``qc``, as in the maps' ``summary.json``); and
    the curves the fit read, baseline subtracted: ``tissue`` (T, N), ``aif`` (T,) after the
    partial-volume scaling, ``vof`` (T,) or None."""

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    tmax: np.ndarray
    delay: np.ndarray
    ttp: np.ndarray
    sd: dict[str, np.ndarray] = field(default_factory=dict)
    flags: tuple[tuple[str, ...], ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    tissue: np.ndarray | None = None
    aif: np.ndarray | None = None
    vof: np.ndarray | None = None

    def rows(self) -> list[dict[str, float]]:
        """One dict per curve: every parameter, then the SDs."""
        columns = {**{k: getattr(self, k) for k in CURVE_PARAMETERS}, **self.sd}
        return [{k: float(v[i]) for k, v in columns.items()} for i in range(self.cbf.size)]


def curve_flags(tissue: np.ndarray, baseline_frames: int, times: np.ndarray | None = None,
                aif: np.ndarray | None = None) -> tuple[tuple[str, ...], ...]:
    """Plausibility flags of baseline-subtracted tissue curves (T, N), one tuple per curve
    (names of :data:`CURVE_FLAGS`).

    Each curve is smoothed over time as the bolus arrival is read (Gaussian, SD one frame)
    and compared with its noise: the smoothed frames' noise (the curve's own, from its second
    differences) and the error of the baseline mean that was subtracted, common to every frame:
    ``below_baseline`` where it falls :data:`CURVE_FLAG_SDS` times that below zero after the
    baseline frames (and by more than 1 % of its largest excursion, so that rounding in a
    noise-free curve does not count), ``no_enhancement`` where it never rises
    :data:`NO_ENHANCEMENT_SDS` times that above zero, ``truncated`` where its last frame stands
    above :data:`~ctperf.perfusion.curves.TRUNCATED_END` of its peak and that many SDs above
    zero (each curve judged on its own: the study's ``truncation`` flag reads the AIF, the VOF
    and the tissue's mean, in which one long-transit curve is lost), ``spike`` where one frame
    stands apart from the line through its neighbours (at ``times``, s; even steps when None)
    as :func:`~ctperf.perfusion.curves.spiky` describes: by more than its noise allows and by
    more of the curve's largest excursion than a bolus sampled so shows. Tissue is the AIF
    convolved with a residue, never sharper; at frames 2-3 s apart a bolus's peak is a frame or
    two wide and stands off its neighbours as a spike does. With ``aif``, ``vessel`` where the
    curve is a vessel's (:func:`~ctperf.perfusion.maps.vessel_curves`: the maps' rule). Each
    curve is judged on its own, whatever other curves come with it. Any units.
    """
    c = np.asarray(tissue, dtype=np.float64)
    noise = second_difference_sd(c)
    sm = smooth_time(c).astype(np.float64)
    # the smoothed frame's noise, and the baseline mean's error, which every frame carries
    share = ARRIVAL_NOISE_GAIN ** 2
    share += 1.0 / baseline_frames if baseline_frames > 0 else 0.0
    sd = noise * np.sqrt(share)
    after = sm[baseline_frames:] if 0 < baseline_frames < sm.shape[0] else sm
    below = after.min(axis=0) < -np.maximum(CURVE_FLAG_SDS * sd, 0.01 * np.abs(sm).max(axis=0))
    flat = sm.max(axis=0) <= NO_ENHANCEMENT_SDS * sd
    cut = ~flat & (sm[-1] > TRUNCATED_END * sm.max(axis=0)) & (sm[-1] > NO_ENHANCEMENT_SDS * sd)
    spike = spiky(c, noise, times, aif)
    vessel = np.zeros(c.shape[1], dtype=bool) if aif is None else vessel_curves(c, aif)
    hits = (("below_baseline", below), ("no_enhancement", flat), ("truncated", cut),
            ("spike", spike), ("vessel", vessel))
    return tuple(tuple(name for name, hit in hits if hit[i]) for i in range(c.shape[1]))


def _at_bounds(values: dict[str, np.ndarray]) -> np.ndarray:
    """Which box-model fits ended on a bound of (CBF, MTT, delay), within 1e-4 of its range."""
    hit = np.zeros(values["cbf"].shape, dtype=bool)
    for name, (lo, hi) in zip(("cbf", "mtt", "delay"), DEFAULT_BOUNDS, strict=True):
        tol = 1e-4 * (hi - lo)
        hit |= values[name] >= hi - tol
        if name != "cbf":  # no flow is a value, not a stuck fit
            hit |= values[name] <= lo + tol
    return hit


def _as_curves(tissue: np.ndarray, n_t: int) -> np.ndarray:
    c = np.asarray(tissue, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[0] != n_t:
        raise ValidationError(f"tissue must be (T,) or (T, N) with T = {n_t} frames, got "
                              f"shape {np.shape(tissue)}")
    return c


def _check(name: str, curve: np.ndarray) -> None:
    if not np.all(np.isfinite(curve)):
        raise ValidationError(f"{name} holds NaN or infinite values")


def _auto_baseline(vessels: np.ndarray, t: np.ndarray) -> int:
    """The frames before the bolus, read from the vessels' curves (T, 1 or 2) as the maps read
    them (:func:`~ctperf.perfusion.onset.pre_bolus_frames`)."""
    smooth = smooth_time(vessels)
    rise = smooth.max(axis=0) - smooth[0]
    if not float(rise.max()) > 0:
        raise ValidationError("the AIF never rises above its first frame: no bolus, or one "
                              "that had peaked before it (the curves must start before "
                              "the contrast arrives)")
    return pre_bolus_frames(vessels, rise, noise_sd=voxel_noise_sd(vessels, 0), times=t)


def _measured_peak(tissue: np.ndarray, t: np.ndarray, grid: np.ndarray | None, n_base: int,
                   aif: np.ndarray) -> np.ndarray:
    """The curves' own time to peak (:func:`~ctperf.perfusion.voxelfit.measured_ttp`, on
    ``grid`` when the frames are uneven), searched from the later of the baseline's end and
    the AIF's arrival, for ``peaks_before_aif`` whatever the method: bayes's TTP is its fitted
    curve's, which its model keeps near the AIF's peak (a curve peaking 3 s before its AIF read
    20.1 s, the AIF 22 s), and a faint curve's noise before the bolus had peaked with a
    baseline given as 0 frames (TTP 0 s)."""
    k = aif_arrival(aif)
    start = max(float(t[min(n_base, t.size - 1)]), float(t[k or 0]))
    if grid is None:
        return measured_ttp(tissue, t, start)
    return measured_ttp(resample(tissue, t, grid), grid, start)


def _peaks_before(t: np.ndarray, aif: np.ndarray, ttp: np.ndarray) -> np.ndarray:
    """Which tissue curves' time to peak ``ttp`` (s from the first frame) comes more than
    1 s, or the frame step at the AIF's peak, before the AIF's (smoothed with
    :func:`~ctperf.perfusion.curves.bandlimit`): a curve fed by an artery peaks after it (the
    convolution of a single-peaked input with a non-increasing residue)."""
    k = int(np.argmax(bandlimit(aif)))
    step = float(np.diff(t)[min(k, t.size - 2)])
    with np.errstate(invalid="ignore"):
        return np.asarray(ttp < (t[k] - t[0]) - max(1.0, step))


def _check_enhancement(t: np.ndarray, aif: np.ndarray, tissue: np.ndarray) -> None:
    """Refuse curves given as enhancement (baseline 0) that stand clearly off zero before the
    AIF's bolus arrives: the AIF by more than 5 % of its rise, or the tissue curves' mean by
    more than a quarter of its own (and each by more than five times its noise). Such curves
    still hold their unenhanced values (HU: 40 in blood, 25-35 in tissue), which every fit
    would take for contrast (a probe's CBV read 12-20 mL/100 g against 1-4); the level as
    :func:`~ctperf.perfusion.curves.off_zero_before` reads it."""
    k = aif_arrival(aif)
    if k is None:
        return
    mean = tissue.mean(axis=1)
    for name, curve, share in (("the AIF", aif, 0.05), ("the tissue curves' mean", mean, 0.25)):
        off = off_zero_before(curve, k, share)
        if off is not None:
            level, rise = off
            climb = start_climb(curve, t, k)
            begun = (f" or the bolus had begun before the first frame (the AIF climbs by "
                     f"{climb:.0%} of its rise before then, with no flat start; the scan must "
                     "start before the contrast arrives)"
                     if curve is aif and climb > share else "")
            raise ValidationError(
                f"baseline 0 takes the curves as enhancement (0 before the bolus), but before "
                f"the AIF's bolus arrives (at {t[k] - t[0]:.1f} s) {name} stands at "
                f"{level:.3g}, against a rise of {rise:.3g}: the curves hold their unenhanced "
                f"values (HU){begun}; let the baseline be read from them (auto, or a number of "
                "frames)")


def _check_baseline_before_bolus(t: np.ndarray, aif: np.ndarray, n_base: int) -> None:
    """Refuse a baseline of ``n_base`` frames that reaches into the AIF's bolus (past its
    arrival: the first frame, smoothed, above 10 % of its rise and five times its noise). Its
    mean would hold contrast, subtracted from every curve: a probe's baseline ending at 80 % of
    the AIF's peak."""
    k = aif_arrival(aif)
    if k is not None and n_base > k:  # (no arrival to compare with: the AIF's checks speak)
        raise ValidationError(
            f"baseline {n_base} frames reaches into the AIF's bolus, which arrives at frame "
            f"{k + 1} ({t[k] - t[0]:.1f} s, 10 % of its rise): the baseline's mean would hold "
            f"contrast; give at most {k} frames, or let the baseline be read from the curves "
            "(auto)")


def fit_curves(tissue: np.ndarray, aif: np.ndarray, times: np.ndarray, *,
               method: str = "nlr-fast", vof: np.ndarray | None = None,
               baseline: int | str = "auto", rho: float = 1.04, kh: float = 0.733,
               device: str | None = None, progress: bool = False) -> CurveFit:
    """CBF, CBV, MTT, Tmax, delay and TTP of each tissue curve.

    Parameters
    ----------
    tissue : ndarray, shape (T,) or (T, N)
        Tissue curves (attenuation in HU, or concentration), one column per curve.
    aif : ndarray, shape (T,)
        Arterial curve in the same units.
    times : ndarray, shape (T,)
        Frame times, s, strictly increasing (any spacing).
    method : str
        One of :data:`~ctperf.perfusion.METHODS`.
    vof : ndarray, shape (T,), optional
        Venous curve in the same units: the AIF is scaled up to its area when it is a
        plausible outflow (:func:`~ctperf.perfusion.assess_vof`); a VOF that is not is an error.
    baseline : "auto" or int
        Frames before the bolus whose mean is subtracted from every curve: ``"auto"`` reads
        them from the AIF's (and VOF's) arrival as the maps do; ``0`` takes the curves as
        enhancement already (baseline subtracted, e.g. concentration): curves still at their
        unenhanced values before the AIF's bolus are then refused.
    rho, kh : float
        Brain density g/mL and haematocrit ratio.
    device : str, optional
        For the box-model fits (see :func:`~ctperf.perfusion.fit_box_nlr`).
    progress : bool
        Progress bars.

    Returns
    -------
    CurveFit

    Raises
    ------
    ctperf.errors.ValidationError
        Implausible times or constants; an AIF with no bolus above its noise, or whose bolus
        had begun before the first frame; a VOF that cannot be a vein; with ``baseline`` 0,
        curves that stand off zero before the bolus.
    """
    if method not in METHODS:
        raise ValidationError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("tissue", tissue), ("aif", aif), ("vof", vof)):
        refuse_masked(value, name, "values of the curves; give the curves without them")
    refuse_masked(times, "times", "frame times; give every frame its time")
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1:
        raise ValidationError(f"times must be 1-D, got shape {t.shape}")
    if t.size < MIN_FRAMES:
        raise ValidationError(f"{t.size} frames: perfusion fits need at least {MIN_FRAMES}")
    t = fit_times(t)
    problem = frame_spacing_problem(t)  # and none finer than a scan's: a unit error here
    if problem is not None:
        raise ValidationError(f"times: {problem}; give them in seconds")
    check_constants(rho, kh)
    a = np.asarray(aif, dtype=np.float64)
    if a.shape != t.shape:
        raise ValidationError(f"aif must have one value per frame ({t.size}), got {a.shape}")
    tis = _as_curves(tissue, t.size)
    v = None if vof is None else np.asarray(vof, dtype=np.float64)
    if v is not None and v.shape != t.shape:
        raise ValidationError(f"vof must have one value per frame ({t.size}), got {v.shape}")
    for name, curve in (("aif", a), ("tissue", tis), ("vof", v)):
        if curve is not None:
            _check(name, curve)

    check_bolus_present(a)
    check_bolus_start(a)
    check_peak_not_clipped(a, t)
    check_first_pass_sampled(t, a)
    vessels = a[:, None] if v is None else np.stack([a, v], axis=1)
    if isinstance(baseline, str):
        if baseline != "auto":
            raise ValidationError(f"baseline must be 'auto' or a number of frames, got "
                                  f"{baseline!r}")
        n_base = _auto_baseline(vessels, t)
    else:
        if isinstance(baseline, bool) or not float(baseline).is_integer():
            raise ValidationError(f"baseline must be 'auto' or a whole number of frames, got "
                                  f"{baseline!r}")
        n_base = int(baseline)
        if not 0 <= n_base < t.size - 2:
            raise ValidationError(f"baseline must be 0 to {t.size - 3} frames, got {baseline}")
        _check_baseline_before_bolus(t, a, n_base)
    if n_base == 0:
        _check_enhancement(t, a, tis)
    if n_base:
        vessels = to_enhancement(vessels, n_baseline=n_base)[0]
        tis = to_enhancement(tis, n_baseline=n_base)[0]
    # (the VOF is not judged against these curves' timing: they may all be late lesions)
    aif_used, pv = partial_volume(vessels[:, 0], None if v is None else vessels[:, 1],
                                  CurveOrigin("given curve"), t, n_base=max(n_base, 1))
    # curves of enhancement: their TTP searched from where the baseline read from HU would
    # end (a faint curve's noise before the bolus had peaked, TTP 0 s)
    ttp_from = n_base or _auto_baseline(vessels, t)
    values, grid, fitted = fit_voxels(method, tis.astype(np.float32), aif_used, t, rho=rho,
                                      kh=kh, brain=None, spacing=(1.0, 1.0, 1.0),
                                      device=device, progress=progress, n_base=n_base or None,
                                      arrival=ttp_from)
    out = {k: np.asarray(values[k], dtype=np.float64) for k in CURVE_PARAMETERS}
    sd = {k: np.asarray(values[k], dtype=np.float64) for k in SD_MAPS if k in values}
    mean = tis.mean(axis=1)
    flags = qc_flags(times=t, aif=vessels[:, 0], vof=None if v is None else vessels[:, 1],
                     baseline_frames=n_base, tissue_mean=mean, brain_mean=mean,
                     pv_factor=pv["factor"],
                     pv_corrected=bool(pv["corrected"]) if v is not None else None,
                     box_mtt=out["mtt"][out["cbv"] > 0] if method in BOX_METHODS else None,
                     voxelwise=method != "bayes",
                     osvd_step_s=sample_step(t, grid) if method == "osvd" else None)
    if not isinstance(baseline, str):  # frames the user counted (0: curves of enhancement)
        flags["short_baseline"].update(flag=False, value=None)
    # the tissue's mean below its baseline by 5 % of its peak (a drift every curve carries, too
    # small for each curve's own flag), and beyond that mean's noise (a few noisy curves')
    if "below_baseline" not in curve_flags(mean[:, None], n_base, t)[0]:
        flags["below_baseline"]["flag"] = False
    per_curve = curve_flags(tis, n_base, t, aif=vessels[:, 0])
    early = _peaks_before(t, vessels[:, 0], _measured_peak(tis, t, grid, n_base,
                                                            vessels[:, 0]))
    late = out["tmax"] > out["ttp"]  # NaN compares False
    # (a downstream AIF 3 s late had read one curve's Tmax -2 s with no flag)
    ahead = out["tmax"] < -max(1.0, float(np.diff(t).max()))
    per_curve = tuple(f + ("peaks_before_aif",) * bool(hit and "no_enhancement" not in f)
                      + ("tmax_before_aif",) * bool(before and "no_enhancement" not in f)
                      + ("tmax_after_peak",) * bool(after and "no_enhancement" not in f)
                      for f, hit, before, after in zip(per_curve, early, ahead, late,
                                                       strict=True))
    stuck = np.zeros(len(per_curve), dtype=bool)  # the SVD methods have no bounds
    if method in BOX_METHODS:
        # No flow is a value for a flat curve; for one that enhances it is a simplex that
        # stopped (CBV on its bound of 0, where MTT and delay no longer change the misfit)
        stuck = _at_bounds(out) | (np.array(["no_enhancement" not in f for f in per_curve])
                                   & (out["cbf"] <= 0))
    elif method == "bayes":
        stuck = values["grid_edge"] >= EDGE_MASS
    per_curve = tuple(f + ("at_bound",) * bool(hit)
                      for f, hit in zip(per_curve, stuck, strict=True))
    provenance = {"method": method, "constants": {"rho_g_per_ml": rho, "kh": kh},
                  "baseline_frames": n_base,
                  # the box and SVD methods' TTP: the smoothed curve's peak from this frame on
                  "ttp_searched_from_s": (None if method == "bayes"
                                          else float(t[min(ttp_from, t.size - 1)] - t[0])),
                  "partial_volume": pv,
                  "qc": {k: flags[k] for k in CURVE_QC},
                  "curve_flags": {name: {"curves": [i for i, f in enumerate(per_curve)
                                                    if name in f], "reason": reason}
                                  for name, reason in CURVE_FLAGS.items()},
                  "fit_grid_step_s": None if grid is None else float(grid[1] - grid[0]),
                  **fitted}
    return CurveFit(**out, sd=sd, flags=per_curve, provenance=provenance, tissue=tis,
                    aif=aif_used, vof=None if v is None else vessels[:, 1])


def flag_reference() -> str:
    """Every QC flag of the maps and of the curves as Markdown (docs/qc.md), with the reasons
    ``summary.json`` and the curves' sidecar give, from the same code."""
    t = np.arange(60, dtype=np.float64)  # any bolus: the reasons do not depend on it
    x = np.clip(t - 10.0, 0.0, None)
    maps = qc_flags(times=t, aif=x ** 3 * np.exp(-x / 1.5))
    maps["lesion_no_bolus"] = lesion_no_bolus_flag(None)
    maps["core_unseen"] = core_unseen_flag(None, None)
    maps["widespread_hypoperfusion"] = widespread_hypoperfusion_flag(None, None, None)
    maps["core_off_mirror"] = core_off_mirror_flag(None)

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["# Quality-control flags", "",
             "What each flag means, in the words ctperf stores with it (this page is made from "
             "them: `python -c \"from ctperf.perfusion.curvefit import flag_reference; "
             "print(flag_reference(), end='')\" > docs/qc.md`).", "",
             "## The maps' flags", "",
             "`ctperf maps` (and the demo, and `ctperf reproduce`'s references) stores every "
             "flag in `summary.json` under `qc` as `{\"flag\": true or false, \"value\": a "
             "number or null, \"reason\": the text below}`, names the raised ones in its last "
             "line and on `overview.png`; in Python they are the maps' `provenance[\"qc\"]` "
             "(`compute_maps`, `run_perfusion`, `analyse_study`). A flag that cannot be judged "
             "(no motion correction run, no VOF asked for) has the value null. `ctperf curves` "
             "(`fit_curves`) judges the ones marked in the last column (the others need an "
             "image, or a study in HU) and stores them under `qc` in its JSON sidecar (the "
             "fit's `provenance[\"qc\"]`).", "",
             "| flag | raised when | `ctperf curves` |", "|---|---|---|"]
    lines += [f"| `{name}` | {cell(entry['reason'])} | {'yes' if name in CURVE_QC else ''} |"
              for name, entry in maps.items()]
    lines += ["", "## Each curve's flags (`ctperf curves`)", "",
              "The output table's `flags` column names those a curve raised (separated by "
              "semicolons); the sidecar's `curve_flags` lists, per flag, the curves that raised it "
              "and its reason. Each curve is judged on its own.", "",
              "| flag | the curve |", "|---|---|"]
    lines += [f"| `{name}` | {cell(reason)} |" for name, reason in CURVE_FLAGS.items()]
    return "\n".join(lines) + "\n"
