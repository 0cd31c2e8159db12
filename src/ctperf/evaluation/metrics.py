"""Agreement between a map and its reference: voxel-wise errors and lesion overlap.

Voxel-wise figures: MAE, bias, RMSE, Pearson r and Lin's concordance correlation coefficient
(Lin 1989, doi:10.2307/2532051); lesion overlap: the Dice similarity coefficient. All functions take
arrays of any shape and an optional boolean mask; NaN voxels in either input are left out, and the
number of voxels used is returned with the figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ctperf.errors import ValidationError

__all__ = ["MapAgreement", "dice", "map_agreement", "map_agreement_by_region"]


@dataclass(frozen=True)
class MapAgreement:
    """Voxel-wise agreement of an estimate with a reference (units of the map)."""

    n: int
    mae: float
    bias: float
    rmse: float
    pearson_r: float
    ccc: float
    reference_mean: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _paired(estimate: np.ndarray, reference: np.ndarray,
            mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape:
        raise ValidationError(f"estimate shape {est.shape} differs from reference {ref.shape}")
    keep = np.isfinite(est) & np.isfinite(ref)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != est.shape:
            raise ValidationError(f"mask shape {m.shape} differs from map shape {est.shape}")
        keep &= m
    return est[keep], ref[keep]


def map_agreement(estimate: np.ndarray, reference: np.ndarray,
                  *, mask: np.ndarray | None = None) -> MapAgreement:
    """MAE, bias (estimate - reference), RMSE, Pearson r and Lin's CCC over the masked voxels.

    Correlations are NaN when fewer than two voxels remain or either side is constant.
    """
    est, ref = _paired(estimate, reference, mask)
    n = int(est.size)
    if n == 0:
        nan = float("nan")
        return MapAgreement(0, nan, nan, nan, nan, nan, nan)
    diff = est - ref
    mean_e, mean_r = est.mean(), ref.mean()
    var_e, var_r = est.var(), ref.var()
    cov = float(np.mean((est - mean_e) * (ref - mean_r)))
    pearson = cov / np.sqrt(var_e * var_r) if n > 1 and var_e > 0 and var_r > 0 else float("nan")
    denom = var_e + var_r + (mean_e - mean_r) ** 2
    ccc = 2 * cov / denom if n > 1 and denom > 0 else float("nan")
    return MapAgreement(
        n=n,
        mae=float(np.mean(np.abs(diff))),
        bias=float(diff.mean()),
        rmse=float(np.sqrt(np.mean(diff**2))),
        pearson_r=float(pearson),
        ccc=float(ccc),
        reference_mean=float(mean_r),
    )


def map_agreement_by_region(estimate: np.ndarray, reference: np.ndarray,
                            regions: Mapping[str, np.ndarray]) -> dict[str, MapAgreement]:
    """:func:`map_agreement` for each named region mask (e.g. brain, gm, wm, core, penumbra)."""
    return {name: map_agreement(estimate, reference, mask=m) for name, m in regions.items()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice similarity coefficient 2|A and B| / (|A| + |B|); NaN when both masks are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValidationError(f"masks differ in shape: {a.shape} != {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.sum(a & b)) / total
