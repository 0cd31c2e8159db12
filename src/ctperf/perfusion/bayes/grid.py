"""The grid of residue functions: the shapes, dispersions and delays the Bayesian estimator
weighs, and each grid point's unit-flow tissue response."""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse, special

from ctperf.errors import ValidationError

#: Residue shapes of the grid: ``box``, ``gamma:k`` (gamma transit times of shape k; k = 1 the
#: exponential) and ``power:p`` (R = (1 - t / L)^p on [0, L); p = 1 the linear residue).
RESIDUES: tuple[str, ...] = ("box", "gamma:4", "gamma:3", "gamma:2", "gamma:1", "power:1")

#: Mean times (s) of the exponential transport kernel h between the AIF's artery and the tissue
#: on the grid (0: none).
DISPERSIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.5, 3.0)

#: Delays of the grid, s (``ResidueGrid``'s default): from tissue 3 s ahead of the AIF's artery
#: to 12 s behind it.
DELAY_RANGE: tuple[float, float] = (-3.0, 12.0)

#: Scale (s) of the prior on the dispersion, density proportional to 1 / (tau + scale): close
#: to log-uniform (no preferred dispersion) from a few tenths of a second up, finite at 0.
DISPERSION_SCALE = 0.1

#: The first time the dispersed residue comes within this fraction of its maximum is its peak
#: (a flat top's first time, as the phantom's truth defines it).
PEAK_TOL = 1e-3


def _family(name: str) -> tuple[str, float]:
    family, _, value = name.partition(":")
    if family == "box" and not value:
        return family, 0.0
    if family in ("gamma", "power") and value:
        v = float(value)
        if v > 0:
            return family, v
    raise ValidationError(f"unknown residue {name!r}: use box, gamma:K or power:P (K, P > 0)")


def residue(t: np.ndarray, mtt: float | np.ndarray, name: str) -> np.ndarray:
    """Residue function R(t) of mean transit time ``mtt`` (s); R = 0 before t = 0.

    Parameters
    ----------
    t : ndarray
        Times in s.
    mtt : float or ndarray
        Mean transit time, the area under R, s (an array broadcasts against ``t``).
    name : str
        One of the shapes of :data:`RESIDUES` (any K or P > 0).
    """
    t = np.asarray(t, dtype=np.float64)
    family, v = _family(name)
    if family == "box":
        r = (t < mtt).astype(np.float64)
    elif family == "gamma":
        r = 1.0 - special.gammainc(v, v * np.maximum(t, 0.0) / mtt)
    else:  # power: L = (p + 1) MTT
        r = np.clip(1.0 - t / ((v + 1.0) * mtt), 0.0, None) ** v
    return np.where(t >= 0, r, 0.0)


def transit_cv(name: str) -> float:
    """Coefficient of variation of the transit times of a residue shape (0 box, 1 exponential)."""
    family, v = _family(name)
    if family == "box":
        return 0.0
    if family == "gamma":
        return 1.0 / math.sqrt(v)
    return math.sqrt(v / (v + 2.0))


class ResidueGrid:
    """The grid of (shape, MTT, delay) and each point's unit-flow tissue response at the frames.

    Parameters
    ----------
    aif : ndarray, shape (T,)
        Arterial enhancement in HU (partial-volume corrected), linear between samples, zero
        before the first frame and held after the last.
    times : ndarray, shape (T,)
        Frame times in s, strictly increasing, not necessarily uniform.
    scale : float
        :func:`~ctperf.perfusion.curves.flow_scale` (rho / kH / 6000).
    mtt_range : (float, float)
        Smallest and largest MTT, s; ``n_mtt`` log-spaced points.
    delay_range : (float, float)
        Smallest and largest delay, s; step ``delay_step``.
    residues : sequence of str
        Shapes (see :data:`RESIDUES`).
    dt : float
        Step of the fine grid on which the convolutions are integrated, s.
    whiten : ndarray, shape (T, T), optional
        Linear map applied to every response (see :func:`baseline_whitening`); the curves
        compared with them must have gone through the same map.
    """

    def __init__(self, aif: np.ndarray, times: np.ndarray, *, scale: float,
                 mtt_range: tuple[float, float] = (1.0, 30.0), n_mtt: int = 48,
                 delay_range: tuple[float, float] = DELAY_RANGE, delay_step: float = 0.125,
                 residues: tuple[str, ...] = RESIDUES,
                 dispersions: tuple[float, ...] = DISPERSIONS, dt: float = 0.05,
                 whiten: np.ndarray | None = None) -> None:
        t = np.asarray(times, dtype=np.float64)
        ca = np.asarray(aif, dtype=np.float64)
        self.mtts = np.geomspace(mtt_range[0], mtt_range[1], n_mtt)
        self.delays = np.arange(delay_range[0], delay_range[1] + 1e-9, delay_step)
        self.residues = tuple(residues)
        self.dispersions = tuple(float(d) for d in dispersions)
        # The arterial curve at the midpoints of a fine grid from the first frame: the response
        # sum(ca[n - 1 - m] * X((m + 1/2) dt)) * dt is the midpoint rule of the convolution.
        span = t[-1] - t[0] - min(0.0, delay_range[0]) + dt
        n_fine = int(np.ceil(span / dt)) + 1
        offsets = (np.arange(n_fine) + 0.5) * dt
        ca_mid = np.interp(t[0] + offsets, t, ca, left=0.0, right=ca[-1])
        n_fft = 1 << int(np.ceil(np.log2(2 * n_fine)))
        ca_spec = np.fft.rfft(ca_mid, n_fft)
        # the responses at the frames, linear between the fine grid's points (0 before the
        # first, held after the last), for every delay: a sparse map from the fine grid to
        # (delay, frame), two weights per row
        n_d, n_t = self.delays.size, t.size
        pos = np.clip(((t - t[0])[None, :] - self.delays[:, None]) / dt, 0.0, n_fine).ravel()
        i0 = np.minimum(pos.astype(np.int64), n_fine - 1)
        frac = pos - i0
        at = np.arange(n_d * n_t)
        sample = sparse.csr_matrix((np.concatenate([1.0 - frac, frac]),
                                    (np.concatenate([at, at]), np.concatenate([i0, i0 + 1]))),
                                   shape=(n_d * n_t, n_fine + 1), dtype=np.float32)
        n_rows = len(self.residues) * len(self.dispersions) * n_mtt
        wt = None if whiten is None else np.asarray(whiten, dtype=np.float32).T
        # (S * H * M * D, T), ordered (shape, dispersion, MTT, delay), filled a shape and a
        # dispersion at a time
        self.responses = np.empty((n_rows * n_d, n_t), dtype=np.float32)
        norm2 = np.empty(n_rows * n_d)
        peaks, curve_peaks, row = [], [], 0
        for name in self.residues:
            x_all = residue(offsets[None, :], self.mtts[:, None], name)  # (M, n_fine)
            r_all = np.fft.rfft(x_all, n_fft, axis=1)
            for disp in self.dispersions:
                r_spec, x = r_all, x_all
                if disp > 0:  # unit-area exponential kernel, exact bin areas
                    edges = np.exp(-np.arange(n_fine + 1) * dt / disp)
                    r_spec = r_all * np.fft.rfft(edges[:-1] - edges[1:], n_fft)
                    x = np.fft.irfft(r_spec, n_fft, axis=1)[:, :n_fine]
                top = x >= (1.0 - PEAK_TOL) * x.max(axis=1, keepdims=True)
                peaks.append(offsets[np.argmax(top, axis=1)] - dt / 2)
                conv = np.fft.irfft(ca_spec * r_spec, n_fft, axis=1)[:, :n_fine]
                curve_peaks.append(offsets[np.argmax(conv, axis=1)])
                resp = np.zeros((n_fine + 1, conv.shape[0]), dtype=np.float32)
                resp[1:] = (conv * (scale * dt)).T  # single precision, as the responses are kept
                piece = np.ascontiguousarray((sample @ resp).T).reshape(-1, n_t)  # (M * D, T)
                stop = row + piece.shape[0]
                if wt is not None:
                    np.matmul(piece, wt, out=self.responses[row:stop])
                else:
                    self.responses[row:stop] = piece
                norm2[row:stop] = np.einsum("kt,kt->k", self.responses[row:stop],
                                            self.responses[row:stop], dtype=np.float64)
                row = stop
        shape_of = np.repeat(np.arange(len(self.residues)), len(self.dispersions) * n_mtt * n_d)
        self.mtt = np.tile(np.repeat(self.mtts, n_d), len(self.residues) * len(self.dispersions))
        self.delay = np.tile(self.delays, n_rows)
        self.cv = np.array([transit_cv(r) for r in self.residues])[shape_of]
        # the convention's Tmax: delay + the first peak of the dispersed residue h * R
        self.tmax = self.delay + np.repeat(np.concatenate(peaks), n_d)
        # TTP from the first frame: the peak of the tissue curve itself (unit flow), delayed
        self.ttp = np.clip(self.delay + np.repeat(np.concatenate(curve_peaks), n_d), 0.0,
                           t[-1] - t[0])
        self.dims = (len(self.residues), len(self.dispersions), n_mtt, n_d)
        # a grid point stands for the cell around it: the variance within a cell of the grid's
        # steps (uniform over the cell: step^2 / 12), in log MTT and in delay
        self.cell_var_log_mtt = math.log(self.mtts[1] / self.mtts[0]) ** 2 / 12 if n_mtt > 1 \
            else 0.0
        self.cell_var_delay = delay_step**2 / 12 if n_d > 1 else 0.0
        flat = np.arange(self.mtt.size).reshape(self.dims)
        # delay-major, (delay, shape, dispersion, MTT): the reductions over delays run over
        # contiguous rows
        self.coarse = flat[:, :, 1::3, ::4].transpose(3, 0, 1, 2).ravel()
        self.coarse_delays = len(range(0, n_d, 4))
        self.coarse_basis = np.ascontiguousarray(self.responses[self.coarse].T)  # (T, Kc)
        # a response that never reaches the frames carries no information: never chosen
        self.usable = norm2 > 1e-9 * norm2.max()
        self.inv_norm2 = np.where(self.usable, 1.0 / np.maximum(norm2, 1e-300), 0.0)
        # single-precision copies for the per-voxel moments
        self.inv_norm2_32 = self.inv_norm2.astype(np.float32)
        self.mtt_32, self.delay_32 = self.mtt.astype(np.float32), self.delay.astype(np.float32)
        self.tmax_32, self.cv_32 = self.tmax.astype(np.float32), self.cv.astype(np.float32)
        self.ttp_32 = self.ttp.astype(np.float32)
        # the points on the first or last MTT or delay: a posterior piled there asks for more
        # than the grid holds
        self.edge_32 = ((self.mtt == self.mtts[0]) | (self.mtt == self.mtts[-1])
                        | (self.delay == self.delays[0])
                        | (self.delay == self.delays[-1])).astype(np.float32)
        self._log_speed: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.mtt.size)

    @property
    def basis(self) -> np.ndarray:
        """(T, K) float32 view of :attr:`responses`: each grid point's unit-flow response."""
        return self.responses.T

    def neighbour_projections(self, seeds: np.ndarray, curves: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Fine-grid points around the coarse points ``seeds`` (n, c) -- MTT +-1 step, delay +-2
        steps, same shape and dispersion -- and their responses' projections on ``curves`` (T, n).
        Each row of ``seeds`` holds at most one delay per shape, dispersion and MTT, repeats
        allowed (as :func:`_candidates` chooses them).

        Returns the points' flat indices (n, 15 c), increasing where not -1: -1 marks points
        beyond the grid's edges and those of a repeated seed; and the projections (n, 15 c)
        float32 in the same order (meaningless where the index is -1). The responses of
        consecutive delays are consecutive rows of :attr:`responses`: each seed's are gathered
        as three windows of five delays, not point by point. The coarse grid's MTTs are three
        steps apart, so two different seeds never share a fine point: repeats come only from
        repeated seeds.
        """
        _, _, n_m, n_d = self.dims
        n, n_t = seeds.shape[0], self.responses.shape[1]
        seeds = np.sort(seeds, axis=1)                      # fine points in increasing order
        repeat = np.zeros(seeds.shape, dtype=bool)
        repeat[:, 1:] = seeds[:, 1:] == seeds[:, :-1]
        row, d = seeds // n_d, seeds % n_d                  # row: (shape, dispersion, MTT)
        step = np.arange(-1, 2)
        m = (row % n_m)[..., None] + step
        ok_m = (m >= 0) & (m < n_m) & ~repeat[..., None]
        rows = np.where(ok_m, row[..., None] + step, row[..., None])          # (n, c, 3)
        width = min(5, n_d)
        start = np.clip(d - 2, 0, n_d - width)              # windows inside the grid
        de = start[..., None] + np.arange(width)                               # (n, c, w)
        ok = ok_m[..., None] & (np.abs(de - d[..., None]) <= 2)[:, :, None, :]
        idx = np.where(ok, rows[..., None] * n_d + de[:, :, None, :], -1).reshape(n, -1)
        resp = self.responses.reshape(-1, n_d, n_t)
        windows = np.lib.stride_tricks.as_strided(
            resp, shape=(resp.shape[0], n_d - width + 1, width, n_t),
            strides=(resp.strides[0], resp.strides[1], resp.strides[1], resp.strides[2]),
            writeable=False)
        ys = np.asarray(curves).T[:, :, None]                                  # (n, T, 1)
        out = np.empty(idx.shape, dtype=np.float32)
        at = start[..., None]
        # two curves at a time: their gathered responses (about 1 MB) stay in cache for the
        # product, several times faster than gathering a whole chunk's first
        for k in range(0, n, 2):
            b = windows[rows[k:k + 2], at[k:k + 2]].reshape(-1, idx.shape[1], n_t)  # (2, F, T)
            out[k:k + 2] = np.matmul(b, ys[k:k + 2])[..., 0]
        return idx, out

    def log_mtt_speed(self) -> np.ndarray:
        """(K,) log of how fast each point's response turns as log MTT changes, its shape,
        dispersion and delay fixed: |d(b / |b|) / d log MTT|, b the (whitened) response, by
        differences between neighbouring MTTs (one-sided at the ends). Where the curves of
        neighbouring MTTs are nearly the same (MTTs much shorter than the bolus) it is small:
        the data cannot tell those MTTs apart. Computed once."""
        if self._log_speed is None:
            n_s, n_h, n_m, n_d = self.dims
            out = np.ones((n_s * n_h, n_m, n_d))  # one MTT: nothing to weigh
            if n_m > 1:
                step = math.log(self.mtts[1] / self.mtts[0])
                resp = self.responses.reshape(n_s * n_h, n_m, n_d, -1)
                for i in range(n_s * n_h):  # a shape and a dispersion at a time: (M, D, T)
                    b = resp[i].astype(np.float64)
                    b /= np.maximum(np.linalg.norm(b, axis=2, keepdims=True), 1e-300)
                    fwd = np.linalg.norm(np.diff(b, axis=0), axis=2) / step   # (M - 1, D)
                    out[i, 0], out[i, -1] = fwd[0], fwd[-1]
                    out[i, 1:-1] = 0.5 * (fwd[1:] + fwd[:-1])
            self._log_speed = np.log(np.maximum(out, 1e-6)).ravel()
        return self._log_speed

    def log_prior(self, mtt_median: float, mtt_log_sd: float,
                  dispersion_mean: float | None = None, *, jeffreys: bool = True
                  ) -> np.ndarray:
        """(K,) log prior: log-normal on MTT, uniform on delay and shape; on the dispersion a
        density proportional to 1 / (tau + :data:`DISPERSION_SCALE`) (uniform in
        log(tau + scale): flat well below the scale, scale-free above it), or exponential with
        mean ``dispersion_mean`` s; -inf where a grid point is unusable.

        ``jeffreys``: given the shape, dispersion and delay, the log-normal on MTT is weighed by
        the Jeffreys density of log MTT (:meth:`log_mtt_speed`) and normalised again, so each
        shape, dispersion and delay keeps its prior mass. The log-normal alone gives every step
        of log MTT the same mass, also below the bolus's width where all MTTs give nearly the
        same curve: there the posterior keeps a plateau of mass that pulls its mean towards
        short MTTs and high CBF (docs/bayes.md, "MTTs the data cannot tell apart").

        Each dispersion of the grid carries its prior's mass over its cell (edges halfway to its
        neighbours; the last cell as wide above its point as below), so that the prior does not
        depend on how densely the grid samples the dispersion.
        """
        z = (np.log(self.mtt) - math.log(mtt_median)) / mtt_log_sd
        taus = np.array(self.dispersions)
        order = np.argsort(taus)
        srt = taus[order]
        mid = (srt[1:] + srt[:-1]) / 2
        lo = np.r_[srt[0], mid]
        hi = np.r_[mid, srt[-1] + (srt[-1] - mid[-1] if mid.size else 1.0)]
        if dispersion_mean is None:
            mass = np.log((hi + DISPERSION_SCALE) / (lo + DISPERSION_SCALE))
        else:
            mass = np.exp(-lo / dispersion_mean) - np.exp(-hi / dispersion_mean)
        log_mass = np.empty_like(mass)
        log_mass[order] = np.log(np.maximum(mass, 1e-300))
        per_point = np.repeat(log_mass, self.dims[2] * self.dims[3])
        lp = np.where(self.usable, -0.5 * z**2 + np.tile(per_point, self.dims[0]), -np.inf)
        if jeffreys:
            lp4 = lp.reshape(self.dims)
            weighed = lp4 + self.log_mtt_speed().reshape(self.dims)
            with np.errstate(invalid="ignore"):  # columns without a usable point
                lp4 = weighed - special.logsumexp(weighed, axis=2, keepdims=True) \
                    + special.logsumexp(lp4, axis=2, keepdims=True)
            lp = np.where(self.usable, lp4.ravel(), -np.inf)
        return lp.astype(np.float32)
