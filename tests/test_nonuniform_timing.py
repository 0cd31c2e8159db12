"""Unevenly spaced frames (fast, then slow sampling) through the whole model-based pipeline.

The study comes from the independent forward model of ``test_aif_failsafe`` (box residues, so
the comparison is between samplings, not between residue shapes).
"""

from __future__ import annotations

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.perfusion import (
    compute_maps,
    curve_features,
    resample,
    run_perfusion,
    select_aif,
    uniform_grid,
)
from ctperf.perfusion.qc import frame_gaps
from test_aif_failsafe import gamma_variate, skullless_study

REFERENCE = np.arange(0.0, 50.0, 0.5)
FAST_THEN_SLOW = np.r_[np.arange(0.0, 24.0, 0.5), np.arange(24.0, 50.0, 3.0)]
# The bolus peaks (13 s) after the switch to 3 s frames.
PEAK_IN_SLOW = np.r_[np.arange(0.0, 10.0, 0.5), np.arange(10.0, 52.0, 3.0)]


def test_uniform_grid():
    assert uniform_grid(REFERENCE) is None
    grid = uniform_grid(FAST_THEN_SLOW)
    assert grid is not None
    assert grid[0] == 0.0 and np.allclose(np.diff(grid), 0.5)
    assert FAST_THEN_SLOW[-1] - 0.5 < grid[-1] <= FAST_THEN_SLOW[-1]
    # A stray tiny step does not blow the grid up: at most four points per frame.
    jitter = np.r_[0.0, 0.01, np.arange(1.0, 40.0)]
    assert uniform_grid(jitter).size <= 4 * jitter.size + 1


def test_resample_matches_np_interp(rng):
    curves = rng.normal(size=(FAST_THEN_SLOW.size, 3)).astype(np.float32)
    grid = uniform_grid(FAST_THEN_SLOW)
    out = resample(curves, FAST_THEN_SLOW, grid)
    assert out.shape == (grid.size, 3) and out.dtype == np.float32
    naive = np.stack([np.interp(grid, FAST_THEN_SLOW, c) for c in curves.T], axis=1)
    np.testing.assert_allclose(out, naive, rtol=1e-5, atol=1e-5)  # float32 rounding


def test_select_aif_with_candidates_peaking_in_slow_frames():
    """The best candidates peak two slow frames apart: their median time fell between them and
    left no voxel to average (an empty maximum)."""
    t = np.r_[np.arange(0.0, 12.0, 0.5), np.arange(12.0, 60.0, 3.0)]
    curves = [500 * gamma_variate(t, t0=15.0, a=3.0, b=1.0),
              480 * gamma_variate(t, t0=21.0, a=3.0, b=1.0)]
    curves += [200 * gamma_variate(t, t0=16.0 + k, a=4.0, b=2.5) for k in range(6)]
    sel = select_aif(np.stack(curves, axis=1), t)
    # The best voxel (earliest, highest, narrowest) always stays.
    assert 0 in sel.indices
    assert 18.0 <= sel.ttp <= 24.0


def test_select_aif_keeps_out_veins_two_slow_frames_later(rng):
    """Frames 3 s apart: the sinus (bright, many voxels) peaks two frames after the small,
    diluted arteries, within the two frame steps the peak times may differ by; the half-rise
    times, read between frames, tell the veins apart (before: 28 veins among 49 voxels of a
    phantom resampled so, CBF 2.5 times too high)."""
    t = np.arange(0.0, 60.0, 3.0) + 1.5
    # arteries peaking at 10.5-11 s, the sinus at 16-16.4 s (half-rise times 4-5 s apart)
    arteries = [250 * gamma_variate(t, t0=6.0 + 0.05 * k, a=3.0, b=1.5) for k in range(12)]
    veins = [350 * gamma_variate(t, t0=10.0 + 0.01 * k, a=3.0, b=2.0) for k in range(40)]
    curves = np.stack(arteries + veins, axis=1) + rng.normal(0.0, 2.5, (t.size, 52))
    features = curve_features(curves, t)
    assert np.ptp(features["ttp"]) <= 2 * 3.0 + 1.0  # peak times alone cannot separate them
    sel = select_aif(curves, t)
    assert sel.indices.size >= 6 and sel.indices.max() < 12


def test_a_protocol_changing_pace_has_no_gap_and_missing_frames_do():
    assert frame_gaps(FAST_THEN_SLOW)[0].size == 0 and frame_gaps(PEAK_IN_SLOW)[0].size == 0
    t = np.arange(0.0, 60.0, 1.0)
    gaps, pace = frame_gaps(t[(t <= 10) | (t >= 21)])
    assert gaps.tolist() == [10] and pace.tolist() == [1.0]


def test_frames_missing_over_the_arterial_bolus_refused_later_flagged():
    """An interrupted scan: 9 s missing over the AIF's peak (13 s) leave no CBF to measure
    (refused); the same hole after the arterial first pass is flagged."""
    t = np.arange(0.0, 50.0, 1.0)
    series, _ = skullless_study(np.random.default_rng(2), times=t, noise=5.0)
    over_peak = (t <= 9) | (t >= 19)
    cut = series.replace(hu=series.hu[over_peak], times=t[over_peak])
    with pytest.raises(ValidationError, match="frames missing during the arterial bolus"):
        run_perfusion(cut, method="bsvd")
    later = (t <= 26) | (t >= 36)
    cut = series.replace(hu=series.hu[later], times=t[later])
    flag = run_perfusion(cut, method="bsvd").maps.provenance["qc"]["frame_gap"]
    assert flag["flag"] and flag["value"] == 10.0
    flag = run_perfusion(series, method="bsvd").maps.provenance["qc"]["frame_gap"]
    assert not flag["flag"] and flag["value"] == 0.0


def _class_medians(maps, truth) -> dict[str, dict[str, float]]:
    return {k: {m: float(np.nanmedian(maps[m][truth[k]])) for m in ("cbf", "cbv", "tmax", "ttp")}
            for k in ("gm", "wm", "lesion")}


@pytest.mark.parametrize("method", ["nlr-fast", "bsvd"])
@pytest.mark.parametrize(("times", "cbf_tol"), [(FAST_THEN_SLOW, 0.15), (PEAK_IN_SLOW, 0.25)])
def test_uneven_frames_match_uniform_reference(method, times, cbf_tol):
    rng_seed = 4
    ref_series, truth = skullless_study(np.random.default_rng(rng_seed), times=REFERENCE,
                                        noise=5.0, residue="box")
    series, _ = skullless_study(np.random.default_rng(rng_seed), times=times, noise=5.0,
                                residue="box")
    ref = _class_medians(compute_maps(ref_series, method=method), truth)
    result = run_perfusion(series, method=method)
    got = _class_medians(result.maps.maps, truth)
    prov = result.maps.provenance
    assert prov["fit_grid_step_s"] == 0.5
    assert prov["times_s"] == times.tolist()
    # The bolus arrives at 6 s, within the fast frames: the same baseline as the reference.
    assert prov["baseline_frames"] == compute_maps(ref_series, method=method
                                                   ).provenance["baseline_frames"]
    for name in got:
        g, r = got[name], ref[name]
        # Fewer frames carry more noise into single-voxel fits (5 HU here): CBF medians within
        # 15 % (peak in the fast part) or 25 % (peak sampled every 3 s) of the 0.5 s reference,
        # CBV, an area, within 10 %.
        assert g["cbf"] == pytest.approx(r["cbf"], rel=cbf_tol), name
        assert g["cbv"] == pytest.approx(r["cbv"], rel=0.10), name
        # Tmax is a fitted time: half a fine frame plus noise.
        assert g["tmax"] == pytest.approx(r["tmax"], abs=0.6), name
        # TTP is read from the frames as acquired (from the first frame): within half a slow
        # frame of the reference.
        assert g["ttp"] == pytest.approx(r["ttp"], abs=1.5), name


def test_slices_taken_at_their_own_times_are_fitted_on_them():
    """A scanner sweeping its slices (shuttle, helical) takes slice 1 of each frame 0.75 s after
    slice 0. Read on the frame's mean time, slice 1 looks 0.75 s earlier than slice 0 (the
    AIF's own slice sets where the zero lies); interpolated from their own times, both slices'
    delays match the same study taken with every slice at the frame's time (noise-free
    phantom at 0.25 s, sampled every 1 s)."""
    from ctperf.phantom import generate_subject

    fine = generate_subject(seed=3, size=48, slices=2, frames=176, frame_interval=0.25,
                            noise=False).series
    k = np.arange(0, 172, 4)
    offsets = np.array([0, 3])                                     # quarter seconds
    own = (k[:, None] + offsets[None, :]) * 0.25
    swept = fine.replace(hu=np.stack([fine.hu[k + o, z] for z, o in enumerate(offsets)], axis=1),
                         times=own.mean(axis=1), slice_times=own)
    # the same frames with both slices at the frame's time (halfway between fine frames)
    level = fine.replace(hu=0.5 * (fine.hu[k + 1] + fine.hu[k + 2]), times=own.mean(axis=1))
    reference = run_perfusion(level, method="nlr-fast", rim_mm=0).maps["delay"]
    aligned = run_perfusion(swept, method="nlr-fast", rim_mm=0)
    assert aligned.maps.provenance["slice_times_interpolated_s"] == pytest.approx(0.375)
    ignored = run_perfusion(swept.replace(slice_times=None), method="nlr-fast",
                            rim_mm=0).maps["delay"]
    for z in range(2):
        # linear interpolation of a noise-free curve: within 0.1 s (a tenth of a frame)
        assert abs(np.nanmedian(aligned.maps["delay"][z] - reference[z])) < 0.1
    error = [np.nanmedian(ignored[z] - reference[z]) for z in range(2)]
    assert error[1] - error[0] == pytest.approx(-0.75, abs=0.15)


def test_a_sweep_of_slices_reads_one_cbf_in_every_slice():
    """Five copies of one slice, each taken at its own time in a sweep over 1.75 s of 2 s
    frames (a jog or shuttle mode): moved onto the frames' mean times, every copy must read
    the same CBF. A straight line between frames cut the bolus's peak by how far a copy lay
    from its frame's time (median CBF 74.3-85.5, 14 % apart); the spline keeps it."""
    from ctperf.phantom import generate_subject

    fine = generate_subject(seed=3, size=48, slices=1, frames=185, frame_interval=0.25,
                            noise=False).series
    k = np.arange(0, 176, 8)                                       # frames every 2 s
    offsets = np.array([0, 2, 4, 6, 7])                            # quarter seconds
    own = (k[:, None] + offsets[None, :]) * 0.25
    swept = fine.replace(hu=np.stack([fine.hu[k + o, 0] for o in offsets], axis=1),
                         times=own.mean(axis=1), slice_times=own)
    cbf = run_perfusion(swept, method="nlr-fast", rim_mm=0).maps["cbf"]
    medians = np.array([np.nanmedian(cbf[z]) for z in range(offsets.size)])
    # noise-free copies of one slice: what is left is the sampling's own phase (0.8 % here)
    assert np.ptp(medians) / medians.mean() < 0.03, medians


def test_a_shuttle_sweeping_back_and_forth_keeps_its_noise(caplog):
    """A shuttle that sweeps its 8 slices back and forth over 1.5 s of 2 s frames takes its end
    slices in pairs close in time, then 3.5 s later: the cubic spline through such noisy pairs
    overshot in the gaps (a probe's: 5 HU of noise read 9.9-14 HU in the end slices, their
    delay +1.25 s); those frames take the straight line, which never raises the noise. Sweeps
    in one direction keep the spline in every frame."""
    import logging

    from ctperf.perfusion.curves import MAX_SPLINE_NOISE_GAIN, on_frame_times
    from ctperf.types import CTPSeries

    rng = np.random.default_rng(4)
    n_t, n_z = 30, 8
    frames = np.arange(n_t) * 2.0
    offsets = np.linspace(0.0, 1.5, n_z)
    back_and_forth = np.array([frames[k] + (offsets if k % 2 == 0 else offsets[::-1])
                               for k in range(n_t)])
    one_way = frames[:, None] + offsets[None, :]
    for own in (back_and_forth, one_way):
        hu = (40.0 + 5.0 * rng.standard_normal((n_t, n_z, 24, 24))).astype(np.float32)
        study = CTPSeries(hu=hu, times=own.mean(axis=1), affine=np.diag([1.0, 1.0, 5.0, 1.0]),
                          slice_times=own)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ctperf.perfusion.curves"):
            moved, _ = on_frame_times(study)
        linear = [r.getMessage() for r in caplog.records if "linearly" in r.getMessage()]
        assert bool(linear) == (own is back_and_forth), linear
        sd = moved.hu[2:-2].std(axis=(0, 2, 3))  # the ends are held, not interpolated
        # 5 HU in; 24 x 24 x 26 samples per slice give each SD within 2 %
        assert np.all(sd < 5.0 * MAX_SPLINE_NOISE_GAIN), sd


@pytest.mark.parametrize("frames", ["two-rate", "two frames missing"])
def test_a_sweep_keeps_the_spline_where_it_does_not_raise_the_noise(frames):
    """Slices swept in one direction over 0.9 s of frames taken 1 s then 3 s apart, or of 1 s
    frames with two missing: a frame or two of theirs, at the change of pace or the gap, would
    be made noisier by the spline. Only those take the line: the whole slice had, and its
    bolus's peak read low (a review's: CBF 45.1-45.6 against 49.3 in the other slices)."""
    from ctperf.perfusion.curves import on_frame_times
    from ctperf.types import CTPSeries

    t = (np.r_[np.arange(20.0), 19.0 + 3.0 * np.arange(1, 10)] if frames == "two-rate"
         else np.delete(np.arange(40.0), [25, 26]))
    n_z = 16
    own = t[:, None] + np.linspace(0.0, 0.9, n_z)[None, :]
    times = own.mean(axis=1)

    def bolus(x):  # a gamma variate peaking at 12 s, 300 HU, on a 40 HU baseline
        y = np.clip(x - 6.0, 0.0, None)
        return 40.0 + 300.0 * (y / 6.0) ** 3 * np.exp(3.0 - y / 2.0)

    hu = np.broadcast_to(bolus(own)[:, :, None, None], (t.size, n_z, 2, 2)).astype(np.float32)
    moved, _ = on_frame_times(CTPSeries(hu=hu.copy(), times=times,
                                        affine=np.diag([1.0, 1.0, 5.0, 1.0]), slice_times=own))
    peak = slice(8, 18)  # frames over the bolus's peak, 1 s apart in both protocols
    err = np.abs(moved.hu[peak, :, 0, 0] - bolus(times[peak])[:, None])
    # the spline's own error on this bolus; the line's between 1 s samples reached 5 HU
    assert err.max() < 0.5, err.max()


def test_osvd_on_coarse_frames_is_flagged():
    """oSVD's oscillation index averages over the samples, so at 2 s frames it truncates
    harder than the noise asks (a probe's curves from another group's forward model: CBF -45
    to -57 % noise-free, bSVD -26 to -38 %), with no flag: ``osvd_coarse_frames`` says so.
    Frames 0.5 s apart at first and 3 s later are deconvolved on a 0.5 s grid: not flagged;
    nor are the other methods."""
    coarse, _ = skullless_study(np.random.default_rng(4), times=np.arange(0.0, 50.0, 2.0),
                                    noise=2.0, residue="box")
    flag = run_perfusion(coarse, method="osvd").maps.provenance["qc"]["osvd_coarse_frames"]
    assert flag["flag"] and flag["value"] == 2.0
    flag = run_perfusion(coarse, method="bsvd").maps.provenance["qc"]["osvd_coarse_frames"]
    assert not flag["flag"] and flag["value"] is None
    uneven, _ = skullless_study(np.random.default_rng(4), times=FAST_THEN_SLOW, noise=2.0,
                                residue="box")
    flag = run_perfusion(uneven, method="osvd").maps.provenance["qc"]["osvd_coarse_frames"]
    assert not flag["flag"] and flag["value"] == 0.5
