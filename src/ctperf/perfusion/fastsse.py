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
then a few dozen gathers instead of a pass over all T frames, with the same value (to rounding).
"""

from __future__ import annotations

import copy

import numpy as np

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
    """

    def __init__(self, table: ArterialTable, scale: float, bounds: np.ndarray) -> None:
        if not table.uniform:
            raise ValueError("FastBoxSSE needs uniform frame times")
        self.table, self.scale, self.dt = table, scale, table.dt
        n_t = table.t.size
        s_lo = float(bounds[2, 0])
        s_hi = float(bounds[2, 1] + bounds[1, 1])
        self.m_lo = int(np.floor(-s_hi / self.dt)) - 1
        m_hi = int(np.floor(-s_lo / self.dt)) + 1
        self.n_m = m_hi - self.m_lo + 1
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
        idx = np.arange(n_t)[:, None] + np.arange(self.n_m)[None, :]
        self.shifts = np.concatenate([cum[idx], ca[idx], sl[idx]], axis=1)  # (T, 3 n_m)
        # F(a, b) = X(a, a) + X(b, b) - 2 X(a, b) with X(a, b) = sum_t A(t - a) A(t - b): both
        # positions are quadratic in their own offsets, so X needs only the Gram matrix of the
        # shifted tables (3 n_m x 3 n_m), whatever the voxel.
        gram = self.shifts.T @ self.shifts
        self.gram = np.ascontiguousarray(gram).ravel()
        # H(a) = X(a, a) is a quartic in the offset: coefficients per column (n_m, 5).
        diag = [np.diagonal(gram[p * self.n_m:(p + 1) * self.n_m, q * self.n_m:(q + 1) * self.n_m])
                for p in range(3) for q in range(3)]
        k00, k01, k02, _, k11, k12, _, _, k22 = diag
        self.h_coef = np.ascontiguousarray(
            np.stack([k00, 2 * k01, k11 + k02, k12, 0.25 * k22], axis=1)).ravel()
        self.p: np.ndarray | None = None
        self.c2: np.ndarray | None = None

    def with_tissue(self, tissue: np.ndarray) -> FastBoxSSE:
        """A copy sharing the AIF tables, set to tissue curves (T, N) (thread-safe use)."""
        other = copy.copy(self)
        other.set_tissue(tissue)
        return other

    def set_tissue(self, tissue: np.ndarray) -> None:
        """Tissue curves (T, N) of the voxels to be evaluated."""
        self.p = np.ascontiguousarray(tissue.T @ self.shifts)  # (N, 3 n_m)
        self.c2 = np.einsum("tn,tn->n", tissue, tissue)

    def _split(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column index into the shift tables and offset tau (s) of a shift ``s``."""
        u = -s / self.dt
        m = np.floor(u)
        return np.clip(m.astype(np.intp) - self.m_lo, 0, self.n_m - 1), (u - m) * self.dt

    def _g(self, s: np.ndarray, rows: np.ndarray) -> np.ndarray:
        j, tau = self._split(s)
        flat = rows * (3 * self.n_m) + j
        p = self.p.ravel()  # type: ignore[union-attr]
        return p[flat] + tau * (p[flat + self.n_m] + 0.5 * tau * p[flat + 2 * self.n_m])

    def _x(self, ja: np.ndarray, ta: np.ndarray, jb: np.ndarray, tb: np.ndarray) -> np.ndarray:
        n_m, size = self.n_m, 3 * self.n_m
        wa = (1.0, ta, 0.5 * ta * ta)
        wb = (1.0, tb, 0.5 * tb * tb)
        g = self.gram
        total = np.zeros(ja.shape)
        for p_ in range(3):
            row = (p_ * n_m + ja) * size + jb
            inner = g[row] + wb[1] * g[row + n_m] + wb[2] * g[row + 2 * n_m]
            total += wa[p_] * inner
        return total

    def _h(self, j: np.ndarray, tau: np.ndarray) -> np.ndarray:
        c = self.h_coef
        i = 5 * j
        return c[i] + tau * (c[i + 1] + tau * (c[i + 2] + tau * (c[i + 3] + tau * c[i + 4])))

    def _f(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ja, ta = self._split(a)
        jb, tb = self._split(b)
        return self._h(ja, ta) + self._h(jb, tb) - 2.0 * self._x(ja, ta, jb, tb)

    def __call__(self, params: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """SSE (M,) of parameter triples (M, 3) for voxels ``rows`` (M,) of the tissue set."""
        cbf, mtt, d = params[:, 0], params[:, 1], params[:, 2]
        kc = self.scale * cbf
        cross = self._g(d, rows) - self._g(d + mtt, rows)
        sse = self.c2[rows] - 2.0 * kc * cross + kc * kc * self._f(d, d + mtt)  # type: ignore[index]
        return np.maximum(sse, 0.0)

    def grid_start(self, bounds: np.ndarray, *, n_mtt: int = 16) -> np.ndarray:
        """Best (CBF, MTT, delay) per voxel of the current tissue set on a grid of delays and
        MTTs at whole multiples of the frame interval, CBF solved in closed form (variable
        projection); shape (N, 3)."""
        size = 3 * self.n_m
        p0 = self.p[:, : self.n_m]  # type: ignore[index]
        n = p0.shape[0]
        # Delays d = -m dt for the columns j = m - m_lo of the tables, inside the bounds.
        d_cols = np.arange(self.n_m)
        d_val = -(d_cols + self.m_lo) * self.dt
        d_cols = d_cols[(d_val >= bounds[2, 0] - 1e-9) & (d_val <= bounds[2, 1] + 1e-9)]
        lo_k = max(1, int(np.ceil(bounds[1, 0] / self.dt - 1e-9)))
        hi_k = max(lo_k, int(np.floor(bounds[1, 1] / self.dt + 1e-9)))
        steps = np.unique(np.rint(np.geomspace(lo_k, hi_k, n_mtt)).astype(np.intp))
        best_gain = np.full(n, -1.0)
        best = np.zeros((n, 3))
        g = self.gram
        for k in steps:
            # MTT = k dt: the later edge d + MTT sits k columns to the left.
            cols = d_cols[d_cols - k >= 0]
            if cols.size == 0:
                continue
            f = g[cols * size + cols] + g[(cols - k) * size + cols - k] \
                - 2.0 * g[cols * size + cols - k]
            ok = f > 1e-12 * max(float(f.max()), 1e-300)
            cols, f = cols[ok], f[ok]
            cross = p0[:, cols] - p0[:, cols - k]
            gain = np.where(cross > 0, cross * cross / f, 0.0)
            j = np.argmax(gain, axis=1)
            rows = np.arange(n)
            gj = gain[rows, j]
            upd = gj > best_gain
            best_gain[upd] = gj[upd]
            sel = rows[upd]
            best[upd, 0] = cross[sel, j[upd]] / (self.scale * f[j[upd]])
            best[upd, 1] = k * self.dt
            best[upd, 2] = -(cols[j[upd]] + self.m_lo) * self.dt
        return np.clip(best, bounds[:, 0], bounds[:, 1])
