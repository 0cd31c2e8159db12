"""Core data types: a CT perfusion series and a set of perfusion maps.

Numpy only, no file access. Arrays are indexed (T, Z, Y, X) for series and (Z, Y, X) for maps; the
affine maps a voxel's *index vector in reverse array order* ``(x, y, z, 1)`` (column, row, slice) to
patient coordinates in mm, as in NIfTI. :func:`spacing_zyx` returns the voxel size in array order.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from ctperf.errors import ValidationError

__all__ = [
    "MAP_NAMES",
    "MAP_UNITS",
    "METHODS",
    "SVD_METHODS",
    "CTPSeries",
    "PerfusionMaps",
    "RadiologicalView",
    "non_axial_slices",
    "orient",
    "orientation_known",
    "radiological_flips",
    "refuse_masked",
    "spacing_zyx",
    "voxel_ml",
]

#: Map names written to disk (``<out>/<name>.nii.gz``) and their physical units.
MAP_UNITS: dict[str, str] = {
    "cbf": "mL/100g/min",
    "cbv": "mL/100g",
    "mtt": "s",
    "ttp": "s",
    "tmax": "s",
    "delay": "s",
}
MAP_NAMES: tuple[str, ...] = tuple(MAP_UNITS)

#: The model-based methods of ``ctperf maps`` (``ctperf.perfusion.run_perfusion``).
METHODS: tuple[str, ...] = ("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes")
#: The deconvolution methods among them: they measure no arrival delay apart from the residue's
#: peak, so their ``delay`` map is their Tmax.
SVD_METHODS: tuple[str, ...] = ("ssvd", "bsvd", "osvd")


def spacing_zyx(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm in array order (dz, dy, dx) from a 4x4 voxel-to-patient affine."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(norms[2]), float(norms[1]), float(norms[0])


def non_axial_slices(affine: np.ndarray) -> str | None:
    """Why a study's slices are not axial, or None: its third array axis, along which slices
    are stacked, runs closer to the patient's left-right or front-back axis than to head-foot
    (a gantry tilt or a turned head keeps it closest to head-foot). The midline, the
    contralateral reference, the figures and the U-Net take slices to be axial; sagittal
    slices mirrored a hemisphere onto itself.

    Parameters
    ----------
    affine : ndarray (4, 4)
        Voxel-to-patient (RAS) affine of the ``(x, y, z, 1)`` index vector.
    """
    axis = int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[:3, 2])))
    if axis == 2:
        return None
    kind, along = (("sagittal", "left-right"), ("coronal", "front-back"))[axis]
    return (f"its slices are stacked along the patient's {along} axis ({kind} slices, or a "
            "file storing its axes in another order), and ctperf maps axial slices stacked "
            "along the third axis; reslice the study to axial, or reorder the file's axes "
            "(e.g. nibabel's as_closest_canonical)")


def radiological_flips(affine: np.ndarray) -> tuple[bool, bool]:
    """Flips (rows, columns) that turn a (.., Y, X) slice to the radiological orientation in
    which DICOM stores axial images: anterior at the first row, the patient's right at the
    first column. Axes that do not run front-back (rows) or left-right (columns) are left as
    they are.

    Parameters
    ----------
    affine : ndarray (4, 4)
        Voxel-to-patient (RAS) affine of the ``(x, y, z, 1)`` index vector.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    col_axis = int(np.argmax(np.abs(a[:, 0])))
    row_axis = int(np.argmax(np.abs(a[:, 1])))
    flip_cols = col_axis == 0 and a[0, 0] > 0
    flip_rows = row_axis == 1 and a[1, 1] > 0
    return bool(flip_rows), bool(flip_cols)


@dataclass(frozen=True)
class RadiologicalView:
    """How figures show a (..., Y, X) slice radiologically (anterior up, the patient's right on
    the left), whatever order the file stores its axes in: transposed first when its columns
    run front-back and its rows left-right, then flipped (:func:`radiological_flips` of the
    affine with its in-plane axes in that order). The network's slices are only flipped
    (:func:`radiological_flips`)."""

    swap: bool
    flips: tuple[bool, bool]

    @classmethod
    def of(cls, affine: np.ndarray) -> RadiologicalView:
        """The view of slices of a study with voxel-to-patient (RAS) ``affine``."""
        a = np.asarray(affine, dtype=np.float64)
        swap = (int(np.argmax(np.abs(a[:3, 0]))) == 1
                and int(np.argmax(np.abs(a[:3, 1]))) == 0)
        return cls(swap, radiological_flips(a[:, [1, 0, 2, 3]] if swap else a))

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (..., Y, X) as shown: a view, not a copy."""
        return orient(np.swapaxes(arr, -1, -2) if self.swap else arr, self.flips)

    def aspect(self, dy: float, dx: float) -> float:
        """Height over width, as shown, of a pixel of ``dy`` x ``dx`` mm (rows x columns)."""
        return dx / dy if self.swap else dy / dx


def orient(arr: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """``arr`` (..., Y, X) with its rows and/or columns reversed as ``flips`` (rows, columns;
    :func:`radiological_flips`) say; the same call undoes it. A view, not a copy."""
    rows, cols = flips
    if rows:
        arr = arr[..., ::-1, :]
    if cols:
        arr = arr[..., ::-1]
    return arr


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL from a 4x4 voxel-to-patient affine: its determinant, which a
    sheared grid (slices stepped along the table under a tilted gantry) needs; the product of
    :func:`spacing_zyx`'s sizes would overstate it by 1 / cos(tilt)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _check_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValidationError(f"affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValidationError("affine contains NaN or Inf")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValidationError(f"affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValidationError("affine is singular (a voxel axis has zero length)")
    return a


def refuse_masked(value: Any, name: str, read_as: str) -> None:
    """ValidationError for a NumPy masked array with masked values, whose hidden contents
    ``np.asarray`` would have read as ``read_as``."""
    if np.ma.is_masked(value):
        n = int(np.ma.count_masked(value))
        raise ValidationError(f"{name} is a masked array with {n} masked value"
                              f"{'' if n == 1 else 's'}, whose hidden contents would be read as "
                              f"{read_as}")


def _check_increasing(times: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(times)):
        raise ValidationError(f"{what} contain NaN or Inf")
    steps = np.diff(times, axis=0)
    if np.any(steps <= 0):
        bad = int(np.argwhere(steps <= 0)[0][0])
        raise ValidationError(
            f"{what} must be strictly increasing; frame {bad + 1} is not after frame {bad} "
            f"({np.take(times, bad, axis=0)} -> {np.take(times, bad + 1, axis=0)} s)"
        )


@dataclass(frozen=True, eq=False)
class CTPSeries:
    """A 4D CT perfusion study.

    Parameters
    ----------
    hu : ndarray, float32, shape (T, Z, Y, X)
        Attenuation in Hounsfield units.
    times : ndarray, float64, shape (T,)
        Acquisition time of each frame in seconds, strictly increasing, possibly non-uniform.
    affine : ndarray, shape (4, 4)
        Voxel ``(x, y, z, 1)`` -> patient mm (see module docstring). Default the identity:
        1 mm voxels, which sets every volume in mL, the lesions' clean-up in mm and the vessel
        search; the maps warn of a study that carries it.
    slice_times : ndarray, float64, shape (T, Z), optional
        Per-slice acquisition times when a scanner gives each slice its own (shuttle mode);
        ``times`` is then their mean over slices.
    meta : mapping
        Free metadata: ``series_uid``, ``description``, ``scanner``, ``kvp``, ``mas``,
        ``timing_source`` and whatever a reader knows.
    """

    hu: np.ndarray
    times: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    slice_times: np.ndarray | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # np.asarray drops a mask: the hidden values had been read as CT numbers and times
        refuse_masked(self.hu, "hu", "CT numbers; fill them (padding around a stripped brain "
                                     "is air: hu.filled(-1024.0))")
        for name in ("times", "slice_times"):
            refuse_masked(getattr(self, name), name, "frame times; give every frame its time")
        hu = np.asarray(self.hu)
        if hu.ndim != 4:
            raise ValidationError(
                f"hu must be 4D (T, Z, Y, X), got {hu.ndim}D with shape {hu.shape}"
            )
        if min(hu.shape) < 1:
            raise ValidationError(f"hu has an empty axis: shape {hu.shape}")
        if hu.dtype.kind == "O":  # values held as Python objects: judged by what they are
            try:
                held = np.array(hu.tolist())
                if held.dtype.kind == "O" and all(isinstance(v, numbers.Real | Decimal)
                                                  and not isinstance(v, bool)
                                                  for v in held.flat):
                    held = held.astype(np.float64)  # Decimal, Fraction
                hu = held
            except (TypeError, ValueError, OverflowError):
                pass
        if hu.dtype.kind not in "iuf":  # complex, bool, text: not CT numbers
            raise ValidationError(f"hu must hold real numbers (CT numbers in HU), got dtype "
                                  f"{hu.dtype}")
        hu = hu.astype(np.float32, copy=False)
        if not np.all(np.isfinite(hu)):
            bad = int(np.count_nonzero(~np.isfinite(hu)))
            raise ValidationError(
                f"hu contains NaN or Inf values ({bad} of {hu.size}); padding around a "
                "stripped brain is air: np.nan_to_num(hu, nan=-1024.0) (the readers do this "
                "for a file's NaN padding)")
        times = np.asarray(self.times, dtype=np.float64)
        if times.shape != (hu.shape[0],):
            raise ValidationError(
                f"times must have shape (T,) = ({hu.shape[0]},) to match hu, got {times.shape}"
            )
        _check_increasing(times, "times")
        slice_times = self.slice_times
        if slice_times is not None:
            slice_times = np.asarray(slice_times, dtype=np.float64)
            if slice_times.shape != hu.shape[:2]:
                raise ValidationError(
                    f"slice_times must have shape (T, Z) = {hu.shape[:2]}, got {slice_times.shape}"
                )
            _check_increasing(slice_times, "slice_times")
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "slice_times", slice_times)
        object.__setattr__(self, "affine", _check_affine(self.affine))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, Z, Y, X)."""
        t, z, y, x = self.hu.shape
        return t, z, y, x

    @property
    def n_frames(self) -> int:
        return int(self.hu.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, (dz, dy, dx)."""
        return spacing_zyx(self.affine)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel, mL (:func:`voxel_ml`)."""
        return voxel_ml(self.affine)

    @property
    def frame_interval(self) -> float:
        """Median time between frames in seconds."""
        return float(np.median(np.diff(self.times))) if self.n_frames > 1 else 0.0

    def replace(self, **changes: Any) -> CTPSeries:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class PerfusionMaps:
    """Named perfusion maps on one grid.

    Parameters
    ----------
    maps : mapping of str to ndarray, float32, shape (Z, Y, X)
        Usually keys from :data:`MAP_NAMES`; other names (e.g. ``residual``) are allowed.
    affine : ndarray, shape (4, 4)
        Voxel ``(x, y, z, 1)`` -> patient mm.
    units : mapping of str to str
        Unit per map; defaults to :data:`MAP_UNITS` for the known names and ``"1"`` otherwise.
    provenance : mapping
        ``method``, ``constants`` (e.g. rho, kH), ``software_version`` and anything else that
        explains how the maps were made; written into every output.
    """

    maps: Mapping[str, np.ndarray]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    units: Mapping[str, str] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.maps:
            raise ValidationError("PerfusionMaps needs at least one map")
        maps: dict[str, np.ndarray] = {}
        shape = None
        for name, value in self.maps.items():
            # a masked voxel has no value: NaN, as ctperf's maps write it (np.asarray had read
            # the hidden values)
            arr = (np.ma.filled(np.ma.asarray(value, dtype=np.float32), np.nan)
                   if np.ma.is_masked(value) else np.asarray(value))
            if arr.ndim != 3:
                raise ValidationError(
                    f"map {name!r} must be 3D (Z, Y, X), got shape {arr.shape}"
                )
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise ValidationError(
                    f"all maps must share one shape: {name!r} is {arr.shape}, expected {shape}"
                )
            # judged as stored: a float64 value past float32's range (1e39) becomes Inf there
            with np.errstate(over="ignore"):  # (said by the error below)
                arr = arr.astype(np.float32, copy=False)
            if np.any(np.isinf(arr)):
                raise ValidationError(f"map {name!r} contains Inf values (or values beyond "
                                      "float32's range, 3.4e38, in which maps are kept)")
            maps[name] = arr
        units = {name: MAP_UNITS.get(name, "1") for name in maps}
        units.update(self.units)
        unknown = set(units) - set(maps)
        if unknown:
            raise ValidationError(f"units given for maps that do not exist: {sorted(unknown)}")
        provenance = dict(self.provenance)
        if "software_version" not in provenance:
            from ctperf.versioning import software_version

            provenance["software_version"] = software_version()
        object.__setattr__(self, "maps", maps)
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "affine", _check_affine(self.affine))
        object.__setattr__(self, "provenance", provenance)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"no map {name!r}; have {sorted(self.maps)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.maps

    @property
    def names(self) -> list[str]:
        return list(self.maps)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = next(iter(self.maps.values())).shape
        return z, y, x

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, (dz, dy, dx)."""
        return spacing_zyx(self.affine)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel, mL (:func:`voxel_ml`)."""
        return voxel_ml(self.affine)

    def replace(self, **changes: Any) -> PerfusionMaps:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def orientation_known(record: Mapping[str, Any]) -> bool:
    """False for maps or a study whose files set no orientation (a NIfTI without sform and
    qform: ``provenance["orientation_unknown"]`` of maps read, ``nifti_xform_code`` 0 of a
    study's meta and its maps' provenance), where the patient's left and right are a guess."""
    return not record.get("orientation_unknown") and record.get("nifti_xform_code", 1) != 0
