"""Downhill simplex (Nelder and Mead, Comput. J. 7:308, 1965) for many small problems at once.

Every voxel runs its own simplex; one iteration moves all simplices together, with the
reflection, expansion, contraction and shrink branches chosen per voxel by boolean masks. The
coefficients, the 5 % initial simplex and the stopping rule follow SciPy's ``minimize(...,
method="Nelder-Mead")`` and MATLAB's ``fminsearch``. Bounds: a vertex outside them is evaluated at
its projection onto the box with a penalty growing with the distance, and it keeps its place, so
the simplex never collapses onto a bound (clipping the vertices themselves does, and stalls the
search). Voxels that have converged leave the working set, so later iterations cost less.
Instead of sorting each simplex, only the best, worst and second-worst vertices are located.
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
    fatol: float | np.ndarray = 1e-4,
    initial_step: float = 0.05,
    steps: np.ndarray | None = None,
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
        values differ by at most ``fatol`` (``fatol`` may be an (N,) array, one per problem).
    initial_step : float
        Relative size of the initial simplex (0.00025 absolute for zero entries).
    steps : ndarray, shape (D,), optional
        Absolute initial steps per parameter instead (for a start already near the minimum).

    Returns
    -------
    ndarray, shape (N, D)
        Best vertex of each simplex, within the bounds.
    """
    lo, hi = bounds[:, 0], bounds[:, 1]
    width = np.where(hi > lo, hi - lo, 1.0)
    x0 = np.clip(np.asarray(x0, dtype=np.float64), lo, hi)

    def fun_bounded(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        xc = np.clip(x, lo, hi)
        f = fun(xc, rows)
        out = (x != xc).any(axis=1)
        if out.any():
            excess = (((x[out] - xc[out]) / width) ** 2).sum(axis=1)
            f[out] = f[out] * (1.0 + 100.0 * excess) + 1e-3 * excess
        return f

    n, d = x0.shape
    nv = d + 1
    sim = np.repeat(x0[:, None, :], nv, axis=1)
    for j in range(d):
        col = sim[:, j + 1, j]
        if steps is not None:
            # Step away from the nearer bound so the first vertices are feasible.
            up = col + steps[j] <= hi[j]
            sim[:, j + 1, j] = np.where(up, col + steps[j], col - steps[j])
        else:
            sim[:, j + 1, j] = np.where(col != 0, col * (1 + initial_step), 0.00025)
    rows = np.arange(n)
    fs = fun_bounded(sim.reshape(-1, d), np.repeat(rows, nv)).reshape(n, nv)
    result = np.empty((n, d))
    for it in range(max_iter):
        if rows.size == 0:
            break
        m = rows.size
        ar = np.arange(m)
        order = np.argsort(fs, axis=1)
        ib, i2w, iw = order[:, 0], order[:, -2], order[:, -1]
        fb, f2w, fw = fs[ar, ib], fs[ar, i2w], fs[ar, iw]
        best = sim[ar, ib]
        # Convergence is checked every 4th iteration (a converged simplex only improves on).
        done = np.zeros(m, dtype=bool) if it % 4 else (
            np.abs(sim - best[:, None, :]).reshape(m, -1).max(axis=1) <= xatol) & (
            fw - fb <= (fatol[rows] if isinstance(fatol, np.ndarray) else fatol))
        if done.any():
            result[rows[done]] = np.clip(best[done], lo, hi)
            keep = ~done
            sim, fs, rows = sim[keep], fs[keep], rows[keep]
            ib, iw, fb, fw, f2w, best = ib[keep], iw[keep], fb[keep], fw[keep], f2w[keep], \
                best[keep]
            m = rows.size
            if m == 0:
                break
            ar = np.arange(m)
        worst = sim[ar, iw]
        xbar = (sim.sum(axis=1) - worst) / d
        xr = 2.0 * xbar - worst
        fr = fun_bounded(xr, rows)
        expand = fr < fb
        outside = (fr >= f2w) & (fr < fw)
        inside = fr >= fw
        new_x, new_f = xr, fr
        need = expand | outside | inside
        shrink = np.zeros(m, dtype=bool)
        if need.any():
            sel = np.flatnonzero(need)
            coef = np.where(expand[sel], 2.0, np.where(outside[sel], 0.5, -0.5))[:, None]
            x2 = xbar[sel] + coef * (xbar[sel] - worst[sel])
            f2 = fun_bounded(x2, rows[sel])
            take = np.where(expand[sel], f2 < fr[sel],
                            np.where(outside[sel], f2 <= fr[sel], f2 < fw[sel]))
            new_x[sel[take]] = x2[take]
            new_f[sel[take]] = f2[take]
            shrink[sel[~take & ~expand[sel]]] = True
        keep_new = np.flatnonzero(~shrink)
        sim[keep_new, iw[keep_new]] = new_x[keep_new]
        fs[keep_new, iw[keep_new]] = new_f[keep_new]
        if shrink.any():
            sr = np.flatnonzero(shrink)
            s = best[sr][:, None, :] + 0.5 * (sim[sr] - best[sr][:, None, :])
            vals = fun_bounded(s.reshape(-1, d), np.repeat(rows[sr], nv)).reshape(-1, nv)
            # The best vertex stays where it is, with its value.
            vals[np.arange(sr.size), ib[sr]] = fb[sr]
            sim[sr] = s
            fs[sr] = vals
    if rows.size:
        ib = np.argmin(fs, axis=1)
        result[rows] = np.clip(sim[np.arange(rows.size), ib], lo, hi)
    return result
