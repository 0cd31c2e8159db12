"""Downhill simplex (Nelder and Mead, Comput. J. 7:308, 1965) for many small problems at once.

Every voxel runs its own simplex; one iteration moves all simplices together, with the
reflection, expansion, contraction and shrink branches chosen per voxel by boolean masks. The
coefficients, the 5 % initial simplex and the stopping rule follow SciPy's ``minimize(...,
method="Nelder-Mead")`` and MATLAB's ``fminsearch``. Bounds: a vertex outside them is evaluated at
its projection onto the box with a penalty growing with the distance, and it keeps its place, so
the simplex never collapses onto a bound (clipping the vertices themselves does, and stalls the
search). Voxels that have converged leave the working set, so later iterations cost less.

Layout: the simplices are stored vertex-major as one ``((D + 1) D, M)`` array and the values as
``(D + 1, M)``, so that every step is an operation on contiguous length-M vectors: the lowest,
highest and second-highest values come from a running comparison over the D + 1 vertices (no
sort), and the worst vertex is read and replaced through flat indices. Among equal values the
best vertex is the first, the worst the last (SciPy's sort may break such ties otherwise; the
result then differs within the tolerances). The second point of an iteration (expansion or
contraction) is evaluated for every simplex, and ignored where the reflection is kept. Written
against :class:`~ctperf.perfusion.backend.ArrayOps`, so it runs on NumPy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ctperf.perfusion.backend import ArrayOps

__all__ = ["nelder_mead"]

#: ``fun(points, rows) -> values``: points (D, M), problem indices (M,), values (M,).
Objective = Callable[[Any, Any], Any]


def nelder_mead(
    fun: Objective,
    x0: Any,
    *,
    bounds: np.ndarray,
    max_iter: int = 300,
    xatol: float = 1e-4,
    fatol: float | Any = 1e-4,
    initial_step: float = 0.05,
    steps: np.ndarray | None = None,
    ops: ArrayOps | None = None,
) -> Any:
    """Minimise ``fun`` independently for each row of ``x0``.

    Parameters
    ----------
    fun : callable
        ``fun(points, rows) -> values``: points (D, M) (one column per point), the problem (row
        of ``x0``) each point belongs to as int indices (M,); returns (M,) objective values.
    x0 : array, shape (N, D)
        Start per problem (an array of the ``ops`` backend).
    bounds : ndarray, shape (D, 2)
        Lower and upper bound per parameter.
    max_iter : int
        Iterations per problem.
    xatol, fatol : float
        Stop a problem when its simplex spans at most ``xatol`` in every parameter and its
        values differ by at most ``fatol`` (``fatol`` may be an (N,) array, one per problem).
    initial_step : float
        Relative size of the initial simplex (0.00025 absolute for zero entries).
    steps : ndarray, shape (D,), optional
        Absolute initial steps per parameter instead (for a start already near the minimum).
    ops : ArrayOps, optional
        Array backend of ``x0`` and ``fun`` (default NumPy).

    Returns
    -------
    array, shape (N, D)
        Best vertex of each simplex, within the bounds.
    """
    ops = ops if ops is not None else ArrayOps()
    xp = ops.xp
    b = np.asarray(bounds, dtype=np.float64)
    lo, hi = ops.asarray(b[:, :1]), ops.asarray(b[:, 1:])  # (D, 1)
    width = ops.asarray(np.where(b[:, 1:] > b[:, :1], b[:, 1:] - b[:, :1], 1.0))
    x0 = ops.asarray(xp.clip(ops.asarray(x0).T, lo, hi))  # (D, N), C-contiguous
    fatol_rows = not isinstance(fatol, float | int)

    def fun_bounded(x: Any, rows: Any) -> Any:
        xc = xp.clip(x, lo, hi)
        f = fun(xc, rows)
        out = (x != xc).any(axis=0)
        if out.any():
            sel = ops.nonzero(out)
            excess = (((ops.take_cols(x, sel) - ops.take_cols(xc, sel)) / width) ** 2).sum(axis=0)
            f_s = ops.take(f, sel)
            f[sel] = f_s * (1.0 + 100.0 * excess) + 1e-3 * excess
        return f

    d, n = x0.shape
    nv = d + 1
    # The simplices, vertex-major: row k * D + j holds parameter j of vertex k, (nv D, M).
    sim = ops.concat([x0] * nv, 0)
    for j in range(d):
        col = sim[(j + 1) * d + j]
        if steps is not None:
            # Step away from the nearer bound so the first vertices are feasible.
            up = col + steps[j] <= b[j, 1]
            sim[(j + 1) * d + j] = xp.where(up, col + steps[j], col - steps[j])
        else:
            sim[(j + 1) * d + j] = xp.where(col != 0, col * (1 + initial_step), 0.00025)
    rows = ops.arange(n)
    fs = fun_bounded(ops.concat([sim[k * d:(k + 1) * d] for k in range(nv)], 1),
                     ops.tile(rows, nv)).reshape(nv, n)
    result = ops.full((d, n), 0.0)
    m = n
    ar, cells = ops.arange(m), ops.arange(d * m).reshape(d, m)  # cells: j M + i
    for it in range(max_iter):
        if m == 0:
            break
        # Lowest, highest and second-highest value (values only: ties do not matter here).
        fb, fw = xp.minimum(fs[0], fs[1]), xp.maximum(fs[0], fs[1])
        f2w = fb
        for k in range(2, nv):
            f2w = xp.maximum(f2w, xp.minimum(fw, fs[k]))
            fw = xp.maximum(fw, fs[k])
            fb = xp.minimum(fb, fs[k])
        # Worst vertex: the last one holding the highest value.
        iw = ops.zeros_index(m)
        for k in range(1, nv):
            ops.fill(iw, fs[k] == fw, k)
        # Convergence is checked every 4th iteration (a converged simplex only improves on).
        if it % 4 == 0:
            best = ops.take(sim, _best_index(ops, fs, fb, m) * (d * m) + cells)
            spread = ops.amax0(xp.abs(sim.reshape(nv, d, m) - best).reshape(nv * d, m))
            done = (spread <= xatol) & (fw - fb <= (ops.take(fatol, rows) if fatol_rows
                                                    else fatol))
            if done.any():
                sel = ops.nonzero(done)
                result[:, ops.take(rows, sel)] = xp.clip(ops.take_cols(best, sel), lo, hi)
                kept = ops.nonzero(~done)
                sim, fs = ops.take_cols(sim, kept), ops.take_cols(fs, kept)
                rows, iw, fb, fw, f2w = (ops.take(v, kept) for v in (rows, iw, fb, fw, f2w))
                m = rows.shape[0]
                if m == 0:
                    break
                ar, cells = ops.arange(m), ops.arange(d * m).reshape(d, m)
        widx = iw * (d * m) + cells  # flat positions of the worst vertex, (D, M)
        worst = ops.take(sim, widx)
        xbar = sim.reshape(nv, d, m).sum(axis=0)
        xbar -= worst
        xbar /= d
        xr = xbar * 2.0
        xr -= worst
        fr = fun_bounded(xr, rows)
        expand = fr < fb
        outside = (fr >= f2w) & (fr < fw)
        inside = fr >= fw
        new_x, new_f = xr, fr
        need = expand | outside | inside
        # Second point for every simplex (those that keep the reflection ignore it).
        coef = ops.select(expand, 2.0, ops.select(outside, 0.5, -0.5))
        x2 = xbar - worst
        x2 *= coef
        x2 += xbar
        f2 = fun_bounded(x2, rows)
        take = need & xp.where(expand, f2 < fr, xp.where(outside, f2 <= fr, f2 < fw))
        for j in range(d):
            ops.put_where(new_x[j], take, x2[j])
        ops.put_where(new_f, take, f2)
        shrink_m = need & ~take & ~expand
        shrink = ops.nonzero(shrink_m) if shrink_m.any() else None
        if shrink is not None:
            # Shrink towards the best vertex, which stays where it is, with its value.
            sub = ops.take_cols(sim, shrink)
            k_s = shrink.shape[0]
            ib_s = _best_index(ops, ops.take_cols(fs, shrink), ops.take(fb, shrink), k_s)
            sub_ofs = ops.arange(d)[:, None] * k_s
            best_s = ops.take(sub, ib_s * (d * k_s) + ops.arange(k_s) + sub_ofs)
            s_new = (best_s + 0.5 * (sub.reshape(nv, d, k_s) - best_s)).reshape(nv * d, k_s)
            vals = fun_bounded(ops.concat([s_new[k * d:(k + 1) * d] for k in range(nv)], 1),
                               ops.tile(ops.take(rows, shrink), nv)).reshape(nv, k_s)
            vals[ib_s, ops.arange(k_s)] = ops.take(fb, shrink)
        ops.put(sim, widx, new_x)
        ops.put(fs, iw * m + ar, new_f)
        if shrink is not None:
            sim[:, shrink] = s_new
            fs[:, shrink] = vals
    if m:
        fb = fs.min(axis=0) if ops.is_numpy else fs.amin(dim=0)
        best = ops.take(sim, _best_index(ops, fs, fb, m) * (d * m) + cells)
        result[:, rows] = xp.clip(best, lo, hi)
    return result.T


def _best_index(ops: ArrayOps, fs: Any, fb: Any, m: int) -> Any:
    """Index of the first vertex holding the lowest value ``fb``, (M,)."""
    ib = ops.zeros_index(m) + (fs.shape[0] - 1)
    for k in range(fs.shape[0] - 2, -1, -1):
        ops.fill(ib, fs[k] == fb, k)
    return ib
