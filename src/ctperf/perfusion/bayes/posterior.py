"""The posterior of each curve on the residue grid: noise, likelihood, the most probable and
drawn grid points, the shapes' prior learned from a study, and the moments that make the maps
and their uncertainty."""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from ctperf.errors import ValidationError
from ctperf.parallel import map_chunks
from ctperf.perfusion.bayes.grid import ResidueGrid


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
            "inv_mtt_rel", "ttp", "edge")


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
    Returns (n, 17) float64 in the order of :data:`_COLUMNS`; CBF is 60 CBV / MTT. Columns
    12 and 13 are the parts of CBF's and CBV's variances that the voxel's own noise makes at
    a given grid point (the amplitude's), averaged over the estimates' points; column 14 is
    CBF's relative root-mean-square error from MTT's posterior alone (CBV given), over the
    draws; 15 the posterior mean of the fitted curve's time to peak; the last the posterior
    mass on the grid's first or last MTT or delay (``ResidueGrid.edge_32``).
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
    out[:, 16] = mean(w, at(grid.edge_32)[:, top])
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
