"""Perfusion estimates against references that ctperf did not generate.

Two kinds of reference:

- Hand-computed answers: a tissue curve proportional to the AIF, and box residues convolved with
  an analytic gamma-variate AIF through its closed-form running integral (the regularised
  incomplete gamma function), not through ctperf's forward model.
- The OSIPI DSC-MRI digital reference object (``tests/data/osipi_dsc``, Apache-2.0, see its
  README): 14 noisy tissue curves (gamma-variate transit times) with one AIF, true CBF 5-70
  mL/100 mL/min and CBV 2 or 4 mL/100 mL, and the task force's own tolerance,
  ``|estimate - truth| <= atol + rtol * truth`` (CBF: 15 mL/100 mL/min + 10 %; CBV: 1 mL/100 mL
  + 10 %). Its units carry no tissue density and no haematocrit correction, so it is analysed
  with ``rho=1, kh=1``; ``docs/validation.md`` has the tables. ``bayes`` fits each curve on
  its own (no voxel positions, so no spatial prior).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.special import gamma, gammainc

from ctperf.perfusion import compute_maps, fit_bayes, fit_box_nlr, svd_deconvolve
from ctperf.types import CTPSeries

DATA = Path(__file__).parent / "data" / "osipi_dsc" / "dsc_data.csv"
METHODS = ("nlr", "nlr-fast", "ssvd", "bsvd", "osvd")
SVD_METHODS = ("ssvd", "bsvd", "osvd")
NLR_METHODS = ("nlr", "nlr-fast")
CONSTANTS = [(1.04, 0.733), (1.0, 1.0), (1.05, 0.85)]


def _estimate(method: str, tissue: np.ndarray, aif: np.ndarray, times: np.ndarray, *,
              rho: float, kh: float):
    """The per-voxel result of one method: BoxFit or SVDResult (both have cbf, cbv, mtt)."""
    if method in NLR_METHODS:
        return fit_box_nlr(tissue, aif, times, method=method, rho=rho, kh=kh)
    return svd_deconvolve(tissue, aif, times, method=method, rho=rho, kh=kh)


# --- Hand-computed answers -------------------------------------------------------------------

T_HAND = np.arange(90) * 0.5  # s, CT-like sampling
GV_T0, GV_A, GV_B, GV_PEAK = 6.0, 3.0, 1.5, 400.0  # s, -, s, HU


def _gv_scale() -> float:
    """Amplitude putting the gamma variate's peak (at a * b after t0) at GV_PEAK."""
    return GV_PEAK / ((GV_A * GV_B) ** GV_A * np.exp(-GV_A))


def _gv(t: np.ndarray) -> np.ndarray:
    """Gamma-variate AIF K (t - t0)^a exp(-(t - t0)/b), HU."""
    x = np.clip(t - GV_T0, 0.0, None)
    return _gv_scale() * x**GV_A * np.exp(-x / GV_B)


def _gv_integral(t: np.ndarray) -> np.ndarray:
    """Its running integral in closed form: K b^(a+1) Gamma(a+1) P(a+1, (t - t0)/b), HU s."""
    x = np.clip(t - GV_T0, 0.0, None)
    return _gv_scale() * GV_B ** (GV_A + 1) * gamma(GV_A + 1) * gammainc(GV_A + 1, x / GV_B)


def _box_tissue(cbf: float, mtt: float, delay: float, rho: float, kh: float) -> np.ndarray:
    """(rho / kH) (CBF / 6000) (A(t - delay) - A(t - delay - MTT)) with the exact A, HU."""
    a = _gv_integral
    return (rho / kh) * (cbf / 6000.0) * (a(T_HAND - delay) - a(T_HAND - delay - mtt))


@pytest.mark.parametrize(("rho", "kh"), CONSTANTS)
@pytest.mark.parametrize("method", METHODS)
def test_tissue_proportional_to_aif_gives_cbv_by_hand(method, rho, kh):
    # C = 0.01 Ca: all the indicator passes at once, CBV = 100 * 0.01 * kH / rho mL/100 g
    # (0.705 with the defaults, 1.0 with rho = kH = 1).
    aif = _gv(T_HAND)
    expected = 100.0 * 0.01 * kh / rho
    est = _estimate(method, (0.01 * aif)[:, None], aif, T_HAND, rho=rho, kh=kh)
    # SVD methods take CBV from the areas: exact up to rounding. The box model's shortest
    # transit (MTT >= 1 s) spreads the curve over two frames and the piecewise-linear AIF
    # differs from the gamma variate between samples: 1 % covers that (measured 0.5 %).
    tol = 1e-9 if method in SVD_METHODS else 0.01
    assert est.cbv[0] == pytest.approx(expected, rel=tol)


@pytest.mark.parametrize(("rho", "kh"), CONSTANTS)
@pytest.mark.parametrize("method", NLR_METHODS)
@pytest.mark.parametrize(("cbf", "mtt", "delay"), [(50.0, 4.0, 0.0), (20.0, 8.0, 2.0),
                                                    (60.0, 3.0, 1.3)])
def test_box_model_recovers_hand_computed_box_residue(method, cbf, mtt, delay, rho, kh):
    tissue = _box_tissue(cbf, mtt, delay, rho, kh)
    fit = fit_box_nlr(tissue[:, None], _gv(T_HAND), T_HAND, method=method, rho=rho, kh=kh)
    # Noise-free, but ctperf sees the AIF only at 0.5 s samples (piecewise linear between them)
    # and band-limits both curves: 4 % on CBF and MTT, 0.2 s on the delay (measured at most
    # 2.5 %, 0.04 s). CBV = CBF x MTT / 60 is less sensitive (measured 0.03 %).
    assert fit.cbf[0] == pytest.approx(cbf, rel=0.04)
    assert fit.mtt[0] == pytest.approx(mtt, rel=0.04)
    assert fit.delay[0] == pytest.approx(delay, abs=0.2)
    assert fit.cbv[0] == pytest.approx(cbf * mtt / 60.0, rel=0.005)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_svd_on_hand_computed_box_residue(method):
    # Box residue, CBF 50 mL/100 g/min, MTT 4 s, no delay. CBV comes from areas (exact up to
    # the curves' tails inside the window); CBF is the peak of a truncated deconvolution, which
    # smooths the box's edges and rings beside them (Gibbs): measured 50.1 (sSVD), 51.5 (bSVD),
    # 56.1 (oSVD). 15 % is the width of that ringing, and narrower than the OSIPI tolerance.
    rho, kh = 1.04, 0.733
    tissue = _box_tissue(50.0, 4.0, 0.0, rho, kh)
    res = svd_deconvolve(tissue[:, None], _gv(T_HAND), T_HAND, method=method, rho=rho, kh=kh)
    assert res.cbv[0] == pytest.approx(50.0 * 4.0 / 60.0, rel=1e-3)
    assert res.cbf[0] == pytest.approx(50.0, rel=0.15)


@pytest.mark.parametrize("method", METHODS)
def test_cbf_scales_with_kh_over_rho(method):
    # The same curves analysed with other constants: CBF and CBV scale by kH / rho (the
    # curves fix rho / kH x CBF), MTT does not change.
    rho, kh = 1.04, 0.733
    tissue = _box_tissue(40.0, 5.0, 1.0, 1.0, 1.0)[:, None]
    aif = _gv(T_HAND)
    unit = _estimate(method, tissue, aif, T_HAND, rho=1.0, kh=1.0)
    scaled = _estimate(method, tissue, aif, T_HAND, rho=rho, kh=kh)
    # The simplex of "nlr" starts at CBF 60 whatever the constants, so its path (and where it
    # stops inside its tolerances) changes a little; the other methods are exactly linear.
    tol = 1e-3 if method == "nlr" else 1e-6
    assert scaled.cbf[0] == pytest.approx(unit.cbf[0] * kh / rho, rel=tol)
    assert scaled.cbv[0] == pytest.approx(unit.cbv[0] * kh / rho, rel=tol)
    assert scaled.mtt[0] == pytest.approx(unit.mtt[0], rel=tol)


# --- The OSIPI DSC-MRI digital reference object ------------------------------------------------


def _load_osipi() -> dict[str, np.ndarray]:
    """The reference file as arrays: tissue (T, 14), aif (T,), times (T,) s, cbf (14,)
    mL/100 mL/min, cbv (14,) mL/100 mL, labels (14,)."""
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))
    tissue = np.stack([np.array(r["C_tis"].split(), dtype=np.float64) for r in rows], axis=1)
    aifs = np.stack([np.array(r["C_aif"].split(), dtype=np.float64) for r in rows])
    tr = {float(r["tr"]) for r in rows}
    assert len(tr) == 1 and np.all(aifs == aifs[0]), "one AIF and one frame interval expected"
    return {"tissue": tissue, "aif": aifs[0], "times": np.arange(tissue.shape[0]) * tr.pop(),
            "cbf": np.array([float(r["cbf"]) for r in rows]),
            "cbv": np.array([float(r["cbv"]) for r in rows]),
            "labels": np.array([r["label"] for r in rows])}


@pytest.fixture(scope="module")
def osipi() -> dict[str, np.ndarray]:
    return _load_osipi()


@pytest.fixture(scope="module")
def osipi_results(osipi):
    """Every method on all 14 curves, in the reference's units (rho = kH = 1)."""
    return {m: _estimate(m, osipi["tissue"], osipi["aif"], osipi["times"], rho=1.0, kh=1.0)
            for m in METHODS}


def _within_osipi(estimate: np.ndarray, truth: np.ndarray, *, atol: float, rtol: float
                  ) -> np.ndarray:
    """The reference's acceptance rule, per curve."""
    return np.abs(estimate - truth) <= atol + rtol * np.abs(truth)


def test_osipi_file_is_the_published_reference(osipi):
    # Guards the copy: 14 pairs, 161 frames of 1.243 s, the truths of the file's labels.
    assert osipi["tissue"].shape == (161, 14)
    assert osipi["times"][1] == pytest.approx(1.243)
    assert osipi["cbf"].tolist() == [10, 20, 30, 40, 50, 60, 70, 5, 10, 15, 20, 25, 30, 35]
    assert osipi["cbv"].tolist() == [4] * 7 + [2] * 7
    for label, cbf, cbv in zip(osipi["labels"], osipi["cbf"], osipi["cbv"], strict=True):
        assert f"_CBV{cbv:g}_CBF{cbf:g}_" in label


@pytest.mark.parametrize("method", SVD_METHODS)
def test_osipi_svd_cbv_is_the_area_ratio(osipi, osipi_results, method):
    # With rho = kH = 1, CBV must be 100 x area(tissue) / area(AIF), the definition the
    # reference uses. The areas of this data exceed the stated CBV (by 3-19 %, growing with
    # CBF): that bias belongs to the data, not to the method.
    ratio = 100.0 * np.trapezoid(osipi["tissue"], osipi["times"], axis=0) / np.trapezoid(
        osipi["aif"], osipi["times"])
    np.testing.assert_allclose(osipi_results[method].cbv, ratio, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_osipi_cbv_within_reference_tolerance(osipi, osipi_results, method):
    cbv = osipi_results[method].cbv
    assert _within_osipi(cbv, osipi["cbv"], atol=1.0, rtol=0.1).all(), cbv.round(2)
    # Bias: the median relative error stays within 15 % (the reference's own 10 % plus the
    # data's 3-19 % area excess; measured +10.6 % for the SVD methods, about 0 % for the box
    # model, whose CBV is CBF x MTT / 60 of the fitted box).
    bias = float(np.median(cbv / osipi["cbv"] - 1.0))
    assert abs(bias) <= 0.15, bias


_BOX_MISMATCH = (
    "box residue vs the reference's gamma-variate residues (model mismatch): the fitted box is "
    "longer and lower than the residue's initial peak, so CBF comes out at about half the truth "
    "(measured median relative error -46 %; 35.4 at true 70). Reference tolerance met by 11 of "
    "14 curves (nlr-fast and nlr)"
)


def _xfail_box(method: str):
    marks = (pytest.mark.xfail(strict=True, reason=_BOX_MISMATCH),) if method in NLR_METHODS \
        else ()
    return pytest.param(method, marks=marks)


@pytest.mark.parametrize("method", [_xfail_box(m) for m in METHODS])
def test_osipi_cbf_within_reference_tolerance(osipi, osipi_results, method):
    # The task force's own acceptance rule for CBF, on all 14 curves. The SVD methods meet it
    # on all 14 (bSVD with the least margin: 48.9 at true 70, limit 48.0-92.0).
    cbf = osipi_results[method].cbf
    ok = _within_osipi(cbf, osipi["cbf"], atol=15.0, rtol=0.1)
    assert ok.all(), f"{int(ok.sum())}/14 within tolerance: {cbf.round(1).tolist()}"


@pytest.mark.parametrize("method", [_xfail_box(m) for m in METHODS])
def test_osipi_cbf_bias(osipi, osipi_results, method):
    # Truncated deconvolution underestimates the peak of a smooth residue (Wu 2003); the
    # median relative error must stay in [-20 %, +5 %]: measured -10.4 % (sSVD), -17.4 %
    # (bSVD), -15.2 % (oSVD). A CBF biased by more than a fifth moves rCBF core thresholds.
    rel = osipi_results[method].cbf / osipi["cbf"] - 1.0
    assert -0.20 <= float(np.median(rel)) <= 0.05, rel.round(3)


def test_osipi_nlr_reaches_the_best_box_fit(osipi_results):
    # Same model, same data: the simplex should find a fit at least as good as the grid start
    # + Newton (0.1 % covers both stopping rules).
    nm, fast = osipi_results["nlr"].residual, osipi_results["nlr-fast"].residual
    assert np.all(nm <= fast * 1.001), (nm / fast).round(3)


@pytest.mark.parametrize("method", METHODS)
def test_osipi_units_do_not_matter(osipi, osipi_results, method):
    # DSC curves are concentration-like, CT curves HU: the equations are linear in the curves'
    # common scale, so the same curves x 100 must give the same maps: to 1e-6 (rounding and
    # relative stopping rules), 1e-3 for the simplex, whose value tolerance is absolute and so
    # stops it at a slightly different point when the misfit is 1e4 times larger.
    k = 100.0
    est = _estimate(method, osipi["tissue"] * k, osipi["aif"] * k, osipi["times"], rho=1.0,
                    kh=1.0)
    tol = 1e-3 if method == "nlr" else 1e-6
    np.testing.assert_allclose(est.cbf, osipi_results[method].cbf, rtol=tol)
    np.testing.assert_allclose(est.cbv, osipi_results[method].cbv, rtol=tol)


def _delayed(tissue: np.ndarray, frames: int) -> np.ndarray:
    """The tissue curves arriving ``frames`` frames later (zeros in front: the file's baseline
    is zero), the last frames dropped (the curves have returned to baseline by then)."""
    return np.vstack([np.zeros((frames, tissue.shape[1])), tissue[:-frames]])


def _check_delay(osipi, ref, method: str, frames: int) -> None:
    shift = frames * float(osipi["times"][1])
    est = _estimate(method, _delayed(osipi["tissue"], frames), osipi["aif"], osipi["times"],
                    rho=1.0, kh=1.0)
    timing = (est.delay - ref.delay) if method in NLR_METHODS else (est.tmax - ref.tmax)
    # Tmax moves on the 1.243 s grid up to interpolation of the peak: 0.2 s per curve (measured
    # at most 0.16 s, oSVD choosing another truncation on one curve), 0.05 s in the median.
    assert np.all(np.abs(timing - shift) <= 0.2), timing.round(2)
    assert abs(float(np.median(timing)) - shift) <= 0.05
    # CBF: 1 % in the median (measured 0.1 %); every curve where it was without delay
    # with respect to the reference's rule.
    assert abs(float(np.median(est.cbf / ref.cbf)) - 1.0) <= 0.01
    np.testing.assert_array_equal(_within_osipi(est.cbf, osipi["cbf"], atol=15.0, rtol=0.1),
                                  _within_osipi(ref.cbf, osipi["cbf"], atol=15.0, rtol=0.1))


@pytest.mark.parametrize("frames", [1, 2, 4])
@pytest.mark.parametrize("method", ["nlr-fast", "bsvd", "osvd"])
def test_osipi_delay_moves_timing_not_flow(osipi, osipi_results, method, frames):
    # A known delay added to external data: 1, 2, 4 frames = 1.24, 2.49, 4.97 s. The box
    # model's delay and the circulant SVDs' Tmax must move by it; CBF and the pass count
    # must not change (Wu 2003: block-circulant deconvolution is insensitive to delay).
    _check_delay(osipi, osipi_results[method], method, frames)


def test_osipi_nlr_delay_moves_timing_not_flow(osipi, osipi_results):
    # As above for the simplex, over every shift of 1-4 frames at once: a local minimum that
    # happens to be the same with and without one delay must not hide those at other delays.
    for frames in (1, 2, 3, 4):
        _check_delay(osipi, osipi_results["nlr"], "nlr", frames)


def test_osipi_ssvd_is_delay_sensitive(osipi, osipi_results):
    # Standard (lower-triangular) SVD loses CBF when the tissue lags the AIF (Ostergaard 1996,
    # Wu 2003); an sSVD that did not would not be the published method. Measured median CBF
    # ratio 0.87 at 2.49 s of delay; [0.7, 0.95] brackets that with room for a different
    # threshold choice while excluding delay insensitivity.
    est = svd_deconvolve(_delayed(osipi["tissue"], 2), osipi["aif"], osipi["times"],
                         method="ssvd", rho=1.0, kh=1.0)
    ratio = float(np.median(est.cbf / osipi_results["ssvd"].cbf))
    assert 0.7 <= ratio <= 0.95, ratio


# --- bayes on the OSIPI curves: each curve on its own (no positions, no spatial prior) -----


def _bayes(tissue: np.ndarray, aif: np.ndarray, times: np.ndarray):
    return fit_bayes(tissue, aif, times, rho=1.0, kh=1.0, spatial=False)


@pytest.fixture(scope="module")
def osipi_bayes(osipi):
    return _bayes(osipi["tissue"], osipi["aif"], osipi["times"])


def test_osipi_bayes_within_reference_tolerance(osipi, osipi_bayes):
    assert _within_osipi(osipi_bayes.cbf, osipi["cbf"], atol=15.0, rtol=0.1).all(), \
        osipi_bayes.cbf.round(1)
    assert _within_osipi(osipi_bayes.cbv, osipi["cbv"], atol=1.0, rtol=0.1).all(), \
        osipi_bayes.cbv.round(2)


def test_osipi_bayes_cbf_bias_is_the_datas_own_area_excess(osipi, osipi_bayes):
    """bayes reads CBF +13 % high in the median, but its CBV is the curves' area ratio (the
    data's areas exceed the stated CBV by 3-19 %, above) and its MTT the reference's: against
    the CBF the areas imply (stated CBF x area ratio / stated CBV) the median bias is small."""
    area = 100.0 * np.trapezoid(osipi["tissue"], osipi["times"], axis=0) / np.trapezoid(
        osipi["aif"], osipi["times"])
    # CBV a fitted model's, not the area itself: measured median 0.1 %, at most 3.2 %
    np.testing.assert_allclose(osipi_bayes.cbv, area, rtol=0.05)
    implied = osipi["cbf"] * area / osipi["cbv"]
    rel = osipi_bayes.cbf / implied - 1.0
    # measured median +2.6 % (at most +13 % on one curve); stated truth: median +13.3 %
    assert abs(float(np.median(rel))) <= 0.05, rel.round(3)
    assert abs(float(np.median(osipi_bayes.cbf / osipi["cbf"] - 1.0))) <= 0.20


def test_osipi_bayes_units_do_not_matter(osipi, osipi_bayes):
    # the noise estimate, its floor and the amplitudes all scale with the curves: measured
    # within 1e-5 (single precision)
    est = _bayes(osipi["tissue"] * 100.0, osipi["aif"] * 100.0, osipi["times"])
    np.testing.assert_allclose(est.cbf, osipi_bayes.cbf, rtol=1e-4)
    np.testing.assert_allclose(est.cbv, osipi_bayes.cbv, rtol=1e-4)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_osipi_bayes_delay_moves_timing_not_flow(osipi, osipi_bayes, frames):
    shift = frames * float(osipi["times"][1])
    est = _bayes(_delayed(osipi["tissue"], frames), osipi["aif"], osipi["times"])
    # the grid's delay step is 0.125 s: measured within 0.11 s per curve, 0.03 s for Tmax in
    # the median; CBF within 0.7 % per curve
    assert np.all(np.abs(est.delay - osipi_bayes.delay - shift) <= 0.2)
    assert abs(float(np.median(est.tmax - osipi_bayes.tmax)) - shift) <= 0.1
    np.testing.assert_allclose(est.cbf, osipi_bayes.cbf, rtol=0.02)


@pytest.mark.parametrize("method", ["nlr-fast", "ssvd", "bsvd", "osvd"])
def test_osipi_through_compute_maps(osipi, osipi_results, method):
    # The whole map pipeline on a two-row slice made of the reference curves (x 100 on a
    # 30 HU baseline, so HU-like; AIF given, brain mask given). It re-estimates each voxel's
    # baseline from the pre-bolus frames, which on this 200 s window moves CBV by up to a
    # quarter (the file's baseline noise integrated over the window); nothing else may change:
    # the same curves pass the reference's rules as with the direct calls, and the constants
    # used are recorded.
    k, n_t = 100.0, osipi["tissue"].shape[0]
    hu = np.empty((n_t, 1, 2, 14), dtype=np.float32)
    hu[:, 0, :, :] = (30.0 + k * osipi["tissue"])[:, None, :]
    series = CTPSeries(hu=hu, times=osipi["times"], affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    maps = compute_maps(series, method=method, aif=k * osipi["aif"],
                        brain_mask=np.ones((1, 2, 14), dtype=bool), rho=1.0, kh=1.0)
    assert maps.provenance["constants"] == {"rho_g_per_ml": 1.0, "kh": 1.0}
    cbf = maps.maps["cbf"][0].astype(np.float64)  # (2, 14), both rows the same curves
    cbv = maps.maps["cbv"][0].astype(np.float64)
    for row in range(2):
        assert _within_osipi(cbv[row], osipi["cbv"], atol=1.0, rtol=0.1).all(), cbv[row]
        np.testing.assert_array_equal(
            _within_osipi(cbf[row], osipi["cbf"], atol=15.0, rtol=0.1),
            _within_osipi(osipi_results[method].cbf, osipi["cbf"], atol=15.0, rtol=0.1))
    # CBF depends less on the baseline (the residue's peak, or the box's height): 8 % per
    # curve (measured at most 2.5 % for SVD, 5.5 % for the box fit on the low-flow curves).
    np.testing.assert_allclose(cbf[0], osipi_results[method].cbf, rtol=0.08)
