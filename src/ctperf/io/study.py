"""One entry point for a CT perfusion study on disk: a DICOM folder or a 4D NIfTI file."""

from __future__ import annotations

import os
from pathlib import Path

from ctperf.errors import InputError
from ctperf.io.dicom import read_dicom_series
from ctperf.io.nifti import is_nifti, read_nifti_series
from ctperf.types import CTPSeries

__all__ = ["read_study"]


def read_study(path: str | os.PathLike[str], *, series_uid: str | None = None,
               frame_interval: float | None = None, progress: bool = False) -> CTPSeries:
    """Read a study: a folder is read as DICOM, a ``.nii``/``.nii.gz`` file as 4D NIfTI.

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
        return read_dicom_series(p, series_uid=series_uid, frame_interval=frame_interval,
                                 progress=progress)
    if is_nifti(p):
        if series_uid is not None:
            raise InputError(p, "series_uid (--series) applies to DICOM folders, not NIfTI")
        return read_nifti_series(p, frame_interval=frame_interval)
    if not p.exists():
        raise InputError(p, "no such file or folder")
    raise InputError(p, "not a study: expected a DICOM folder or a .nii/.nii.gz file")
