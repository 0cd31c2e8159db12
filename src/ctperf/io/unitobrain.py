"""The UniToBrain CT perfusion data set (doi:10.21227/x8ea-vh16) as (study, reference maps) pairs.

Layout on disk, as distributed and as read by the authors of Gava et al. 2023
(doi:10.3389/fninf.2023.852105)::

    ROOT/
      MOL-001_Registered_Filtered_3mm_20HU/        network input: one DICOM file per
          Registered00001.dcm ...                   (frame, slice), e.g. 89 frames x 8 slices
                                                    of 512 x 512, HU = stored * 0.1 - 1000
      MOL-001_Registered_Filtered_3mm_20HU_Maps/   reference maps of the NLR method
          NLR_CBF/NLR_CBF00001.dcm ...              one DICOM file per slice,
          NLR_CBV/  NLR_MTT/  NLR_TTP/  NLR_Delay/  value = stored * RescaleSlope + Intercept
          *.txt                                     (notes, ignored)
      MOL-002_...

``NLR_TTP`` (the tissue curve's time to peak) and ``NLR_Delay`` (the box model's delay after the
AIF) are different maps and become ``ttp`` and ``delay``; the network's ``ttp`` target learns
``NLR_TTP`` (:mod:`ctperf.model.normalise`).

The input folder is read with :func:`ctperf.io.read_dicom_series` (slices grouped by position,
frames ordered by AcquisitionTime). Map files are paired with the input slices by their position
along the slice normal, never by file or list order; an input slice without a map slice gets NaN
(the map's slices must be evenly spaced: a map folder that cannot be read, a slice missing
inside it included, is left out for that patient with a warning, as a missing folder is).
Patient folders may also sit one level down (``ROOT/<anything>/MOL-...``); ``MOL001`` and
``MOL_001`` are read as ``MOL-001``, and numbers written with other padding (``MOL-1``) as the
same patient.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctperf.errors import InputError
from ctperf.io.dicom import read_dicom_series, read_dicom_volume
from ctperf.types import CTPSeries, PerfusionMaps

__all__ = ["FOLDER_OF_MAP", "MAP_FOLDERS", "UniToBrainCase", "find_unitobrain", "iter_unitobrain",
           "lacking_maps", "read_unitobrain_case"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Map folder names in a ``..._Maps`` folder and the ctperf map names they become.
MAP_FOLDERS: dict[str, str] = {
    "NLR_CBF": "cbf", "NLR_CBV": "cbv", "NLR_MTT": "mtt", "NLR_TTP": "ttp", "NLR_Delay": "delay",
}
#: ctperf map name -> its folder name (the inverse of :data:`MAP_FOLDERS`).
FOLDER_OF_MAP: dict[str, str] = {name: folder for folder, name in MAP_FOLDERS.items()}
_INPUT_RE = re.compile(r"^MOL[-_]?(\d+)_Registered_Filtered_3mm_20HU$", re.IGNORECASE)
_MAPS_SUFFIX = "_Maps"


@dataclass(frozen=True)
class UniToBrainCase:
    """One patient: the input study and the reference maps on the study's slices."""

    patient_id: str
    series: CTPSeries
    reference: PerfusionMaps
    folder: Path


def find_unitobrain(root: PathLike) -> list[tuple[str, Path, Path]]:
    """(patient id, input folder, maps folder) for every patient under ``root``, by patient id."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(base, "no such folder (expected the UniToBrain root folder)")
    found: dict[str, tuple[str, Path, Path]] = {}
    folders = sorted(f for f in [*base.glob("*"), *base.glob("*/*")] if f.is_dir())
    by_lower = {f.as_posix().lower(): f for f in folders}
    paired: set[Path] = set()
    for folder in folders:
        match = _INPUT_RE.match(folder.name)
        if not match:
            continue
        maps = by_lower.get((folder.as_posix() + _MAPS_SUFFIX).lower(),
                            folder.with_name(folder.name + _MAPS_SUFFIX))
        if not maps.is_dir():
            raise InputError(maps, "missing: every ..._20HU input folder needs its ..._20HU_Maps "
                                   "folder of reference maps")
        patient = f"MOL-{int(match.group(1)):03d}"  # MOL-1, MOL001, MOL_001: one patient
        if patient in found:
            raise InputError(folder, f"patient {patient} appears twice (also in "
                                     f"{found[patient][1]})")
        found[patient] = (patient, folder, maps)
        paired.add(maps)
    for folder in folders:
        if folder.name.lower().endswith(_MAPS_SUFFIX.lower()) and folder not in paired:
            log.warning("%s: reference maps without their input folder (%s); left out",
                        folder, folder.name[:-len(_MAPS_SUFFIX)])
    if not found:
        raise InputError(base, "no patients: neither a phantom cohort (sub-*/study.nii.gz, "
                               "ctperf phantom) nor the UniToBrain layout (folders named "
                               "MOL-xxx_Registered_Filtered_3mm_20HU)")
    return [found[k] for k in sorted(found)]


def _slice_depths(affine: np.ndarray, n_slices: int) -> np.ndarray:
    """Position (mm) of each slice along the slice normal, from a voxel -> mm affine."""
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    origins = affine[:3, 3] + np.arange(n_slices)[:, None] * affine[:3, 2]
    return origins @ normal


def _pair_map(name: str, folder: Path, series: CTPSeries, tol_mm: float) -> np.ndarray:
    """One map on the series' slices (Z, Y, X), NaN where the map has no slice."""
    volume, affine, _ = read_dicom_volume(folder)
    n_z, n_y, n_x = series.hu.shape[1:]
    if volume.shape[1:] != (n_y, n_x):
        raise InputError(folder, f"{name} slices are {volume.shape[1:]}, the study's are "
                                 f"{(n_y, n_x)}")
    if not np.allclose(affine[:3, :2], series.affine[:3, :2], atol=1e-3):
        raise InputError(folder, f"{name} pixel spacing or orientation differs from the study")
    normal = np.cross(series.affine[:3, 0], series.affine[:3, 1])
    normal /= np.linalg.norm(normal)
    offset = affine[:3, 3] - series.affine[:3, 3]
    if np.linalg.norm(offset - (offset @ normal) * normal) > 1.0:
        log.warning("%s: in-plane origin differs from the study by more than 1 mm", folder)
    study_depth = _slice_depths(series.affine, n_z)
    map_depth = affine[:3, 3] @ normal + np.arange(volume.shape[0]) * (affine[:3, 2] @ normal)
    gap = np.abs(study_depth[:, None] - map_depth[None, :])  # (Z study, Z map)
    nearest = np.argmin(gap, axis=1)
    hit = gap[np.arange(n_z), nearest] <= tol_mm
    if not hit.any():
        raise InputError(folder, f"no {name} slice lies at a study slice position (study "
                                 f"{np.round(study_depth, 2).tolist()} mm, map "
                                 f"{np.round(map_depth, 2).tolist()} mm)")
    out = np.full((n_z, n_y, n_x), np.nan, dtype=np.float32)
    out[hit] = volume[nearest[hit]]
    if not hit.all():
        log.warning("%s: %d of %d study slices have no %s slice (set to NaN)", folder,
                    int((~hit).sum()), n_z, name)
    return out


def lacking_maps(maps_folder: PathLike, names: Iterable[str]) -> list[str]:
    """The maps among ``names`` (ctperf's: ``cbf``, ``ttp``, ...) whose ``NLR_`` folder (any
    case) ``maps_folder`` lacks or holds no file in, and those the dataset has none of
    (:data:`MAP_FOLDERS`); what reading them would find damaged is not judged here."""
    folders = {p.name.lower(): p for p in Path(maps_folder).iterdir() if p.is_dir()}
    out = []
    for name in names:
        folder = folders.get(FOLDER_OF_MAP[name].lower()) if name in FOLDER_OF_MAP else None
        if folder is None or not any(f.is_file() for f in folder.iterdir()):
            out.append(name)
    return out


def read_unitobrain_case(patient_id: str, input_folder: PathLike, maps_folder: PathLike, *,
                         frame_interval: float | None = None,
                         tol_mm: float = 0.5) -> UniToBrainCase:
    """Read one patient's input study and reference maps, paired slice by slice on position.

    Parameters
    ----------
    patient_id : str
        ``MOL-xxx``.
    input_folder, maps_folder : path
        The ``..._20HU`` and ``..._20HU_Maps`` folders.
    frame_interval : float, optional
        Seconds between frames, for studies whose files carry no usable acquisition times.
    tol_mm : float
        Largest distance along the slice normal between a study slice and its map slice.

    Returns
    -------
    UniToBrainCase
        ``series`` (T, Z, Y, X) HU and ``reference`` maps (Z, Y, X) among cbf (mL/100g/min),
        cbv (mL/100g), mtt, ttp, delay (s), on the series' grid and affine.
    """
    maps_dir = Path(maps_folder)
    series = read_dicom_series(input_folder, frame_interval=frame_interval)
    series = series.replace(meta={**series.meta, "patient_id": patient_id})
    maps: dict[str, np.ndarray] = {}
    by_lower = {p.name.lower(): p for p in maps_dir.iterdir() if p.is_dir()}
    damaged = []
    for folder_name, name in MAP_FOLDERS.items():
        folder = by_lower.get(folder_name.lower())
        if folder is not None:
            try:
                maps[name] = _pair_map(name, folder, series, tol_mm)
            except InputError as exc:  # one map's damage need not cost the others
                damaged.append((folder_name, f"{exc}"))
    if not maps:
        detail = f": {'; '.join(text for _, text in damaged)}" if damaged else ""
        raise InputError(maps_dir, f"no readable map folders ({', '.join(MAP_FOLDERS)})"
                                   f"{detail}")
    for folder_name, problem in damaged:
        log.warning("%s: %s left out for %s (%s); %s has no reference for %s", maps_dir,
                    folder_name, patient_id, problem, patient_id, MAP_FOLDERS[folder_name])
    unread = {f for f, _ in damaged}
    absent = [f for f, name in MAP_FOLDERS.items() if name not in maps and f not in unread]
    if absent:
        log.warning("%s: no %s folder%s; %s has no reference for %s", maps_dir,
                    ", ".join(absent), "s" if len(absent) > 1 else "", patient_id,
                    ", ".join(MAP_FOLDERS[f] for f in absent))
    reference = PerfusionMaps(maps=maps, affine=series.affine,
                              provenance={"method": "NLR (UniToBrain reference maps)",
                                          "source": str(maps_dir.name)})
    return UniToBrainCase(patient_id, series, reference, Path(input_folder).parent)


def iter_unitobrain(root: PathLike, *, frame_interval: float | None = None,
                    progress: bool = False) -> Iterator[UniToBrainCase]:
    """Yield each UniToBrain patient under ``root`` in patient-id order (see module docstring).

    Parameters
    ----------
    root : path
        Folder holding the ``MOL-xxx_Registered_Filtered_3mm_20HU[_Maps]`` folders.
    frame_interval : float, optional
        Passed to the DICOM reader for studies without usable acquisition times.
    progress : bool
        Show a progress bar over patients.

    Yields
    ------
    UniToBrainCase
        With ``patient_id``, ``series`` (CTPSeries) and ``reference`` (PerfusionMaps).
    """
    from tqdm import tqdm

    cases = find_unitobrain(root)
    for patient, input_folder, maps_folder in tqdm(cases, desc="UniToBrain", unit="patient",
                                                   disable=not progress):
        yield read_unitobrain_case(patient, input_folder, maps_folder,
                                   frame_interval=frame_interval)
