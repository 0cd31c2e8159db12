"""Tmax under one convention for every method.

The convention: Tmax = effective delay + the time at which the dispersed residue (h * R)(t)
peaks (the first time for a flat top), h the unit-area transport kernel between the AIF's
artery and the tissue. The clinical Tmax > 6 s rule was set on SVD Tmax, which estimates exactly
this. Curves here are built with their own numerical convolution on a 0.02 s grid (exponential
dispersion kernel, box / exponential / gamma residues) and sampled at 89 frames 0.5 s apart; the
true Tmax is read from the same fine-grid (h * R), never from a method's formula.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from scipy.signal import fftconvolve

from ctperf.perfusion import fit_box_nlr, svd_deconvolve

RHO, KH = 1.04, 0.733
FINE = 0.02
TIMES = np.arange(89) * 0.5
GRID = np.arange(0.0, TIMES[-1] + 60.0, FINE)  # long enough for the slowest residue's tail


def aif(t: np.ndarray) -> np.ndarray:
    x = np.clip(t - 4.0, 0, None)
    y = x**3 * np.exp(-x / 1.5)
    return 400.0 * y / y.max()


def dispersed_residue(kind: str, mtt: float, tau: float) -> np.ndarray:
    """(h * R) on GRID: residue R (R(0) = 1, area MTT) through an exponential kernel of mean tau."""
    if kind == "box":
        r = (GRID < mtt).astype(float)
    elif kind == "exponential":
        r = np.exp(-GRID / mtt)
    else:  # gamma transit times of shape 3: R is their survival function
        r = special.gammaincc(3.0, 3.0 * GRID / mtt)
    if tau <= 0:
        return r
    h = np.exp(-GRID / tau)
    return fftconvolve(h / h.sum(), r)[: GRID.size]


def true_tmax(kind: str, mtt: float, delay: float, tau: float) -> float:
    """delay + the first time (h * R) comes within 1e-3 of its maximum (the tolerance makes
    "first time of the maximum" well posed on a plateau, as the phantom's truth does)."""
    e = dispersed_residue(kind, mtt, tau)
    return delay + float(GRID[np.argmax(e >= (1 - 1e-3) * e.max())])


def tissue(kind: str, cbf: float, mtt: float, delay: float, tau: float) -> np.ndarray:
    conv = fftconvolve(aif(GRID), dispersed_residue(kind, mtt, tau))[: GRID.size] * FINE
    shifted = np.interp(GRID - delay, GRID, conv, left=0.0)
    return RHO / KH * cbf / 6000.0 * shifted[np.rint(TIMES / FINE).astype(int)]


def population(kinds, rng, n_per=12):
    """Healthy, penumbral and core parameter draws: curves (T, N) and true Tmax (N,)."""
    ranges = {"healthy": ((20, 70), (3, 6), (0, 2), (0.05, 0.5)),
              "penumbra": ((12, 35), (6, 14), (2, 8), (0.5, 3)),
              "core": ((3, 12), (8, 20), (4, 10), (1, 3))}
    curves, truth, labels = [], [], []
    for kind in kinds:
        for cls, (cr, mr, dr, tr) in ranges.items():
            for _ in range(n_per):
                cbf, mtt, d, tau = (rng.uniform(*x) for x in (cr, mr, dr, tr))
                curves.append(tissue(kind, cbf, mtt, d, tau))
                truth.append(true_tmax(kind, mtt, d, tau))
                labels.append(cls)
    return np.array(curves).T, np.array(truth), np.array(labels)


def method_tmax(method: str, curves: np.ndarray) -> np.ndarray:
    if method.startswith("nlr"):
        return fit_box_nlr(curves, aif(TIMES), TIMES, method=method).tmax
    return svd_deconvolve(curves, aif(TIMES), TIMES, method=method).tmax


def test_true_tmax_of_the_convention():
    # Undispersed box: flat top from 0, so Tmax = delay; a dispersed box reaches its plateau
    # (1 - exp(-t / tau) within 1e-3 of 1) at tau ln(1000). Exponential dispersion of an
    # exponential residue peaks at ln(MTT / tau) MTT tau / (MTT - tau) (analytic).
    assert true_tmax("box", 10.0, 5.0, 0.0) == pytest.approx(5.0)
    assert true_tmax("box", 10.0, 5.0, 0.5) == pytest.approx(5.0 + 0.5 * np.log(1000), abs=0.05)
    peak = np.log(10 / 1.5) * 10 * 1.5 / (10 - 1.5)
    # The tolerance stops a little before a smooth peak, and the fine grid's rectangle-rule
    # kernel moves it by a grid step or two: 0.2 s.
    assert true_tmax("exponential", 10.0, 5.0, 1.5) == pytest.approx(5.0 + peak, abs=0.2)


@pytest.mark.parametrize("method", ["nlr-fast", "bsvd", "osvd"])
def test_tmax_matches_the_convention_on_realistic_residues(method, rng):
    curves, truth, labels = population(("exponential", "gamma"), rng)
    err = method_tmax(method, curves) - truth
    # Noise-free. The box fit's Tmax is calibrated (delay + MTT/4) over these ranges; the SVD
    # Tmax is the regularised residue's peak, late by up to ~1.5 s in healthy tissue where the
    # true peak is sharper than the truncation passes. Bounds: measured worst cases + 0.5 s.
    assert np.abs(err).mean() < 1.2, np.abs(err).mean()
    assert np.abs(err).max() < 2.6, np.abs(err).max()
    late = labels != "healthy"
    assert abs(err[late].mean()) < 0.8, err[late].mean()  # bias where the 6 s rule decides
    # Classification at the clinical 6 s threshold agrees with the truth's almost everywhere.
    assert np.mean((truth + err > 6.0) == (truth > 6.0)) >= 0.93


def test_box_tmax_of_the_reference_is_late(rng):
    """The reference's delay + MTT/2 lies seconds after the convention's Tmax on exponential
    residues; the calibrated delay + MTT/4 does not."""
    curves, truth, labels = population(("exponential",), rng, n_per=6)
    fit = fit_box_nlr(curves, aif(TIMES), TIMES, method="nlr-fast")
    late = labels != "healthy"
    assert np.mean(fit.delay[late] + fit.mtt[late] / 2 - truth[late]) > 2.5
    assert abs(np.mean(fit.tmax[late] - truth[late])) < 0.8


@pytest.mark.parametrize("method", ["bsvd", "osvd", "ssvd"])
def test_svd_tmax_moves_with_the_delay_between_frames(method):
    """A quarter-frame shift of the tissue moves Tmax by a quarter frame (the parabola's
    vertex), not by 0 or a whole frame."""
    base = [tissue("gamma", 30.0, 8.0, d, 1.0) for d in (2.0, 2.125, 2.25, 2.375)]
    tmax = svd_deconvolve(np.array(base).T, aif(TIMES), TIMES, method=method).tmax
    # Within 0.06 s of the true steps: the parabola through three 0.5 s samples of a smooth
    # peak places its vertex to a few hundredths of a frame.
    np.testing.assert_allclose(np.diff(tmax), 0.125, atol=0.06)


def test_bsvd_tmax_negative_delay():
    """Tissue ahead of the AIF (negative delay) reads as a negative lag of the circular residue."""
    c = np.array([tissue("exponential", 50.0, 4.0, d, 0.3) for d in (-1.0, 0.0, 1.0)]).T
    tmax = svd_deconvolve(c, aif(TIMES), TIMES, method="bsvd").tmax
    truth = np.array([true_tmax("exponential", 4.0, d, 0.3) for d in (-1.0, 0.0, 1.0)])
    # Healthy, sharp residue: bSVD's truncation widens the peak, late by ~1 s (measured).
    np.testing.assert_allclose(tmax - truth, (tmax - truth).mean(), atol=0.1)
    assert 0.0 < (tmax - truth).mean() < 1.5


def test_penumbra_example_noisy(rng):
    """CBF 25, MTT 10, delay 5 s, dispersion 1.5 s at 10 HU per frame: the box fit's median
    Tmax stays near the convention's for exponential and gamma residues."""
    for kind in ("exponential", "gamma"):
        c = tissue(kind, 25.0, 10.0, 5.0, 1.5)
        noisy = c[:, None] + 10.0 * rng.standard_normal((c.size, 300))
        tmax = fit_box_nlr(noisy, aif(TIMES), TIMES, method="nlr-fast").tmax
        truth = true_tmax(kind, 10.0, 5.0, 1.5)
        # 300 voxels: the median's sampling error is ~0.2 s. Noise pulls the box later and
        # longer on the exponential's long tail: measured +1.1 s (exponential), under 0.5 s
        # (gamma); delay + MTT/2 would be 3-4 s late.
        assert abs(np.median(tmax) - truth) < 1.5, (kind, np.median(tmax), truth)


def test_dispersed_box_is_underestimated_by_every_method():
    """A dispersed box's (h * R) rises towards its plateau for ~7 tau, so the convention's Tmax
    is delay + 7 tau (at most MTT); every method here reads a rounded top and reports an
    earlier time. Asserted as measured, so that a change in this known limitation is noticed."""
    c = tissue("box", 25.0, 10.0, 5.0, 1.5)[:, None]
    truth = true_tmax("box", 10.0, 5.0, 1.5)
    # tau ln(1000) = 10.4 s exceeds MTT: the top is reached just before the box ends, where
    # 1 - exp(-t / tau) comes within 1e-3 of its value at MTT (t = 9.1 s).
    assert 5.0 + 9.0 < truth <= 5.0 + 10.0
    nlr = method_tmax("nlr-fast", c)[0]
    bsvd = method_tmax("bsvd", c)[0]
    assert 8.0 < nlr < 10.0, nlr  # delay ~6.1 + MTT ~10.6 / 4
    assert 11.0 < bsvd < 14.0, bsvd
