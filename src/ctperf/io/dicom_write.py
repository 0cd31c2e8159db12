"""DICOM writers: a CT perfusion study as a CT Image Storage series, maps as derived series.

Coordinates: ctperf affines map voxel indices to RAS+ millimetres (the NIfTI convention); DICOM
stores LPS. The writers flip the first two axes, the reader flips them back, so a study converted
between NIfTI and DICOM keeps its place in the scanner. A study is written as one file per
(frame, slice) with int16 HU (RescaleSlope 1, RescaleIntercept 0) and real timing tags
(AcquisitionDateTime, AcquisitionTime, ContentTime, TemporalPositionIndex); ``compress=True``
re-encodes every file as JPEG Lossless (Process 14, selection value 1) with GDCM, as GE scanners
store perfusion studies. ``anonymise=True`` de-identifies the output (DICOM PS3.15 Annex E basic
profile, :mod:`ctperf.io.privacy`); by default the source's patient and study identity is kept so
that the outputs file with the study.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctperf.errors import ValidationError
from ctperf.io.atomic import atomic_dir
from ctperf.io.privacy import ANONYMOUS_START, deidentify_dataset, record_deidentification
from ctperf.types import METHODS, CTPSeries, PerfusionMaps

__all__ = ["FILTER_SETTINGS", "PATIENT_STUDY_TAGS", "gdcm_compress", "require_gdcm",
           "write_maps_dicom", "write_series_dicom"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Patient and study keywords carried from a source study into written series (``meta["dicom"]``).
PATIENT_STUDY_TAGS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "StudyDescription", "ReferringPhysicianName", "InstitutionName",
    "Manufacturer", "ManufacturerModelName", "PatientPosition", "PatientIdentityRemoved",
)

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DEFAULT_START = dt.datetime(2000, 1, 1, 12, 0, 0)

# Display windows (centre, width) per map, in the map's units.
_MAP_WINDOWS: dict[str, tuple[float, float]] = {
    "cbf": (40.0, 80.0), "cbv": (3.0, 6.0), "mtt": (8.0, 16.0),
    "tmax": (8.0, 16.0), "delay": (5.0, 10.0),
}


#: ImageComments of images whose source, a NIfTI file setting neither sform nor qform, gave
#: no orientation: DICOM needs one (ImageOrientationPatient), and the one written is a guess.
_ORIENTATION_UNKNOWN = ("orientation unknown: the source NIfTI header set none; left and right "
                        "as stored, not verified")


def _slice_geometry(affine: np.ndarray, n_slices: int) -> dict[str, Any]:
    """DICOM geometry tags of each slice from a RAS voxel-to-mm affine."""
    lps = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    normal = np.cross(col_step / dx, row_step / dy)
    positions = [lps[:3, 3] + z * slice_step for z in range(n_slices)]
    return {
        "iop": [*(col_step / dx), *(row_step / dy)],
        "pixel_spacing": [dy, dx],
        "positions": positions,
        "locations": [float(p @ normal) for p in positions],
        # the spacing along the normal: a tilted gantry's slices step further along the table
        "thickness": float(abs(slice_step @ normal)),
    }


def _ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) as close to ``value`` as fits."""
    for digits in range(10, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.0f}"


def _parse_dicom_datetime(text: str) -> dt.datetime | None:
    text = str(text).strip().split("+")[0].split("-")[0] if text else ""
    for fmt in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def _start_time(meta: Mapping[str, Any], *, anonymise: bool = False) -> dt.datetime:
    """Wall-clock time of t = 0: the reader's ``acquisition_start``, else the study date/time
    (a dummy date when de-identifying)."""
    if anonymise:
        return ANONYMOUS_START
    start = _parse_dicom_datetime(meta.get("acquisition_start", ""))
    if start is None:
        tags = meta.get("dicom", {}) or {}
        start = _parse_dicom_datetime(f"{tags.get('StudyDate', '')}{tags.get('StudyTime', '')}")
    return start or _DEFAULT_START


def _with_identity(meta: Mapping[str, Any], patient: Mapping[str, Any] | None, *,
                   anonymise: bool) -> dict[str, Any]:
    """``meta`` whose ``dicom`` tags hold ``patient``'s over the source's, and, for a study
    without any identity (read from NIfTI), a new study of a placeholder patient of its own
    (one ID for every such study had filed different patients' maps together), with a warning
    unless de-identifying: such series do not file with the scan in PACS."""
    tags = {**(meta.get("dicom") or {}), **(patient or {})}
    if "StudyInstanceUID" not in tags:
        tags["StudyInstanceUID"] = generate_uid()
        if "PatientID" not in tags:
            digest = hashlib.sha256(tags["StudyInstanceUID"].encode()).hexdigest()
            tags["PatientID"] = f"CTPERF-{digest[:12].upper()}"
            tags.setdefault("PatientName", "UNKNOWN")
            if not anonymise:
                log.warning("the study holds no DICOM patient or study identity (read from "
                            "NIfTI, or DICOM without a StudyInstanceUID): its DICOM series go "
                            "into a new study of a placeholder patient (%s), not beside the "
                            "scan in PACS; to send them back, compute them from the scan's "
                            "DICOM series", tags["PatientID"])
    return {**meta, "dicom": tags}


def _map_series_number(source: int, method: str) -> int:
    """SeriesNumber of the first map of ``method`` made from the series numbered ``source``:
    100 x ``source`` + 14 x the method's place in :data:`~ctperf.types.METHODS` (any other,
    such as the U-Net's "unet", after them) + 1; the maps
    follow it one by one (at most 11). Never the source's own number, and each method's maps
    of one study apart from the others' (maps had been numbered 101 on whatever the source: a
    scan numbered 101 and its CBF map shared the number, and so did two methods' maps)."""
    place = METHODS.index(method) if method in METHODS else len(METHODS)
    return 100 * max(source, 1) + 14 * place + 1


#: What precedes the bilateral filter's settings (``key=value, ...``) in the contribution
#: description of a study ``ctperf preprocess`` filtered.
FILTER_SETTINGS = "bilateral filter: "

#: The end of a series description ctperf wrote for a preprocessed study.
_EARLIER_STEPS = re.compile(r" \((registered and filtered|registered|filtered|rewritten by "
                            r"ctperf)\)$")


def _preprocess_steps(meta: Mapping[str, Any]) -> str | None:
    """What ctperf's preprocessing did to a study, from its ``meta["preprocess"]`` record
    ("registered and filtered", "rewritten by ctperf" when neither), or None without one."""
    record = meta.get("preprocess")
    if not isinstance(record, Mapping):
        return None
    return _steps_done(record) or "rewritten by ctperf"


def _steps_done(record: Mapping[str, Any]) -> str:
    """"registered and filtered", "filtered" ... from a record of the steps; "" for none."""
    return " and ".join(step for step in ("registered", "filtered") if record.get(step))


def _base_dataset(meta: Mapping[str, Any], *, description: str, sop_class: str,
                  anonymise: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = UID(sop_class)
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"  # the General Series module wants it, or Laterality (Type 2C)
    tags = {k: v for k, v in (meta.get("dicom") or {}).items() if k in PATIENT_STUDY_TAGS}
    if "Manufacturer" not in tags:  # Type 2: empty when not known
        tags["Manufacturer"] = str(meta.get("scanner") or "")
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    start = _start_time(meta, anonymise=anonymise)
    ds.StudyDate = ds.get("StudyDate") or start.strftime("%Y%m%d")
    ds.StudyTime = ds.get("StudyTime") or start.strftime("%H%M%S")
    for keyword in ("StudyID", "AccessionNumber", "ReferringPhysicianName",
                    "PatientBirthDate", "PatientSex"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = str(meta.get("frame_of_reference_uid") or generate_uid())
    ds.SeriesDescription = description[:64]
    ds.SeriesDate = start.strftime("%Y%m%d")
    ds.SeriesTime = start.strftime("%H%M%S.%f")
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = ds.get("PatientPosition") or ""  # Type 2: empty when not known
    ds.KVP = _ds(float(meta["kvp"])) if meta.get("kvp") is not None else ""
    ds.AcquisitionNumber = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    before = meta.get("deidentification") or {}
    if anonymise:
        deidentify_dataset(ds, method=before.get("method", ()), codes=before.get("codes", ()))
    elif str(ds.get("PatientIdentityRemoved", "")).upper() == "YES":
        record_deidentification(ds, before.get("method", ()), before.get("codes", ()))
    ds.SpecificCharacterSet = _character_set(ds)
    return ds


def _character_set(ds: Dataset) -> str:
    """Latin-1 (ISO_IR 100) when every text value fits it, else UTF-8 (ISO_IR 192): a
    Cyrillic or CJK name kept as written, never replaced by question marks."""
    for element in ds:
        if element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            try:
                for value in values:
                    str(value).encode("latin-1")
            except UnicodeEncodeError:
                return "ISO_IR 192"
    return "ISO_IR 100"


def _finish_file(ds: Dataset, path: Path, compress: bool) -> None:
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(path, enforce_file_format=True)
    if compress:
        gdcm_compress(path)


def require_gdcm() -> Any:
    """The ``gdcm`` module, or ValidationError saying which extra installs it."""
    try:
        import gdcm
    except ImportError:
        raise ValidationError("JPEG Lossless compression needs GDCM, which is not installed: "
                              "pip install 'ctperf[compress]'") from None
    return gdcm


def gdcm_compress(path: Path, syntax: str = "JPEGLosslessProcess14_1") -> None:
    """Re-encode one file in place with GDCM, by default as JPEG Lossless, Process 14 SV1
    (``syntax``: a ``gdcm.TransferSyntax`` attribute name, e.g. "JPEGLSLossless")."""
    gdcm = require_gdcm()

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise OSError(f"{path}: GDCM could not read the file it was to compress")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"{path}: GDCM could not encode {syntax}")
    tmp = path.with_name(path.name + ".jpeg")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"{path}: GDCM could not write the compressed file")
    os.replace(tmp, path)


def _times_tags(ds: Dataset, when: dt.datetime) -> None:
    stamp = when.strftime("%H%M%S.%f")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d") + stamp
    ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.AcquisitionTime = stamp
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = stamp


def write_series_dicom(series: CTPSeries, folder: PathLike, *, compress: bool = False,
                       description: str | None = None,
                       patient: Mapping[str, Any] | None = None,
                       anonymise: bool = False, derived: str | None = None,
                       progress: bool = False) -> Path:
    """Write a study as a DICOM CT series, one file per (frame, slice).

    Parameters
    ----------
    series : CTPSeries
        The study; ``hu`` (T, Z, Y, X) is rounded to integer HU and clipped to int16.
    folder : path
        Output folder, replaced whole (written beside it, then renamed).
    compress : bool
        Encode pixels as JPEG Lossless (Process 14 SV1) through GDCM.
    description : str, optional
        SeriesDescription; defaults to ``series.meta["description"]``.
    patient : mapping, optional
        DICOM keywords -> values for patient/study tags (PatientName, PatientID, StudyDate, ...);
        they override ``series.meta["dicom"]``.
    anonymise : bool
        De-identify (DICOM PS3.15 Annex E basic profile): dummy patient name, pseudonymous ID
        (:func:`ctperf.io.privacy.deidentify_dataset`), no birth
        date, accession number, institution or physicians, a dummy date with the times between
        frames kept, study and frame-of-reference UIDs replaced consistently, and
        PatientIdentityRemoved YES. Overrides ``patient``. The source's SeriesDescription is
        not carried over (a generic one is used unless ``description`` is given).
    derived : str, optional
        What was done to the source's images (e.g. "registered, filtered"): the series is then
        DERIVED\\SECONDARY with this DerivationDescription, a description ending in it and
        SeriesNumber 1000 + the source's, so that it is never taken for the scan itself.
        By default the steps that ``series.meta["preprocess"]`` records (a study written by
        ``ctperf preprocess``, read back from its NIfTI sidecar); without such a record the
        source's ImageType is kept (ORIGINAL\\PRIMARY\\AXIAL when unknown).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        The folder, holding ``IM_<frame>_<slice>.dcm`` files.
    """
    from tqdm import tqdm

    if compress:
        require_gdcm()  # before any file is written
    meta = _with_identity(series.meta, patient, anonymise=anonymise)
    if derived is None:
        derived = _preprocess_steps(meta)
    n_t, n_z, n_y, n_x = series.shape
    geo = _slice_geometry(series.affine, n_z)
    source_desc = None if anonymise else meta.get("description")
    desc = description or str(source_desc or "ctperf CT perfusion")
    number = int(meta.get("series_number") or 1)
    if derived:
        # a series ctperf derived before: its steps are in ``derived`` (the record keeps them)
        earlier = _EARLIER_STEPS.search(desc)
        if earlier and description is None and number > 1000:
            desc, number = desc[:earlier.start()], number - 1000
        desc, number = f"{desc} ({derived})", 1000 + number
    base = _base_dataset(meta, description=desc, sop_class=CTImageStorage, anonymise=anonymise)
    base.ImageType = (["DERIVED", "SECONDARY", "AXIAL"] if derived
                      else list(meta.get("image_type") or ["ORIGINAL", "PRIMARY", "AXIAL"]))
    if derived:
        base.DerivationDescription = derived
        # the filter's settings go with the steps, read back as a NIfTI sidecar gives them
        settings = meta.get("bilateral") if "filtered" in derived else None
        _contributed_by_ctperf(base, derived + (
            f"; {FILTER_SETTINGS}" + ", ".join(f"{k}={v}" for k, v in settings.items())
            if isinstance(settings, Mapping) else ""))
    base.SeriesNumber = number
    base.Rows, base.Columns = n_y, n_x
    base.PixelRepresentation = 1
    base.RescaleSlope, base.RescaleIntercept, base.RescaleType = "1", "0", "HU"
    base.WindowCenter, base.WindowWidth = "40", "80"
    base.ImageOrientationPatient = [_ds(v) for v in geo["iop"]]
    base.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
    base.SliceThickness = _ds(meta.get("slice_thickness_mm") or geo["thickness"])
    base.SpacingBetweenSlices = _ds(geo["thickness"])
    if meta.get("nifti_xform_code") == 0:
        base.ImageComments = _ORIENTATION_UNKNOWN
    base.NumberOfTemporalPositions = n_t
    if meta.get("mas") is not None:
        base.Exposure = round(float(meta["mas"]))
    if meta.get("exposure_time_ms") is not None:
        base.ExposureTime = round(float(meta["exposure_time_ms"]))
    if meta.get("tube_current_ma") is not None:
        base.XRayTubeCurrent = round(float(meta["tube_current_ma"]))
    start = _start_time(meta, anonymise=anonymise)
    seconds = series.slice_times if series.slice_times is not None else (
        np.repeat(series.times[:, None], n_z, axis=1))
    pixels = np.clip(np.rint(series.hu), -32768, 32767).astype(np.int16)
    out = Path(folder)
    # the bar closed on the way out too, so that an interrupted run's last line is its message
    with atomic_dir(out) as tmp, tqdm(total=n_t * n_z, desc="write DICOM", unit="file",
                                      disable=not progress) as bar:
        for t in range(n_t):
            for z in range(n_z):
                ds = copy.deepcopy(base)  # Dataset.copy() would share elements with base
                ds.InstanceNumber = t * n_z + z + 1
                ds.AcquisitionNumber = t + 1
                ds.TemporalPositionIndex = t + 1
                ds.ImagePositionPatient = [_ds(v) for v in geo["positions"][z]]
                ds.SliceLocation = _ds(geo["locations"][z])
                _times_tags(ds, start + dt.timedelta(seconds=float(seconds[t, z])))
                ds.PixelData = np.ascontiguousarray(pixels[t, z]).tobytes()
                _finish_file(ds, tmp / f"IM_{t:04d}_{z:04d}.dcm", compress)
                bar.update()
    log.info("wrote %d DICOM files (%s)", n_t * n_z, out.name)  # out may be a temporary name
    return out


def _map_scaling(values: np.ndarray) -> tuple[np.ndarray, str, float, float]:
    """Stored integers, dtype name, slope and intercept for a map at 0.01 precision; NaN is
    stored as 0 (which every scaling represents exactly)."""
    finite = values[np.isfinite(values)]
    lo = min(float(finite.min()), 0.0) if finite.size else 0.0
    hi = max(float(finite.max()), 0.0) if finite.size else 0.0
    filled = np.nan_to_num(values, nan=0.0)
    slope = 0.01
    if lo >= 0 and hi / slope <= 65535:
        return np.rint(filled / slope).astype(np.uint16), "uint16", slope, 0.0
    if lo / slope >= -32768 and hi / slope <= 32767:
        return np.rint(filled / slope).astype(np.int16), "int16", slope, 0.0
    # Range too wide for signed 16 bits: stored unsigned from an intercept a whole number of
    # steps below 0 (so that 0 stays on the grid), the step coarsened only where that is not
    # enough, and then said.
    slope = max((hi - lo) / 65534.0, slope)
    intercept = float(np.floor(lo / slope) * slope)
    stored = np.rint((filled - intercept) / slope)
    if slope > 0.01:
        log.warning("map range %.4g..%.4g does not fit 0.01 steps in 16 bits; step is %.4g",
                    lo, hi, slope)
    return np.clip(stored, 0, 65535).astype(np.uint16), "uint16", slope, intercept


def _window(name: str, values: np.ndarray) -> tuple[float, float]:
    """Display window (centre, width): fixed per map in its units, but TTP (which counts from
    the start of the scan) and maps without one from their values (1st-99th percentile), at
    least 1 wide: the least width DICOM allows a linear window (PS3.3 C.11.2.1.2; an SD map of
    a few tenths had failed validation)."""
    if name in _MAP_WINDOWS:
        return _MAP_WINDOWS[name]
    finite = values[np.isfinite(values) & (values != 0)]
    if finite.size == 0:
        return 0.5, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _contributed_by_ctperf(ds: Dataset, what: str) -> None:
    """Name ctperf, with ``what`` it did, as modifying equipment of a series whose images are
    still the scanner's (General Equipment keeps the scanner; ctperf reads ``what`` back)."""
    from ctperf.versioning import software_version

    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "109103", "DCM"
    code.CodeMeaning = "Modifying Equipment"
    item = Dataset()
    item.Manufacturer, item.SoftwareVersions = "ctperf", software_version()
    item.ContributionDescription = what
    item.PurposeOfReferenceCodeSequence = [code]
    ds.ContributingEquipmentSequence = [item]


def _made_by_ctperf(ds: Dataset) -> None:
    """Name ctperf as the equipment that made a derived series (General Equipment module): it
    had carried the scanner's make and model, so PACS showed maps as the scanner's own."""
    from ctperf.versioning import software_version

    ds.Manufacturer = "ctperf"
    ds.SoftwareVersions = software_version()
    if "ManufacturerModelName" in ds:
        del ds.ManufacturerModelName


def _constants_text(constants: Mapping[str, Any]) -> str:
    """"; kH 0.73, rho 1.04 g/mL" from a provenance's constants (CBF and CBV scale with
    kH / rho, so a map's DICOM says which it was made with), or "" when it names none."""
    kh = constants.get("kh", constants.get("kH"))
    rho = constants.get("rho_g_per_ml", constants.get("rho"))
    parts = ([] if kh is None else [f"kH {float(kh):g}"]) + (
        [] if rho is None else [f"rho {float(rho):g} g/mL"])
    return "; " + ", ".join(parts) if parts else ""


def write_maps_dicom(maps: PerfusionMaps, folder: PathLike, *,
                     source: CTPSeries | None = None, anonymise: bool = False) -> list[Path]:
    """Write each map as its own DICOM series, ``<folder>/<name>/`` with one file per slice.

    Parameters
    ----------
    maps : PerfusionMaps
        Maps (Z, Y, X) in their units; NaN is stored as 0.
    folder : path
        Parent folder; each map's subfolder is replaced whole.
    source : CTPSeries, optional
        The study the maps come from: its ``meta["dicom"]`` patient/study tags, acquisition
        start and frame of reference are reused, so viewers file the maps with the study.
    anonymise : bool
        De-identify as :func:`write_series_dicom` does; maps written from one source with
        ``anonymise=True`` share their (new) study and frame-of-reference UIDs with the
        de-identified series.

    Returns
    -------
    list of Path
        One folder per map. Values are ``stored * RescaleSlope + RescaleIntercept`` with a
        slope of 0.01 where the map's range fits 16 bits (coarser, with a warning, where it
        does not), stored as uint16 (or int16 for negative maps).
    """
    meta = dict(source.meta) if source is not None else {}
    if source is not None and source.hu.shape[1:] != maps.shape:
        raise ValidationError(f"maps grid {maps.shape} differs from the source study's "
                              f"{source.hu.shape[1:]} (Z, Y, X)")
    method = str(maps.provenance.get("method", "unknown method"))
    constants = _constants_text(maps.provenance.get("constants") or {})
    prov = maps.provenance  # its own record of the steps (this run's and earlier ones) first
    steps = (_steps_done(prov) if {"registered", "filtered"} & set(prov)
             else _preprocess_steps(meta))
    derivation = f"{method}{constants}" + (f"; from a study {steps}" if steps else "")
    n_z, n_y, n_x = maps.shape
    geo = _slice_geometry(maps.affine, n_z)
    frame_uid = meta.get("frame_of_reference_uid") or generate_uid()
    meta = _with_identity(meta, None, anonymise=anonymise)  # one study for all the maps
    written = []
    first = _map_series_number(int(meta.get("series_number") or 1), method)
    for number, name in enumerate(maps.names, start=first):
        values = np.asarray(maps[name], dtype=np.float64)
        stored, kind, slope, intercept = _map_scaling(values)
        desc = f"{name.upper()} [{maps.units[name]}] {method}"
        base = _base_dataset({**meta, "frame_of_reference_uid": frame_uid},
                             description=desc, sop_class=CTImageStorage, anonymise=anonymise)
        base.ImageType = ["DERIVED", "SECONDARY", "AXIAL", name.upper()]
        base.SeriesNumber = number
        base.Rows, base.Columns = n_y, n_x
        base.PixelRepresentation = 1 if kind == "int16" else 0
        base.RescaleSlope, base.RescaleIntercept = _ds(slope), _ds(intercept)
        # "US", unspecified: RescaleType is a code string (upper case, digits, "_"), which
        # "mL/100g/min" is not; the unit is in SeriesDescription and ImageComments
        base.RescaleType = "US"
        centre, width = _window(name, values)
        base.WindowCenter, base.WindowWidth = _ds(centre), _ds(width)
        base.ImageOrientationPatient = [_ds(v) for v in geo["iop"]]
        base.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
        base.SliceThickness = _ds(meta.get("slice_thickness_mm") or geo["thickness"])
        base.SpacingBetweenSlices = _ds(geo["thickness"])
        base.ImageComments = f"{name} in {maps.units[name]}; method: {method}{constants}" + (
            f"; {_ORIENTATION_UNKNOWN}" if maps.provenance.get("nifti_xform_code") == 0 else "")
        base.DerivationDescription = derivation
        _made_by_ctperf(base)
        start = _start_time(meta, anonymise=anonymise)
        target = Path(folder) / name
        with atomic_dir(target) as tmp:
            for z in range(n_z):
                ds = copy.deepcopy(base)  # Dataset.copy() would share elements with base
                ds.InstanceNumber = z + 1
                ds.ImagePositionPatient = [_ds(v) for v in geo["positions"][z]]
                ds.SliceLocation = _ds(geo["locations"][z])
                _times_tags(ds, start)
                ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
                _finish_file(ds, tmp / f"{name}_{z:04d}.dcm", False)
        written.append(target)
    return written
