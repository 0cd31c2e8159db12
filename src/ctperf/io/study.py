"""One entry point for a CT perfusion study on disk: a DICOM folder or a 4D NIfTI file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib

from ctperf.errors import InputError
from ctperf.io.dicom import NoDicomError, is_archive, read_dicom_series
from ctperf.io.nifti import is_nifti, read_nifti_series
from ctperf.types import CTPSeries

__all__ = ["nifti_study_in", "phantom_studies", "read_study"]

log = logging.getLogger(__name__)


def _time_course(path: Path) -> bool:
    """True for a NIfTI file whose header gives four axes and more than one frame."""
    try:
        shape = nib.load(path).header.get_data_shape()  # type: ignore[attr-defined]
    except Exception:  # nibabel raises many types for damaged headers: not a candidate
        return False
    return len(shape) == 4 and shape[3] > 1


def phantom_studies(cohort: str | os.PathLike[str]) -> list[Path]:
    """The studies of a phantom cohort (``ctperf phantom``), ``sub-*/study.nii.gz``, in order."""
    return sorted(Path(cohort).glob("sub-*/study.nii.gz"))


def nifti_study_in(folder: str | os.PathLike[str]) -> Path | None:
    """The one 4D NIfTI file under ``folder`` (searched recursively), for a folder that holds a
    study as NIfTI rather than DICOM (the ISLES layouts: one folder per case holding the 4D
    study beside 3D maps); None when it holds no NIfTI file.

    Raises
    ------
    InputError
        NIfTI files but no 4D one, or several, with what to do.
    """
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_nifti(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        return None
    four_d = [p for p in files if _time_course(p)]
    if len(four_d) == 1:
        return four_d[0]
    if four_d:
        names = ", ".join(str(p.relative_to(root)) for p in four_d[:4])
        raise InputError(root, f"holds no DICOM images and {len(four_d)} 4D NIfTI files "
                               f"({names}{', ...' if len(four_d) > 4 else ''}); pass the "
                               "study's file itself")
    merge = " (3D files, one per frame, must be merged into one 4D file first)" \
        if len(files) >= 3 else ""
    raise InputError(root, f"holds no DICOM images and no 4D NIfTI, only {len(files)} 3D "
                           f"NIfTI file{'s' if len(files) != 1 else ''}; a study is a 4D "
                           f"(X, Y, Z, T) file{merge}")


def read_study(path: str | os.PathLike[str], *, series_uid: str | None = None,
               frame_interval: float | None = None, progress: bool = False) -> CTPSeries:
    """Read a study: a folder is read as DICOM, a ``.nii``/``.nii.gz`` file as 4D NIfTI; a
    folder that holds no DICOM image is read as the one 4D NIfTI under it
    (:func:`nifti_study_in`).

    Parameters
    ----------
    path : path
        DICOM folder (searched recursively) or 4D NIfTI (X, Y, Z, T) with optional JSON sidecar.
    series_uid : str, optional
        DICOM only: the SeriesInstanceUID to read when the folder holds several series.
    frame_interval : float, optional
        Seconds between frames, replacing the file's timing (needed for DICOM without usable
        acquisition times; for NIfTI it replaces pixdim[4] and the sidecar's FrameTimes).
    progress : bool
        Show a progress bar while decoding DICOM.

    Returns
    -------
    CTPSeries
        ``hu`` (T, Z, Y, X) float32 HU, ``times`` (T,) s, affine voxel -> RAS mm.
    """
    p = Path(path)
    if p.is_dir():
        try:
            return read_dicom_series(p, series_uid=series_uid, frame_interval=frame_interval,
                                     progress=progress)
        except NoDicomError:
            found = nifti_study_in(p)
            if found is None:
                raise
            p = found
            log.info("%s: no DICOM images; reading its 4D NIfTI %s", path, p.name)
    if is_nifti(p):
        if series_uid is not None:
            raise InputError(p, "series_uid (--series) applies to DICOM folders, not NIfTI")
        return read_nifti_series(p, frame_interval=frame_interval)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if is_archive(p):
        raise InputError(p, "an archive: extract it, and give the folder (or NIfTI) it holds")
    raise InputError(p, "not a study: expected a DICOM folder or a .nii/.nii.gz file")
