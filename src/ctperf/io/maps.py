"""Perfusion maps read from disk, ctperf's or other software's: files found by name in any
case, units turned into ctperf's, values checked for the unit they claim.

ctperf's units are :data:`ctperf.types.MAP_UNITS` (CBF mL/100 g/min, CBV mL/100 g, times in
s). A map's JSON sidecar may declare another unit (``{"units": "mL/100g/s"}``): a known one is
converted, an unknown one refused. A map whose brain values are implausible for the unit it is
read in (a CBF median of 0.4 mL/100 g/min, a Tmax median of 2,000 s) is reported: it is almost
always a map in another unit without a sidecar saying so.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError
from ctperf.io.nifti import file_qform, has_orientation, read_volume, sidecar_path
from ctperf.types import MAP_NAMES, MAP_UNITS, PerfusionMaps

__all__ = ["BACKGROUND_SHARE", "CAPPED_MIN_VOXELS", "CAPPED_SHARE", "PLAUSIBLE_MEDIANS",
           "background_value", "check_capped", "check_display_image", "check_plausible",
           "conversion_note", "edge_background", "map_file", "read_maps", "to_map_unit"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Brain tissue density (g/mL), to read a CBV in % (mL per 100 mL), or a CBF per 100 mL of
#: tissue, per 100 g.
_RHO = 1.04

# Factor to ctperf's unit, per kind of map and unit spelling (lower case, spaces removed).
_FLOW = {"ml/100g/min": 1.0, "ml/100g/s": 60.0, "ml/100g/sec": 60.0, "ml/g/min": 100.0,
         "ml/g/s": 6000.0, "ml/min/100g": 1.0,
         "ml/100ml/min": 1.0 / _RHO, "ml/min/100ml": 1.0 / _RHO, "ml/100ml/s": 60.0 / _RHO,
         "ml/100ml/sec": 60.0 / _RHO}
_VOLUME = {"ml/100g": 1.0, "ml/g": 100.0, "%": 1.0 / _RHO, "ml/100ml": 1.0 / _RHO}
_TIME = {"s": 1.0, "sec": 1.0, "seconds": 1.0, "ms": 1e-3, "msec": 1e-3, "min": 60.0}
_FACTORS = {"cbf": _FLOW, "cbv": _VOLUME}

#: (low, high) bounds of a map's median over its finite, non-zero voxels in ctperf's units:
#: generous for any brain, stroke included, far from the same map in another unit.
PLAUSIBLE_MEDIANS: dict[str, tuple[float, float]] = {
    "cbf": (2.0, 250.0), "cbv": (0.2, 20.0), "mtt": (0.3, 40.0), "tmax": (-10.0, 60.0),
    "ttp": (0.0, 200.0), "delay": (-10.0, 60.0)}


def _conversion(name: str, unit: str | None) -> tuple[float, str] | None:
    """(factor to ctperf's unit, its note for the record) of map ``name`` declared in
    ``unit``; None when there is nothing to convert; factor NaN for a unit not known."""
    want = MAP_UNITS.get(name)
    if want is None or unit is None or unit == want:
        return None
    key = re.sub(r"\s+", "", unit).lower()
    factor = _FACTORS.get(name, _TIME).get(key, float("nan"))
    # a CBV per 100 mL read per 100 g takes a brain density
    density = f", at a brain density of {_RHO:g} g/mL" if key == "%" or "100ml" in key else ""
    return factor, f"{name} converted from {unit} to {want} (x {factor:.4g}{density})"


def to_map_unit(name: str, values: np.ndarray, unit: str | None,
                path: PathLike) -> np.ndarray:
    """``values`` of map ``name`` declared in ``unit`` (None: ctperf's), in ctperf's unit;
    an InputError naming ``path`` for a unit that cannot be converted."""
    found = _conversion(name, unit)
    if found is None:
        return values
    factor, note = found
    if not np.isfinite(factor):
        known = ", ".join(sorted(_FACTORS.get(name, _TIME)))
        raise InputError(path, f"{name} in {unit!r}, a unit ctperf cannot convert to "
                               f"{MAP_UNITS[name]} (it reads {known})")
    if factor != 1.0:
        log.info("%s: %s", path, note)
    # in float64: 6000 ms times a float32 0.001 is 6.0000005 s, over a 6 s threshold
    return (np.asarray(values, dtype=np.float64) * factor).astype(np.float32)


def conversion_note(name: str, unit: str | None) -> str | None:
    """What :func:`to_map_unit` did to map ``name`` declared in ``unit``, for the record;
    None when nothing (the unit is ctperf's, or another spelling of it)."""
    found = _conversion(name, unit)
    return None if found is None or found[0] == 1.0 else found[1]


#: A map another tool wrote whose largest value is held by at least this share of its set
#: voxels (and :data:`CAPPED_MIN_VOXELS`) was capped at a display limit.
CAPPED_SHARE = 0.01
CAPPED_MIN_VOXELS = 10


def check_capped(name: str, values: np.ndarray, path: PathLike) -> str | None:
    """A warning (logged, and returned without the path) when the map's largest value is held
    by :data:`CAPPED_SHARE` or more of its set voxels (other than its background): values
    capped at a display limit (CBF at 100, Tmax at 10 s), whose true values are unknown and
    read low; None when not."""
    keep = np.isfinite(values)
    background = background_value(values)
    if background is not None:
        keep &= values != background
    v = values[keep]
    if v.size == 0:
        return None
    top = float(v.max())
    if not float(v.min()) < top:  # one value throughout: no cap to tell
        return None
    held = int(np.count_nonzero(v == top))
    if held < CAPPED_MIN_VOXELS or held < CAPPED_SHARE * v.size:
        return None
    message = (f"{name}: {held / v.size:.1%} of its voxels hold its largest value, {top:.4g}: "
               "capped at a display limit (or a fit's bound)? Their true values are higher "
               "and unknown, so the comparison reads them low; export the maps uncapped")
    log.warning("%s: %s", path, message)
    return message


def check_display_image(name: str, values: np.ndarray, path: PathLike) -> None:
    """Refuse a map (``values`` as read from ``path``) stored as unscaled 8-bit values reaching
    255: a display image (greys or a colour table's index windowed into 0-255), not measured
    values. Only the file's header is read again."""
    import nibabel as nib

    header: Any = nib.load(str(path)).header
    slope, inter = header.get_slope_inter()
    if (header.get_data_dtype() != np.uint8 or slope not in (None, 1.0)
            or inter not in (None, 0.0)):
        return
    if float(np.nanmax(values)) == 255.0:
        raise InputError(path, f"{name} is stored as 8-bit values up to 255 without a scale "
                               "(scl_slope): a display image windowed into grey levels, not "
                               "measured values; export the maps' values")


#: A value that is not positive and is held by more than this share of a map's voxels is the
#: background another tool wrote outside the brain (0 or -1 where ctperf writes NaN).
BACKGROUND_SHARE = 0.2


def background_value(values: np.ndarray) -> float | None:
    """The map's background (:data:`BACKGROUND_SHARE`): its most frequent value that is not
    positive when that fills more than the share; None when there is none."""
    low = values[np.isfinite(values) & (values <= 0)]
    if low.size == 0:
        return None
    levels, counts = np.unique(low, return_counts=True)
    return float(levels[np.argmax(counts)]) if counts.max() > BACKGROUND_SHARE * values.size \
        else None


def edge_background(*maps: np.ndarray) -> np.ndarray:
    """Where every one of the (Z, Y, X) ``maps`` holds its background value
    (:func:`background_value`; NaN in a map that has none), connected within its slice to the
    slice's edge: the air around a head written as 0 or -1, not the same value enclosed by the
    brain, nor a core's CBF of 0 at the brain's surface when its Tmax is also given."""
    from scipy import ndimage

    held = np.ones(maps[0].shape, dtype=bool)
    for values in maps:
        value = background_value(values)
        held &= ~np.isfinite(values) if value is None else values == value
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(held, structure=in_plane)
    edge = np.zeros(held.shape, dtype=bool)
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    touching = np.unique(labels[edge & held])
    return np.isin(labels, touching[touching > 0])


def check_plausible(name: str, values: np.ndarray, path: PathLike) -> str | None:
    """A warning (logged, and returned without the path) when the median of the map's finite
    voxels other than 0 and its background (:func:`background_value`) lies outside
    :data:`PLAUSIBLE_MEDIANS` for its unit; None when it does not."""
    bounds = PLAUSIBLE_MEDIANS.get(name)
    keep = np.isfinite(values) & (values != 0)
    background = background_value(values)
    if background is not None:
        keep &= values != background
    v = values[keep]
    if bounds is None or v.size == 0:
        return None
    median = float(np.median(v))
    if bounds[0] <= median <= bounds[1]:
        return None
    message = (f"{name} has a median of {median:.4g} where values are set, implausible in "
               f"{MAP_UNITS[name]} ({bounds[0]:g} to {bounds[1]:g}); a map in another unit? "
               "Declare it in the map's JSON sidecar ({\"units\": \"mL/100g/s\"}, \"ms\", ...)")
    log.warning("%s: %s", path, message)
    return message


def map_file(folder: PathLike, name: str) -> Path | None:
    """The file of map ``name`` in ``folder``: ``<name>.nii.gz`` or ``<name>.nii`` with its
    name in any case (``CBF.nii``, ``Tmax.nii.gz``, as other software writes them); None.
    Two such files (``cbf.nii.gz`` and ``CBF.nii``, which may hold different scalings) are
    refused rather than one taken."""
    root = Path(folder)
    found = sorted(p for p in root.iterdir() if p.is_file()
                   and p.name.lower() in (f"{name}.nii.gz", f"{name}.nii"))
    if len(found) > 1:
        raise InputError(root, f"{' and '.join(p.name for p in found)} could each be the "
                               f"{name} map: keep one")
    return found[0] if found else None


def _summary_names_ctperf(folder: Path) -> bool:
    """Whether ``folder``'s ``summary.json`` says a ctperf wrote the maps (their sidecars may
    have been left behind in a copy)."""
    try:
        doc = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and bool(doc.get("software_version"))


def read_maps(folder: PathLike, *, names: Iterable[str] | None = None) -> PerfusionMaps:
    """Read the maps of a folder (all known names present, or those asked for):
    ``<name>.nii.gz`` or ``.nii``, the name in any case (:func:`map_file`). A map whose JSON
    sidecar declares another unit than ctperf's is converted (:func:`to_map_unit`);
    one whose values are implausible for its unit is reported in the log and in
    ``provenance["unit_warnings"]``. Maps without
    orientation have ``provenance["orientation_unknown"]``."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "not a folder of maps")
    files = {n: map_file(root, n) for n in (names if names is not None else MAP_NAMES)}
    if names is None:
        files = {n: f for n, f in files.items() if f is not None}
    if not files:
        raise InputError(root, f"no map files ({', '.join(n + '.nii.gz' for n in MAP_NAMES)}, "
                               "or .nii, any case)")
    arrays: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    provenance: dict[str, Any] = {}
    affine = qform = None
    made_here = _summary_names_ctperf(root)
    for name, found in files.items():
        path = found if found is not None else root / f"{name}.nii.gz"
        arrays[name], aff = read_volume(path, allow_nan=True)
        if not has_orientation(path):
            provenance["orientation_unknown"] = True
        if affine is None:
            affine = aff
            qform = file_qform(path)  # the maps' own header, not a sidecar's record
        elif not np.allclose(aff, affine, atol=1e-3):
            raise InputError(path, "map affine differs from the other maps in the folder")
        declared = None
        info: dict[str, Any] = {}
        side = sidecar_path(path)
        if side.exists():
            try:
                info = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(side, f"map sidecar is not readable JSON ({exc})") from None
            if not isinstance(info, dict):
                raise InputError(side, f"map sidecar must be a JSON object, got a "
                                       f"{type(info).__name__}")
            # "units" as ctperf writes it, or "Units" as BIDS spells its keys
            key = next((k for k in info if str(k).lower() == "units"), None)
            declared = info.pop(key) if key is not None else None
            info.pop("map", None)
            provenance.update(info)
        ours = bool(info.get("software_version")) or made_here  # a ctperf's map
        if not ours:
            check_display_image(name, arrays[name], path)
        arrays[name] = to_map_unit(name, arrays[name], declared, side)
        units[name] = MAP_UNITS.get(name) or declared or "1"
        note = conversion_note(name, declared)
        if note is not None:
            provenance.setdefault("unit_conversions", []).append(note)
        doubt = check_plausible(name, arrays[name], path)
        if doubt is None and not ours and name != "ttp":  # TTP stops at the scan's end
            doubt = check_capped(name, arrays[name], path)
        if doubt is not None:
            provenance.setdefault("unit_warnings", []).append(doubt)
    assert affine is not None
    # what the files say made them, or nothing: not the ctperf that reads them
    provenance.setdefault("software_version", None)
    provenance.pop("nifti_qform", None)
    if qform is not None:
        provenance["nifti_qform"] = qform
    return PerfusionMaps(maps=arrays, affine=affine, units=units, provenance=provenance)
