"""Automatic AIF/VOF and lesion definitions on subjects of the digital phantom."""

from __future__ import annotations

import numpy as np
import pytest

phantom = pytest.importorskip("ctperf.phantom")

from ctperf.perfusion import LesionOptions, run_perfusion, segment_lesions  # noqa: E402


@pytest.fixture(scope="module", params=[1, 2])
def subject(request):
    return phantom.generate_subject(seed=request.param, size=64, slices=2, lesion=True)


def test_automatic_aif_vof_recovers_true_aif_area(subject):
    result = run_perfusion(subject.series, method="bsvd")
    t = subject.series.times
    ratio = np.trapezoid(result.aif, t) / np.trapezoid(subject.aif, t)
    # Issue target: the partial-volume-corrected automatic AIF has the true (partial-volume
    # free) AIF's area within 10 %.
    assert ratio == pytest.approx(1.0, abs=0.10)
    vof = np.array(result.maps.provenance["vof"]["voxels_zyx"]).T
    # Most VOF voxels lie in the sinus; the 1.2 mm blur spreads it into neighbours with nearly
    # its area, which may join.
    assert subject.masks["vein"][tuple(vof)].mean() >= 0.6
    assert result.maps.provenance["timing_source"] == "phantom"  # where the times came from


def test_blood_still_bright_from_an_earlier_injection_changes_nothing(subject):
    """An angiogram before the perfusion scan leaves contrast in the blood (100 HU here, in
    proportion to each voxel's blood share, the same in every frame): subtracted with the
    baseline, it must change nothing. It put the sinus over the brain mask's 120 HU bone
    threshold, out of the vessels' search at the brain's edge: the VOF came from its
    partial-volume rim, CBF +37 % with no flag, or none was found, +54 % (a probe)."""
    blood = subject.extras["vessel_fraction"]
    hu = subject.series.hu + np.float32(100.0) * blood[None].astype(np.float32)
    assert np.median(hu[0][subject.masks["vein"]]) > 120.0  # the sinus over the threshold
    a = run_perfusion(subject.series, method="bsvd")
    b = run_perfusion(subject.series.replace(hu=hu), method="bsvd")
    pa, pb = (r.maps.provenance["partial_volume"] for r in (a, b))
    assert pb["corrected"]
    # the same VOF voxels or their neighbours: the factor within 3 % (the probe's 1.18 for
    # 1.62), and the brain's CBF with it
    assert pb["factor"] == pytest.approx(pa["factor"], rel=0.03)
    both = np.isfinite(a.maps["cbf"]) & np.isfinite(b.maps["cbf"])
    ratio = np.median(b.maps["cbf"][both]) / np.median(a.maps["cbf"][both])
    assert ratio == pytest.approx(1.0, abs=0.03)


def test_lesion_volumes_from_true_maps_equal_phantom_masks(subject):
    # The phantom's core is CBF < 30 % of each voxel's own healthy CBF and its penumbra true
    # Tmax > 6 s minus core; with that reference the thresholds must reproduce them exactly.
    res = segment_lesions(subject.truth, brain=subject.masks["brain"],
                          reference=subject.extras["cbf_healthy"])
    assert np.array_equal(res.core, subject.masks["core"])
    assert np.array_equal(res.penumbra, subject.masks["penumbra"])
    voxel_ml = subject.truth.voxel_ml
    assert res.volumes_ml["core"] == pytest.approx(subject.masks["core"].sum() * voxel_ml)
    assert res.volumes_ml["penumbra"] == pytest.approx(
        subject.masks["penumbra"].sum() * voxel_ml)


@pytest.mark.parametrize("shift", [1, 2])
def test_baseline_ends_before_the_bolus_when_the_head_jumps_late(shift):
    """Bone and air edges that move late step by ~1000 HU: they must not date the bolus, nor
    set the AIF's candidate threshold (before, the 3.6 mm jump stopped with an AIF below its
    baseline, the baseline having run to the jump, and the 7.2 mm one with no candidate)."""
    subject = phantom.generate_subject(seed=1, size=64, slices=2, lesion=False)
    hu = subject.series.hu.copy()
    hu[60:] = np.roll(hu[60:], shift, axis=-1)  # the head moves 3.6 or 7.2 mm, last third
    result = run_perfusion(subject.series.replace(hu=hu), method="bsvd")
    arrival = int(np.argmax(subject.aif > 0.2 * subject.aif.max()))
    # the baseline ends one frame before the first strong vessel reaches 20 % of its peak
    assert result.maps.provenance["baseline_frames"] <= arrival, (
        result.maps.provenance["baseline_frames"], arrival)


def test_fitted_brain_leaves_out_voxels_more_csf_than_tissue(subject):
    """CSF narrower than the CSF mask's 1.5 mm smoothing (sulci, the ventricles' rim) used to
    be fitted: no flow to measure, and at clinical noise its Tmax (the fit's stopping point) and
    its zero CBF made false lesions. Each voxel's own temporal mean now leaves it out."""
    from ctperf import masks

    result = run_perfusion(subject.series, method="bsvd")
    fitted = np.isfinite(result.maps["cbf"])
    base = subject.series.hu[:result.maps.provenance["baseline_frames"]].mean(axis=0)
    spacing = subject.series.spacing
    smoothed_only = (masks.brain_mask(base, spacing=spacing, exclude_csf=False)
                     & ~masks.csf_mask(base, spacing=spacing))  # the rule before
    tissue = subject.extras["gm_fraction"] + subject.extras["wm_fraction"]
    fluid = (tissue < 0.5) & ~subject.masks["vessels"]
    # Seeds 1 and 2 (64 px): 241 and 260 such voxels before, 100 and 120 now; what remains
    # lies at the skull, where bone's blur lifts CSF above the cut (the lesion rim drops it).
    assert (fitted & fluid).sum() <= 0.6 * (smoothed_only & fluid).sum()
    # ... at the cost of 6-12 of the phantom's ~3,000 brain voxels (tissue fraction >= 0.5)
    kept = subject.masks["brain"] & smoothed_only
    assert (kept & ~fitted).sum() <= 0.01 * kept.sum()
    cut = result.maps.provenance["csf_cut_hu"]
    assert 15.0 < cut < 25.0  # between the phantom's CSF (5-15 HU) and its tissue (26-40 HU)


def test_a_large_hypodense_region_left_out_as_csf_is_flagged(subject):
    """Tissue darker than the CSF/tissue midpoint is left out with the CSF; when that is a
    large share of the brain (here a hemisphere made 15 HU darker, as old infarct or oedema
    would), the maps say so (QC flag ``csf_cut``) instead of silently mapping half a brain."""
    plain = run_perfusion(subject.series, method="bsvd").maps.provenance["qc"]["csf_cut"]
    # 4.6 and 4.3 % of these brains (seeds 1, 2) are CSF-dominated voxels the smoothed
    # threshold kept
    assert not plain["flag"] and 0.0 < plain["value"] < 0.10
    hu = subject.series.hu.copy()
    brain = subject.masks["brain"]
    half = brain & (np.arange(brain.shape[2])[None, None, :] < brain.shape[2] // 2)
    hu[:, half] -= 15.0
    qc = run_perfusion(subject.series.replace(hu=hu), method="bsvd").maps.provenance["qc"]
    # the hypodense half also lowers the tissue's median, and with it the cut: 13.7 % and
    # 19.7 % of the brain are left out on seeds 1 and 2, not the whole half
    assert qc["csf_cut"]["flag"] and qc["csf_cut"]["value"] > 0.10, qc["csf_cut"]


@pytest.mark.parametrize("offset", [-24.0, 16.0, 20.0, 24.0])
def test_a_study_on_an_offset_hu_scale_gives_the_same_brain_and_lesions(subject, offset):
    """HU shifted by a constant (an intercept of -1000 applied for -1024, or the reverse) left
    the CSF threshold's 15 HU above the brain's white matter (-24 HU: a tenth of a 128 px
    phantom's brain fitted, its 12.6 mL hypoperfused read 0.7 mL, no flag) or below its CSF
    (+24: the CSF fitted). A brain outside 18-50 HU whose air is as far off is moved back by
    the air's offset, and flagged; so is one that +16 or +20 HU left inside it, where the brain
    follows the air (a probe's 96 px phantoms had read core +4 to +16 % at +20 HU, no flag)."""
    s = subject.series
    a = run_perfusion(s, method="bsvd", lesion_options=LesionOptions())
    b = run_perfusion(s.replace(hu=s.hu + np.float32(offset)), method="bsvd",
                      lesion_options=LesionOptions())
    qa, qb = a.maps.provenance["qc"]["hu_offset"], b.maps.provenance["qc"]["hu_offset"]
    assert not qa["flag"] and qb["flag"]
    # the offset the air reads: the shift, plus where the unshifted air's median lies (its
    # noise and partial volume: 0.23-0.24 HU from -1000 on these seeds)
    assert qa["value"] == 0.0 and qb["value"] == pytest.approx(offset, abs=0.5)
    fitted_a, fitted_b = np.isfinite(a.maps["cbf"]), np.isfinite(b.maps["cbf"])
    # moved back by what the air reads (-1024 or -976 HU): the offset to a quarter of a HU, so
    # only voxels on a threshold's edge may differ: 1 and 5 of 3,200
    assert (fitted_a ^ fitted_b).sum() <= 10
    both = fitted_a & fitted_b
    # the same curves, float32 rounding of the added offset apart
    np.testing.assert_allclose(b.maps["cbf"][both], a.maps["cbf"][both], atol=1e-3)
    for name in ("core", "hypoperfused"):
        va, vb = a.lesions.volumes_ml[name], b.lesions.volumes_ml[name]
        # one 64 px voxel is 0.13 mL: 22.15 against 22.02 on seed 1, equal on seed 2
        assert vb == pytest.approx(va, abs=0.14), (name, va, vb)
    assert a.lesions.volumes_ml["hypoperfused"] > 1.0


@pytest.mark.parametrize("outside", [-1000.0, -3024.0])
def test_a_field_of_view_cutting_the_head_is_flagged(subject, outside):
    """A reconstruction circle or matrix that cuts one side of the head off (stored as air, or
    as the padding scanners write outside the circle) loses that side's brain from the lesion
    volumes and moves the mid-sagittal plane (a 128 px phantom cut at 12 % of its width: 4.4 %
    of the brain gone, core 1.39 -> 1.71 mL, the plane turned 13.3 -> 8.7 degrees); it was
    mapped with no flag. The brain then meets the edge with no skull between: ``fov_cut``."""
    s = subject.series
    whole = run_perfusion(s, method="bsvd").maps.provenance["qc"]["fov_cut"]
    assert not whole["flag"] and whole["value"] == 0.0
    head = np.flatnonzero((s.hu[0] > -500).any(axis=(0, 1)))
    cut = int(head[0] + 0.12 * (head[-1] - head[0]))
    hu = s.hu.copy()
    hu[:, :, :, :cut] = outside
    qc = run_perfusion(s.replace(hu=hu), method="bsvd").maps.provenance["qc"]["fov_cut"]
    # the flag is raised above 0.5 % of the brain: 0.8 % and more on these 64 px seeds, 3.0 %
    # of the 128 px phantom's brain
    assert qc["flag"] and qc["value"] > 0.005, qc


def test_air_inside_the_head_cuts_no_field_of_view(subject):
    """A pocket of air inside the brain (air after surgery; a voxel stored as NaN, read as
    air) meets brain with no skull between, but cuts no field of view: a probe's single NaN
    voxel had raised ``fov_cut``, whose advice is to reconstruct a wider field of view."""
    s = subject.series
    zz, yy, xx = np.nonzero(subject.masks["brain"])
    k = len(zz) // 2
    hu = s.hu.copy()
    hu[:, zz[k], yy[k] - 1:yy[k] + 2, xx[k] - 1:xx[k] + 2] = -1000.0
    qc = run_perfusion(s.replace(hu=hu), method="bsvd").maps.provenance["qc"]["fov_cut"]
    assert not qc["flag"] and qc["value"] == 0.0, qc


def test_a_field_of_view_inside_the_brain_on_every_side_is_mapped_and_flagged(subject):
    """A matrix that crops the brain itself on all four sides (skull left only at the corners)
    is a cut head, mapped with ``fov_cut``, not taken for a flat background without a head
    (``no_head_outline``, judged only without a skull)."""
    s = subject.series
    ys, xs = np.nonzero(subject.masks["brain"].any(axis=0))
    y0, y1, x0, x1 = ys.min() + 3, ys.max() - 2, xs.min() + 3, xs.max() - 2
    affine = s.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([x0, y0, 0.0])
    cut = s.replace(hu=np.ascontiguousarray(s.hu[:, :, y0:y1, x0:x1]), affine=affine)
    qc = run_perfusion(cut, method="bsvd").maps.provenance["qc"]
    assert qc["fov_cut"]["flag"] and not qc["no_skull"]["flag"]
    assert not qc["no_head_outline"]["flag"] and qc["no_head_outline"]["value"] is None


@pytest.mark.parametrize("axis", [2, 3])
def test_a_study_stored_flipped_gives_the_same_maps_and_lesions(axis):
    """The same acquisition with its rows or columns stored in reverse order (a DICOM folder
    against a converter's NIfTI; the affine says so) gives the same maps and lesions, voxel for
    voxel, through the automatic AIF/VOF, brain mask and the lesion clean-up of `ctperf maps`
    (at 1.8 mm pixels its 2 mm median is a five-voxel cross)."""
    from dataclasses import replace

    subject = phantom.generate_subject(seed=3, size=128, slices=2, lesion=True)
    s = subject.series
    affine = s.affine.copy()
    column = 3 - axis  # (T, Z, Y, X) axis 2 is the affine's y column, axis 3 its x column
    affine[:3, 3] += affine[:3, column] * (s.hu.shape[axis] - 1)
    affine[:3, column] *= -1
    flipped = replace(s, hu=np.flip(s.hu, axis=axis).copy(), affine=affine)
    a = run_perfusion(s, method="nlr-fast", lesion_options=LesionOptions())
    b = run_perfusion(flipped, method="nlr-fast", lesion_options=LesionOptions())
    for name in ("cbf", "cbv", "tmax"):
        # the fits see the same curves; float32 sums in another order differ in the last bits
        np.testing.assert_allclose(np.flip(b.maps[name], axis - 1), a.maps[name],
                                   rtol=1e-4, atol=1e-4)
    for name in ("core", "hypoperfused", "penumbra"):
        np.testing.assert_array_equal(np.flip(getattr(b.lesions, name), axis - 1),
                                      getattr(a.lesions, name))
    assert a.lesions.volumes_ml["hypoperfused"] > 1.0


def test_a_head_that_moves_in_an_unregistered_study_is_flagged(subject):
    """A head that turns as the bolus arrives, mapped without registration, gave wrong core
    volumes with no flag (a probe's study: bSVD core 0 mL for a true 19). The skull's edges
    moving between frames now raise ``motion_unregistered``; a still head does not."""
    from scipy import ndimage

    still = run_perfusion(subject.series, method="bsvd").maps.provenance["qc"]
    assert not still["motion_unregistered"]["flag"]
    # noise alone: the still skull reads 0.00-0.01 px on ctperf's phantoms (64-256 px)
    assert still["motion_unregistered"]["value"] < 0.1
    hu = subject.series.hu.copy()
    for t in range(40, hu.shape[0]):  # 3 degrees and a pixel, from the bolus's arrival on
        for z in range(hu.shape[1]):
            turned = ndimage.rotate(hu[t, z], 3.0, reshape=False, order=1, mode="nearest")
            hu[t, z] = ndimage.shift(turned, (1.0, 0.5), order=1, mode="nearest")
    moved = run_perfusion(subject.series.replace(hu=hu), method="bsvd").maps.provenance["qc"]
    assert moved["motion_unregistered"]["flag"], moved["motion_unregistered"]


def test_a_drifting_baseline_is_flagged(subject):
    """Contrast only adds attenuation: a brain whose mean curve ends below its pre-bolus
    level drifts (a probe's -10 HU ramp read a core four times the truth, with no flag)."""
    s = subject.series
    plain = run_perfusion(s, method="bsvd").maps.provenance["qc"]["below_baseline"]
    assert not plain["flag"]
    ramp = np.linspace(0.0, -10.0, s.n_frames, dtype=np.float32)[:, None, None, None]
    drift = run_perfusion(s.replace(hu=s.hu + ramp), method="bsvd").maps.provenance["qc"]
    assert drift["below_baseline"]["flag"] and drift["below_baseline"]["value"] < -0.05


def test_a_haemorrhage_is_flagged_and_not_called_core(subject):
    """Tissue at 70 HU before the bolus, with no flow (a haemorrhage), was called core with no
    flag. It is now flagged ``hyperdense`` and left out of the lesions; the phantom's own
    brain has no such region."""
    s = subject.series
    plain = run_perfusion(s, method="bsvd", lesion_options=LesionOptions())
    assert not plain.maps.provenance["qc"]["hyperdense"]["flag"]
    brain = subject.masks["brain"] & ~subject.masks["vessels"]
    _, yy, xx = np.indices(brain.shape)
    cy, cx = np.argwhere(brain[0]).mean(axis=0)
    blob = brain & (np.hypot(yy - cy, xx - (cx + 8)) < 4.5)  # right hemisphere, ~4 mL
    hu = s.hu.copy()
    rng = np.random.default_rng(0)
    hu[:, blob] = 70.0 + 3.0 * rng.standard_normal((s.n_frames, int(blob.sum())))
    bled = run_perfusion(s.replace(hu=hu), method="bsvd", lesion_options=LesionOptions())
    flag = bled.maps.provenance["qc"]["hyperdense"]
    assert flag["flag"] and flag["value"] > 2.0, flag
    # its no-flow voxels are not core (partial volume at its rim aside)
    assert (bled.lesions.core & blob).sum() <= 0.1 * blob.sum()


def test_no_voxel_is_both_the_aif_and_the_vof():
    # This subject's automatic AIF holds an artery voxel whose noisy curve peaks 2 s after the
    # AIF's: it passed the VOF's timing rule and was averaged into the venous reference too.
    subject = phantom.generate_subject(seed=1576890651, size=64, slices=3, frames=40,
                                       frame_interval=1.0, lesion=True)
    prov = run_perfusion(subject.series, method="bsvd").maps.provenance
    aif = {tuple(v) for v in prov["aif"]["voxels_zyx"]}
    vof = {tuple(v) for v in prov["vof"]["voxels_zyx"]}
    assert vof and not aif & vof
    assert not subject.masks["artery"][tuple(np.array(sorted(vof)).T)].any()


def _gamma_variate(t: np.ndarray, start: float, peak: float, beta: float) -> np.ndarray:
    """A bolus of this test's own (gamma variate, shape 3, peak ``peak`` at start + 3 beta)."""
    x = np.clip(t - start, 0.0, None)
    return peak * (x / (3.0 * beta)) ** 3 * np.exp(3.0 - x / beta)


@pytest.mark.parametrize("earlier, raised", [
    ("none", False),
    ("angiogram", False),   # contrast at equilibrium, washing out over minutes
    ("test bolus", True),   # 30 % of the main bolus, 25 s before it
    ("test bolus 20 s", True),  # its venous peak within the baseline (review 3: missed)
])
def test_the_tail_of_an_earlier_bolus_in_the_vein_is_flagged(rng, earlier, raised):
    """A test bolus 25 s before the main one leaves its venous tail in the baseline frames: a
    probe's maps read the core +21 to +28 % (nlr-fast) with no flag where its VOF was used.
    The VOF's fall through the frames before the bolus says so; a CT angiogram's slow
    washout and a clean study do not."""
    from ctperf.perfusion.qc import qc_flags

    t = np.arange(0.0, 50.0)
    aif = _gamma_variate(t, 9.0, 400.0, 1.5)
    vof = _gamma_variate(t, 14.0, 420.0, 2.0)
    if earlier.startswith("test bolus"):
        before = 20.0 if earlier.endswith("20 s") else 25.0
        vof = vof + _gamma_variate(t, 14.0 - before, 0.3 * 420.0, 2.0)
    elif earlier == "angiogram":
        vof = vof + 30.0 * np.exp(-t / 180.0)
    vof = vof + rng.normal(0.0, 2.0, t.size)
    flags = qc_flags(times=t, aif=aif, venous=vof, baseline_frames=8)
    assert flags["earlier_bolus"]["flag"] is raised, flags["earlier_bolus"]
    assert flags["no_vof"]["value"] is None  # venous alone: not the VOF that scaled the AIF
    # a vein rising under half the AIF's peak is not judged
    weak = qc_flags(times=t, aif=aif, venous=0.4 * vof, baseline_frames=8)["earlier_bolus"]
    assert weak["value"] is None and not weak["flag"]


def test_noise_correlated_between_frames_is_no_earlier_bolus():
    """Overlapping reconstructions correlate neighbouring frames' noise: a review's weak
    sinus (peak 95 HU, 12 HU of noise, 0.5 s frames, 40 baseline frames) read an earlier bolus
    in 9 of 40 studies when the first frame was set against the three lowest baseline frames
    (a vein that weak is no longer judged); a sinus of 300 HU under that noise is not
    flagged."""
    from ctperf.perfusion.qc import qc_flags

    t = np.arange(0.0, 60.0, 0.5)
    aif = _gamma_variate(t, 20.0, 400.0, 1.5)
    raised = 0
    for seed in range(40):
        white = np.random.default_rng(seed).normal(0.0, 12.0 / np.sqrt(2.0), t.size + 1)
        vof = _gamma_variate(t, 25.0, 300.0, 2.0) + white[1:] + white[:-1]  # r = 0.5
        raised += qc_flags(times=t, aif=aif, venous=vof, baseline_frames=40)[
            "earlier_bolus"]["flag"]
    assert raised == 0


def test_an_earlier_bolus_is_flagged_through_the_maps(subject):
    """The same through run_perfusion: the vein's voxels carry a washout the arteries and the
    tissue do not (a bolus's venous tail), and the VOF's own fall is read whether or not
    it scaled the AIF."""
    t = subject.series.times - subject.series.times[0]
    tail = _gamma_variate(t, -12.0, 150.0, 2.0).astype(np.float32)
    hu = subject.series.hu + tail[:, None, None, None] * subject.masks["vein"][None]
    clean = run_perfusion(subject.series, method="nlr-fast").maps.provenance["qc"]
    late = run_perfusion(subject.series.replace(hu=hu), method="nlr-fast").maps.provenance["qc"]
    assert not clean["earlier_bolus"]["flag"] and late["earlier_bolus"]["flag"]
