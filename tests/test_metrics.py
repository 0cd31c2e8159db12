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
