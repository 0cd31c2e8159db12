"""Patient identity: never in JSON sidecars; kept in DICOM outputs unless ``anonymise=True``,
which applies the DICOM PS3.15 basic profile."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from ctperf import PerfusionMaps
from ctperf.io import (
    public_meta,
    read_dicom_series,
    read_nifti_series,
    write_maps_dicom,
    write_series_dicom,
    write_series_nifti,
)
from ctperf.io.privacy import ANONYMOUS_START, anonymous_uid
from dicom_factory import write_fake_study

# every identifying value the fake study's files hold
IDENTITY = ("Test^Patient", "P001", "19500607", "ACC778899", "Saint Example Hospital",
            "Doe^Jane", "20210304")


@pytest.fixture
def study(tmp_path, rng):
    return write_fake_study(tmp_path / "s", rng)


@pytest.fixture
def series(study):
    return read_dicom_series(study.folder)


def test_reader_keeps_identity_for_dicom_outputs(series):
    assert series.meta["dicom"]["PatientID"] == "P001"
    assert series.meta["dicom"]["InstitutionName"] == "Saint Example Hospital"


def test_nifti_sidecar_has_no_identity_nor_absolute_paths(series, study, tmp_path):
    meta = {**series.meta, "preprocess": {"source": str(study.folder), "registered": True}}
    path = write_series_nifti(series.replace(meta=meta), tmp_path / "out" / "study.nii.gz")
    text = path.with_name("study.json").read_text()
    for value in (*IDENTITY, series.meta["series_uid"], str(tmp_path)):
        assert value not in text, value
    side = json.loads(text)["meta"]
    # what describes the acquisition stays
    assert side["kvp"] == 80 and side["mas"] == 150 and side["scanner"] == "ACME Scan 9"
    assert side["dicom"] == {"Manufacturer": "ACME", "ManufacturerModelName": "Scan 9"}
    assert side["preprocess"] == {"source": study.folder.name, "registered": True}
    back = read_nifti_series(path)
    np.testing.assert_allclose(back.times, series.times)


def test_public_meta_drops_nested_identity_and_windows_paths():
    meta = {"kvp": 80, "patient_id": "MOL-001", "extra": {"PatientName": "X^Y", "n": 3},
            "files": ["/a/b"], "source": "C:\\data\\patient\\study", "acquisition_start": "x",
            "description": "Perfusion Müller"}  # free text, as SeriesDescription may name one
    assert public_meta(meta) == {"kvp": 80, "extra": {"n": 3}, "source": "study"}
    # the same free text under the keys another tool's NIfTI sidecar uses
    other = {"SeriesDescription": "Perfusion Mueller Joerg", "ProtocolName": "Mueller",
             "ImageComments": "patient Müller Jörg aphasia", "subject": "Mueller", "kvp": 80}
    assert public_meta(other) == {"kvp": 80}


def file_text(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*.dcm")))


def test_anonymised_series_follows_basic_profile(series, tmp_path):
    out = write_series_dicom(series, tmp_path / "anon", anonymise=True,
                             patient={"PatientName": "Given^Name"})
    data = file_text(out)
    for value in (*IDENTITY, "Given^Name", series.meta["dicom"]["StudyInstanceUID"],
                  series.meta["frame_of_reference_uid"], "CTP 5mm"):
        assert value.encode() not in data, value
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert ds.PatientIdentityRemoved == "YES"
    assert "PS3.15" in ds.DeidentificationMethod[0]
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.PatientName == "ANONYMOUS" and ds.PatientBirthDate == ""
    assert "InstitutionName" not in ds and "PatientAge" not in ds
    assert ds.StudyInstanceUID == anonymous_uid(series.meta["dicom"]["StudyInstanceUID"])
    assert ds.StudyDate == ANONYMOUS_START.strftime("%Y%m%d")
    back = read_dicom_series(out)
    np.testing.assert_array_equal(back.hu, series.hu)
    # times between frames survive the dummy date (microsecond digits)
    np.testing.assert_allclose(back.times, series.times, atol=1e-6)


def test_anonymised_maps_file_with_anonymised_series(series, tmp_path, rng):
    shape = series.shape[1:]
    maps = PerfusionMaps(maps={"cbf": rng.uniform(0, 90, shape), "cbv": rng.uniform(0, 6, shape)},
                         affine=series.affine, provenance={"method": "box-NLR"})
    folders = write_maps_dicom(maps, tmp_path / "maps", source=series, anonymise=True)
    series_ds = pydicom.dcmread(next(write_series_dicom(
        series, tmp_path / "anon", anonymise=True).glob("*.dcm")))
    for folder in folders:
        assert not any(v.encode() in file_text(folder) for v in IDENTITY)
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert ds.PatientIdentityRemoved == "YES"
        # consistent UID mapping: maps and series share study and frame of reference
        assert ds.StudyInstanceUID == series_ds.StudyInstanceUID
        assert ds.FrameOfReferenceUID == series_ds.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != series_ds.SeriesInstanceUID
    # maps made from the de-identified series, de-identified again: still in that study (its
    # UIDs had been hashed a second time)
    anon = read_dicom_series(tmp_path / "anon")
    again = write_maps_dicom(maps, tmp_path / "maps2", source=anon, anonymise=True)
    ds = pydicom.dcmread(next(again[0].glob("*.dcm")))
    assert ds.StudyInstanceUID == series_ds.StudyInstanceUID
    assert ds.FrameOfReferenceUID == series_ds.FrameOfReferenceUID
    assert ds.PatientID == series_ds.PatientID  # the same patient (not hashed again)


def test_default_dicom_output_keeps_identity(series, tmp_path):
    ds = pydicom.dcmread(next(write_series_dicom(series, tmp_path / "d").glob("*.dcm")))
    assert ds.PatientID == "P001" and ds.InstitutionName == "Saint Example Hospital"
    assert ds.StudyInstanceUID == series.meta["dicom"]["StudyInstanceUID"]
    assert "PatientIdentityRemoved" not in ds


def test_maps_without_source_share_one_study(tmp_path, rng):
    maps = PerfusionMaps(maps={"cbf": rng.uniform(0, 90, (2, 4, 5)),
                               "cbv": rng.uniform(0, 6, (2, 4, 5))})
    folders = write_maps_dicom(maps, tmp_path / "m")
    uids = {pydicom.dcmread(next(f.glob("*.dcm"))).StudyInstanceUID for f in folders}
    assert len(uids) == 1


def test_new_uids_need_the_key(monkeypatch):
    """The new UIDs are a keyed hash of the source's: stable within a run, or across runs that
    share the secret in CTPERF_DEIDENTIFY_KEY; without the key, whoever holds the source UIDs
    cannot recompute them (an unkeyed hash would let them match de-identified data to the
    originals)."""
    import hashlib
    import uuid

    from ctperf.io.privacy import UID_KEY_VARIABLE

    source = "1.2.840.113619.2.55.3.1234"
    monkeypatch.delenv(UID_KEY_VARIABLE, raising=False)
    run = anonymous_uid(source)
    assert run == anonymous_uid(f" {source} ") and run.startswith("2.25.")
    assert len(run) <= 64 and run != anonymous_uid(source + "5")
    monkeypatch.setenv(UID_KEY_VARIABLE, "site secret")
    keyed = anonymous_uid(source)
    assert keyed != run and keyed == anonymous_uid(source)
    monkeypatch.setenv(UID_KEY_VARIABLE, "another secret")
    assert anonymous_uid(source) != keyed
    # nothing a holder of the source UID could compute without the key (such as the name-based
    # UUID of an earlier ctperf)
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "ctperf de-identification")
    unkeyed = {f"2.25.{uuid.uuid5(namespace, source).int}",
               f"2.25.{int.from_bytes(hashlib.sha256(source.encode()).digest()[:16], 'big')}"}
    assert not unkeyed & {run, keyed}


def _anonymous_uid_task(source, target, options):
    """A cohort study that records the new UID its process gives ``source``."""
    from ctperf.io import atomic_dir

    with atomic_dir(target) as tmp:
        (tmp / "uid.txt").write_text(anonymous_uid(source))


def test_one_cohort_run_gives_one_new_uid_in_every_worker(monkeypatch, tmp_path):
    """Each worker process drew its own secret: two slabs of one study, de-identified in one
    cohort run with --workers 2, came out as two studies. The client's secret now travels with
    every study to the workers."""
    from ctperf.io.privacy import UID_KEY_VARIABLE, uid_key
    from ctperf.workflow.cohort import Study, run_cohort

    monkeypatch.delenv(UID_KEY_VARIABLE, raising=False)
    source = "1.2.840.113619.2.55.3.1234"
    studies = [Study(name, source) for name in ("slab1", "slab2", "slab3")]
    run_cohort(studies, tmp_path / "out", _anonymous_uid_task, {}, workers=2)
    uids = {(tmp_path / "out" / s.name / "uid.txt").read_text() for s in studies}
    assert uids == {anonymous_uid(source)} and uid_key()  # this process's, in every worker


@pytest.mark.parametrize(("method", "codes", "kept"), [
    ("DICOM PS3.15 Annex E Basic Profile (ctperf)", ("113100",), True),
    ("DICOM PS3.15 Annex E Basic Profile (ctperf)", ("113100", "113110"), False),
    ("Another tool's profile", ("113100",), False)])
def test_only_ctperfs_own_de_identification_keeps_its_uids(method, codes, kept):
    """A series ctperf de-identified keeps its UIDs when de-identified again (hashed again, maps
    of a de-identified series were filed in another study), unless that de-identification
    retained the original UIDs (PS3.15 code 113110). Another tool's is done again from the
    start: its PatientIdentityRemoved may sit on real names or dates."""
    from pydicom.dataset import Dataset

    from ctperf.io.privacy import deidentify_dataset

    ds = Dataset()
    ds.PatientIdentityRemoved, ds.PatientName, ds.PatientID = "YES", "ANONYMOUS", "ANON-1"
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.840.99.1", "1.2.840.99.2"
    deidentify_dataset(ds, method=[method], codes=codes)
    assert (ds.StudyInstanceUID == "1.2.840.99.1") is kept
    assert (ds.FrameOfReferenceUID == "1.2.840.99.2") is kept
    assert (ds.PatientID == "ANON-1") is kept


def _pseudonymised(ds, codes):
    """What a research tool's de-identification leaves: a pseudonym, shifted dates."""
    ds.PatientName, ds.PatientID, ds.StudyDate = "SUBJ017", "SUBJ017", "21010304"
    ds.PatientIdentityRemoved = "YES"
    items = []
    for code in codes:
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator = code, "DCM"
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items


@pytest.mark.parametrize("codes", [("113100",), ("113100", "113106"), ("113100", "113110")])
def test_another_tools_de_identification_is_done_again(tmp_path, rng, codes):
    """A source another tool marked de-identified had kept its UIDs, and (briefly) its names and
    dates, under --anonymise: a PatientIdentityRemoved YES on a real name (a review's spoof)
    or real dates (code 113106) passed them on, and a Retain UIDs code (113110) was lost on
    reading, so the original UIDs went out. Now everything is replaced, as for any source."""
    study = write_fake_study(tmp_path / "s", rng,
                             edit=lambda ds, t, z: _pseudonymised(ds, codes))
    source = read_dicom_series(study.folder)
    maps = PerfusionMaps(maps={"cbf": rng.uniform(0, 90, source.shape[1:])},
                         affine=source.affine, provenance={"method": "bsvd"})
    (folder,) = write_maps_dicom(maps, tmp_path / "maps", source=source, anonymise=True)
    src = pydicom.dcmread(next(p for p in study.folder.rglob("*") if p.is_file()))
    data = file_text(folder)
    for value in ("SUBJ017", "21010304", "20210304", src.StudyInstanceUID,
                  src.FrameOfReferenceUID):
        assert value.encode() not in data, value
    ds = pydicom.dcmread(next(folder.glob("*.dcm")))
    assert ds.PatientID.startswith("ANON-") and ds.StudyDate == "20000101"
    assert ds.PatientIdentityRemoved == "YES"


def test_a_copy_of_a_de_identified_source_keeps_its_record(tmp_path, rng):
    """Written without --anonymise, a series from a de-identified source says how it was
    de-identified (PS3.3 Type 1C): a copy had dropped the Retain UIDs code, and a later
    --anonymise of the copy then kept the original UIDs."""
    study = write_fake_study(tmp_path / "s", rng,
                             edit=lambda ds, t, z: _pseudonymised(ds, ("113100", "113110")))
    src = pydicom.dcmread(next(p for p in study.folder.rglob("*") if p.is_file()))
    copy = write_series_dicom(read_dicom_series(study.folder), tmp_path / "copy")
    ds = pydicom.dcmread(next(copy.glob("*.dcm")))
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    again = write_series_dicom(read_dicom_series(copy), tmp_path / "anon", anonymise=True)
    assert pydicom.dcmread(next(again.glob("*.dcm"))).StudyInstanceUID != src.StudyInstanceUID


def test_an_empty_patient_id_gets_a_pseudonym_of_its_study(series, tmp_path):
    """Every source with an empty PatientID (Type 2) had shared one pseudonym."""
    ids = set()
    for name in ("a", "b"):
        s = series.replace(meta={**series.meta, "dicom": {
            **series.meta["dicom"], "PatientID": "", "StudyInstanceUID": f"1.2.3.{ord(name)}"}})
        out = write_series_dicom(s, tmp_path / name, anonymise=True)
        ids.add(pydicom.dcmread(next(out.glob("*.dcm"))).PatientID)
    assert len(ids) == 2


def test_anonymised_patients_stay_apart(study, series, tmp_path):
    """One dummy PatientID for everyone had filed every patient under one record in a
    research PACS: each patient's ID becomes its own pseudonym, the same within a run."""
    other = series.replace(meta={**series.meta, "dicom": {**series.meta["dicom"],
                                                          "PatientID": "P002"}})
    ids = [pydicom.dcmread(next(write_series_dicom(s, tmp_path / name, anonymise=True)
                                .glob("*.dcm"))).PatientID
           for s, name in ((series, "a"), (other, "b"), (series, "c"))]
    assert ids[0] == ids[2] != ids[1] and all(i.startswith("ANON-") for i in ids)
    assert not any("P00" in i for i in ids)


def test_a_study_without_identity_gets_a_placeholder_of_its_own(tmp_path, rng, caplog):
    """A study read from NIfTI had gone to DICOM under PatientID "ctperf", the same for every
    patient, without a word; now a placeholder of its own study, and a warning that such
    series do not file beside the scan in PACS."""
    maps = PerfusionMaps(maps={"cbf": rng.uniform(0, 90, (2, 4, 5))})
    ids = set()
    for name in ("a", "b"):
        with caplog.at_level("WARNING", logger="ctperf"):
            folders = write_maps_dicom(maps, tmp_path / name)
        ids |= {pydicom.dcmread(next(f.glob("*.dcm"))).PatientID for f in folders}
    assert len(ids) == 2 and all(i.startswith("CTPERF-") for i in ids)
    assert sum("no DICOM patient or study identity" in r.message for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctperf"):
        write_maps_dicom(maps, tmp_path / "anon", anonymise=True)
    assert not caplog.records  # de-identified output needs no identity
