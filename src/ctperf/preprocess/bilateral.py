"""Joint bilateral filtering of every frame, with range weights from the temporal mean image.

Gava et al. 2023 (doi:10.3389/fninf.2023.852105) filter each frame with a 3D bilateral filter whose
range weights come from the mean of all frames (spatial sigma 3 mm, range sigma 20 HU):

    out_t(p) = sum_q Gs(p - q) Gr(g(p) - g(q)) I_t(q) / sum_q Gs(p - q) Gr(g(p) - g(q))

with g the guide (temporal mean), Gs a Gaussian in mm and Gr a Gaussian in HU. Brute force costs
~10^4 neighbours per voxel. Here the range axis is quantised into levels L_k a fraction of the
range sigma apart and the filter becomes, per level, a normalised Gaussian convolution of the frame
weighted by Gr(L_k - g) (Durand & Dorsey 2002, doi:10.1145/566654.566574; Yang et al. 2009,
doi:10.1109/CVPR.2009.5206542), evaluated on a grid down-sampled in plane by about sigma/1.6 and
interpolated back (a bilateral grid, Chen et al. 2007, doi:10.1145/1276377.1276506): linearly
between the two levels around g(p), bilinearly in plane. Only the (level, cell) pairs that some
voxel reads, with their Gaussian neighbourhoods, are kept, so splatting, the three 1D Gaussian
passes and the normalised slicing are four sparse matrices built once from the guide; every frame
then costs four sparse products, a chunk of frames at a time as the columns of one product.

Optionally (``refine_guide``), to come closer to brute force at high-contrast edges (bone, air),
each frame is split into the guide plus its difference from the guide: the guide is filtered once
with twice finer levels, the difference (small: contrast and noise) with the default levels, and
the filter being linear in the image, the two results add up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

from ctperf.errors import ValidationError
from ctperf.types import CTPSeries

__all__ = ["bilateral_filter", "joint_bilateral"]

logger = logging.getLogger(__name__)

_RANGE_CUTOFF = 4.0  # range weights are dropped beyond this many range sigmas (exp(-8) = 3e-4)


@dataclass(frozen=True)
class _Grid:
    """Everything that depends on the guide only: sparse operators applied in turn."""

    splat: sparse.csc_matrix  # (R0, N): range weight of voxel q in each used (level, cell)
    blur: tuple[sparse.csr_matrix, ...]  # x, y, z Gaussian passes between used (level, cell) sets
    slice: sparse.csr_matrix  # (N, R3): tent x bilinear weights over the normalisation
    n_levels: int
    shape_low: tuple[int, int, int]


def _kernel(sigma: float) -> np.ndarray:
    """Sampled Gaussian taps for offsets -r..r, r = int(4 sigma + 0.5) (scipy's truncation)."""
    r = int(4.0 * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return np.ones(1)
    x = np.arange(-r, r + 1)
    return np.exp(-0.5 * (x / sigma) ** 2)


def _ids(mask: np.ndarray) -> np.ndarray:
    """Compact row id of every True entry of a mask, flattened (-1 elsewhere), int32."""
    flat = mask.ravel()
    ids = np.cumsum(flat, dtype=np.int32) - 1
    ids[~flat] = -1
    return ids


def _pass(rows_mask: np.ndarray, cols_mask: np.ndarray, axis: int,
          taps: np.ndarray) -> sparse.csr_matrix:
    """One 1D Gaussian along ``axis`` of (K, Z, Yl, Xl), from the cols set to the rows set."""
    shape = rows_mask.shape
    r = len(taps) // 2
    rows = np.flatnonzero(rows_mask.ravel())
    coords = np.unravel_index(rows, shape)[axis]
    col_ids = _ids(cols_mask)
    stride = int(np.prod(shape[axis + 1:]))
    cid = np.full((rows.size, 2 * r + 1), -1, dtype=np.int32)
    for j, o in enumerate(range(-r, r + 1)):
        ok = (coords + o >= 0) & (coords + o < shape[axis])
        cid[ok, j] = col_ids[rows[ok] + o * stride]
    valid = cid >= 0
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    data = np.broadcast_to(taps.astype(np.float32), cid.shape)[valid]
    # row-major order keeps each row's columns sorted (ids grow along every axis)
    return sparse.csr_matrix((data, cid[valid], indptr),
                             shape=(rows.size, int(cols_mask.sum())))


def _build_grid(guide: np.ndarray, sigma_vox: tuple[float, float, float], step_hu: float,
                range_sigma: float, factors: tuple[int, int, int]) -> _Grid:
    nz, ny, nx = guide.shape
    dz, dy, dx = factors
    shape_low = (-(-nz // dz), -(-ny // dy), -(-nx // dx))
    n_cells = int(np.prod(shape_low))
    # Down-sampling by a box of d and up-sampling by a tent of d add about d^2/4 voxel^2 of
    # variance; the low-resolution Gaussian makes up the rest.
    sigma_low = tuple(float(np.sqrt(max(s * s - (d * d - 1) / 4.0, 0.0)) / d) if d > 1
                      else float(s) for s, d in zip(sigma_vox, factors, strict=True))
    g = guide.ravel().astype(np.float64)
    n = g.size
    lo = g.min() - step_hu
    level_of = np.floor((g - lo) / step_hu).astype(np.int32)  # level just below each voxel
    used = np.zeros(level_of.max() + 2, dtype=bool)
    used[level_of] = True
    used[level_of + 1] = True
    index = np.cumsum(used, dtype=np.int32) - 1  # absolute level -> compact level
    n_levels = int(used.sum())
    levels = lo + step_hu * np.flatnonzero(used)
    zz, yy, xx = (a.astype(np.int32) for a in np.unravel_index(np.arange(n), guide.shape))
    cell = ((zz // dz) * shape_low[1] + yy // dy) * shape_low[2] + xx // dx
    grid_shape = (n_levels, *shape_low)
    if n_levels * n_cells >= 2**31 - 1:  # row ids of (level, cell) need 64 bits
        index, cell = index.astype(np.int64), cell.astype(np.int64)
    # splat: each voxel into every used level within the range cut-off (a fixed number of
    # candidate levels per voxel, so the matrix is built column by column without sorting)
    reach = int(np.ceil(_RANGE_CUTOFF * range_sigma / step_hu))
    offsets = np.arange(-reach, reach + 2, dtype=np.int32)
    k_abs = level_of[:, None] + offsets  # (N, n_off)
    ok = (k_abs >= 0) & (k_abs < used.size)
    k_abs[~ok] = 0
    ok &= used[k_abs]
    k_cmp = index[k_abs]
    del k_abs
    # float32 (N, n_off) temporaries: this is the largest memory of the filter
    w = levels.astype(np.float32)[k_cmp]
    np.subtract(guide.reshape(-1, 1), w, out=w)
    np.multiply(w, np.float32(1.0 / range_sigma), out=w)
    np.square(w, out=w)
    np.multiply(w, np.float32(-0.5), out=w)
    np.exp(w, out=w)
    ok &= w > np.exp(-0.5 * _RANGE_CUTOFF ** 2)
    k_cmp *= n_cells
    k_cmp += cell[:, None]
    splat_rows = k_cmp  # (N, n_off) row of (level, cell), meaningful where ok
    del k_cmp
    # slicing: tent between the two levels around g(p), bilinear in plane (nearest cell in z)
    k0 = index[level_of]
    t1 = (g - levels[k0]) / step_hu
    zc = zz // dz
    uy = np.clip((yy - (dy - 1) / 2.0) / dy, 0, shape_low[1] - 1)
    ux = np.clip((xx - (dx - 1) / 2.0) / dx, 0, shape_low[2] - 1)
    y0 = np.minimum(np.floor(uy).astype(np.int64), shape_low[1] - 1)
    x0 = np.minimum(np.floor(ux).astype(np.int64), shape_low[2] - 1)
    fy, fx = uy - y0, ux - x0
    y1 = np.minimum(y0 + 1, shape_low[1] - 1)
    x1 = np.minimum(x0 + 1, shape_low[2] - 1)
    c_rows, c_coef = [], []
    for k, wk in ((k0, 1 - t1), (k0 + 1, t1)):
        for yc, wy in ((y0, 1 - fy), (y1, fy)):
            for xc, wx in ((x0, 1 - fx), (x1, fx)):
                c_rows.append(k * n_cells + (zc * shape_low[1] + yc) * shape_low[2] + xc)
                c_coef.append(wk * wy * wx)
    # (level, cell) sets: read by slicing (need3), grown by each pass's reach (need2..0)
    taps = [_kernel(s) for s in sigma_low]  # z, y, x
    need3 = np.zeros(grid_shape, dtype=bool)
    need3.ravel()[np.concatenate(c_rows)] = True
    occupied = np.zeros(grid_shape, dtype=bool)
    occupied.ravel()[splat_rows[ok]] = True
    need2 = ndimage.maximum_filter1d(need3, len(taps[0]), axis=1, mode="constant")
    need1 = ndimage.maximum_filter1d(need2, len(taps[1]), axis=2, mode="constant")
    need0 = ndimage.maximum_filter1d(need1, len(taps[2]), axis=3, mode="constant") & occupied
    id0 = _ids(need0)[splat_rows]
    del splat_rows
    ok &= id0 >= 0
    w[~ok] = 0.0  # unused entries stay as explicit zeros on row 0
    id0[~ok] = 0
    del ok
    splat = sparse.csc_matrix(
        (w.ravel(), id0.ravel(), np.arange(0, w.size + 1, w.shape[1])),
        shape=(int(need0.sum()), n))
    del w, id0
    blur = (_pass(need1, need0, 3, taps[2]), _pass(need2, need1, 2, taps[1]),
            _pass(need3, need2, 1, taps[0]))
    den = np.asarray(splat.sum(axis=1), dtype=np.float32)
    for m in blur:
        den = m @ den
    id3 = _ids(need3)
    # normalise each half (lower and upper level) by its own interpolated denominator
    cols = np.stack([id3[r] for r in c_rows], axis=1)  # (N, 8)
    coef = np.stack(c_coef, axis=1)  # (N, 8)
    vals = np.empty((n, 8), dtype=np.float32)
    for half in (slice(0, 4), slice(4, 8)):
        d = (coef[:, half] * den[cols[:, half], 0]).sum(axis=1)
        scale = np.where(d > 0, coef[:, half].sum(axis=1) / np.maximum(d, 1e-30), 0.0)
        vals[:, half] = coef[:, half] * scale[:, None]
    slicer = sparse.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, 8 * n + 1, 8)),
                               shape=(n, int(need3.sum())))
    logger.debug("bilateral grid: %d levels x %s cells; rows used %d, %d, %d, %d of %d",
                 n_levels, shape_low, splat.shape[0], blur[0].shape[0], blur[1].shape[0],
                 blur[2].shape[0], need3.size)
    return _Grid(splat, blur, slicer, n_levels, shape_low)


def _apply(grid: _Grid, images: np.ndarray) -> np.ndarray:
    """Filter images (B, N) -> (B, N) float32 with the guide's grid."""
    x = grid.splat @ np.ascontiguousarray(images.T, dtype=np.float32)  # (R0, B)
    for m in grid.blur:
        x = m @ x
    return np.ascontiguousarray((grid.slice @ x).T)


def joint_bilateral(images: np.ndarray, guide: np.ndarray, *,
                    spacing: tuple[float, float, float], spatial_sigma_mm: float = 3.0,
                    range_sigma_hu: float = 20.0, levels_per_sigma: float = 2.0,
                    cells_per_sigma: float = 1.6, refine_guide: bool = False, chunk: int = 8,
                    out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Joint bilateral filter of a stack of volumes sharing one guide.

    Parameters
    ----------
    images : ndarray, shape (B, Z, Y, X)
        Volumes to filter (HU).
    guide : ndarray, shape (Z, Y, X)
        Image whose values set the range weights (HU).
    spacing : (dz, dy, dx)
        Voxel size in mm.
    spatial_sigma_mm, range_sigma_hu : float
        Gaussian widths in mm and HU.
    levels_per_sigma : float
        Range levels per range sigma.
    cells_per_sigma : float
        Low-resolution grid cells per spatial sigma (in-plane down-sampling of the grid).
    refine_guide : bool
        Filter the guide once with twice finer levels and the frames' differences from it with
        the normal ones (closer to brute force at bone and air edges; about twice the setup time
        and memory).
    chunk : int
        Volumes filtered per sparse product (memory grows with it).
    out : ndarray, float32, shape (B, Z, Y, X), optional
        Where to write the result; may be ``images`` itself (each chunk is read before it is
        overwritten), which saves a copy of the study.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ndarray, float32, shape (B, Z, Y, X)
    """
    images = np.asarray(images, dtype=np.float32)
    guide = np.asarray(guide, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != guide.shape:
        raise ValidationError(f"images (B, Z, Y, X) {images.shape} and guide (Z, Y, X) "
                              f"{guide.shape} must share the volume shape")
    if spatial_sigma_mm <= 0 or range_sigma_hu <= 0 or levels_per_sigma <= 0:
        raise ValidationError("spatial_sigma_mm, range_sigma_hu and levels_per_sigma must be > 0")
    sz, sy, sx = (spatial_sigma_mm / float(s) for s in spacing)
    sigma_vox = (sz, sy, sx)
    # cells_per_sigma low-resolution cells per sigma, never coarser than 8 voxels
    fz, fy, fx = (int(min(8, max(1, np.floor(s / cells_per_sigma)))) for s in sigma_vox)
    factors = (fz, fy, fx)
    step = range_sigma_hu / levels_per_sigma
    flat_guide = guide.ravel()
    if refine_guide:
        fine = _build_grid(guide, sigma_vox, step / 2, range_sigma_hu, factors)
        base = _apply(fine, guide.reshape(1, -1))[0]
        del fine
    grid = _build_grid(guide, sigma_vox, step, range_sigma_hu, factors)
    logger.debug("bilateral grid: %d levels x %s cells", grid.n_levels, grid.shape_low)
    if out is None:
        out = np.empty_like(images)
    elif out.shape != images.shape or out.dtype != np.float32:
        raise ValidationError(f"out must be float32 {images.shape}, got {out.dtype} {out.shape}")
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(images), chunk), disable=not progress, desc="bilateral",
                      unit="chunk"):
        block = images[start:start + chunk].reshape(-1, guide.size)
        if refine_guide:
            result = _apply(grid, block - flat_guide) + base
        else:
            result = _apply(grid, block)
        out[start:start + chunk] = result.reshape((-1, *guide.shape))
    return out


def bilateral_filter(series: CTPSeries, *, spatial_sigma_mm: float = 3.0,
                     range_sigma_hu: float = 20.0, guide: np.ndarray | None = None,
                     in_place: bool = False, progress: bool = False) -> CTPSeries:
    """Filter every frame with a 3D bilateral filter guided by the temporal mean.

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    spatial_sigma_mm : float
        Spatial Gaussian sigma in mm (the same in every direction; voxels may be anisotropic).
    range_sigma_hu : float
        Range Gaussian sigma in HU.
    guide : ndarray, shape (Z, Y, X), optional
        Guide image; default the mean of all frames.
    in_place : bool
        Overwrite ``series.hu`` with the result instead of allocating a second study (for
        pipelines that own the series).
    progress : bool
        Show a progress bar.

    Returns
    -------
    CTPSeries
        The filtered study (same grid, times and metadata, ``meta["bilateral"]`` added).
    """
    g = series.hu.mean(axis=0, dtype=np.float64).astype(np.float32) if guide is None \
        else np.asarray(guide, dtype=np.float32)
    if g.shape != series.shape[1:]:
        raise ValidationError(f"guide shape {g.shape} differs from the study grid "
                              f"{series.shape[1:]} (Z, Y, X)")
    hu = joint_bilateral(series.hu, g, spacing=series.spacing,
                         spatial_sigma_mm=spatial_sigma_mm, range_sigma_hu=range_sigma_hu,
                         out=series.hu if in_place else None, progress=progress)
    meta = dict(series.meta)
    meta["bilateral"] = {"spatial_sigma_mm": spatial_sigma_mm, "range_sigma_hu": range_sigma_hu,
                         "guide": "temporal mean" if guide is None else "given"}
    return series.replace(hu=hu, meta=meta)
