"""Agreement between a map and its reference: voxel-wise errors, image similarity, lesion overlap.

Voxel-wise figures: MAE, bias, RMSE, Pearson r and Lin's concordance correlation coefficient
(Lin 1989, doi:10.2307/2532051); MSE of maps scaled to [0, 1] two ways (the paper's dataset-wide
min-max and ctperf's fixed windows, :data:`UNIT_WINDOWS`), PSNR and SSIM (Wang et al. 2004,
doi:10.1109/TIP.2003.819861); lesion overlap: the Dice similarity coefficient. All functions take
arrays of any shape and an optional boolean mask; NaN voxels in either input are left out, and the
number of voxels used is returned with the figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ctperf.errors import ValidationError

__all__ = [
    "IDENTICAL_MSE",
    "MAP_METRICS",
    "UNIT_WINDOWS",
    "MapAgreement",
    "as_mask",
    "dataset_range",
    "dice",
    "image_range",
    "map_agreement",
    "map_agreement_by_region",
    "psnr",
    "ssim",
    "unit_mse",
]

#: Per-case map figures of Table 1, in table order
#: (:func:`ctperf.evaluation.cohort.map_case_metrics`).
MAP_METRICS = ("mse_minmax", "mse_window", "psnr", "ssim", "mae", "bias", "rmse", "pearson_r",
               "ccc", "coverage")

#: ctperf's fixed window (low, high) per map, in the map's unit, that scales it to [0, 1]: the
#: U-Net's target windows (``ctperf.model.normalise.TARGET_WINDOWS``, kept here so evaluation
#: needs no torch; a test checks that the two agree).
UNIT_WINDOWS: dict[str, tuple[float, float]] = {
    "cbv": (0.0, 10.0), "cbf": (0.0, 100.0), "delay": (0.0, 15.0), "mtt": (0.0, 20.0),
    "tmax": (0.0, 20.0), "ttp": (0.0, 40.0),
}

#: SSIM constants of Wang et al. 2004: K1, K2 and the Gaussian window's sigma in pixels.
SSIM_K1, SSIM_K2, SSIM_SIGMA = 0.01, 0.03, 1.5


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
    keep = _kept(est, ref, mask)
    return est[keep], ref[keep]


def as_mask(values: np.ndarray, what: str = "mask") -> np.ndarray:
    """``values`` as a boolean mask: booleans, or 0 and one other value (1, or 255 as an 8-bit
    image stores it); a probability map (a 0.01 taken as a whole voxel), a label image (a 2 as
    lesion beside 1) or NaN is refused, naming what it holds."""
    arr = np.asarray(values)
    if arr.dtype == bool or not arr.size:
        return arr.astype(bool)
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise ValidationError(f"{what}: not a mask: it holds NaN; give 0 outside the "
                                  "lesion")
        # whole numbers to float32's precision (a uint8 mask scaled by 1/255 reads
        # 1.00000006; a resampled one holds 1e-9 where it is 0)
        arr = np.where(np.abs(arr) < 1e-5, 0.0, arr)
    others = np.unique(arr[arr != 0])
    whole = np.isclose(others, np.round(others), rtol=0.0, atol=1e-5)
    if not whole.all() or np.unique(np.round(others)).size > 1:
        kind = ("values between whole numbers, such as a probability map: threshold it"
                if not whole.all() else
                "several labels, such as a label image: take one (labels == 1)")
        raise ValidationError(f"{what}: not a mask: {kind} (values "
                              f"{', '.join(f'{v:.8g}' for v in others[:4])}"
                              f"{' ...' if others.size > 4 else ''})")
    return arr != 0


def _kept(est: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels with a value in both maps, within ``mask`` (of their shape: a (Y, X) mask had
    been broadcast over every slice)."""
    keep = np.isfinite(est) & np.isfinite(ref)
    if mask is not None:
        m = as_mask(mask)
        if m.shape != est.shape:
            raise ValidationError(f"mask shape {m.shape} differs from map shape {est.shape}")
        keep &= m
    return keep


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
    """Dice similarity coefficient 2|A and B| / (|A| + |B|); NaN when both masks are empty.
    The masks are booleans or 0/1 (:func:`as_mask`: a probability map is refused)."""
    a, b = as_mask(a, "first mask"), as_mask(b, "second mask")
    if a.shape != b.shape:
        raise ValidationError(f"masks differ in shape: {a.shape} != {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.sum(a & b)) / total


def image_range(volume: np.ndarray) -> tuple[float, float] | None:
    """Minimum and maximum of one map over the whole image, as the paper took them: its finite
    voxels, and 0 for voxels without a value (NaN, as outside the brain in ctperf's maps,
    where the paper's images hold 0); None when no voxel is finite."""
    v = np.asarray(volume)
    finite = np.isfinite(v)
    if not finite.any():
        return None
    lo, hi = float(v[finite].min()), float(v[finite].max())
    return (min(lo, 0.0), max(hi, 0.0)) if not finite.all() else (lo, hi)


def dataset_range(volumes: Sequence[np.ndarray]) -> tuple[float, float]:
    """Minimum and maximum over every voxel of every volume (background included; a voxel
    without a value counts as the paper's background, 0: :func:`image_range`).

    This is the paper's normalisation of a map to [0, 1]: one min-max over the whole data set and
    the whole image, not per image and not inside the brain only. (Before 2026-12-05 the NaN
    outside ctperf's brain was left out, so its TTP range began at the earliest brain's TTP, 7 s
    on a probe's cohort, where the phantom's truth, 0 outside, began at 0: the same maps scored
    29 % apart.)

    Parameters
    ----------
    volumes : sequence of ndarray, any shapes
        One map per case, e.g. every study's CBV in mL/100 g.

    Returns
    -------
    (float, float)
        (low, high) in the maps' unit; a constant or empty data set is an error.
    """
    ranges = [r for v in volumes if (r := image_range(v)) is not None]
    if not ranges or not max(r[1] for r in ranges) > min(r[0] for r in ranges):
        raise ValidationError("the maps have no finite voxels or are constant: no min-max range")
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def unit_mse(estimate: np.ndarray, reference: np.ndarray, *, window: tuple[float, float],
             clip: bool = True, mask: np.ndarray | None = None) -> float:
    """MSE of two maps after scaling both to [0, 1] with one window.

    Parameters
    ----------
    estimate, reference : ndarray, same shape
        Maps in their physical unit.
    window : (float, float)
        (low, high) mapped to (0, 1): :data:`UNIT_WINDOWS` for ctperf's figure, or
        :func:`dataset_range` of the reference for the paper's.
    clip : bool
        Clip the scaled maps to [0, 1] (ctperf's windows clip; a dataset-wide range needs none).
    mask : bool ndarray, optional
        Voxels to average over (e.g. the brain).

    Returns
    -------
    float
        Dimensionless; NaN when no voxel is left.
    """
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValidationError(f"window must have high > low, got ({lo}, {hi})")
    est, ref = _paired(estimate, reference, mask)
    if est.size == 0:
        return float("nan")
    e, r = (est - lo) / (hi - lo), (ref - lo) / (hi - lo)
    if clip:
        e, r = np.clip(e, 0.0, 1.0), np.clip(r, 0.0, 1.0)
    return float(np.mean((e - r) ** 2))


#: An MSE (of maps on [0, 1]) at or under this is rounding, not a difference: maps identical
#: but for a unit conversion in float32 read 2e-17 to 6e-16 (PSNR 152-168 dB).
IDENTICAL_MSE = 1e-12


def psnr(mse: float, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / mse)``; inf for an mse of
    at most :data:`IDENTICAL_MSE` times ``data_range**2`` (identical maps, to rounding)."""
    if not np.isfinite(mse):
        return float("nan")
    if mse <= IDENTICAL_MSE * data_range**2:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(estimate: np.ndarray, reference: np.ndarray, *, mask: np.ndarray | None = None,
         data_range: float = 1.0, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity (Wang et al. 2004) of two maps, slice by slice in-plane.

    Local means, variances and covariance come from an isotropic Gaussian window (``sigma``
    pixels, truncated at 3.5 sigma: 11 x 11 taps for 1.5) applied to each (Y, X) slice, with
    ``C1 = (0.01 L)**2`` and ``C2 = (0.03 L)**2`` for ``L = data_range``; the SSIM map is averaged
    over ``mask``. A voxel without a value (NaN) in both maps counts as 0 in the local
    statistics (the background, as the paper's images hold it); one without a value in one map
    only is left out of them (normalised convolution; counted as 0, a reader's holes had
    lowered the SSIM of identical values around them to 0.88); either is left out of the
    mean.

    Parameters
    ----------
    estimate, reference : ndarray, (Y, X) or (Z, Y, X)
        Maps on the same scale, e.g. both in [0, 1].
    mask : bool ndarray, same shape, optional
        Voxels whose SSIM is averaged; default all finite voxels.
    data_range : float
        Dynamic range L of the maps (1 for [0, 1] maps).
    sigma : float
        Gaussian window's standard deviation in pixels.

    Returns
    -------
    float
        In [-1, 1]; NaN when no voxel is left.
    """
    from scipy.ndimage import gaussian_filter

    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape or est.ndim not in (2, 3):
        raise ValidationError(f"ssim needs two (Y, X) or (Z, Y, X) maps of one shape, got "
                              f"{est.shape} and {ref.shape}")
    keep = _kept(est, ref, mask)
    if not keep.any():
        return float("nan")
    fx, fy = np.isfinite(est), np.isfinite(ref)
    weight = (fx == fy).astype(np.float64)  # both with a value, or both background
    x, y = np.where(fx, est, 0.0), np.where(fy, ref, 0.0)
    sig = (sigma, sigma) if x.ndim == 2 else (0.0, sigma, sigma)

    def window(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sig, mode="reflect", truncate=3.5)

    # the window's weight on the voxels it may use: 1 where no hole is near, > 0 where kept
    norm = 1.0 if weight.all() else np.maximum(window(weight), 1e-12)

    def smooth(a: np.ndarray) -> np.ndarray:
        return window(a * weight) / norm

    mx, my = smooth(x), smooth(y)
    vx, vy, cxy = smooth(x * x) - mx**2, smooth(y * y) - my**2, smooth(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx**2 + my**2 + c1) * (vx + vy + c2)
    return float(np.mean((num / den)[keep]))
