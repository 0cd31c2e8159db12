"""Arterial input, venous output and tissue enhancement curves on a fine time grid.

Tissue enhancement (HU above baseline) follows the indicator-dilution model:

    C(t) = (rho / kH) * (CBF / 6000) * [Ca(. - delay) * h_disp * R](t)

with ``h_disp(t) = exp(-t / tau) / tau`` (unit area, mean ``tau``, the dispersion) and a residue
``R`` with ``R(0) = 1`` and ``integral R = MTT``: ``box`` (1 on [0, MTT)), ``exponential``
(``exp(-t / MTT)``) or ``gamma`` (``1 - P(k, k t / MTT)``, the survival function of a gamma
transit-time density of shape ``k``). Curves are computed on a fine grid of step ``dt`` (<= 0.1 s,
dividing the frame interval) and sampled at the acquisition times, so that no fitting model sees
data made by its own discretisation.

Vectorisation: per subject, a small bank holds the dispersed AIF for a grid of ``tau`` (0.1 s steps)
and, for the exponential and gamma residues, the full convolution for a log-spaced grid of MTT
values (linear interpolation between neighbours: relative error < 1e-3). Voxel delays are rounded
to the fine grid and ``tau`` to its 0.1 s grid; the truth maps report those rounded values, so they
are exactly what was simulated. The box residue is exact in MTT:
``C = k CBF (A(t - d) - A(t - d - MTT))`` with ``A`` the running integral of the dispersed AIF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sfft
from scipy import signal, special

__all__ = [
    "KH",
    "RESIDUES",
    "RHO",
    "CurveBank",
    "aif_curve",
    "dispersion_kernel",
    "gamma_variate",
    "residue",
    "vof_curve",
]

#: Brain density (g/mL) and large-vessel / capillary haematocrit correction.
RHO = 1.04
KH = (1 - 0.45) / (1 - 0.25)
RESIDUES: tuple[str, ...] = ("box", "exponential", "gamma")
TAU_STEP = 0.1
TAU_MAX = 4.0
MTT_MIN, MTT_MAX, N_MTT = 0.8, 32.0, 72
DELAY_MAX = 15.0


def gamma_variate(t: np.ndarray, *, t0: float, alpha: float, beta: float) -> np.ndarray:
    """``(t - t0)^alpha exp(-(t - t0) / beta)`` scaled to a peak of 1 (0 before ``t0``)."""
    s = np.clip((np.asarray(t, dtype=np.float64) - t0) / beta, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(s > 0, np.exp(alpha * np.log(np.where(s > 0, s, 1.0)) - s), 0.0)
    return out / (alpha**alpha * np.exp(-alpha))  # peak at s = alpha


def aif_curve(t: np.ndarray, *, peak: float, t0: float, alpha: float, beta: float,
              recirculation: float, recirc_delay: float) -> np.ndarray:
    """Arterial enhancement in HU: first-pass gamma variate plus a broader, later recirculation.

    Parameters
    ----------
    t : ndarray, shape (n,)
        Times in s.
    peak : float
        First-pass peak enhancement in HU.
    t0, alpha, beta : float
        Arrival (s), shape and scale (s) of the first pass.
    recirculation : float
        Area of the recirculation relative to the first pass (0-0.3).
    recirc_delay : float
        Delay of the recirculation after the first pass (s).
    """
    first = gamma_variate(t, t0=t0, alpha=alpha, beta=beta)
    second = gamma_variate(t, t0=t0 + recirc_delay, alpha=alpha, beta=2.0 * beta)
    # the second bolus has twice the scale, so equal peaks would mean twice the area
    return peak * (first + 0.5 * recirculation * second)


def _exp_hat_weights(tau: float, dt: float, n: int) -> np.ndarray:
    """Weights w_k = integral exp(-s/tau)/tau * hat(s/dt - k) ds (hat: the linear-interpolation
    basis), so that sum_k x[n - k] w_k is the exact convolution of the piecewise-linear x."""
    k = np.arange(n, dtype=np.float64)

    def i0(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-a / tau) - np.exp(-b / tau)

    def i1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + tau) * np.exp(-a / tau) - (b + tau) * np.exp(-b / tau)

    lo1, hi1 = np.maximum((k - 1) * dt, 0.0), k * dt
    rising = np.where(k >= 1, i1(lo1, hi1) / dt - (k - 1) * i0(lo1, hi1), 0.0)
    lo2, hi2 = k * dt, (k + 1) * dt
    falling = (k + 1) * i0(lo2, hi2) - i1(lo2, hi2) / dt
    return rising + falling


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

        ``aif_fine`` must cover ``n_frames`` frames (``(n_frames - 1) * step + 1`` samples).
        Delays up to ``DELAY_MAX`` and MTT up to ``MTT_MAX`` fit in the zero padding.
        """
        pad = int(np.ceil((DELAY_MAX + MTT_MAX + 2 * dt) / dt / step)) * step
        n_j = pad // step + n_frames + 1
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
        top = int(np.floor(DELAY_MAX / self.dt))
        return np.clip(np.rint(np.asarray(delay) / self.dt), 0, top).astype(np.int64)

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
