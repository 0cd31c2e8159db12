"""AIF and VOF that fail safe: partial-volume correction may only enlarge the AIF.

The study here is made by a forward model written in this file, independent of
:mod:`ctperf.phantom`: an analytic gamma-variate AIF with recirculation, arterial voxels whose
blood fraction comes from a blurred disc (partial volume), tissue curves by numerical
convolution with exponential residues on a 0.05 s grid, GM, WM, CSF and a hypoperfused region
with realistic baseline HU, skull-stripped (no bone at all), one slice.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from ctperf.errors import CTPerfError
from ctperf.perfusion import (
    assess_vof,
    correct_partial_volume,
    run_perfusion,
)
from ctperf.types import CTPSeries
from ctperf.workflow import analyse_study

RHO, KH = 1.04, 0.733
FINE = 0.05  # s, simulation grid
SIZE = 80  # in-plane voxels
PIXEL_MM = 2.0
BACKGROUND_HU = -1024.0  # what skull stripping leaves outside the brain


def gamma_variate(t: np.ndarray, *, t0: float, a: float, b: float) -> np.ndarray:
    """(t - t0)^a exp(-(t - t0) / b) scaled to a peak of 1 (0 before t0)."""
    x = np.clip(t - t0, 0.0, None)
    y = x**a * np.exp(-x / b)
    return y / y.max()


def arterial_input(t: np.ndarray, *, peak: float = 400.0) -> np.ndarray:
    """First pass (t0 6 s, a 4, b 1.8 s: FWHM about 8.5 s) plus 15 % recirculation 14 s later."""
    first = gamma_variate(t, t0=6.0, a=4.0, b=1.8)
    second = gamma_variate(t, t0=20.0, a=4.0, b=3.0)
    return peak * (first + 0.15 * second)


def tissue_curve(fine_t: np.ndarray, ca_fine: np.ndarray, *, cbf: float, mtt: float,
                 delay: float, residue: str = "exponential") -> np.ndarray:
    """Tissue enhancement (HU) on the fine grid: (rho/kH) CBF/6000 * Ca(t - delay) convolved
    with R(t) = exp(-t / MTT) ("exponential") or 1 on [0, MTT) ("box"), by a Riemann sum."""
    shifted = np.interp(fine_t - delay, fine_t, ca_fine, left=0.0)
    if residue == "exponential":
        r = np.exp(-fine_t / mtt)
    else:
        r = (fine_t < mtt).astype(float)
    conv = np.convolve(shifted, r)[: fine_t.size] * FINE
    return RHO / KH * cbf / 6000.0 * conv


def vessel_fraction(centres: list[tuple[float, float]], radius: float, blur: float) -> np.ndarray:
    """Blood fraction per voxel of discs (voxels), supersampled 5 x 5 then blurred by the
    scanner's point spread (Gaussian sigma in voxels)."""
    sub = 5
    yy, xx = (np.mgrid[0:SIZE * sub, 0:SIZE * sub] + 0.5) / sub - 0.5
    disc = np.zeros(yy.shape, dtype=bool)
    for cy, cx in centres:
        disc |= np.hypot(yy - cy, xx - cx) < radius
    frac = disc.reshape(SIZE, sub, SIZE, sub).mean(axis=(1, 3))
    return ndimage.gaussian_filter(frac, blur)


def skullless_study(rng: np.random.Generator, *, times: np.ndarray, noise: float = 10.0,
                    vein_fraction: float | None = None, residue: str = "exponential"
                    ) -> tuple[CTPSeries, dict]:
    """One skull-stripped slice; returns the series and the truth (maps and masks (1, Y, X)).

    ``vein_fraction``: peak blood fraction of a small cortical vein (partial-volume diluted);
    None for no vein in view.
    """
    fine_t = np.arange(0.0, times[-1] + FINE / 2, FINE)
    ca_fine = arterial_input(fine_t)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    c = SIZE / 2 - 0.5
    r = np.hypot((yy - c) / (0.44 * SIZE), (xx - c) / (0.37 * SIZE))
    brain = r < 1.0
    gm = brain & (r > 0.72)
    csf = np.hypot((yy - c) / 5.0, (xx - c) / 3.0) < 1.0
    wm = brain & ~gm & ~csf
    lesion = brain & ~csf & (np.hypot(yy - (c - 12), xx - (c - 16)) < 9.0)
    # Arteries: middle and anterior cerebral arteries in cross-section, 3.2 voxels wide discs
    # blurred by the point spread, so no voxel is pure blood.
    art = vessel_fraction([(c - 6, c - 14), (c - 6, c + 14), (c - 20, c - 2), (c - 20, c + 2)],
                          radius=1.6, blur=0.5)
    art = np.where(brain & ~csf, art, 0.0)
    vein = np.zeros_like(art)
    if vein_fraction is not None:
        vein = vessel_fraction([(c + 0.40 * SIZE, c)], radius=0.8, blur=0.5)
        vein = np.where(brain, vein * vein_fraction / vein.max(), 0.0)
    # Perfusion: per-voxel CBF around the class mean, MTT and delay drawn per voxel from a few
    # values (so a handful of convolutions cover the slice).
    n = SIZE * SIZE
    cbf = np.where(gm, 60.0, 25.0) * np.exp(0.12 * rng.standard_normal(n).reshape(SIZE, SIZE))
    cbf = np.where(lesion, 0.35 * cbf / np.where(gm, 60.0, 25.0) * 60.0, cbf)
    mtt_choices = {"gm": (3.6, 4.0, 4.4), "wm": (4.8, 5.3, 5.8), "lesion": (8.0, 9.0, 10.0)}
    delay_choices = {"gm": (0.0, 0.5, 1.0), "wm": (0.5, 1.0, 1.5), "lesion": (2.5, 3.0, 3.5)}
    klass = np.where(lesion, "lesion", np.where(gm, "gm", "wm"))
    pick_m = rng.integers(0, 3, size=(SIZE, SIZE))
    pick_d = rng.integers(0, 3, size=(SIZE, SIZE))
    mtt = np.zeros((SIZE, SIZE))
    delay = np.zeros((SIZE, SIZE))
    sample = np.rint((times - fine_t[0]) / FINE).astype(int)
    enh = np.zeros((times.size, SIZE, SIZE))
    tissue = brain & ~csf
    for name in ("gm", "wm", "lesion"):
        for i, m in enumerate(mtt_choices[name]):
            for j, d in enumerate(delay_choices[name]):
                sel = tissue & (klass == name) & (pick_m == i) & (pick_d == j)
                unit = tissue_curve(fine_t, ca_fine, cbf=1.0, mtt=m, delay=d,
                                    residue=residue)[sample]
                enh[:, sel] = unit[:, None] * cbf[sel]
                mtt[sel], delay[sel] = m, d
    ca = ca_fine[sample]
    # The VOF: the AIF through a unit-area transit kernel (mean 7 s).
    kern_t = np.arange(0.0, 30.0, FINE)
    kern = gamma_variate(kern_t + 1e-9, t0=0.0, a=3.0, b=7.0 / 4.0)
    kern /= kern.sum()
    vof = np.convolve(ca_fine, kern)[: fine_t.size][sample]
    base = np.full((SIZE, SIZE), BACKGROUND_HU)
    base[wm], base[gm], base[lesion & ~csf] = 28.0, 38.0, 33.0
    base[csf] = 8.0
    blood = 45.0
    frac = np.clip(art + vein, 0.0, 1.0)
    hu = (1 - frac) * (base + enh) + art * (blood + ca[:, None, None]) \
        + vein * (blood + vof[:, None, None])
    hu = np.where(brain, hu, BACKGROUND_HU)
    hu = hu + noise * rng.standard_normal(hu.shape)
    series = CTPSeries(hu=hu[:, None].astype(np.float32), times=times,
                       affine=np.diag([PIXEL_MM, PIXEL_MM, 5.0, 1.0]))
    cbv = cbf * mtt / 60.0
    pure = tissue & (art < 0.05) & (vein < 0.05)
    truth = {"cbf": cbf[None], "cbv": cbv[None], "mtt": mtt[None], "delay": delay[None],
             "gm": (pure & gm & ~lesion)[None], "wm": (pure & wm & ~lesion)[None],
             "lesion": (pure & lesion)[None], "brain": brain[None], "aif": ca, "vof": vof,
             "artery_fraction": art[None], "vein": (vein > 0.05)[None]}
    return series, truth


def class_errors(maps, truth) -> dict[str, dict[str, float]]:
    """Relative error of the median CBF and CBV per tissue class."""
    out: dict[str, dict[str, float]] = {}
    for name in ("gm", "wm", "lesion"):
        sel = truth[name] & np.isfinite(maps["cbf"])
        out[name] = {m: float(np.median(maps[m][sel]) / np.median(truth[m][sel]) - 1)
                     for m in ("cbf", "cbv")}
    return out


# ---------------------------------------------------------------- the rules, on curves alone

T1 = np.arange(50.0)  # 1 s frames


def _curves() -> tuple[np.ndarray, np.ndarray]:
    """A measured AIF (partial volume 0.6) and the true VOF (unit-area transit, mean 7 s)."""
    fine = np.arange(0.0, 49.0 + FINE / 2, FINE)
    ca = arterial_input(fine)
    kern = gamma_variate(np.arange(0.0, 30.0, FINE) + 1e-9, t0=0.0, a=3.0, b=7.0 / 4.0)
    vof = np.convolve(ca, kern / kern.sum())[: fine.size]
    idx = np.rint(T1 / FINE).astype(int)
    return 0.6 * ca[idx], vof[idx]


def test_plausible_vof_scales_the_aif_up():
    aif, vof = _curves()
    check = assess_vof(aif, vof, T1)
    assert check.ok and check.reason == ""
    # The window-matched area ratio recovers 1 / 0.6; its lag estimate from first moments is
    # approximate (recirculation is cut at the end): 3 %.
    assert check.factor == pytest.approx(1 / 0.6, rel=0.03)
    scaled, factor = correct_partial_volume(aif, vof, T1)
    assert factor == check.factor
    np.testing.assert_allclose(scaled, aif * factor)


def test_vof_smaller_than_aif_rejected_and_never_shrinks():
    aif, vof = _curves()
    small = 0.4 * vof  # a vein diluted below the artery's area: ratio 0.67
    check = assess_vof(aif, small, T1)
    assert not check.ok and "area" in check.reason
    assert check.factor == 1.0 and check.ratio < 0.9
    scaled, factor = correct_partial_volume(aif, small, T1)
    assert factor == 1.0
    np.testing.assert_array_equal(scaled, aif)


def test_a_vof_cut_off_by_the_scans_end_is_rejected_as_such():
    """A scan ending 6 s after the AIF's peak cuts the vein's bolus: its area falls short of
    the artery's for that reason, not because the vein is diluted (the reason given before)."""
    aif, vof = _curves()
    k = int(np.argmax(aif)) + 6
    check = assess_vof(aif[:k], vof[:k], T1[:k])
    assert not check.ok and "cut off by the scan's end" in check.reason
    assert assess_vof(aif, 0.4 * vof, T1).reason.startswith("the VOF's area is")


def test_vof_within_noise_of_the_aif_area_is_kept_without_scaling():
    aif, vof = _curves()
    check = assess_vof(aif, 0.57 * vof, T1)  # ratio 0.95: an undiluted AIF measured with noise
    assert check.ok and check.factor == 1.0 and 0.9 < check.ratio < 1.0


def test_vof_peaking_before_the_aif_rejected():
    aif, vof = _curves()
    early = np.interp(T1 + 8.0, T1, vof, right=0.0)  # the same vein, 8 s earlier
    check = assess_vof(aif, early, T1)
    assert not check.ok and "not after the AIF" in check.reason


def test_arterial_voxel_with_a_late_noisy_peak_rejected():
    aif, _ = _curves()
    late = aif / 0.6
    late[np.argmax(aif) + 3] = late.max() + 20.0  # noise puts its peak 3 s after the AIF's
    check = assess_vof(aif, late, T1)
    assert not check.ok and "artery" in check.reason


def test_a_vein_voxel_holding_bone_is_neither_chosen_nor_accepted(rng):
    """A registered study: a sinus voxel at the skull's edge reads bone in the frames that
    moved (a probe's: 130, 4, 94, 394 and 20 HU late in a vein of 240 HU), its area the
    largest, so it alone was the VOF and scaled the AIF 2.1 times (CBF and CBV halved). Such a
    voxel is left out of the choice, and a VOF with such a spike is rejected."""
    from ctperf.perfusion.aif import select_vof

    aif, vof = _curves()
    veins = vof[:, None] * rng.uniform(0.95, 1.05, 6) + 2.0 * rng.standard_normal((T1.size, 6))
    edge = vof * 1.02 + 2.0 * rng.standard_normal(T1.size)
    late = int(np.argmax(vof)) + 12
    edge[late:late + 5] += [130.0, 4.0, 94.0, 394.0, 20.0]
    enh = np.column_stack([aif, veins, edge])
    chosen = select_vof(enh, T1, aif_ttp=float(T1[np.argmax(aif)] - T1[0]), aif=aif)
    assert 7 not in chosen.indices and set(chosen.indices) <= set(range(1, 7))
    assert assess_vof(aif, chosen.curve, T1).ok
    check = assess_vof(aif, edge, T1)
    assert not check.ok and "spike" in check.reason and check.factor == 1.0
    assert assess_vof(aif, vof, T1).ok  # the same vein without the bone


def test_vof_in_noise_rejected(rng):
    aif, vof = _curves()
    weak = 0.05 * vof + 10.0 * rng.standard_normal(T1.size)  # peak ~15 HU under 10 HU noise
    check = assess_vof(aif, weak, T1, n_baseline=5)
    assert not check.ok and "noise" in check.reason
    assert check.snr < 8.0


# ------------------------------------------------------ the skull-less single-slice study

def _method_reference(series: CTPSeries, truth: dict, method: str) -> dict:
    """The same method on the noise-free study with the true AIF: its own error, not the
    AIF's."""
    rng = np.random.default_rng(0)
    clean, _ = skullless_study(rng, times=series.times, noise=0.0)
    return run_perfusion(clean, method=method, aif=truth["aif"]).maps.maps


@pytest.mark.parametrize("method", ["nlr-fast", "bsvd"])
def test_skullless_study_without_vein_within_target(method, caplog):
    """No VOF in view: maps computed from the AIF as measured, said in provenance and log."""
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=10.0,
                                    residue="box")
    with caplog.at_level(logging.WARNING, logger="ctperf.perfusion.inputs"):
        result, _ = analyse_study(series, method=method, register=False, filter=True)
    prov = result.maps.provenance
    assert prov["partial_volume"]["corrected"] is False
    assert prov["aif"]["pv_factor"] is None and prov["vof"]["used"] is False
    assert prov["qc"]["no_vof"]["flag"] is True
    assert "not corrected for partial volume" in caplog.text
    assert result.vof is None
    # The AIF comes from the arteries' core: no rim voxels (blood fraction under half).
    az = tuple(np.array(prov["aif"]["voxels_zyx"]).T)
    assert truth["artery_fraction"][az].min() > 0.5
    errors = class_errors(result.maps.maps, truth)
    # Target: median CBF and CBV per class within 35 % of the truth. What remains is the
    # uncorrected partial volume of the best arterial voxels (+11 % on both) and the noise
    # bias of single-voxel fits at 10 HU (bSVD's low-flow lesion CBF spans +20..+36 % over
    # seeds 1-4).
    for name, err in errors.items():
        assert abs(err["cbf"]) < 0.35, (name, err)
        assert abs(err["cbv"]) < 0.35, (name, err)


@pytest.mark.parametrize("method", ["nlr-fast", "bsvd"])
def test_skullless_study_exponential_residues(method):
    """Exponential residues: CBV against the truth; CBF against the same method given the true
    AIF on noise-free curves (neither the box model nor truncated SVD recovers an exponential
    residue's peak flow from an 8 s wide bolus: that bias is the method's, not the AIF's)."""
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=10.0)
    result, _ = analyse_study(series, method=method, register=False, filter=True)
    maps = result.maps.maps
    ref = _method_reference(series, truth, method)
    for name in ("gm", "wm", "lesion"):
        sel = truth[name] & np.isfinite(maps["cbf"])
        cbv_err = np.median(maps["cbv"][sel]) / np.median(truth["cbv"][sel]) - 1
        cbf_err = np.median(maps["cbf"][sel]) / np.median(ref["cbf"][sel]) - 1
        # Same 35 % target; CBV carries the uncorrected partial volume (+11 %) and filtering.
        assert abs(cbv_err) < 0.35, (name, cbv_err)
        assert abs(cbf_err) < 0.35, (name, cbf_err)


def test_diluted_vein_rejected_automatic_and_refused_as_mask():
    """A small cortical vein, partial-volume diluted below the AIF's area."""
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=10.0,
                                    vein_fraction=0.35, residue="box")
    result = run_perfusion(series, method="bsvd")
    prov = result.maps.provenance
    assert prov["partial_volume"]["corrected"] is False
    assert prov["aif"]["pv_factor"] is None
    # Its area is too small to correct anything: the AIF's area stays the measured one.
    measured = np.trapezoid(prov["aif"]["measured_hu"], T1)
    assert np.trapezoid(result.aif, T1) == pytest.approx(measured)
    # Asked for explicitly, the same vein is an error that says why.
    with pytest.raises(CTPerfError, match=r"cannot correct the AIF.*area"):
        run_perfusion(series, method="bsvd", vof_mask=truth["vein"])


def test_an_aif_mask_on_a_vein_or_on_tissue_is_refused():
    """An AIF mask on a vein (its bolus after the tissue's) or on grey matter (enhancing as
    tissue does): refused, saying the mask is no artery. The vein had given maps with exit 0
    and only the no_vof flag (CBF 6x, Tmax negative, on a probe's phantom); the tissue had
    failed after the fit, blaming the lesions' reference."""
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=2.0,
                                    vein_fraction=1.0)
    run_perfusion(series, method="bsvd", aif_mask=truth["artery_fraction"] > 0.5)  # accepted
    with pytest.raises(CTPerfError, match=r"the AIF \(mask\)'s bolus arrives \d+\.\d s after "
                                          r"the brain's: it is not an artery"):
        run_perfusion(series, method="bsvd", aif_mask=truth["vein"])
    grey = truth["gm"] & (np.cumsum(truth["gm"], axis=2) <= 3)  # a few voxels of each row
    with pytest.raises(CTPerfError, match=r"the AIF \(mask\) enhances by \d+ HU at its peak, "
                                          r"under 2 times the brain's"):
        run_perfusion(series, method="bsvd", aif_mask=grey)


def test_large_vein_still_corrects():
    """A sinus-sized vein with its full area: the AIF is scaled up towards the truth."""
    series, truth = skullless_study(np.random.default_rng(2), times=T1, noise=10.0,
                                    vein_fraction=1.0, residue="box")
    sinus = np.zeros_like(truth["vein"])
    z, y, x = np.nonzero(truth["vein"])
    sinus[z, y, x] = series.hu[:, z, y, x].max(axis=0) - series.hu[0, z, y, x] > 250
    result = run_perfusion(series, method="bsvd", vof_mask=sinus)
    prov = result.maps.provenance
    assert prov["partial_volume"]["corrected"] is True and prov["aif"]["pv_factor"] > 1.0
    # The vein's own partial volume (its brightest voxels are not pure blood) and the lag
    # estimate: the corrected area within 15 % of the true AIF's.
    assert np.trapezoid(result.aif, T1) == pytest.approx(np.trapezoid(truth["aif"], T1),
                                                         rel=0.15)


def test_automatic_aif_at_2s_sampling_with_15hu_noise():
    times = np.arange(40) * 2.0
    series, truth = skullless_study(np.random.default_rng(5), times=times, noise=15.0)
    result = run_perfusion(series, method="bsvd")
    az = tuple(np.array(result.maps.provenance["aif"]["voxels_zyx"]).T)
    assert truth["artery_fraction"][az].min() > 0.5
    # The best voxels hold 0.9 blood at most (point spread): the measured area between 70 and
    # 105 % of the true AIF's.
    ratio = np.trapezoid(result.aif, times) / np.trapezoid(truth["aif"], times)
    assert 0.7 < ratio < 1.05


def test_a_poor_injection_reads_its_baseline_and_is_flagged():
    """A poor injection (arterial peak 120 HU over 96 px pixels of 2.4 mm): among the voxels
    rising most were noisy tissue whose curves never crossed their arrival level, and each was
    counted as arriving at the first frame, so the baseline was one frame (the bolus arrives
    at 5.5 s); the brain's mean curve then rose at its first frame, an AIF arriving "6.5 s
    after the brain" was read and the study refused for want of an artery. The baseline is
    now read from the curves that cross (6 frames), the AIF found in the artery is kept, the
    weak bolus is flagged (``aif_low_peak``) and bayes maps the lesion-free head (the
    voxel-wise methods read wide hypoperfusion at this noise, ``noisy_voxelwise``)."""
    from ctperf.perfusion import run_perfusion
    from ctperf.phantom import generate_subject

    subject = generate_subject(seed=3, size=96, slices=4, aif_peak=120.0)
    result = run_perfusion(subject.series, method="bayes")
    prov = result.maps.provenance
    assert 5 <= prov["baseline_frames"] <= 11
    assert subject.masks["artery"][tuple(np.array(prov["aif"]["voxels_zyx"]).T)].all()
    assert prov["qc"]["aif_low_peak"]["flag"]
    # lesion-free truth: 1.6 mL read (noise at the edges of the Tmax threshold); 5 allows for
    # the posterior's scatter between versions, far below the 130-160 mL of a wrong baseline
    assert result.lesions.volumes_ml["hypoperfused"] < 5.0


def test_an_automatic_aif_arriving_after_the_brain_is_refused():
    """An automatic AIF whose bolus arrives after the brain's mean curve feeds none of it:
    refused, asking for an AIF mask. 1 s after was passed (2 s were allowed): a sinus chosen in
    place of diluted arteries arrives that close to the tissue."""
    from ctperf.errors import AIFRefused, ValidationError
    from ctperf.perfusion.maps import _check_aif_feeds_tissue

    t = np.arange(60) * 1.0
    brain = 0.02 * np.interp(t - 2.0, t, arterial_input(t), left=0.0)  # 2 s after the AIF
    check = _check_aif_feeds_tissue
    check(t, arterial_input(t), brain[:, None], brain, "automatic")
    check(t, np.interp(t - 1.0, t, arterial_input(t), left=0.0), brain[:, None], brain,
          "automatic")
    for late in (3.0, 7.0):  # 1 and 5 s after the brain
        with pytest.raises(ValidationError, match=r"AIF's bolus arrives \d+\.\d s after the "
                                                  "brain's"):
            check(t, np.interp(t - late, t, arterial_input(t), left=0.0), brain[:, None],
                  brain, "automatic")
    # refused as the automatic AIF (a phantom's artery mask may stand in for it), and a given
    # mask's refused as such
    late_aif = np.interp(t - 7.0, t, arterial_input(t), left=0.0)
    with pytest.raises(AIFRefused):
        check(t, late_aif, brain[:, None], brain, "automatic")
    with pytest.raises(ValidationError) as given:
        check(t, late_aif, brain[:, None], brain, "mask")
    assert not isinstance(given.value, AIFRefused)


def test_vof_ranked_by_its_neighbours_is_not_raised_by_noise():
    """A sinus of 20 x 20 voxels, every one carrying the AIF's area, at 10 HU per frame: ranked
    by their own areas, the chosen voxels are those whose baseline noise raised them (their
    mean area 10 % high here over six noise draws, and the AIF scaled up that much too far);
    ranked by their neighbours' (1 mm pixels) within 3 % (0.97-1.02)."""
    from ctperf.perfusion.curves import to_enhancement
    from ctperf.perfusion.inputs import venous_output

    rng = np.random.default_rng(4)
    t = np.arange(0.0, 60.0, 1.0)
    aif = arterial_input(t)
    vein = 400 * (gamma_variate(t, t0=11.0, a=4.0, b=2.2) + 0.15 * gamma_variate(
        t, t0=25.0, a=4.0, b=3.0))
    vein *= np.trapezoid(aif, t) / np.trapezoid(vein, t)
    search = np.ones((1, 30, 30), dtype=bool)
    hu = np.full((t.size, 1, 30, 30), 40.0)
    hu[:, 0, 5:25, 5:25] += vein[:, None, None]
    hu += rng.normal(0.0, 10.0, hu.shape)
    venh, _ = to_enhancement(hu.reshape(t.size, -1), n_baseline=6)
    ratios = {}
    for pixel in (1.0, 2.0):                   # 2 mm: too coarse, each voxel by its own area
        curve, _ = venous_output(None, None, hu, venh, t, n_base=6,
                                 exclude=np.zeros(venh.shape[1], dtype=bool), aif=aif,
                                 aif_curve_given=False, search=search,
                                 spacing=(5.0, pixel, pixel))
        ratios[pixel] = np.trapezoid(curve, t) / np.trapezoid(vein, t)
    # the mean of 20 voxels' curves still carries noise: 4 % covers the 0.97-1.02 measured
    assert abs(ratios[1.0] - 1.0) < 0.04
    assert ratios[2.0] > 1.08


def test_a_bolus_just_begun_at_the_first_frame_is_flagged():
    """An AIF at about 10 % of its rise in the first frame passes the refusal (20 %) but its
    baseline holds contrast: flagged. Started before the bolus: not flagged."""
    from ctperf.perfusion.qc import qc_flags

    rng = np.random.default_rng(0)
    for start, flagged in ((0.0, False), (8.0, True)):
        t = np.arange(start, start + 50.0, 1.0)
        aif = arterial_input(t) + rng.normal(0.0, 2.0, t.size)
        flag = qc_flags(times=t - start, aif=aif)["bolus_at_start"]
        assert flag["flag"] is flagged, (start, flag)
    assert 0.05 < flag["value"] < 0.2


def test_a_slowly_rising_bolus_under_way_at_the_first_frame_is_refused():
    """A bolus at 35 % of its peak at the first frame, rising slowly (its peak 18 s after
    arrival), 0.5 s frames, 15 HU of noise: its first four frames rise by less than three
    noise SDs. A rule taking such a flat start as the unenhanced level (against a baseline's
    downward drift) let half of these pass, CBF 40 % low (a review): they are refused."""
    from ctperf.errors import ValidationError
    from ctperf.perfusion.curves import check_bolus_start

    def gv(t: np.ndarray, scale: float) -> np.ndarray:
        x = np.clip(t, 0.0, None)
        return x ** 3 * np.exp(-x / scale) / (27.0 * scale ** 3 * np.exp(-3.0))

    fine = np.linspace(0.0, 18.0, 20001)
    t0 = fine[np.argmax(gv(fine, 6.0) >= 0.35)]
    t = np.arange(0.0, 50.0, 0.5)
    rng = np.random.default_rng(7)
    for _ in range(20):
        with pytest.raises(ValidationError, match="bolus had begun before the first frame"):
            check_bolus_start(40.0 + 300.0 * gv(t + t0, 6.0) + rng.normal(0.0, 15.0, t.size))


def test_an_automatic_aif_with_no_bolus_is_refused_asking_for_a_mask():
    """At 64 px and 30 mAs (19 HU of noise) no artery stands out: the automatic choice was a
    flat curve of noise (with a one-frame baseline, exit 0 and a median CBF of 293 against 24).
    It is refused, asking for an AIF mask, not for the artery the user did not give; with the
    artery's mask the study is mapped."""
    from ctperf.errors import ValidationError
    from ctperf.perfusion import run_perfusion
    from ctperf.phantom import generate_subject, subject_seed

    # `ctperf phantom OUT --size 64 --slices 2 --seed 12 --mas 30`'s first subject
    subject = generate_subject(seed=subject_seed(12, 0), size=64, slices=2, mas=30.0)
    with pytest.raises(ValidationError, match=r"no bolus in the automatic AIF.*--aif-mask"):
        run_perfusion(subject.series, method="bsvd")
    run_perfusion(subject.series, method="bsvd", aif_mask=subject.masks["artery"])


def test_a_study_without_geometry_is_said(caplog):
    """CTPSeries(hu, times) without an affine takes 1 mm voxels: volumes and the vessel search
    read that scale (a probe's 2.4 mm study: hypoperfused 1.6 mL for 50.8). Said; a study with
    its geometry is not."""
    series, _ = skullless_study(np.random.default_rng(2), times=T1, noise=2.0,
                                vein_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ctperf.perfusion.maps"):
        run_perfusion(series, method="bsvd")
    assert "affine is the identity" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="ctperf.perfusion.maps"):
        run_perfusion(CTPSeries(series.hu, series.times), method="bsvd")
    assert "affine is the identity (1 mm voxels at the origin)" in caplog.text


def test_late_veins_outnumbering_the_artery_do_not_end_the_baseline_in_its_bolus():
    """Eighty small veins a slice (2 x 2 voxels, the AIF dispersed and 6 s late) against one
    artery of 3 x 3 voxels, 0.5 s frames: the veins outnumber the artery among the strongest
    risers, and the study's baseline, read from an early percentile of their arrivals, had
    ended 3-5 s after the artery's bolus began (a review's heads: the AIF, less that
    baseline, dipped 34-100 HU below zero, used silently or refused as having no area). The
    baseline now ends before the AIF's own arrival, with a warning."""
    rng = np.random.default_rng(2)
    t = np.arange(100) * 0.5
    fine = np.arange(0.0, t[-1] + 20.0, FINE)
    ca_fine = arterial_input(fine)
    tissue = np.interp(t, fine, tissue_curve(fine, ca_fine, cbf=50.0, mtt=4.0, delay=1.0))
    kernel = np.exp(-fine / 3.0) / 3.0
    vein = np.interp(t - 6.0, fine, np.convolve(ca_fine, kernel)[: fine.size] * FINE, left=0.0)
    hu = np.full((t.size, 2, SIZE, SIZE), 35.0, dtype=np.float32) + tissue[:, None, None, None]
    artery = np.zeros((2, SIZE, SIZE), dtype=bool)
    artery[:, 39:42, 39:42] = True
    veins = np.zeros_like(artery)
    veins[:, 4::8, 4::8] = True                          # 81 per slice, 2 x 2 voxels each
    veins |= np.roll(veins, 1, axis=1) | np.roll(veins, 1, axis=2) | np.roll(veins, (1, 1),
                                                                             axis=(1, 2))
    veins &= ~ndimage.binary_dilation(artery, iterations=2)
    hu[:, artery] = 40.0 + 0.9 * np.interp(t, fine, ca_fine)[:, None]
    hu[:, veins] = 40.0 + vein[:, None]
    hu += rng.normal(0.0, 6.0, hu.shape).astype(np.float32)
    series = CTPSeries(hu=hu, times=t, affine=np.diag([PIXEL_MM, PIXEL_MM, 5.0, 1.0]))
    brain = np.ones((2, SIZE, SIZE), dtype=bool)
    result = run_perfusion(series, method="bsvd", brain_mask=brain, aif_mask=artery)
    # measured: 15 frames (the artery's smoothed curve crosses a fifth of its rise at 8.5 s;
    # the baseline ends two frames before, as every study's), the AIF's lowest -3.4 HU (noise:
    # 6 HU over 18 voxels); without the check the AIF was refused as having no area
    assert result.maps.provenance["baseline_frames"] <= 15
    assert float(np.asarray(result.aif).min()) > -10.0



def test_a_spike_before_the_bolus_of_a_given_aif_keeps_the_baseline():
    """The baseline is checked against the AIF's own arrival, read where the run of frames
    that holds its peak begins: a one-frame spike of +250 HU in a given AIF curve before the
    bolus (a motion artefact) had cut a baseline of 9 frames to 3 (a review's heads)."""
    rng = np.random.default_rng(3)
    t = np.arange(60) * 1.0
    fine = np.arange(0.0, t[-1] + 20.0, FINE)
    ca_fine = arterial_input(fine)
    tissue = np.interp(t, fine, tissue_curve(fine, ca_fine, cbf=50.0, mtt=4.0, delay=1.0))
    hu = np.full((t.size, 2, SIZE, SIZE), 35.0, dtype=np.float32) + tissue[:, None, None, None]
    artery = np.zeros((2, SIZE, SIZE), dtype=bool)
    artery[:, 39:42, 39:42] = True
    aif = np.interp(t, fine, ca_fine)
    hu[:, artery] = 40.0 + aif[:, None]
    hu += rng.normal(0.0, 3.0, hu.shape).astype(np.float32)
    series = CTPSeries(hu=hu, times=t, affine=np.diag([PIXEL_MM, PIXEL_MM, 5.0, 1.0]))
    brain = np.ones((2, SIZE, SIZE), dtype=bool)
    frames = []
    for spike in (0.0, 250.0):
        given = aif.copy()
        given[4] += spike
        result = run_perfusion(series, method="bsvd", brain_mask=brain, aif=given)
        frames.append(result.maps.provenance["baseline_frames"])
    # measured: the same baseline with and without the spike
    assert frames[0] == frames[1], frames
