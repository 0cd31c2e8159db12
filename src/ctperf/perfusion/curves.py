"""Time curves: baseline, enhancement, band-limiting and the box-model forward model.

All functions work on (T, N) matrices: T frames, N voxels. Times are seconds, float64, shape (T,),
strictly increasing and not necessarily uniform. The arterial input is treated as the piecewise
linear interpolation of its samples, zero before the first frame and held at its last value after
the last frame, so its running integral A(t) is exact (piecewise quadratic) at any time.

Box model (Bennink et al., J. Med. Imaging 3:026003, 2016, doi:10.1117/1.JMI.3.2.026003)::

    C(t) = (rho / kH) * (CBF / 6000) * (A(t - delay) - A(t - delay - MTT))
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import interpolate

from ctperf.errors import ValidationError
from ctperf.types import CTPSeries, refuse_masked

log = logging.getLogger(__name__)

__all__ = [
    "ARRIVAL_NOISE_GAIN",
    "ARRIVAL_SMOOTH_FRAMES",
    "KH_RANGE",
    "MAX_SPLINE_NOISE_GAIN",
    "MIN_AIF_SNR",
    "MIN_BOLUS_WIDTH_S",
    "MIN_CLIPPED_TOP_S",
    "RHO_RANGE",
    "SPIKE_SDS",
    "TIME_BLOCK",
    "TRUNCATED_END",
    "TTP_SMOOTH_S",
    "ArterialTable",
    "aif_area",
    "aif_arrival",
    "bandlimit",
    "bolus_arrival_frame",
    "box_model",
    "brief_peak",
    "check_bolus_present",
    "check_bolus_start",
    "check_constants",
    "check_peak_not_clipped",
    "enhanced_at_start",
    "evenly_spaced",
    "finite_aif",
    "flow_scale",
    "gaussian_taps",
    "gaussian_time",
    "off_zero_before",
    "on_frame_times",
    "positive_area",
    "resample",
    "sample_step",
    "second_difference_sd",
    "smooth_time",
    "spiky",
    "start_climb",
    "time_to_peak",
    "to_enhancement",
    "uniform_grid",
]


#: Plausible brain density (g/mL) and haematocrit ratio kH, as the command line's --rho and --kh.
RHO_RANGE, KH_RANGE = (0.5, 2.0), (0.1, 1.0)


def finite_aif(aif: object, times: np.ndarray, *, name: str = "aif") -> np.ndarray:
    """The AIF (or the curve ``name``) as float64 (T,), one finite value per frame of
    ``times``, or ValidationError (NaN or Inf in it had ended the fits in an IndexError; a
    masked array's hidden values had been read)."""
    refuse_masked(aif, name, "the curve's values; give it without them")
    ca = np.asarray(aif, dtype=np.float64)
    if ca.shape != np.shape(times):
        raise ValidationError(f"{name} must have shape ({np.size(times)},), one value per "
                              f"frame, got shape {ca.shape}")
    if not np.all(np.isfinite(ca)):
        raise ValidationError(f"{name} contains NaN or Inf (frames "
                              f"{np.flatnonzero(~np.isfinite(ca))[:5].tolist()})")
    return ca


def aif_area(aif: np.ndarray, times: np.ndarray) -> float:
    """The AIF's area over ``times`` (trapezoids), or ValidationError when it is not positive:
    no contrast arrives, or the curve is inverted (an MR signal not converted to
    concentration dips where the bolus passes). Every method refuses such an AIF (``bayes``
    had fitted an inverted one, exit 0)."""
    area = float(np.trapezoid(np.asarray(aif, dtype=np.float64), times))
    if not area > 0:
        rise, span, noise = start_level(aif)
        begun = (f"; or the bolus had begun before the first frame, which stands {rise / span:.0%}"
                 " of its rise above its lowest values, so that its tail falls below that "
                 "baseline (the scan must start before the contrast arrives)"
                 if span > 0 and rise < 0.5 * span  # a bolus still to rise from it
                 and enhanced_at_start(rise, span, noise, fraction=0.05) else "")
        raise ValidationError("the AIF has no positive area: it stays below its pre-bolus "
                              "level (no contrast arrival, or an inverted curve, such as an "
                              f"MR signal not converted to concentration){begun}")
    return area


def off_zero_before(curve: np.ndarray, arrival: int, share: float) -> tuple[float, float] | None:
    """(level, rise) of a curve meant as enhancement (0 before the bolus) that stands clearly
    off zero before the frame ``arrival``: its pre-arrival frame nearest 0 off by more than
    five times its noise and ``share`` of its rise; None when it does not, or with fewer than
    two frames before ``arrival``. Curves still in HU stand at their unenhanced 25-40 HU in
    every frame before the bolus, while enhancement whose bolus rises from the second frame
    stands at 0 only in the first (their median had refused an undelayed gamma-variate AIF)."""
    c = np.asarray(curve, dtype=np.float64)
    if arrival < 2:
        return None
    before = c[:arrival]
    level = float(before[np.argmin(np.abs(before))])
    rise = float(c.max()) - level
    noise = float(second_difference_sd(c))
    return (level, rise) if abs(level) > max(5.0 * noise, share * max(rise, 0.0)) else None


def check_constants(rho: float, kh: float) -> None:
    """Refuse a brain density or haematocrit ratio outside :data:`RHO_RANGE` / :data:`KH_RANGE`
    (a sign or a unit slip would scale every CBF and CBV silently)."""
    for name, value, (lo, hi) in (("rho", rho, RHO_RANGE), ("kh", kh, KH_RANGE)):
        if isinstance(value, bool) or not lo <= float(value) <= hi:  # NaN fails too
            raise ValidationError(f"{name} must be {lo:g} to {hi:g}, got {value!r}")


def flow_scale(rho: float, kh: float) -> float:
    """Factor turning CBF in mL/100 g/min into the 1/s rate of the convolution: rho / kH / 6000
    (the constants checked by :func:`check_constants`)."""
    check_constants(rho, kh)
    return float(rho) / float(kh) / 6000.0


def bandlimit(curves: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Smooth along time with the [1/4, 1/2, 1/4] kernel (edges replicated); returns a new array
    of the same float type.

    Parameters
    ----------
    curves : ndarray, shape (T, ...) (time along ``axis``)
    """
    x = np.asarray(curves)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    x = np.moveaxis(x, axis, 0)
    if x.shape[0] < 3:
        return np.moveaxis(x.copy(), 0, axis)
    out = np.empty_like(x)
    out[1:-1] = 0.25 * x[:-2] + 0.5 * x[1:-1] + 0.25 * x[2:]
    out[0] = 0.75 * x[0] + 0.25 * x[1]
    out[-1] = 0.25 * x[-2] + 0.75 * x[-1]
    return np.moveaxis(out, 0, axis)


def second_difference_sd(curves: np.ndarray) -> np.ndarray:
    """Noise SD of each curve (T, ...) from its second differences, robust to the bolus: for
    white noise var(x[i-1] - 2 x[i] + x[i+1]) = 6 sigma^2, and 1.4826 times the median absolute
    value estimates an SD while ignoring the few frames where the curve itself bends. Returns
    float64 (...), 0 for fewer than three frames; the curves' units."""
    c = np.asarray(curves, dtype=np.float64)
    if c.shape[0] < 3:
        return np.zeros(c.shape[1:])
    return 1.4826 * np.median(np.abs(np.diff(c, n=2, axis=0)), axis=0) / np.sqrt(6.0)


def aif_arrival(aif: np.ndarray) -> int | None:
    """The frame of the AIF's arrival (smoothed, above 10 % of its rise and five times its
    noise), against which given curves are checked; None when it never rises so."""
    try:
        return bolus_arrival_frame(aif, fraction=0.1, noise_sds=5.0)
    except ValidationError:
        return None


def bolus_arrival_frame(curve: np.ndarray, *, fraction: float = 0.1,
                        noise_sds: float = 0.0) -> int:
    """First frame whose rise above the start exceeds ``fraction`` of the curve's peak rise.

    With ``noise_sds`` > 0 the curve is first smoothed over time (:func:`smooth_time`) and
    the rise must also exceed that many SDs of the smoothed curve's noise (its own, from its
    second differences) and of the start's error: a noisy curve of a few voxels crosses a
    fifth of its peak by noise alone seconds before its bolus. ValidationError when it never
    does.

    Parameters
    ----------
    curve : ndarray, shape (T,)
        A strongly enhancing reference curve (e.g. the mean of the brightest vessels), HU.
    """
    c = np.asarray(curve, dtype=np.float64)
    n0 = max(1, min(3, c.size))
    level = 0.0
    if noise_sds > 0 and c.size >= 3:
        noise = float(second_difference_sd(c))
        c = smooth_time(c).astype(np.float64)
        level = noise_sds * noise * float(np.sqrt(ARRIVAL_NOISE_GAIN ** 2 + 1.0 / n0))
    rise = c - np.median(c[:n0])
    peak = float(rise.max())
    if not peak > 0 or not peak > level:
        raise ValidationError(
            "no contrast arrival: the reference curve never rises above its start")
    return int(np.argmax(rise > max(fraction * peak, level)))


#: An arterial curve whose range, smoothed, is under this many times its noise is no bolus
#: (:func:`check_bolus_present`; pure noise of 15-89 frames passes it in 0.1 % of draws or
#: fewer, a 400 HU bolus with 15 HU of noise reads 12-40).
MIN_AIF_SNR = 10.0


def check_bolus_present(aif: np.ndarray, *, what: str = "the arterial curve",
                        remedy: str = "check which curve or voxels were given as the artery"
                        ) -> None:
    """Refuse an arterial curve (T,) with no bolus in it: its range, smoothed with
    :func:`bandlimit` (:func:`start_level`), under :data:`MIN_AIF_SNR` times the smoothed
    curve's noise. A flat or noise-only curve is no AIF; maps deconvolved with it read CBF in
    the thousands. Any units. ``what`` names the curve and ``remedy`` ends the message."""
    _, span, noise = start_level(aif)
    if np.asarray(aif).size >= 4 and not span > MIN_AIF_SNR * noise:
        ratio = f"{span / noise:.1f} times" if noise > 0 else "no more than"
        raise ValidationError(
            f"no bolus in {what}: its range ({span:.3g}) is {ratio} its noise ({noise:.2g}), "
            f"under {MIN_AIF_SNR:g} times (noise alone seldom passes 9): a flat curve is no "
            f"AIF; {remedy}")


#: A vessel's curve whose first frame (lightly smoothed) stands more than this fraction of its
#: range above its lowest values, and well above its noise, was carrying the bolus when the
#: scan began (:func:`check_bolus_start`).
BOLUS_AT_START = 0.2


def enhanced_at_start(height: np.ndarray | float, span: np.ndarray | float,
                      noise_sd: float, *, fraction: float = BOLUS_AT_START) -> np.ndarray:
    """Whether curves stand at their first frame ``height`` above their lowest (unenhanced)
    value by more than ``fraction`` (:data:`BOLUS_AT_START`) of their range ``span`` and five
    times the noise SD ``noise_sd`` (of the smoothed curves they were measured on)."""
    h, r = np.asarray(height, dtype=np.float64), np.asarray(span, dtype=np.float64)
    return (h > fraction * r) & (h > 5.0 * noise_sd)


def check_bolus_start(aif: np.ndarray) -> None:
    """Refuse an arterial curve (T,) whose bolus had begun before the first frame.

    A study needs frames before the contrast arrives: each voxel's unenhanced value is their
    mean, and the AIF's upslope sets CBF. When the artery is already enhanced at the first
    frame, every curve's baseline holds contrast and the AIF misses the start of its bolus, so
    no method can give CBF, CBV or delays. Contrast only adds attenuation, so an artery's
    lowest values are its unenhanced ones (a raised but flat baseline, such as contrast left
    from an angiogram, is no bolus). The first frame of the curve smoothed with
    :func:`bandlimit` is compared with the mean of its three lowest values: refused when it
    stands above them by more than :data:`BOLUS_AT_START` of the curve's range and by more
    than five times the smoothed curve's noise (from second differences: a noisy curve of a
    few voxels is not taken for a bolus), while the curve still rises from it by more than
    five times that noise (its peak still to come; a curve that only falls below its start, as
    when the head moved, is left to other checks).
    Any units.
    """
    rise, span, noise = start_level(aif)
    if (span > 0 and span - rise > 5.0 * noise
            and enhanced_at_start(rise, span, noise)):
        raise ValidationError(bolus_started_message(
            f"the AIF starts at {rise / span:.0%} of its rise above its lowest values"))


#: An arterial curve whose highest frames hold one value over this many seconds (three frames
#: or more) was clipped: :func:`check_peak_not_clipped`.
MIN_CLIPPED_TOP_S = 2.5


def check_peak_not_clipped(aif: np.ndarray, times: np.ndarray, *,
                           remedy: str = "give the curve as measured, unclipped") -> None:
    """Refuse an arterial curve (T,) whose top was cut flat: three or more consecutive frames,
    spanning :data:`MIN_CLIPPED_TOP_S` or more, at its maximum (within 1e-4 of its range), that
    maximum standing above the first frame by half the range or more (a bolus's peak).

    A measured bolus has a rounded peak and noise, so its frames are not equal to the digit
    for seconds, even noise-free and rounded to whole HU; values saturated by a detector, a
    display window or an export's range are. The cut AIF has too little area and too low a
    peak, so every CBF and CBV read from it is too high (docs/validation.md, "Curves that
    cannot be a bolus passage").
    Any units. ``remedy`` ends the message.
    """
    x = np.asarray(aif, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if x.size < 3:
        return
    top, span = float(x.max()), float(np.ptp(x))
    if not span > 0 or top - x[0] < 0.5 * span:  # no bolus rising to a top (checked elsewhere)
        return
    at_top = np.flatnonzero(x >= top - 1e-4 * span)
    runs = np.split(at_top, np.flatnonzero(np.diff(at_top) > 1) + 1)
    run = max(runs, key=lambda r: t[r[-1]] - t[r[0]])
    if run.size >= 3 and t[run[-1]] - t[run[0]] >= MIN_CLIPPED_TOP_S:
        raise ValidationError(
            f"the arterial curve's peak is cut flat: its {run.size} frames from "
            f"{t[run[0]] - t[0]:.1f} to {t[run[-1]] - t[0]:.1f} s all hold its maximum "
            f"{top:.4g}, as clipped or saturated values do (a bolus peaks rounded and noisy); "
            f"its true peak and area are larger, so CBF and CBV would read too high; {remedy}")


def start_level(aif: np.ndarray) -> tuple[float, float, float]:
    """How far an arterial curve's first frame (smoothed with :func:`bandlimit`) stands above
    the mean of its three lowest values, the curve's range above them, and the smoothed first
    frame's noise SD (from second differences); zeros for fewer than four frames."""
    x = np.asarray(aif, dtype=np.float64)
    if x.size < 4:
        return 0.0, 0.0, 0.0
    c = bandlimit(x)
    return _above_level(x, c, float(np.sort(c)[:3].mean()))


def _above_level(x: np.ndarray, c: np.ndarray, level: float) -> tuple[float, float, float]:
    """How far the smoothed curve ``c`` (:func:`bandlimit` of ``x``) stands above ``level`` at
    its first frame and at its peak, and the smoothed first frame's noise SD: one frame's
    (from second differences of ``x``), then weighted 3/4 and 1/4 with its neighbour's."""
    noise = float(np.sqrt(0.625) * second_difference_sd(x))
    return float(c[0]) - level, float(c.max()) - level, noise


def baseline_fall(curve: np.ndarray, frames: int) -> tuple[float, float, float]:
    """How far a curve's first frame stands above the level its first ``frames`` frames (the
    baseline) end at, the curve's rise above that level, and the smoothed first frame's noise
    SD; zeros for fewer than three baseline frames. The curve is smoothed with
    :func:`bandlimit`; the level is the median of the baseline's later half, nearest the bolus
    (the three lowest of many baseline frames lie a noise SD or more below their level); the
    noise is read from second differences over the whole curve, as :func:`start_level` reads
    it (a fall or a hump through the baseline is not noise; a fit through the baseline frames
    took a hump for noise and missed a test bolus 20 s before).
    """
    x = np.asarray(curve, dtype=np.float64)
    n = min(int(frames), x.size)
    if n < 3 or x.size < 4:
        return 0.0, 0.0, 0.0
    c = bandlimit(x)
    return _above_level(x, c, float(np.median(c[n // 2:n])))


def _line_slope(x: np.ndarray, t: np.ndarray, n: int) -> tuple[float, float]:
    """The least-squares slope of a curve's first ``n`` frames, and the spread of their times
    (sum of squared deviations from their mean; 0: no slope)."""
    dt = t[:n] - t[:n].mean()
    spread = float(dt @ dt)
    return (float(dt @ x[:n]) / spread if spread > 0 else 0.0), spread


def start_climb(curve: np.ndarray, times: np.ndarray, frames: int) -> float:
    """How far a curve climbs through its first ``frames`` frames from its very first one, as
    a share of its range above its lowest values (smoothed, as :func:`start_level`): the
    least-squares line's rise over them, where it exceeds five times its SD from the curve's
    noise (second differences) and the lines through their first half and through all but
    the first frame rise at least half as steeply; else 0 (also for fewer than two frames).
    An unenhanced baseline is flat: a curve climbing from its first frame was filmed from its
    upslope (the scan began as the bolus arrived), so its baseline holds contrast. One flat
    at first whose last frames rise is the bolus's foot reached by the frames taken as its
    baseline (a slow, dispersed onset), and one whose first frame alone stands low is that
    frame's artefact: neither is a scan begun late."""
    x = np.asarray(curve, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    n = min(int(frames), x.size)
    _, span, _ = start_level(x)
    if n < 2 or not span > 0:
        return 0.0
    slope, spread = _line_slope(x, t, n)
    if not spread > 0 or not slope * math.sqrt(spread) > 5.0 * float(second_difference_sd(x)):
        return 0.0
    first, _ = _line_slope(x, t, max(2, (n + 1) // 2))
    later = _line_slope(x[1:], t[1:], n - 1)[0] if n >= 3 else slope
    return (slope * float(t[n - 1] - t[0]) / span if min(first, later) >= 0.5 * slope
            else 0.0)


def bolus_started_message(evidence: str) -> str:
    """The refusal of a study or curves whose bolus had begun before the first frame."""
    return (f"the arterial bolus had begun before the first frame ({evidence}): there is no "
            "unenhanced baseline, so CBF, CBV and delays cannot be measured; the scan must "
            "start before the contrast arrives (or contrast was left in the blood by an "
            "earlier injection, a CT angiogram just before: its washout makes the baseline "
            "fall)")


def to_enhancement(
    hu: np.ndarray, *, n_baseline: int
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each voxel's pre-bolus mean.

    Parameters
    ----------
    hu : ndarray, shape (T, N)
        Attenuation in HU.
    n_baseline : int
        Number of leading frames before the bolus arrives (at least 1).

    Returns
    -------
    enhancement : ndarray, float32, shape (T, N)
        HU above baseline.
    baseline : ndarray, float32, shape (N,)
        Pre-bolus mean in HU.
    """
    n = int(n_baseline)
    if not 1 <= n <= hu.shape[0]:
        raise ValidationError(f"n_baseline must be in [1, {hu.shape[0]}], got {n}")
    base = hu[:n].mean(axis=0, dtype=np.float64).astype(np.float32)
    return (hu - base).astype(np.float32, copy=False), base


class ArterialTable:
    """Exact running integral A(t) and value Ca(t) of a piecewise linear arterial curve.

    Parameters
    ----------
    aif : ndarray, shape (T,)
        Arterial enhancement in HU at ``times``.
    times : ndarray, shape (T,)
        Seconds, strictly increasing.
    """

    def __init__(self, aif: np.ndarray, times: np.ndarray) -> None:
        ca = np.asarray(aif, dtype=np.float64)
        t = np.asarray(times, dtype=np.float64)
        if ca.shape != t.shape or t.ndim != 1 or t.size < 2:
            raise ValidationError(
                f"aif and times must be 1D of the same length >= 2, got {ca.shape} and {t.shape}"
            )
        self.t = t
        self.ca = ca
        steps = np.diff(t)
        self.slope = np.diff(ca) / steps
        self.cum = np.r_[0.0, np.cumsum(0.5 * (ca[1:] + ca[:-1]) * steps)]
        self.uniform = bool(np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9))
        self.dt = float(steps[0])
        self.t0 = float(t[0])
        self.t_end = float(t[-1])

    def _segment(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xc = np.clip(x, self.t0, self.t_end)
        if self.uniform:
            k = ((xc - self.t0) * (1.0 / self.dt)).astype(np.intp)
            np.minimum(k, self.t.size - 2, out=k)
        else:
            k = np.clip(np.searchsorted(self.t, xc, side="right") - 1, 0, self.t.size - 2)
        return k, xc - self.t[k]

    def integral(self, x: np.ndarray) -> np.ndarray:
        """A(x) = integral of Ca from the first frame to ``x`` (HU s); any shape."""
        x = np.asarray(x, dtype=np.float64)
        k, tau = self._segment(x)
        out = self.cum[k] + tau * (self.ca[k] + 0.5 * self.slope[k] * tau)
        out += self.ca[-1] * np.maximum(x - self.t_end, 0.0)
        return out

    def value(self, x: np.ndarray) -> np.ndarray:
        """Ca(x) in HU; zero before the first frame, last value after the last; any shape."""
        x = np.asarray(x, dtype=np.float64)
        k, tau = self._segment(x)
        out = self.ca[k] + self.slope[k] * tau
        out[x < self.t0] = 0.0
        return out

    @property
    def area(self) -> float:
        """Area under the curve over the acquisition, HU s."""
        return float(self.cum[-1])


def box_model(
    params: np.ndarray, table: ArterialTable, *, scale: float
) -> np.ndarray:
    """Box-model tissue enhancement for many parameter sets.

    Parameters
    ----------
    params : ndarray, shape (N, 3)
        CBF (mL/100 g/min), MTT (s), delay (s) per voxel.
    table : ArterialTable
        The arterial input at the acquisition times.
    scale : float
        :func:`flow_scale` (rho / kH / 6000).

    Returns
    -------
    ndarray, float64, shape (T, N)
        Tissue enhancement in HU at ``table.t``.
    """
    p = np.asarray(params, dtype=np.float64)
    x = table.t[:, None] - p[:, 2]
    return (scale * p[:, 0]) * (table.integral(x) - table.integral(x - p[:, 1]))


#: SD of the Gaussian smoothing over time before a measured curve's peak is read, s
#: (:func:`time_to_peak`; docs/methods.md, "TTP").
TTP_SMOOTH_S = 1.5


def gaussian_taps(sd_frames: float) -> np.ndarray:
    """Weights of a Gaussian of SD ``sd_frames`` (> 0), truncated at 4 SD as
    ``scipy.ndimage`` truncates them, summing to 1; odd length."""
    r = max(1, int(4.0 * sd_frames + 0.5))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sd_frames) ** 2)
    return taps / taps.sum()


def gaussian_time(curves: np.ndarray, sd_frames: float) -> np.ndarray:
    """Curves (T, ...) smoothed along time by a Gaussian of SD ``sd_frames``, float32; the
    first and last frames repeated beyond the ends (as ``scipy.ndimage.gaussian_filter1d(...,
    mode="nearest")``), summed as whole frames of a block of :data:`TIME_BLOCK` curves at a
    time, which stays in the cache: several times faster than a filter along the first axis,
    and than whole frames of a million voxels."""
    c = np.asarray(curves)
    flat = c.reshape(c.shape[0], int(np.prod(c.shape[1:])))
    taps = gaussian_taps(sd_frames).astype(np.float32)
    r, n = taps.size // 2, c.shape[0]
    out = np.empty(flat.shape, dtype=np.float32)
    for start in range(0, flat.shape[1], TIME_BLOCK):
        block = np.ascontiguousarray(flat[:, start:start + TIME_BLOCK], dtype=np.float32)
        p = np.concatenate([np.repeat(block[:1], r, axis=0), block,
                            np.repeat(block[-1:], r, axis=0)])
        acc = out[:, start:start + TIME_BLOCK]
        acc[...] = taps[0] * p[:n]
        for k in range(1, taps.size):
            acc += taps[k] * p[k:k + n]
    return out.reshape(c.shape)


#: Curves smoothed together by :func:`gaussian_time`: a block of 89 frames is 1.5 MB.
TIME_BLOCK = 4096


def positive_area(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Area (HU s) under each curve's positive part, (T, N) -> (N,) float64: the trapezoid
    rule as one weight per frame, applied to blocks of columns (no clipped copy of the whole
    matrix, which a million voxels' curves had made for ``np.trapezoid``)."""
    dt = np.diff(np.asarray(times, dtype=np.float64))
    weights = np.zeros(dt.size + 1)
    weights[:-1] += 0.5 * dt
    weights[1:] += 0.5 * dt
    out = np.empty(curves.shape[1])
    for start in range(0, curves.shape[1], TIME_BLOCK):
        block = curves[:, start:start + TIME_BLOCK]
        out[start:start + block.shape[1]] = weights @ np.maximum(block, 0).astype(np.float64)
    return out


#: Gaussian SD, in frames, of the smoothing over time before bolus arrivals are read.
ARRIVAL_SMOOTH_FRAMES = 1.0
#: SD of white noise of unit SD after :func:`smooth_time`.
ARRIVAL_NOISE_GAIN = float(np.sqrt((gaussian_taps(ARRIVAL_SMOOTH_FRAMES) ** 2).sum()))


def smooth_time(curves: np.ndarray) -> np.ndarray:
    """Curves (T, ...) smoothed along time before bolus arrivals are read, float32: a Gaussian of
    SD :data:`ARRIVAL_SMOOTH_FRAMES` (:func:`gaussian_time`)."""
    return gaussian_time(curves, ARRIVAL_SMOOTH_FRAMES)


#: A curve whose last frame stands above this fraction of its peak was cut off by the scan's
#: end (or drifts upwards): the ``truncation`` QC flag, and a VOF that
#: :func:`~ctperf.perfusion.assess_vof` rejects as cut off.
TRUNCATED_END = 0.3


#: Shortest time (s) a bolus spends at or above half its rise, counted in frames
#: (:func:`brief_peak`): an arterial first pass lasts 4 s or more at half its height.
MIN_BOLUS_WIDTH_S = 2.5


def brief_peak(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Curves (T, N) whose frames at or above half their rise above their lowest value span
    less than :data:`MIN_BOLUS_WIDTH_S` (each frame counting its step): no bolus is that
    short, but bone that the head's motion carried into a voxel for a frame or two is (a
    probe's one-frame jerk had made an AIF of brain-edge voxels peaking at 1,049 HU, 4,969
    after the partial-volume scaling, and ended the baseline at the jerk). With frames 2.5 s
    or more apart no curve is brief."""
    c = np.asarray(curves)
    step = np.gradient(np.asarray(times, dtype=np.float64))
    out = np.empty(c.shape[1], dtype=bool)
    for start in range(0, c.shape[1], TIME_BLOCK):  # in the cache, as gaussian_time
        block = c[:, start:start + TIME_BLOCK]
        rel = block - block.min(axis=0)
        above = rel >= 0.5 * rel.max(axis=0)
        out[start:start + block.shape[1]] = step @ above < MIN_BOLUS_WIDTH_S
    return out


def time_to_peak(curves: np.ndarray, times: np.ndarray, *, smooth_s: float = 0.0,
                 start: int = 0, chunk: int = 65536) -> np.ndarray:
    """Time of each curve's maximum counted from the first frame, s; shape (N,) from (T, N).

    With ``smooth_s`` > 0 the curves are first band-limited (:func:`bandlimit`) and smoothed
    over time by a Gaussian of that SD (s; evenly spaced frames only): a tissue curve's peak
    is broad and flat within the noise for seconds, so its highest frame is often the
    noise's. Only frames from ``start`` on are searched (the bolus's arrival: no tissue peaks
    before its input does). The highest frame is refined by the parabola through it and its
    two neighbours (by at most half a frame; not at the first or last frame searched).
    ``chunk`` curves are read at once (memory).
    """
    c = np.asarray(curves)
    t = np.asarray(times, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != t.size or not 0 <= start < t.size:
        raise ValidationError(f"curves must be (T, N) with T = {t.size} > start = {start}, "
                              f"got {c.shape}")
    sd_frames = 0.0
    if smooth_s > 0 and t.size > 1:
        steps = np.diff(t)
        if not np.allclose(steps, steps[0], rtol=1e-3):
            raise ValidationError("time_to_peak smooths evenly spaced frames only; resample "
                                  "the curves first (uniform_grid, resample)")
        sd_frames = smooth_s / float(steps[0])
    out = np.empty(c.shape[1])
    for a in range(0, c.shape[1], chunk):
        block = c[:, a:a + chunk]
        if sd_frames > 0:
            block = gaussian_time(bandlimit(block), sd_frames)
        out[a:a + chunk] = _parabolic_peak(block[start:], t[start:]) + (t[start] - t[0])
    return out


def _parabolic_peak(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    k = np.argmax(c, axis=0)
    if t.size < 3:
        return t[k] - t[0]
    kk = np.clip(k, 1, t.size - 2)
    cols = np.arange(c.shape[1])
    y0, y1, y2 = (np.asarray(c[kk + d, cols], dtype=np.float64) for d in (-1, 0, 1))
    den = y0 - 2.0 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (y0 - y2) / den, 0.0)
    off = np.where(k == kk, np.clip(off, -0.5, 0.5), 0.0)
    return np.interp(k + off, np.arange(t.size), t) - t[0]


def evenly_spaced(times: np.ndarray) -> bool:
    """Whether frame times (s, increasing, two or more) step evenly, within 0.1 % (times written
    to the millisecond or jittered by a scanner's clock count as even)."""
    steps = np.diff(np.asarray(times, dtype=np.float64))
    return bool(steps.size) and bool(np.allclose(steps, steps[0], rtol=1e-3))


def uniform_grid(times: np.ndarray) -> np.ndarray | None:
    """A uniform time grid for unevenly spaced frames, else None.

    The grid starts at the first frame and steps by the finest frame interval (so fast early
    sampling keeps its detail), with at most about four times as many points as frames; it
    ends at or before the last frame.

    Parameters
    ----------
    times : ndarray, shape (T,)
        Frame times, s, strictly increasing.

    Returns
    -------
    ndarray, shape (G,), or None when the frames are evenly spaced (within 0.1 %)
    """
    t = np.asarray(times, dtype=np.float64)
    if evenly_spaced(t):
        return None
    steps = np.diff(t)
    step = max(float(steps.min()), (t[-1] - t[0]) / (4 * t.size))
    return t[0] + step * np.arange(int(np.floor((t[-1] - t[0]) / step + 1e-6)) + 1)


def sample_step(times: np.ndarray, grid: np.ndarray | None) -> float:
    """The step (s) of the uniform samples a fit saw: ``grid``'s (:func:`uniform_grid`, for
    unevenly spaced frames), else the frames' mean interval."""
    t = np.asarray(times if grid is None else grid, dtype=np.float64)
    return float((t[-1] - t[0]) / max(t.size - 1, 1))


def resample(curves: np.ndarray, times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of curves along time.

    Parameters
    ----------
    curves : ndarray, shape (T, ...)
        Samples at ``times`` (s, strictly increasing).
    times : ndarray, shape (T,)
    grid : ndarray, shape (G,)
        New times within ``[times[0], times[-1]]``, s.

    Returns
    -------
    ndarray, shape (G, ...), the dtype of ``curves``
    """
    idx = np.clip(np.searchsorted(times, grid, side="right") - 1, 0, times.size - 2)
    w = (grid - times[idx]) / (times[idx + 1] - times[idx])
    w = w.reshape(-1, *([1] * (curves.ndim - 1))).astype(curves.dtype)
    return curves[idx] * (1 - w) + curves[idx + 1] * w


#: Slices whose own acquisition times differ from their frame's time by more than this (s) are
#: interpolated onto the frame times by :func:`on_frame_times`.
SLICE_TIME_TOLERANCE_S = 0.05

#: The most the cubic spline of :func:`on_frame_times` may multiply the noise of a frame (white
#: noise; the norm of the frame's weights) before that frame takes a straight line instead.
#: Slices swept in one direction at even steps stay under 1 between their end frames and under
#: 1.17 at them; a shuttle sweeping back and forth reads 2.0 in the gaps of its end slices.
MAX_SPLINE_NOISE_GAIN = 1.25


def on_frame_times(series: CTPSeries) -> tuple[CTPSeries, float]:
    """The study with every slice's curves on the frame times, and the largest shift (s).

    A scanner that sweeps its slices one after another (shuttle and helical perfusion modes)
    takes each slice of a frame at its own time (``series.slice_times``), up to a second apart;
    the fits see one time per frame (``series.times``, the frame's mean), so each slice's
    curves are interpolated from its own times onto them by a cubic spline (not-a-knot; the
    first and last values held outside the slice's span). A straight line between frames
    would cut a bolus's peak by how far a slice lies from its frame's time, so slices at the
    ends of a sweep would read a lower CBF than those in its middle. A study without slice
    times, or whose slices lie within :data:`SLICE_TIME_TOLERANCE_S` of their frame's time,
    is returned as it is (shift 0).

    A frame whose spline value would be noisier than the samples by more than
    :data:`MAX_SPLINE_NOISE_GAIN` takes the straight line between its samples instead (a
    shuttle that sweeps back and forth takes its end slices in pairs a fraction of a second
    apart, then seconds later, and through noisy pairs close in time the spline overshoots in
    the gaps: a probe's end slices read 5 HU of noise as 9.9-14 HU, their delay +1.25 s and
    bSVD's CBF +55 %). A straight line never raises the noise; the other frames keep the
    spline.
    """
    if series.slice_times is None:
        return series, 0.0
    own, frame = series.slice_times, series.times
    shift = float(np.max(np.abs(own - frame[:, None])))
    if shift <= SLICE_TIME_TOLERANCE_S:
        return series, 0.0
    hu = np.empty_like(series.hu)
    n_t, n_z = series.hu.shape[:2]
    linear: dict[int, int] = {}
    for z in range(n_z):
        grid = np.clip(frame, own[0, z], own[-1, z])
        # either is linear in the samples: one (T, T) matrix moves every curve of a slice
        weights = interpolate.make_interp_spline(own[:, z], np.eye(n_t), k=min(3, n_t - 1),
                                                 axis=0)(grid)
        # each frame's noise over the samples' (white noise) is the norm of its weights: a
        # frame the spline would make noisier takes the straight line between its samples
        loud = np.sqrt((weights ** 2).sum(axis=1)) > MAX_SPLINE_NOISE_GAIN
        if loud.any():
            weights[loud] = resample(np.eye(n_t), own[:, z], grid[loud])
            linear[z] = int(loud.sum())
        hu[:, z] = np.tensordot(weights.astype(hu.dtype), series.hu[:, z], axes=1)
    if linear:
        log.info("frames interpolated onto the frame times linearly where a spline would raise "
                 "their noise (slice: frames): %s", linear)
    return series.replace(hu=hu, slice_times=None), shift


#: How many SDs of its noise one frame must stand apart from the line through its two
#: neighbours to be a spike (white noise gives that gap an SD of 1.22 noise SDs at even steps;
#: 6 of them: 1 false alarm in 10^8 frames of Gaussian noise), besides a share of the curve's
#: peak (:func:`spiky`).
SPIKE_SDS = 6.0


def spiky(curves: np.ndarray, noise: np.ndarray, times: np.ndarray | None = None,
          aif: np.ndarray | None = None) -> np.ndarray:
    """Which curves (T, N) hold a spike (N,) bool: a frame standing off the line through its
    two neighbours (at ``times``, s; even steps when None) by more than :data:`SPIKE_SDS` SDs
    of that gap's noise (from ``noise`` (N,), each curve's noise SD) and by a share of the
    curve's largest excursion that no bolus sampled so shows: half, or 1.25 times the largest
    share of the ``aif`` (baseline-subtracted, on the same frames) when that is more, and none
    when the AIF stands above half its peak in fewer than three frames (a peak a frame or two
    wide stands off its neighbours as a spike does). The ``spike`` flag of
    :func:`ctperf.perfusion.curvefit.curve_flags`, and what keeps a voxel from being the VOF."""
    c = np.asarray(curves, dtype=np.float64)
    if c.shape[0] < 3:
        return np.zeros(c.shape[1], dtype=bool)
    tt = (np.arange(c.shape[0], dtype=np.float64) if times is None
          else np.asarray(times, dtype=np.float64))
    w = ((tt[1:-1] - tt[:-2]) / (tt[2:] - tt[:-2]))[:, None]

    def gaps(x: np.ndarray) -> np.ndarray:  # each frame off the line through its neighbours
        return np.abs(x[1:-1] - (1.0 - w) * x[:-2] - w * x[2:]).max(axis=0)

    # the gap's noise: the frame's own and the line's (1 + w^2 + (1 - w)^2 variances), from the
    # curve's own noise (a floor from the other curves' made a quiet curve's spike go unflagged
    # beside noisy ones); white-noise curves of 16-30 frames raise it in about 1 in 1000
    gap_sd = np.asarray(noise, dtype=np.float64) * np.sqrt(
        1.0 + float(np.max(w ** 2 + (1.0 - w) ** 2)))
    share = 0.5
    if aif is not None:
        a = np.asarray(aif, dtype=np.float64)[:, None]
        if np.abs(a).max() > 0:
            if int((a >= 0.5 * a.max()).sum()) < 3:
                return np.zeros(c.shape[1], dtype=bool)
            share = max(share, 1.25 * float(gaps(a)[0] / np.abs(a).max()))
    gap = gaps(c)
    return (gap > SPIKE_SDS * gap_sd) & (gap > share * np.abs(c).max(axis=0))
