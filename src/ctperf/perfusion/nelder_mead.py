"""Downhill simplex (Nelder and Mead, Comput. J. 7:308, 1965) for many small problems at once.

Every voxel runs its own simplex; one iteration moves all simplices together, with the
reflection, expansion, contraction and shrink branches chosen per voxel by boolean masks. The
coefficients, the 5 % initial simplex and the stopping rule follow SciPy's ``minimize(...,
method="Nelder-Mead")`` and MATLAB's ``fminsearch``. Bounds: a vertex outside them is evaluated at
its projection onto the box with a penalty growing with the distance, and it keeps its place, so
the simplex never collapses onto a bound (clipping the vertices themselves does, and stalls the
search). Voxels that have converged leave the working set, so later iterations cost less.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["nelder_mead"]

Objective = Callable[[np.ndarray, np.ndarray], np.ndarray]


def nelder_mead(
    fun: Objective,
    x0: np.ndarray,
    *,
    bounds: np.ndarray,
    max_iter: int = 300,
    xatol: float = 1e-4,
    fatol: float = 1e-4,
    initial_step: float = 0.05,
) -> np.ndarray:
    """Minimise ``fun`` independently for each row of ``x0``.

    Parameters
    ----------
    fun : callable
        ``fun(points, rows) -> values``: points (M, D), the problem (row of ``x0``) each point
        belongs to as int indices (M,); returns (M,) objective values.
    x0 : ndarray, shape (N, D)
        Start per problem.
    bounds : ndarray, shape (D, 2)
        Lower and upper bound per parameter.
    max_iter : int
        Iterations per problem.
    xatol, fatol : float
        Stop a problem when its simplex spans at most ``xatol`` in every parameter and its
        values differ by at most ``fatol``.
    initial_step : float
        Relative size of the initial simplex (0.00025 absolute for zero entries).

    Returns
    -------
    ndarray, shape (N, D)
        Best vertex of each simplex.
    """
    lo, hi = bounds[:, 0], bounds[:, 1]
    width = np.where(hi > lo, hi - lo, 1.0)
    x0 = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)

    def fun_bounded(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        xc = np.clip(x, lo, hi)
        f = fun(xc, rows)
        excess = np.sum(((x - xc) / width) ** 2, axis=1)
        return f * (1.0 + 100.0 * excess) + 1e-3 * excess

    n, d = x0.shape
    sim = np.repeat(x0[:, None, :], d + 1, axis=1)
    for j in range(d):
        col = sim[:, j + 1, j]
        sim[:, j + 1, j] = np.where(col != 0, col * (1 + initial_step), 0.00025)
    rows = np.arange(n)
    fs = fun_bounded(sim.reshape(-1, d), np.repeat(rows, d + 1)).reshape(n, d + 1)
    result = np.empty((n, d))
    for _ in range(max_iter):
        if rows.size == 0:
            break
        order = np.argsort(fs, axis=1)
        sim = np.take_along_axis(sim, order[:, :, None], axis=1)
        fs = np.take_along_axis(fs, order, axis=1)
        done = (np.abs(sim[:, 1:] - sim[:, :1]).max(axis=(1, 2)) <= xatol) & (
            np.abs(fs[:, 1:] - fs[:, :1]).max(axis=1) <= fatol)
        if done.any():
            result[rows[done]] = np.clip(sim[done, 0], lo, hi)
            keep = ~done
            sim, fs, rows = sim[keep], fs[keep], rows[keep]
            if rows.size == 0:
                break
        xbar = sim[:, :-1].mean(axis=1)
        worst = sim[:, -1]
        xr = 2.0 * xbar - worst
        fr = fun_bounded(xr, rows)
        expand = fr < fs[:, 0]
        outside = (fr >= fs[:, -2]) & (fr < fs[:, -1])
        inside = fr >= fs[:, -1]
        new_x, new_f = xr.copy(), fr.copy()
        need = expand | outside | inside
        shrink = np.zeros(rows.size, dtype=bool)
        if need.any():
            coef = np.where(expand, 2.0, np.where(outside, 0.5, -0.5))[need, None]
            x2 = xbar[need] + coef * (xbar[need] - worst[need])
            f2 = fun_bounded(x2, rows[need])
            take = np.where(expand[need], f2 < fr[need],
                            np.where(outside[need], f2 <= fr[need], f2 < fs[need, -1]))
            sel = np.flatnonzero(need)
            new_x[sel[take]] = x2[take]
            new_f[sel[take]] = f2[take]
            shrink[sel[~take & ~expand[need]]] = True
        keep_new = ~shrink
        sim[keep_new, -1] = new_x[keep_new]
        fs[keep_new, -1] = new_f[keep_new]
        if shrink.any():
            s = sim[shrink]
            s[:, 1:] = s[:, :1] + 0.5 * (s[:, 1:] - s[:, :1])
            vals = fun_bounded(s[:, 1:].reshape(-1, d), np.repeat(rows[shrink], d))
            sim[shrink] = s
            fs[shrink, 1:] = vals.reshape(-1, d)
    if rows.size:
        best = np.argmin(fs, axis=1)
        result[rows] = np.clip(sim[np.arange(rows.size), best], lo, hi)
    return result
