"""Curves as peers export them that no method can fit as given: an arterial peak cut flat, a
baseline reaching into the bolus, a tissue curve cut off by the scan's end. The truth here is
the closed-form box response to a gamma-variate AIF (tests/test_references.py), not ctperf's
phantom."""

from __future__ import annotations

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.perfusion import fit_curves, run_perfusion
from test_aif_failsafe import T1, skullless_study
from test_references import GV_PEAK, T_HAND, _box_tissue, _gv

RHO, KH = 1.04, 0.733


def _tissue(*boxes: tuple[float, float, float]) -> np.ndarray:
    return np.stack([_box_tissue(f, m, d, RHO, KH) for f, m, d in boxes], axis=1)


def test_an_aif_clipped_flat_is_refused():
    tissue = _tissue((50.0, 4.0, 0.0), (20.0, 8.0, 2.0))
    clipped = np.minimum(_gv(T_HAND), 0.6 * GV_PEAK)  # 11 frames (5 s) at the clip
    with pytest.raises(ValidationError, match="peak is cut flat: its 11 frames"):
        fit_curves(tissue + 30.0, clipped + 40.0, T_HAND)


def test_rounded_and_noisy_peaks_are_not_clipped(rng):
    # Whole HU of a noise-free gamma variate hold the top value for under a second even at
    # 0.1 s frames; a noisy curve never repeats its maximum.
    from ctperf.perfusion.curves import check_peak_not_clipped
    fine = np.arange(0.0, 45.0, 0.1)
    for peak in (40.0, 400.0):
        check_peak_not_clipped(np.round(_gv(fine) * peak / GV_PEAK), fine)
    check_peak_not_clipped(_gv(T_HAND) + rng.normal(0.0, 5.0, T_HAND.size), T_HAND)
    # a clip just under the peak (three 0.5 s frames) leaves CBF within a few percent
    check_peak_not_clipped(np.minimum(_gv(T_HAND), 0.97 * GV_PEAK), T_HAND)


def test_a_saturated_aif_given_to_the_maps_is_refused():
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=10.0)
    aif = np.minimum(truth["aif"], 0.7 * truth["aif"].max())
    run_perfusion(series, method="bsvd", aif=truth["aif"])  # the curve as it was: mapped
    with pytest.raises(ValidationError, match=r"cut flat.*--aif-mask"):
        run_perfusion(series, method="bsvd", aif=aif)


def test_a_baseline_reaching_into_the_bolus_is_refused():
    tissue = _tissue((50.0, 4.0, 0.0), (25.0, 10.0, 4.0))
    # the AIF rises from 6 s and passes 10 % of its peak at about 7.5 s (frame 16 of 0.5 s)
    ok = fit_curves(tissue + 30.0, _gv(T_HAND) + 40.0, T_HAND, baseline=12)
    assert ok.provenance["baseline_frames"] == 12
    with pytest.raises(ValidationError, match=r"baseline 20 frames reaches into the AIF's bolus"):
        fit_curves(tissue + 30.0, _gv(T_HAND) + 40.0, T_HAND, baseline=20)


def test_a_tissue_curve_cut_off_by_the_scan_is_flagged_on_its_own():
    # one core curve still at its plateau when the 45 s scan ends, beside five that washed out:
    # the tissue's mean curve has washed out, so the study's flag stays down
    boxes = [(50.0, 4.0, 0.0)] * 5 + [(10.0, 30.0, 8.0)]
    fit = fit_curves(_tissue(*boxes) + 30.0, _gv(T_HAND) + 40.0, T_HAND)
    assert [i for i, f in enumerate(fit.flags) if "truncated" in f] == [5]
    assert fit.provenance["curve_flags"]["truncated"]["curves"] == [5]
    assert not fit.provenance["qc"]["truncation"]["flag"]

