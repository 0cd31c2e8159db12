import numpy as np
import pytest
from scipy import stats

from ctperf.evaluation import dice, map_agreement, map_agreement_by_region


def _lin_ccc_naive(x, y):
    # Lin 1989, written out term by term as the reference for the vectorised version.
    sxy = sum((a - x.mean()) * (b - y.mean()) for a, b in zip(x, y, strict=True)) / len(x)
    return 2 * sxy / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_map_agreement_matches_textbook_definitions(rng):
    ref = rng.normal(50, 10, size=(3, 8, 8))
    est = 0.9 * ref + 4 + rng.normal(0, 3, size=ref.shape)
    est[0, 0, 0] = np.nan  # NaN voxels are left out
    mask = np.ones(ref.shape, dtype=bool)
    mask[2] = False
    got = map_agreement(est, ref, mask=mask)
    keep = mask & np.isfinite(est)
    e, r = est[keep], ref[keep]
    assert got.n == keep.sum()
    assert got.mae == pytest.approx(np.mean(np.abs(e - r)))
    assert got.bias == pytest.approx(np.mean(e - r))
    assert got.rmse == pytest.approx(np.sqrt(np.mean((e - r) ** 2)))
    assert got.pearson_r == pytest.approx(stats.pearsonr(e, r).statistic)
    assert got.ccc == pytest.approx(_lin_ccc_naive(e, r))
    assert got.ccc < got.pearson_r  # a biased estimate agrees less than it correlates


def test_perfect_agreement_and_degenerate_cases():
    ref = np.arange(10.0)
    perfect = map_agreement(ref, ref)
    assert (perfect.mae, perfect.bias, perfect.pearson_r, perfect.ccc) == (0, 0, 1, 1)
    empty = map_agreement(ref, ref, mask=np.zeros(10, dtype=bool))
    assert empty.n == 0 and np.isnan(empty.mae)
    assert np.isnan(map_agreement(np.ones(5), np.arange(5.0)).pearson_r)


def test_by_region_and_dice():
    ref = np.arange(8.0).reshape(2, 4)
    left = np.array([[1, 1, 0, 0]] * 2, bool)
    regions = {"left": left, "right": ~left}
    out = map_agreement_by_region(ref + 1, ref, regions)
    assert out["left"].bias == 1 and out["right"].n == 4
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert np.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))


def _ssim_naive(x, y, sigma=1.5):
    # Wang et al. 2004 written pixel by pixel with an explicit 11 x 11 Gaussian window and the
    # image mirrored at its edges (scipy's "reflect": the edge pixel is repeated).
    r = 5
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    xp, yp = np.pad(x, r, mode="symmetric"), np.pad(y, r, mode="symmetric")
    c1, c2 = 0.01**2, 0.03**2
    out = np.empty(x.shape)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            a, b = xp[i:i + 2 * r + 1, j:j + 2 * r + 1], yp[i:i + 2 * r + 1, j:j + 2 * r + 1]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cab = (w * (a - ma) * (b - mb)).sum()
            out[i, j] = ((2 * ma * mb + c1) * (2 * cab + c2)
                         / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return out


def test_ssim_hand_cases_and_naive_reference(rng):
    from ctperf.evaluation.metrics import ssim

    # Two constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.4, 0.5
    expect = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    assert ssim(np.full((12, 12), a), np.full((12, 12), b)) == pytest.approx(expect, rel=1e-9)
    x = rng.uniform(size=(14, 17))
    assert ssim(x, x) == pytest.approx(1.0)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    mask = np.zeros(x.shape, bool)
    mask[3:11, 2:15] = True
    # Same formula, two summation orders: agreement to float64 rounding.
    assert ssim(x, y, mask=mask) == pytest.approx(_ssim_naive(x, y)[mask].mean(), abs=1e-10)
    # 3-D maps are scored slice by slice (no smoothing across slices).
    both = ssim(np.stack([x, x]), np.stack([y, x]))
    assert both == pytest.approx((_ssim_naive(x, y).mean() + 1.0) / 2, abs=1e-10)
    assert ssim(x, 1 - x) < 0  # an inverted image anti-correlates


def test_unit_mse_windows_psnr_and_dataset_range():
    from ctperf.evaluation.metrics import UNIT_WINDOWS, dataset_range, psnr, unit_mse

    ref = np.array([0.0, 2.0, 4.0, 20.0])
    est = np.array([0.0, 3.0, 4.0, 10.0])
    # ctperf's CBV window 0-10 clips the 20 and the 10 to 1: only the 3 vs 2 differs, by 0.1.
    assert unit_mse(est, ref, window=UNIT_WINDOWS["cbv"]) == pytest.approx(0.01 / 4)
    # The paper's min-max over the data set (0-20, background included), no clipping.
    lo_hi = dataset_range([ref, np.array([np.nan, 1.0])])
    assert lo_hi == (0.0, 20.0)
    assert unit_mse(est, ref, window=lo_hi, clip=False) == pytest.approx(
        (0.05**2 + 0.5**2) / 4)
    assert unit_mse(est, ref, window=lo_hi, clip=False,
                    mask=np.array([1, 1, 1, 0], bool)) == pytest.approx(0.05**2 / 3)
    assert psnr(0.01) == pytest.approx(20.0) and psnr(0.0) == float("inf")
    with pytest.raises(ValueError, match="constant"):
        dataset_range([np.ones(3)])


def test_ssim_of_identical_values_beside_one_readers_holes_is_one(rng):
    """Voxels without a value in one map only are left out of the local statistics: counted as
    0, 10 % of holes had lowered the SSIM of identical values around them to 0.88. A
    background both maps lack still counts as 0, as before (the figure of maps with one shared
    background is unchanged)."""
    from ctperf.evaluation.metrics import ssim

    x = rng.uniform(0.2, 0.8, size=(2, 24, 24))
    holes = x.copy()
    holes[rng.uniform(size=x.shape) < 0.1] = np.nan
    assert ssim(holes, x) == pytest.approx(1.0, abs=1e-9)
    assert ssim(x, holes) == pytest.approx(1.0, abs=1e-9)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    shared = np.zeros(x.shape, bool)
    shared[:, :, :5] = True  # a background without a value in both
    xb, yb = np.where(shared, np.nan, x), np.where(shared, np.nan, y)
    zero = ssim(np.where(shared, 0.0, x), np.where(shared, 0.0, y), mask=~shared)
    assert ssim(xb, yb) == pytest.approx(zero, abs=1e-12)


def test_a_background_without_value_counts_as_zero_in_the_paper_range():
    """The paper's min-max runs over whole images, whose background is 0; ctperf writes NaN
    there. A TTP range had begun at the earliest brain's 7 s for ctperf's maps and at 0 for
    the phantom's truth, scoring the same maps 29 % apart."""
    from ctperf.evaluation.metrics import dataset_range, image_range

    ttp = np.array([[np.nan, 7.0, 30.0], [np.nan, 9.0, 59.0]])
    assert image_range(ttp) == (0.0, 59.0)
    assert dataset_range([ttp]) == dataset_range([np.nan_to_num(ttp)]) == (0.0, 59.0)
    assert image_range(np.array([7.0, 59.0])) == (7.0, 59.0)  # no background: as it is
    assert image_range(np.array([-3.0, np.nan, 8.0])) == (-3.0, 8.0)
    assert image_range(np.full(3, np.nan)) is None


def test_unit_windows_match_the_network_targets():
    normalise = pytest.importorskip("ctperf.model.normalise", reason="needs torch (ctperf.model)")
    from ctperf.evaluation.metrics import UNIT_WINDOWS

    for target, map_name in normalise.TARGET_MAPS.items():
        assert UNIT_WINDOWS[map_name] == normalise.TARGET_WINDOWS[target]
