"""The pieces of ctperf.perfusion on their own, each against a naive reference or a known answer."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
from scipy import integrate
from scipy.optimize import minimize

from ctperf.errors import ValidationError
from ctperf.perfusion import (
    THRESHOLDS_ONLY,
    ArterialTable,
    PerfusionResult,
    bandlimit,
    box_model,
    correct_partial_volume,
    fit_box_nlr,
    flow_scale,
    qc_flags,
    segment_lesions,
    select_aif,
    select_vof,
    svd_deconvolve,
    tissue_peak_time,
)
from ctperf.perfusion.boxnlr import DEFAULT_BOUNDS, DEFAULT_STEPS
from ctperf.perfusion.fastsse import FastBoxSSE
from ctperf.perfusion.inputs import arterial_input, vessel_info
from ctperf.types import PerfusionMaps

RHO, KH = 1.04, 0.733
TIMES = np.arange(89) * 0.5
SCALE = flow_scale(RHO, KH)


def _aif(t: np.ndarray, t0: float = 6.0) -> np.ndarray:
    x = np.clip(t - t0, 0, None)
    y = x**3 * np.exp(-x / 1.5)
    return 400.0 * y / y.max()


def _tissue(rng, n, noise):
    """Curves simulated on a 0.02 s grid (not the fit's own discretisation)."""
    fine = np.arange(0, TIMES[-1] + 0.01, 0.02)
    table = ArterialTable(_aif(fine), fine)
    p = np.c_[rng.uniform(15, 70, n), rng.uniform(3, 10, n), rng.uniform(0, 5, n)]
    c = box_model(p, table, scale=SCALE)[np.rint(TIMES / 0.02).astype(int)]
    return c + noise * rng.standard_normal(c.shape), p


def test_arterial_table_integral_matches_quadrature():
    t = np.r_[0.0, 0.7, 1.5, 2.0, 3.1, 4.0]  # non-uniform on purpose
    ca = np.array([0.0, 5.0, 20.0, 12.0, 3.0, 1.0])
    table = ArterialTable(ca, t)
    for x in (-1.0, 0.3, 1.9, 3.5, 4.0, 6.0):
        ref = integrate.quad(lambda s: 0.0 if s < 0 else np.interp(s, t, ca), -2, x,
                             points=t[(t > -2) & (t < x)] if x > 0 else None, limit=200)[0]
        assert table.integral(np.array([x]))[0] == pytest.approx(ref, abs=1e-9)


def test_fast_sse_equals_direct_sse(rng):
    tissue, _ = _tissue(rng, 50, 8.0)
    table = ArterialTable(bandlimit(_aif(TIMES)), TIMES)
    b = np.array(DEFAULT_BOUNDS)
    fast = FastBoxSSE(table, SCALE, b).with_tissue(tissue)
    rows = rng.integers(0, 50, 500)
    p = np.c_[rng.uniform(*b[0], 500), rng.uniform(*b[1], 500), rng.uniform(*b[2], 500)]
    direct = ((box_model(p, table, scale=SCALE) - tissue[:, rows]) ** 2).sum(axis=0)
    # Same algebra, different order of sums: agreement to float64 rounding of |C|^2 (~1e4).
    np.testing.assert_allclose(fast(p, rows), direct, rtol=1e-9, atol=1e-6)


def test_vectorised_simplex_agrees_with_scipy_per_voxel(rng):
    tissue, _ = _tissue(rng, 12, 8.0)
    fit = fit_box_nlr(tissue, _aif(TIMES), TIMES, method="nlr")
    table = ArterialTable(bandlimit(_aif(TIMES)), TIMES)
    smooth = bandlimit(tissue)
    for i in range(tissue.shape[1]):
        def sse(q, c=smooth[:, i]):
            return float(((box_model(q[None], table, scale=SCALE)[:, 0] - c) ** 2).sum())

        def sse_v(v):  # the simplex's coordinates: (CBV, MTT, delay)
            return sse(np.array([np.clip(60.0 * v[0] / v[1], 0.0, 300.0), v[1], v[2]]))

        start = np.array([60.0 * 5.0 / 60.0, 5.0, 3.5])
        simplex = np.vstack([start, start + np.diag(DEFAULT_STEPS)])  # the same first simplex
        ref = minimize(sse_v, start, method="Nelder-Mead",
                       options={"maxiter": 300, "xatol": 1e-4, "fatol": 1e-4,
                                "initial_simplex": simplex})
        ref.x = np.array([60.0 * ref.x[0] / ref.x[1], ref.x[1], ref.x[2]])
        ours = np.array([fit.cbf[i], fit.mtt[i], fit.delay[i]])
        if np.any(ref.x[1:] < np.array(DEFAULT_BOUNDS)[1:, 0]):
            continue  # scipy wandered outside the physical bounds; nothing to compare
        # Same algorithm, same start: the minimum found agrees to the stopping tolerances
        # (0.1 % of the SSE; parameters within 1 %).
        assert sse(ours) <= ref.fun * 1.001 + 1e-6
        np.testing.assert_allclose(ours, ref.x, rtol=0.01, atol=0.02)


def test_nlr_fast_at_least_as_good_as_nlr(rng):
    tissue, _ = _tissue(rng, 3000, 10.0)
    table = ArterialTable(bandlimit(_aif(TIMES)), TIMES)
    smooth = bandlimit(tissue)
    sse = {}
    for mode in ("nlr", "nlr-fast"):
        f = fit_box_nlr(tissue, _aif(TIMES), TIMES, method=mode)
        p = np.c_[f.cbf, f.mtt, f.delay]
        sse[mode] = ((box_model(p, table, scale=SCALE) - smooth) ** 2).sum(axis=0)
    # The grid start finds the global basin, the simplex from a fixed start sometimes does not:
    # the fast fit's misfit is lower or equal (within 0.1 %) on at least 97 % of voxels.
    assert np.mean(sse["nlr-fast"] <= sse["nlr"] * 1.001) >= 0.97
    assert np.mean(sse["nlr-fast"]) <= np.mean(sse["nlr"])


@pytest.mark.parametrize("mode", ["nlr", "nlr-fast"])
def test_fit_with_non_uniform_frames(mode, rng):
    times = np.cumsum(np.r_[0.0, np.where(np.arange(59) < 40, 0.5, 1.5)])
    fine = np.arange(0, times[-1] + 0.01, 0.01)
    p = np.array([[50.0, 5.0, 1.0], [25.0, 8.0, 3.0]])
    c = box_model(p, ArterialTable(_aif(fine), fine), scale=SCALE)
    c = np.array([np.interp(times, fine, col) for col in c.T]).T
    f = fit_box_nlr(c, _aif(times), times, method=mode, band_limit=False)
    # Noise-free; 1.5 s frames in the tail sample the AIF coarsely there: 5 %.
    np.testing.assert_allclose(f.cbf, p[:, 0], rtol=0.05)
    np.testing.assert_allclose(f.mtt, p[:, 1], rtol=0.05)


def test_fit_rejects_bad_input():
    with pytest.raises(ValidationError, match="method"):
        fit_box_nlr(np.zeros((89, 2)), _aif(TIMES), TIMES, method="lm")
    with pytest.raises(ValidationError, match="positive area"):
        fit_box_nlr(np.zeros((89, 2)), np.zeros(89), TIMES)
    with pytest.raises(ValidationError, match="T = 89"):
        fit_box_nlr(np.zeros((50, 2)), _aif(TIMES), TIMES)


def test_svd_methods_agree_at_zero_delay_and_ssvd_needs_causal_data(rng):
    fine = np.arange(0, TIMES[-1] + 0.01, 0.02)
    table = ArterialTable(_aif(fine), fine)
    p = np.array([[50.0, 4.0, 0.0], [50.0, 4.0, -1.5]])
    c = box_model(p, table, scale=SCALE)[np.rint(TIMES / 0.02).astype(int)]
    res = {m: svd_deconvolve(c, _aif(TIMES), TIMES, method=m) for m in ("ssvd", "bsvd", "osvd")}
    for m, r in res.items():
        # Noise-free, zero delay: truncated deconvolution underestimates a box residue's
        # sharp edge by a few %, 15 % at most at a 20 % threshold.
        assert r.cbf[0] == pytest.approx(50.0, rel=0.15), m
        assert r.cbv[0] == pytest.approx(50.0 * 4.0 / 60.0, rel=0.02), m  # areas, 2 % sampling
    # Tissue leading the AIF (negative delay): the circulant methods still see the full peak.
    assert res["bsvd"].cbf[1] == pytest.approx(res["bsvd"].cbf[0], rel=0.02)
    # Tmax (peak of the smoothed box, near its centre) moves with the delay, to one frame.
    assert res["bsvd"].tmax[0] - res["bsvd"].tmax[1] == pytest.approx(1.5, abs=0.5)


def test_aif_vof_selection_and_partial_volume():
    t = TIMES
    art, vein = _aif(t, 5.0), np.convolve(_aif(t, 5.0), np.full(14, 1 / 14))[: t.size]
    fine = np.arange(0, t[-1] + 0.01, 0.02)
    tis = box_model(np.array([[60.0, 4.0, 1.0]]), ArterialTable(_aif(fine, 5.0), fine),
                    scale=SCALE)[np.rint(t / 0.02).astype(int)]
    enh = np.concatenate([np.repeat(tis, 200, axis=1), 0.5 * art[:, None].repeat(30, axis=1),
                          vein[:, None].repeat(10, axis=1)], axis=1)
    a = select_aif(enh, t, n_voxels=100)
    assert set(a.indices) <= set(range(200, 230))
    v = select_vof(enh, t, aif_ttp=a.ttp)
    assert set(v.indices) <= set(range(230, 240))
    # Excluded voxels (e.g. next to bone) are never chosen, even with the largest area.
    leaky = np.concatenate([enh, (vein + 60.0 * (t > 20))[:, None]], axis=1)
    assert select_vof(leaky, t, aif_ttp=a.ttp).indices.tolist() == [240]
    keep_out = np.zeros(leaky.shape[1], dtype=bool)
    keep_out[240] = True
    assert set(select_vof(leaky, t, aif_ttp=a.ttp, exclude=keep_out).indices) <= set(
        range(230, 240))
    scaled, factor = correct_partial_volume(a.curve, v.curve, t)
    np.testing.assert_allclose(scaled, factor * a.curve)
    # The true AIF is twice the measured one; the vein's tail is cut at the last frame.
    assert factor == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValidationError, match="arterial candidates"):
        select_aif(np.repeat(tis, 10, axis=1), t)
    # a scan cut before the vein washes out: the refusal says so, not that no vein peaked
    cut = 32  # the vein peaks at frame 27 and is still at 85 % of it at frame 31
    with pytest.raises(ValidationError, match=r"10 voxels that peak so had not come back "
                                              r"under 50% of their peak by the last frame"):
        select_vof(enh[:cut], t[:cut], aif_ttp=a.ttp)



def test_aif_is_the_artery_when_a_larger_sinus_ranks_alike():
    """A sinus a few seconds after the artery, as high and with more voxels, peaks before the
    tissue (so the tissue's timing does not tell it from an artery). Candidates whose times
    fall on the same frame must rank alike (not by their order in the volume), and a group
    of the chosen filling clearly earlier than the best-ranked ones is the artery: a vein
    cannot fill before the artery that feeds it."""
    t = np.arange(60) * 1.0
    art = _aif(t, 8.3)
    same_vein = _aif(t, 11.3) * 1.02           # the same bolus three frames later, higher
    enh = np.concatenate([same_vein[:, None].repeat(50, axis=1),
                          art[:, None].repeat(18, axis=1)], axis=1)
    assert set(select_aif(enh, t).indices) == set(range(50, 68))
    # An artery of 8 voxels against 128 of a higher and broader sinus 3 s later: the sinus
    # holds the best quarter's timing, the earlier group is taken instead.
    x = np.clip(t - 11.3, 0, None) / 1.3
    wide_vein = 1.15 * 400.0 * x**3 * np.exp(-x / 1.5) / (27 * 1.5**3 * np.exp(-3))
    assert wide_vein.max() > 1.1 * art.max()
    enh = np.concatenate([wide_vein[:, None].repeat(128, axis=1),
                          art[:, None].repeat(8, axis=1)], axis=1)
    assert set(select_aif(enh, t).indices) == set(range(128, 136))


def test_aif_never_taken_from_a_vein_that_outshines_diluted_arteries():
    """A small study's arteries are partial-volume diluted: one voxel passes the peak threshold,
    a sinus peaks three times higher and later than the tissue. Ranked on its own, the sinus
    outvotes the lone artery; arteries feed the tissue, so only voxels peaking by the
    tissue's bolus are candidates."""
    t = TIMES
    art = _aif(t, 5.0)
    vein = np.convolve(art, np.full(20, 1 / 20))[: t.size]      # centred 5 s later
    fine = np.arange(0, t[-1] + 0.01, 0.02)
    tis = box_model(np.array([[50.0, 4.0, 1.0]]), ArterialTable(_aif(fine, 5.0), fine),
                    scale=SCALE)[np.rint(t / 0.02).astype(int)]
    enh = np.concatenate([np.repeat(tis, 300, axis=1),
                          np.stack([0.25 * art, 0.18 * art, 0.15 * art], axis=1),
                          vein[:, None].repeat(12, axis=1)], axis=1)
    peaks = {"artery": 0.25 * art.max(), "vein": vein.max()}
    assert 80 < peaks["artery"] < peaks["vein"] / 2                # the setting described
    tissue_peak = tissue_peak_time(enh, t)
    assert t[np.argmax(art)] < tissue_peak < t[np.argmax(vein)]
    # A loose search region, mostly voxels that do not enhance (CSF, air), all noisy: the
    # tissue's peak still falls between the artery's and the vein's (the tissue's flat top
    # lets noise move it by a second).
    rng = np.random.default_rng(4)
    loose = np.concatenate([enh + rng.normal(0, 5, enh.shape),
                            rng.normal(0, 5, (t.size, 1200))], axis=1)
    assert tissue_peak_time(loose, t) == pytest.approx(tissue_peak, abs=1.0)
    assert t[np.argmax(art)] < tissue_peak_time(loose, t) < t[np.argmax(vein)]
    assert set(select_aif(enh, t).indices) <= set(range(303, 315))  # unconstrained: the sinus
    a = select_aif(enh, t, latest_s=tissue_peak)
    assert a.indices.tolist() == [300]
    # Frames far apart can hold the artery's and the tissue's peak in one frame: kept.
    assert select_aif(enh, t, latest_s=float(t[np.argmax(art)])).indices.tolist() == [300]
    # With no artery bright enough left, the choice is refused rather than made on the vein.
    with pytest.raises(ValidationError, match="peaking by the tissue's peak"):
        select_aif(np.delete(enh, 300, axis=1), t, latest_s=tissue_peak)
    # The maps' arterial input makes the first choice, sees it is a vein, chooses again, and
    # says so in the provenance; a first choice that is an artery is kept as it is.
    none = np.zeros(enh.shape[1], dtype=bool)
    curve, origin = arterial_input(None, None, enh, enh, t, n_base=8, exclude=none)
    assert origin.selection.indices.tolist() == [300] and "a vein" in origin.note
    coords = np.arange(enh.shape[1])[None].repeat(3, axis=0)          # (3, N) voxel indices
    assert vessel_info(origin, coords, curve)["note"] == origin.note  # summary.json's aif.note
    np.testing.assert_allclose(curve, enh[:, 300])
    large = np.concatenate([enh, 0.9 * art[:, None].repeat(10, axis=1)], axis=1)  # an ICA
    _, origin = arterial_input(None, None, large, large, t, n_base=8,
                               exclude=np.zeros(large.shape[1], dtype=bool))
    assert set(origin.selection.indices) <= set(range(315, 325)) and origin.note is None

def test_lesions_from_true_maps_equal_truth():
    shape = (2, 20, 30)
    cbf = np.full(shape, 60.0)
    cbf[:, :, 15:] = 25.0  # two tissue classes
    healthy = cbf.copy()
    tmax = np.full(shape, 1.0)
    tmax[:, 5:15, 2:12] = 8.0
    tmax[:, 7:10, 4:8] = 12.0
    cbf[:, 5:15, 2:12] *= 0.5
    cbf[:, 7:10, 4:8] = 0.2 * healthy[:, 7:10, 4:8]
    maps = PerfusionMaps(maps={"cbf": cbf, "tmax": tmax, "cbv": cbf * 4 / 60},
                         affine=np.diag([0.5, 0.5, 5.0, 1.0]))
    res = segment_lesions(maps, reference=healthy)
    core = np.zeros(shape, bool)
    core[:, 7:10, 4:8] = True
    hypo = tmax > 6.0
    assert np.array_equal(res.core, core)
    assert np.array_equal(res.hypoperfused, hypo)
    assert np.array_equal(res.penumbra, hypo & ~core)
    voxel_ml = 0.5 * 0.5 * 5.0 / 1000
    assert res.volumes_ml["core"] == pytest.approx(core.sum() * voxel_ml)
    assert res.mismatch_ratio == pytest.approx(hypo.sum() / core.sum())
    # hypoperfusion intensity ratio: Tmax > 10 s over Tmax > 6 s, 12 of 100 voxels a slice
    assert res.hypoperfusion_intensity_ratio == pytest.approx(12 / 100)
    assert res.summary()["hypoperfusion_intensity_ratio"] == pytest.approx(0.12)
    # defined on Tmax > 10 s over Tmax > 6 s: with another hypoperfusion threshold it is not it
    other = segment_lesions(maps, reference=healthy,
                            options=dataclasses.replace(THRESHOLDS_ONLY, tmax_hypo=9.0))
    assert other.mismatch_ratio is not None and other.hypoperfusion_intensity_ratio is None
    # Contralateral reference on a left-right symmetric brain gives the same core here.
    mirror_cbf = np.concatenate([cbf, np.full((2, 20, 30), 60.0)[:, :, ::-1]], axis=2)
    # (only checks it runs and finds the core in the affected side)
    sym = PerfusionMaps(maps={"cbf": mirror_cbf, "tmax": np.concatenate(
        [tmax, np.ones(shape)], axis=2)}, affine=maps.affine)
    assert segment_lesions(sym).core[:, 7:10, 4:8].all()
    by_cbv = segment_lesions(maps, options=replace(THRESHOLDS_ONLY, core_cbv=2.0,
                                                   core_within_hypoperfused=False))
    assert np.array_equal(by_cbv.core, maps["cbv"] < 2.0)
    # By default the core stays inside the hypoperfused region.
    by_cbv = segment_lesions(maps, options=replace(THRESHOLDS_ONLY, core_cbv=2.0))
    assert np.array_equal(by_cbv.core, (maps["cbv"] < 2.0) & hypo)


def test_qc_flags_raise_on_truncation_and_motion():
    t = TIMES
    good = qc_flags(times=t, aif=_aif(t), vof=_aif(t, 9.0), pv_factor=1.5,
                    displacement_mm=np.zeros(89), uncorrected_mm=np.zeros(89),
                    brain_voxels=10_000, voxel_ml=0.01)
    assert not any(v["flag"] for v in good.values())
    left = np.zeros(89)
    left[40:] = 21.0                          # moved 21 mm, beyond what registration applies
    late = qc_flags(times=t, aif=_aif(t, 38.0), displacement_mm=np.full(89, 3.0),
                    uncorrected_mm=left, brain_voxels=10, voxel_ml=0.01, pv_factor=9.0)
    for name in ("truncation", "aif_late_peak", "motion", "motion_uncorrected",
                 "few_brain_voxels", "aif_vof_ratio"):
        assert late[name]["flag"], name
    assert late["motion_uncorrected"]["value"] == 21.0
    assert qc_flags(times=t, aif=0.1 * _aif(t))["aif_low_peak"]["flag"]


def test_a_slice_grazing_the_skulls_vault_is_not_a_lost_slice():
    """A whole-brain study (16 cm): near the vertex a slice cuts the skull almost tangentially,
    mostly bone around a little brain that is all there; with the bone counted as what the skull
    encloses, it read 0.27 of the typical share and raised brain_slice_gap on intact heads."""
    from ctperf.perfusion.maps import _brain_slice_share

    inside = np.zeros((4, 20, 20), dtype=bool)
    inside[:, 2:18, 2:18] = True
    bone = np.zeros_like(inside)
    bone[:, 2:18, 2:18] = True
    bone[:, 4:16, 4:16] = False                        # a 2-pixel skull around the brain
    bone[3, 2:18, 2:18] = True
    bone[3, 8:12, 8:12] = False                        # the vault: bone around 16 px of brain
    brain = inside & ~bone
    assert _brain_slice_share(brain, inside)[3] < 0.25  # as it was read
    share = _brain_slice_share(brain, inside, bone=bone)
    np.testing.assert_allclose(share, 1.0)


def test_a_slice_that_lost_its_brain_is_flagged():
    """Metal streaks through slice 1 cut its brain mask to a fifth of the skull's interior,
    the other slices keep all of it: flagged; a head whose slices all keep it is not."""
    from ctperf.perfusion.maps import _brain_slice_share

    inside = np.zeros((4, 20, 20), dtype=bool)
    inside[:, 2:18, 2:18] = True
    brain = inside.copy()
    share = _brain_slice_share(brain, inside)
    assert np.allclose(share, 1.0)
    assert not qc_flags(times=TIMES, aif=_aif(TIMES), brain_slice_share=share)[
        "brain_slice_gap"]["flag"]
    brain[1, :, 5:] = False                               # a streak took most of slice 1
    share = _brain_slice_share(brain, inside)
    flag = qc_flags(times=TIMES, aif=_aif(TIMES), brain_slice_share=share)["brain_slice_gap"]
    assert flag["flag"] and flag["value"] == pytest.approx(3 * 16 / 256)
    inside[3, :, :] = False                               # a slice past the head is not judged
    inside[3, 9:11, 9:11] = True
    assert len(_brain_slice_share(brain & inside, inside)) == 3


def test_noisy_studies_fitted_voxel_by_voxel_are_flagged():
    """8 HU of pre-bolus noise (an unfiltered 150 mAs study) with a method fitting each voxel
    alone: flagged; the same with bayes, or a filtered study's 0.5 HU, not."""
    def flag(sd: float, voxelwise: bool) -> bool:
        return qc_flags(times=TIMES, aif=_aif(TIMES), baseline_sd=sd,
                        voxelwise=voxelwise)["noisy_voxelwise"]["flag"]

    assert flag(8.0, True)
    assert not flag(8.0, False) and not flag(0.5, True)


def test_the_noise_flag_weighs_the_bolus():
    """A probe's AIF of 170 HU at 2 HU per 1 s frame (the voxels' contrast-to-noise of 4.7 HU
    under a 400 HU bolus): bSVD's hypoperfused volume +50 % and its core -95 % with no flag,
    where the same contrast-to-noise at 400 HU raised it. The noise counts against the bolus
    (partial-volume corrected by a VOF: the bolus's height), and a strong bolus does not
    excuse it. An AIF that no VOF corrected may be diluted by partial volume at any dose (a
    second probe's artery read at 267 and 107 HU of 506, the maps unchanged): not weighed."""
    def value(peak: float, sd: float, pv: float = 1.0, corrected: bool | None = True) -> float:
        return qc_flags(times=TIMES, aif=_aif(TIMES) * peak / 400.0, baseline_sd=sd,
                        voxelwise=True, pv_factor=pv, pv_corrected=corrected
                        )["noisy_voxelwise"]["value"]

    assert value(400.0, 2.0) == pytest.approx(2.0)  # a typical bolus: the noise as measured
    assert value(170.0, 2.0) == pytest.approx(2.0 * 400.0 / 170.0)  # 4.7: flagged
    assert value(800.0, 5.0) == pytest.approx(5.0)  # still flagged
    # an artery read at 170 HU and corrected 2.5 times by the VOF holds a 425 HU bolus
    assert value(170.0, 2.0, pv=2.5) == pytest.approx(2.0)
    assert value(170.0, 2.0, corrected=False) == pytest.approx(2.0)  # no VOF: its height unknown
    assert value(170.0, 2.0, corrected=None) == pytest.approx(2.0)


@pytest.mark.parametrize("n_base", [3, 6, 12])
def test_pre_bolus_noise_is_read_without_bias(n_base):
    """The noise the flag above reads: 4.6 HU of Gaussian noise reads 4.6 HU whatever the
    number of baseline frames (the median SD with n had read 3.1, 3.9 and 4.3 HU, under the
    flag's 4 HU)."""
    from ctperf.perfusion.inputs import pre_bolus_noise_sd

    curves = np.random.default_rng(n_base).normal(30.0, 4.6, (40, 4000))
    curves[n_base:] += 50.0  # the bolus after the baseline does not count
    # 4000 voxels: the median variance's sampling error is about 2-3 % of the SD at 3 frames
    assert pre_bolus_noise_sd(curves, n_base) == pytest.approx(4.6, rel=0.04)
    # under three baseline frames: from the second differences over every frame (it had been
    # None: a 10 HU study of 3 s frames went unflagged); the bolus's 50 HU step (11 SDs)
    # lands in 2 of the 38 differences and moves their median up: 4.9 read, 8 % allowed
    assert pre_bolus_noise_sd(curves, 2) == pytest.approx(4.6, rel=0.08)
    assert pre_bolus_noise_sd(curves[:2], 1) is None  # two frames: nothing to read


def test_frames_seconds_apart_keep_their_baseline():
    """An AIF sampled every 3 s, rising at its fourth frame (0, 0, 1, 78, 291 HU...): the
    smoothed arrival less two frames had kept one baseline frame of three; one frame less
    where two frames span more than 3 s. At 1 s frames nothing changes."""
    from ctperf.perfusion.onset import pre_bolus_frames

    def bolus(t):
        s = np.clip(t - 8.5, 0.0, None) / 1.6
        return 500.0 * (s / 3.0) ** 3 * np.exp(3.0 - s)

    def frames(step, timed):
        t = np.arange(0.0, 60.0, step)
        hu = (40.0 + bolus(t))[:, None, None, None] * np.ones((1, 1, 2, 2))
        rise = np.full((1, 2, 2), bolus(t).max())
        return pre_bolus_frames(hu, rise, times=t if timed else None)

    assert (frames(3.0, True), frames(3.0, False)) == (2, 1)
    assert frames(1.0, True) == frames(1.0, False) == 8


def test_qc_flags_box_fits_on_the_mtt_floor():
    """The share of box-model MTTs on the fit's lower bound (1 s), flagged above 2 %."""
    t = TIMES
    mtt = np.full(1000, 4.0)
    mtt[:30] = 1.0                       # 3 % on the bound
    mtt[30:40] = 1.05                    # near it, not on it
    mtt[40] = np.nan                     # not fitted: not counted
    flag = qc_flags(times=t, aif=_aif(t), box_mtt=mtt)["mtt_floor"]
    assert flag["flag"] and flag["value"] == pytest.approx(30 / 999)
    mtt[10:30] = 3.0
    assert not qc_flags(times=t, aif=_aif(t), box_mtt=mtt)["mtt_floor"]["flag"]
    unjudged = qc_flags(times=t, aif=_aif(t))["mtt_floor"]
    assert not unjudged["flag"] and unjudged["value"] is None


def test_qc_flags_an_aif_that_arrives_after_the_brain():
    """The mean brain curve normally rises after the AIF (it is the AIF delayed and spread); an
    AIF taken from a late artery rises after it, which the flag reports in seconds."""
    t = TIMES
    brain = 0.02 * _aif(t, 7.5) + 0.02 * _aif(t, 9.0)       # arrives 1.5-3 s after an AIF at 6 s
    on_time = qc_flags(times=t, aif=_aif(t), tissue_mean=brain)["aif_after_tissue"]
    assert not on_time["flag"] and on_time["value"] < 0
    late = qc_flags(times=t, aif=_aif(t, 12.0), tissue_mean=brain)["aif_after_tissue"]
    # the AIF arrives 6 s after the first of the brain's two boluses; 20 % of the sum's peak is
    # crossed between the two (frames of 0.5 s)
    assert late["flag"] and 3.0 <= late["value"] <= 6.0


@pytest.mark.parametrize(("seed", "options"), [(5, {}), (6, {}), (40, {}),
                                               (40, {"residues": ("box",), "mas": 75})])
def test_baseline_ends_where_the_bolus_arrives_in_noisy_studies(seed, options):
    """Low-resolution phantoms whose arteries are diluted by partial volume (rise about 250 HU)
    and whose noise alone reaches a quarter of that rise: the baseline must still end where
    the AIF starts to rise (here 7.5-13 s in), not at the first frames (2, 1, 6 and 1 frames
    before the curves were smoothed over time; the last, at half the dose, 6 frames when a
    weak vessel's crossing did not have to clear its noise)."""
    from ctperf.perfusion import run_perfusion
    from ctperf.phantom import generate_subject

    sub = generate_subject(seed=seed, size=64, slices=2, lesion=True, **options)
    aif = np.asarray(sub.aif)
    arrival = int(np.argmax(aif > 0.05 * aif.max()))   # first frame at 5 % of the AIF's peak
    n_base = run_perfusion(sub.series, method="ssvd").maps.provenance["baseline_frames"]
    # the rule ends it two frames before an early percentile of the vessels' 20 % crossings:
    # within a frame after the 5 % frame, and at most three before it
    assert arrival - 3 <= n_base <= arrival + 1, (n_base, arrival)


def test_public_types_exported():
    assert PerfusionResult.__name__ == "PerfusionResult"


def test_newton_derivatives_match_finite_differences(rng):
    from ctperf.perfusion.newton import _phi

    tissue, _ = _tissue(rng, 20, 8.0)
    table = ArterialTable(bandlimit(_aif(TIMES)), TIMES)
    obj = FastBoxSSE(table, SCALE, np.array(DEFAULT_BOUNDS)).with_tissue(bandlimit(tissue))
    rows = np.arange(20)
    a = rng.uniform(0, 5, 20) + 0.123  # away from the frame knots, where G is only C1
    b = a + rng.uniform(2, 10, 20)
    for cap in (300.0, 5.0):  # free CBF, and CBF held at its bound
        phi, grad, hess, _, _ = _phi(obj, a, b, rows, cap)
        eps = 1e-5
        pa, pb = _phi(obj, a + eps, b, rows, cap), _phi(obj, a, b + eps, rows, cap)
        # Forward differences: error ~ eps x third derivative, far below 1e-3 relative.
        for num, ana in (((pa[0] - phi) / eps, grad[0]), ((pb[0] - phi) / eps, grad[1]),
                         ((pa[1][0] - grad[0]) / eps, hess[0]),
                         ((pb[1][0] - grad[0]) / eps, hess[1]),
                         ((pb[1][1] - grad[1]) / eps, hess[2])):
            np.testing.assert_allclose(num, ana, rtol=1e-3, atol=1e-3 * np.abs(ana).max())


def test_svd_runs_its_blocks_in_threads_with_a_progress_bar(rng, capsys):
    """The SVD methods run their blocks of voxels through the thread pool with a bar (oSVD took
    42 s of one core on a 512 px study with no output), and the blocks' size or number of
    threads changes no voxel's result beyond the last bit."""
    from ctperf.perfusion.svd import svd_deconvolve

    t = np.arange(40) * 1.0
    s = np.clip(t - 6.0, 0.0, None)
    aif = 400.0 * (s / 4.5) ** 3 * np.exp(3.0 - s / 1.5)
    tissue = rng.normal(0.0, 3.0, (40, 3000)) + 0.02 * aif[:, None]
    for method in ("ssvd", "bsvd", "osvd"):
        one = svd_deconvolve(tissue, aif, t, method=method, chunk=3000, workers=1)
        many = svd_deconvolve(tissue, aif, t, method=method, chunk=700, workers=2,
                              progress=True)
        for name in ("cbf", "tmax", "threshold"):
            # the same sums; BLAS may round products of other block shapes in the last bit
            np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-12)
        assert method in capsys.readouterr().err


def test_the_noise_flag_weighs_the_frames_pace():
    """A probe's 3 HU studies at 2-3 s frames (or switching from 1 to 3 s): bSVD's hypoperfused
    volume +28 to +49 % with no flag, where 4 HU at 0.5 s frames raises it. The same noise on
    frames four times as far apart carries a quarter of the samples over the passage: judged as
    the noise per 0.5 s frame it stands for."""
    def flag(times: np.ndarray, sd: float) -> dict:
        return qc_flags(times=times, aif=_aif(times), baseline_sd=sd,
                        voxelwise=True)["noisy_voxelwise"]

    assert not flag(TIMES, 3.0)["flag"]
    slow = np.arange(23) * 2.0
    assert flag(slow, 3.0)["flag"] and flag(slow, 3.0)["value"] == pytest.approx(6.0)
    assert not flag(slow, 1.5)["flag"]  # 3 HU per 0.5 s frame
    # one delayed frame after the scan (at 90 s) adds a sample, not noise: the median step
    delayed = np.r_[TIMES, 90.0]
    assert flag(delayed, 2.7)["value"] == pytest.approx(2.7)
