"""The one table of display windows, map labels and titles with units.

Every figure of ctperf takes its colour limits and its map titles from here, so that the same map
looks the same in the maps overview, the evaluation report, the demo and the phantom preview.
"""

from __future__ import annotations

import numpy as np

from ctperf.types import MAP_UNITS

__all__ = [
    "BRAIN_WINDOW_HU",
    "DISPLAY_WINDOWS",
    "MAP_LABELS",
    "VESSEL_WINDOW_HU",
    "colorbar_extend",
    "display_window",
    "map_title",
]

#: Display window per map in its physical unit (:data:`ctperf.types.MAP_UNITS`). ``None`` means
#: the study's own range, the 2nd to 98th percentile of the values shown: TTP counts from the
#: first frame, so it depends on when the bolus came, and no fixed window fits every study.
DISPLAY_WINDOWS: dict[str, tuple[float, float] | None] = {
    "cbf": (0.0, 80.0), "cbv": (0.0, 6.0), "mtt": (0.0, 14.0), "tmax": (0.0, 14.0),
    "delay": (0.0, 10.0), "ttp": None,
}

#: Grey-level windows of CT frames in HU: brain (W 80 / L 40) and contrast-filled vessels.
BRAIN_WINDOW_HU: tuple[float, float] = (0.0, 80.0)
VESSEL_WINDOW_HU: tuple[float, float] = (-20.0, 300.0)

#: How a map's name is written in figure titles.
MAP_LABELS: dict[str, str] = {"cbf": "CBF", "cbv": "CBV", "mtt": "MTT", "ttp": "TTP",
                              "tmax": "Tmax", "delay": "delay"}

#: Percentiles of the study-relative window (``None`` in :data:`DISPLAY_WINDOWS`).
_RELATIVE_PERCENTILES = (2.0, 98.0)


def display_window(name: str, values: np.ndarray | None = None) -> tuple[float, float]:
    """Colour limits (low, high) of map ``name`` in its unit.

    Parameters
    ----------
    name : str
        Map name (``cbf``, ``cbv``, ``mtt``, ``ttp``, ``tmax``, ``delay`` or another).
    values : ndarray, optional
        The values shown (any shape, NaN ignored); needed for maps whose window is the study's
        own range: those marked ``None`` in :data:`DISPLAY_WINDOWS` and names not in it.

    Returns
    -------
    tuple of float
        The fixed window of the table, else the 2nd and 98th percentiles of ``values``.
    """
    window = DISPLAY_WINDOWS.get(name)
    if window is not None:
        return window
    if values is None:
        raise ValueError(f"map {name!r} is shown in the study's own range: pass its values")
    low, high = _RELATIVE_PERCENTILES
    return float(np.nanpercentile(values, low)), float(np.nanpercentile(values, high))


def colorbar_extend(values: np.ndarray, window: tuple[float, float]) -> str:
    """Matplotlib's ``extend`` for a colour bar of ``window``: a pointed end on each side that
    the shown ``values`` (NaN ignored) pass, so that a map saturating the window (CBF of 300,
    a negative Tmax) is not read as lying at its edge."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    low = bool(v.size) and float(v.min()) < window[0]
    high = bool(v.size) and float(v.max()) > window[1]
    return {(False, False): "neither", (True, False): "min", (False, True): "max",
            (True, True): "both"}[(low, high)]


def map_title(name: str, *, unit: str | None = None) -> str:
    """``"CBF mL/100g/min"``: the map's label and unit (``unit`` overrides the standard one);
    an uncertainty map ``<map>_sd`` reads ``"CBF SD mL/100g/min"``."""
    base = name.removesuffix("_sd")
    label = MAP_LABELS.get(base, base) + (" SD" if base != name else "")
    unit = MAP_UNITS.get(base, "") if unit is None else unit
    return f"{label} {unit}".strip()
