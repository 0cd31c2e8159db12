"""Perfusion maps written by other software: their units turned into ctperf's, their values
checked for the unit they claim.

ctperf's units are :data:`ctperf.types.MAP_UNITS` (CBF mL/100 g/min, CBV mL/100 g, times in
s). A map's JSON sidecar may declare another unit (``{"units": "mL/100g/s"}``): a known one is
converted, an unknown one refused. A map whose brain values are implausible for the unit it is
read in (a CBF median of 0.4 mL/100 g/min, a Tmax median of 2,000 s) is reported: it is almost
always a map in another unit without a sidecar saying so.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from ctperf.errors import InputError
from ctperf.types import MAP_UNITS

__all__ = ["PLAUSIBLE_MEDIANS", "check_plausible", "to_map_unit"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Brain tissue density (g/mL), to read a CBV in % (mL per 100 mL) as mL/100 g.
_RHO = 1.04

# Factor to ctperf's unit, per kind of map and unit spelling (lower case, spaces removed).
_FLOW = {"ml/100g/min": 1.0, "ml/100g/s": 60.0, "ml/100g/sec": 60.0, "ml/g/min": 100.0,
         "ml/g/s": 6000.0, "ml/min/100g": 1.0}
_VOLUME = {"ml/100g": 1.0, "ml/g": 100.0, "%": 1.0 / _RHO, "ml/100ml": 1.0 / _RHO}
_TIME = {"s": 1.0, "sec": 1.0, "seconds": 1.0, "ms": 1e-3, "msec": 1e-3, "min": 60.0}
_FACTORS = {"cbf": _FLOW, "cbv": _VOLUME}

#: (low, high) bounds of a map's median over its finite, non-zero voxels in ctperf's units:
#: generous for any brain, stroke included, far from the same map in another unit.
PLAUSIBLE_MEDIANS: dict[str, tuple[float, float]] = {
    "cbf": (2.0, 250.0), "cbv": (0.2, 20.0), "mtt": (0.3, 40.0), "tmax": (-10.0, 60.0),
    "ttp": (0.0, 200.0), "delay": (-10.0, 60.0)}


def to_map_unit(name: str, values: np.ndarray, unit: str | None,
                path: PathLike) -> np.ndarray:
    """``values`` of map ``name`` declared in ``unit`` (None: ctperf's), in ctperf's unit;
    an InputError naming ``path`` for a unit that cannot be converted."""
    want = MAP_UNITS.get(name)
    if want is None or unit is None or unit == want:
        return values
    key = re.sub(r"\s+", "", unit).lower()
    factor = _FACTORS.get(name, _TIME).get(key)
    if factor is None:
        known = ", ".join(sorted(_FACTORS.get(name, _TIME)))
        raise InputError(path, f"{name} in {unit!r}, a unit ctperf cannot convert to {want} "
                               f"(it reads {known})")
    if factor != 1.0:
        log.info("%s: %s converted from %s to %s", path, name, unit, want)
    return values * np.float32(factor)


def check_plausible(name: str, values: np.ndarray, path: PathLike) -> str | None:
    """A warning (logged and returned) when the median of the map's finite, non-zero voxels
    lies outside :data:`PLAUSIBLE_MEDIANS` for its unit; None when it does not."""
    bounds = PLAUSIBLE_MEDIANS.get(name)
    v = values[np.isfinite(values) & (values != 0)]
    if bounds is None or v.size == 0:
        return None
    median = float(np.median(v))
    if bounds[0] <= median <= bounds[1]:
        return None
    message = (f"{path}: {name} has a median of {median:.4g} where values are set, implausible "
               f"in {MAP_UNITS[name]} ({bounds[0]:g} to {bounds[1]:g}); a map in another unit? "
               "Declare it in the map's JSON sidecar ({\"units\": \"mL/100g/s\"}, \"ms\", ...)")
    log.warning("%s", message)
    return message
