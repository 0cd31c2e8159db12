"""Agreement between two or more readings of the same cases: lesion volumes and Dice per case.

The statistics of Gava et al. 2023 (doi:10.3389/fninf.2023.852105), Table 2: Dice per case
summarised as mean +- SD over the cases with a lesion in the reference; mean absolute volume
difference +- SD; Pearson r of the volumes with its p value; Bland-Altman bias and 95 % limits of
agreement (Bland and Altman 1986, doi:10.1016/S0140-6736(86)90837-8); coefficient of repeatability
1.96 x SD of the differences; the intraclass correlation ICC(1,k) (Shrout and Fleiss 1979,
doi:10.1037/0033-2909.86.2.420) through pingouin's ``intraclass_corr``; the Friedman test across
three or more readers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctperf.errors import CTPerfError, ValidationError
from ctperf.evaluation.metrics import dice

__all__ = [
    "BlandAltman",
    "DiceSummary",
    "bland_altman",
    "case_dice",
    "coefficient_of_repeatability",
    "friedman",
    "icc1k",
    "summarise_dice",
    "volume_agreement",
]

#: Why a case has no Dice in a summary.
NO_REFERENCE_LESION = "no lesion in the reference"
BOTH_EMPTY = "undefined: both masks empty"


def _pair(a: Sequence[float] | np.ndarray,
          b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValidationError(f"need two 1-D series of one length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _sd(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else float("nan")


@dataclass(frozen=True)
class BlandAltman:
    """Bland-Altman agreement of paired measurements a and b (units of the measurements).

    ``bias`` is the mean of a - b, ``sd`` the sample SD of the differences, the limits of
    agreement ``bias -+ 1.96 sd`` and the coefficient of repeatability ``cr = 1.96 sd``.
    """

    n: int
    bias: float
    sd: float
    loa_low: float
    loa_high: float
    cr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bland_altman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> BlandAltman:
    """Bias, SD of the differences, 95 % limits of agreement and coefficient of repeatability.

    Parameters
    ----------
    a, b : array_like, (n,)
        Paired measurements (e.g. lesion volumes in mL of one method and its reference); pairs
        with a NaN are left out.

    Returns
    -------
    BlandAltman
        NaN figures when fewer than two pairs remain (one pair has a bias but no SD).
    """
    x, y = _pair(a, b)
    diff = x - y
    bias = float(diff.mean()) if diff.size else float("nan")
    sd = _sd(diff)
    return BlandAltman(n=int(diff.size), bias=bias, sd=sd, loa_low=bias - 1.96 * sd,
                       loa_high=bias + 1.96 * sd, cr=1.96 * sd)


def coefficient_of_repeatability(a: Sequence[float] | np.ndarray,
                                 b: Sequence[float] | np.ndarray) -> float:
    """1.96 x the sample SD of the paired differences a - b (units of the measurements)."""
    return bland_altman(a, b).cr


def icc1k(ratings: np.ndarray) -> dict[str, Any]:
    """ICC(1,k) of a (cases, readers) table with its 95 % confidence interval, from pingouin.

    Parameters
    ----------
    ratings : ndarray, (n, k)
        One row per case, one column per reader (method or rater); rows with a NaN are left out.

    Returns
    -------
    dict
        ``icc`` (pingouin's ICC(1,k)), ``ci_low``, ``ci_high`` (its 95 % interval, unrounded),
        ``f``, ``p`` and ``n`` (cases used); NaN but ``n``, with a ``note`` saying why, with
        fewer than 5 ratings (2 cases of 2 readers), no spread, or cases whose means are all
        equal (no variance between cases); 1 (F infinite, p 0) when the readers agree exactly.

    Raises
    ------
    CTPerfError
        When pingouin is not installed (``pip install "ctperf[stats]"``).
    """
    table = np.asarray(ratings, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValidationError(f"ICC needs a (cases, readers >= 2) table, got shape {table.shape}")
    table = table[np.all(np.isfinite(table), axis=1)]
    n, k = table.shape
    nan = float("nan")
    empty = {"icc": nan, "ci_low": nan, "ci_high": nan, "f": nan, "p": nan, "n": n}
    if n < 2 or n * k < 5:  # pingouin needs 5 ratings
        return {**empty, "note": f"{n} studies with a value from every reader: the ICC needs "
                                 f"{max(2, -(-5 // k))} or more"}
    if np.ptp(table) == 0:
        return {**empty, "note": "every volume is the same: no spread to apportion"}
    # means equal but for rounding (1.1 + 2.2 against 1.65 twice): pingouin reads -1e30
    if np.ptp(table.mean(axis=1)) <= 1e-9 * np.ptp(table):
        return {**empty, "note": "the studies' mean volumes are all equal: no variance between "
                                 "studies to compare the readers' disagreement with"}
    within = float(np.sum((table - table.mean(axis=1, keepdims=True)) ** 2))
    if within <= 1e-12 * float(np.sum((table - table.mean()) ** 2)):  # readers agree exactly
        return {"icc": 1.0, "ci_low": 1.0, "ci_high": 1.0, "f": float("inf"), "p": 0.0, "n": n}
    try:
        import pandas as pd
        import pingouin
    except ImportError as exc:
        raise CTPerfError(f"the ICC needs pingouin and pandas ({exc.name or exc} is not "
                          "installed): pip install 'ctperf[stats]'") from None
    long = pd.DataFrame({"case": np.repeat(np.arange(n), k), "reader": np.tile(np.arange(k), n),
                         "value": table.ravel()})
    with warnings.catch_warnings():  # pingouin's use of deprecated pandas keywords
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # its other ICC forms on equal readers
        res = pingouin.intraclass_corr(data=long, targets="case", raters="reader",
                                       ratings="value")
    row = res[res["Type"].isin(["ICC1k", "ICC(1,k)"])].iloc[0]
    # pingouin rounds its interval to two decimals; the same interval from its F statistic
    # (Shrout and Fleiss 1979: 1 - F_crit / F) keeps every digit.
    from scipy.stats import f as f_dist

    f_stat, df1, df2 = float(row["F"]), int(row["df1"]), int(row["df2"])
    low = 1.0 - f_dist.ppf(0.975, df1, df2) / f_stat
    high = 1.0 - 1.0 / (f_stat * f_dist.ppf(0.975, df2, df1))
    icc = float(row["ICC"])
    # (MSB - MSW) / MSB of equal mean squares leaves rounding residue of order 1e-16: zero
    icc = 0.0 if abs(icc) < 1e-12 else icc
    return {"icc": icc, "ci_low": float(low), "ci_high": float(high),
            "f": f_stat, "p": float(row["pval"]), "n": n}


def friedman(table: np.ndarray) -> dict[str, float]:
    """Friedman test of k >= 3 readers over n cases (``scipy.stats.friedmanchisquare``).

    Parameters
    ----------
    table : ndarray, (n, k)
        One row per case, one column per reader; rows with a NaN are left out.

    Returns
    -------
    dict
        ``statistic`` (chi-square), ``p``, ``n`` and ``k``; NaN when fewer than 2 complete cases
        or all readings are equal.
    """
    from scipy.stats import friedmanchisquare

    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] < 3:
        raise ValidationError(f"the Friedman test needs (cases, readers >= 3), got {t.shape}")
    t = t[np.all(np.isfinite(t), axis=1)]
    nan = float("nan")
    out: dict[str, float] = {"statistic": nan, "p": nan, "n": int(t.shape[0]), "k": t.shape[1]}
    if t.shape[0] >= 2 and np.ptp(t, axis=1).any():
        res = friedmanchisquare(*t.T)
        out.update(statistic=float(res.statistic), p=float(res.pvalue))
    return out


def case_dice(estimate: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Dice of one case with the reason it is left out of a summary, if it is.

    Returns
    -------
    dict
        ``dice`` (float, or None when both masks are empty), ``excluded`` (None, or
        :data:`NO_REFERENCE_LESION` when the reference mask is empty: the paper leaves
        normal-perfusion cases out of the Dice) and ``undefined`` (True when both are empty).
    """
    value = dice(estimate, reference)
    ref_empty = not np.any(reference)
    return {"dice": None if np.isnan(value) else float(value),
            "excluded": NO_REFERENCE_LESION if ref_empty else None,
            "undefined": bool(np.isnan(value))}


@dataclass(frozen=True)
class DiceSummary:
    """Mean +- sample SD of the Dice over the cases with a lesion in the reference."""

    n: int
    mean: float
    sd: float
    n_excluded: int
    n_undefined: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarise_dice(cases: Sequence[dict[str, Any]]) -> DiceSummary:
    """Summarise :func:`case_dice` results; excluded and undefined cases are counted, not scored."""
    used = np.array([c["dice"] for c in cases if c["excluded"] is None and c["dice"] is not None],
                    dtype=np.float64)
    return DiceSummary(n=int(used.size), mean=float(used.mean()) if used.size else float("nan"),
                       sd=_sd(used), n_excluded=sum(c["excluded"] is not None for c in cases),
                       n_undefined=sum(bool(c["undefined"]) for c in cases))


def volume_agreement(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     icc: bool = True) -> dict[str, Any]:
    """Agreement of paired lesion volumes (mL): the volume columns of the paper's Table 2.

    Parameters
    ----------
    a, b : array_like, (n,)
        Volumes per case of a method (or rater) and of its reference, mL.
    icc : bool
        Also compute ICC(1,k) (needs pingouin; ``None`` with a note when it is missing).

    Returns
    -------
    dict
        ``n``, ``mean_a``, ``mean_b``, ``mean_abs_diff``, ``sd_abs_diff``, ``pearson_r``,
        ``pearson_p``, ``bland_altman`` (:class:`BlandAltman` as a dict; its ``cr`` is the
        coefficient of repeatability) and ``icc1k`` (:func:`icc1k`'s dict, or None).
    """
    from scipy.stats import pearsonr

    x, y = _pair(a, b)
    nan = float("nan")
    absdiff = np.abs(x - y)
    r = p = nan
    if x.size > 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        res = pearsonr(x, y)
        r, p = float(res.statistic), float(res.pvalue)
    out: dict[str, Any] = {
        "n": int(x.size), "mean_a": float(x.mean()) if x.size else nan,
        "mean_b": float(y.mean()) if y.size else nan,
        "mean_abs_diff": float(absdiff.mean()) if x.size else nan, "sd_abs_diff": _sd(absdiff),
        "pearson_r": r, "pearson_p": p, "bland_altman": bland_altman(x, y).as_dict(),
        "icc1k": None}
    if icc:
        try:
            out["icc1k"] = icc1k(np.column_stack([x, y]))
            if note := out["icc1k"].pop("note", None):
                out["icc1k_note"] = note
        except CTPerfError as exc:
            out["icc1k_note"] = str(exc)
    return out
