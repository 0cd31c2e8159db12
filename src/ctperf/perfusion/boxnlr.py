"""Box-model nonlinear regression (Bennink et al. 2016, doi:10.1117/1.JMI.3.2.026003).

Two fits, both vectorised over all voxels of a chunk at once (loops run over iterations only):

- ``"nlr"``: plain downhill simplex (Nelder-Mead) as in the reference, 300 iterations, start CBF
  60 mL/100 g/min, MTT 5 s, delay 3.5 s, stopping per voxel on the usual x and f tolerances,
  no restarts. The simplex moves in (CBV, MTT, delay) coordinates, its initial steps
  :data:`DEFAULT_STEPS` around the start (MATLAB's ``fminsearch`` 5 % simplex is available,
  but stalls on a fraction of voxels).
- ``"nlr-fast"``: a grid start over (MTT, delay) with the linear parameter CBF solved in closed
  form (variable projection, one matrix product for all voxels), then trust-region Newton steps
  in (delay, delay + MTT) with CBF eliminated, using the exact derivatives of the O(1) objective
  (:mod:`ctperf.perfusion.newton`).
  With non-uniform frame times, the polish is Levenberg-Marquardt with the analytic Jacobian of
  the box model, parameters projected onto their bounds after every step.

Evenly spaced frames more than :data:`FIT_STEP_S` apart are fitted on a grid that divides each
frame interval evenly into steps of at most that (:func:`fit_grid`), the AIF and the tissue
curves interpolated linearly onto it (after the band limit, which works in frames): the box
model integrates the AIF as a straight line between its samples, and between samples 2 s apart
that line cuts the bolus's peak, which a short box fitted at the frames alone made up for with
CBF up to twice the true (docs/methods.md, "Box fits on coarse frames"). The misfit
(``residual``) is measured at the frames.

With evenly spaced frames both methods evaluate the sum of squared errors through
:class:`~ctperf.perfusion.fastsse.FastBoxSSE` (exact, a few gathers per evaluation instead of a
pass over all frames). Chunks of voxels are fitted in parallel threads on the CPU
(:func:`ctperf.parallel.map_chunks`). The same code runs on PyTorch tensors on a GPU
(``device="cuda"``, ``"cuda:N"`` or ``"auto"``), in float64; torch is imported only then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.io.integrity import fit_times
from ctperf.parallel import map_chunks, usable_cores
from ctperf.perfusion.backend import ArrayOps, resolve_torch_device
from ctperf.perfusion.curves import (
    ArterialTable,
    aif_area,
    bandlimit,
    box_model,
    evenly_spaced,
    finite_aif,
    flow_scale,
    resample,
)
from ctperf.perfusion.fastsse import FastBoxSSE
from ctperf.perfusion.nelder_mead import nelder_mead
from ctperf.perfusion.newton import refine_newton

__all__ = ["BOX_METHODS", "DEFAULT_BOUNDS", "DEFAULT_STEPS", "FIT_STEP_S", "TMAX_MTT_FRACTION",
           "BoxFit", "fit_box_nlr", "fit_grid"]

log = logging.getLogger(__name__)

#: The methods that fit the box model.
BOX_METHODS: tuple[str, ...] = ("nlr", "nlr-fast")

#: Physical bounds of (CBF mL/100 g/min, MTT s, delay s).
DEFAULT_BOUNDS: tuple[tuple[float, float], ...] = ((0.0, 300.0), (1.0, 30.0), (-3.0, 20.0))

#: Initial simplex of ``"nlr"``: absolute steps from the start in the simplex's coordinates
#: (CBV mL/100 g, MTT s, delay s). A simplex of 5 % of the start (0.175 s of delay, a fraction
#: of a frame) is too small to see past the flat and multimodal parts of the box model's misfit
#: and stalls there; 1 mL/100 g and 2 s in time find the least-squares minimum that the
#: grid-started fit finds (see docs/methods.md).
DEFAULT_STEPS: tuple[float, float, float] = (1.0, 2.0, 2.0)

#: Longest time step (s) the box fits work on: evenly spaced frames further apart are fitted on
#: a grid dividing each frame interval evenly (see the module's docstring).
FIT_STEP_S = 0.5

#: Box-model Tmax = delay + TMAX_MTT_FRACTION x MTT (see :class:`BoxFit`).
TMAX_MTT_FRACTION = 0.25


@dataclass(frozen=True)
class BoxFit:
    """Box-model parameters per voxel, each an ndarray of shape (N,), float64.

    ``cbf`` mL/100 g/min, ``cbv`` mL/100 g, ``mtt`` s, ``delay`` s (start of the box after the
    AIF), ``tmax`` s, ``residual`` root-mean-square misfit in HU.

    Tmax follows the package's convention: the effective delay plus the time at which the
    dispersed residue ``(h * R)(t)`` peaks (first time for a flat top), the quantity SVD
    deconvolution estimates and on which the clinical Tmax > 6 s threshold was set. A fitted
    box carries no dispersion and no residue shape, so its Tmax is the calibrated expression
    ``delay + TMAX_MTT_FRACTION * MTT``: fitted to the true Tmax of exponential and gamma
    residues with exponential dispersion, over healthy, penumbral and core parameter ranges.
    The reference implementations report ``delay + MTT / 2``, which lies seconds later than
    that Tmax on such residues (see docs/methods.md).
    """

    cbf: np.ndarray
    cbv: np.ndarray
    mtt: np.ndarray
    delay: np.ndarray
    tmax: np.ndarray
    residual: np.ndarray


def _model_and_jacobian(p: np.ndarray, table: ArterialTable, scale: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    x1 = table.t[:, None] - p[:, 2]
    x2 = x1 - p[:, 1]
    k = scale * p[:, 0]
    unit = scale * (table.integral(x1) - table.integral(x2))
    c2 = table.value(x2)
    jac = np.empty((*unit.shape, 3))
    jac[..., 0] = unit
    jac[..., 1] = k * c2
    jac[..., 2] = -k * (table.value(x1) - c2)
    return p[:, 0] * unit, jac


def _grid_start(tis: np.ndarray, table: ArterialTable, scale: float,
                bounds: np.ndarray, n_mtt: int, delay_step: float) -> np.ndarray:
    mtts = np.geomspace(max(bounds[1, 0], 1e-3), bounds[1, 1], n_mtt)
    delays = np.arange(bounds[2, 0], bounds[2, 1] + 1e-9, delay_step)
    mm, dd = np.meshgrid(mtts, delays, indexing="ij")
    grid = np.stack([np.ones(mm.size), mm.ravel(), dd.ravel()], axis=1)
    basis = box_model(grid, table, scale=scale)  # (T, G), unit CBF
    norm2 = np.einsum("tg,tg->g", basis, basis)
    keep = norm2 > 1e-12 * norm2.max()
    basis, norm2, grid = basis[:, keep], norm2[keep], grid[keep]
    proj = tis.T @ basis  # (N, G)
    gain = np.where(proj > 0, proj * proj / norm2, 0.0)
    best = np.argmax(gain, axis=1)
    cbf = np.take_along_axis(proj, best[:, None], axis=1)[:, 0] / norm2[best]
    start = grid[best].copy()
    start[:, 0] = cbf
    return np.clip(start, bounds[:, 0], bounds[:, 1])


def _levenberg_marquardt(tis: np.ndarray, p: np.ndarray, table: ArterialTable, scale: float,
                         bounds: np.ndarray, n_iter: int, rtol: float) -> np.ndarray:
    model, jac = _model_and_jacobian(p, table, scale)
    res = tis - model
    sse = np.einsum("tn,tn->n", res, res)
    lam = np.full(p.shape[0], 1e-3)
    active = np.arange(p.shape[0])
    eye = np.eye(3)
    for _ in range(n_iter):
        if active.size == 0:
            break
        j, r = jac[:, active], res[:, active]
        jtj = np.einsum("tni,tnj->nij", j, j)
        g = np.einsum("tni,tn->ni", j, r)
        diag = np.einsum("nii->ni", jtj)
        a = jtj + (lam[active][:, None] * diag + 1e-9 * (diag.max(axis=1, keepdims=True) + 1e-12)
                   )[:, :, None] * eye
        step = np.linalg.solve(a, g[..., None])[..., 0]
        trial = np.clip(p[active] + step, bounds[:, 0], bounds[:, 1])
        t_model, t_jac = _model_and_jacobian(trial, table, scale)
        t_res = tis[:, active] - t_model
        t_sse = np.einsum("tn,tn->n", t_res, t_res)
        better = t_sse < sse[active]
        idx = active[better]
        p[idx] = trial[better]
        res[:, idx] = t_res[:, better]
        jac[:, idx] = t_jac[:, better]
        gain = sse[idx] - t_sse[better]
        sse[idx] = t_sse[better]
        lam[idx] = np.maximum(lam[idx] / 5.0, 1e-7)
        lam[active[~better]] *= 4.0
        # Converged: the accepted step gained (or the quadratic model predicts) almost nothing.
        predicted = np.einsum("ni,ni->n", step, g)
        done = predicted <= rtol * (sse[active] + 1e-12)
        done[better] |= gain <= rtol * (t_sse[better] + 1e-12)
        done |= lam[active] > 1e8
        active = active[~done]
    return p


def fit_box_nlr(
    tissue: np.ndarray,
    aif: np.ndarray,
    times: np.ndarray,
    *,
    method: str = "nlr",
    rho: float = 1.04,
    kh: float = 0.733,
    band_limit: bool = True,
    bounds: tuple[tuple[float, float], ...] = DEFAULT_BOUNDS,
    start: tuple[float, float, float] = (60.0, 5.0, 3.5),
    max_iter: int = 300,
    restarts: int = 0,
    initial_steps: tuple[float, float, float] | None = DEFAULT_STEPS,
    lm_iter: int = 30,
    polish_iter: int = 12,
    chunk: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> BoxFit:
    """Fit the box model to every tissue curve.

    Parameters
    ----------
    tissue : ndarray, shape (T, N)
        Tissue enhancement in HU (baseline already subtracted).
    aif : ndarray, shape (T,)
        Arterial enhancement in HU, partial-volume corrected.
    times : ndarray, shape (T,)
        Acquisition times in s.
    method : {"nlr", "nlr-fast"}
        Nelder-Mead with the reference settings, or grid start + Newton (Levenberg-Marquardt
        with non-uniform frame times).
    rho, kh : float
        Brain density (g/mL) and haematocrit ratio.
    band_limit : bool
        Smooth AIF and tissue with [1/4, 1/2, 1/4] first, as the reference implementation does.
    bounds : 3 (low, high) pairs
        For CBF (mL/100 g/min), MTT (s), delay (s).
    start : 3 floats
        Nelder-Mead start (CBF, MTT, delay), the reference's; unused by ``"nlr-fast"``.
    max_iter : int
        Nelder-Mead iterations (``"nlr"``); see ``lm_iter`` for ``"nlr-fast"``.
    restarts : int
        ``"nlr"`` only: voxels whose simplex ended on a bound start again from there with a
        fresh simplex, up to this many times. The default 0 is the plain Nelder-Mead of the
        reference; restarts are an option, not needed with the default initial simplex.
    initial_steps : 3 floats or None
        ``"nlr"`` only: the initial simplex's steps from the start in the simplex's coordinates
        (CBV mL/100 g, MTT s, delay s; the start's CBV is CBF x MTT / 60); None builds it as
        MATLAB's ``fminsearch`` and SciPy do (5 % of each start value).
    lm_iter : int
        ``"nlr-fast"`` only: most Levenberg-Marquardt steps (voxels stop earlier on their own).
    polish_iter : int
        ``"nlr-fast"`` only: Newton iterations after the grid start (evenly spaced frames).
    chunk : int, optional
        Voxels fitted at once; bounds peak memory: per worker about (24 n + 16 T) bytes per
        voxel of a chunk, n = (largest delay + MTT - smallest delay) / step + 3, T and the
        step those of the frames or of the grid fitted on (:func:`fit_grid`).
        Default: at most 65536 with NumPy (large chunks keep the worker threads from waiting
        on each other for the GIL) and 262144 on a GPU, divided by the grid's steps per frame
        interval when the fit works on a finer grid, in a number of chunks that is a
        multiple of ``workers``.
    workers : int, optional
        Threads fitting chunks in parallel; default the number of CPUs with NumPy, 1 on a GPU
        (torch parallelises inside each operation).
    device : str, optional
        Where to fit: None or "cpu" (NumPy, the default), a torch device such as "cuda" or
        "cuda:1" (torch tensors on that GPU, float64), or "auto" ("cuda" when torch is
        installed and sees a GPU, else NumPy). Uneven frame times always use NumPy.
    progress : bool
        Show a progress bar over voxels.

    Returns
    -------
    BoxFit
    """
    if method not in BOX_METHODS:
        raise ValidationError(f"method must be 'nlr' or 'nlr-fast', got {method!r}")
    tis, t = _check_curves(tissue, times)
    grid = fit_grid(t)
    table = _arterial_table(aif, t, band_limit=band_limit, grid=grid)
    ops = ArrayOps(_torch_device(device, uniform=table.uniform))
    n = tis.shape[1]
    workers = workers if workers is not None else usable_cores() if ops.is_numpy else 1
    # a finer grid holds more values per voxel: fewer voxels per chunk keep its memory
    steps = 1 if grid is None else (grid.size - 1) // max(1, t.size - 1)
    chunk = chunk if chunk is not None else _default_chunk(n, workers, on_gpu=not ops.is_numpy,
                                                           steps=steps)
    setup = _setup(tis, t, grid, table, method=method, rho=rho, kh=kh, band_limit=band_limit,
                   bounds=bounds, start=start, max_iter=max_iter, restarts=restarts,
                   initial_steps=initial_steps, lm_iter=lm_iter, polish_iter=polish_iter,
                   ops=ops)
    parts = map_chunks(partial(_fit_chunk, setup), n, chunk=max(1, int(chunk)),
                       workers=max(1, workers), progress=progress, desc=f"box {method}",
                       unit="voxel")
    return _box_fit(parts)


def _check_curves(tissue: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue as (T, N) in its own dtype (converted to float64 chunk by chunk, for memory)
    and the times as float64 (T,)."""
    tis = np.asarray(tissue)
    if tis.ndim == 1:
        tis = tis[:, None]
    t = fit_times(times)
    if tis.ndim != 2 or tis.shape[0] != t.size:
        raise ValidationError(f"tissue must be (T, N) with T = {t.size}, got shape {tis.shape}")
    return tis, t


def fit_grid(times: np.ndarray) -> np.ndarray | None:
    """The times the box fits work on for frames at ``times`` (s): None (the frames
    themselves) unless they are evenly spaced (:func:`~ctperf.perfusion.curves.evenly_spaced`,
    as the uniform grid of uneven frames takes them) and more than :data:`FIT_STEP_S` apart;
    then the span from the first frame to the last divided evenly into steps of at most that,
    as many per frame interval."""
    t = np.asarray(times, dtype=np.float64)
    if not evenly_spaced(t):
        return None
    parts = int(np.ceil(float(np.diff(t).mean()) / FIT_STEP_S - 1e-6))
    return np.linspace(t[0], t[-1], (t.size - 1) * parts + 1) if parts > 1 else None


def _arterial_table(aif: np.ndarray, t: np.ndarray, *, band_limit: bool,
                    grid: np.ndarray | None = None) -> ArterialTable:
    """The AIF's table: band-limited at the frames when asked, then on ``grid`` if given."""
    ca = finite_aif(aif, t)
    if band_limit:
        ca = bandlimit(ca)
    aif_area(ca, t)
    return ArterialTable(ca, t) if grid is None else ArterialTable(resample(ca, t, grid), grid)


def _torch_device(device: str | None, *, uniform: bool) -> str | None:
    """The torch device to fit on, or None for NumPy (always with uneven frame times)."""
    torch_device = resolve_torch_device(device)
    if torch_device is not None and not uniform:
        log.info("uneven frame times: the box fit runs with NumPy, not on %s", torch_device)
        return None
    return torch_device


def _default_chunk(n: int, workers: int, *, on_gpu: bool, steps: int = 1) -> int:
    """At most 2^16 voxels (2^18 on a GPU) per chunk, divided by the grid's ``steps`` per frame
    interval (:func:`fit_grid`), in a number of chunks of about equal size that keeps every
    worker busy to the end."""
    chunk = max(1, (1 << 18 if on_gpu else 1 << 16) // max(1, steps))
    n_chunks = -(-n // chunk)
    if workers > 1 and n_chunks % workers:
        n_chunks = min(n, n_chunks + workers - n_chunks % workers)
    return max(1, -(-n // max(1, n_chunks)))


@dataclass(frozen=True)
class _Setup:
    """What every chunk's fit shares: the AIF's tables, bounds and the method's settings."""

    tissue: np.ndarray           # (T, N), any float dtype
    frames: np.ndarray           # (T,) the tissue's times, s
    grid: np.ndarray | None      # the times fitted on when not the frames' (fit_grid)
    table: ArterialTable
    scale: float
    method: str
    band_limit: bool
    bounds: np.ndarray           # (3, 2) of (CBF, MTT, delay)
    cbv_bounds: np.ndarray       # (3, 2) of the simplex's (CBV, MTT, delay)
    fast: FastBoxSSE | None      # O(1) SSE with evenly spaced frames
    ops: ArrayOps
    start: tuple[float, float, float]
    initial_steps: tuple[float, float, float] | None
    max_iter: int
    restarts: int
    lm_iter: int
    polish_iter: int


def _setup(tis: np.ndarray, frames: np.ndarray, grid: np.ndarray | None, table: ArterialTable,
           *, method: str, rho: float, kh: float,
           band_limit: bool, bounds: tuple[tuple[float, float], ...],
           start: tuple[float, float, float], max_iter: int, restarts: int,
           initial_steps: tuple[float, float, float] | None, lm_iter: int, polish_iter: int,
           ops: ArrayOps) -> _Setup:
    scale = flow_scale(rho, kh)
    b = np.asarray(bounds, dtype=np.float64)
    # Bounds of the simplex's coordinates (CBV, MTT, delay); CBF is clipped to its own.
    bv = b.copy()
    bv[0] = (b[0, 0] * b[1, 0] / 60.0, b[0, 1] * b[1, 1] / 60.0)
    # O(1)-per-evaluation SSE when frames are evenly spaced (see fastsse).
    fast = FastBoxSSE(table, scale, b, ops=ops) if table.uniform else None
    return _Setup(tissue=tis, frames=frames, grid=grid, table=table, scale=scale, method=method,
                  band_limit=band_limit, bounds=b, cbv_bounds=bv, fast=fast, ops=ops, start=start,
                  initial_steps=initial_steps, max_iter=max_iter, restarts=restarts,
                  lm_iter=lm_iter, polish_iter=polish_iter)


@dataclass(frozen=True)
class _ChunkSSE:
    """``sse(q, rows)``: sum of squared errors (M,) of parameters q (3, M) of (CBF, MTT, delay)
    for the chunk's voxels ``rows`` (M,)."""

    curves: np.ndarray           # (T, M) float64, the chunk's tissue curves
    setup: _Setup
    fast: FastBoxSSE | None      # set to the chunk's curves

    def __call__(self, q: Any, rows: Any) -> Any:
        if self.fast is not None:
            return self.fast.sse(q[0], q[1], q[2], rows)
        return _sse(q.T, self.curves[:, rows], self.setup.table, self.setup.scale)


@dataclass(frozen=True)
class _CBVSSE:
    """The same SSE with the simplex's (CBV, MTT, delay) columns, for the chunk's voxels
    ``subset[rows]`` (all of them when ``subset`` is None)."""

    sse: _ChunkSSE
    subset: Any = None

    def __call__(self, v: Any, rows: Any) -> Any:
        setup = self.sse.setup
        rows = rows if self.subset is None else self.subset[rows]
        return self.sse(_cbv_to_cbf(v, setup.bounds, setup.ops), rows)


def _fit_chunk(setup: _Setup, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Fitted (CBF, MTT, delay) (M, 3) and mean squared misfit (M,) of voxels first:stop."""
    c = setup.tissue[:, first:stop].astype(np.float64)
    if setup.band_limit:
        c = bandlimit(c)
    at_frames = c
    if setup.grid is not None:
        c = resample(c, setup.frames, setup.grid)
    sse = _ChunkSSE(c, setup, setup.fast.with_tissue(c) if setup.fast is not None else None)
    if setup.method == "nlr":
        p = _fit_simplex(setup, sse, c.shape[1])
    elif sse.fast is not None:
        # frames at most FIT_STEP_S apart: between the grid's whole-step (MTT, delay) the
        # misfit has no local minimum that the Newton polish stops in (docs/methods.md)
        p = refine_newton(sse.fast, sse.fast.grid_start(setup.bounds, n_mtt=16),
                          setup.bounds, n_iter=setup.polish_iter)
    else:
        p = _grid_start(c, setup.table, setup.scale, setup.bounds, n_mtt=24, delay_step=0.5)
        p = _levenberg_marquardt(c, p, setup.table, setup.scale, setup.bounds,
                                 n_iter=setup.lm_iter, rtol=1e-4)
    ops = setup.ops
    if setup.grid is None:
        return ops.to_numpy(p), ops.to_numpy(sse(p.T, ops.arange(p.shape[0]))) / c.shape[0]
    p = ops.to_numpy(p)
    return p, _frame_misfit(p, at_frames, setup)


def _frame_misfit(p: np.ndarray, c: np.ndarray, setup: _Setup) -> np.ndarray:
    """Mean squared misfit (M,) at the frames of the boxes p (M, 3) of curves c (T, M) fitted
    on a finer grid."""
    x = setup.frames[:, None] - p[:, 2]
    unit = setup.scale * (setup.table.integral(x) - setup.table.integral(x - p[:, 1]))
    return ((c - p[:, 0] * unit) ** 2).mean(axis=0)


def _fit_simplex(setup: _Setup, sse: _ChunkSSE, m: int) -> Any:
    """Nelder-Mead from the reference's start for m voxels; (CBF, MTT, delay) (m, 3).

    The simplex moves in (CBV, MTT, delay): the curve's area (CBV) and its shape (MTT, delay)
    are then separate coordinates. In (CBF, MTT, delay) the area is CBF x MTT, and a simplex
    started at the reference's high CBF lowers the area by shrinking MTT onto its lower bound,
    where it stalls with CBF several times too high. Same start, same model, same
    least-squares objective.
    """
    ops, b, bv = setup.ops, setup.bounds, setup.cbv_bounds
    s0 = np.clip(np.asarray(setup.start, float), b[:, 0], b[:, 1])
    s0[0] *= s0[1] / 60.0
    x0 = ops.asarray(np.broadcast_to(np.clip(s0, bv[:, 0], bv[:, 1]), (m, 3)))
    steps = None if setup.initial_steps is None else np.asarray(setup.initial_steps, float)
    v = nelder_mead(_CBVSSE(sse), x0, bounds=bv, max_iter=setup.max_iter, steps=steps, ops=ops)
    v = _restart_on_bounds(setup, sse, v)
    return _cbv_to_cbf(v.T, b, ops).T


def _restart_on_bounds(setup: _Setup, sse: _ChunkSSE, v: Any) -> Any:
    """Restart with a fresh simplex where a simplex ended on a bound: there it has usually
    collapsed against the bound instead of finding the minimum. ``v`` (m, 3) is updated."""
    ops, bv = setup.ops, setup.cbv_bounds
    near = ops.asarray(0.01 * (bv[:, 1] - bv[:, 0]))
    lo, hi = ops.asarray(bv[:, 0]), ops.asarray(bv[:, 1])
    sub = ops.arange(v.shape[0])
    for _ in range(setup.restarts):
        sub = sub[((v[sub] - lo < near) | (hi - v[sub] < near)).any(axis=1)]
        if sub.shape[0] == 0:
            break
        v[sub] = nelder_mead(_CBVSSE(sse, sub), v[sub], bounds=bv, max_iter=setup.max_iter,
                             ops=ops)
    return v


def _box_fit(parts: list[tuple[np.ndarray, np.ndarray]]) -> BoxFit:
    """The chunks' parameters and mean squared misfits as one BoxFit."""
    if parts:
        p = np.concatenate([part[0] for part in parts])
        rms = np.sqrt(np.concatenate([part[1] for part in parts]))
    else:
        p, rms = np.empty((0, 3)), np.empty(0)
    cbf, mtt, delay = p[:, 0], p[:, 1], p[:, 2]
    return BoxFit(cbf=cbf, cbv=cbf * mtt / 60.0, mtt=mtt, delay=delay,
                  tmax=delay + TMAX_MTT_FRACTION * mtt, residual=rms)


def _cbv_to_cbf(v: Any, b: np.ndarray, ops: ArrayOps) -> Any:
    """(CBV, MTT, delay) columns (3, M) -> (CBF, MTT, delay), CBF clipped to its bounds."""
    cbf = ops.xp.clip(v[0] * 60.0 / v[1], float(b[0, 0]), float(b[0, 1]))
    return ops.concat([cbf[None], v[1:]], 0)


def _sse(p: np.ndarray, c: np.ndarray, table: ArterialTable, scale: float) -> np.ndarray:
    r = box_model(p, table, scale=scale)
    r -= c
    return np.einsum("tn,tn->n", r, r)
