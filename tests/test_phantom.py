"""Digital phantom: truth consistency, forward model, noise, motion, lesions, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.signal import fftconvolve
from scipy.special import gamma as gamma_function
from scipy.special import gammaincc

from ctperf.phantom import draw_parameters, generate_subject, simulate_subject
from ctperf.phantom import hemodynamics as hd
from ctperf.phantom.acquisition import MOTION_CLASSES, draw_motion, noise_sigma

# Tiny configurations: 64-96 pixels (3.6-2.4 mm), 2-4 slices, a few dozen frames.
TINY = {"size": 64, "slices": 2, "frames": 40, "anatomy": "procedural"}


def _naive_aif(t, a):
    """The arterial input by brute force on a uniform grid ``t`` (1 ms): gamma variates convolved
    numerically with the rectangular injection, the recirculation holding ``recirculation``
    times the first pass's area, scaled to the first pass's peak."""
    dt = t[1] - t[0]
    box = np.ones(round(a["injection_s"] / dt))

    def injected(t0, beta):
        x = np.clip((t - t0) / beta, 0, None)
        g = x ** a["alpha"] * np.exp(-x) * dt / (beta * gamma_function(a["alpha"] + 1))  # area 1
        return fftconvolve(g, box)[: t.size]

    first = injected(a["t0"], a["beta"])
    second = injected(a["t0"] + a["recirc_delay"], 2 * a["beta"])
    return a["peak"] * (first + a["recirculation"] * second) / first.max()


@pytest.fixture(scope="module")
def box_subject():
    """Noise-free, unblurred, box-residue subject with a lesion and a 400 HU AIF."""
    return generate_subject(seed=11, residues=("box",), lesion=True, noise=False,
                            psf_fwhm_mm=0.0, aif_peak=400.0, **TINY)


@pytest.fixture(scope="module")
def healthy_subject():
    return generate_subject(seed=5, size=96, slices=2, frames=60, anatomy="procedural",
                            lesion=False, noise=False, aif_peak=400.0)


def test_truth_is_self_consistent(box_subject):
    t, m, x = box_subject.truth, box_subject.masks, box_subject.extras
    brain = m["brain"]
    assert brain.sum() > 500
    # float32 storage of maps: relative rounding ~1e-7, so 1e-5 is generous
    np.testing.assert_allclose(t["cbv"][brain], t["cbf"][brain] * t["mtt"][brain] / 60,
                               rtol=1e-5)
    # Tmax = delay + the time the dispersed residue peaks, which a box reaches at most at MTT
    # (one fine step, 0.05 s, of rounding allowed)
    lag = t["tmax"][brain] - t["delay"][brain]
    assert lag.min() >= 0 and np.all(lag <= t["mtt"][brain] + 0.05 + 1e-4)
    core = brain & (t["cbf"] < 0.3 * x["cbf_healthy"])
    np.testing.assert_array_equal(m["core"], core)
    np.testing.assert_array_equal(m["penumbra"], brain & (t["tmax"] > 6) & ~core)
    assert m["core"].any() and m["penumbra"].any()
    for name in t.names:
        assert np.all(t[name][~brain] == 0)
    assert np.all(m["territories"][brain] >= 1) and np.all(m["territories"][brain] <= 6)
    assert box_subject.params["rho"] == 1.04
    assert t.provenance["constants"]["kH"] == pytest.approx(0.55 / 0.75)


def test_box_subject_reproduces_analytic_box_curve(box_subject):
    s = box_subject
    clean = s.masks["brain"] & (s.extras["vessel_fraction"] == 0)
    z, y, x = np.nonzero(clean)
    pick = np.random.default_rng(0).choice(z.size, 40, replace=False)
    # naive reference on a 1 ms grid: AIF, explicit exponential dispersion, running integral
    dt = 1e-3
    grid = np.arange(0, s.series.times[-1] + 1, dt)
    ca = _naive_aif(grid, s.params["aif"])
    enh = s.series.hu - s.baseline[None]
    k = s.params["rho"] / s.params["kh"] / 6000
    for i in pick:
        v = (z[i], y[i], x[i])
        tau = float(s.extras["dispersion"][v])
        kernel = np.exp(-grid / tau) / tau * dt if tau > 0 else (grid == 0).astype(float)
        dispersed = fftconvolve(ca, kernel)[:grid.size]
        area = np.cumsum(dispersed) * dt
        d, mtt, cbf = (float(s.truth[n][v]) for n in ("delay", "mtt", "cbf"))
        t = s.series.times
        ref = k * cbf * (np.interp(t - d, grid, area, left=0)
                         - np.interp(t - d - mtt, grid, area, left=0))
        # the 1 ms left-Riemann reference and the 0.05 s simulation grid agree to ~0.3 % of
        # the peak (measured); 1 % + 0.02 HU leaves room for float32 and the dispersion kernel
        assert np.max(np.abs(enh[(slice(None), *v)] - ref)) < 0.01 * ref.max() + 0.02


def _residue(kind, t, mtt, shape):
    """R(t) written out here, independently of the phantom's code."""
    if kind == "box":
        return (t < mtt).astype(float)
    if kind == "exponential":
        return np.exp(-t / mtt)
    return gammaincc(shape, shape * t / mtt)  # survival of a gamma transit-time density


def _dispersed_residue(kind, t, mtt, tau, shape):
    """(h * R) on the uniform grid t (from 0) with h the exponential kernel of mean tau, as exact
    bin masses (so the plateau level is right to rounding, not to dt / tau)."""
    dt = t[1] - t[0]
    r = _residue(kind, t, mtt, shape)
    if tau == 0:
        return r
    cdf = 1 - np.exp(-np.r_[t, t[-1] + dt] / tau)
    return fftconvolve(np.diff(cdf), r)[: t.size]


@pytest.fixture(scope="module", params=["box", "exponential", "gamma"])
def shaped_subject(request):
    """Noise-free, unblurred lesion subject of one residue shape (a lesion spreads delay,
    dispersion and MTT widely)."""
    return generate_subject(seed=23, residues=(request.param,), lesion=True, noise=False,
                            psf_fwhm_mm=0.0, **TINY)


def _pick_voxels(s, n_per_territory=4):
    """Vessel-free brain voxels from every territory, plus the earliest and latest arrivals."""
    clean = s.masks["brain"] & (s.extras["vessel_fraction"] == 0)
    rng = np.random.default_rng(1)
    picks = []
    for label in range(1, 7):
        idx = np.flatnonzero(clean & (s.masks["territories"] == label))
        picks += list(rng.choice(idx, min(n_per_territory, idx.size), replace=False))
    delay = np.where(clean, s.truth["delay"], np.nan)
    picks += [int(np.nanargmin(delay)), int(np.nanargmax(delay))]
    return [np.unravel_index(i, clean.shape) for i in picks]


def test_tissue_curves_match_independent_convolution(shaped_subject):
    """Every territory follows the subject's one residue shape (a shape switching at a
    territory border would fail here), early (negative-delay) voxels included."""
    s = shaped_subject
    phys = s.params["physiology"]
    kind, shape = phys["residue"], phys["gamma_shape"]
    assert len({*s.masks["territories"][s.masks["brain"]].ravel()}) == 6
    dt = 1e-3
    grid = np.arange(0, s.series.times[-1] + 2, dt)
    ca = _naive_aif(grid, s.params["aif"])
    enh = s.series.hu - s.baseline[None]
    k = s.params["rho"] / s.params["kh"] / 6000
    voxels = _pick_voxels(s)
    assert min(float(s.truth["delay"][v]) for v in voxels) < 0  # early arrival is exercised
    for v in voxels:
        d, mtt, cbf = (float(s.truth[n][v]) for n in ("delay", "mtt", "cbf"))
        kernel = _dispersed_residue(kind, grid, mtt, float(s.extras["dispersion"][v]), shape)
        tissue = fftconvolve(ca, kernel)[: grid.size] * dt
        ref = k * cbf * np.interp(s.series.times - d, grid, tissue, left=0)
        # 1 ms rectangle-rule reference against the 0.05 s simulation grid and the bank's MTT
        # interpolation: measured <= 0.15 % of the peak; 0.5 % + 0.02 HU leaves room for
        # float32, while another residue shape of the same MTT is off by >= 2.5 % (measured)
        assert np.max(np.abs(enh[(slice(None), *v)] - ref)) < 0.005 * ref.max() + 0.02, v


def test_truth_tmax_is_the_first_peak_of_the_dispersed_residue(shaped_subject):
    """Tmax = delay + first time (h * R) reaches its maximum (within 1e-3 of it, which makes
    the first time well posed on a box's plateau), computed here on a 1 ms grid."""
    s = shaped_subject
    phys = s.params["physiology"]
    kind, shape = phys["residue"], phys["gamma_shape"]
    grid = np.arange(0, 40, 1e-3)
    lags, refs = [], []
    for v in _pick_voxels(s, n_per_territory=6):
        mtt, tau = float(s.truth["mtt"][v]), float(s.extras["dispersion"][v])
        e = _dispersed_residue(kind, grid, mtt, tau, shape)
        refs.append(grid[np.argmax(e >= (1 - 1e-3) * e.max())])
        lags.append(float(s.truth["tmax"][v] - s.truth["delay"][v]))
    # the phantom reads the peak on its 0.05 s grid (+-0.025 s) at MTT rounded to 0.5 %
    # (<= 0.03 s at these peak times); 0.07 s covers both and float32
    np.testing.assert_allclose(lags, refs, atol=0.07)
    assert np.ptp(refs) > 0.5  # the voxels span a range of peak times, not one value


def test_truth_tmax_known_cases():
    # exponential residue, MTT 10 s, dispersion 1.5 s: (h * R) peaks at
    # tau MTT ln(MTT / tau) / (MTT - tau) = 3.35 s; the 1e-3 flat tolerance stops ~0.15 s early
    lag = hd.residue_peak_time("exponential", mtt=np.array([10.0]), tau=np.array([1.5]),
                               dt=0.05)
    assert 3.1 <= lag[0] <= 3.35
    # undispersed box: flat from 0, so Tmax = delay; dispersed box: the plateau is reached
    # (to 1e-3) at tau ln(1000) = 6.9 tau, or at MTT if that comes first
    box = hd.residue_peak_time("box", mtt=np.array([4.0, 4.0, 4.0]),
                               tau=np.array([0.0, 0.3, 1.0]), dt=0.05)
    np.testing.assert_allclose(box, [0.0, 0.3 * np.log(1000), 4.0], atol=0.06)


def _fwhm(t, y):
    above = np.flatnonzero(y >= y.max() / 2)
    return t[above[-1]] - t[above[0]]


def test_aif_closed_form_matches_numerical_convolution():
    t = np.arange(0, 90, 1e-3)
    for a in ({"peak": 400.0, "t0": 4.0, "alpha": 3.0, "beta": 1.5, "injection_s": 8.0,
               "recirculation": 0.25, "recirc_delay": 11.0},
              {"peak": 300.0, "t0": 11.0, "alpha": 2.0, "beta": 2.5, "injection_s": 12.0,
               "recirculation": 0.0, "recirc_delay": 14.0}):
        # a 1 ms rectangle-rule convolution is within ~0.1 % of the exact integral
        np.testing.assert_allclose(hd.aif_curve(t, **a), _naive_aif(t, a), atol=0.005 * 400)


def test_aif_first_pass_is_as_wide_as_the_injection():
    """40-50 mL at 4-6 mL/s lasts 7-12 s, so real first passes are rarely narrower than 8 s."""
    t = np.arange(0, 90, 1e-2)
    widths = []
    for seed in range(50):
        a = draw_parameters(seed=seed, **TINY)["aif"]
        assert 40 / 6 <= a["injection_s"] <= 50 / 4
        widths.append(_fwhm(t, _naive_aif(t, {**a, "recirculation": 0.0})))
    # measured over these 50 seeds: median 10.2 s, 10th percentile 8.6 s, minimum 7.9 s; the
    # bounds are the physiological claim ("rarely under 8 s") with margin for a new draw
    assert np.median(widths) >= 8.0
    assert np.percentile(widths, 10) >= 6.5
    assert min(widths) >= 5.0


@pytest.fixture(scope="module")
def healthy_cohort():
    return [generate_subject(seed=seed, lesion=False, noise=False, psf_fwhm_mm=0.0,
                             **{**TINY, "frames": 12}) for seed in range(6)]


def test_healthy_truth_is_left_right_symmetric(healthy_cohort):
    ratios, tmax_gap = [], []
    for s in healthy_cohort:
        terr, t = s.masks["territories"], s.truth
        gm = s.masks["gm"] & (s.extras["severity"] == 0)  # benign oligaemia left out
        right, left = gm & (terr >= 1) & (terr <= 3), gm & (terr >= 4)
        ratios.append(t["cbf"][right].mean() / t["cbf"][left].mean())
        tmax_gap.append(np.median(t["tmax"][right]) - np.median(t["tmax"][left]))
    # smooth fields are mirror-symmetric; what remains is the anatomy under a random pose and
    # the fine texture, which at 3.6 mm pixels move a hemisphere's mean by a few % (measured
    # 0.98-1.02 per subject here; 0.92-1.06 when the smooth fields were not symmetric)
    assert 0.95 <= np.median(ratios) <= 1.05
    assert all(0.9 <= r <= 1.1 for r in ratios), ratios
    # measured gaps <= 0.2 s; healthy Tmax spans ~2 s, so one side 0.5 s later would be a
    # real asymmetry
    assert np.max(np.abs(tmax_gap)) < 0.5


def test_healthy_delays_include_small_negative_values(healthy_cohort):
    early = []
    for s in healthy_cohort:
        delay = s.truth["delay"][s.masks["brain"]]
        # tissue may be reached up to 1 s before the AIF's artery (one 0.05 s step of rounding)
        assert delay.min() >= -1.0 - 0.025
        assert np.percentile(delay, 99) <= 2.5  # healthy arrival stays early
        early.append((delay < 0).mean())
    assert sum(f > 0 for f in early) >= len(early) // 2  # in most subjects, not a rarity


def test_parameters_are_drawn_first_then_simulated():
    opts = {"seed": 3, "size": 48, "slices": 1, "frames": 12, "anatomy": "procedural",
            "motion": "mild", "lesion": True}
    params = draw_parameters(**opts)
    again = json.loads(json.dumps(params))  # JSON-able, and what params.json holds
    a, b = simulate_subject(again), generate_subject(**opts)
    np.testing.assert_array_equal(a.series.hu, b.series.hu)
    for name in a.truth.names:
        np.testing.assert_array_equal(a.truth[name], b.truth[name])
    assert a.params == b.params
    assert {k: b.params[k] for k in params} == again


@pytest.mark.parametrize("kind", ["exponential", "gamma"])
def test_curve_bank_matches_naive_convolution(kind, rng):
    dt, step, n_frames = 0.05, 10, 60
    # the AIF beyond the last frame feeds voxels reached before the AIF's artery
    fine = np.arange((n_frames - 1) * step + 1 + int(-hd.DELAY_MIN / dt) + step) * dt
    spec = {"peak": 400.0, "t0": 4.0, "alpha": 3.0, "beta": 1.5, "injection_s": 8.0,
            "recirculation": 0.2, "recirc_delay": 12.0}
    bank = hd.CurveBank.build(hd.aif_curve(fine, **spec), dt=dt, step=step, n_frames=n_frames,
                              kinds=(kind,), gamma_shape=3.0)
    n = 6
    cbf, mtt = rng.uniform(20, 70, n), rng.uniform(2, 15, n)
    d_steps = bank.quantize_delay(np.r_[-1.0, rng.uniform(-1, 8, n - 1)])
    t_idx = bank.quantize_tau(rng.uniform(0, 3, n))
    got = bank.enhancement(kind, cbf=cbf, mtt=mtt, delay_steps=d_steps, tau_index=t_idx)
    g = np.arange(0, 40, 1e-3)
    ca = _naive_aif(g, spec)
    times = np.arange(n_frames) * dt * step
    for i in range(n):
        tau = bank.taus[t_idx[i]]
        ker = np.exp(-g / tau) / tau * 1e-3 if tau > 0 else (g == 0).astype(float)
        f = fftconvolve(ca, ker)[:g.size]
        c = fftconvolve(f, hd.residue(kind, g, mtt[i], shape=3.0))[:g.size] * 1e-3
        ref = hd.RHO / hd.KH * cbf[i] / 6000 * np.interp(times - d_steps[i] * dt, g, c, left=0)
        # MTT interpolation in the bank (< 0.1 %) plus the 1 ms reference's own error
        assert np.max(np.abs(got[i] - ref)) < 0.01 * ref.max() + 0.02


def test_same_seed_gives_identical_output():
    opts = {"size": 48, "slices": 1, "frames": 12, "anatomy": "procedural", "motion": "mild"}
    a = generate_subject(seed=3, **opts)
    b = generate_subject(seed=3, **opts)
    c = generate_subject(seed=4, **opts)
    np.testing.assert_array_equal(a.series.hu, b.series.hu)
    np.testing.assert_array_equal(a.truth["cbf"], b.truth["cbf"])
    np.testing.assert_array_equal(a.motion, b.motion)
    assert a.params == b.params
    assert not np.array_equal(a.series.hu, c.series.hu)


@pytest.mark.parametrize("mas", [150.0, 40.0])
def test_noise_sigma_matches_request(mas):
    s = generate_subject(seed=8, size=256, slices=1, frames=8, anatomy="procedural", mas=mas)
    air = s.baseline[0] < -999.0  # outside the head: noise only
    assert air.sum() > 2000
    samples = s.series.hu[:, 0][:, air] - s.baseline[0][air]
    measured = samples.std()
    # > 100 000 correlated samples: the estimate's own scatter is ~1 %; the issue asks for 10 %
    assert measured == pytest.approx(noise_sigma(mas), rel=0.10)
    frame = s.series.hu[3, 0] - s.baseline[0]
    inner = air & np.roll(air, 1, axis=1)
    r = np.corrcoef(frame[inner], np.roll(frame, 1, axis=1)[inner])[0, 1]
    # spatially correlated: the 1.2 mm FWHM kernel at 0.9 mm pixels gives r ~ 0.4; white
    # noise would give |r| < 0.02 with this many pixels
    assert r > 0.15


def test_motion_parameters_recover_the_applied_displacement():
    sitk = pytest.importorskip("SimpleITK")
    opts = {"seed": 21, "size": 96, "slices": 4, "frames": 24, "anatomy": "procedural",
            "noise": False, "psf_fwhm_mm": 0.0}
    still = generate_subject(motion="none", **opts)
    moved = generate_subject(motion="severe", **opts)
    assert np.abs(moved.motion).max() > 1.0  # a real displacement, not a trivial pass
    assert np.all(still.motion == 0)
    aff = still.series.affine
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    from scipy.spatial.transform import Rotation

    checked = 0
    for t in (8, 16, 23):
        img = sitk.GetImageFromArray(still.series.hu[t].astype(np.float64))  # (z, y, x)
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(aff[:3, 3].tolist())
        img.SetDirection((aff[:3, :3] / spacing).ravel().tolist())
        rot = Rotation.from_euler("xyz", moved.motion[t, :3], degrees=True).as_matrix()
        shift = moved.motion[t, 3:]
        tr = sitk.AffineTransform(3)  # output point y samples the input at R^T (y - s)
        tr.SetMatrix(rot.T.ravel().tolist())
        tr.SetTranslation((-rot.T @ shift).tolist())
        out = sitk.GetArrayFromImage(sitk.Resample(img, img, tr, sitk.sitkLinear, -5000.0))
        inside = out > -4000
        inside[[0, -1]] = False  # edge slices: the phantom repeats them, SimpleITK does not
        assert inside.sum() > 0.5 * inside[1:-1].size
        diff = np.abs(out - moved.series.hu[t])[inside]
        # same trilinear interpolation on the same grid: differences are float rounding only
        # (a wrong sign, order or centre gives hundreds of HU at the skull)
        assert np.percentile(diff, 99) < 0.5
        checked += 1
    assert checked == 3


def test_realistic_motion_proportions():
    rng = np.random.default_rng(2)
    times = np.arange(20) * 0.5
    cats = [draw_motion(rng, "realistic", times)[0] for _ in range(3000)]
    total = sum(MOTION_CLASSES.values())
    for name, p in MOTION_CLASSES.items():
        # binomial SD for 3000 draws is <= 0.009; allow 4 SD
        assert cats.count(name) / len(cats) == pytest.approx(p / total, abs=0.036)


def test_lesion_volumes_equal_mask_volumes(box_subject):
    s = box_subject
    voxel_ml = abs(np.linalg.det(s.series.affine[:3, :3])) / 1000
    vol = s.params["volumes_ml"]
    assert vol["core"] == pytest.approx(s.masks["core"].sum() * voxel_ml)
    assert vol["penumbra"] == pytest.approx(s.masks["penumbra"].sum() * voxel_ml)
    assert vol["hypoperfused"] == pytest.approx(
        ((s.truth["tmax"] > 6) & s.masks["brain"]).sum() * voxel_ml)


def test_lesion_is_invisible_at_baseline_and_lesion_free_has_none():
    opts = {"seed": 13, "noise": False, **TINY}
    sick = generate_subject(lesion=True, **opts)
    well = generate_subject(lesion=False, **opts)
    assert sick.masks["core"].any() or sick.masks["penumbra"].any()
    assert not well.masks["core"].any()
    assert not well.masks["penumbra"].any()  # healthy Tmax stays below 6 s (benign oligaemia too)
    np.testing.assert_array_equal(sick.baseline, well.baseline)
    first = sick.params["aif"]["t0"]
    before = sick.series.times < first  # before the bolus reaches the arteries
    np.testing.assert_array_equal(sick.series.hu[before], well.series.hu[before])


def test_gm_peak_enhancement_for_400_hu_aif():
    peaks = []
    for seed in (5, 6, 7):  # residue shapes and GM perfusion drawn per subject
        s = generate_subject(seed=seed, size=128, slices=1, frames=60, anatomy="procedural",
                             lesion=False, noise=False, aif_peak=400.0)
        assert s.aif.max() == pytest.approx(400, rel=0.05)  # recirculation comes later
        pure = s.masks["gm"] & (s.extras["gm_fraction"] >= 0.9)
        assert pure.sum() > 100
        peaks.append((s.series.hu[:, pure] - s.baseline[pure]).max(axis=0))
    # published 80 kV studies: GM ~20 HU for a 400 HU AIF; 15-35 HU is the accepted band
    assert 15 <= np.median(np.concatenate(peaks)) <= 35


def test_arteries_partial_volume_and_veins_free_of_it(healthy_subject):
    s = healthy_subject
    art, vein = s.masks["artery"], s.masks["vein"]
    assert art.any() and vein.any()
    ratio = (s.series.hu[:, art] - s.baseline[art]).max(axis=0) / s.aif.max()
    # arterial voxels carry 0.4-0.9 of the AIF; tissue around them adds at most a few HU
    assert np.all(ratio > 0.38) and np.all(ratio < 0.95)
    vpeak = (s.series.hu[:, vein] - s.baseline[vein]).max(axis=0)
    # vein voxels are >= 95 % blood; tissue fraction adds < 1 HU
    assert np.median(vpeak) == pytest.approx(s.vof.max(), rel=0.06)
    long = np.zeros(4000)
    long[: s.aif_fine.size] = s.aif_fine
    dt = s.params["fine_dt"]
    vof_long = hd.vof_curve(long, dt, transit_mean=s.params["aif"]["vof_transit_mean"])
    # unit-area transit kernel: the VOF's area equals the AIF's (to the kernel's discretisation)
    assert vof_long.sum() == pytest.approx(long.sum(), rel=1e-3)


def test_healthy_fields_are_never_constant(healthy_subject):
    s = healthy_subject
    pure_gm = s.masks["gm"]
    for name in ("cbf", "cbv", "delay"):
        vals = s.truth[name][pure_gm]
        assert vals.std() > 0.03 * abs(vals.mean())


def test_bad_configuration_is_rejected():
    from ctperf.errors import ValidationError

    with pytest.raises(ValidationError, match="motion"):
        generate_subject(seed=1, motion="wild", **TINY)
    with pytest.raises(ValidationError, match="residues"):
        generate_subject(seed=1, residues=("linear",), **TINY)
    with pytest.raises(ValidationError, match="size"):
        generate_subject(seed=1, size=8)


def test_default_anatomy_does_not_depend_on_what_is_installed():
    # A seed must give the same subject on every machine: the MNI head only when asked for,
    # whether or not nilearn is there to provide it.
    s = generate_subject(seed=4, size=48, slices=1, frames=8, noise=False)
    assert s.params["config"]["anatomy"] == "procedural"
    assert s.params["template"] == "procedural" and s.params["template_notice"] is None


def test_mni_anatomy_when_nilearn_is_installed():
    pytest.importorskip("nilearn")
    s = generate_subject(seed=4, size=96, slices=2, frames=10, anatomy="mni", noise=False)
    assert s.params["template"] == "mni" and "McGill" in s.params["template_notice"]
    m = s.masks
    assert m["gm"].sum() > 200 and m["wm"].sum() > 200 and m["csf"].any()
    # 80 kV baseline: GM (35-40 HU) above WM (26-30 HU) above CSF, skull far above all;
    # nearly pure voxels only, since 2.4 mm pixels mix GM and WM (drawn gap >= 5 HU, the blur
    # and residual mixing take up to ~2 HU of it)
    gm = s.baseline[m["gm"] & (s.extras["gm_fraction"] > 0.85)].mean()
    wm = s.baseline[m["wm"] & (s.extras["wm_fraction"] > 0.85)].mean()
    csf = np.median(s.baseline[m["csf"]])  # median: CSF voxels next to bone catch its blur
    assert gm > wm + 2 and wm > csf + 5
    assert s.baseline.max() > 700


@pytest.mark.slow
def test_full_size_subject_looks_like_a_ctp_study():
    s = generate_subject(seed=42, lesion=True)  # 512 x 512 x 8 x 89, 150 mAs
    assert s.series.shape == (89, 8, 512, 512)
    assert s.series.spacing == pytest.approx((5.0, 230 / 512, 230 / 512))
    m = s.masks
    assert m["artery"].sum() > 50 and m["vein"].sum() > 50
    pv = s.extras["artery_pv"][m["artery"]]
    assert pv.min() >= 0.4 and pv.max() <= 0.9 + 1e-6
    air = s.baseline < -999
    noise = (s.series.hu[:, air] - s.baseline[air]).std()
    assert noise == pytest.approx(noise_sigma(150.0), rel=0.10)  # the 10 %
    # arteries peak before the sinuses, as the VOF is the AIF through a 6-9 s transit
    art = (s.series.hu[:, m["artery"]] - s.baseline[m["artery"]]).mean(axis=1)
    vein = (s.series.hu[:, m["vein"]] - s.baseline[m["vein"]]).mean(axis=1)
    assert np.argmax(art) < np.argmax(vein)
    # skull bright, CSF dark, GM above WM at baseline (noise-free image)
    assert np.median(s.baseline[s.baseline > 300]) > 700
    gm = s.baseline[m["gm"] & (s.extras["gm_fraction"] > 0.9)].mean()
    wm = s.baseline[m["wm"] & (s.extras["wm_fraction"] > 0.9)].mean()
    assert gm > wm + 3 > np.median(s.baseline[m["csf"]]) + 3


def test_vof_scaling_recovers_the_true_aif_area():
    # a long study (60 s) so that the venous curve is nearly back to baseline at the end
    s = generate_subject(seed=17, size=128, slices=2, frames=121, anatomy="procedural",
                         lesion=False, noise=False)
    art, vein = s.masks["artery"], s.masks["vein"]
    measured_aif = (s.series.hu[:, art] - s.baseline[art]).mean(axis=1)
    measured_vof = (s.series.hu[:, vein] - s.baseline[vein]).mean(axis=1)
    assert measured_aif.max() < 0.95 * s.aif.max()  # partial volume: the measured AIF is low
    scaled = measured_aif * np.trapezoid(measured_vof, s.series.times) / np.trapezoid(
        measured_aif, s.series.times)
    # vein voxels are >= 95 % blood and the VOF tail beyond 60 s holds a few % of its area
    assert np.trapezoid(scaled, s.series.times) == pytest.approx(
        np.trapezoid(s.aif, s.series.times), rel=0.10)


def test_averaged_noise_matches_block_means_of_native_noise(rng):
    from ctperf.phantom.acquisition import averaged_noise_sigma, psf_sigma_px, smooth_noise

    native_mm, psf_mm, sigma = 230.0 / 512, 1.2, 8.4
    noise = sigma * smooth_noise(rng, (8, 512, 512), sigma_px=psf_sigma_px(psf_mm, native_mm))
    for factor in (2, 4, 8):
        blocks = noise.reshape(8, 512 // factor, factor, 512 // factor, factor).mean(axis=(2, 4))
        expected = averaged_noise_sigma(sigma, native_pixel_mm=native_mm,
                                        pixel_mm=native_mm * factor, psf_fwhm_mm=psf_mm)
        # >= 32,000 block means: the SD estimate scatters by < 1 %; 3 % leaves room for the
        # blocks' correlation at factor 2
        assert blocks.std() == pytest.approx(expected, rel=0.03)
    # correlated noise averages down more slowly than white noise (sigma / factor)
    assert averaged_noise_sigma(sigma, native_pixel_mm=native_mm, pixel_mm=8 * native_mm,
                                psf_fwhm_mm=psf_mm) > 2 * sigma / 8
    assert averaged_noise_sigma(sigma, native_pixel_mm=native_mm, pixel_mm=native_mm / 2,
                                psf_fwhm_mm=psf_mm) == sigma


def test_noise_matrix_gives_a_coarse_phantom_the_native_image_noise():
    from ctperf.errors import ValidationError
    from ctperf.phantom.acquisition import averaged_noise_sigma

    opts = {"seed": 8, "size": 64, "slices": 1, "frames": 8, "anatomy": "procedural"}
    own = generate_subject(**opts)
    native = generate_subject(**opts, noise_matrix=512)
    expected = averaged_noise_sigma(noise_sigma(150.0), native_pixel_mm=230.0 / 512,
                                    pixel_mm=230.0 / 64, psf_fwhm_mm=1.2)
    assert native.params["noise_sigma_hu"] == pytest.approx(expected)
    assert 3.0 < expected < 4.5  # a 3.6 mm pixel averages 64 correlated native pixels
    air = own.baseline[0] < -999.0
    for subject, sigma in ((own, noise_sigma(150.0)), (native, expected)):
        measured = (subject.series.hu[:, 0][:, air] - subject.baseline[0][air]).std()
        # ~ 8 frames x 1,000 air pixels: the SD estimate scatters by ~1 %
        assert measured == pytest.approx(sigma, rel=0.08)
    # only the noise differs: the truth is the same subject's
    np.testing.assert_array_equal(own.truth["cbf"], native.truth["cbf"])
    with pytest.raises(ValidationError, match="noise_matrix"):
        generate_subject(**opts, noise_matrix=8)


def test_dose_and_sampling_change_the_noise_not_the_truth():
    opts = {"seed": 5, "size": 48, "slices": 1, "anatomy": "procedural", "lesion": True}
    a = generate_subject(**opts, mas=150.0, frames=89, frame_interval=0.5)
    b = generate_subject(**opts, mas=75.0, frames=45, frame_interval=1.0)
    for name in ("cbf", "cbv", "mtt", "delay", "tmax"):
        np.testing.assert_array_equal(a.truth[name], b.truth[name])
    assert b.params["noise_sigma_hu"] == pytest.approx(a.params["noise_sigma_hu"] * np.sqrt(2))


def test_the_artery_mask_is_never_empty():
    """Subject 11 of the default 64 px, 4-slice cohort (docs/reproduce.md's quick start) has no
    voxel of arterial share >= 0.4: its artery mask was empty, and `ctperf reproduce`, which
    gives that mask where the automatic AIF search finds none, stopped at its second step.
    The mask now keeps the voxels nearest the largest share."""
    from ctperf.workflow.phantoms import subject_seed

    subject = generate_subject(seed=subject_seed(0, 11), size=64, slices=4)
    share = subject.extras["artery_pv"]
    assert share.max() < 0.4                    # the case the threshold alone left empty
    artery = subject.masks["artery"]
    assert artery.any() and np.all(share[artery] >= 0.8 * share.max())
