"""Kudo-style tile phantom (Kudo et al., Radiology 267:201, 2013): accuracy of the box-NLR and
SVD methods against known CBF, CBV, MTT and delay.

Per slice 7 x 7 tiles of 16 x 16 voxels: delay 0-3 s (columns, 0.5 s steps) x MTT 24 ... 3.43 s
(rows); one slice per CBV (1-5 mL/100 g) and per residue shape (box, exponential, linear). Curves
are simulated on a 0.02 s grid from a gamma-variate AIF and sampled at 89 frames 0.5 s apart (the
paper's protocol), so no fit ever sees data made by its own discretisation. Tile means are taken
over each tile's inner voxels (the fits are voxel-independent, so only those are fitted).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ctperf.perfusion import fit_box_nlr, svd_deconvolve

RHO, KH = 1.04, 0.733
FINE = 0.02
TIMES = np.arange(89) * 0.5
DELAYS = np.arange(7) * 0.5
MTTS = np.array([24.0, 12.0, 8.0, 6.0, 4.8, 4.0, 3.43])
CBVS = np.arange(1.0, 6.0)


def _aif_fine(t: np.ndarray) -> np.ndarray:
    x = np.clip(t - 4.0, 0, None)
    y = x**3 * np.exp(-x / 1.5)
    return 400.0 * y / y.max()


def _residue(shape: str, t: np.ndarray, mtt: float) -> np.ndarray:
    if shape == "box":
        return (t < mtt).astype(float)
    if shape == "exponential":
        return np.exp(-t / mtt)
    return np.clip(1 - t / (2 * mtt), 0, None)  # linear: area = MTT


def tile_curves(shape: str, cbv: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noise-free curves of the 49 tiles of one slice: (T, 49) and the truth per tile."""
    fine_t = np.arange(0, TIMES[-1] + FINE / 2, FINE)
    ca = _aif_fine(fine_t)
    sample = np.rint(TIMES / FINE).astype(int)
    curves, truth = [], {"cbf": [], "cbv": [], "mtt": [], "delay": [], "ttp": []}
    for mtt in MTTS:
        cbf = cbv / mtt * 60.0
        r = _residue(shape, fine_t, mtt)
        conv = fftconvolve(ca, r)[: fine_t.size] * FINE
        for d in DELAYS:
            shifted = np.interp(fine_t - d, fine_t, conv, left=0.0)
            curves.append(RHO / KH * cbf / 6000.0 * shifted[sample])
            peak = fine_t[np.argmax(shifted)]
            for k, v in zip(("cbf", "cbv", "mtt", "delay", "ttp"), (cbf, cbv, mtt, d, peak),
                            strict=True):
                truth[k].append(v)
    return np.array(curves).T, {k: np.array(v) for k, v in truth.items()}


def true_aif() -> np.ndarray:
    return _aif_fine(TIMES)


def tile_study(shapes, *, inner: int, noise: float, rng):
    """Curves (T, tiles * inner**2) of the inner voxels and per-tile truth (tiles,)."""
    curves, truths = [], []
    for shape in shapes:
        for cbv in CBVS:
            c, tr = tile_curves(shape, cbv)
            curves.append(c)
            truths.append(tr)
    base = np.concatenate(curves, axis=1)
    truth = {k: np.concatenate([t[k] for t in truths]) for k in truths[0]}
    vox = np.repeat(base, inner * inner, axis=1)
    if noise:
        vox = vox + noise * rng.standard_normal(vox.shape)
    return vox, truth, inner * inner


def tile_means(values: np.ndarray, per_tile: int) -> np.ndarray:
    return values.reshape(-1, per_tile).mean(axis=1)


@pytest.mark.parametrize("mode", ["nlr", "nlr-fast"])
def test_box_tiles_noise_free_within_5_percent(mode, rng):
    vox, truth, per = tile_study(["box"], inner=1, noise=0.0, rng=rng)
    fit = fit_box_nlr(vox, true_aif(), TIMES, method=mode)
    for name in ("cbf", "cbv", "mtt"):
        est = tile_means(getattr(fit, name), per)
        err = np.abs(est / truth[name] - 1)
        # Issue target: within 5 % noise-free. The residual error is the sampling of a 0.5 s
        # grid (the fit interpolates the AIF linearly between frames).
        assert err.max() < 0.05, (name, err.max(), truth["mtt"][np.argmax(err)])


@pytest.mark.parametrize("mode", ["nlr-fast", "nlr"])
def test_box_tiles_noisy_correlate(mode, rng):
    vox, truth, per = tile_study(["box"], inner=8, noise=10.0, rng=rng)
    fit = fit_box_nlr(vox, true_aif(), TIMES, method=mode)
    cbv, cbf = tile_means(fit.cbv, per), tile_means(fit.cbf, per)
    r_cbv = np.corrcoef(cbv, truth["cbv"])[0, 1]
    r_cbf = np.corrcoef(cbf, truth["cbf"])[0, 1]
    # Targets: r >= 0.95 (CBV) and >= 0.90 (CBF) at 10 HU per frame. With 64 voxels per
    # tile (the fast test; the slow one uses 14 x 14) the tile means are noisier than with 196.
    assert r_cbv >= 0.95, r_cbv
    assert r_cbf >= 0.90, r_cbf
    # CBV (an area ratio) is unbiased where the tissue is not buried in noise: measured mean
    # relative bias under 6 % and error under 10 % for CBV >= 2 (peaks of 8 HU and more).
    rel = cbv / truth["cbv"] - 1
    firm = truth["cbv"] >= 2
    assert abs(rel[firm].mean()) < 0.10, rel[firm].mean()
    assert np.abs(rel[firm]).mean() < 0.15, np.abs(rel[firm]).mean()
    # Per-voxel CBF is not: at 10 HU noise is fitted as short, tall boxes, and the tile means
    # of a right-skewed CBF are too high, the more so the weaker the tissue (measured 1.6x at
    # CBV 5, 2x-2.8x at CBV 3-4, 5.6x at CBV 1). Upper bounds, so that a worse fit fails.
    ratio = cbf / truth["cbf"]
    assert np.mean(ratio[truth["cbv"] == 5]) < 1.9
    assert np.mean(ratio[truth["cbv"] >= 3]) < 2.8


def _delay_slope(cbf_est: np.ndarray, truth: dict[str, np.ndarray], *, max_mtt: float = 30.0
                 ) -> float:
    """Slope (per s of delay) of the relative CBF error, averaged over CBV and the MTT rows up
    to ``max_mtt``."""
    rel = (cbf_est / truth["cbf"] - 1).reshape(-1, MTTS.size, DELAYS.size)
    rows = rel[:, MTTS <= max_mtt].mean(axis=(0, 1))
    return float(np.polyfit(DELAYS, rows, 1)[0])


@pytest.mark.parametrize("method", ["bsvd", "osvd", "nlr", "nlr-fast"])
def test_cbf_error_does_not_depend_on_delay(method, rng):
    vox, truth, per = tile_study(["box"], inner=1, noise=0.0, rng=rng)
    if method.startswith("nlr"):
        cbf = fit_box_nlr(vox, true_aif(), TIMES, method=method).cbf
    else:
        cbf = svd_deconvolve(vox, true_aif(), TIMES, method=method).cbf
    # Issue target: below 2 % per second of delay, over all tiles and over the short (normal
    # tissue) MTTs alone.
    for max_mtt in (30.0, 4.0):
        slope = _delay_slope(tile_means(cbf, per), truth, max_mtt=max_mtt)
        assert abs(slope) < 0.02, (max_mtt, slope)


def test_ssvd_cbf_error_depends_on_delay(rng):
    vox, truth, per = tile_study(["box"], inner=1, noise=0.0, rng=rng)
    cbf = svd_deconvolve(vox, true_aif(), TIMES, method="ssvd").cbf
    slope = _delay_slope(tile_means(cbf, per), truth, max_mtt=4.0)
    # sSVD underestimates CBF more as the delay grows (Wu 2003), most at short MTTs (normal
    # tissue): there the slope is clearly beyond the 2 %/s the other methods stay within.
    assert slope < -0.02, slope


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nlr-fast", "nlr"])
def test_all_shapes_full_tiles_noisy(mode, rng):
    vox, truth, per = tile_study(["box"], inner=14, noise=10.0, rng=rng)
    fit = fit_box_nlr(vox, true_aif(), TIMES, method=mode, progress=False)
    r_cbv = np.corrcoef(tile_means(fit.cbv, per), truth["cbv"])[0, 1]
    r_cbf = np.corrcoef(tile_means(fit.cbf, per), truth["cbf"])[0, 1]
    # Targets, on 14 x 14 inner voxels per tile.
    assert r_cbv >= 0.95 and r_cbf >= 0.90, (r_cbv, r_cbf)
    rel = tile_means(fit.cbv, per) / truth["cbv"] - 1
    firm = truth["cbv"] >= 2
    # As in the fast test (CBV unbiased where peaks reach 8 HU), with more voxels per tile.
    assert abs(rel[firm].mean()) < 0.10 and np.abs(rel[firm]).mean() < 0.15, rel[firm]
    # Non-box residues: the box model is misspecified, but CBV (an area ratio) still tracks.
    vox, truth, per = tile_study(["exponential", "linear"], inner=6, noise=10.0, rng=rng)
    fit = fit_box_nlr(vox, true_aif(), TIMES, method=mode)
    r_cbv = np.corrcoef(tile_means(fit.cbv, per), truth["cbv"])[0, 1]
    assert r_cbv >= 0.90, r_cbv  # 36 voxels per tile and long truncated exponential tails
    # Measured mean relative CBV bias -9 % (nlr) and +5 % (nlr-fast), error 14-16 %: the
    # exponential's tail past the last frame is lost, noise adds short boxes.
    rel = tile_means(fit.cbv, per) / truth["cbv"] - 1
    assert abs(rel.mean()) < 0.15 and np.abs(rel).mean() < 0.25, (rel.mean(), np.abs(rel).mean())


@pytest.mark.parametrize("mode", ["nlr", "nlr-fast"])
def test_box_fit_underestimates_cbf_of_other_residues(mode, rng):
    """Noise-free exponential and linear residues: the box model is misspecified. Asserted as
    measured (tile study, all 245 tiles per shape), so that the known bias stays visible."""
    for shape, lo, hi, med in (("exponential", 0.40, 0.62, 0.49), ("linear", 0.60, 0.75, 0.65)):
        vox, truth, per = tile_study([shape], inner=1, noise=0.0, rng=rng)
        fit = fit_box_nlr(vox, true_aif(), TIMES, method=mode)
        ratio = tile_means(fit.cbf, per) / truth["cbf"]
        # Measured 0.43-0.59 (median 0.49) exponential, 0.64-0.71 (median 0.65) linear;
        # bounds a few hundredths wider.
        assert lo < ratio.min() and ratio.max() < hi, (shape, ratio.min(), ratio.max())
        assert np.median(ratio) == pytest.approx(med, abs=0.03), (shape, np.median(ratio))
        # CBV holds better: the box's area still matches most of the curve (measured mean
        # -13 % exponential, -3 % linear; the exponential's tail runs past the last frame).
        assert np.mean(tile_means(fit.cbv, per) / truth["cbv"]) > 0.8


def test_smoothed_ttp_reads_the_tissue_peak(rng):
    """The maps' TTP (the curve band-limited and smoothed over time, Gaussian SD 1.5 s)
    against the true peak of every tile curve (the 0.02 s grid's), beside the highest frame of
    the band-limited curve (the maps' TTP before; both searched over every frame). Noise-free
    the smoothing's shift must stay small; with noise the smoothed peak must be closer to the
    truth than the highest frame."""
    from ctperf.perfusion.curves import TTP_SMOOTH_S, bandlimit, time_to_peak

    for shape in ("box", "exponential", "linear"):
        vox, truth, _ = tile_study([shape], inner=1, noise=0.0, rng=rng)
        ttp = time_to_peak(vox, TIMES, smooth_s=TTP_SMOOTH_S)
        err = ttp - truth["ttp"]
        # Measured median error +0.11 s (box), +0.35 s (exponential), +0.23 s (linear): a
        # curve that rises faster than it falls peaks later once smoothed.
        assert abs(np.median(err)) < 0.5, (shape, np.median(err))
        # Every error above 1 s is a box of MTT 24 s, whose curve is flat for seconds at its
        # top: there the time read must still be on the top (measured: the curve within 0.94 %
        # of its maximum there; 0.48 % and 0.32 % for the other shapes).
        at = np.array([np.interp(ttp[i] + TIMES[0], TIMES, vox[:, i]) for i in range(ttp.size)])
        assert np.all(at >= 0.98 * vox.max(axis=0)), (shape, (at / vox.max(axis=0)).min())
        assert np.all((np.abs(err) <= 1.0) | (truth["mtt"] >= 24.0)), shape
    for shape in ("box", "exponential", "linear"):
        vox, truth, per = tile_study([shape], inner=4, noise=5.0, rng=rng)
        true_ttp = np.repeat(truth["ttp"], per)
        smooth = time_to_peak(vox, TIMES, smooth_s=TTP_SMOOTH_S) - true_ttp
        frame = time_to_peak(bandlimit(vox), TIMES) - true_ttp
        # 5 HU a frame. Measured median |error| 0.70 / 1.34 / 1.08 s against the highest
        # frame's 1.18 / 1.96 / 1.70 s (box / exponential / linear); median error +0.06 /
        # +0.64 / +0.37 s against -0.13 / +0.83 / +0.58 s. Bounds: a fifth of the gain and
        # 0.3 s of bias.
        assert np.median(np.abs(smooth)) < 0.85 * np.median(np.abs(frame)), shape
        assert abs(np.median(smooth)) < abs(np.median(frame)) + 0.3, shape


def _residue_grid(noise: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box, exponential and gamma residues with exponential dispersion (0.3 s on time, 1.5 s
    when late), built on the 0.02 s grid: curves (T, N), true CBF and the case labels."""
    from scipy import special

    fine_t = np.arange(0, TIMES[-1] + 40 + FINE / 2, FINE)
    ca = _aif_fine(fine_t)
    sample = np.rint(TIMES / FINE).astype(int)
    curves, cbfs, labels = [], [], []
    for shape in ("box", "exponential", "gamma"):
        for cbf in (15.0, 25.0, 35.0, 60.0):
            for mtt in (3.0, 6.0, 12.0, 18.0):
                r = {"box": (fine_t < mtt).astype(float), "exponential": np.exp(-fine_t / mtt),
                     "gamma": special.gammaincc(3.0, 3.0 * fine_t / mtt)}[shape]
                for delay in (0.0, 3.0, 7.0, 12.0, 14.0):
                    tau = 0.3 if delay < 2 else 1.5
                    h = np.exp(-fine_t / tau)
                    eff = fftconvolve(h / h.sum(), r)[: fine_t.size]
                    conv = fftconvolve(ca, eff)[: fine_t.size] * FINE
                    shifted = np.interp(fine_t - delay, fine_t, conv, left=0.0)
                    curves.append(RHO / KH * cbf / 6000.0 * shifted[sample])
                    cbfs.append(cbf)
                    labels.append((shape, cbf, mtt, delay))
    c = np.array(curves).T
    return c + noise * rng.standard_normal(c.shape), np.array(cbfs), np.array(labels, dtype=object)


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_plain_nelder_mead_has_no_cbf_outliers(noise, rng):
    """High CNR (noise-free and 0.2 HU per frame): no box fit returns CBF above 1.3x the truth
    on box, exponential or gamma residues, delays 0-14 s, MTT 3-18 s. (The box fit
    underestimates CBF of the other residues, so 1.3x can only come from a stalled search or
    an unidentifiable short box; at this noise level there is neither.)"""
    vox, cbf, labels = _residue_grid(noise, rng)
    for mode in ("nlr", "nlr-fast"):
        ratio = fit_box_nlr(vox, true_aif(), TIMES, method=mode).cbf / cbf
        assert ratio.max() <= 1.3, (mode, labels[np.argmax(ratio)], ratio.max())


@pytest.mark.parametrize("step", [2.0, 3.0])
def test_nlr_fast_reaches_the_box_least_squares_on_coarse_frames(step, rng):
    """Noise-free box, exponential and gamma residues with 0-1.5 s of dispersion, sampled every
    2 or 3 s: nlr-fast's misfit is never well above the plain simplex's. From its whole-frame
    grid start alone, its Newton polish had stopped in a local minimum on such curves (a
    probe's: CBF 98.3 for the simplex's 65.6, misfit 12 times as large; 3 of 120 curves at
    2 s, 4 at 3 s); fitted on the 0.5 s grid (fit_grid) it reaches the simplex's fit."""
    from scipy import special

    times = np.arange(0.0, 60.0, step)
    fine_t = np.arange(0, 120 + FINE / 2, FINE)
    ca = _aif_fine(fine_t)
    sample = np.rint(times / FINE).astype(int)
    curves = []
    for shape in ("box", "exponential", "gamma"):
        for _ in range(40):
            cbf, mtt = rng.uniform(10, 60), rng.uniform(3, 12)
            delay, tau = rng.uniform(0, 6), rng.uniform(0.02, 1.5)
            r = {"box": (fine_t < mtt).astype(float), "exponential": np.exp(-fine_t / mtt),
                 "gamma": special.gammaincc(3.0, 3.0 * fine_t / mtt)}[shape]
            h = np.exp(-fine_t / tau)
            eff = fftconvolve(h / h.sum(), r)[: fine_t.size]
            conv = fftconvolve(ca, eff)[: fine_t.size] * FINE
            shifted = np.interp(fine_t - delay, fine_t, conv, left=0.0)
            curves.append(RHO / KH * cbf / 6000.0 * shifted[sample])
    c, aif = np.array(curves).T, ca[sample]
    simplex = fit_box_nlr(c, aif, times, method="nlr")
    fast = fit_box_nlr(c, aif, times, method="nlr-fast")
    # misfits of 0.01-0.2 HU: where both reach one minimum they agree to 0.02 %, a local
    # minimum left the misfit 3-12 times the simplex's
    worse = fast.residual > 1.5 * simplex.residual + 1e-3
    assert not worse.any(), (np.flatnonzero(worse), fast.residual[worse], simplex.residual[worse])


@pytest.mark.parametrize("method", ["nlr", "nlr-fast"])
def test_box_fits_of_short_boxes_on_coarse_frames(method):
    """Noise-free box residues (CBV 4, no dispersion) sampled every 2 s from a continuous
    convolution: the box model integrates the AIF as a straight line between its samples, which
    cuts the bolus's peak; fitted at the frames alone a short box made up for it with CBF 1.6-2
    times the true (a probe's: MTT 3 s +99 %, 4 s +44 %). Fitted on a 0.5 s grid of both
    curves interpolated, the error is what a 0.5 s study's is, a few per cent."""
    step, mtts = 2.0, np.array([3.0, 4.0, 6.0, 10.0])
    times = np.arange(0.0, 60.0, step)
    fine_t = np.arange(0, 120 + FINE / 2, FINE)
    ca = _aif_fine(fine_t)
    sample = np.rint((times + 0.7) / FINE).astype(int)  # the bolus's peak between frames
    curves = []
    for mtt in mtts:
        conv = fftconvolve(ca, (fine_t < mtt).astype(float))[: fine_t.size] * FINE
        curves.append(RHO / KH * (60 * 4 / mtt) / 6000.0 * conv[sample])
    fit = fit_box_nlr(np.array(curves).T, ca[sample], times, method=method)
    ratio = fit.cbf / (60 * 4 / mtts)
    # the interpolated curves are not the continuous ones, and how far they depart depends on
    # the bolus and where its peak falls between frames: here -3 % at MTT 3 s, with a probe's
    # AIF +16 %; longer boxes within 4 % on both. At the frames alone: 1.86, 1.33, 1.10, 1.03
    assert np.all(np.abs(ratio - 1) < [0.2, 0.08, 0.05, 0.05]), ratio
    np.testing.assert_allclose(fit.cbv, 4.0, rtol=0.05)  # CBV is the areas' ratio
    assert np.all(fit.residual < 1.0), fit.residual  # HU, measured at the frames


def test_box_fits_take_times_to_the_millisecond_as_even():
    """Frames every 8/3 s with their times written to the millisecond: within 0.1 % of even
    (as the uniform grid of uneven frames takes them), they had been fitted at the frames
    alone, short boxes 1.45 and 3.98 times the true CBF (a review's); they go on the 0.5 s
    grid as the exact times do."""
    from ctperf.perfusion.boxnlr import fit_grid

    step, mtts = 8.0 / 3.0, np.array([3.0, 4.0, 6.0])
    exact = np.arange(0.0, 60.0, step)
    fine_t = np.arange(0, 120 + FINE / 2, FINE)
    ca = _aif_fine(fine_t)
    sample = np.rint(exact / FINE).astype(int)
    curves = np.array([RHO / KH * (60 * 4 / m) / 6000.0 * (fftconvolve(
        ca, (fine_t < m).astype(float))[: fine_t.size] * FINE)[sample] for m in mtts]).T
    fits = [fit_box_nlr(curves, ca[sample], t, method="nlr-fast")
            for t in (exact, np.round(exact, 3))]
    assert fit_grid(np.round(exact, 3)) is not None
    # the same curves on grids 1e-4 s apart at most
    np.testing.assert_allclose(fits[1].cbf, fits[0].cbf, rtol=0.01)
    assert np.all(np.abs(fits[1].cbf / (60 * 4 / mtts) - 1) < 0.15), fits[1].cbf
    from ctperf.perfusion import fit_curves

    fit = fit_curves(curves + 30.0, ca[sample] + 40.0, np.round(exact, 3), method="nlr-fast")
    assert fit.provenance["box_fit_step_s"] == pytest.approx(step / 6, abs=1e-4)


def test_simplex_in_cbf_coordinates_stalls():
    """The cause of the outliers, kept here as a reference: the same simplex run in (CBF, MTT,
    delay) coordinates (fminsearch's 5 % simplex around the reference start, as before) stalls
    on a short box (noise-free, CBF 35, MTT 3 s, no delay) in a local minimum with CBF 1.7x,
    MTT 1.7 s and 50 times the misfit: the area CBF x MTT is lowered by shrinking MTT. The
    simplex of fit_box_nlr, in (CBV, MTT, delay), finds the minimum."""
    from ctperf.perfusion.boxnlr import DEFAULT_BOUNDS
    from ctperf.perfusion.curves import ArterialTable, bandlimit, flow_scale
    from ctperf.perfusion.fastsse import FastBoxSSE
    from ctperf.perfusion.nelder_mead import nelder_mead

    vox, _, labels = _residue_grid(0.0, np.random.default_rng(0))
    pick = [i for i, lab in enumerate(labels) if tuple(lab) == ("box", 35.0, 3.0, 0.0)]
    c = vox[:, pick]
    b = np.array(DEFAULT_BOUNDS)
    obj = FastBoxSSE(ArterialTable(bandlimit(true_aif()), TIMES), flow_scale(RHO, KH),
                     b).with_tissue(bandlimit(c))
    old = nelder_mead(lambda q, rows: obj.sse(q[0], q[1], q[2], rows),
                      np.array([[60.0, 5.0, 3.5]]), bounds=b, max_iter=300)
    new = fit_box_nlr(c, true_aif(), TIMES, method="nlr")
    assert old[0, 0] > 1.3 * 35.0, old
    # noise-free box from the 0.02 s grid: within 5 % (the 0.5 s sampling of the AIF)
    assert new.cbf[0] == pytest.approx(35.0, rel=0.05)


def _injection_curves(shape: str, *, n: int, noise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """AIF of a 9 s injection (a 9 s boxcar through a gamma-variate transport; first-pass FWHM
    about 9.5 s, as a 40 mL bolus at 4-5 mL/s gives) with a baseline of 8 s, and ``n`` tissue
    curves of white-matter-like tissue (CBF 25, MTT 4.5 s, delay 1 s, dispersion 0.2 s) with
    ``noise`` HU per frame: (AIF (T,), tissue (T, n)), both built on the 0.02 s grid."""
    from scipy import special

    fine_t = np.arange(0, TIMES[-1] + FINE / 2, FINE)
    g = (fine_t / 1.5) ** 3 * np.exp(-fine_t / 1.5)
    ca = fftconvolve(((fine_t >= 8.0) & (fine_t < 17.0)).astype(float), g / g.sum())
    ca = 350.0 * ca[: fine_t.size] / ca.max()
    r = {"box": (fine_t < 4.5).astype(float), "exponential": np.exp(-fine_t / 4.5),
         "gamma": special.gammaincc(3.0, 3.0 * fine_t / 4.5)}[shape]
    h = np.exp(-fine_t / 0.2)
    eff = fftconvolve(h / h.sum(), r)[: fine_t.size]
    conv = fftconvolve(ca, eff)[: fine_t.size] * FINE
    curve = RHO / KH * 25.0 / 6000.0 * np.interp(fine_t - 1.0, fine_t, conv, left=0.0)
    sample = np.rint(TIMES / FINE).astype(int)
    tissue = curve[sample][:, None] + noise * rng.standard_normal((TIMES.size, n))
    return ca[sample], tissue


def test_box_fits_on_the_mtt_floor_are_flagged(rng):
    """Under a wide bolus a short box shifted later fits a box-like curve almost as well as
    the true one, so at low CNR (1.5 HU per frame, a 4.5 s box of CBF 25) a share of the fits
    end on the 1 s MTT bound with CBF several times the truth, while the median stays right;
    the ``mtt_floor`` QC flag says so. An exponential residue's tail pins the MTT: no fit on
    the bound (its CBF reads low instead, the box model's known mismatch)."""
    from ctperf.perfusion import fit_curves

    aif, box = _injection_curves("box", n=400, noise=1.5, rng=rng)
    fit = fit_curves(box, aif, TIMES, method="nlr-fast", baseline=0)
    flag = fit.provenance["qc"]["mtt_floor"]
    on_floor = fit.mtt <= 1.0 + 1e-6
    # 17-20 % over seeds 0-4 here; 5 % is well clear of the 2 % flag and of seed noise
    assert flag["flag"] and flag["value"] > 0.05
    assert flag["value"] == pytest.approx(on_floor.mean())
    # the median is not biased (+0 to +7 % over seeds 0-4: the noise's skew through CBV / MTT)
    assert np.median(fit.cbf) == pytest.approx(25.0, rel=0.1)
    assert np.median(fit.cbf[on_floor]) > 2.5 * 25.0              # the floor's CBF is (4.4x)
    _, exp_curves = _injection_curves("exponential", n=400, noise=1.5, rng=rng)
    exp_fit = fit_curves(exp_curves, aif, TIMES, method="nlr-fast", baseline=0)
    # 0-0.25 % over seeds 0-4 (one curve of 400 at most)
    assert exp_fit.provenance["qc"]["mtt_floor"]["value"] < 0.01
    assert not exp_fit.provenance["qc"]["mtt_floor"]["flag"]
    # SVD has no MTT bound: the flag is not judged
    assert fit_curves(box, aif, TIMES, method="bsvd",
                      baseline=0).provenance["qc"]["mtt_floor"]["value"] is None
