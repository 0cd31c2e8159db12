"""Joint bilateral filtering of every frame, with range weights from the temporal mean image.

Gava et al. 2023 (doi:10.3389/fninf.2023.852105) filter each frame with a 3D bilateral filter whose
range weights come from the mean of all frames (spatial sigma 3 mm, range sigma 20 HU):

    out_t(p) = sum_q Gs(p - q) Gr(g(p) - g(q)) I_t(q) / sum_q Gs(p - q) Gr(g(p) - g(q))

with g the guide (temporal mean), Gs a Gaussian in mm and Gr a Gaussian in HU. Brute force costs
~10^4 neighbours per voxel. Here the range axis is quantised into levels L_k (a third of the
range sigma apart over soft tissue and vessel values, -100 to 400 HU, half a sigma apart over
bone and air, whose frames follow the guide) and the filter becomes, per level, a normalised
Gaussian convolution of the frame weighted by Gr(L_k - g) (Durand & Dorsey 2002,
doi:10.1145/566654.566574; Yang et al. 2009, doi:10.1109/CVPR.2009.5206542), evaluated on a grid
down-sampled in plane by about sigma/2.2 (a bilateral grid, Chen et al. 2007,
doi:10.1145/1276377.1276506) and read back at g(p) by cubic interpolation between the four levels
around it (each level normalised by its own weight), with in-plane weights on the nearest cells.
Voxels where the guide is steep (bone and air edges, vessels, partial volume) are splatted onto
the grid with the same in-plane weights, the others into their cell. Only the (level, cell)
pairs that some voxel reads, with their Gaussian neighbourhoods, are kept, so splatting, the three
1D Gaussian passes and the normalised slicing are sparse matrices built once from the guide; every
frame then costs a few sparse products, a chunk of frames at a time as the columns of one product.
Two threads (``workers``) build the blur passes and filter chunks at the same time.

In-plane weights (``filter_weights``): bilinear (``"linear"``, default, fastest) or quadratic
B-splines. Bilinear weights spread a voxel over its cells by an amount that depends on where it
lies in its cell, so the kernel changes in its tails from voxel to voxel; B-splines spread every
voxel alike (Unser 1999, doi:10.1109/79.799930), for more time and memory. Accuracy against a
brute-force sum (tests/test_bilateral.py), time and memory: docs/preprocessing.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np

from ctperf.errors import ValidationError
from ctperf.filter_options import MAX_RANGE_SIGMA_HU, MAX_SPATIAL_SIGMA_MM
from ctperf.parallel import map_chunks
from ctperf.preprocess.bilateral_grid import Grid, apply_grid, build_grid, grid_taps
from ctperf.types import CTPSeries

__all__ = ["SLAB_BUDGET", "bilateral_filter", "joint_bilateral"]

log = logging.getLogger(__name__)


#: Peak memory (bytes) that building one slab's grid may take (docs/preprocessing.md, "Speed
#: and memory"); a study whose grid would take more is filtered slab by slab along z.
SLAB_BUDGET = 5_000_000_000
#: Bytes the build takes per blur entry (grid cell x tap: the blur passes hold some 26 range
#: levels of every cell) and per voxel (the splat and slicing matrices and the temporaries of
#: building them; quadratic weights read more cells), fitted to the peaks measured on head
#: studies of 0.45 and 0.9 mm pixels (docs/preprocessing.md; within 10-25 %).
_ENTRY_BYTES, _VOXEL_BYTES = 125, {False: 1000, True: 1500}


@dataclass(frozen=True)
class _Setup:
    """What the grid of a guide is built with (parameters as :func:`joint_bilateral`'s)."""

    sigma_vox: tuple[float, float, float]
    steps_hu: tuple[float, float]
    range_sigma_hu: float
    factors: tuple[int, int, int]
    quadratic: bool

    @classmethod
    def of(cls, spacing: tuple[float, float, float], *, spatial_sigma_mm: float,
           range_sigma_hu: float, levels_per_sigma: float, levels_per_sigma_outside: float,
           cells_per_sigma: float, filter_weights: str) -> _Setup:
        values = (spatial_sigma_mm, range_sigma_hu, levels_per_sigma, levels_per_sigma_outside,
                  cells_per_sigma)
        if not all(np.isfinite(v) and v > 0 for v in values):  # NaN compares False to all
            raise ValidationError("spatial_sigma_mm, range_sigma_hu, levels_per_sigma(_outside) "
                                  f"and cells_per_sigma must be finite and > 0, got {values}")
        if spatial_sigma_mm > MAX_SPATIAL_SIGMA_MM or range_sigma_hu > MAX_RANGE_SIGMA_HU:
            # a probe's 1e6 mm and 1e9 HU had written a uniform study, exit 0
            raise ValidationError(f"spatial_sigma_mm must be at most {MAX_SPATIAL_SIGMA_MM:g} "
                                  f"and range_sigma_hu at most {MAX_RANGE_SIGMA_HU:g} (the "
                                  f"paper's 3 mm and 20 HU), got {spatial_sigma_mm:g} and "
                                  f"{range_sigma_hu:g}")
        if len(spacing) != 3 or not min(spacing) > 0:
            raise ValidationError(f"spacing must be three voxel sizes > 0 in mm, got {spacing}")
        if filter_weights not in ("linear", "quadratic"):
            raise ValidationError('filter_weights must be "linear" or "quadratic", got '
                                  f"{filter_weights!r}")
        sz, sy, sx = (spatial_sigma_mm / float(v) for v in spacing)
        # cells_per_sigma low-resolution cells per sigma, never coarser than 8 voxels
        fz, fy, fx = (int(min(8, max(1, np.floor(v / cells_per_sigma)))) for v in (sz, sy, sx))
        return cls((sz, sy, sx), (range_sigma_hu / levels_per_sigma,
                                  range_sigma_hu / levels_per_sigma_outside),
                   range_sigma_hu, (fz, fy, fx), filter_weights == "quadratic")

    def build(self, guide: np.ndarray, workers: int) -> Grid:
        return build_grid(guide, self.sigma_vox, self.steps_hu, self.range_sigma_hu,
                          self.factors, self.quadratic, workers=workers)

    def grid_bytes(self, shape: tuple[int, int, int]) -> int:
        """Estimated peak bytes of building the grid of a volume of ``shape`` (Z, Y, X)."""
        nz, ny, nx = shape
        fz, fy, fx = self.factors
        taps = grid_taps(self.sigma_vox, self.factors, self.quadratic)
        cells = (-(-ny // fy) + 2 * (fy > 1)) * (-(-nx // fx) + 2 * (fx > 1))
        per_layer = (_ENTRY_BYTES * cells * sum(len(t) for t in taps)
                     + _VOXEL_BYTES[self.quadratic] * fz * ny * nx)
        return per_layer * -(-nz // fz)

    def slabs(self, shape: tuple[int, int, int], budget: int) -> list[tuple[int, int, int, int]]:
        """Slabs (first, core start, core stop, stop) along z whose grids take at most about
        ``budget`` bytes to build (:meth:`grid_bytes`): each core is filtered exactly as within
        the whole volume, its halo (what the z pass reaches, whole grid layers) read but not
        written."""
        nz, ny, nx = shape
        fz = self.factors[0]
        halo = len(grid_taps(self.sigma_vox, self.factors, self.quadratic)[0]) // 2  # layers
        per_layer = self.grid_bytes((fz, ny, nx))
        n_layers = -(-nz // fz)
        if n_layers * per_layer <= budget:
            return [(0, 0, nz, nz)]
        core = max(budget // max(per_layer, 1) - 2 * halo, halo, 1)
        return [(max(c - halo, 0) * fz, c * fz, min((c + core) * fz, nz),
                 min((c + core + halo) * fz, nz)) for c in range(0, n_layers, core)]


def joint_bilateral(images: np.ndarray, guide: np.ndarray, *,
                    spacing: tuple[float, float, float], spatial_sigma_mm: float = 3.0,
                    range_sigma_hu: float = 20.0, levels_per_sigma: float = 3.0,
                    levels_per_sigma_outside: float = 2.0,
                    cells_per_sigma: float = 2.2, filter_weights: str = "linear", chunk: int = 0,
                    workers: int = 2, out: np.ndarray | None = None,
                    slab_budget: int = SLAB_BUDGET, progress: bool = False) -> np.ndarray:
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
        Range levels per range sigma of the grid every volume goes through (its cost grows
        with them), for guide values of soft tissue and vessels (-100 to 400 HU).
    levels_per_sigma_outside : float
        The same for guide values outside that band (bone, air and partial volume with them).
    cells_per_sigma : float
        Low-resolution grid cells per spatial sigma (in-plane down-sampling of the grid; 1 cell
        per voxel when the voxels are coarser than that).
    filter_weights : {"linear", "quadratic"}
        In-plane weights between voxels and down-sampled cells. "linear" (bilinear slicing, box
        splatting where the guide is flat, bilinear where steep) is the fastest; its kernel
        depends on where a voxel lies in its cell, which shows next to strong contrast between
        frame and guide (a contrast-filled artery). "quadratic" (quadratic B-splines for
        slicing and at steep voxels) stays close to the exact filter there too, for more time
        and memory (figures in docs/preprocessing.md).
    chunk : int
        Volumes filtered per sparse product (memory grows with it and with ``workers``);
        0: 8 volumes in all, shared between the workers.
    workers : int
        Threads: the grid's three blur passes are built, and chunks filtered, at the same
        time (numpy and scipy's sparse products release the GIL).
    out : ndarray, float32, shape (B, Z, Y, X), optional
        Where to write the result; may be ``images`` itself (each chunk is read before it is
        overwritten), which saves a copy of the study.
    slab_budget : int
        Bytes that building the grid may take (:data:`SLAB_BUDGET`, estimated from the grid's
        cells and taps and the voxels); a volume whose grid needs more is filtered in slabs
        along z, each with a halo of the slices its core's blur
        reaches: the same result, in memory bounded by the budget, for the time of the halos.
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
    bad = int(np.count_nonzero(~np.isfinite(images)))
    if bad:  # one NaN would spread through the grid to every voxel sharing its cells
        raise ValidationError(f"the images contain {bad} NaN or Inf values")
    if not np.all(np.isfinite(guide)):
        raise ValidationError("the guide contains NaN or Inf")
    setup = _Setup.of(spacing, spatial_sigma_mm=spatial_sigma_mm, range_sigma_hu=range_sigma_hu,
                      levels_per_sigma=levels_per_sigma,
                      levels_per_sigma_outside=levels_per_sigma_outside,
                      cells_per_sigma=cells_per_sigma, filter_weights=filter_weights)
    if out is None:
        out = np.empty_like(images)
    elif out.shape != images.shape or out.dtype != np.float32:
        raise ValidationError(f"out must be float32 {images.shape}, got {out.dtype} {out.shape}")
    chunk = chunk if chunk > 0 else max(1, 8 // max(1, workers))
    slabs = setup.slabs(guide.shape, slab_budget)
    in_place = np.shares_memory(out, images)
    if len(slabs) > 1:
        log.info("bilateral filter in %d slabs of up to %d slices (its grid would not fit the "
                 "budget of %.1f GB whole)", len(slabs),
                 max(end - first for first, _, _, end in slabs), slab_budget / 1e9)
    kept: np.ndarray | None = None  # rows a slab overwrote in place that the next one reads
    for i, (first, start, stop, end) in enumerate(slabs):
        grid = setup.build(guide[first:end], workers)
        slab = _Slab(images, kept, first, end, (start - first, stop - first), start)
        if in_place and i + 1 < len(slabs):
            kept = images[:, slabs[i + 1][0]:stop].copy()
        desc = "bilateral" if len(slabs) == 1 else f"bilateral, slab {i + 1}/{len(slabs)}"
        map_chunks(partial(_filter_chunk, grid, slab, out), len(images), chunk=chunk,
                   workers=max(1, workers), progress=progress, desc=desc, unit="volume")
        del grid, slab  # before the next slab's grid is built: one grid at a time
    return out


@dataclass(frozen=True)
class _Slab:
    """Slices ``first:end`` of ``images`` (B, Z, Y, X), whose first rows are ``kept`` (B, k, Y,
    X) when a slab before overwrote them in place; its ``core`` (of the slab's slices) is
    written from slice ``at``."""

    images: np.ndarray
    kept: np.ndarray | None
    first: int
    end: int
    core: tuple[int, int]
    at: int

    def read(self, start: int, stop: int) -> np.ndarray:
        """Volumes start:stop of the slab, (stop - start, Z', Y, X)."""
        if self.kept is None:
            return self.images[start:stop, self.first:self.end]
        rest = self.images[start:stop, self.first + self.kept.shape[1]:self.end]
        return np.concatenate([self.kept[start:stop], rest], axis=1)


def _filter_chunk(grid: Grid, slab: _Slab, out: np.ndarray, start: int, stop: int) -> None:
    """Filter volumes start:stop of a slab with its grid and write its core to ``out``. Chunks
    are disjoint, so ``out`` may hold the images: each chunk reads its block before writing
    it."""
    block = np.ascontiguousarray(slab.read(start, stop))
    filtered = apply_grid(grid, block.reshape(stop - start, -1)).reshape(block.shape)
    lo, hi = slab.core
    out[start:stop, slab.at:slab.at + hi - lo] = filtered[:, lo:hi]


def bilateral_filter(series: CTPSeries, *, spatial_sigma_mm: float = 3.0,
                     range_sigma_hu: float = 20.0, guide: np.ndarray | None = None,
                     filter_weights: str = "linear", in_place: bool = False, workers: int = 2,
                     progress: bool = False) -> CTPSeries:
    """Filter every frame with a 3D bilateral filter guided by the temporal mean.

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    spatial_sigma_mm : float
        Spatial Gaussian sigma in mm (the same in every direction; voxels may be anisotropic).
    range_sigma_hu : float
        Range Gaussian sigma in HU. The paper's 20 HU only partly protects tissue/CSF edges
        (steps of 15-45 HU at 80 kV): a 27 HU step widens by about 4 mm (10-90 %), while 10 HU
        keeps it and reduces noise in flat tissue as much.
    guide : ndarray, shape (Z, Y, X), optional
        Guide image; default the mean of all frames.
    filter_weights : {"linear", "quadratic"}
        Speed/accuracy of the grid next to strong frame/guide contrast; see `joint_bilateral`.
    in_place : bool
        Overwrite ``series.hu`` with the result instead of allocating a second study (for
        pipelines that own the series).
    workers : int
        Threads filtering chunks of frames at once; see `joint_bilateral`.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CTPSeries
        The filtered study (same grid, times and metadata, ``meta["bilateral"]`` added).
    """
    if in_place and not series.hu.flags.writeable:
        raise ValidationError("in_place=True needs a writeable study: its hu is read-only (a "
                              "read-only memmap or array); filter a copy (in_place=False)")
    g = series.hu.mean(axis=0, dtype=np.float64).astype(np.float32) if guide is None \
        else np.asarray(guide, dtype=np.float32)
    if g.shape != series.shape[1:]:
        raise ValidationError(f"guide shape {g.shape} differs from the study grid "
                              f"{series.shape[1:]} (Z, Y, X)")
    hu = joint_bilateral(series.hu, g, spacing=series.spacing,
                         spatial_sigma_mm=spatial_sigma_mm, range_sigma_hu=range_sigma_hu,
                         filter_weights=filter_weights, workers=workers,
                         out=series.hu if in_place else None, progress=progress)
    meta = dict(series.meta)
    meta["bilateral"] = {"spatial_sigma_mm": spatial_sigma_mm, "range_sigma_hu": range_sigma_hu,
                         "guide": "temporal mean" if guide is None else "given",
                         "filter_weights": filter_weights}
    return series.replace(hu=hu, meta=meta)
