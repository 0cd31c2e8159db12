"""Synthetic DICOM CT perfusion studies built with pydicom alone, for tests.

Independent of ctperf's own writer, so that reader tests do not share a writer's mistakes. The
files are stored as uint16 with RescaleIntercept -1024 (as many scanners do), get random names and
are written slice-descending, so a reader must sort by geometry and time itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["FakeStudy", "ct_dataset", "gdcm_recompress", "patch_bytes", "write_bare_dataset",
           "write_enhanced_study", "write_fake_study"]

START = dt.datetime(2021, 3, 4, 10, 20, 30)


@dataclass
class FakeStudy:
    """What a fake study holds: its folder, files and the values a reader must return."""

    folder: Path
    hu: np.ndarray  # (T, Z, Y, X) HU, slices ascending along the normal
    times: np.ndarray  # (T,) s from the first file
    slice_times: np.ndarray  # (T, Z) s
    positions: np.ndarray  # (Z, 3) LPS mm, ascending along the normal
    iop: np.ndarray  # (6,)
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    series_uid: str
    files: dict[tuple[int, int], Path] = field(default_factory=dict)


def _new_dataset(sop_class: str) -> Dataset:
    """An empty CT dataset of ``sop_class`` with its file meta and a new SOPInstanceUID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Modality = "CT"
    return ds


def ct_dataset(pixels: np.ndarray, *, series_uid: str, study_uid: str, frame_uid: str,
               position: np.ndarray, iop: np.ndarray, spacing: tuple[float, float],
               when: dt.datetime | None, temporal_index: int, instance: int,
               slope: float = 1.0, intercept: float = -1024.0,
               description: str = "CTP 5mm") -> Dataset:
    """One CT Image Storage dataset; ``pixels`` are HU, stored as (HU - intercept) / slope."""
    ds = _new_dataset(CTImageStorage)
    ds.PatientName, ds.PatientID = "Test^Patient", "P001"
    ds.PatientBirthDate, ds.AccessionNumber = "19500607", "ACC778899"
    ds.InstitutionName, ds.ReferringPhysicianName = "Saint Example Hospital", "Doe^Jane"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        study_uid, series_uid, frame_uid)
    ds.StudyDate = START.strftime("%Y%m%d")
    ds.SeriesDescription = description
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scan 9"
    ds.KVP, ds.Exposure, ds.XRayTubeCurrent, ds.ExposureTime = 80, 150, 300, 500
    if when is not None:
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
        ds.AcquisitionDate = when.strftime("%Y%m%d")
        ds.AcquisitionTime = when.strftime("%H%M%S.%f")
        ds.ContentDate = when.strftime("%Y%m%d")
        ds.ContentTime = when.strftime("%H%M%S.%f")
    ds.TemporalPositionIndex = temporal_index
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in iop]
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.SliceThickness = "5"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    stored = np.rint((pixels - intercept) / slope).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def write_fake_study(folder: Path, rng: np.random.Generator, *, n_frames: int = 5,
                     n_slices: int = 3, rows: int = 8, cols: int = 10,
                     frame_step: float = 1.5, shuttle: bool = False, tilt_deg: float = 0.0,
                     series_uid: str | None = None, description: str = "CTP 5mm",
                     nested: bool = True,
                     edit: Callable[[Dataset, int, int], None] | None = None) -> FakeStudy:
    """Write a (n_frames x n_slices) study with random file names; return what a reader owes.

    ``shuttle`` gives each slice its own time (0.2 s apart); ``tilt_deg`` rotates the slices about
    the patient x axis (gantry tilt); ``edit(ds, t, z)`` may change a dataset before it is saved.
    """
    folder.mkdir(parents=True, exist_ok=True)
    hu = rng.integers(-100, 200, size=(n_frames, n_slices, rows, cols)).astype(np.float32)
    a = np.deg2rad(tilt_deg)
    iop = np.array([1.0, 0.0, 0.0, 0.0, np.cos(a), np.sin(a)])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-20.0, -15.0, 40.0])
    positions = origin + np.arange(n_slices)[:, None] * 5.0 * normal
    spacing = (0.5, 0.45)
    offsets = 0.2 * np.arange(n_slices) if shuttle else np.zeros(n_slices)
    frame_times = np.cumsum(np.r_[0.0, frame_step + 0.25 * (np.arange(n_frames - 1) % 2)])
    slice_times = frame_times[:, None] + offsets[None, :]
    uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    study = FakeStudy(folder, hu, slice_times.mean(axis=1), slice_times, positions, iop,
                      spacing, uid)
    names = rng.permutation(n_frames * n_slices)
    for t in range(n_frames):
        for z in reversed(range(n_slices)):
            when = START + dt.timedelta(seconds=float(slice_times[t, z]))
            ds = ct_dataset(hu[t, z], series_uid=uid, study_uid=study_uid, frame_uid=frame_uid,
                            position=positions[z], iop=iop, spacing=spacing, when=when,
                            temporal_index=t + 1, instance=t * n_slices + z + 1,
                            description=description)
            if edit is not None:
                edit(ds, t, z)
            number = int(names[t * n_slices + z])
            sub = folder / f"d{number % 3}" if nested else folder
            sub.mkdir(exist_ok=True)
            path = sub / f"{number:05d}"
            ds.save_as(path, enforce_file_format=True)
            study.files[(t, z)] = path
    return study


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_study(folder: Path, rng: np.random.Generator, *, per_slice: bool,
                         n_frames: int = 5, n_slices: int = 3, rows: int = 8, cols: int = 10,
                         tilt_deg: float = 0.0, shuttle: bool = False, per_image: bool = False,
                         edit: Callable[[Dataset], None] | None = None) -> FakeStudy:
    """The study of :func:`write_fake_study` as Enhanced CT multi-frame objects: one file per
    slice (``per_slice``), per image (``per_image``: one frame per file, as some scanners
    export) or one file for the whole study, frames in random order, geometry, rescale and
    timing in the functional groups only (as the Enhanced CT IOD puts them); ``edit(ds)`` may
    change a dataset before it is saved."""
    classic = write_fake_study(folder / "classic", rng, n_frames=n_frames, n_slices=n_slices,
                               rows=rows, cols=cols, tilt_deg=tilt_deg, shuttle=shuttle)
    study = FakeStudy(folder / "enhanced", classic.hu, classic.times, classic.slice_times,
                      classic.positions, classic.iop, classic.spacing, generate_uid())
    study.folder.mkdir(parents=True)
    study_uid, frame_uid = generate_uid(), generate_uid()
    groups = [[(t, z) for t in range(n_frames)] for z in range(n_slices)] if per_slice \
        else [[(t, z) for t in range(n_frames) for z in range(n_slices)]]
    if per_image:
        groups = [[image] for group in groups for image in group]
    for number, images in enumerate(groups):
        images = [images[i] for i in rng.permutation(len(images))]
        ds = _new_dataset(EnhancedCTImageStorage)
        ds.PatientID = "P001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid, study.series_uid, frame_uid)
        ds.SeriesDescription = "CTP enhanced"
        ds.Manufacturer, ds.KVP = "ACME", 80
        ds.AcquisitionDateTime = START.strftime("%Y%m%d%H%M%S.%f")  # the object's start only
        ds.InstanceNumber = number + 1
        ds.NumberOfFrames = len(images)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SharedFunctionalGroupsSequence = Sequence([_item(
            PixelMeasuresSequence=Sequence([_item(
                PixelSpacing=[f"{v:.6g}" for v in study.spacing], SliceThickness="5")]),
            PlaneOrientationSequence=Sequence([_item(
                ImageOrientationPatient=[f"{v:.8g}" for v in study.iop])]),
            PixelValueTransformationSequence=Sequence([_item(
                RescaleIntercept="-1024", RescaleSlope="1", RescaleType="HU")]))])
        per_frame = []
        for t, z in images:
            when = START + dt.timedelta(seconds=float(study.slice_times[t, z]))
            per_frame.append(_item(
                FrameContentSequence=Sequence([_item(
                    FrameAcquisitionDateTime=when.strftime("%Y%m%d%H%M%S.%f"),
                    TemporalPositionIndex=t + 1)]),
                PlanePositionSequence=Sequence([_item(
                    ImagePositionPatient=[f"{v:.6g}" for v in study.positions[z]])])))
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        stored = np.stack([study.hu[t, z] for t, z in images]) + 1024.0
        ds.PixelData = np.rint(stored).astype(np.uint16).tobytes()
        if edit is not None:
            edit(ds)
        ds.save_as(study.folder / f"{number:03d}.dcm", enforce_file_format=True)
    return study


def patch_bytes(path: Path, old: str, new: str) -> None:
    """Replace one unique text value in a written file with another of the same length, to
    make header values pydicom itself refuses to write (e.g. a DS that is not a number)."""
    data = path.read_bytes()
    a, b = old.encode(), new.ljust(len(old)).encode()
    if data.count(a) != 1 or len(b) != len(a):
        raise ValueError(f"{old!r} is not unique in {path.name}, or {new!r} is too long")
    path.write_bytes(data.replace(a, b))


def write_bare_dataset(path: Path) -> None:
    """Rewrite a DICOM file as old scanners wrote them: a bare implicit VR little endian
    dataset, without preamble, "DICM" and file meta."""
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())


def gdcm_recompress(path: Path, syntax: str) -> None:
    """Re-encode a file's pixel data with GDCM (``syntax``: a ``gdcm.TransferSyntax``
    attribute name such as "JPEGLSLossless"), for syntaxes pydicom cannot encode itself."""
    from ctperf.io.dicom_write import gdcm_compress

    gdcm_compress(path, syntax)
