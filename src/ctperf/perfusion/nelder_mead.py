"""Downhill simplex (Nelder and Mead, Comput. J. 7:308, 1965) for many small problems at once.

Every voxel runs its own simplex; one iteration moves all simplices together, with the
reflection, expansion, contraction and shrink branches chosen per voxel by boolean masks. The
coefficients, the 5 % initial simplex and the stopping rule follow SciPy's ``minimize(...,
method="Nelder-Mead")`` and MATLAB's ``fminsearch``. Bounds: a vertex outside them is evaluated at
its projection onto the box with a penalty growing with the distance, and it keeps its place, so
the simplex never collapses onto a bound (clipping the vertices themselves does, and stalls the
search). Voxels that have converged leave the working set, so later iterations cost less.

Layout: the simplices are stored vertex-major, ``(D + 1, D, M)``, and the values ``(D + 1, M)``,
so that every step is an operation on contiguous length-M vectors: the best, worst and
second-worst vertices are found by a running comparison over the D + 1 vertices (no sort), and
the worst vertex is replaced through masks. Written against :class:`ArrayOps`, so it runs on
NumPy arrays or torch tensors alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ctperf.perfusion.fastsse import ArrayOps

__all__ = ["nelder_mead"]

#: ``fun(points, rows) -> values``: points (D, M), problem indices (M,), values (M,).
Objective = Callable[[Any, Any], Any]


def _pick(xp: Any, sim: Any, masks: list[Any]) -> Any:
    """The vertex chosen by one-hot ``masks`` (one (M,) bool per vertex): (D, M)."""
    out = sim[-1]
    for k in range(len(masks) - 2, -1, -1):
        out = xp.where(masks[k], sim[k], out)
    return out


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
    x0 = xp.clip(ops.asarray(x0).T, lo, hi)  # (D, N)
    fatol_rows = not isinstance(fatol, float | int)

    def fun_bounded(x: Any, rows: Any) -> Any:
        xc = xp.clip(x, lo, hi)
        f = fun(xc, rows)
        out = (x != xc).any(axis=0)
        if out.any():
            sel = ops.nonzero(out)
            excess = (((x[:, sel] - xc[:, sel]) / width) ** 2).sum(axis=0)
            f[sel] = f[sel] * (1.0 + 100.0 * excess) + 1e-3 * excess
        return f

    d, n = x0.shape
    nv = d + 1
    sim = ops.stack([x0] * nv, 0)  # (D + 1, D, N)
    for j in range(d):
        col = sim[j + 1, j]
        if steps is not None:
            # Step away from the nearer bound so the first vertices are feasible.
            up = col + steps[j] <= b[j, 1]
            sim[j + 1, j] = xp.where(up, col + steps[j], col - steps[j])
        else:
            sim[j + 1, j] = xp.where(col != 0, col * (1 + initial_step), 0.00025)
    rows = ops.arange(n)
    fs = fun_bounded(ops.concat(list(sim), 1), ops.tile(rows, nv)).reshape(nv, n)
    result = ops.full((d, n), 0.0)
    for it in range(max_iter):
        m = rows.shape[0]
        if m == 0:
            break
        # Best (first lowest), worst (last highest) and second-highest value, as a stable
        # sort of the D + 1 values would order them.
        fb, fw, f2w = fs[0], fs[0], ops.full(m, -np.inf)
        ib, iw = ops.zeros_index(m), ops.zeros_index(m)
        for k in range(1, nv):
            fk = fs[k]
            ib = xp.where(fk < fb, k, ib)
            fb = xp.minimum(fb, fk)
            iw = xp.where(fk >= fw, k, iw)
            f2w = xp.maximum(f2w, xp.minimum(fw, fk))
            fw = xp.maximum(fw, fk)
        best_masks = [ib == k for k in range(nv)]
        worst_masks = [iw == k for k in range(nv)]
        # Convergence is checked every 4th iteration (a converged simplex only improves on).
        if it % 4 == 0:
            best = _pick(xp, sim, best_masks)
            spread = ops.amax(xp.abs(sim - best[None]), (0, 1))
            done = (spread <= xatol) & (fw - fb <= (ops.take(fatol, rows) if fatol_rows
                                                    else fatol))
            if done.any():
                sel = ops.nonzero(done)
                result[:, rows[sel]] = xp.clip(best[:, sel], lo, hi)
                keep = ~done
                sim, fs, rows = sim[:, :, keep], fs[:, keep], rows[keep]
                ib, iw, fb, fw, f2w = ib[keep], iw[keep], fb[keep], fw[keep], f2w[keep]
                best_masks = [mk[keep] for mk in best_masks]
                worst_masks = [mk[keep] for mk in worst_masks]
                m = rows.shape[0]
                if m == 0:
                    break
        worst = _pick(xp, sim, worst_masks)
        xbar = (sim.sum(axis=0) - worst) / d
        xr = 2.0 * xbar - worst
        fr = fun_bounded(xr, rows)
        expand = fr < fb
        outside = (fr >= f2w) & (fr < fw)
        inside = fr >= fw
        new_x, new_f = xr, fr
        need = expand | outside | inside
        shrink = ops.zeros_bool(m)
        if need.any():
            sel = ops.nonzero(need)
            exp_s, out_s = expand[sel], outside[sel]
            coef = ops.select(exp_s, 2.0, ops.select(out_s, 0.5, -0.5))
            xb_s = xbar[:, sel]
            x2 = xb_s + coef * (xb_s - worst[:, sel])
            f2 = fun_bounded(x2, rows[sel])
            fr_s = fr[sel]
            take = xp.where(exp_s, f2 < fr_s, xp.where(out_s, f2 <= fr_s, f2 < fw[sel]))
            acc = sel[take]
            new_x[:, acc] = x2[:, take]
            new_f[acc] = f2[take]
            shrink[sel[~take & ~exp_s]] = True
        stay = ~shrink
        for k in range(nv):
            mask = worst_masks[k] & stay
            ops.put(sim[k], mask[None], new_x)
            ops.put(fs[k], mask, new_f)
        if shrink.any():
            sr = ops.nonzero(shrink)
            sub = sim[:, :, sr]
            best_sr = _pick(xp, sub, [mk[sr] for mk in best_masks])
            s = best_sr[None] + 0.5 * (sub - best_sr[None])
            vals = fun_bounded(ops.concat(list(s), 1), ops.tile(rows[sr], nv)).reshape(nv, -1)
            # The best vertex stays where it is, with its value.
            vals[ib[sr], ops.arange(sr.shape[0])] = fb[sr]
            sim[:, :, sr] = s
            fs[:, sr] = vals
    if rows.shape[0]:
        ib = ops.argmin(fs, 0)
        result[:, rows] = xp.clip(_pick(xp, sim, [ib == k for k in range(nv)]), lo, hi)
    return result.T
