"""The bilateral grid behind :func:`ctperf.preprocess.joint_bilateral` (see that module).

Everything that depends on the guide only is built once (:func:`build_grid`) as sparse
operators: splatting voxels into the used (range level, low-resolution cell) pairs, three 1D
Gaussian passes between used pairs, and the normalised slicing back to voxels.
:func:`apply_grid` then filters any number of frames with four sparse products.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage, sparse

from ctperf.parallel import map_chunks

__all__ = ["Grid", "apply_grid", "build_grid", "grid_taps"]

log = logging.getLogger(__name__)

_RANGE_CUTOFF = 4.0  # range weights are dropped beyond this many range sigmas (exp(-8) = 3e-4)
# Gaussian taps kept to this many sigmas (the brute force keeps 4): on a down-sampled axis, to
# this many low-resolution sigmas (the splat and slice weights add the rest of the tails; the
# quadratic scheme, accurate enough for the difference to show, needs 3.5)
_TRUNCATE, _TRUNCATE_LOW, _TRUNCATE_QUADRATIC = 3.5, 3.0, 3.5
_LEVELS = (-1, 0, 1, 2)  # levels read around a voxel (cubic interpolation), from the one below
# Guide values (HU) where the levels are ``levels_per_sigma`` per range sigma: soft tissue and
# vessels, whose frames depart from the guide by up to hundreds of HU (contrast); outside
# (bone, air, their partial volume) frames follow the guide and coarser levels suffice.
_FINE_BAND_HU = (-100.0, 400.0)


@dataclass(frozen=True)
class Grid:
    """Everything that depends on the guide only: sparse operators applied in turn."""

    splat: tuple[sparse.csc_matrix, ...]  # (R0, N) each: box part (flat voxels), tent (steep)
    blur: tuple[sparse.csr_matrix, ...]  # x, y, z Gaussian passes between used (level, cell) sets
    slice: sparse.csr_matrix  # (N, R3): cubic in range x bilinear in plane, normalised


def _kernel(sigma: float, truncate: float) -> np.ndarray:
    """Sampled Gaussian taps for offsets -r..r, r = int(truncate sigma + 0.5)."""
    r = int(truncate * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return np.ones(1)
    x = np.arange(-r, r + 1)
    return np.exp(-0.5 * (x / sigma) ** 2)


def _ids(mask: np.ndarray) -> np.ndarray:
    """Compact row id of every True entry of a mask, flattened (-1 elsewhere), int32."""
    where = np.flatnonzero(mask.ravel())
    ids = np.full(mask.size, -1, dtype=np.int32)
    ids[where] = np.arange(where.size, dtype=np.int32)
    return ids


def _per_row(values: np.ndarray, counts: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """``np.repeat(values, counts)`` (int32) as a cumulative sum of the steps between rows.

    Faster than ``np.repeat`` for many short rows; ``indptr`` is the cumulative sum of counts.
    """
    full = counts > 0
    vals = values[full].astype(np.int32)
    first = indptr[:-1][full]
    out = np.zeros(int(indptr[-1]), dtype=np.int32)
    if vals.size:
        out[first[1:]] = np.diff(vals)
        out[first[0]] = vals[0]
    return np.cumsum(out, out=out)


def _job(jobs: tuple[tuple[Any, ...], ...], start: int, stop: int) -> sparse.csr_matrix:
    """The blur pass of ``jobs[start]`` (one job per chunk)."""
    return _pass(*jobs[start])


def _pass(rows_mask: np.ndarray, rows_order: tuple[int, ...], cols_mask: np.ndarray, axis: int,
          taps: np.ndarray) -> sparse.csr_matrix:
    """One 1D Gaussian along ``axis`` of the (K, Z, Yl, Xl) grid, from the cols set to the rows set.

    The columns are the True cells of ``cols_mask`` numbered in the C order of the grid with
    ``axis`` moved last, so that the cells a row reads (a window along ``axis``) have
    consecutive numbers; the rows are numbered in the C order of ``rows_mask.transpose
    (rows_order)``, the order the next pass reads them in.
    """
    r = len(taps) // 2
    col_order = (*(a for a in range(4) if a != axis), axis)
    cols_t = np.ascontiguousarray(cols_mask.transpose(col_order)).ravel()
    length = cols_mask.shape[axis]
    before = np.zeros(cols_t.size + 1, dtype=np.int32)  # True cells before each flat position
    np.cumsum(cols_t, out=before[1:])
    col_pos = (np.flatnonzero(cols_t) % length).astype(np.int32)  # position along axis
    del cols_t
    rows_t = np.ascontiguousarray(rows_mask.transpose(rows_order))
    # positions along each axis, in 32 bits (the grid's sides are small)
    flat = np.flatnonzero(rows_t)
    canon = {}
    for a, size in zip(rows_order[::-1], rows_t.shape[::-1], strict=True):
        canon[a] = (flat % size).astype(np.int32)
        flat //= size
    del rows_t, flat
    line = np.zeros(canon[axis].size, dtype=np.int64 if cols_mask.size >= 2**31 else np.int32)
    for a in col_order[:-1]:
        line *= cols_mask.shape[a]
        line += canon[a]
    line *= length
    pos = canon[axis].astype(np.int32)
    del canon
    start = before[line + np.maximum(pos - r, 0)]
    counts = before[line + np.minimum(pos + r, length - 1) + 1] - start
    del line, before
    indptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # the columns of a row are the consecutive numbers start .. start + count - 1
    indices = _per_row((start - indptr[:-1]).astype(np.int32), counts, indptr)
    indices += np.arange(indptr[-1], dtype=np.int32)
    offset = col_pos[indices]
    offset -= _per_row(pos - r, counts, indptr)
    data = taps.astype(np.float32)[offset]
    del offset
    return sparse.csr_matrix((data, indices, indptr),
                             shape=(counts.size, col_pos.size))


def _corners(yy: np.ndarray, xx: np.ndarray, zc: np.ndarray, factors: tuple[int, int, int],
             shape_low: tuple[int, int, int], dtype: type,
             quadratic: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear or quadratic B-spline weights of each voxel on the nearest in-plane cells.

    Returns the cells' flat ids (N, C) and weights (N, C) float32: two (bilinear) or three
    (quadratic) cells along each down-sampled axis, one along an axis that is not. Cell c > 0
    covers voxels d (c - 1) .. d c - 1 (centre d (c - 1) + (d - 1) / 2); when d > 1 one extra
    cell on each side keeps every voxel within the grid. Bilinear weights spread a voxel by
    f (1 - f) d^2 voxel^2 (nothing at a cell centre, most half-way between two), so the
    filter's kernel depends on where a voxel lies in its cell; quadratic B-splines spread
    every voxel by d^2 / 4 voxel^2, so the kernel is the same everywhere. The third array
    holds bilinear weights on the same cells (the weights themselves if not ``quadratic``).
    """
    _, ny, nx = shape_low
    taps: list[list[tuple[np.ndarray, ...]]] = []  # (cell, weight[, bilinear weight])
    for pos, d, size in ((yy, factors[1], ny), (xx, factors[2], nx)):
        if d == 1:
            taps.append([(pos, np.ones(pos.shape, dtype=np.float32))])
            continue
        u = (pos - (d - 1) / 2.0) / d + 1.0
        if not quadratic:
            c0 = np.minimum(np.floor(u).astype(dtype), size - 1)
            f = (u - c0).astype(np.float32)
            taps.append([(c0, 1 - f), (np.minimum(c0 + 1, size - 1), f)])
            continue
        c: np.ndarray = np.rint(u).astype(dtype)
        t = (u - c).astype(np.float32)
        taps.append([(np.clip(c - 1, 0, size - 1), (0.5 - t) ** 2 / 2, np.maximum(-t, 0)),
                     (np.clip(c, 0, size - 1), 0.75 - t * t, 1 - np.abs(t)),
                     (np.clip(c + 1, 0, size - 1), (0.5 + t) ** 2 / 2, np.maximum(t, 0))])
    ids = np.stack([(zc * ny + yc[0]) * nx + xc[0] for yc in taps[0] for xc in taps[1]], axis=1)
    wts = np.stack([wy[1] * wx[1] for wy in taps[0] for wx in taps[1]], axis=1)
    lin = np.stack([wy[-1] * wx[-1] for wy in taps[0] for wx in taps[1]], axis=1) \
        if quadratic else wts
    return ids, wts, lin


def _levels(g_min: float, g_max: float, fine: float, coarse: float) -> np.ndarray:
    """Range levels (HU, increasing): ``fine`` apart inside _FINE_BAND_HU, ``coarse`` outside.

    They reach two coarse steps below ``g_min`` and three above ``g_max``, so that every guide
    value has a level below it and two above it (cubic interpolation).
    """
    lo, hi = g_min - 2 * coarse, g_max + 3 * coarse
    b_lo, b_hi = _FINE_BAND_HU
    inner = np.arange(b_lo, b_hi + fine / 2, fine)
    below = b_lo - coarse * np.arange(int(np.ceil(max(b_lo - lo, 0.0) / coarse)), 0, -1)
    above = inner[-1] + coarse * np.arange(1, int(np.ceil(max(hi - inner[-1], 0.0) / coarse)) + 1)
    levels = np.concatenate([below, inner, above])
    # levels beyond the guide's reach are dropped (one kept on each side)
    first = max(int(np.searchsorted(levels, lo, side="right")) - 1, 0)
    last = int(np.searchsorted(levels, hi, side="left")) + 1
    return levels[first:last]


def _lagrange(g: np.ndarray, nodes: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Cubic Lagrange weights at g of the four nodes around it (levels -1, 0, 1, 2)."""
    weights = []
    for j, nj in enumerate(nodes):
        w = np.ones_like(g)
        for m, nm in enumerate(nodes):
            if m != j:
                w *= (g - nm) / (nj - nm)
        weights.append(w)
    return tuple(weights)


def _csc(keys: np.ndarray, vals: np.ndarray, keep: np.ndarray, cols: np.ndarray,
         row_of: np.ndarray, n: int, n_rows: int) -> sparse.csc_matrix:
    """(n_rows, n) CSC matrix from candidate entries (one line per column ``cols[i]``).

    ``keys`` and ``vals`` are the grid keys and weights of the candidates that ``keep`` marks
    (in its order); ``row_of`` maps a grid key to its row (-1: not a row, entry dropped).
    """
    rows = row_of[keys]
    kept = rows >= 0
    # entries kept per line: differences of the running count at the lines' ends
    ends = np.cumsum(keep.sum(axis=1))
    done = np.zeros(kept.size + 1, dtype=np.int64)
    np.cumsum(kept, out=done[1:])
    counts = np.zeros(n, dtype=np.int64)
    counts[cols] = np.diff(done[ends], prepend=0)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sparse.csc_matrix((vals[kept], rows[kept], indptr), shape=(n_rows, n))


def grid_taps(sigma_vox: tuple[float, float, float], factors: tuple[int, int, int],
              quadratic: bool) -> list[np.ndarray]:
    """The blur passes' Gaussian taps (z, y, x) on the grid down-sampled by ``factors`` for a
    spatial sigma of ``sigma_vox`` voxels."""
    # Variance added by splatting and slicing, in voxel^2: quadratic B-splines d^2 / 4 each
    # (voxels splatted into their cell add about (d^2 - 1) / 12 instead: a kernel 2 % narrower
    # at d = 3 where the guide is flat); a box of d and a tent of d about (d^2 - 1) / 4 together.
    # The low-resolution Gaussian makes up the rest.
    added = [d * d / 2.0 if quadratic else (d * d - 1) / 4.0 for d in factors]
    sigma_low = [float(np.sqrt(max(s * s - a, 0.0)) / d) if d > 1 else float(s)
                 for s, d, a in zip(sigma_vox, factors, added, strict=True)]
    truncate_low = _TRUNCATE_QUADRATIC if quadratic else _TRUNCATE_LOW
    return [_kernel(s, truncate_low if d > 1 else _TRUNCATE)
            for s, d in zip(sigma_low, factors, strict=True)]


def build_grid(guide: np.ndarray, sigma_vox: tuple[float, float, float],
                steps_hu: tuple[float, float], range_sigma: float,
                factors: tuple[int, int, int], quadratic: bool, *, workers: int = 1) -> Grid:
    """Sparse operators of the bilateral grid of a guide (Z, Y, X) in HU.

    ``sigma_vox`` is the spatial sigma in voxels (z, y, x), ``steps_hu`` the level spacing
    inside and outside the tissue band, ``factors`` the down-sampling per axis; ``workers``
    threads build the three blur passes (numpy releases the GIL in most of that work).
    """
    nz, ny, nx = guide.shape
    dz, dy, dx = factors
    pad_y, pad_x = int(dy > 1), int(dx > 1)  # a border cell on each side (see _corners)
    shape_low = (-(-nz // dz), -(-ny // dy) + 2 * pad_y, -(-nx // dx) + 2 * pad_x)
    n_cells = int(np.prod(shape_low))
    g = guide.ravel().astype(np.float64)
    n = g.size
    all_levels = _levels(float(g.min()), float(g.max()), *steps_hu)
    # the level just below each voxel
    level_of = (np.searchsorted(all_levels, g, side="right") - 1).astype(np.int32)
    used = np.zeros(level_of.max() + _LEVELS[-1] + 1, dtype=bool)
    for j in _LEVELS:
        used[level_of + j] = True
    index = np.cumsum(used, dtype=np.int32) - 1  # absolute level -> compact level
    n_levels = int(used.sum())
    levels = all_levels[:used.size][used]
    grid_shape = (n_levels, *shape_low)
    # row ids of (level, cell) need 64 bits beyond 2^31
    idt = np.int64 if n_levels * n_cells >= 2**31 - 1 else np.int32
    zz, yy, xx = (a.astype(idt) for a in np.unravel_index(np.arange(n), guide.shape))
    zc = zz // dz
    cell = (zc * shape_low[1] + yy // dy + pad_y) * shape_low[2] + xx // dx + pad_x
    corner_ids, corner_w, corner_lin = _corners(yy, xx, zc, factors, shape_low, idt, quadratic)
    del zz, yy, xx, zc
    # Voxels where the guide changes by more than a range sigma within a cell ("steep": bone
    # and air edges, partial volume) are splatted with tent weights, the others into their cell:
    # a box moves a voxel by up to half a cell, which only averages out where the guide is flat.
    if dy > 1 or dx > 1:
        size = (1, 2 * dy - 1, 2 * dx - 1)
        smooth = ndimage.gaussian_filter(guide, (0, 1, 1))  # a noisy guide is not steep
        spread = ndimage.maximum_filter(smooth, size) - ndimage.minimum_filter(smooth, size)
        del smooth
        steep = np.flatnonzero(spread.ravel() > range_sigma)
        del spread
    else:
        steep = np.zeros(0, dtype=np.int64)
    # splat: each voxel into every used level within the range cut-off (a fixed number of
    # candidate levels per voxel, so the matrix is built column by column without sorting)
    reach = int(np.ceil(_RANGE_CUTOFF * range_sigma / min(steps_hu)))
    offsets = np.arange(-reach, reach + 2, dtype=np.int32)
    k_abs = level_of[:, None] + offsets  # (N, n_off)
    ok = (k_abs >= 0) & (k_abs < used.size)
    k_abs[~ok] = 0
    ok &= used[k_abs]
    k_row = index[k_abs].astype(idt, copy=False)
    del k_abs
    # float32 (N, n_off) temporaries: this is the largest memory of the filter
    w = levels.astype(np.float32)[k_row]
    np.subtract(guide.reshape(-1, 1), w, out=w)
    np.multiply(w, np.float32(1.0 / range_sigma), out=w)
    np.square(w, out=w)
    np.multiply(w, np.float32(-0.5), out=w)
    np.exp(w, out=w)
    ok &= w > np.exp(-0.5 * _RANGE_CUTOFF ** 2)
    k_row *= n_cells
    n_c = corner_ids.shape[1]
    n_t = n_c * offsets.size
    t_rows = (k_row[steep, :, None] + corner_ids[steep, None, :]).reshape(steep.size, n_t)
    t_w = (w[steep, :, None] * corner_w[steep, None, :]).reshape(steep.size, n_t)
    t_ok = np.repeat(ok[steep], n_c, axis=1) & (t_w > 0)
    ok[steep] = False
    k_row += cell[:, None]  # box rows, meaningful where ok
    del cell
    # slicing: cubic between the four levels around g(p), B-spline in plane (nearest in z);
    # bilinear (fewer cells) at flat voxels of bone and air, whose frames follow the guide
    if quadratic:
        plain = (g < _FINE_BAND_HU[0]) | (g > _FINE_BAND_HU[1])
        plain[steep] = False
        corner_w[plain] = corner_lin[plain]
        del plain
    del corner_lin
    reads = np.tile(corner_w > 0, len(_LEVELS))  # (N, 4 n_c): entries of the slicing matrix
    lw = _lagrange(g, tuple(all_levels[level_of + j] for j in _LEVELS))
    # the four levels read are consecutive used levels, so consecutive compact ones
    first: np.ndarray = index[level_of + _LEVELS[0]].astype(idt, copy=False)
    steps: np.ndarray = np.arange(len(_LEVELS), dtype=idt) * n_cells
    s_rows = ((first * n_cells)[:, None, None] + steps[:, None]
              + corner_ids[:, None, :]).reshape(n, -1)  # (N, 4 n_c), level-major
    del first
    del corner_ids
    # (level, cell) sets: read by slicing (need3), grown by each pass's reach (need2..0)
    taps = grid_taps(sigma_vox, factors, quadratic)  # z, y, x
    need3 = np.zeros(grid_shape, dtype=bool)
    need3.ravel()[s_rows[reads]] = True
    box_keys, box_w = k_row[ok], w[ok]
    del k_row, w
    tent_keys, tent_w = t_rows[t_ok], t_w[t_ok]
    del t_rows, t_w
    occupied = np.zeros(grid_shape, dtype=bool)
    occupied.ravel()[box_keys] = True
    occupied.ravel()[tent_keys] = True
    need2 = ndimage.maximum_filter1d(need3, len(taps[0]), axis=1, mode="constant")
    need1 = ndimage.maximum_filter1d(need2, len(taps[1]), axis=2, mode="constant")
    need0 = ndimage.maximum_filter1d(need1, len(taps[2]), axis=3, mode="constant") & occupied
    del occupied
    id0 = _ids(need0)
    n0 = int(need0.sum())
    box = _csc(box_keys, box_w, ok, np.arange(n), id0, n, n0)
    tent = _csc(tent_keys, tent_w, t_ok, steep, id0, n, n0)
    del box_keys, box_w, ok, tent_keys, tent_w, t_ok, id0
    # each pass numbers its rows in the order the next pass reads them: x last for the x pass
    # (need0, as the splat), then y last, z last, and the grid's own order for slicing
    jobs = ((need1, (0, 1, 3, 2), need0, 3, taps[2]), (need2, (0, 2, 3, 1), need1, 2, taps[1]),
            (need3, (0, 1, 2, 3), need2, 1, taps[0]))
    blur = tuple(map_chunks(partial(_job, jobs), len(jobs), chunk=1, workers=max(1, workers)))
    den = np.asarray(box.sum(axis=1) + tent.sum(axis=1), dtype=np.float32)
    for m in blur:
        den = m @ den
    den = den[:, 0]
    cols = _ids(need3)[s_rows]  # (N, 4 n_c)
    del s_rows
    # each level's corners are normalised by their own interpolated denominator; the
    # levels then mix with the cubic weights (renormalised if a level had no weight at all)
    vals = np.empty(cols.shape, dtype=np.float32)
    total = np.zeros(n)
    for j, wj in enumerate(lw):
        part = slice(n_c * j, n_c * j + n_c)
        d = (corner_w * den[cols[:, part]]).sum(axis=1, dtype=np.float64)
        has = d > 0
        vals[:, part] = corner_w * (np.where(has, wj, 0.0) / np.where(has, d, 1.0))[:, None]
        total += np.where(has, wj, 0.0)
    vals /= total[:, None].astype(np.float32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(reads.sum(axis=1), out=indptr[1:])
    slicer = sparse.csr_matrix((vals[reads], cols[reads], indptr), shape=(n, int(need3.sum())))
    log.debug("bilateral grid: %d levels x %s cells; %d steep voxels; rows used %d, %d, %d,"
                 " %d of %d", n_levels, shape_low, steep.size, n0, blur[0].shape[0],
                 blur[1].shape[0], blur[2].shape[0], need3.size)
    return Grid((box, tent), blur, slicer)


def apply_grid(grid: Grid, images: np.ndarray) -> np.ndarray:
    """Filter images (B, N) -> (B, N) float32 with the guide's grid."""
    cols = np.ascontiguousarray(images.T, dtype=np.float32)  # (N, B)
    box, tent = grid.splat
    x = box @ cols
    if tent.nnz:
        x += tent @ cols
    for m in grid.blur:
        x = m @ x
    return np.ascontiguousarray((grid.slice @ x).T)
