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
    "deidentification_record",
    "deidentified_by_ctperf",
    "deidentify_dataset",
    "method_codes",
    "public_meta",
    "record_deidentification",
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
    return f"2.25.{int.from_bytes(_keyed_digest(str(uid).strip())[:16], 'big')}"


def _keyed_digest(text: str) -> bytes:
    """HMAC-SHA-256 of ``text`` under :func:`uid_key`."""
    return hmac.new(uid_key().encode("utf-8"), text.encode("utf-8"), hashlib.sha256).digest()


def anonymous_id(patient_id: str, study_uid: str = "") -> str:
    """A pseudonymous PatientID for ``patient_id``: a keyed hash of it, as
    :func:`anonymous_uid` makes UIDs (one patient's studies stay together, different patients
    apart: one dummy for everyone had filed every patient under one record); of the study's
    UID ``study_uid`` when the ID is empty (every patient without one had shared a hash)."""
    key = str(patient_id).strip() or f"study {str(study_uid).strip()}"
    return f"ANON-{_keyed_digest(key).hex()[:12].upper()}"


#: PS3.15's Retain UIDs Option: a source de-identified with it still holds its original UIDs.
RETAIN_UIDS_CODE = "113110"


def method_codes(ds: Any) -> list[str]:
    """The code values of a dataset's DeidentificationMethodCodeSequence, sorted."""
    return sorted({str(item.get("CodeValue", "")).strip()
                   for item in ds.get("DeidentificationMethodCodeSequence", None) or []} - {""})


def _texts(value: Any) -> list[str]:
    """A DICOM value of one or several strings (None: none) as a list."""
    return [value] if isinstance(value, str) else [str(v) for v in value or ()]


def deidentification_record(ds: Any) -> dict[str, list[str]] | None:
    """How a series says it was de-identified: its DeidentificationMethod (``method``) and code
    values (``codes``), when it has a method or says PatientIdentityRemoved YES; else None."""
    method = ds.get("DeidentificationMethod")
    if method is None and str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return None
    return {"method": _texts(method), "codes": method_codes(ds)}


def deidentified_by_ctperf(ds: Any, method: Any = (), codes: Any = ()) -> bool:
    """Whether ``ds`` (a dataset, or a mapping of its keywords) holds a series ctperf
    de-identified: PatientIdentityRemoved YES, ctperf's DeidentificationMethod (in ``ds`` or
    ``method``), its dummy name, and no original UIDs retained (PS3.15 code 113110 in ``ds``
    or ``codes``). Its UIDs and pseudonymous ID are kept when it is de-identified again
    (hashed again, maps of a de-identified series had been filed in another study). Another
    tool's de-identification is done again from the start: its PatientIdentityRemoved may sit
    on a real name (a probe's did) or real dates (code 113106), which were passed on."""
    said = _texts(ds.get("DeidentificationMethod") or method)
    return (str(ds.get("PatientIdentityRemoved") or "").strip().upper() == "YES"
            and bool(said) and said[0] == _METHOD[0]
            and str(ds.get("PatientName") or "") == _DUMMY_NAME
            and RETAIN_UIDS_CODE not in {*method_codes(ds), *(str(c).strip() for c in codes)})


def deidentify_dataset(ds: Dataset, *, method: Any = (), codes: Any = ()) -> None:
    """Apply the Basic Profile to the identity attributes of ``ds``, in place.

    Names and IDs become a dummy and a keyed pseudonym (action Z/D), dates a dummy date,
    descriptive and institution attributes are removed (X), study and frame-of-reference UIDs
    replaced through :func:`anonymous_uid` (U); series and instance UIDs are new for every
    written series in any case. A series ctperf de-identified before
    (:func:`deidentified_by_ctperf`, judged on ``ds`` and its source's DeidentificationMethod
    ``method`` and code values ``codes``) keeps its UIDs and pseudonymous ID.
    PatientIdentityRemoved, DeidentificationMethod and its code sequence record what was done.
    Timing tags must already count from :data:`ANONYMOUS_START`.
    """
    again = deidentified_by_ctperf(ds, method, codes)
    ds.PatientID = (str(ds.get("PatientID") or "") if again else
                    anonymous_id(str(ds.get("PatientID") or ""),
                                 str(ds.get("StudyInstanceUID") or "")))
    ds.PatientName = _DUMMY_NAME
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
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword in ds and not again:
            setattr(ds, keyword, anonymous_uid(str(getattr(ds, keyword))))
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    record_deidentification(ds, _METHOD, _METHOD_CODES)


def record_deidentification(ds: Dataset, method: Any, codes: Any) -> None:
    """Set ``ds``'s DeidentificationMethod (``method``, strings) and its code sequence
    (``codes``: DCM code values, or (value, meaning) pairs): what a series written from a
    de-identified source must carry with its PatientIdentityRemoved YES (PS3.3 C.7.1.1, Type
    1C; a copy without them had lost a Retain UIDs code, and a later de-identification kept the
    original UIDs)."""
    ds.DeidentificationMethod = ([str(m) for m in method if str(m).strip()]
                                 or ["recorded by the source's tool, not in it"])
    items = []
    for code in codes:
        value, meaning = code if isinstance(code, tuple) else (code, None)
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = value, "DCM"
        if meaning is not None:
            item.CodeMeaning = meaning
        items.append(item)
    if items:
        ds.DeidentificationMethodCodeSequence = items
