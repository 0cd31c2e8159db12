"""The box model's sum of squared errors at O(1) cost per evaluation (uniform frame times).

For one voxel with tissue curve C (T,) and the box model
``m(t) = k CBF (A(t - d) - A(t - d - MTT))`` (k = rho / kH / 6000, A the running integral of the
AIF),

    SSE = |C|^2 - 2 k CBF (G(d) - G(d + MTT)) + k^2 CBF^2 F(d, d + MTT)

with ``G(s) = sum_t C(t) A(t - s)`` and ``F(a, b) = sum_t (A(t - a) - A(t - b))^2``. With frames
``dt`` apart, every ``t - s`` has the same position inside its frame interval, and A is piecewise
quadratic, so G(s) is exactly ``P0[m] + tau P1[m] + tau^2 / 2 P2[m]`` with ``m = floor(-s / dt)``
and three correlation tables P per voxel: one matrix product for all voxels. F does not depend
on the voxel and is exact too, from the Gram matrix of the same shifted tables. An evaluation is
then a few dozen gathers from small tables instead of a pass over all T frames, with the same
value (to rounding).

F is stored as one polynomial in the two within-frame offsets, 13 coefficients per pair of
table columns. Tables hold one contiguous row per coefficient, so each table is read with one
gather along its columns and the arithmetic runs on contiguous vectors; both box edges are
evaluated together. The same code runs on NumPy arrays or, through
:class:`~ctperf.perfusion.backend.ArrayOps`, on PyTorch tensors (a GPU when asked for).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ctperf.perfusion.backend import ArrayOps
from ctperf.perfusion.curves import ArterialTable

__all__ = ["FastBoxSSE"]


class FastBoxSSE:
    """SSE of the box model for many (CBF, MTT, delay) triples of many voxels.

    Parameters
    ----------
    table : ArterialTable
        The AIF (uniform frame times required: ``table.uniform``).
    scale : float
        rho / kH / 6000.
    bounds : ndarray, shape (3, 2)
        Parameter bounds; evaluations are valid inside them.
    ops : ArrayOps, optional
        Array backend (default NumPy).
    """

    def __init__(self, table: ArterialTable, scale: float, bounds: np.ndarray, *,
                 ops: ArrayOps | None = None) -> None:
        if not table.uniform:
            raise ValueError("FastBoxSSE needs uniform frame times")
        self.ops = ops if ops is not None else ArrayOps()
        self.table, self.scale, self.dt = table, scale, table.dt
        n_t = table.t.size
        s_lo = float(bounds[2, 0])
        s_hi = float(bounds[2, 1] + bounds[1, 1])
        self.m_lo = int(np.floor(-s_hi / self.dt)) - 1
        m_hi = int(np.floor(-s_lo / self.dt)) + 1
        n_m = self.n_m = m_hi - self.m_lo + 1
        # Extended per-interval tables: A(t0 + k dt + tau) = cum[k] + tau ca[k] + tau^2/2 sl[k].
        k = np.arange(self.m_lo, n_t + m_hi + 1)
        inside = (k >= 0) & (k <= n_t - 2)
        kk = np.clip(k, 0, n_t - 2)
        cum = np.where(inside, table.cum[kk], 0.0)
        ca = np.where(inside, table.ca[kk], 0.0)
        sl = np.where(inside, table.slope[kk], 0.0)
        after = k >= n_t - 1
        cum[after] = table.cum[-1] + table.ca[-1] * (k[after] - (n_t - 1)) * self.dt
        ca[after] = table.ca[-1]
        # Shifted copies: row t, column j holds tab[t + m_lo + j].
        idx = np.arange(n_t)[:, None] + np.arange(n_m)[None, :]
        shifts = np.concatenate([cum[idx], ca[idx], sl[idx]], axis=1)  # (T, 3 n_m)
        # F(a, b) = X(a, a) + X(b, b) - 2 X(a, b) with X(a, b) = sum_t A(t - a) A(t - b): both
        # positions are quadratic in their own offsets, so X needs only the Gram matrix of the
        # shifted tables (3 n_m x 3 n_m), whatever the voxel.
        gram = shifts.T @ shifts
        # X's 3 x 3 coefficient blocks, one row per block entry (p, q), flat index ja n_m + jb.
        blocks = gram.reshape(3, n_m, 3, n_m).transpose(0, 2, 1, 3).reshape(9, n_m * n_m)
        # H(a) = X(a, a) is a quartic in the offset: one row per coefficient (5, n_m).
        diag = [np.diagonal(gram[p * n_m:(p + 1) * n_m, q * n_m:(q + 1) * n_m])
                for p in range(3) for q in range(3)]
        k00, k01, k02, _, k11, k12, _, _, k22 = diag
        h_coef = np.stack([k00, 2 * k01, k11 + k02, k12, 0.25 * k22])
        # F(a, b) as one polynomial in the two offsets ta, tb, 13 coefficients c_ik (of
        # ta^i tb^k) per column pair (ja, jb), flat index ja n_m + jb; rows ordered
        # c00 c01 c02 | c10 c11 c12 | c20 c21 c22 | c30 c40 c03 c04 (see ``sse``).
        ka = [blocks[i].reshape(n_m, n_m) for i in range(9)]
        ha = [c[:, None] for c in h_coef]  # H(a)'s coefficients, varying with ja
        hb = [c[None, :] for c in h_coef]  # H(b)'s, varying with jb
        f_coef = np.stack([np.broadcast_to(c, (n_m, n_m)).ravel() for c in (
            ha[0] + hb[0] - 2 * ka[0], hb[1] - 2 * ka[1], hb[2] - ka[2],
            ha[1] - 2 * ka[3], -2 * ka[4], -ka[5],
            ha[2] - ka[6], -ka[7], -0.5 * ka[8],
            ha[3], ha[4], hb[3], hb[4])])
        xp_ops = self.ops
        self.f_coef = xp_ops.asarray(f_coef)
        # (3, n_m, T): the shifted cum, ca and slope tables, transposed.
        self.shifts_t = xp_ops.asarray(shifts.reshape(n_t, 3, n_m).transpose(1, 2, 0))
        self.blocks = xp_ops.asarray(np.ascontiguousarray(blocks))
        self.h_coef = xp_ops.asarray(np.ascontiguousarray(h_coef))
        self.p: Any = None
        self.c2: Any = None

    def with_tissue(self, tissue: Any) -> FastBoxSSE:
        """A copy sharing the AIF tables, set to tissue curves (T, N) (thread-safe use)."""
        other = copy.copy(self)
        other.set_tissue(tissue)
        return other

    def set_tissue(self, tissue: Any) -> None:
        """Tissue curves (T, N) of the voxels to be evaluated (an array of this backend).

        Sets ``p`` (3, n_m, N): the voxels' correlation tables P0, P1 and P2 / 2 (the halving
        is exact in binary floating point, so the sums below round as without it), one row
        per table column, so that voxels near the same shift are read from nearby memory."""
        tissue = self.ops.asarray(tissue)
        p = self.shifts_t @ tissue  # (3, n_m, N): one product per table, C-contiguous
        p[2] *= 0.5
        self.p = p
        self.c2 = (tissue * tissue).sum(axis=0)

    def split(self, s: Any) -> tuple[Any, Any]:
        """Column index into the shift tables and offset tau (s) of shifts ``s``."""
        return self._split_in_place(s * 1.0)

    def _split_in_place(self, s: Any) -> tuple[Any, Any]:
        """As ``split``, overwriting ``s`` (it becomes tau)."""
        xp = self.ops.xp
        s /= -self.dt  # u = -s / dt exactly (negation is exact)
        m = xp.floor(s)
        s -= m
        s *= self.dt
        m -= self.m_lo
        xp.clip(m, 0, self.n_m - 1, out=m)
        return self.ops.to_index(m), s

    def sse(self, cbf: Any, mtt: Any, delay: Any, rows: Any) -> Any:
        """SSE (M,) of parameters (M,) each, for voxels ``rows`` (M,) of the tissue set.

        Both box edges (a = delay, b = delay + MTT) are handled together as (2, M) arrays,
        each table is read with one gather and the arithmetic runs in place where it can, to
        keep the number of array operations and temporaries low."""
        ops = self.ops
        j, tau = self._split_in_place(ops.stack([delay, delay + mtt], 0))  # (2, M) each
        ta, tb = tau[0], tau[1]
        # F(a, b) by Horner's rule in ta (three polynomials at once), then in tb.
        c = ops.take_cols(self.f_coef, j[0] * self.n_m + j[1])  # (13, M)
        r = c[6:9]
        r *= ta
        r += c[3:6]
        r *= ta
        r += c[0:3]  # coefficients of tb^0, tb^1, tb^2
        high = c[10]
        high *= ta
        high += c[9]
        high *= ta * ta * ta
        r[0] += high
        f = c[12]
        for row in (c[11], r[2], r[1]):
            f *= tb
            f += row
        f *= tb
        f += r[0]
        # G(s) = P0 + tau P1 + tau^2 P2 / 2 at both edges.
        j *= self.p.shape[2]
        j += rows
        pk = ops.take_cols(self.p.reshape(3, -1), j)  # (3, 2, M)
        g = pk[2]
        g *= tau
        g += pk[1]
        g *= tau
        g += pk[0]
        kc = self.scale * cbf
        out = ops.take(self.c2, rows)
        out -= 2.0 * kc * (g[0] - g[1])
        out += kc * kc * f
        return ops.xp.clip(out, 0.0, None, out=out)

    def __call__(self, params: Any, rows: Any) -> Any:
        """SSE (M,) of parameter triples (M, 3) for voxels ``rows`` (M,) of the tissue set."""
        return self.sse(params[:, 0], params[:, 1], params[:, 2], rows)

    def grid_start(self, bounds: np.ndarray, *, n_mtt: int = 16) -> Any:
        """Best (CBF, MTT, delay) per voxel of the current tissue set on a grid of delays and
        MTTs at whole multiples of the frame interval, CBF solved in closed form (variable
        projection); shape (N, 3), an array of this backend."""
        ops, xp, n_m = self.ops, self.ops.xp, self.n_m
        p0 = self.p[0].T  # (N, n_m)
        n = p0.shape[0]
        # Delays d = -m dt for the columns j = m - m_lo of the tables, inside the bounds.
        d_cols = np.arange(n_m)
        d_val = -(d_cols + self.m_lo) * self.dt
        d_cols = d_cols[(d_val >= bounds[2, 0] - 1e-9) & (d_val <= bounds[2, 1] + 1e-9)]
        lo_k = max(1, int(np.ceil(bounds[1, 0] / self.dt - 1e-9)))
        hi_k = max(lo_k, int(np.floor(bounds[1, 1] / self.dt + 1e-9)))
        steps = np.unique(np.rint(np.geomspace(lo_k, hi_k, n_mtt)).astype(np.intp))
        k00 = ops.to_numpy(self.blocks[0]).reshape(n_m, n_m)
        best_gain = ops.full(n, -1.0)
        best = ops.full((3, n), 0.0)
        for k in steps:
            # MTT = k dt: the later edge d + MTT sits k columns to the left.
            cols = d_cols[d_cols - k >= 0]
            if cols.size == 0:
                continue
            f = k00[cols, cols] + k00[cols - k, cols - k] - 2.0 * k00[cols, cols - k]
            ok = f > 1e-12 * max(float(f.max()), 1e-300)
            cols, f = cols[ok], ops.asarray(f[ok])
            cross = p0[:, ops.indices(cols)] - p0[:, ops.indices(cols - k)]  # (N, columns)
            gain = xp.where(cross > 0, cross * cross / f, 0.0)
            j = ops.argmax(gain, 1)
            gj = ops.pick(gain, j)
            upd = gj > best_gain
            ops.put_where(best_gain, upd, gj)
            ops.put_where(best[0], upd, ops.pick(cross, j) / (self.scale * ops.take(f, j)))
            ops.put_where(best[1], upd, ops.full(n, k * self.dt))
            ops.put_where(best[2], upd, -(ops.take(ops.asarray(cols), j) + self.m_lo) * self.dt)
        lo, hi = ops.asarray(bounds[:, :1]), ops.asarray(bounds[:, 1:])
        return xp.clip(best, lo, hi).T
