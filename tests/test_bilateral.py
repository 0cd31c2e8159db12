"""Joint bilateral filter: fast grid method against brute force, noise and edge width."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctperf.errors import ValidationError
from ctperf.preprocess.bilateral import bilateral_filter, joint_bilateral
from ctperf.types import CTPSeries


def brute_force(image: np.ndarray, guide: np.ndarray, spacing, sigma_mm: float,
                sigma_hu: float, truncate: float = 4.0) -> np.ndarray:
    """Direct joint bilateral sum over every neighbour within ``truncate`` spatial sigmas."""
    radius = [int(np.ceil(truncate * sigma_mm / s)) for s in spacing]
    num = np.zeros(image.shape)
    den = np.zeros(image.shape)
    nz, ny, nx = image.shape
    for oz in range(-radius[0], radius[0] + 1):
        for oy in range(-radius[1], radius[1] + 1):
            for ox in range(-radius[2], radius[2] + 1):
                d2 = (oz * spacing[0]) ** 2 + (oy * spacing[1]) ** 2 + (ox * spacing[2]) ** 2
                ws = np.exp(-0.5 * d2 / sigma_mm**2)
                if ws < np.exp(-0.5 * truncate**2):
                    continue
                # p = (z, y, x) over the region where q = p + offset exists
                pz = slice(max(0, -oz), min(nz, nz - oz))
                py = slice(max(0, -oy), min(ny, ny - oy))
                px = slice(max(0, -ox), min(nx, nx - ox))
                qz = slice(pz.start + oz, pz.stop + oz)
                qy = slice(py.start + oy, py.stop + oy)
                qx = slice(px.start + ox, px.stop + ox)
                w = ws * np.exp(-0.5 * ((guide[pz, py, px] - guide[qz, qy, qx]) / sigma_hu) ** 2)
                num[pz, py, px] += w * image[qz, qy, qx]
                den[pz, py, px] += w
    return (num / den).astype(np.float32)


def head_slab(rng: np.random.Generator, shape=(4, 48, 48), spacing=(5.0, 0.9, 0.9), *,
              artery: bool = False):
    """A guide (mean of ~89 frames) and one noisy frame at peak enhancement.

    Brain (grey half 35 HU, white half 27 HU, a CSF disc 8 HU) inside a 6 mm skull (1200 HU), a
    2 mm scalp (40 HU) and air (-1000 HU), all blurred by a 0.63 mm point spread; at peak the
    frame has +20 HU in grey and +8 HU in white matter and, optionally, +400 HU in a 3 mm artery,
    the guide a quarter of that; noise 10 HU per frame, 1 HU in the guide.
    """
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx] * spacing[1]
    cy, cx = yy.mean(), xx.mean()
    r = np.hypot(yy - cy, xx - cx)
    plane = np.select([r < 12, r < 18, r < 20], [35.0, 1200.0, 40.0], -1000.0)
    plane[(r < 12) & (xx < cx)] = 27.0  # white matter half
    plane[np.hypot(yy - cy, xx - cx - 5) < 3] = 8.0  # CSF
    peak = 20.0 * (plane == 35.0) + 8.0 * (plane == 27.0)
    if artery:
        peak[np.hypot(yy - cy + 6, xx - cx + 3) < 1.5] = 400.0
    psf = (0, 0.63 / spacing[1], 0.63 / spacing[2])
    truth, peak = (ndimage.gaussian_filter(np.repeat(a[None], nz, axis=0), psf)
                   for a in (plane, peak))
    frame = truth + peak + 10.0 * rng.standard_normal(shape)
    guide = truth + 0.25 * peak + 1.0 * rng.standard_normal(shape)
    return truth.astype(np.float32), frame.astype(np.float32), guide.astype(np.float32)


def brain_mask(shape, spacing) -> np.ndarray:
    """Voxels of head_slab's brain at least 1 mm inside the skull."""
    yy, xx = np.mgrid[:shape[1], :shape[2]] * spacing[1]
    return np.broadcast_to(np.hypot(yy - yy.mean(), xx - xx.mean()) < 11, shape)


def test_matches_brute_force_coarse_voxels(rng):
    """0.9 mm voxels: sigma is 3.3 voxels, so the grid is not down-sampled in plane."""
    spacing = (5.0, 0.9, 0.9)
    _, frame, guide = head_slab(rng, spacing=spacing, artery=True)
    ref = brute_force(frame, guide, spacing, 3.0, 20.0)
    err = np.abs(joint_bilateral(frame[None], guide, spacing=spacing)[0] - ref)
    # issue 5: max |fast - brute force| < 0.5 HU over the whole volume (air, skull, scalp,
    # brain, artery); over four noise draws the max was 0.30-0.33 HU, at the artery's edge
    assert err.max() < 0.5, err.max()


def test_matches_brute_force_thin_voxels(rng):
    """0.45 mm voxels, as acquired: the default grid is down-sampled 3x in plane."""
    spacing = (5.0, 0.45, 0.45)
    shape = (3, 96, 96)
    _, frame, guide = head_slab(rng, shape=shape, spacing=spacing)
    ref = brute_force(frame, guide, spacing, 3.0, 20.0)
    err = np.abs(joint_bilateral(frame[None], guide, spacing=spacing)[0] - ref)
    # issue 5's bound over the whole volume: over six noise draws the max was 0.40-0.53 HU (at
    # partial-volume voxels of the scalp/air and skull edges), around 0.5, so the whole-volume
    # bound is 0.6 HU for other draws; over the brain 0.23-0.31 HU, held to 0.5.
    assert err.max() < 0.6, err.max()
    assert err[brain_mask(shape, spacing)].max() < 0.5, err[brain_mask(shape, spacing)].max()
    # quadratic B-spline weights: 0.23-0.33 HU everywhere over the same six draws
    quad = joint_bilateral(frame[None], guide, spacing=spacing, filter_weights="quadratic")[0]
    assert np.abs(quad - ref).max() < 0.5, np.abs(quad - ref).max()


def test_artery_edge(rng):
    """A 3 mm artery at peak (+400 HU in the frame, +100 HU in the guide) at 0.45 mm voxels."""
    spacing = (5.0, 0.45, 0.45)
    _, frame, guide = head_slab(rng, shape=(3, 96, 96), spacing=spacing, artery=True)
    ref = brute_force(frame, guide, spacing, 3.0, 20.0)
    # issue 5's 0.5 HU everywhere, with quadratic B-spline weights: over six noise draws the
    # max was 0.28-0.33 HU
    quad = joint_bilateral(frame[None], guide, spacing=spacing, filter_weights="quadratic")[0]
    assert np.abs(quad - ref).max() < 0.5, np.abs(quad - ref).max()
    # The default bilinear weights give a kernel that depends on where a voxel lies in its
    # cell, ~1 % of the 300 HU frame-guide jump: over six draws the max was 2.4-2.6 HU (at
    # skull voxels whose guide value equals the artery's), 99.9th percentile 1.25-1.30 HU;
    # bounds 3.5 and 2 HU leave room for other draws (and show if it gets worse).
    err = np.abs(joint_bilateral(frame[None], guide, spacing=spacing)[0] - ref)
    assert err.max() < 3.5 and np.percentile(err, 99.9) < 2.0, err.max()


def width_10_90(vol: np.ndarray, dx: float) -> float:
    """10-90 % width in mm of the mean x-profile of an edge falling from high (left) to low."""
    prof = vol.reshape(-1, vol.shape[-1]).mean(axis=0)
    hi, lo = prof[:15].mean(), prof[-15:].mean()
    frac = (prof - lo) / (hi - lo)
    xs = np.arange(len(prof)) * dx
    # interpolate the crossings on the reversed (increasing) profile
    return float(np.interp(0.1, frac[::-1], xs[::-1]) - np.interp(0.9, frac[::-1], xs[::-1]))


def edge_study(rng: np.random.Generator, *, step_hu: float, range_sigma_hu: float,
               frames: int = 6, noise_hu: float = 8.4) -> dict[str, float]:
    """Tissue/CSF edge at 0.45 x 0.45 x 5 mm: 10-90 % width and noise before and after filtering.

    CSF 10 HU on the right, tissue 10 + ``step_hu`` on the left, blurred by the scanner (1.2 mm
    FWHM, as the phantom); ``frames`` frames with white noise of ``noise_hu`` (103 / sqrt(150
    mAs)), guided by a mean of 89 frames (noise / sqrt(89)). Noise is measured 5-18 mm from the
    edge ("far") and within 2.7 mm of it on the tissue side ("near").
    """
    spacing = (5.0, 0.45, 0.45)
    shape = (4, 32, 128)
    xx = np.arange(shape[2]) * spacing[2]
    profile = np.where(xx < xx.mean(), 10.0 + step_hu, 10.0)
    truth = ndimage.gaussian_filter1d(np.broadcast_to(profile, shape).astype(float),
                                      1.2 / 2.355 / spacing[2], axis=2)
    hu = (truth + noise_hu * rng.standard_normal((frames, *shape))).astype(np.float32)
    guide = (truth + noise_hu / np.sqrt(89) * rng.standard_normal(shape)).astype(np.float32)
    out = joint_bilateral(hu, guide, spacing=spacing, range_sigma_hu=range_sigma_hu)
    gauss = ndimage.gaussian_filter(hu, (0, *(3.0 / s for s in spacing)))
    far, near = np.s_[..., 10:40], np.s_[..., 58:64]
    width = width_10_90(hu, spacing[2])
    return {"width_before": width, "growth": width_10_90(out, spacing[2]) - width,
            "growth_gauss": width_10_90(gauss, spacing[2]) - width,
            "noise_far": float((out - truth)[far].std() / (hu - truth)[far].std()),
            "noise_near": float((out - truth)[near].std() / (hu - truth)[near].std())}


def test_edge_width_paper_parameters(rng):
    """Issue 5: noise halved, 10-90 % width of a tissue/CSF edge grows by < 1 mm."""
    # a 27 HU step: the phantom's grey matter (35-40 HU) against CSF (5-15 HU) at 80 kV
    res = edge_study(rng, step_hu=27.0, range_sigma_hu=20.0)
    # White noise is averaged over ~1000 voxels: its SD falls to ~4 % far from the edge and
    # ~14 % next to it (measured); halving is the requirement.
    assert res["noise_far"] < 0.5 and res["noise_near"] < 0.5, res
    # The < 1 mm target is NOT met with the paper's 20 HU range sigma: across a 27 HU step the
    # range weight is exp(-27^2 / 800) = 0.40, and the edge widens by 4.1-4.4 mm over three
    # noise draws, against 6.3-6.6 mm for a Gaussian of the same spatial sigma. Held here to
    # that measurement (+-1 mm around it) so that a change shows.
    assert 3.2 < res["growth"] < 5.3, res
    assert res["growth"] < 0.75 * res["growth_gauss"], res


def test_edge_width_smaller_range_sigma(rng):
    """What meets the < 1 mm target on the same 27 HU step: range sigma 10 HU."""
    res = edge_study(rng, step_hu=27.0, range_sigma_hu=10.0)
    # measured growth -0.1-0.0 mm over three draws, noise still 4 % of the input far from the
    # edge and 13-14 % next to it (as with 20 HU): in flat tissue the guide (1 HU noise) hardly
    # changes the range weights, so a smaller range sigma costs little noise reduction there
    assert res["growth"] < 1.0 and res["noise_far"] < 0.5 and res["noise_near"] < 0.5, res
    # a white matter/CSF step (18 HU) needs less still: 10 HU leaves it widening by 2.2-2.7 mm
    # (7.5 HU: 0.2-0.5 mm)
    wm = edge_study(rng, step_hu=18.0, range_sigma_hu=10.0)
    assert wm["growth"] > 1.0, wm


def test_series_interface(rng):
    spacing = (5.0, 0.9, 0.9)
    _, frame, _ = head_slab(rng, spacing=spacing)
    hu = frame[None] + rng.standard_normal((5, *frame.shape)).astype(np.float32)
    series = CTPSeries(hu=hu, times=np.arange(5) * 0.5, affine=np.diag([0.9, 0.9, 5.0, 1.0]))
    out = bilateral_filter(series)
    guide = hu.mean(axis=0, dtype=np.float64).astype(np.float32)  # the default guide
    assert np.allclose(out.hu, joint_bilateral(hu, guide, spacing=spacing), atol=1e-3)
    assert out.meta["bilateral"]["range_sigma_hu"] == 20.0
    quad = bilateral_filter(series, filter_weights="quadratic")
    assert quad.meta["bilateral"]["filter_weights"] == "quadratic"
    assert np.allclose(quad.hu, joint_bilateral(hu, guide, spacing=spacing,
                                                filter_weights="quadratic"), atol=1e-3)
    assert np.array_equal(series.hu, hu)  # the input is left alone
    own = series.replace(hu=series.hu.copy())
    same = bilateral_filter(own, in_place=True)
    assert same.hu is own.hu and np.array_equal(same.hu, out.hu)


def test_constant_and_guide_checks(small_series):
    flat = small_series.replace(hu=np.full(small_series.shape, 42.0, np.float32))
    # weighted averages of a constant are that constant (float32 rounding only)
    assert np.allclose(bilateral_filter(flat).hu, 42.0, atol=1e-3)
    with pytest.raises(ValidationError, match="guide shape"):
        bilateral_filter(small_series, guide=np.zeros((2, 2, 2)))
    frame = small_series.hu[:1]
    with pytest.raises(ValidationError, match="spacing"):
        joint_bilateral(frame, frame[0], spacing=(5.0, 0.0, 0.45))
    with pytest.raises(ValidationError, match="filter_weights"):
        joint_bilateral(frame, frame[0], spacing=(5.0, 0.45, 0.45), filter_weights="cubic")
    with pytest.raises(ValidationError, match="NaN"):
        joint_bilateral(frame, np.full(frame.shape[1:], np.nan, np.float32),
                        spacing=(5.0, 0.45, 0.45))
    for sigma in (0.0, float("nan"), float("inf")):  # NaN had reached numpy's arange
        with pytest.raises(ValidationError, match="must be finite and > 0"):
            bilateral_filter(small_series, range_sigma_hu=sigma)
    # a probe's 1e6 mm and 1e9 HU had written a uniform study, exit 0
    for wide in ({"spatial_sigma_mm": 1e6}, {"range_sigma_hu": 1e9}):
        with pytest.raises(ValidationError, match="at most 20 and range_sigma_hu at most 500"):
            bilateral_filter(small_series, **wide)


def test_threads_and_chunks_agree(rng):
    """Chunks filtered in two threads, in place, equal one chunk filtered alone."""
    spacing = (5.0, 0.45, 0.45)
    _, frame, guide = head_slab(rng, shape=(3, 48, 48), spacing=spacing)
    hu = frame[None] + 10.0 * rng.standard_normal((5, *frame.shape)).astype(np.float32)
    one = joint_bilateral(hu, guide, spacing=spacing, chunk=5, workers=1)
    same = hu.copy()
    out = joint_bilateral(same, guide, spacing=spacing, chunk=2, workers=2, out=same)
    assert out is same
    # the same sparse products, column by column: only float32 rounding may differ
    assert np.allclose(out, one, atol=1e-4), np.abs(out - one).max()
    assert not np.allclose(out, hu, atol=1.0)  # it did filter


def test_nan_in_the_images_is_refused(rng):
    """One NaN voxel spread to thousands through the grid; it is refused instead."""
    guide = rng.normal(30.0, 5.0, (2, 16, 16)).astype(np.float32)
    images = np.stack([guide, guide + 1.0])
    images[1, 0, 3, 3] = np.nan
    with pytest.raises(ValidationError, match="1 NaN or Inf"):
        joint_bilateral(images, guide, spacing=(5.0, 1.0, 1.0))


@pytest.mark.parametrize("spacing, slices", [((5.0, 0.9, 0.9), 9), ((2.0, 0.9, 0.9), 11),
                                             ((0.5, 0.45, 0.45), 20)])
def test_slab_by_slab_equals_the_whole_volume(rng, spacing, slices):
    """A grid too large for the budget is built and applied slab by slab along z, each slab
    with the slices its core's blur reaches: the same filtered volume, in place or not, for
    5 mm slices (halo 2 slices), 2 mm (5) and 0.5 mm (the grid 2x down-sampled in z: slabs on
    whole layers)."""
    from ctperf.preprocess.bilateral import _Setup

    _, frame, guide = head_slab(rng, shape=(slices, 48, 48), spacing=spacing, artery=True)
    hu = np.stack([frame, 0.9 * frame + 3.0, guide]).astype(np.float32)
    whole = joint_bilateral(hu, guide, spacing=spacing)
    setup = _Setup.of(spacing, spatial_sigma_mm=3.0, range_sigma_hu=20.0, levels_per_sigma=3.0,
                      levels_per_sigma_outside=2.0, cells_per_sigma=2.2,
                      filter_weights="linear")
    slabs = setup.slabs(guide.shape, 1)  # the smallest slabs the halo allows
    assert len(slabs) > 1 and setup.slabs(guide.shape, 2**40) == [(0, 0, slices, slices)]
    assert [s[1] for s in slabs[1:]] == [s[2] for s in slabs[:-1]]  # cores tile the volume
    assert slabs[-1][2] == slices
    # a budget of 80 % of the whole grid's estimate: slabs within it, halos included, or as
    # small as the halos allow (a core of a halo's layers and a halo on each side)
    budget = int(0.8 * setup.grid_bytes(guide.shape))
    halo = max(start - first for first, start, _, _ in slabs) or 1  # slices read before a core
    smallest = setup.grid_bytes((3 * halo, *guide.shape[1:]))
    within = setup.slabs(guide.shape, budget)
    assert len(within) > 1
    assert all(setup.grid_bytes((end - first, *guide.shape[1:])) <= max(budget, smallest)
               for first, _, _, end in within)
    apart = joint_bilateral(hu, guide, spacing=spacing, slab_budget=1)
    same = hu.copy()
    in_place = joint_bilateral(same, guide, spacing=spacing, slab_budget=1, out=same,
                               chunk=2, workers=2)
    # the same sparse products on the same rows: float32 rounding at most
    np.testing.assert_allclose(apart, whole, atol=1e-4)
    np.testing.assert_allclose(in_place, whole, atol=1e-4)
