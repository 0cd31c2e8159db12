"""NIfTI reading and writing: 4D studies with a JSON timing sidecar, perfusion maps and masks.

On disk a study is (X, Y, Z, T) as NIfTI stores it; in memory it is (T, Z, Y, X). The NIfTI affine
maps the (X, Y, Z) data indices to mm, which is the affine convention of :mod:`ctperf.types`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctperf.errors import InputError, ValidationError
from ctperf.io.atomic import atomic_file
from ctperf.types import MAP_NAMES, CTPSeries, PerfusionMaps

__all__ = [
    "is_nifti",
    "read_maps",
    "read_mask",
    "read_nifti_series",
    "read_volume",
    "sidecar_path",
    "write_json",
    "write_maps_nifti",
    "write_series_nifti",
    "write_volume",
]

_TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}

PathLike = str | os.PathLike[str]


def is_nifti(path: PathLike) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names."""
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def sidecar_path(path: PathLike) -> Path:
    """``study.nii.gz`` -> ``study.json`` (same stem, same folder)."""
    p = Path(path)
    stem = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
    return p.with_name(stem + ".json")


def write_json(obj: Any, path: PathLike) -> None:
    """Write JSON atomically; numpy scalars and arrays become plain numbers and lists."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot write {type(o).__name__} to JSON")

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default, allow_nan=True) + "\n")


def _load(path: PathLike) -> tuple[np.ndarray, np.ndarray, Any]:
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    try:
        img: Any = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError(f"a {type(img).__name__}, not NIfTI")
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(p, f"not a readable NIfTI file ({exc})") from None
    if not np.all(np.isfinite(data)):
        raise InputError(p, f"contains {int(np.sum(~np.isfinite(data)))} NaN or Inf values")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def read_nifti_series(path: PathLike) -> CTPSeries:
    """Read a 4D NIfTI (X, Y, Z, T) study.

    Frame times come from the JSON sidecar's ``FrameTimes`` (seconds) when present, else from
    ``pixdim[4]`` in the header's time unit. A sidecar's ``SliceTimes`` (T x Z) and ``meta``
    are kept.
    """
    p = Path(path)
    data, affine, header = _load(p)
    if data.ndim != 4:
        raise InputError(p, f"a CTP study must be 4D (X, Y, Z, T), this file is {data.ndim}D "
                            f"with shape {data.shape}")
    n_frames = data.shape[3]
    side = sidecar_path(p)
    meta: dict[str, Any] = {}
    slice_times = None
    if side.exists():
        try:
            info = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(side, f"sidecar is not valid JSON ({exc})") from None
        meta.update(info.get("meta", {}))
        if "FrameTimes" in info:
            times = np.asarray(info["FrameTimes"], dtype=np.float64)
            if times.shape != (n_frames,):
                raise InputError(side, f"FrameTimes has {times.size} entries, the image has "
                                       f"{n_frames} frames")
            meta["timing_source"] = "sidecar FrameTimes"
        else:
            times = None
        if info.get("SliceTimes") is not None:
            slice_times = np.asarray(info["SliceTimes"], dtype=np.float64)
    else:
        times = None
    if times is None:
        unit = header.get_xyzt_units()[1]
        dt = float(header["pixdim"][4]) * _TIME_UNIT_SECONDS.get(unit, 1.0)
        if not dt > 0:
            raise InputError(p, "no frame timing: pixdim[4] is 0 and there is no JSON sidecar "
                                "with FrameTimes")
        times = np.arange(n_frames, dtype=np.float64) * dt
        meta["timing_source"] = f"pixdim[4] ({unit or 'unknown unit, taken as s'})"
    hu = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    try:
        return CTPSeries(hu=hu, times=times, affine=affine, slice_times=slice_times, meta=meta)
    except ValidationError as exc:
        raise InputError(side if side.exists() else p, str(exc)) from None


def write_series_nifti(series: CTPSeries, path: PathLike, *, dtype: str = "float32") -> Path:
    """Write a study as 4D NIfTI plus a JSON sidecar (FrameTimes, SliceTimes, meta).

    ``dtype="int16"`` rounds HU to integers, as scanners store them (4x smaller files).
    """
    p = Path(path)
    data = series.hu.transpose(3, 2, 1, 0)
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
    img = nib.Nifti1Image(np.ascontiguousarray(data), series.affine)
    img.header.set_xyzt_units("mm", "sec")
    zooms = [*img.header.get_zooms()[:3], series.frame_interval]
    img.header.set_zooms(zooms)
    with atomic_file(p) as tmp:
        nib.save(img, str(tmp))
    side: dict[str, Any] = {"FrameTimes": series.times, "meta": dict(series.meta)}
    if series.slice_times is not None:
        side["SliceTimes"] = series.slice_times
    write_json(side, sidecar_path(p))
    return p


def write_volume(volume: np.ndarray, affine: np.ndarray, path: PathLike,
                 *, sidecar: Mapping[str, Any] | None = None) -> Path:
    """Write one (Z, Y, X) volume (map or mask) as 3D NIfTI; booleans are stored as uint8."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValidationError(f"volume must be 3D (Z, Y, X), got shape {vol.shape}")
    if vol.dtype == bool:
        vol = vol.astype(np.uint8)
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))
    if sidecar is not None:
        write_json(dict(sidecar), sidecar_path(path))
    return Path(path)


def read_volume(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as ((Z, Y, X) float32 array, affine)."""
    p = Path(path)
    data, affine, _ = _load(p)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(p, f"expected a 3D volume, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine


def read_mask(path: PathLike, *, shape: tuple[int, int, int], affine: np.ndarray,
              atol_mm: float = 1e-3) -> np.ndarray:
    """Read a 3D mask (nonzero = inside) and check it lies on the grid ``shape``/``affine``."""
    vol, mask_affine = read_volume(path)
    if vol.shape != tuple(shape):
        raise InputError(path, f"mask grid {vol.shape} (Z, Y, X) differs from the study grid "
                               f"{tuple(shape)}; resample it onto the study first")
    if not np.allclose(mask_affine, affine, atol=atol_mm):
        raise InputError(path, "mask affine differs from the study affine (another grid or "
                               "orientation); resample it onto the study first")
    mask = vol != 0
    if not mask.any():
        raise InputError(path, "mask is empty")
    return mask


def write_maps_nifti(maps: PerfusionMaps, folder: PathLike,
                     *, names: Iterable[str] | None = None) -> list[Path]:
    """Write each map as ``<folder>/<name>.nii.gz`` with a sidecar of units and provenance."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names if names is not None else maps.names:
        sidecar = {"map": name, "units": maps.units[name], **maps.provenance}
        written.append(write_volume(maps[name], maps.affine, out / f"{name}.nii.gz",
                                    sidecar=sidecar))
    return written


def read_maps(folder: PathLike, *, names: Iterable[str] | None = None) -> PerfusionMaps:
    """Read ``<folder>/<name>.nii.gz`` maps (all known names present, or those asked for)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "not a folder of maps")
    wanted = list(names) if names is not None else [
        n for n in MAP_NAMES if (root / f"{n}.nii.gz").exists()]
    if not wanted:
        raise InputError(root, f"no map files ({', '.join(n + '.nii.gz' for n in MAP_NAMES)})")
    arrays: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    provenance: dict[str, Any] = {}
    affine = None
    for name in wanted:
        path = root / f"{name}.nii.gz"
        arrays[name], aff = read_volume(path)
        if affine is None:
            affine = aff
        elif not np.allclose(aff, affine, atol=1e-3):
            raise InputError(path, "map affine differs from the other maps in the folder")
        side = sidecar_path(path)
        if side.exists():
            info = json.loads(side.read_text())
            units[name] = info.pop("units", None) or units.get(name, "1")
            info.pop("map", None)
            provenance.update(info)
    assert affine is not None
    return PerfusionMaps(maps=arrays, affine=affine, units=units, provenance=provenance)
