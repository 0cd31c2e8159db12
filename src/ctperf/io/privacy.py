"""What of a study's identity may leave ctperf, and de-identification of the DICOM it writes.

Two rules:

- JSON written from a study's metadata (NIfTI sidecars) carries no patient identity: no names,
  IDs, dates, institution, physicians, UIDs or series descriptions, and no absolute input paths
  (:func:`public_meta`). Scanner, kVp, mAs and timing stay.
- DICOM outputs keep the source's patient/study identity by default, so that they file with the
  study in a PACS; with ``anonymise=True`` the writers apply the DICOM PS3.15 Annex E Basic
  Application Level Confidentiality Profile to the attributes they write
  (:func:`deidentify_dataset`, :func:`anonymous_uid`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ntpath
import os
import posixpath
import secrets
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pydicom.dataset import Dataset

__all__ = [
    "ANONYMOUS_START",
    "IDENTITY_KEYWORDS",
    "UID_KEY_VARIABLE",
    "anonymous_id",
    "anonymous_uid",
    "deidentified_before",
    "deidentify_dataset",
    "method_codes",
    "public_meta",
    "uid_key",
]

#: DICOM keywords that identify a patient, a visit or the people and place involved (PS3.15
#: Table E.1-1: the attributes ctperf reads or writes, and their usual companions).
IDENTITY_KEYWORDS: frozenset[str] = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "EthnicGroup", "PatientComments", "MilitaryRank",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ContentDate", "ContentTime",
    "StudyDescription", "RequestedProcedureDescription", "AdmittingDiagnosesDescription",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "OperatorsName",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
})
# ctperf's own metadata keys with the same kind of content (UIDs, the scan's date, case names
# taken from folder names, file lists, and the free-text SeriesDescription, which the Basic
# Profile removes as it may name the patient).
_META_IDENTITY_KEYS = frozenset({"series_uid", "frame_of_reference_uid", "acquisition_start",
                                 "patient_id", "files", "description"})
# Free text the Basic Profile removes (X) because people write names and histories into it,
# and the subject keys other tools put in a NIfTI sidecar: kept out of JSON written by ctperf
# (a sidecar's SeriesDescription "Perfusion Mueller Joerg" had been copied through).
_FREE_TEXT_KEYS = frozenset({
    "SeriesDescription", "ProtocolName", "ImageComments", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "ScheduledProcedureStepDescription",
    "ReasonForTheRequestedProcedure", "AdditionalPatientHistory", "PatientState",
    "MedicalAlerts", "Allergies", "Occupation", "ResponsiblePerson", "ResponsibleOrganization",
    "subject", "participant_id", "session"})
# Keywords of ``meta["dicom"]`` that describe the device, not the patient, and may be shared.
_DEVICE_KEYWORDS = ("Manufacturer", "ManufacturerModelName")

#: Wall-clock time given to t = 0 of a de-identified series (dates are replaced by a dummy;
#: the times between frames are kept).
ANONYMOUS_START = dt.datetime(2000, 1, 1, 0, 0, 0)
_DUMMY_NAME = "ANONYMOUS"
# DeidentificationMethod is LO: at most 64 characters per value
_METHOD = ["DICOM PS3.15 Annex E Basic Profile (ctperf)",
           "Dates replaced by a dummy, times between frames kept"]
_METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                 ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))


def _is_absolute_path(text: str) -> bool:
    return posixpath.isabs(text) or (len(text) > 2 and ntpath.isabs(text) and text[1] == ":")


def _clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()
                if k not in IDENTITY_KEYWORDS and k not in _META_IDENTITY_KEYS
                and k not in _FREE_TEXT_KEYS}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, PurePath | os.PathLike):
        return PurePath(os.fspath(value)).name
    if isinstance(value, str) and _is_absolute_path(value):
        return ntpath.basename(value) if "\\" in value else posixpath.basename(value)
    return value


def public_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A study's metadata without patient identity, for files that may be shared (JSON).

    Drops DICOM identity keywords (:data:`IDENTITY_KEYWORDS`) at any depth, ctperf's UID, date
    and case-name keys, every ``meta["dicom"]`` entry but the manufacturer and model, and
    shortens absolute paths to their file names. Scanner, kVp, mAs, timing and processing
    records stay.
    """
    out = _clean({k: v for k, v in meta.items() if k != "dicom"})
    device = {k: meta["dicom"][k] for k in _DEVICE_KEYWORDS
              if isinstance(meta.get("dicom"), Mapping) and k in meta["dicom"]}
    if device:
        out["dicom"] = device
    return out


#: Environment variable holding a secret for :func:`anonymous_uid`: the same secret gives the
#: same new UIDs in every run (a study and its maps de-identified by two commands file
#: together); without it each run draws its own.
UID_KEY_VARIABLE = "CTPERF_DEIDENTIFY_KEY"
_RUN_KEY = secrets.token_hex(32)


def uid_key() -> str:
    """The secret :func:`anonymous_uid` uses: :data:`UID_KEY_VARIABLE`'s, or this process's own
    (a cohort run hands it to its worker processes, so that one run's series share new UIDs)."""
    return os.environ.get(UID_KEY_VARIABLE) or _RUN_KEY


def anonymous_uid(uid: str) -> str:
    """A new UID for ``uid`` under the DICOM root 2.25: a keyed hash (HMAC-SHA-256) of it, so
    that the same input gives the same output within a run, or in every run sharing the secret
    in :data:`UID_KEY_VARIABLE` (a de-identified series and maps written from one source
    still share study and frame of reference), and that whoever holds the source UIDs cannot
    match them to the new ones without the key."""
    digest = hmac.new(uid_key().encode("utf-8"), str(uid).strip().encode("utf-8"),
                      hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def anonymous_id(patient_id: str) -> str:
    """A pseudonymous PatientID for ``patient_id``: a keyed hash of it, as
    :func:`anonymous_uid` makes UIDs (one patient's studies stay together, different patients
    apart: one dummy for everyone had filed every patient under one record)."""
    digest = hmac.new(uid_key().encode("utf-8"), str(patient_id).strip().encode("utf-8"),
                      hashlib.sha256).hexdigest()
    return f"ANON-{digest[:12].upper()}"


#: PS3.15's Retain UIDs Option: a source de-identified with it still holds its original UIDs.
RETAIN_UIDS_CODE = "113110"


def method_codes(ds: Any) -> list[str]:
    """The code values of a dataset's DeidentificationMethodCodeSequence, sorted."""
    return sorted({str(item.get("CodeValue", "")).strip()
                   for item in ds.get("DeidentificationMethodCodeSequence", None) or []} - {""})


def deidentified_before(removed: Any, codes: Any = ()) -> bool:
    """Whether a source says it is de-identified (PatientIdentityRemoved ``removed`` YES)
    without retaining its original UIDs (PS3.15 code 113110 among ``codes``): its UIDs,
    patient name and ID and study date are pseudonyms already, kept when it is de-identified
    again (hashed again, maps of a de-identified series had been filed in another study; its
    UIDs kept under new names and dates, one study had held two patients)."""
    return (str(removed or "").strip().upper() == "YES"
            and RETAIN_UIDS_CODE not in {str(c).strip() for c in codes})


def deidentify_dataset(ds: Dataset, *, codes: Any = ()) -> None:
    """Apply the Basic Profile to the identity attributes of ``ds``, in place.

    Names and IDs become a dummy and a pseudonym (action Z/D), dates a dummy date, descriptive
    and institution attributes are removed (X), study and frame-of-reference UIDs replaced
    through :func:`anonymous_uid` (U); series and instance UIDs are new for every written
    series in any case. A source de-identified before (:func:`deidentified_before`, judged on
    ``ds`` and the source's de-identification ``codes``) keeps its UIDs, patient name and ID
    and study date and time. PatientIdentityRemoved, DeidentificationMethod and its code
    sequence record what was done. Timing tags must already count from
    :data:`ANONYMOUS_START`, or from the source's own time for a source de-identified before.
    """
    again = deidentified_before(ds.get("PatientIdentityRemoved", ""),
                                [*codes, *method_codes(ds)])
    kept = {k: ds.get(k) for k in ("PatientName", "PatientID", "StudyDate", "StudyTime")
            if again and ds.get(k)}
    ds.PatientName = _DUMMY_NAME
    ds.PatientID = anonymous_id(str(ds.get("PatientID", "")))
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"):
        setattr(ds, keyword, "")
    for keyword in IDENTITY_KEYWORDS - {
            "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
            "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime", "SeriesDate",
            "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
            "ContentDate", "ContentTime", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "FrameOfReferenceUID"}:
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyDate = ANONYMOUS_START.strftime("%Y%m%d")
    ds.StudyTime = ANONYMOUS_START.strftime("%H%M%S")
    for keyword, value in kept.items():
        setattr(ds, keyword, value)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword in ds and not again:
            setattr(ds, keyword, anonymous_uid(str(getattr(ds, keyword))))
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = _METHOD
    codes = []
    for value, meaning in _METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
