"""Ischaemic core, hypoperfused tissue and penumbra from perfusion maps.

Core: relative CBF below ``core_rcbf`` (30 %) of normal tissue, or, when ``core_cbv`` is given,
CBV below it (e.g. 2.0 mL/100 g). Hypoperfused: Tmax above ``tmax_hypo`` (6 s); Tmax above
``tmax_severe`` (10 s) is reported too. Penumbra = hypoperfused minus core; mismatch ratio =
hypoperfused / core volume.

Normal-tissue reference for rCBF: ``"contralateral"`` (default) mirrors CBF across the brain's
left-right midline and averages normally perfused mirrored tissue in a Gaussian neighbourhood
(so grey and white matter each meet a similar reference); ``"global"`` is the median CBF of all
normally perfused brain; an array gives each voxel's own reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ctperf.errors import ValidationError
from ctperf.types import PerfusionMaps

__all__ = ["LesionResult", "normal_cbf_reference", "segment_lesions"]


@dataclass(frozen=True)
class LesionResult:
    """Lesion masks (bool, (Z, Y, X)), volumes in mL, mismatch ratio and thresholds used."""

    core: np.ndarray
    hypoperfused: np.ndarray
    penumbra: np.ndarray
    tmax_severe: np.ndarray
    volumes_ml: dict[str, float]
    mismatch_ratio: float | None
    thresholds: dict[str, Any] = field(default_factory=dict)

    def masks(self) -> dict[str, np.ndarray]:
        """The four masks by file name (``core``, ``hypoperfused``, ``penumbra``, ``tmax10``)."""
        return {"core": self.core, "hypoperfused": self.hypoperfused,
                "penumbra": self.penumbra, "tmax10": self.tmax_severe}

    def summary(self) -> dict[str, Any]:
        """JSON-ready volumes, mismatch ratio and thresholds."""
        return {"volumes_ml": dict(self.volumes_ml), "mismatch_ratio": self.mismatch_ratio,
                "thresholds": dict(self.thresholds)}


def normal_cbf_reference(
    cbf: np.ndarray,
    normal: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    mode: str = "contralateral",
    sigma_mm: float = 8.0,
) -> np.ndarray:
    """Normal-tissue CBF reference per voxel, (Z, Y, X) mL/100 g/min.

    Parameters
    ----------
    cbf : ndarray, shape (Z, Y, X)
    normal : ndarray of bool, shape (Z, Y, X)
        Normally perfused brain voxels (the only ones averaged).
    spacing : (dz, dy, dx) mm
    mode : {"contralateral", "global"}
    sigma_mm : float
        In-plane Gaussian neighbourhood of the contralateral average.
    """
    if not normal.any():
        raise ValidationError("no normally perfused brain voxels to take a CBF reference from")
    values = np.where(normal, cbf, 0.0)
    overall = float(np.median(cbf[normal]))
    if mode == "global":
        return np.full(cbf.shape, overall)
    if mode != "contralateral":
        raise ValidationError(
            f"reference must be 'contralateral', 'global' or an array, got {mode!r}")
    x = np.arange(cbf.shape[2])
    weight_x = normal.sum(axis=(0, 1))
    centre = float((x * weight_x).sum() / weight_x.sum())
    mirror = np.rint(2 * centre - x).astype(np.intp)
    inside = (mirror >= 0) & (mirror < cbf.shape[2])
    mirror = np.clip(mirror, 0, cbf.shape[2] - 1)
    m_val = np.where(inside, values[:, :, mirror], 0.0)
    m_w = np.where(inside, normal[:, :, mirror], False).astype(np.float64)
    sig = (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
    num = ndimage.gaussian_filter(m_val, sig, mode="constant")
    den = ndimage.gaussian_filter(m_w, sig, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(den > 0.05, num / den, overall)
    return ref


def segment_lesions(
    maps: PerfusionMaps,
    *,
    brain: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    core_rcbf: float = 0.30,
    core_cbv: float | None = None,
    tmax_hypo: float = 6.0,
    tmax_severe: float = 10.0,
    reference: str | np.ndarray | float = "contralateral",
    sigma_mm: float = 8.0,
    smooth_mm: float = 0.0,
    min_component_ml: float = 0.0,
) -> LesionResult:
    """Segment core, hypoperfused tissue and penumbra.

    Parameters
    ----------
    maps : PerfusionMaps
        Needs ``cbf`` and ``tmax`` (and ``cbv`` when ``core_cbv`` is set).
    brain : ndarray of bool, shape (Z, Y, X), optional
        Where lesions may lie; default where the maps are finite.
    exclude : ndarray of bool, shape (Z, Y, X), optional
        Voxels never labelled (vessels, CSF).
    core_rcbf : float
        Core where CBF < core_rcbf x reference (used when ``core_cbv`` is None).
    core_cbv : float, optional
        Core where CBV < core_cbv mL/100 g instead.
    tmax_hypo, tmax_severe : float
        Tmax thresholds in s.
    reference : "contralateral", "global", float or ndarray (Z, Y, X)
        Normal CBF for rCBF (see module docstring).
    sigma_mm : float
        Neighbourhood of the contralateral reference.
    smooth_mm : float
        Radius (mm) of an in-plane median filter applied to CBF, CBV and Tmax inside the brain
        before thresholding (noisy maps give speckled masks); 0 thresholds the maps as they are.
    min_component_ml : float
        Connected pieces of each mask smaller than this are dropped.

    Returns
    -------
    LesionResult
    """
    cbf, tmax = maps["cbf"].astype(np.float64), maps["tmax"].astype(np.float64)
    valid = np.isfinite(cbf) & np.isfinite(tmax)
    if brain is not None:
        if brain.shape != cbf.shape:
            raise ValidationError(f"brain mask shape {brain.shape} differs from maps {cbf.shape}")
        valid &= brain
    if exclude is not None:
        valid &= ~exclude
    rad = (smooth_mm / maps.spacing[1], smooth_mm / maps.spacing[2])
    cbf, tmax = _smooth(cbf, valid, rad), _smooth(tmax, valid, rad)
    hypo = valid & (tmax > tmax_hypo)
    severe = valid & (tmax > tmax_severe)
    if core_cbv is not None:
        cbv = _smooth(maps["cbv"].astype(np.float64), valid, rad)
        core = valid & (cbv < core_cbv) & np.isfinite(cbv)
        ref_value: float | None = None
    else:
        if isinstance(reference, str):
            ref = normal_cbf_reference(np.where(valid, cbf, 0.0), valid & ~hypo,
                                       spacing=maps.spacing, mode=reference, sigma_mm=sigma_mm)
        else:
            ref = np.broadcast_to(np.asarray(reference, dtype=np.float64), cbf.shape)
        core = valid & (cbf < core_rcbf * ref)
        ref_value = float(np.median(ref[valid])) if valid.any() else None
    voxel_ml = float(np.prod(maps.spacing)) / 1000.0
    if min_component_ml > 0:
        min_voxels = min_component_ml / voxel_ml
        hypo, severe, core = (_drop_small(m, min_voxels) for m in (hypo, severe, core))
    penumbra = hypo & ~core
    volumes = {"core": float(core.sum() * voxel_ml), "hypoperfused": float(hypo.sum() * voxel_ml),
               "penumbra": float(penumbra.sum() * voxel_ml),
               "tmax10": float(severe.sum() * voxel_ml)}
    ratio = volumes["hypoperfused"] / volumes["core"] if volumes["core"] > 0 else None
    thresholds: dict[str, Any] = {
        "core": (f"CBV < {core_cbv} mL/100g" if core_cbv is not None
                 else f"rCBF < {core_rcbf} ({reference if isinstance(reference, str) else 'given'}"
                      " reference)"),
        "hypoperfused": f"Tmax > {tmax_hypo} s", "tmax10": f"Tmax > {tmax_severe} s",
        "reference_cbf_median": ref_value, "smooth_mm": smooth_mm,
        "min_component_ml": min_component_ml,
    }
    return LesionResult(core=core, hypoperfused=hypo, penumbra=penumbra, tmax_severe=severe,
                        volumes_ml=volumes, mismatch_ratio=ratio, thresholds=thresholds)


def _smooth(values: np.ndarray, valid: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    """In-plane median over a disk of ``radius`` voxels (ry, rx); NaN outside ``valid``.

    A median, not a mean: noisy CBF is strongly right-skewed (noise fitted as narrow, tall
    boxes), and a mean would lift low-flow tissue out of the core. Invalid neighbours are set
    alternately far above and far below, so they cancel in the median.
    """
    ry, rx = radius
    if ry <= 0 and rx <= 0:
        return values
    ny, nx = int(np.floor(ry)), int(np.floor(rx))
    yy, xx = np.mgrid[-ny:ny + 1, -nx:nx + 1]
    disk = ((yy / max(ry, 1e-9)) ** 2 + (xx / max(rx, 1e-9)) ** 2) <= 1.0
    checker = (np.indices(values.shape).sum(axis=0) % 2).astype(bool)
    filled = np.where(valid, values, np.where(checker, 1e30, -1e30))
    out = ndimage.median_filter(filled, footprint=disk[None], mode="nearest")
    return np.where(valid, out, np.nan)


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]
