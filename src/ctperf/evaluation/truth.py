"""Compare estimated perfusion maps and lesions with a known truth (the digital phantom).

Voxel-wise agreement per map and tissue class, and lesion agreement (Dice, volume error) of the
core, hypoperfused and penumbra masks, gathered into one JSON-ready dictionary and a Markdown table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ctperf.evaluation.metrics import dice, map_agreement
from ctperf.types import SVD_METHODS, PerfusionMaps

__all__ = ["EVALUATED_MAPS", "LESIONS", "compare_with_truth", "truth_table_markdown"]

#: Maps compared with the truth, in report order.
EVALUATED_MAPS = ("cbf", "cbv", "mtt", "tmax", "delay", "ttp")
#: Lesion masks compared with the truth.
LESIONS = ("core", "hypoperfused", "penumbra")


def compare_with_truth(maps: PerfusionMaps, truth: PerfusionMaps, *,
                       regions: Mapping[str, np.ndarray],
                       lesions: Mapping[str, np.ndarray] | None = None,
                       true_lesions: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Agreement of ``maps`` with ``truth``.

    Parameters
    ----------
    maps, truth : PerfusionMaps
        On the same grid; maps missing from either side are skipped.
    regions : mapping of str to bool ndarray (Z, Y, X)
        Where to compare, e.g. ``{"brain": ..., "gm": ..., "wm": ..., "core": ...}``; empty regions
        give ``n = 0`` and NaN figures.
    lesions, true_lesions : mapping of str to bool ndarray (Z, Y, X), optional
        Estimated and true lesion masks by name (``core``, ``hypoperfused``, ``penumbra``).

    Returns
    -------
    dict
        ``{"maps": {name: {region: MapAgreement.as_dict(), ...}}, "units": {...},
        "lesions": {name: {"dice", "volume_ml", "true_volume_ml", "volume_error_ml"}},
        "left_out": {name: why}}``. An SVD method's ``delay`` map is its Tmax, not an arrival
        delay, and is left out (as ``ctperf evaluate`` leaves it out of Table 1).
    """
    if maps.shape != truth.shape:
        raise ValueError(f"maps grid {maps.shape} differs from truth grid {truth.shape}")
    voxel_ml = maps.voxel_ml
    out: dict[str, Any] = {"maps": {}, "units": {}, "lesions": {}, "left_out": {}}
    method = maps.provenance.get("method")
    if method in SVD_METHODS and "delay" in maps:
        out["left_out"]["delay"] = (f"{method}'s delay map is its Tmax, not an arrival delay: "
                                    "compare tmax")
    for name in EVALUATED_MAPS:
        if name in maps and name in truth and name not in out["left_out"]:
            out["maps"][name] = {region: map_agreement(maps[name], truth[name], mask=m).as_dict()
                                 for region, m in regions.items()}
            out["units"][name] = truth.units[name]
    if lesions is not None and true_lesions is not None:
        for name in LESIONS:
            if name in lesions and name in true_lesions:
                est, ref = np.asarray(lesions[name], bool), np.asarray(true_lesions[name], bool)
                vol, true_vol = est.sum() * voxel_ml, ref.sum() * voxel_ml
                out["lesions"][name] = {"dice": dice(est, ref), "volume_ml": float(vol),
                                        "true_volume_ml": float(true_vol),
                                        "volume_error_ml": float(vol - true_vol)}
    return out


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def truth_table_markdown(result: Mapping[str, Any], *, region: str = "brain") -> str:
    """Markdown tables of :func:`compare_with_truth`'s output (one region, then lesions)."""
    lines = [f"| map ({region}) | unit | true mean | MAE | bias | RMSE | Pearson r | Lin's CCC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_region in result["maps"].items():
        a = by_region.get(region)
        if a is None:
            continue
        lines.append(f"| {name} | {result['units'][name]} | {_fmt(a['reference_mean'])} | "
                     f"{_fmt(a['mae'])} | {_fmt(a['bias'])} | {_fmt(a['rmse'])} | "
                     f"{_fmt(a['pearson_r'], 3)} | {_fmt(a['ccc'], 3)} |")
    lines += [f"\n{name} left out: {why}." for name, why in result.get("left_out", {}).items()]
    if result.get("lesions"):
        lines += ["", "| lesion | Dice | volume mL | true volume mL | error mL |",
                  "|---|---|---|---|---|"]
        for name, v in result["lesions"].items():
            lines.append(f"| {name} | {_fmt(v['dice'])} | {_fmt(v['volume_ml'], 1)} | "
                         f"{_fmt(v['true_volume_ml'], 1)} | {_fmt(v['volume_error_ml'], 1)} |")
    return "\n".join(lines) + "\n"
