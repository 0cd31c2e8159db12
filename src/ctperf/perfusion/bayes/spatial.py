"""Spatial information for the Bayesian estimator: curves pooled over neighbourhoods, a
neighbourhood guided by the temporal mean image, amplitudes pooled by empirical Bayes, and the
blocks whose fits are interpolated back to every voxel."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, sparse

from ctperf.parallel import map_chunks
from ctperf.perfusion.bayes.grid import ResidueGrid
from ctperf.perfusion.bayes.posterior import _candidates, _weighted_median

#: Most weights (non-zero pairs of voxels or blocks) the guided neighbourhood holds: 16 M,
#: about 200 MB with its construction (``Neighbourhood``, blocks grow until it fits)
MAX_WEIGHTS = 1 << 24


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


def noise_fields(curves: np.ndarray, noise_var: np.ndarray, count: int = 8) -> np.ndarray:
    """Fields of the curves' own noise, each voxel's of unit variance, (K, N) float32: the
    second differences over time of the ``count`` frames where they are smallest (the curves
    flat there, so the differences hold noise alone), over ``sqrt(6 noise_var)``. Noise
    correlated in space (a scanner's kernel, a filter) keeps its correlation in them, which
    :func:`pool_amplitudes` measures."""
    y = np.asarray(curves, dtype=np.float32)
    scale = np.sqrt(6.0 * np.asarray(noise_var, dtype=np.float64)).astype(np.float32)

    def normalised(frames: np.ndarray, cols: slice) -> np.ndarray:
        d2 = y[frames, cols] - 2.0 * y[frames + 1, cols] + y[frames + 2, cols]
        return np.divide(d2, scale[cols], out=np.zeros_like(d2), where=scale[cols] > 0)

    every = np.arange(y.shape[0] - 2)
    sample = slice(None, None, max(1, y.shape[1] // 20000))  # frames chosen on a sample
    flat = np.argsort(np.median(np.abs(normalised(every, sample)), axis=1))[:max(1, count)]
    return normalised(np.sort(flat), slice(None))


def pool_amplitudes(cbv: np.ndarray, cbv_var: np.ndarray, noise_var: np.ndarray,
                    neighbourhood: Neighbourhood, *, probes: int = 4,
                    fields: np.ndarray | None = None
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

    Noise correlated between neighbours (a scanner's reconstruction kernel, a filtered study)
    averages out less: passed through the neighbourhood too, the study's own noise
    (``fields``, :func:`noise_fields`) gives its mean's variance (taken for the local mean's
    noise in place of white noise's 1 / n), its covariance with the voxel's own noise beyond
    the voxel's weight (shrinking towards neighbours that share a voxel's error removes less
    of it: the pooled variance gains ``2 B (1 - B)`` times that covariance) and its spread
    within the neighbourhood (which then holds less of the noise, and more of tau^2).

    Parameters
    ----------
    cbv, cbv_var, noise_var : ndarray, shape (N,)
        Estimates, their total variance and its amplitude part, for the N voxels of the
        neighbourhood's mask.
    neighbourhood : Neighbourhood
    probes : int
        White-noise fields that measure the neighbourhoods' effective size.
    fields : ndarray, shape (K, N), optional
        The study's noise, unit variance per voxel (:func:`noise_fields`); None: independent
        between voxels.

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
    n_probes = max(1, probes)
    z = np.random.default_rng(0).standard_normal((n_probes, x.size)) * ok
    own = np.zeros((0, x.size)) if fields is None else np.asarray(fields, dtype=np.float64) * ok
    stats = neighbourhood.mean(np.concatenate([np.stack([x0, x0 * x0, v0, ok]), z, own]))
    n_ok = np.maximum(stats[3], 1e-6)
    m, m2, vbar = stats[0] / n_ok, stats[1] / n_ok, stats[2] / n_ok
    white, study = stats[4:4 + n_probes] / n_ok, stats[4 + n_probes:] / n_ok
    # 1 / n: the probes' mean squares, averaged over the neighbourhood, below 1
    raw_inv_n = (white ** 2).mean(axis=0)
    inv_n = np.clip(neighbourhood.mean(raw_inv_n[None])[0], 1e-3, 0.9)
    excess, shared, in_spread = 1.0, 0.0, 1.0
    if own.size and ok.any():
        # The study's noise against white noise through the same weights, over the whole
        # study (a texture, steady where one neighbourhood's few fields are not): its local
        # means' mean square over white noise's, the voxel's noise's covariance with them
        # beyond the voxel's own weight (the white probes'), the noise's share of the spread
        q_white, q = raw_inv_n[ok].mean(), (study ** 2).mean(axis=0)[ok].mean()
        self_weight = (z * white).mean(axis=0)[ok].mean()
        cross = (own * study).mean(axis=0)[ok].mean()
        excess = float(np.clip(q / q_white, 1.0, 1.0 / q_white))
        shared = float(np.clip((cross - self_weight) / max(1.0 - self_weight, 1e-3), 0.0, 1.0))
        in_spread = float(np.clip((1.0 - q) / max(1.0 - q_white, 1e-3), 0.0, 1.0))
    spread = (m2 - m * m) / (1.0 - inv_n) - vbar * in_spread  # tau^2 of each one, noisy
    # the neighbours' mean, without x; never below zero, which the arithmetic can give where a
    # voxel's own weight is under the neighbourhood's 1 / n
    m_loo = np.maximum((m - inv_n * x0) / (1.0 - inv_n), 0.0)
    # tau^2 of one neighbourhood is a small difference of two noisy terms: averaged twice
    # more over the neighbourhood, it follows the tissue and steadies
    tau2 = np.maximum(neighbourhood.mean(neighbourhood.mean(spread[None]))[0], 0.0)
    b = np.where(tau2 + v > 0, tau2 / np.maximum(tau2 + v, 1e-30), 1.0)
    # a voxel with fewer than two neighbours' worth has nothing to pool with
    b = np.where((inv_n > 0.5) | (neighbourhood.voxels() < 2.0), 1.0, b)
    var_m = (vbar * excess + tau2) * inv_n / (1.0 - inv_n)
    pooled = m_loo + b * (x - m_loo)
    var = total - (1.0 - b) * v + (1.0 - b) ** 2 * var_m + 2.0 * b * (1.0 - b) * shared * v
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
