"""Arterial input, venous output and tissue enhancement curves on a fine time grid.

Tissue enhancement (HU above baseline) follows the indicator-dilution model:

    C(t) = (rho / kH) * (CBF / 6000) * [Ca(. - delay) * h_disp * R](t)

with ``h_disp(t) = exp(-t / tau) / tau`` (unit area, mean ``tau``, the dispersion) and a residue
``R`` with ``R(0) = 1`` and ``integral R = MTT``: ``box`` (1 on [0, MTT)), ``exponential``
(``exp(-t / MTT)``) or ``gamma`` (``1 - P(k, k t / MTT)``, the survival function of a gamma
transit-time density of shape ``k``). Curves are computed on a fine grid of step ``dt`` (<= 0.1 s,
dividing the frame interval) and sampled at the acquisition times, so that no fitting model sees
data made by its own discretisation.

The arterial input is a gamma variate (the transit from the arm vein to the brain arteries)
convolved with the injection, a rectangle of duration volume / rate, plus a later and broader
recirculation of the same form; both are evaluated in closed form at any time.

Vectorisation: per subject, a small bank holds the dispersed AIF for a grid of ``tau`` (0.1 s steps)
and, for the exponential and gamma residues, the full convolution for a log-spaced grid of MTT
values (linear interpolation between neighbours: relative error < 1e-3). Voxel delays (which may be
slightly negative: tissue reached before the artery the AIF is measured in) are rounded to the fine
grid and ``tau`` to its 0.1 s grid; the truth maps report those rounded values, so they are exactly
what was simulated. The box residue is exact in MTT:
``C = k CBF (A(t - d) - A(t - d - MTT))`` with ``A`` the running integral of the dispersed AIF.

True Tmax (:func:`residue_peak_time`): ``delay`` plus the first time at which the dispersed
residue ``(h_disp * R)(t)``, evaluated on the fine grid, reaches its maximum (within a relative
:data:`TMAX_FLAT_TOL`, which only matters on a plateau: an undispersed box gives ``delay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sfft
from scipy import signal, special

__all__ = [
    "DELAY_MIN",
    "KH",
    "RESIDUES",
    "RHO",
    "TMAX_FLAT_TOL",
    "CurveBank",
    "aif_curve",
    "aif_from_params",
    "dispersion_kernel",
    "draw_aif",
    "gamma_variate",
    "residue",
    "residue_peak_time",
    "vof_curve",
]

#: Brain density (g/mL) and large-vessel / capillary haematocrit correction.
RHO = 1.04
KH = (1 - 0.45) / (1 - 0.25)
RESIDUES: tuple[str, ...] = ("box", "exponential", "gamma")
TAU_STEP = 0.1
TAU_MAX = 4.0
MTT_MIN, MTT_MAX, N_MTT = 0.8, 32.0, 72
#: Range of voxel delays (s) the bank simulates; negative = before the AIF's artery.
DELAY_MIN, DELAY_MAX = -2.0, 15.0
#: Relative tolerance that makes "the first time the maximum is reached" well posed on a plateau.
TMAX_FLAT_TOL = 1e-3
_PEAK_MTT_RATIO = 1.005  # MTT grid of the peak-time table: 0.5 % steps


def gamma_variate(t: np.ndarray, *, t0: float, alpha: float, beta: float) -> np.ndarray:
    """``(t - t0)^alpha exp(-(t - t0) / beta)`` scaled to a peak of 1 (0 before ``t0``)."""
    s = np.clip((np.asarray(t, dtype=np.float64) - t0) / beta, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(s > 0, np.exp(alpha * np.log(np.where(s > 0, s, 1.0)) - s), 0.0)
    return out / (alpha**alpha * np.exp(-alpha))  # peak at s = alpha


def _injected_pass(t: np.ndarray, *, t0: float, alpha: float, beta: float, duration: float
                   ) -> np.ndarray:
    """Unit-area gamma variate (arrival ``t0``) convolved with a unit-area rectangle of
    ``duration`` s, in closed form: the difference of two regularised incomplete gammas."""
    t = np.asarray(t, dtype=np.float64)
    x_in = np.clip((t - t0) / beta, 0.0, None)
    x_out = np.clip((t - t0 - duration) / beta, 0.0, None)
    return (special.gammainc(alpha + 1, x_in) - special.gammainc(alpha + 1, x_out)) / duration


def aif_curve(t: np.ndarray, *, peak: float, t0: float, alpha: float, beta: float,
              injection_s: float, recirculation: float, recirc_delay: float) -> np.ndarray:
    """Arterial enhancement in HU: the injected first pass plus a broader, later recirculation.

    The first pass is the gamma variate ``(t - t0)^alpha exp(-(t - t0) / beta)`` convolved with
    a rectangular injection of ``injection_s`` seconds; the recirculation has the same form with
    twice the scale, starts ``recirc_delay`` later and holds ``recirculation`` times the first
    pass's area.

    Parameters
    ----------
    t : ndarray, shape (n,)
        Times in s.
    peak : float
        First-pass peak enhancement in HU.
    t0, alpha, beta : float
        Arrival (s), shape and scale (s) of the gamma variate.
    injection_s : float
        Duration of the injection (contrast volume / injection rate), s.
    recirculation : float
        Area of the recirculation relative to the first pass (0-0.3).
    recirc_delay : float
        Delay of the recirculation's arrival after the first pass's (s).

    Returns
    -------
    ndarray, float64, shape (n,)
    """
    def shape(tt: np.ndarray, start: float, scale: float) -> np.ndarray:
        return _injected_pass(tt, t0=start, alpha=alpha, beta=scale, duration=injection_s)

    # the first pass's maximum, from a dense grid over its support (relative error < 1e-6)
    span = injection_s + (alpha + 10 * np.sqrt(alpha + 1)) * beta
    top = float(np.max(shape(t0 + np.linspace(0.0, span, 20001), t0, beta)))
    total = (shape(t, t0, beta)
             + recirculation * shape(t, t0 + recirc_delay, 2.0 * beta))  # both unit area
    return peak * total / top


def draw_aif(rng: np.random.Generator, peak: float | None = None) -> dict[str, float]:
    """Draw the parameters of :func:`aif_curve` and of the VOF's transit (JSON-able).

    Arrival 3-12 s, shape 2-5, scale 1-2.5 s (the gamma variate peaking at most 8 s after
    arrival), 40-50 mL injected at 4-6 mL/s, first-pass peak 250-600 HU unless ``peak`` is
    given, recirculation 0-30 % of the first pass's area arriving 10-15 s after it, VOF transit
    mean 6-9 s.
    """
    alpha = float(rng.uniform(2.0, 5.0))
    beta = float(min(rng.uniform(1.0, 2.5), 8.0 / alpha))
    volume, rate = float(rng.uniform(40.0, 50.0)), float(rng.uniform(4.0, 6.0))
    drawn_peak = float(rng.uniform(250, 600))
    return {"peak": drawn_peak if peak is None else float(peak),
            "t0": float(rng.uniform(3.0, 12.0)), "alpha": alpha, "beta": beta,
            "volume_ml": volume, "rate_ml_s": rate, "injection_s": volume / rate,
            "recirculation": float(rng.uniform(0.0, 0.3)),
            "recirc_delay": float(rng.uniform(10.0, 15.0)),
            "vof_transit_mean": float(rng.uniform(6.0, 9.0))}


def aif_from_params(t: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """:func:`aif_curve` at ``t`` for a dictionary drawn by :func:`draw_aif`."""
    return aif_curve(t, **{k: params[k] for k in ("peak", "t0", "alpha", "beta", "injection_s",
                                                  "recirculation", "recirc_delay")})


def _exp_hat_weights(tau: float, dt: float, n: int) -> np.ndarray:
    """Weights w_k = integral exp(-s/tau)/tau * hat(s/dt - k) ds (hat: the linear-interpolation
    basis), so that sum_k x[n - k] w_k is the exact convolution of the piecewise-linear x."""
    rising, falling = _exp_hat_halves(tau, dt, n)
    return rising + falling


def _exp_hat_halves(tau: float, dt: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of :func:`_exp_hat_weights` from the rising and the falling half of each hat."""
    k = np.arange(n, dtype=np.float64)

    def i0(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-a / tau) - np.exp(-b / tau)

    def i1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + tau) * np.exp(-a / tau) - (b + tau) * np.exp(-b / tau)

    lo1, hi1 = np.maximum((k - 1) * dt, 0.0), k * dt
    rising = np.where(k >= 1, i1(lo1, hi1) / dt - (k - 1) * i0(lo1, hi1), 0.0)
    lo2, hi2 = k * dt, (k + 1) * dt
    falling = (k + 1) * i0(lo2, hi2) - i1(lo2, hi2) / dt
    return rising, falling


def dispersion_kernel(tau: float, dt: float, n: int) -> np.ndarray:
    """Unit-area exponential kernel of mean ``tau`` as weights on a grid of step ``dt``.

    Exact for a signal interpolated linearly between grid points; ``tau = 0`` is the identity.
    """
    if tau <= 0:
        k = np.zeros(n)
        k[0] = 1.0
        return k
    return _exp_hat_weights(tau, dt, n)


def _residue_weights(kind: str, mtt: np.ndarray, dt: float, n: int, shape: float
                     ) -> np.ndarray:
    """(len(mtt), n) weights of R against the linear-interpolation basis (times dt units)."""
    if kind == "exponential":
        return np.stack([m * _exp_hat_weights(float(m), dt, n) for m in mtt])
    sub = 8  # R varies on scales >= MTT_MIN / shape >> dt: 8 points per bin suffice
    u = (np.arange(2 * sub) + 0.5) / sub - 1.0  # offsets in bins, over [-1, 1]
    hat = 1.0 - np.abs(u)
    s = (np.arange(n)[:, None] + u[None, :]) * dt  # (n, 2 sub)
    r = residue(kind, s[None], mtt[:, None, None], shape=shape)
    return np.sum(r * hat, axis=-1) * dt / sub


def vof_curve(aif_fine: np.ndarray, dt: float, *, transit_mean: float,
              transit_shape: float = 4.0) -> np.ndarray:
    """Venous enhancement: the AIF convolved with a unit-area gamma transit kernel (same area)."""
    n = aif_fine.size
    t = np.arange(n + 1) * dt
    cdf = special.gammainc(transit_shape, t * transit_shape / transit_mean)
    kernel = np.diff(cdf)
    return signal.fftconvolve(aif_fine, kernel)[:n]


def residue(kind: str, t: np.ndarray, mtt: np.ndarray | float, *, shape: float = 3.0
            ) -> np.ndarray:
    """Residue function R(t) with R(0) = 1 and integral MTT (s); broadcasts t against mtt."""
    t = np.asarray(t, dtype=np.float64)
    mtt = np.asarray(mtt, dtype=np.float64)
    if kind == "box":
        return ((t >= 0) & (t < mtt)).astype(np.float64)
    if kind == "exponential":
        return np.where(t >= 0, np.exp(-np.clip(t, 0, None) / mtt), 0.0)
    if kind == "gamma":
        return np.where(t >= 0, special.gammaincc(shape, np.clip(t, 0, None) * shape / mtt), 0.0)
    raise ValueError(f"residue must be one of {RESIDUES}, got {kind!r}")


@dataclass(frozen=True, eq=False)
class CurveBank:
    """Precomputed curves for one subject's AIF, and their per-voxel lookup.

    Build with :meth:`build`; evaluate with :meth:`enhancement`. Fine index ``n`` is time
    ``(n - pad) * dt``; frame ``i`` is at fine index ``pad + i * step``.
    """

    dt: float
    step: int
    pad: int
    n_frames: int
    taus: np.ndarray
    mtts: np.ndarray
    tables: dict[str, np.ndarray]  # kind -> (C, step, n_j) phase-major float32
    gamma_shape: float

    @classmethod
    def build(cls, aif_fine: np.ndarray, *, dt: float, step: int, n_frames: int,
              kinds: tuple[str, ...], gamma_shape: float = 3.0) -> CurveBank:
        """Tables for ``kinds`` from the AIF sampled at ``k * dt`` (k = 0, 1, ...).

        ``aif_fine`` should cover the frames and ``-DELAY_MIN`` s beyond the last one (tissue
        reached before the AIF's artery sees the AIF of later times); samples beyond are
        ignored, missing ones read as 0. Delays up to ``DELAY_MAX`` and MTT up to ``MTT_MAX``
        fit in the zero padding before the AIF.
        """
        pad = int(np.ceil((DELAY_MAX + MTT_MAX + 2 * dt) / dt / step)) * step
        early = int(np.ceil(-DELAY_MIN / dt / step)) + 1  # frames of AIF after the last one
        n_j = pad // step + n_frames + early
        n_f = n_j * step
        ca = np.zeros(n_f)
        m = min(aif_fine.size, n_f - pad)
        ca[pad:pad + m] = aif_fine[:m]
        taus = np.round(np.arange(0.0, TAU_MAX + TAU_STEP / 2, TAU_STEP), 6)
        mtts = np.geomspace(MTT_MIN, MTT_MAX, N_MTT)
        disp = np.stack([signal.fftconvolve(ca, dispersion_kernel(tau, dt, n_f))[:n_f]
                         for tau in taus])
        tables: dict[str, np.ndarray] = {}
        for kind in kinds:
            if kind == "box":
                cum = np.concatenate([np.zeros((taus.size, 1)),
                                      np.cumsum(0.5 * (disp[:, 1:] + disp[:, :-1]), axis=1) * dt],
                                     axis=1)
                table = cum
            else:
                nfft = sfft.next_fast_len(2 * n_f)
                weights = _residue_weights(kind, mtts, dt, n_f, gamma_shape)
                res_hat = np.fft.rfft(weights, nfft, axis=1)
                # exact for the dispersed AIF interpolated linearly between fine-grid points
                table = np.concatenate([
                    np.fft.irfft(np.fft.rfft(d, nfft)[None, :] * res_hat, nfft, axis=1)[:, :n_f]
                    for d in disp])
            tables[kind] = np.ascontiguousarray(
                table.reshape(-1, n_j, step).transpose(0, 2, 1)).astype(np.float32)
        return cls(dt=dt, step=step, pad=pad, n_frames=n_frames, taus=taus, mtts=mtts,
                   tables=tables, gamma_shape=gamma_shape)

    def quantize_tau(self, tau: np.ndarray) -> np.ndarray:
        """Index into :attr:`taus` of the nearest dispersion value."""
        return np.clip(np.rint(np.asarray(tau) / TAU_STEP), 0, self.taus.size - 1).astype(np.int64)

    def quantize_delay(self, delay: np.ndarray) -> np.ndarray:
        """Delay in fine steps (nearest), clipped to what the padding allows."""
        low, top = int(np.ceil(DELAY_MIN / self.dt)), int(np.floor(DELAY_MAX / self.dt))
        return np.clip(np.rint(np.asarray(delay) / self.dt), low, top).astype(np.int64)

    def _rows(self, kind: str, curve: np.ndarray, start: np.ndarray) -> np.ndarray:
        table = self.tables[kind]
        win = sliding_window_view(table, self.n_frames, axis=2)
        return win[curve, start % self.step, start // self.step]

    def enhancement(self, kind: str, *, cbf: np.ndarray, mtt: np.ndarray,
                    delay_steps: np.ndarray, tau_index: np.ndarray,
                    rho: float = RHO, kh: float = KH) -> np.ndarray:
        """Tissue enhancement (HU) at the frames for N voxels.

        Parameters
        ----------
        kind : str
            Residue kind (one of the kinds the bank was built for).
        cbf : ndarray, shape (N,)
            mL/100 g/min.
        mtt : ndarray, shape (N,)
            s, within [MTT_MIN, MTT_MAX] (clipped).
        delay_steps, tau_index : ndarray of int, shape (N,)
            From :meth:`quantize_delay` and :meth:`quantize_tau`.

        Returns
        -------
        ndarray, float32, shape (N, T)
        """
        scale = (rho / kh * np.asarray(cbf, dtype=np.float64) / 6000.0).astype(np.float32)
        mtt = np.clip(np.asarray(mtt, dtype=np.float64), MTT_MIN, MTT_MAX)
        start = self.pad - np.asarray(delay_steps, dtype=np.int64)
        if kind == "box":
            m = mtt / self.dt
            mf = np.floor(m).astype(np.int64)
            w = (m - mf).astype(np.float32)[:, None]
            late = (1 - w) * self._rows(kind, tau_index, start - mf)
            late += w * self._rows(kind, tau_index, start - mf - 1)
            out = self._rows(kind, tau_index, start) - late
        else:
            pos = np.interp(np.log(mtt), np.log(self.mtts), np.arange(self.mtts.size))
            lo = np.minimum(np.floor(pos).astype(np.int64), self.mtts.size - 2)
            w = (pos - lo).astype(np.float32)[:, None]
            base = tau_index * self.mtts.size
            out = (1 - w) * self._rows(kind, base + lo, start)
            out += w * self._rows(kind, base + lo + 1, start)
        out *= scale[:, None]
        return out


def residue_peak_time(kind: str, *, mtt: np.ndarray, tau: np.ndarray, dt: float,
                      gamma_shape: float = 3.0) -> np.ndarray:
    """Time (s) of the first maximum of the dispersed residue ``(h_disp * R)(t)``.

    The convention for true Tmax is ``delay + residue_peak_time``. ``R`` is sampled on the fine
    grid ``k * dt`` and convolved with the same unit-area dispersion weights the simulation
    applies (:func:`dispersion_kernel`); the result is the first grid time at which the curve
    comes within a relative :data:`TMAX_FLAT_TOL` of its maximum. On a plateau (a box residue)
    this is where the plateau is reached: 0 without dispersion, about ``7 tau`` (at most MTT)
    with it; on a smooth peak it is slightly before the argmax (see the phantom documentation).
    MTT is rounded to a 0.5 % grid; dispersion values are used as given (the simulation's
    0.1 s grid).

    Parameters
    ----------
    kind : str
        Residue shape, one of :data:`RESIDUES`.
    mtt, tau : ndarray, shape (N,)
        Mean transit time and mean of the dispersion kernel (s); MTT is clipped to
        [MTT_MIN, MTT_MAX].
    dt : float
        Fine-grid step (s).
    gamma_shape : float
        Shape of the gamma residue.

    Returns
    -------
    ndarray, float64, shape (N,)
    """
    mtt = np.clip(np.asarray(mtt, dtype=np.float64), MTT_MIN, MTT_MAX)
    tau = np.asarray(tau, dtype=np.float64)
    n_grid = int(np.ceil(np.log(MTT_MAX / MTT_MIN) / np.log(_PEAK_MTT_RATIO))) + 1
    grid = np.geomspace(MTT_MIN, MTT_MAX, n_grid)
    row = np.rint(np.interp(np.log(mtt), np.log(grid), np.arange(n_grid))).astype(np.int64)
    n = int(np.ceil(MTT_MAX / dt)) + 3  # every peak lies at or before MTT
    nfft = sfft.next_fast_len(2 * n)
    used = np.unique(row)
    res_hat = sfft.rfft(residue(kind, np.arange(n) * dt, grid[used, None], shape=gamma_shape),
                        nfft, axis=1)
    where = np.searchsorted(used, row)
    out = np.empty(mtt.shape)
    for value in np.unique(tau):
        sel = tau == value
        curves = sfft.irfft(sfft.rfft(dispersion_kernel(float(value), dt, n), nfft)[None]
                            * res_hat, nfft, axis=1)[:, :n]
        if value > 0:  # R is 0 before 0, not a ramp from R(0): drop the last hat's far half
            curves -= _exp_hat_halves(float(value), dt, n)[1][None]  # R(0) = 1
        top = curves.max(axis=1, keepdims=True)
        first = np.argmax(curves >= top * (1.0 - TMAX_FLAT_TOL), axis=1)
        out[sel] = first[where[sel]] * dt
    return out
