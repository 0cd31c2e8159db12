"""Bayesian perfusion estimation on a grid of residue functions, with per-voxel uncertainty.

The tissue curve of a voxel is modelled as

    C(t) = (rho / kH) * (CBF / 6000) * integral Ca(s - delay) R(t - s) ds + noise

with R from a family of residue shapes that spans the box (Bennink's model), gamma-distributed
transit times (Mouridsen et al., NeuroImage 33:570, 2006, doi:10.1016/j.neuroimage.2006.06.015;
shape 1 is the exponential residue) and the linear residue, seen through an exponential transport
kernel h of mean 0-3 s (the dispersion between the artery of the AIF and the tissue, Calamante
et al., Magn. Reson. Med. 44:466, 2000): the curve is C = CBF x Ca * (h * R). The posterior of
(CBF, MTT, delay, shape, dispersion) is evaluated on a grid of all but CBF; CBF, the one linear
parameter, is solved in closed form at every grid point (Gaussian noise, CBF >= 0, flat prior on
CBF), so the likelihood of every grid point for a whole block of voxels is one matrix product
with the grid's unit-flow responses.

Spatial prior (``spatial=True``, used when the voxels' positions are known): hierarchical
estimation in the spirit of Boutelier et al. (IEEE TMI 31:1381, 2012,
doi:10.1109/TMI.2012.2189890) and of the spatial priors compared by Kudo et al. (Radiology
267:201, 2013). Each voxel's prior over (shape, MTT, delay) is the posterior of the Gaussian
average of its in-plane neighbourhood's curves, which carries the neighbourhood's evidence at
its reduced noise; the voxel's own curve then weighs the neighbourhood's most probable grid
points, and its own amplitude gives CBV. Low-CNR voxels so take their timing from their
surroundings instead of fitting the noise, while well-measured voxels follow their own data.
Without positions the prior is a broad log-normal on MTT and uniform on delay and shape. The
log-normal is weighed by the Jeffreys density of log MTT given the shape, dispersion and delay
(:meth:`ResidueGrid.log_prior`): MTTs much shorter than the bolus give nearly the same curve,
and without the factor they gather prior mass that pulls MTT short and CBF high.

Amplitude pooling (``pool_amplitude=True``, with the spatial prior): each voxel's CBV, still the
amplitude of its own noisy curve, is then pooled with its neighbours' by empirical Bayes
(:func:`pool_amplitudes`), over a neighbourhood guided by the study's temporal mean image
(:class:`Neighbourhood`), so that tissues of different temporal mean are not pooled together.

Maps: CBV and MTT are posterior means over the prior's most probable grid points; CBF = 60 CBV /
MTT keeps the central identity and avoids the upward bias that the posterior mean of CBV / MTT
has when MTT is uncertain. Uncertainty maps are the root-mean-square errors of the maps under
the whole posterior, from grid points drawn from the prior (systematic resampling) and weighted
by the voxel's likelihood, plus the variance within a grid cell. Curves whose baseline mean was
subtracted are whitened first (:func:`baseline_whitening`): that mean's error is common to every
later frame. Tmax follows the project's convention exactly: at every grid point it is the delay
plus the first time the dispersed residue h * R peaks; the map is its posterior median, which
noise pulls less towards the prior's bulk than the mean (shape, dispersion and MTT move Tmax
in steps, and its posterior is often skewed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
from scipy import ndimage, sparse, special

from ctperf.errors import ValidationError
from ctperf.parallel import map_chunks
from ctperf.perfusion.curves import flow_scale

__all__ = ["DISPERSIONS", "RESIDUES", "BayesFit", "ResidueGrid", "baseline_whitening", "fit_bayes",
           "learn_shape_weights", "residue", "transit_cv"]

log = logging.getLogger(__name__)

#: Residue shapes of the grid: ``box``, ``gamma:k`` (gamma transit times of shape k; k = 1 the
#: exponential) and ``power:p`` (R = (1 - t / L)^p on [0, L); p = 1 the linear residue).
RESIDUES: tuple[str, ...] = ("box", "gamma:4", "gamma:3", "gamma:2", "gamma:1", "power:1")

#: Mean times (s) of the exponential transport kernel h between the AIF's artery and the tissue
#: on the grid (0: none).
DISPERSIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.5, 3.0)

#: Delays of the grid, s (``ResidueGrid``'s default): from tissue 3 s ahead of the AIF's artery
#: to 12 s behind it.
DELAY_RANGE: tuple[float, float] = (-3.0, 12.0)

#: Most weights (non-zero pairs of voxels or blocks) the guided neighbourhood holds: 16 M,
#: about 200 MB with its construction (``Neighbourhood``, blocks grow until it fits)
MAX_WEIGHTS = 1 << 24

#: ``fit_bayes`` extends the delays by this many seconds at a time (up to the acquisition's end)
#: when at least :data:`LATE_BLOCKS` blocks, and :data:`LATE_FRACTION` of them, sit at the last.
DELAY_EXTENSION = 8.0
LATE_BLOCKS = 3
LATE_FRACTION = 0.002

#: Scale (s) of the prior on the dispersion, density proportional to 1 / (tau + scale): close
#: to log-uniform (no preferred dispersion) from a few tenths of a second up, finite at 0.
DISPERSION_SCALE = 0.1

#: ``fit_bayes`` leaves the vessels out of its neighbourhoods' averages only while they are at
#: most this fraction of the voxels: a mask that covers more (an AIF whose peak is too low to
#: tell vessels from tissue) would leave the prior to a few voxels.
MAX_VESSEL_FRACTION = 0.2

#: Smallest noise SD a curve is given, as a fraction of the arterial curve's peak (a noise-free
#: curve's estimate is 0): tiny, and in the curves' own units (HU, concentration or any scale).
NOISE_FLOOR = 1e-6

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


@dataclass(frozen=True)
class BayesFit:
    """Posterior estimates per voxel, ndarrays of shape (N,), float32.

    ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt`` s, ``delay`` s, ``tmax`` s, ``ttp`` s
    (the time to peak of the fitted tissue curve, from the first frame),
    ``transit_cv`` the coefficient of variation of the transit times (0 box, 1 exponential),
    ``residual`` root-mean-square misfit of the most probable grid point, HU; ``noise`` the noise
    SD used, HU; ``*_sd`` the maps' root-mean-square errors under the posterior (its standard
    deviations where its means are the maps), in the units of the map. ``shape_weights``: the
    residue shapes' prior probabilities when they were learned from the study;
    ``delay_range``: the grid's first and last delay, s (wider than :data:`DELAY_RANGE` where
    the study's tissue arrived later).
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    delay: np.ndarray
    tmax: np.ndarray
    ttp: np.ndarray
    transit_cv: np.ndarray
    residual: np.ndarray
    noise: np.ndarray
    cbf_sd: np.ndarray
    cbv_sd: np.ndarray
    mtt_sd: np.ndarray
    tmax_sd: np.ndarray
    shape_weights: dict[str, float] | None = None
    delay_range: tuple[float, float] = DELAY_RANGE


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


def noise_variance(curves: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Noise variance of each curve (T, N) from its second differences, robust to the bolus:
    for white noise var(x[i-1] - 2 x[i] + x[i+1]) = 6 sigma^2; the median absolute value
    ignores the few frames where the curve itself bends. Returns (N,) float64, HU^2. Chunks of
    curves run in ``workers`` threads (default one per CPU)."""
    out = np.empty(curves.shape[1])

    def run(s: int, e: int) -> None:
        x = curves[:, s:e]
        d2 = np.abs(x[:-2] - 2.0 * x[1:-1] + x[2:])
        # each curve's differences contiguous: the median's partition runs along rows
        out[s:e] = np.median(np.ascontiguousarray(d2.T), axis=1)

    map_chunks(run, curves.shape[1], chunk=32768, workers=workers)
    return (1.4826 * out) ** 2 / 6.0


def baseline_whitening(n_frames: int, baseline_frames: int) -> np.ndarray:
    """Map that makes the noise of baseline-subtracted curves white again, (T, T) float64.

    A curve whose first ``baseline_frames`` frames' mean was subtracted carries that mean's
    error, common to every later frame: with frame noise of variance s^2, the later frames have
    covariance s^2 (I + 1 1^T / n_b), the baseline frames s^2 (I - 1 1^T / n_b) (they sum to
    zero), and the two groups are uncorrelated. The map returned first subtracts the baseline
    frames' mean (as was done to the data, so that model curves can be compared with it), then
    whitens each group: I - u u^T on the baseline frames (the pseudo-inverse square root of the
    projector), I - beta u u^T with beta = 1 - 1 / sqrt(1 + T_after / n_b) on the later frames
    (u the unit vector of equal weights on the group). After it the noise is white with
    variance s^2 on T - 1 degrees of freedom.

    Parameters
    ----------
    n_frames : int
        T, the number of frames.
    baseline_frames : int
        n_b, the leading frames whose mean was subtracted (1 <= n_b < T).
    """
    n_t, n_b = int(n_frames), int(baseline_frames)
    if not 1 <= n_b < n_t:
        raise ValidationError(f"baseline_frames must be in 1..{n_t - 1}, got {n_b}")
    sub = np.eye(n_t)
    sub[:, :n_b] -= 1.0 / n_b                       # minus the baseline frames' mean
    white = np.eye(n_t)
    white[:n_b, :n_b] -= 1.0 / n_b
    n_a = n_t - n_b
    beta = 1.0 - 1.0 / math.sqrt(1.0 + n_a / n_b)
    white[n_b:, n_b:] -= beta / n_a
    return white @ sub


def _log_posterior(g: np.ndarray, inv_norm2: np.ndarray, precision: np.ndarray,
                   log_prior: np.ndarray) -> np.ndarray:
    """Log posterior (up to a constant per curve) from projections g (n, k) = <b, y>: the SSE
    reduction g^2 / |b|^2 of the best CBF >= 0, over twice the noise variance, plus the prior."""
    np.maximum(g, 0.0, out=g)
    g *= g
    g *= 0.5 * inv_norm2
    g *= precision[:, None]
    g += log_prior
    return g


def _coarse_log_posterior(curves: np.ndarray, precision: np.ndarray, grid: ResidueGrid,
                          log_prior: np.ndarray) -> np.ndarray:
    """Log posterior (n, Kc) float32 of curves (T, n) on the coarse grid (:func:`_log_posterior`),
    in the order of ``grid.coarse`` (delay-major);
    ``precision`` (n,) = 1 / their noise variance."""
    g = np.asarray(curves).T @ grid.coarse_basis
    return _log_posterior(g, grid.inv_norm2[grid.coarse].astype(np.float32),
                          np.asarray(precision).astype(np.float32), log_prior[grid.coarse])


def _top(lp: np.ndarray, idx: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` largest of each row of lp (n, k) with their grid indices idx (n, k)."""
    pick = np.argpartition(lp, lp.shape[1] - keep, axis=1)[:, -keep:]
    return (np.take_along_axis(idx, pick, axis=1).astype(np.int32),
            np.take_along_axis(lp, pick, axis=1))


def _resample(lp: np.ndarray, draws: int) -> np.ndarray:
    """Systematic resampling: ``draws`` column positions per row, drawn from the distribution
    exp(lp) (n, k) at the evenly spaced quantiles (j + 1/2) / draws, so that a point of
    probability p is drawn about p x draws times (deterministic). Returns (n, draws) int64;
    a position may appear several times."""
    cdf = np.exp(lp - lp.max(axis=1, keepdims=True), dtype=np.float32)
    np.cumsum(cdf, axis=1, out=cdf)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0                                        # never past the row's end
    rows = np.arange(lp.shape[0])[:, None]
    # rows side by side: one search for all (single precision: a draw is 1 / draws of the mass)
    cdf += rows.astype(np.float32)
    flat = cdf.ravel()
    u = (np.arange(draws) + 0.5) / draws
    pos = np.searchsorted(flat, (u[None, :] + rows).ravel()).reshape(-1, draws)
    pos -= rows * lp.shape[1]
    return np.minimum(pos, lp.shape[1] - 1)


def _candidates(curves: np.ndarray, precision: np.ndarray, grid: ResidueGrid,
                log_prior: np.ndarray, keep: int, draws: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``keep`` most probable grid points of each curve, and ``draws`` points drawn from its
    posterior, with their normalised log posterior.

    Coarse to fine: the posterior on the coarse grid (every third MTT, every fourth delay),
    each (shape, dispersion, MTT) of it at its most probable delay and with the mass of all its
    delays; then the posterior on the fine grid around the most probable of these and around as
    many drawn by mass (so that the fine points cover where the mass lies, not only its mode).
    ``curves`` (T, n) float32, ``precision`` (n,) = 1 / noise variance of the curves.
    Returns indices (n, keep) int32, their log posterior (n, keep) float32, then the same for
    the draws (n, draws); a drawn point may appear several times.
    """
    prec = precision.astype(np.float32)
    coarse = grid.coarse
    lp = _coarse_log_posterior(curves, prec, grid, log_prior)
    lp = lp.reshape(lp.shape[0], grid.coarse_delays, -1)                    # (n, Dc, G)
    peak = lp.max(axis=1)                                                   # (n, G)
    best = (lp == peak[:, None, :]).argmax(axis=1)          # the first delay at the peak
    # log of the summed mass over delays, in place (lp is not needed afterwards)
    shift = np.where(np.isfinite(peak), peak, 0.0)
    lp -= shift[:, None, :]
    mass = np.log(np.exp(lp, out=lp).sum(axis=1)) + shift
    point = coarse.reshape(grid.coarse_delays, -1)[best, np.arange(peak.shape[1])]  # (n, G)
    n_seed = min(max(keep // 2, 1), peak.shape[1])
    seeds, _ = _top(peak, point, n_seed)
    seeds = np.concatenate([seeds, np.take_along_axis(point, _resample(mass, n_seed), axis=1)],
                           axis=1)
    fine, g = grid.neighbour_projections(seeds, curves)                     # (n, F), -1 unused
    safe = np.maximum(fine, 0)
    lp = _log_posterior(g, grid.inv_norm2[safe].astype(np.float32), prec, log_prior[safe])
    lp[fine < 0] = -np.inf
    lp -= lp.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    idx, top = _top(lp, safe, min(keep, fine.shape[1]))
    pick = _resample(lp, draws)
    return (idx, top, np.take_along_axis(safe, pick, axis=1).astype(np.int32),
            np.take_along_axis(lp, pick, axis=1))


def learn_shape_weights(curves: np.ndarray, precision: np.ndarray, grid: ResidueGrid,
                        log_prior: np.ndarray, *, pseudo: float = 50.0, sample: int = 4096,
                        chunk: int = 512, iterations: int = 500) -> np.ndarray:
    """The study's own prior over the grid's residue shapes (empirical Bayes): the factor (S,)
    float64 by which it multiplies ``log_prior``'s mass of each shape.

    A residue shape is a property of the vascular bed rather than of one voxel, and within one
    curve's noise several shapes fit about equally (a box of one MTT and a dispersed gamma of a
    shorter one), so a prior that weighs the grid's shapes alike lets noise and the grid's
    choice of shapes set CBF. Here the shapes' probabilities are those of a mixture fitted to
    the curves (T, n) by expectation-maximisation: a curve's evidence for a shape is its
    likelihood under the given prior within that shape (summed over the coarse grid's
    dispersions, MTTs and delays); the probabilities maximise the curves' joint marginal
    likelihood, with ``pseudo`` curves' worth of the given prior (a Dirichlet prior) so that a
    few curves do not decide and no shape is ruled out. At most ``sample`` curves, evenly
    spaced, are used. ``precision`` (n,) is 1 / the curves' noise variance.
    """
    n_shapes = grid.dims[0]
    n = curves.shape[1]
    if n == 0 or n_shapes < 2:
        return np.ones(n_shapes)
    cols = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64))
    evidence = []
    for s in range(0, cols.size, chunk):
        c = cols[s:s + chunk]
        lp = _coarse_log_posterior(curves[:, c], precision[c], grid, log_prior)
        lp = lp.reshape(c.size, grid.coarse_delays, n_shapes, -1)
        top = lp.max(axis=(1, 3), keepdims=True)
        top[~np.isfinite(top)] = 0.0
        lp -= top
        evidence.append(np.log(np.exp(lp, out=lp).sum(axis=(1, 3), dtype=np.float64))
                        + top[:, 0, :, 0])
    # each shape's prior mass: the evidence given the shape is normalised within it
    mass = special.logsumexp(log_prior[grid.coarse].reshape(grid.coarse_delays, n_shapes, -1)
                             .astype(np.float64), axis=(0, 2))
    ok = np.isfinite(mass)
    ev = np.where(ok, np.concatenate(evidence).astype(np.float64) - mass, -np.inf)
    like = np.exp(ev - ev.max(axis=1, keepdims=True))
    base = np.exp(mass - special.logsumexp(mass))
    w = base.copy()
    for _ in range(iterations):
        resp = like * w
        resp /= resp.sum(axis=1, keepdims=True)
        new = (resp.sum(axis=0) + pseudo * base) / (cols.size + pseudo)
        done = np.abs(new - w).max() < 1e-6
        w = new
        if done:
            break
    return np.where(ok, w / np.where(ok, base, 1.0), 1.0)


def shape_weights(grid: ResidueGrid, log_prior: np.ndarray) -> dict[str, float]:
    """Prior probability of each residue shape of the grid under ``log_prior`` (K,)."""
    per = special.logsumexp(log_prior.reshape(grid.dims[0], -1).astype(np.float64), axis=1)
    p = np.exp(per - special.logsumexp(per))
    return {name: float(x) for name, x in zip(grid.residues, p, strict=True)}


def _weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Median of each row of x (n, m), each in increasing order, under the row's weights w
    (n, m), which sum to 1: the first value at which the cumulative weight reaches one half."""
    k = np.minimum((w.cumsum(axis=1) < 0.5).sum(axis=1), x.shape[1] - 1)
    return x[np.arange(x.shape[0]), k]


#: Columns of :func:`_moments`.
_COLUMNS = ("cbf", "cbv", "mtt", "delay", "tmax", "cv", "sse_min", "noise_var",
            "cbf_sd", "cbv_sd", "mtt_sd", "tmax_sd", "cbf_noise_var", "cbv_noise_var",
            "inv_mtt_rel", "ttp")


def _moments(g: np.ndarray, yy: np.ndarray, noise_var: np.ndarray, cand: np.ndarray,
             cand_lp: np.ndarray, block: np.ndarray, grid: ResidueGrid, keep: int
             ) -> np.ndarray:
    """Estimates and their posterior root-mean-square errors for a set of voxels.

    ``g`` (n, M) projections <b_k, y> of each voxel's curve on its candidates, which are its
    block's: ``cand`` (B, M) grid indices and ``cand_lp`` (B, M) log prior per block,
    ``block`` (n,) each voxel's row of them; ``yy`` (n,) the curves' squared norms. The first
    ``keep`` candidates are the prior's most probable points, in increasing Tmax: the estimates
    are posterior means over them (Tmax its posterior median). The others are draws from the
    prior (each carrying equal mass): their posterior weights represent the whole posterior,
    and give each estimate's root-mean-square deviation from the truth under it,
    sqrt(E[(x - estimate)^2]) (the posterior SD when the two means agree).
    Returns (n, 16) float64 in the order of :data:`_COLUMNS`; CBF is 60 CBV / MTT. Columns
    12 and 13 are the parts of CBF's and CBV's variances that the voxel's own noise makes at
    a given grid point (the amplitude's), averaged over the estimates' points; column 14 is
    CBF's relative root-mean-square error from MTT's posterior alone (CBV given), over the
    draws; the last the posterior mean of the fitted curve's time to peak.
    """
    np.maximum(g, 0.0, out=g)                               # CBF >= 0

    def at(table: np.ndarray) -> np.ndarray:
        """(n, M) values of a per-grid-point table at each voxel's candidates: looked up
        once per block, then copied row by row to its voxels."""
        return table[cand][block]

    inv_nb = at(grid.inv_norm2_32)
    log_prior = cand_lp[block]
    explained = g * g * inv_nb
    lp = explained * (0.5 / noise_var).astype(np.float32)[:, None] + log_prior
    a = g * inv_nb                                          # CBF at each candidate
    out = np.empty((g.shape[0], len(_COLUMNS)), dtype=np.float64)
    out[:, 6] = np.maximum(yy - explained.max(axis=1), 0.0)
    out[:, 7] = noise_var
    noise32 = noise_var[:, None].astype(np.float32)

    def weights(part: slice) -> np.ndarray:
        wp = np.exp(lp[:, part] - lp[:, part].max(axis=1, keepdims=True))
        return wp / wp.sum(axis=1, keepdims=True)

    def mean(w: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.einsum("nm,nm->n", w, x, dtype=np.float64)

    # the estimates, over the most probable points
    top = slice(0, keep)
    w = weights(top)
    mtt_all, tmax_all = at(grid.mtt_32), at(grid.tmax_32)
    mtt = mtt_all[:, top]
    est = {"cbv": mean(w, a[:, top] * mtt) / 60.0, "mtt": mean(w, mtt),
           "delay": mean(w, at(grid.delay_32)[:, top]),
           "tmax": _weighted_median(tmax_all[:, top], w)}
    est["cbf"] = est["cbv"] / np.maximum(est["mtt"], 1e-6) * 60.0
    out[:, 0], out[:, 1], out[:, 2] = est["cbf"], est["cbv"], est["mtt"]
    out[:, 3], out[:, 4] = est["delay"], est["tmax"]
    out[:, 5] = mean(w, at(grid.cv_32)[:, top])
    out[:, 15] = mean(w, at(grid.ttp_32)[:, top])
    amp_var = noise32 * inv_nb[:, top]
    out[:, 12] = mean(w, amp_var)
    out[:, 13] = mean(w, amp_var * (mtt / 60.0) ** 2)
    # their root-mean-square errors, over the draws: E[(x - e)^2] = E[x^2] - 2 e E[x] + e^2;
    # CBF (a) and CBV (a m) add their variance given the grid point
    drawn = slice(keep, None)
    w = weights(drawn)
    a_d, var_d = a[:, drawn], noise32 * inv_nb[:, drawn]
    m_d = mtt_all[:, drawn] / 60.0
    av = a_d * m_d
    for j, (name, x, var) in enumerate((("cbf", a_d, var_d), ("cbv", av, var_d * m_d * m_d),
                                        ("mtt", m_d * 60.0, None),
                                        ("tmax", tmax_all[:, drawn], None))):
        e = est[name]
        second = x * x if var is None else x * x + var
        msd = mean(w, second) - 2.0 * e * mean(w, x) + e * e
        # plus the variance within the grid's cells: MTT's relative (CBF's through 1 / MTT),
        # the delay's for Tmax; CBV's amplitude is not on the grid
        cell = {"cbf": e * e * grid.cell_var_log_mtt, "cbv": 0.0,
                "mtt": e * e * grid.cell_var_log_mtt, "tmax": grid.cell_var_delay}[name]
        out[:, 8 + j] = np.sqrt(np.maximum(msd, 0.0) + cell)
    # CBF's relative error at a drawn MTT, CBV given: MTT_estimate / MTT - 1, exact where a
    # linearised (MTT - MTT_estimate) / MTT_estimate understates it towards short MTTs
    ratio = est["mtt"][:, None] / np.maximum(mtt_all[:, drawn], 1e-6) - 1.0
    out[:, 14] = np.sqrt(mean(w, ratio * ratio) + grid.cell_var_log_mtt)
    return out


def pool_curves(tissue: np.ndarray, mask: np.ndarray, sigma_vox: tuple[float, float],
                cells_per_sigma: float = 2.2, weights: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-plane Gaussian average of each voxel's neighbourhood's curves, within ``mask``.

    Where the Gaussian spans many voxels (fine in-plane sampling) the average is taken on
    cells of f x f voxels, f = floor(SD / ``cells_per_sigma``), as a bilateral grid does: the
    cells' sums go through a Gaussian of SD / f, normalised by their voxel counts, and every
    voxel reads its cell's curve. This adds a box of f voxels to the kernel (variance
    (f^2 - 1) / 12, under 2 % of the Gaussian's) and divides the work by f^2; f = 1 is the
    Gaussian at the voxels themselves.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Curves of the N voxels of ``mask`` (C order).
    mask : ndarray of bool, shape (Z, Y, X)
    sigma_vox : (float, float)
        Gaussian SD along y and x, voxels.
    cells_per_sigma : float
        Cells per SD at least.
    weights : ndarray, shape (N,), optional
        Each voxel's weight in the averages (default 1; 0 leaves a voxel out of them, though it
        still reads its cell's average).

    Returns
    -------
    pooled : ndarray, float32, shape (T, L)
        The average curve of each of the L cells that hold mask voxels.
    gain : ndarray, float64, shape (N,)
        Factor by which the averaging divides white noise's variance (the effective number of
        voxels averaged, at least 1).
    cell : ndarray, int64, shape (N,)
        Each voxel's cell, a column of ``pooled``.
    """
    sig = (0.0, float(sigma_vox[0]), float(sigma_vox[1]))
    w = np.ones(int(mask.sum()), dtype=np.float32) if weights is None else \
        np.asarray(weights, dtype=np.float32)
    inside = np.zeros(mask.shape, dtype=np.float32)
    inside[mask] = w
    weight = ndimage.gaussian_filter(inside, sig, mode="constant")[mask]
    # sum of squared weights: a squared Gaussian is a Gaussian of SD sigma / sqrt(2), scaled
    inside[mask] = w * w
    sq = ndimage.gaussian_filter(inside, tuple(v / math.sqrt(2.0) for v in sig),
                                 mode="constant")[mask]
    sq /= 4.0 * math.pi * max(sig[1], 0.5) * max(sig[2], 0.5)
    gain = weight.astype(np.float64) ** 2 / np.maximum(sq, 1e-12)
    f = max(1, int(min(sig[1], sig[2]) // cells_per_sigma))
    flat, shape = _cells(mask, f)
    used, cell = np.unique(flat, return_inverse=True)
    n_cells = int(np.prod(shape))
    counts = np.bincount(flat, weights=w, minlength=n_cells).astype(np.float32).reshape(shape)
    low_sig = (0.0, sig[1] / f, sig[2] / f)
    norm = np.maximum(ndimage.gaussian_filter(counts, low_sig, mode="constant").ravel()[used],
                      1e-6)
    pooled = np.empty((tissue.shape[0], used.size), dtype=np.float32)
    for i in range(tissue.shape[0]):  # one image per frame
        sums = np.bincount(flat, weights=tissue[i] * w, minlength=n_cells).astype(np.float32)
        pooled[i] = ndimage.gaussian_filter(sums.reshape(shape), low_sig,
                                            mode="constant").ravel()[used] / norm
    return pooled, np.maximum(gain, 1.0), cell.astype(np.int64)


class Neighbourhood:
    """In-plane Gaussian mean of each mask voxel's neighbours' values, within a mask.

    With a ``guide`` (Z, Y, X), the mean is a joint bilateral one: a neighbour's weight also
    falls as a Gaussian of width ``guide_sigma`` of the difference between its guide value and
    the voxel's, so that tissues the guide tells apart (grey and white matter in the temporal
    mean image) are not averaged together. Its weights are a sparse matrix between the mask's
    voxels (or in-plane blocks of them), built once, on first use, for all slices.

    Parameters
    ----------
    mask : ndarray of bool, shape (Z, Y, X)
    sigma_mm : float
        Gaussian SD in plane, mm.
    spacing : (dz, dy, dx)
        Voxel size, mm.
    guide : ndarray, shape (Z, Y, X), optional
    guide_sigma : float
        Range width of the guide, in its units.
    """

    def __init__(self, mask: np.ndarray, sigma_mm: float, spacing: tuple[float, float, float],
                 guide: np.ndarray | None = None, guide_sigma: float = 1.0) -> None:
        self.mask, self.sigma_mm, self.spacing = mask, float(sigma_mm), spacing
        self.guide, self.guide_sigma = guide, float(guide_sigma)
        self._weights: sparse.csr_matrix | None = None
        self._f = 1

    def _offsets(self, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """In-plane offsets (dy, dx) in blocks of f x f voxels within 3.5 SD of the centre,
        and their Gaussian weights' logs."""
        sy, sx = self.sigma_mm / (self.spacing[1] * f), self.sigma_mm / (self.spacing[2] * f)
        ry, rx = int(3.5 * sy), int(3.5 * sx)
        dy, dx = (a.ravel() for a in np.mgrid[-ry:ry + 1, -rx:rx + 1])
        log_w = -0.5 * ((dy / sy) ** 2 + (dx / sx) ** 2)
        inside = log_w >= -0.5 * 3.5**2
        return dy[inside], dx[inside], log_w[inside].astype(np.float32)

    def _block_sums(self, v: np.ndarray, f: int) -> np.ndarray:
        """(..., Z, Y, X) -> sums over in-plane blocks of f x f voxels (zero-padded)."""
        if f == 1:
            return v
        ny, nx = v.shape[-2:]
        py, px = -ny % f, -nx % f
        v = np.pad(v, [(0, 0)] * (v.ndim - 2) + [(0, py), (0, px)])
        return v.reshape(*v.shape[:-2], (ny + py) // f, f, (nx + px) // f, f).sum(axis=(-3, -1))

    def _operator(self) -> sparse.csr_matrix:
        """The joint bilateral weights between the occupied blocks (C order), built once:
        in plane, a Gaussian of the distance (cut at 3.5 SD) times a Gaussian of the blocks'
        guide difference (cut at 4 range SDs). Blocks of f x f voxels, f the smallest that
        keeps the SD within two blocks and the weights under :data:`MAX_WEIGHTS`."""
        if self._weights is not None:
            return self._weights
        sd = min(self.sigma_mm / self.spacing[1], self.sigma_mm / self.spacing[2])
        f = max(1, math.ceil(sd / 2.0))
        while True:
            count = self._block_sums(self.mask.astype(np.float32), f)
            dy, dx, log_w = self._offsets(f)
            if int((count > 0).sum()) * dy.size <= MAX_WEIGHTS or f >= sd:
                break
            f += 1
        guide = np.where(self.mask, np.asarray(self.guide, dtype=np.float32), np.float32(0.0))
        occupied = count > 0
        g = (self._block_sums(guide, f) / np.maximum(count, 1e-6)).astype(np.float32)
        zz, yy, xx = np.nonzero(occupied)
        ry, rx = int(np.abs(dy).max()), int(np.abs(dx).max())
        index = np.full(occupied.shape, -1, dtype=np.int32)
        index[occupied] = np.arange(zz.size, dtype=np.int32)
        index = np.pad(index, ((0, 0), (ry, ry), (rx, rx)), constant_values=-1)
        g_pad = np.pad(g, ((0, 0), (ry, ry), (rx, rx)))
        own, scale = g[occupied], np.float32(1.0 / self.guide_sigma)
        rows, cols, weights = [], [], []
        for oy, ox, lw in zip(dy, dx, log_w, strict=True):
            y, x = yy + ry + oy, xx + rx + ox
            d = (g_pad[zz, y, x] - own) * scale
            col = index[zz, y, x]
            keep = np.flatnonzero((col >= 0) & (np.abs(d) <= 4.0))
            rows.append(keep.astype(np.int32))
            cols.append(col[keep])
            weights.append(np.exp(np.float32(-0.5) * d[keep] ** 2 + lw))
        self._weights = sparse.coo_matrix(
            (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
            shape=(zz.size, zz.size)).tocsr()
        self._f = f
        return self._weights

    def _bilateral(self, stack: np.ndarray) -> np.ndarray:
        """Joint bilateral sums of (B, Z, Y, X) volumes, the last one the voxels' weights: on
        in-plane blocks of f x f voxels where the SD spans more than two voxels (their sums, and
        the guide's mean over their mask voxels), which every voxel then reads."""
        weights = self._operator()
        f = self._f
        low = self._block_sums(stack, f)
        occupied = self._block_sums(self.mask.astype(np.float32), f) > 0
        out = np.zeros_like(low)
        out[:, occupied] = (weights @ np.ascontiguousarray(low[:, occupied].T)).T
        if f > 1:
            ny, nx = self.mask.shape[1:]
            out = np.repeat(np.repeat(out, f, axis=-2), f, axis=-1)[..., :ny, :nx]
        return out

    def voxels(self) -> np.ndarray:
        """(N,) how many mask voxels each voxel's plain Gaussian neighbourhood holds, each
        counted by its weight relative to the centre's (1 for a voxel alone)."""
        sy, sx = self.sigma_mm / self.spacing[1], self.sigma_mm / self.spacing[2]
        inside = ndimage.gaussian_filter(self.mask.astype(np.float64), (0.0, sy, sx),
                                         mode="constant")[self.mask]
        centre = ndimage.gaussian_filter(np.pad([[[1.0]]], ((0, 0), (8, 8), (8, 8))),
                                         (0.0, sy, sx), mode="constant")[0, 8, 8]
        return inside / centre

    def mean(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(B, N) values of the N mask voxels (C order) -> their neighbourhood means, float64;
        ``weights`` (N,): each voxel's weight in them (default 1)."""
        mask = self.mask
        vals = np.asarray(values, dtype=np.float32)
        stack = np.zeros((vals.shape[0] + 1, *mask.shape), dtype=np.float32)
        if weights is None:
            stack[:-1, mask] = vals
            stack[-1] = mask
        else:
            w = np.asarray(weights, dtype=np.float32)
            stack[:-1, mask] = vals * w
            stack[-1][mask] = w
        if self.guide is None:
            sig = (0.0, self.sigma_mm / self.spacing[1], self.sigma_mm / self.spacing[2])
            smooth = np.stack([ndimage.gaussian_filter(v, sig, mode="constant") for v in stack])
        else:
            smooth = self._bilateral(stack)
        weight = np.maximum(smooth[-1][mask].astype(np.float64), 1e-6)
        return smooth[:-1][:, mask].astype(np.float64) / weight


def pool_amplitudes(cbv: np.ndarray, cbv_var: np.ndarray, noise_var: np.ndarray,
                    neighbourhood: Neighbourhood, *, probes: int = 4
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical-Bayes pooling of each voxel's CBV with its neighbours' (the amplitude part).

    A voxel's CBV estimate x is its true CBV plus an error of two parts: the amplitude's, from
    its own noise at a given timing (variance v = ``noise_var``, independent between voxels),
    and the timing's (the rest of ``cbv_var``), which neighbours share because their timing
    comes from the same neighbourhood posterior. The true CBVs around a voxel are taken as
    drawn about their local mean m (the neighbours' mean, the voxel itself left out) with a
    variance tau^2. The voxel's amplitude is then the normal posterior mean m + B (x - m), B =
    tau^2 / (tau^2 + v) (James & Stein; Efron & Morris, JASA 70:311, 1975): a well-measured
    voxel keeps its value, a noisy one moves towards its neighbourhood. The amplitude part of
    its variance becomes B v, plus the local mean's own variance weighted by (1 - B)^2; the
    timing part is kept.

    tau^2 of a neighbourhood is the variance of its x, corrected for the voxel's own weight in
    it, less its mean v: a small difference of two noisy terms, so it is averaged twice more
    over the neighbourhood. Where the spread is much smaller than v it stays uncertain, and
    the SDs are then somewhat too small or too large over whole regions. The weights'
    effective number n (1 / the sum of the squared normalised weights, which the guide changes
    from voxel to voxel) is measured by passing ``probes`` fields of white noise through the
    same neighbourhood (the variance of their means is 1 / n), with a fixed seed.

    Parameters
    ----------
    cbv, cbv_var, noise_var : ndarray, shape (N,)
        Estimates, their total variance and its amplitude part, for the N voxels of the
        neighbourhood's mask.
    neighbourhood : Neighbourhood
    probes : int
        White-noise fields that measure the neighbourhoods' effective size.

    Returns
    -------
    cbv : ndarray, shape (N,)
    cbv_var : ndarray, shape (N,)
        Its total variance.
    factor : ndarray, shape (N,)
        B, the weight each voxel's own amplitude kept (1: unchanged).
    """
    x = np.asarray(cbv, dtype=np.float64)
    total = np.asarray(cbv_var, dtype=np.float64)
    v = np.clip(np.asarray(noise_var, dtype=np.float64), 0.0, total)
    ok = np.isfinite(x) & np.isfinite(v) & np.isfinite(total)
    x0, v0 = np.where(ok, x, 0.0), np.where(ok, v, 0.0)
    z = np.random.default_rng(0).standard_normal((max(1, probes), x.size)) * ok
    stats = neighbourhood.mean(np.concatenate([np.stack([x0, x0 * x0, v0, ok]), z]))
    n_ok = np.maximum(stats[3], 1e-6)
    m, m2, vbar = stats[0] / n_ok, stats[1] / n_ok, stats[2] / n_ok
    # 1 / n: the probes' mean squares, averaged over the neighbourhood, below 1
    inv_n = (stats[4:] / n_ok) ** 2
    inv_n = neighbourhood.mean(inv_n.mean(axis=0, keepdims=True))[0]
    inv_n = np.clip(inv_n, 1e-3, 0.9)
    spread = (m2 - m * m) / (1.0 - inv_n) - vbar        # tau^2 of each neighbourhood, noisy
    # the neighbours' mean, without x; never below zero, which the arithmetic can give where a
    # voxel's own weight is under the neighbourhood's 1 / n
    m_loo = np.maximum((m - inv_n * x0) / (1.0 - inv_n), 0.0)
    # tau^2 of one neighbourhood is a small difference of two noisy terms: averaged twice
    # more over the neighbourhood, it follows the tissue and steadies
    tau2 = np.maximum(neighbourhood.mean(neighbourhood.mean(spread[None]))[0], 0.0)
    b = np.where(tau2 + v > 0, tau2 / np.maximum(tau2 + v, 1e-30), 1.0)
    # a voxel with fewer than two neighbours' worth has nothing to pool with
    b = np.where((inv_n > 0.5) | (neighbourhood.voxels() < 2.0), 1.0, b)
    var_m = (vbar + tau2) * inv_n / (1.0 - inv_n)
    pooled = m_loo + b * (x - m_loo)
    var = total - (1.0 - b) * v + (1.0 - b) ** 2 * var_m
    return np.where(ok, pooled, x), np.where(ok, var, total), np.where(ok, b, 1.0)


def _cells(mask: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """In-plane cells of size x size voxels: the flat index (N,) of every mask voxel's cell in
    a (Z, Y / size, X / size) grid (rounded up), and that grid's shape."""
    z, y, x = np.nonzero(mask)
    shape = (mask.shape[0], -(-mask.shape[1] // size), -(-mask.shape[2] // size))
    return (z.astype(np.int64) * shape[1] + y // size) * shape[2] + x // size, shape


def _blocks(mask: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Block number (N,) of every mask voxel for in-plane blocks of size x size, and the count."""
    _, block = np.unique(_cells(mask, size)[0], return_inverse=True)
    return block.astype(np.int64), int(block.max()) + 1 if block.size else 0


def interpolate_blocks(values: np.ndarray, mask: np.ndarray, size: int,
                       noise_var: np.ndarray | None = None) -> np.ndarray:
    """Add to ``values`` (N,) the trend between in-plane blocks that their block means imply.

    A block's prior is shared by its voxels, so where the voxels' own data weigh little their
    values are nearly constant per block and step at the blocks' borders. The block means,
    read bilinearly between the block centres (blocks of :func:`_blocks`, ``size`` x ``size``
    voxels), make a continuous surface S. Each voxel's block level becomes S's mean over the
    block (the block means smoothed with their neighbours'), and the voxel gains (1 - beta) t,
    t being S less that level and beta (clipped to 0-1) how much of t the block's values
    already show (their least-squares slope on it). A field constant per block becomes
    continuous, a linear ramp (measured well, or constant per block) is unchanged, and each
    voxel keeps its deviation from its block's mean.

    ``noise_var`` (N,): how much the noise alone moves each voxel's block mean (squared; NaN
    where not measured, :func:`_block_noise`). The change is then scaled by V / D (at most 1;
    James and Stein's positive-part factor), V that variance and D the squared difference
    between the block means and their smoothed levels, both averaged over the 5 x 5 blocks
    around each: blocks that differ from their neighbours by no more than the noise are
    smoothed as above, blocks that differ by much more (well-measured tissue borders) keep
    their values. Blocks with no measured V near them are smoothed fully. Non-finite values
    are left as they are and do not count. Returns (N,) float64.
    """
    x = np.asarray(values, dtype=np.float64)
    if size <= 1 or x.size == 0:
        return x.copy()
    z, y, xx = np.nonzero(mask)
    ok = np.isfinite(x)
    flat, shape = _cells(mask, size)
    n_cells = int(np.prod(shape))

    def block_mean(v: np.ndarray) -> np.ndarray:
        total = np.bincount(flat[ok], weights=v[ok], minlength=n_cells)
        return total / np.maximum(count, 1.0)

    count = np.bincount(flat[ok], minlength=n_cells).astype(np.float64)
    x0 = np.where(ok, x, 0.0)
    means = block_mean(x0)
    # block centres at (b + 1/2) size - 1/2 voxels: a voxel's position in block units
    coords = np.stack([z.astype(np.float64), (y + 0.5) / size - 0.5, (xx + 0.5) / size - 0.5])
    has = (count > 0).astype(np.float64).reshape(shape)
    num = ndimage.map_coordinates(means.reshape(shape) * has, coords, order=1, mode="nearest")
    den = ndimage.map_coordinates(has, coords, order=1, mode="nearest")
    surface = np.where(den > 1e-6, num / np.maximum(den, 1e-6), means[flat])
    level = block_mean(surface)
    trend = surface - level[flat]
    dev = x0 - means[flat]
    tt = np.bincount(flat[ok], weights=(trend * trend)[ok], minlength=n_cells)
    dt = np.bincount(flat[ok], weights=(dev * trend)[ok], minlength=n_cells)
    beta = np.clip(np.where(tt > 1e-12, dt / np.maximum(tt, 1e-12), 1.0), 0.0, 1.0)
    change = (level - means)[flat] + (1.0 - beta[flat]) * trend
    if noise_var is not None:
        def local(v: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Mean of v over the used cells among each cell's 5 x 5 in plane, and their
            number."""
            w = use.reshape(shape).astype(np.float64)
            total = ndimage.uniform_filter(np.where(use, v, 0.0).reshape(shape) * w,
                                           size=(1, 5, 5), mode="constant")
            n = ndimage.uniform_filter(w, size=(1, 5, 5), mode="constant")
            return (total / np.maximum(n, 1e-12)).ravel(), n.ravel()
        nv = np.asarray(noise_var, dtype=np.float64)
        known = ok & np.isfinite(nv)
        n_known = np.bincount(flat[known], minlength=n_cells)
        v, n_v = local(np.bincount(flat[known], weights=nv[known], minlength=n_cells)
                       / np.maximum(n_known, 1), n_known > 0)
        d, _ = local((means - level) ** 2, count > 0)
        shrink = np.where((d > 1e-12) & (n_v > 1e-9), v / np.maximum(d, 1e-12), 1.0)
        change = change * np.clip(shrink, 0.0, 1.0)[flat]
    return np.where(ok, x + change, x)


def _block_noise(curves: np.ndarray, precision: np.ndarray,
                 posterior: tuple[np.ndarray, np.ndarray], mask: np.ndarray, size: int,
                 grid: ResidueGrid, log_prior: np.ndarray, keep: int, chunk: int,
                 workers: int) -> np.ndarray:
    """How much the noise moves each block's estimates: (B, 3) squared changes of the block
    posterior's mean log MTT and delay and its median Tmax when the blocks' curves (T, B) get a
    second draw of their own noise (variance 1 / ``precision``), for one block in four (every
    second block along y and x; NaN for the others). ``posterior``: the blocks' most probable
    grid points and their log posterior (B, keep). A single draw per block is a rough measure;
    it is averaged over neighbouring blocks where it is used (:func:`interpolate_blocks`)."""
    def estimates(idx: np.ndarray, lp: np.ndarray) -> np.ndarray:
        w = np.exp(lp - lp.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        tmax = grid.tmax_32[idx]
        order = np.argsort(tmax, axis=1, kind="stable")     # Tmax: the median, as in the map
        return np.stack([(w * np.log(grid.mtt_32[idx])).sum(axis=1),
                         (w * grid.delay_32[idx]).sum(axis=1),
                         _weighted_median(np.take_along_axis(tmax, order, axis=1),
                                          np.take_along_axis(w, order, axis=1))], axis=1)

    cells, shape = _cells(mask, size)
    _, by, bx = np.unravel_index(np.unique(cells), shape)   # block b is the b-th cell in use
    sub = np.flatnonzero((by % 2 == 0) & (bx % 2 == 0))
    out = np.full((curves.shape[1], 3), np.nan)
    if sub.size == 0:
        return out
    prec = np.asarray(precision, dtype=np.float64)[sub]
    draw = np.random.default_rng(0).standard_normal((curves.shape[0], sub.size))
    noisy = curves[:, sub] + (draw / np.sqrt(prec)).astype(np.float32)
    parts = map_chunks(lambda s, e: _candidates(noisy[:, s:e], prec[s:e], grid, log_prior,
                                                keep, 1)[:2],
                       sub.size, chunk=chunk, workers=max(1, workers))
    idx, lp = (np.concatenate([p[j] for p in parts]) for j in range(2))
    top, top_lp = posterior
    out[sub] = (estimates(idx, lp) - estimates(top[sub], top_lp[sub])) ** 2
    return out


class _Search(NamedTuple):
    """Stage 1 on one grid (:func:`fit_bayes`): the grid, its prior, the chunking and each
    block's candidates (most probable points, then draws) with their log posterior."""
    grid: ResidueGrid
    keep: int
    log_prior: np.ndarray
    weights: dict[str, float] | None
    chunk: int
    top: np.ndarray
    top_lp: np.ndarray
    drawn: np.ndarray
    drawn_lp: np.ndarray


def fit_bayes(
    tissue: np.ndarray,
    aif: np.ndarray,
    times: np.ndarray,
    *,
    rho: float = 1.04,
    kh: float = 0.733,
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] | None = None,
    spatial: bool = True,
    spatial_sigma_mm: float = 3.0,
    noise_sd: float | None = None,
    baseline_frames: int | None = None,
    mtt_median: float = 5.0,
    mtt_log_sd: float = 1.0,
    mtt_jeffreys: bool = True,
    dispersion_mean: float | None = None,
    learn_shapes: bool = False,
    pool_amplitude: bool = True,
    smooth_blocks: bool = True,
    guide: np.ndarray | None = None,
    guide_sigma: float | None = None,
    vessels: np.ndarray | None = None,
    candidates: int = 96,
    draws: int = 48,
    grid_options: dict[str, object] | None = None,
    chunk: int = 2048,
    workers: int = 2,
    progress: bool = False,
) -> BayesFit:
    """Posterior estimates and standard deviations of CBF, CBV, MTT, delay and Tmax per voxel.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Tissue enhancement in HU (baseline subtracted).
    aif : ndarray, shape (T,)
        Arterial enhancement in HU, partial-volume corrected.
    times : ndarray, shape (T,)
        Frame times in s, strictly increasing (any spacing).
    rho, kh : float
        Brain density (g/mL) and haematocrit ratio.
    mask : ndarray of bool, shape (Z, Y, X), optional
        Where the N voxels lie (``mask.sum() == N``, C order); the spatial prior needs it.
    spacing : (dz, dy, dx), optional
        Voxel size in mm (default 1 mm), for the neighbourhood's width.
    spatial : bool
        Use the neighbourhood's posterior as each voxel's prior (needs ``mask``).
    spatial_sigma_mm : float
        In-plane Gaussian SD of the neighbourhood, mm.
    noise_sd : float, optional
        Noise SD of one frame, HU; default estimated per voxel from second differences
        (averaged over the neighbourhood with the spatial prior).
    baseline_frames : int, optional
        The leading frames whose mean was subtracted from ``tissue`` as its baseline: that
        mean's error is common to every later frame, and the likelihood accounts for it
        (:func:`baseline_whitening`). None: the frames' noise is independent.
    mtt_median, mtt_log_sd : float
        Log-normal prior on MTT (median s, SD of log MTT).
    mtt_jeffreys : bool
        Weigh the log-normal by the Jeffreys density of log MTT given the shape, dispersion
        and delay (:meth:`ResidueGrid.log_prior`), so that MTTs the data cannot tell apart
        do not gather prior mass.
    dispersion_mean : float, optional
        Mean of an exponential prior on the transport kernel's mean time, s; default the
        density 1 / (tau + :data:`DISPERSION_SCALE`) (:meth:`ResidueGrid.log_prior`). A prior
        favouring little dispersion lowers CBF where there is none, and makes Tmax early where
        there is.
    learn_shapes : bool
        With the spatial prior, replace the uniform prior over residue shapes by the weights
        that the neighbourhoods' average curves give them (:func:`learn_shape_weights`). Off
        by default: it helps studies of one residue shape with some dispersion and hurts
        undispersed ones (docs/bayes.md), and it makes each study's prior its own.
    pool_amplitude : bool
        With the spatial prior, pool each voxel's amplitude (CBV, and CBF through it) with its
        neighbours' by empirical Bayes (:func:`pool_amplitudes`); MTT, delay and Tmax are
        unchanged.
    smooth_blocks : bool
        With the spatial prior, read the blocks' levels of MTT, delay and Tmax from a bilinear
        surface through the block means (:func:`interpolate_blocks`), so that the timing maps
        do not step at the blocks' borders, as far as the blocks' differences are the noise's
        (:func:`_block_noise`).
    guide : ndarray, shape (Z, Y, X), optional
        Image whose values tell tissues apart (the temporal mean of the study, HU): the
        amplitude pooling then averages only neighbours of similar guide value.
    guide_sigma : float, optional
        Range width of the guide, HU; default four times the guide's noise, taken as the
        frames' noise over the square root of their number (the temporal mean's), and at least
        1 HU (nearly noise-free studies need no pooling, and a narrower range only costs time).
    vessels : ndarray of bool, shape (N,), optional
        Voxels left out of the neighbourhoods' averages (curves and noise) that make the
        spatial prior: an artery's or a vein's curve, many times a tissue's, would give the
        tissue around it the vessel's timing. They are still fitted, with their
        neighbourhood's prior. Ignored, with a warning, when they are more than
        :data:`MAX_VESSEL_FRACTION` of the voxels.
    candidates : int
        Grid points kept per voxel after the prior (the most probable ones): the estimates
        are posterior means over them.
    draws : int
        Grid points drawn from the prior (the neighbourhood's posterior) per voxel: their
        posterior weights give the uncertainty maps.
    grid_options : dict, optional
        Keyword arguments of :class:`ResidueGrid`. Without ``delay_range`` the delays span
        :data:`DELAY_RANGE` and are extended by :data:`DELAY_EXTENSION` s at a time, up to the
        delay at which the tissue's bolus would peak at the last frame, while more than a few
        blocks (curves, without the spatial prior) hold most of their posterior within 0.5 s
        of the last delay (tissue behind an occlusion can arrive 15-20 s after the AIF's
        artery); a ``delay_range`` given is kept as it is.
    chunk : int
        Curves per block of work.
    workers : int
        Threads.
    progress : bool
        Progress bars.

    Returns
    -------
    BayesFit
    """
    y_all = np.asarray(tissue)
    t = np.asarray(times, dtype=np.float64)
    if y_all.ndim != 2 or y_all.shape[0] != t.size:
        raise ValidationError(f"tissue must be (T, N) with T = {t.size}, got {y_all.shape}")
    if np.asarray(aif).shape != t.shape:
        raise ValidationError(f"aif must have shape {t.shape}, got {np.asarray(aif).shape}")
    if t.size < 4 or not np.all(np.diff(t) > 0):
        raise ValidationError("times must be strictly increasing, at least 4 frames")
    n = y_all.shape[1]
    m = np.zeros((0, 0, 0), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    use_space = spatial and mask is not None
    if use_space and int(m.sum()) != n:
        raise ValidationError(f"mask holds {int(m.sum())} voxels, tissue {n}")
    if n == 0:  # nothing to fit: empty maps, as the box fit gives
        e = np.zeros(0, dtype=np.float32)
        return BayesFit(*(e,) * 13)
    whiten = None if baseline_frames is None else baseline_whitening(t.size, baseline_frames)
    n_draws = int(max(draws, 1))
    y_all = np.nan_to_num(y_all.astype(np.float32, copy=False))
    own_noise = noise_variance(y_all, max(1, workers))
    if noise_sd is not None:
        noise = np.full(n, float(noise_sd) ** 2)
    else:  # a noise-free curve is fitted as one: the floor only keeps the precision finite,
        # at a millionth of the arterial peak, whatever the curves' units
        peak = float(np.abs(np.asarray(aif, dtype=np.float64)).max())
        noise = np.maximum(own_noise, (NOISE_FLOOR * peak) ** 2 or 1e-30)

    # Stage 1: the candidates and their prior. With the spatial prior, the posterior of the
    # neighbourhood's average curve, computed once per in-plane block about as wide as the
    # neighbourhood's SD (neighbouring voxels' averages barely differ); otherwise the global
    # prior's most probable points for the voxel itself.
    if use_space:
        sp = spacing or (1.0, 1.0, 1.0)
        sig = (spatial_sigma_mm / sp[1], spatial_sigma_mm / sp[2])
        w_pool = None
        if vessels is not None:
            if np.shape(vessels) != (n,):
                raise ValidationError(f"vessels must have shape ({n},), got {np.shape(vessels)}")
            share = float(np.mean(vessels))
            if share <= MAX_VESSEL_FRACTION:
                w_pool = (~np.asarray(vessels, dtype=bool)).astype(np.float32)
            else:
                log.warning("%.0f %% of the voxels are marked as vessels: kept in the spatial "
                            "prior's averages (a mask that large is not the vessels)",
                            100 * share)
        pooled, gain, cell = pool_curves(y_all, m, sig, weights=w_pool)
        # Averaging divides white noise's variance by the number of voxels averaged, but noise
        # correlated in space (a filtered study, a scanner's reconstruction kernel) much less:
        # the gain is measured, as the ratio of the voxels' to the averaged curves' noise.
        around = Neighbourhood(m, spatial_sigma_mm, sp)
        stack = np.stack([own_noise, noise_variance(pooled, max(1, workers))[cell], noise])
        local = around.mean(stack, w_pool)
        if w_pool is not None:  # a voxel with no tissue around it: every neighbour counts
            alone = around.mean(w_pool[None])[0] < 1e-3
            if alone.any():
                local[:, alone] = around.mean(stack)[:, alone]
        # (an averaged noise of 0: a cell with no tissue within reach, which gains nothing)
        ratio = np.divide(local[0], local[1], out=np.ones_like(local[0]), where=local[1] > 0)
        gain = np.clip(ratio, 1.0, gain)
        if noise_sd is None:  # the neighbourhood's noise level, steadier than one voxel's
            noise = local[2]
        block_size = max(1, round(min(sig)))
        block, n_blocks = _blocks(m, block_size)
        avg = sparse.csr_matrix((np.ones(n), (block, np.arange(n))), shape=(n_blocks, n))
        counts = np.asarray(avg.sum(axis=1)).ravel()
        avg = sparse.diags(1.0 / counts) @ avg
        to_cell = sparse.csr_matrix((np.ones(n), (np.arange(n), cell)),
                                    shape=(n, pooled.shape[1]))
        block_curves = np.asarray(((avg @ to_cell) @ pooled.T).T, dtype=np.float32)  # (T, B)
        block_precision = (avg @ (gain / noise))
        del pooled
    else:
        block = np.arange(n)
        n_blocks, block_size = n, 1
        block_curves, block_precision = y_all, 1.0 / noise
    if whiten is not None:  # noise estimates above, from the curves as given
        w32 = whiten.astype(np.float32)
        block_curves = w32 @ block_curves
        y_all = block_curves if not use_space else w32 @ y_all

    options = dict(grid_options or {})
    given = cast("tuple[float, float]", options.pop("delay_range", DELAY_RANGE))
    delays = (float(given[0]), float(given[1]))
    adapt = grid_options is None or "delay_range" not in grid_options
    # the latest delay a study can show: its tissue's bolus peaking at the last frame
    latest = float(t[-1] - t[int(np.argmax(aif))])

    def search(delay_range: tuple[float, float]) -> _Search:
        """The grid with these delays, its prior (learned shapes) and stage 1 on it."""
        grid = ResidueGrid(aif, t, scale=flow_scale(rho, kh), whiten=whiten,
                           delay_range=delay_range, **options)  # type: ignore[arg-type]
        keep = int(min(max(candidates, 1), grid.size))
        log_prior = grid.log_prior(mtt_median, mtt_log_sd, dispersion_mean,
                                   jeffreys=mtt_jeffreys)
        weights = None
        if use_space and learn_shapes:
            w = learn_shape_weights(block_curves, np.asarray(block_precision, dtype=np.float64),
                                    grid, log_prior)
            log_prior = log_prior + np.repeat(np.log(w), grid.size // w.size).astype(np.float32)
            weights = shape_weights(grid, log_prior)
            log.info("residue shape weights: %s",
                     ", ".join(f"{k} {v:.2f}" for k, v in weights.items()))
        # Stage 1 holds per curve its coarse posterior (Kc values) and the responses of the
        # fine points around its seeds (15 per seed, 2 x keep / 2 seeds, T values each):
        # chunks of about 2^24 such values (64 MB) per thread.
        per_curve = grid.coarse.size + 15 * keep * t.size
        chunk1 = max(16, min(chunk, (1 << 24) // per_curve))

        def stage1(s: int, e: int) -> tuple[np.ndarray, ...]:
            return _candidates(block_curves[:, s:e], block_precision[s:e], grid, log_prior,
                               keep, n_draws)

        parts = map_chunks(stage1, n_blocks, chunk=chunk1, workers=max(1, workers),
                           progress=progress, desc="bayes prior",
                           unit="block" if use_space else "voxel")
        top, top_lp, drawn, drawn_lp = (np.concatenate([p[j] for p in parts]) for j in range(4))
        return _Search(grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp)

    grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp = search(delays)
    # Tissue whose bolus arrives later than the grid's delays reach is fitted at the last delay
    # with a longer MTT and a lower CBF: where more than a few blocks put most of their
    # posterior within half a second of the last delay, the delays are extended and the
    # search run again, up to the latest delay the acquisition can show.
    while adapt and delays[1] < latest:
        near = grid.delay_32[top] >= delays[1] - 0.5
        w = np.exp(top_lp - top_lp.max(axis=1, keepdims=True))
        late = int(((w * near).sum(axis=1) > 0.5 * w.sum(axis=1)).sum())
        if late < max(LATE_BLOCKS, LATE_FRACTION * n_blocks):
            break
        delays = (delays[0], min(delays[1] + DELAY_EXTENSION, latest))
        log.info("%d blocks at the grid's last delay: delays extended to %.1f s", late,
                 delays[1])
        grid, keep, log_prior, weights, chunk1, top, top_lp, drawn, drawn_lp = search(delays)
    # the most probable points in increasing Tmax, once per block: the Tmax map is their
    # weighted median (_moments)
    by_tmax = np.argsort(grid.tmax_32[top], axis=1, kind="stable")
    top = np.take_along_axis(top, by_tmax, axis=1)
    top_lp = np.take_along_axis(top_lp, by_tmax, axis=1)
    if use_space:
        # the prior of a voxel's own posterior: the block's posterior, which the most probable
        # points carry as weights and the draws as their number
        drawn_lp = np.zeros_like(drawn_lp)
    else:
        # the candidates were chosen by the voxel's own posterior: the prior is the global
        # one, and the draws, made from the posterior, carry their mass as their number
        top_lp = log_prior[top]
        drawn_lp = log_prior[drawn] - drawn_lp
    cand = np.concatenate([top, drawn], axis=1)
    cand_lp = np.concatenate([top_lp, drawn_lp], axis=1)
    n_top = top.shape[1]

    # Stage 2: each voxel's own curve weighs its block's candidates; the voxels of a block
    # share them, so their projections are one batched product per block.
    order = np.argsort(block, kind="stable")
    counts = np.bincount(block, minlength=n_blocks)
    width = int(counts.max()) if n_blocks else 1
    members = np.full((n_blocks, width), -1, dtype=np.int64)
    pos = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    members[block[order], pos] = order
    mom = np.empty((n, len(_COLUMNS)), dtype=np.float64)
    per_chunk = max(1, chunk // width)

    def stage2(s: int, e: int) -> None:
        vox = members[s:e]                                  # (nb, P)
        valid = vox >= 0
        ys = y_all[:, np.where(valid, vox, 0)]              # (T, nb, P)
        ys = np.ascontiguousarray(np.moveaxis(ys, 0, -1))   # (nb, P, T)
        bc = grid.responses[cand[s:e]]                      # (nb, M, T)
        g = np.matmul(ys, np.swapaxes(bc, 1, 2))[valid]     # (n_valid, M)
        yy = np.einsum("npt,npt->np", ys, ys, dtype=np.float64)[valid]
        ids = vox[valid]
        mom[ids] = _moments(g, yy, noise[ids], cand[s:e], cand_lp[s:e], np.nonzero(valid)[0],
                            grid, n_top)

    map_chunks(stage2, n_blocks, chunk=per_chunk, workers=max(1, workers), progress=progress,
               desc="bayes", unit="block")
    if use_space and block_size > 1 and smooth_blocks:
        # timing: the blocks' steps between neighbours interpolated away (log MTT, delay, Tmax)
        # (as far as the blocks' differences are the noise's)
        bn = _block_noise(block_curves, block_precision, (top, top_lp), m, block_size, grid,
                          log_prior, keep, chunk1, workers)[block]
        own_mtt, own_tmax = mom[:, 2].copy(), mom[:, 4].copy()
        mom[:, 2] = np.exp(interpolate_blocks(np.log(np.maximum(mom[:, 2], 1e-6)), m,
                                              block_size, bn[:, 0]))
        mom[:, 3] = interpolate_blocks(mom[:, 3], m, block_size, bn[:, 1])
        mom[:, 4] = interpolate_blocks(mom[:, 4], m, block_size, bn[:, 2])
        mom[:, 15] += mom[:, 4] - own_tmax  # the curve's peak moves with the timing
        mom[:, 0] = mom[:, 1] * 60.0 / np.maximum(mom[:, 2], 1e-6)
        # the SDs are root-mean-square errors of the estimates under the voxel's posterior:
        # an estimate moved by the interpolation is that much further from the posterior's
        # centre, E[(x - new)^2] = E[(x - own)^2] + (new - own)^2
        mom[:, 10] = np.hypot(mom[:, 10], mom[:, 2] - own_mtt)
        mom[:, 14] = np.hypot(mom[:, 14], mom[:, 2] / np.maximum(own_mtt, 1e-6) - 1.0)
        mom[:, 11] = np.hypot(mom[:, 11], mom[:, 4] - own_tmax)
    if use_space and pool_amplitude:
        if guide is not None and np.asarray(guide).shape != m.shape:
            raise ValidationError(f"guide must have the mask's shape {m.shape}, got "
                                  f"{np.asarray(guide).shape}")
        g_sigma = guide_sigma if guide_sigma is not None else \
            max(4.0 * math.sqrt(float(np.median(noise)) / t.size), 1.0)
        cbv_var = mom[:, 9] ** 2
        cbv, var, _ = pool_amplitudes(mom[:, 1], cbv_var, mom[:, 13],
                                      Neighbourhood(m, spatial_sigma_mm, sp, guide, g_sigma))
        # CBF = 60 CBV / MTT: the pooled CBV's error no longer offsets MTT's within the voxel
        # (a shorter MTT fits a higher CBF of about the same area), so CBF's relative variance
        # is the sum of CBV's and that of MTT's reciprocal (column inv_mtt_rel)
        to_cbf = 60.0 / np.maximum(mom[:, 2], 1e-6)
        rel = var / np.maximum(cbv * cbv, 1e-12) + mom[:, 14] ** 2
        mom[:, 0] = cbv * to_cbf
        mom[:, 1] = cbv
        mom[:, 8] = np.abs(mom[:, 0]) * np.sqrt(rel)
        mom[:, 9] = np.sqrt(np.maximum(var, 0.0))
    col = {name: mom[:, j].astype(np.float32) for j, name in enumerate(_COLUMNS)}
    return BayesFit(cbf=col["cbf"], cbv=col["cbv"], mtt=col["mtt"], delay=col["delay"],
                    tmax=col["tmax"], ttp=col["ttp"], transit_cv=col["cv"],
                    residual=np.sqrt(mom[:, 6] / t.size).astype(np.float32),
                    noise=np.sqrt(mom[:, 7]).astype(np.float32),
                    cbf_sd=col["cbf_sd"], cbv_sd=col["cbv_sd"], mtt_sd=col["mtt_sd"],
                    tmax_sd=col["tmax_sd"], shape_weights=weights,
                    delay_range=(float(grid.delays[0]), float(grid.delays[-1])))
