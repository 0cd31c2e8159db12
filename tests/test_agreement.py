"""Table 2 statistics: Bland-Altman, repeatability, ICC(1,k), Friedman, Dice summaries."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ctperf.evaluation.agreement import (
    BOTH_EMPTY,
    NO_REFERENCE_LESION,
    bland_altman,
    case_dice,
    coefficient_of_repeatability,
    friedman,
    icc1k,
    summarise_dice,
    volume_agreement,
)


def test_bland_altman_and_cr_on_a_known_pair():
    a = np.array([10.0, 12.0, 14.0, 20.0])
    b = np.array([9.0, 12.0, 11.0, 18.0])
    # differences 1, 0, 3, 2: mean 1.5, sample SD sqrt(5/3) = 1.2910
    ba = bland_altman(a, b)
    sd = np.sqrt(5 / 3)
    assert (ba.n, ba.bias) == (4, pytest.approx(1.5))
    assert ba.sd == pytest.approx(sd)
    assert (ba.loa_low, ba.loa_high) == (pytest.approx(1.5 - 1.96 * sd),
                                         pytest.approx(1.5 + 1.96 * sd))
    assert coefficient_of_repeatability(a, b) == pytest.approx(1.96 * sd)
    # a NaN pair is left out; one pair has no SD
    assert bland_altman([1.0, np.nan], [0.0, 1.0]).bias == 1.0
    assert np.isnan(bland_altman([1.0], [0.0]).sd)


def _icc1k_hand(table):
    # One-way random effects (Shrout and Fleiss 1979): ICC(1,k) = (MSB - MSW) / MSB.
    n, k = table.shape
    grand = table.mean()
    msb = k * ((table.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    msw = ((table - table.mean(axis=1, keepdims=True)) ** 2).sum() / (n * (k - 1))
    f = msb / msw
    fl = f / stats.f.ppf(0.975, n - 1, n * (k - 1))
    fu = f * stats.f.ppf(0.975, n * (k - 1), n - 1)
    return (msb - msw) / msb, 1 - 1 / fl, 1 - 1 / fu


def test_icc1k_equals_the_hand_formula_and_pingouin(rng):
    pytest.importorskip("pingouin")
    truth = rng.uniform(5, 120, size=12)
    table = np.column_stack([truth + rng.normal(0, 5, 12), truth + rng.normal(3, 5, 12),
                             truth + rng.normal(0, 8, 12)])
    got = icc1k(table)
    icc, lo, hi = _icc1k_hand(table)
    # the ANOVA sums differ from pingouin's only by float64 rounding
    assert got["icc"] == pytest.approx(icc, abs=1e-12)
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(lo, abs=1e-9),
                                               pytest.approx(hi, abs=1e-9))
    assert got["n"] == 12 and 0.9 < got["icc"] < 1.0
    # pingouin's own table rounds the interval to two decimals
    import pandas as pd
    import pingouin

    n, k = table.shape
    long = pd.DataFrame({"c": np.repeat(np.arange(n), k), "r": np.tile(np.arange(k), n),
                         "v": table.ravel()})
    res = pingouin.intraclass_corr(data=long, targets="c", raters="r", ratings="v")
    row = res[res["Type"].isin(["ICC1k", "ICC(1,k)"])].iloc[0]
    assert got["icc"] == pytest.approx(row["ICC"], abs=1e-12)
    ci = row["CI95"] if "CI95" in row.index else row["CI95%"]
    assert np.allclose([got["ci_low"], got["ci_high"]], ci, atol=0.005)  # its 2-digit rounding
    # hand case: two readers that agree exactly give ICC 1, F infinite, p 0, the interval 1-1
    same = icc1k(np.column_stack([truth, truth]))
    assert (same["icc"], same["ci_low"], same["ci_high"], same["f"], same["p"]) == (
        1.0, 1.0, 1.0, np.inf, 0.0)
    # two cases of two readers are 4 ratings, fewer than the 5 pingouin needs: left empty
    few = icc1k(table[:2, :2])
    assert np.isnan(few["icc"]) and few["n"] == 2 and "needs 3 or more" in few["note"]
    assert "needs 2 or more" in icc1k(table[:1].repeat(5, axis=1))["note"]  # one study
    # studies whose mean volumes are equal, but for rounding (1.1 + 2.2 against 1.65 twice):
    # pingouin's between-studies mean square is ~1e-32 and its ICC -8e30; left empty, said
    for equal in ([[1.0, 2.0], [2.0, 1.0], [1.5, 1.5]], [[1.1, 2.2], [2.2, 1.1], [1.65, 1.65]]):
        flat = icc1k(np.array(equal))
        assert np.isnan(flat["icc"]) and "no variance between studies" in flat["note"]
    # rows with a NaN are dropped
    with_nan = np.vstack([table, [1.0, np.nan, 2.0]])
    assert icc1k(with_nan)["icc"] == pytest.approx(got["icc"])


def test_friedman_equals_scipy(rng):
    t = rng.normal(size=(9, 3)) + np.array([0.0, 0.5, 1.0])
    got = friedman(t)
    ref = stats.friedmanchisquare(*t.T)
    assert got["statistic"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(
        ref.pvalue)
    # hand case: reader 3 always highest, 2 middle, 1 lowest, n = 4, k = 3:
    # chi2 = 12 / (n k (k + 1)) * sum(R_j^2) - 3 n (k + 1) = 12/48 * (16 + 64 + 144) - 48 = 8
    ranked = np.array([[1.0, 2, 3], [4, 5, 6], [0, 1, 9], [2, 3, 4]])
    assert friedman(ranked)["statistic"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="readers >= 3"):
        friedman(t[:, :2])


def test_case_dice_identical_disjoint_and_undefined():
    a = np.zeros((4, 4), bool)
    a[1:3, 1:3] = True
    b = np.zeros_like(a)
    b[0, 0] = True
    assert case_dice(a, a) == {"dice": 1.0, "excluded": None, "undefined": False}
    assert case_dice(b, a)["dice"] == 0.0
    empty = np.zeros_like(a)
    both = case_dice(empty, empty)
    assert both["dice"] is None and both["undefined"] and both["excluded"] == NO_REFERENCE_LESION
    # a lesion found where the reference has none: Dice 0, but left out of the summary
    false_pos = case_dice(a, empty)
    assert false_pos["dice"] == 0.0 and false_pos["excluded"] == NO_REFERENCE_LESION
    s = summarise_dice([case_dice(a, a), case_dice(b, a), both, false_pos])
    assert (s.n, s.mean, s.n_excluded, s.n_undefined) == (2, 0.5, 2, 1)
    assert s.sd == pytest.approx(np.std([1.0, 0.0], ddof=1))
    assert BOTH_EMPTY.startswith("undefined")


def test_volume_agreement_columns():
    pytest.importorskip("pingouin")
    a = np.array([10.0, 12.0, 14.0, 20.0])
    b = np.array([9.0, 12.0, 11.0, 18.0])
    out = volume_agreement(a, b)
    assert out["mean_abs_diff"] == pytest.approx(1.5)  # |1|, 0, 3, 2
    assert out["sd_abs_diff"] == pytest.approx(np.std([1, 0, 3, 2], ddof=1))
    ref = stats.pearsonr(a, b)
    assert (out["pearson_r"], out["pearson_p"]) == (pytest.approx(ref.statistic),
                                                    pytest.approx(ref.pvalue))
    assert out["bland_altman"]["cr"] == pytest.approx(1.96 * np.sqrt(5 / 3))
    assert out["icc1k"]["icc"] == pytest.approx(_icc1k_hand(np.column_stack([a, b]))[0])
