"""Trust-region Newton refinement of the box model in (delay, delay + MTT), CBF eliminated.

For fixed delay ``a`` and box end ``b = a + MTT`` the best CBF is linear least squares, so the
misfit is ``SSE = |C|^2 - phi`` with ``phi = dG^2 / F``, ``dG = G(a) - G(b)`` and
``F = H(a) + H(b) - 2 X(a, b)`` (notation of :mod:`ctperf.perfusion.fastsse`). Every term is a
polynomial in the within-frame offset of ``a`` or ``b`` with coefficients from the voxel's
correlation tables and the AIF's Gram matrix, so the exact gradient and Hessian of ``phi`` cost a
few dozen gathers per voxel. Each iteration takes the Newton step where the Hessian is negative
definite and a gradient step otherwise, limited to a per-voxel trust radius that grows on
success and shrinks on failure; points are projected onto the delay and MTT bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctperf.perfusion.fastsse import FastBoxSSE

__all__ = ["refine_newton"]


def _terms(obj: FastBoxSSE, a: Any, b: Any, rows: Any) -> tuple[Any, ...]:
    """dG, F and their first and second derivatives in (a, b)."""
    n_m, take = obj.n_m, obj.ops.take
    p = obj.p  # P0, P1, P2 / 2 per table column and voxel, (3, n_m, N)
    ja, ta = obj.split(a)
    jb, tb = obj.split(b)
    n_vox = p.shape[2]

    def g_parts(j, t):
        flat = j * n_vox + rows
        p0, p1, p2h = take(p[0], flat), take(p[1], flat), take(p[2], flat)
        p2 = 2.0 * p2h
        return p0 + t * (p1 + t * p2h), -(p1 + t * p2), p2

    def h_parts(j, t):
        c0, c1, c2, c3, c4 = (take(obj.h_coef[i], j) for i in range(5))
        val = c0 + t * (c1 + t * (c2 + t * (c3 + t * c4)))
        d1 = c1 + t * (2 * c2 + t * (3 * c3 + t * 4 * c4))
        d2 = 2 * c2 + t * (6 * c3 + t * 12 * c4)
        return val, -d1, d2

    ga, ga_s, ga_ss = g_parts(ja, ta)
    gb, gb_s, gb_ss = g_parts(jb, tb)
    ha, ha_s, ha_ss = h_parts(ja, ta)
    hb, hb_s, hb_ss = h_parts(jb, tb)
    ij = ja * n_m + jb
    k = [[take(obj.blocks[3 * pp + qq], ij) for qq in range(3)] for pp in range(3)]
    xp = obj.ops.xp
    one, zero = xp.ones_like(ta), xp.zeros_like(ta)
    w = lambda t: (one, t, 0.5 * t * t)  # noqa: E731
    dw = lambda t: (zero, one, t)  # noqa: E731
    d2w = lambda t: (zero, zero, one)  # noqa: E731

    def form(u, v):
        return sum(u[i] * k[i][j] * v[j] for i in range(3) for j in range(3))

    x = form(w(ta), w(tb))
    x_a, x_b = -form(dw(ta), w(tb)), -form(w(ta), dw(tb))
    x_aa, x_bb, x_ab = form(d2w(ta), w(tb)), form(w(ta), d2w(tb)), form(dw(ta), dw(tb))
    dg = ga - gb
    dg_1 = (ga_s, -gb_s)
    dg_2 = (ga_ss, xp.zeros_like(ga_ss), -gb_ss)  # aa, ab, bb
    f = ha + hb - 2 * x
    f_1 = (ha_s - 2 * x_a, hb_s - 2 * x_b)
    f_2 = (ha_ss - 2 * x_aa, -2 * x_ab, hb_ss - 2 * x_bb)
    return dg, dg_1, dg_2, f, f_1, f_2


def _phi(obj, a, b, rows, cbf_max):
    """phi = |C|^2 - SSE at the best CBF in [0, cbf_max], its gradient and Hessian (aa, ab, bb).

    Unconstrained, the best CBF is dG / (k F) and phi = dG^2 / F; where that CBF exceeds
    cbf_max, CBF = cbf_max and phi = 2 k c dG - k^2 c^2 F (the two agree, with their
    gradients, where they meet)."""
    xp = obj.ops.xp
    dg, g1, g2, f, f1, f2 = _terms(obj, a, b, rows)
    f = xp.clip(f, 1e-300, None)
    kc = obj.scale * cbf_max
    pos = dg > 0
    capped = dg > kc * f
    phi = xp.where(capped, 2 * kc * dg - kc * kc * f, xp.where(pos, dg * dg / f, 0.0))
    grad, hess = [], []
    for i in range(2):
        free = 2 * dg * g1[i] / f - dg * dg * f1[i] / f**2
        grad.append(xp.where(capped, 2 * kc * g1[i] - kc * kc * f1[i], xp.where(pos, free, 0.0)))
    for idx, (i, j) in enumerate(((0, 0), (0, 1), (1, 1))):
        free = (2 * (g1[i] * g1[j] + dg * g2[idx]) / f
                - 2 * dg * (g1[i] * f1[j] + g1[j] * f1[i]) / f**2
                - dg * dg * f2[idx] / f**2 + 2 * dg * dg * f1[i] * f1[j] / f**3)
        hess.append(xp.where(capped, 2 * kc * g2[idx] - kc * kc * f2[idx],
                             xp.where(pos, free, 0.0)))
    return phi, grad, hess, dg, f


def refine_newton(obj: FastBoxSSE, start: Any, bounds: np.ndarray,
                  *, n_iter: int = 10) -> Any:
    """Refine (CBF, MTT, delay) starts (N, 3) of the tissue set in ``obj``; returns (N, 3).

    ``start`` and the result are arrays of ``obj``'s backend (``obj.ops``)."""
    ops = obj.ops
    xp = ops.xp
    n = start.shape[0]
    rows = ops.arange(n)
    a = start[:, 2] * 1.0  # a copy
    b = a + start[:, 1]
    (d_lo, d_hi), (m_lo, m_hi) = bounds[2], bounds[1]
    radius = ops.full(n, 0.5 * obj.dt)
    phi, grad, hess, _, _ = _phi(obj, a, b, rows, bounds[0, 1])
    active = rows
    for _ in range(n_iter):
        if active.shape[0] == 0:
            break
        g0, g1 = grad[0][active], grad[1][active]
        h00, h01, h11 = hess[0][active], hess[1][active], hess[2][active]
        det = h00 * h11 - h01 * h01
        newton = (h00 < 0) & (det > 0)
        safe = xp.where(newton, det, 1.0)
        s0 = xp.where(newton, -(h11 * g0 - h01 * g1) / safe, g0)
        s1 = xp.where(newton, -(-h01 * g0 + h00 * g1) / safe, g1)
        norm = xp.hypot(s0, s1)
        r = radius[active]
        scale = xp.where(norm > r, r / xp.clip(norm, 1e-300, None), 1.0)
        na = xp.clip(a[active] + s0 * scale, d_lo, d_hi)
        nb = na + xp.clip(b[active] + s1 * scale - na, m_lo, m_hi)
        t_phi, t_grad, t_hess, _, _ = _phi(obj, na, nb, active, bounds[0, 1])
        better = t_phi >= phi[active]
        idx = active[better]
        a[idx], b[idx], phi[idx] = na[better], nb[better], t_phi[better]
        for lst, new in ((grad, t_grad), (hess, t_hess)):
            for i in range(len(lst)):
                lst[i][idx] = new[i][better]
        radius[idx] = xp.clip(2 * radius[idx], None, obj.dt)
        radius[active[~better]] /= 4
        moved = xp.hypot(na - a[active], nb - b[active])
        done = (better & (norm * scale < 1e-4)) | (radius[active] < 1e-5) | (~better & (moved
                                                                                   < 1e-6))
        active = active[~done]
    _, _, _, dg, f = _phi(obj, a, b, rows, bounds[0, 1])
    cbf = xp.clip(xp.clip(dg, 0.0, None) / (obj.scale * xp.clip(f, 1e-300, None)),
                  float(bounds[0, 0]), float(bounds[0, 1]))
    return ops.stack([cbf, b - a, a], 1)
