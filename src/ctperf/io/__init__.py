"""Reading and writing CT perfusion studies, maps and masks. The only package that touches files."""

from ctperf.io.atomic import atomic_dir, atomic_file, check_output, mark_output
from ctperf.io.dicom import (
    NoDicomError,
    read_dicom_headers,
    read_dicom_series,
    read_dicom_volume,
    time_course_series,
    time_point_series,
)
from ctperf.io.dicom_write import write_maps_dicom, write_series_dicom
from ctperf.io.maps import map_file, read_maps
from ctperf.io.nifti import (
    is_nifti,
    kept_qform,
    nifti_space,
    read_mask,
    read_nifti_series,
    read_on_grid,
    read_volume,
    reorient,
    reorientation,
    study_space,
    write_json,
    write_maps_nifti,
    write_series_nifti,
    write_volume,
)
from ctperf.io.privacy import public_meta
from ctperf.io.study import nifti_study_in, phantom_studies, read_study
from ctperf.io.unitobrain import UniToBrainCase, iter_unitobrain

__all__ = [
    "NoDicomError",
    "UniToBrainCase",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "is_nifti",
    "iter_unitobrain",
    "kept_qform",
    "map_file",
    "mark_output",
    "nifti_space",
    "nifti_study_in",
    "phantom_studies",
    "public_meta",
    "read_dicom_headers",
    "read_dicom_series",
    "read_dicom_volume",
    "read_maps",
    "read_mask",
    "read_nifti_series",
    "read_on_grid",
    "read_study",
    "read_volume",
    "reorient",
    "reorientation",
    "study_space",
    "time_course_series",
    "time_point_series",
    "write_json",
    "write_maps_dicom",
    "write_maps_nifti",
    "write_series_dicom",
    "write_series_nifti",
    "write_volume",
]
