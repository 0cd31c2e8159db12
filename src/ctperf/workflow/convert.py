"""``ctperf convert`` for one study: DICOM -> 4D NIfTI (+ JSON sidecar), or NIfTI -> DICOM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctperf.workflow.study import StudyOutcome

__all__ = ["ConvertOptions", "convert_study"]


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`convert_study`: ``compress`` (DICOM output, JPEG Lossless), ``int16``
    (NIfTI output stored as int16 HU), ``anonymise`` (DICOM output), and how to read the study
    (``series_uid``, ``frame_interval`` in s; see :func:`ctperf.io.read_study`)."""

    compress: bool = False
    int16: bool = False
    anonymise: bool = False
    series_uid: str | None = None
    frame_interval: float | None = None
    overwrite: bool = False
    progress: bool = False


def convert_study(src: Path, dst: Path, options: ConvertOptions) -> StudyOutcome:
    """Convert one study: to NIfTI when ``dst`` ends in ``.nii``/``.nii.gz``, else to a DICOM
    folder.

    Steps: check the options against the output format -> check ``dst`` (and the sidecar) ->
    read -> write atomically.

    Parameters
    ----------
    src : Path
        DICOM folder or 4D NIfTI study.
    dst : Path
        ``.nii``/``.nii.gz`` file (a JSON sidecar is written beside it) or DICOM folder.
    options : ConvertOptions

    Returns
    -------
    StudyOutcome
    """
    from ctperf import io
    from ctperf.errors import InputError

    o = options
    to_nifti = io.is_nifti(dst)
    if to_nifti and o.compress:
        raise InputError(dst, "--compress applies to DICOM output, not NIfTI")
    if o.compress:
        from ctperf.io.dicom_write import require_gdcm

        require_gdcm()  # before the study is read
    if to_nifti and o.anonymise:
        raise InputError(dst, "--anonymise applies to DICOM output; NIfTI carries no patient "
                              "identity")
    if not to_nifti and o.int16:
        raise InputError(dst, "--int16 applies to NIfTI output; DICOM is always int16")
    if not to_nifti and dst.exists() and not dst.is_dir():
        raise InputError(dst, "exists and is a file; DICOM output needs a folder (or give "
                              "a .nii/.nii.gz name for NIfTI)")
    inputs = [src]
    if io.is_nifti(src):
        inputs.append(io.nifti.sidecar_path(src))
    if to_nifti:
        for path in (dst, io.nifti.sidecar_path(dst)):
            io.check_output(path, inputs=inputs, overwrite=o.overwrite, kind="file")
    else:
        io.check_output(dst, inputs=inputs, overwrite=o.overwrite)
    series = io.read_study(src, series_uid=o.series_uid, frame_interval=o.frame_interval,
                           progress=o.progress)
    if to_nifti:
        io.write_series_nifti(series, dst, dtype="int16" if o.int16 else "float32")
        return StudyOutcome(out=dst, message=f"wrote {dst} and "
                            f"{io.nifti.sidecar_path(dst).name} ({series.n_frames} frames)")
    # The outer folder carries overwrite; the writer then replaces its own empty folder.
    with io.atomic_dir(dst, overwrite=o.overwrite) as tmp:
        # never taken for the scanner's own series: its pixels are rounded to whole HU and its
        # padding is air (a preprocessed study's record names its steps instead)
        rewritten = None if isinstance(series.meta.get("preprocess"), dict) else (
            "rewritten by ctperf")
        io.write_series_dicom(series, tmp, compress=o.compress, anonymise=o.anonymise,
                              derived=rewritten, progress=o.progress)
    return StudyOutcome(out=dst, message=f"wrote {dst} "
                        f"({series.n_frames * series.shape[1]} DICOM files)")
