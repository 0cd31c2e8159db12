"""Writing studies and maps as DICOM: round trips keep values, geometry, timing and patient tags."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from ctperf.io import (
    dicom_write,
    read_dicom_series,
    read_dicom_volume,
    write_maps_dicom,
    write_series_dicom,
)
from ctperf.types import CTPSeries, PerfusionMaps
from dicom_factory import write_fake_study


def oblique_affine() -> np.ndarray:
    """A rotated (about z by 20 deg) and translated RAS affine with anisotropic voxels."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.45, 0.5, 5.0])
    affine[:3, 3] = [12.0, -30.5, 44.0]
    return affine


def test_series_round_trip(tmp_path, small_series):
    series = small_series.replace(affine=oblique_affine(),
                                  meta={**small_series.meta, "scanner": "ACME"})
    out = write_series_dicom(series, tmp_path / "dcm", patient={"PatientID": "X7"})
    assert len(list(out.glob("*.dcm"))) == 12 * 3
    back = read_dicom_series(out)
    # int16 storage rounds HU to integers: that is the only change
    np.testing.assert_array_equal(back.hu, np.rint(series.hu))
    np.testing.assert_allclose(back.times, series.times, atol=1e-6)  # microsecond digits
    # DS values keep >= 10 significant digits: 1e-6 mm is far below any voxel
    np.testing.assert_allclose(back.affine, series.affine, atol=1e-6)
    assert back.meta["description"] == "test"
    assert back.meta["kvp"] == 80 and back.meta["mas"] == 150
    assert back.meta["scanner"] == "ACME"
    assert back.meta["dicom"]["PatientID"] == "X7"
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.RescaleSlope == 1 and ds.RescaleIntercept == 0
    assert ds.pixel_array.dtype == np.int16


def test_slice_times_round_trip(tmp_path, small_series):
    offsets = 0.1 * np.arange(3)
    series = small_series.replace(slice_times=small_series.times[:, None] + offsets)
    back = read_dicom_series(write_series_dicom(series, tmp_path / "dcm"))
    np.testing.assert_allclose(back.slice_times, series.slice_times, atol=1e-6)  # us digits


def test_dicom_to_series_to_dicom_is_identical(tmp_path, rng):
    study = write_fake_study(tmp_path / "src", rng, tilt_deg=7.0, shuttle=True)
    series = read_dicom_series(study.folder)
    out = write_series_dicom(series, tmp_path / "out")
    again = read_dicom_series(out)
    np.testing.assert_array_equal(again.hu, series.hu)
    np.testing.assert_allclose(again.affine, series.affine, atol=1e-6)  # DS digits
    np.testing.assert_allclose(again.slice_times, series.slice_times, atol=1e-6)  # us digits
    # tag by tag, file by file, matched on (time, position) rather than names
    def key(ds):
        return (str(ds.AcquisitionDateTime), round(float(ds.ImagePositionPatient[2]), 3))

    before = {key(d): d for d in map(pydicom.dcmread, study.files.values())}
    after = {key(d): d for d in map(pydicom.dcmread, out.glob("*.dcm"))}
    assert before.keys() == after.keys()
    for k, a in before.items():
        b = after[k]
        # the source files carry 6 significant digits (+-5e-5 mm at 45 mm); the reader fits one
        # slice step through them, so positions come back within that rounding, not bit-exact
        np.testing.assert_allclose(np.asarray(b.ImagePositionPatient, float),
                                   np.asarray(a.ImagePositionPatient, float), atol=1e-4)
        np.testing.assert_allclose(np.asarray(b.ImageOrientationPatient, float),
                                   np.asarray(a.ImageOrientationPatient, float), atol=1e-6)
        np.testing.assert_array_equal(b.pixel_array * float(b.RescaleSlope)
                                      + float(b.RescaleIntercept),
                                      a.pixel_array * float(a.RescaleSlope)
                                      + float(a.RescaleIntercept))
        assert b.PatientName == a.PatientName and b.StudyInstanceUID == a.StudyInstanceUID
        assert b.SeriesInstanceUID != a.SeriesInstanceUID


def test_compressed_files_are_jpeg_lossless(tmp_path, small_series):
    out = write_series_dicom(small_series, tmp_path / "dcm", compress=True)
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(read_dicom_series(out).hu, np.rint(small_series.hu))


def test_clipping_to_int16(tmp_path, small_series):
    hu = small_series.hu.copy()
    hu[0, 0, 0, 0], hu[0, 0, 0, 1] = 40000.0, -40000.0
    back = read_dicom_series(write_series_dicom(small_series.replace(hu=hu), tmp_path / "d"))
    assert back.hu[0, 0, 0, 0] == 32767 and back.hu[0, 0, 0, 1] == -32768


def test_failed_write_leaves_nothing(tmp_path, small_series, monkeypatch):
    calls = []
    original = dicom_write._finish_file

    def fail_late(ds, path, compress):
        calls.append(path)
        if len(calls) > 5:
            raise OSError("disk full")
        original(ds, path, compress)

    monkeypatch.setattr(dicom_write, "_finish_file", fail_late)
    with pytest.raises(OSError, match="disk full"):
        write_series_dicom(small_series, tmp_path / "dcm")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def maps(rng) -> PerfusionMaps:
    shape = (3, 16, 20)
    return PerfusionMaps(
        maps={"cbf": rng.uniform(0, 90, shape), "cbv": rng.uniform(0, 6, shape),
              "mtt": rng.uniform(2, 15, shape), "delay": rng.uniform(-3, 8, shape)},
        affine=oblique_affine(), provenance={"method": "box-NLR"})


def test_maps_round_trip(tmp_path, maps, small_series):
    source = small_series.replace(affine=oblique_affine(),
                                  meta={**small_series.meta,
                                        "dicom": {"PatientID": "P9", "StudyInstanceUID": "1.2.9"}})
    folders = write_maps_dicom(maps, tmp_path / "maps", source=source)
    assert [f.name for f in folders] == maps.names
    for folder in folders:
        volume, affine, meta = read_dicom_volume(folder)
        # stored at 0.01 steps: rounding error is at most half a step (+ float32 slack)
        np.testing.assert_allclose(volume, maps[folder.name], atol=0.005 + 1e-4)
        np.testing.assert_allclose(affine, maps.affine, atol=1e-6)  # DS digits
        assert meta["dicom"]["PatientID"] == "P9"
        assert meta["dicom"]["StudyInstanceUID"] == "1.2.9"
        assert folder.name.upper() in meta["description"]
        assert maps.units[folder.name] in meta["description"]
        assert "box-NLR" in meta["description"]
        ds = pydicom.dcmread(meta["files"][0])
        assert float(ds.RescaleSlope) == pytest.approx(0.01)
        assert float(ds.WindowWidth) >= 1  # the least a linear window may be (PS3.3)


def test_a_map_scaled_slice_by_slice_is_read(tmp_path, maps):
    """Maps written by other software often give each slice its own RescaleSlope."""
    folder = write_maps_dicom(maps, tmp_path / "maps")[0]
    for i, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.int64)
        factor = i + 1                       # slope 0.01 * factor; values rounded to its step
        ds.PixelData = (stored // factor).astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleSlope = f"{0.01 * factor:g}"
        ds.save_as(path)
    volume, _, _ = read_dicom_volume(folder)
    # the coarsest slope here is 0.01 x the slice count: values within one of its steps
    step = 0.01 * maps.shape[0]
    np.testing.assert_allclose(volume, maps[folder.name], atol=step + 0.005)


def test_maps_uids_are_new_per_series(tmp_path, maps):
    folders = write_maps_dicom(maps, tmp_path / "maps")
    uids = {pydicom.dcmread(next(f.glob("*.dcm"))).SeriesInstanceUID for f in folders}
    assert len(uids) == len(folders)


def test_map_nan_stored_as_zero(tmp_path, maps):
    cbf = maps["cbf"].copy()
    cbf[0, 0, 0] = np.nan
    folders = write_maps_dicom(PerfusionMaps(maps={"cbf": cbf}, affine=maps.affine), tmp_path / "m")
    volume, _, _ = read_dicom_volume(folders[0])
    assert volume[0, 0, 0] == 0
    # a map declaring its 0 padding (as UniToBrain's may) is read as stored: a study's padding
    # reads as air, which had turned a map's CBF of 0 into -1000 (a review's case)
    for path in folders[0].glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds["PixelPaddingValue"] = pydicom.DataElement(0x00280120, "US", 0)
        ds.save_as(path)
    volume, _, _ = read_dicom_volume(folders[0])
    assert volume[0, 0, 0] == 0 and volume.min() >= 0


def test_series_with_one_slice(tmp_path, small_series):
    one = CTPSeries(hu=small_series.hu[:, :1], times=small_series.times,
                    affine=small_series.affine)
    back = read_dicom_series(write_series_dicom(one, tmp_path / "d"))
    np.testing.assert_allclose(back.affine, one.affine, atol=1e-6)  # DS digits


def test_identity_in_any_script_is_kept(tmp_path, small_series, maps):
    """A Cyrillic and Japanese name (ISO_IR 192 in the source) comes back as written, in the
    study and in the maps; Latin-1 text keeps ISO_IR 100."""
    name = "Иванов^Пётр=山田^太郎"
    source = small_series.replace(meta={**small_series.meta, "dicom": {
        "PatientName": name, "InstitutionName": "Sjukhus Øst", "PatientPosition": "FFS"}})
    study = read_dicom_series(write_series_dicom(source, tmp_path / "s"))
    assert study.meta["dicom"]["PatientName"] == name
    ds = pydicom.dcmread(next((tmp_path / "s").glob("*.dcm")))
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.PatientPosition == "FFS"
    for folder in write_maps_dicom(maps.replace(affine=small_series.affine), tmp_path / "m",
                                   source=study):
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert str(ds.PatientName) == name and ds.InstitutionName == "Sjukhus Øst"
        assert ds.KVP == 80 and "AcquisitionNumber" in ds  # Type 2 in the CT Image module
    latin = small_series.replace(meta={**small_series.meta, "dicom": {"PatientName": "Müller"}})
    ds = pydicom.dcmread(next(write_series_dicom(latin, tmp_path / "l").glob("*.dcm")))
    assert ds.SpecificCharacterSet == "ISO_IR 100" and str(ds.PatientName) == "Müller"
    assert ds.PatientPosition == ""  # not known: left empty (Type 2), not invented


def test_a_processed_study_is_marked_derived(tmp_path, small_series):
    plain = pydicom.dcmread(next(write_series_dicom(small_series, tmp_path / "a").glob("*.dcm")))
    assert list(plain.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and plain.SeriesNumber == 1
    out = write_series_dicom(small_series, tmp_path / "b", derived="registered and filtered")
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.DerivationDescription == "registered and filtered"
    assert ds.SeriesDescription == "test (registered and filtered)" and ds.SeriesNumber == 1001
    # derived again (registered after filtering): one description and number, the steps of
    # the record (it had read "test (registered and filtered) (filtered)", number 2001)
    twice = write_series_dicom(read_dicom_series(out), tmp_path / "t", derived="registered")
    ds = pydicom.dcmread(next(twice.glob("*.dcm")))
    assert ds.SeriesDescription == "test (registered)" and ds.SeriesNumber == 1001
    again = read_dicom_series(out)  # a DERIVED source stays DERIVED when rewritten
    ds = pydicom.dcmread(next(write_series_dicom(again, tmp_path / "c").glob("*.dcm")))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert plain.Manufacturer == ""  # Type 2: present, empty when the source does not say
    # maps name ctperf as their maker, not the scanner (PACS had shown ctperf's CBF as a
    # SIEMENS SOMATOM Force image); a filtered study is still the scanner's images, with ctperf
    # as modifying equipment, and reads back with its steps and its scanner
    from ctperf.versioning import software_version

    scanned = small_series.replace(meta={**small_series.meta, "dicom": {
        "Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force"}})
    (maps_folder, *_) = write_maps_dicom(
        PerfusionMaps(maps={"cbf": np.ones(scanned.shape[1:])}, affine=scanned.affine),
        tmp_path / "m", source=scanned)
    ds = pydicom.dcmread(next(maps_folder.glob("*.dcm")))
    assert ds.Manufacturer == "ctperf" and ds.SoftwareVersions == software_version()
    assert "ManufacturerModelName" not in ds
    filtered = write_series_dicom(scanned, tmp_path / "d", derived="registered and filtered")
    ds = pydicom.dcmread(next(filtered.glob("*.dcm")))
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("SIEMENS", "SOMATOM Force")
    (item,) = ds.ContributingEquipmentSequence
    assert item.Manufacturer == "ctperf" and item.SoftwareVersions == software_version()
    back = read_dicom_series(filtered).meta
    assert back["preprocess"] == {"registered": True, "filtered": True}
    assert back["scanner"] == "SIEMENS SOMATOM Force"
    assert "bilateral" not in back  # no settings recorded, none invented
    # the filter's settings travel with the steps, as a NIfTI sidecar carries them (maps of a
    # study filtered then sent as DICOM had recorded no filter settings)
    settings = {"spatial_sigma_mm": 2.5, "range_sigma_hu": 10.0, "guide": "temporal mean",
                "filter_weights": "quadratic"}
    tuned = scanned.replace(meta={**scanned.meta, "bilateral": settings})
    back = read_dicom_series(write_series_dicom(tuned, tmp_path / "f",
                                                derived="filtered")).meta
    assert back["preprocess"] == {"registered": False, "filtered": True}
    assert back["bilateral"] == settings
    ds = pydicom.dcmread(next(write_series_dicom(scanned, tmp_path / "e").glob("*.dcm")))
    assert ds.Manufacturer == "SIEMENS" and "ContributingEquipmentSequence" not in ds
    assert "preprocess" not in read_dicom_series(tmp_path / "e").meta


def test_a_preprocessed_nifti_converted_to_dicom_stays_derived(tmp_path, small_series):
    """``ctperf convert`` of a ``ctperf preprocess`` study: its sidecar's record of the steps
    makes the DICOM DERIVED, never an original scan."""
    from ctperf.io import read_nifti_series, write_series_nifti

    done = small_series.replace(meta={**small_series.meta,
                                      "preprocess": {"registered": False, "filtered": True}})
    write_series_nifti(done, tmp_path / "study.nii.gz")
    back = read_nifti_series(tmp_path / "study.nii.gz")
    ds = pydicom.dcmread(next(write_series_dicom(back, tmp_path / "d").glob("*.dcm")))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.DerivationDescription == "filtered" and ds.SeriesNumber == 1001


def test_a_wide_map_keeps_nan_at_zero_and_ttp_gets_its_own_window(tmp_path, maps):
    cbf = maps["cbf"].copy()
    cbf[0, 0, 0], cbf[0, 0, 1], cbf[0, 0, 2] = np.nan, 1000.0, 3.0  # 0.01 steps no longer fit
    ttp = 25.0 + maps["mtt"]
    folders = write_maps_dicom(PerfusionMaps(maps={"cbf": cbf, "ttp": ttp}, affine=maps.affine),
                               tmp_path / "m")
    volume, _, meta = read_dicom_volume(folders[0])
    step = float(pydicom.dcmread(meta["files"][0]).RescaleSlope)
    assert volume[0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(volume[0, 0, 1:3], [1000.0, 3.0], atol=step / 2 + 1e-6)
    ds = pydicom.dcmread(next(folders[1].glob("*.dcm")))
    lo, hi = ds.WindowCenter - ds.WindowWidth / 2, ds.WindowCenter + ds.WindowWidth / 2
    assert lo > 25 and hi < 41  # the TTPs' own range (27-40 s), not a fixed 0-30 s


def test_a_map_below_minus_327_keeps_its_step_and_says_nothing_of_coarsening(tmp_path, maps,
                                                                              caplog):
    """-400..100 (a delay map gone wrong) does not fit signed 16 bits at 0.01, but fits unsigned
    from an intercept: the step stays 0.01, and no warning claims it was coarsened."""
    delay = np.clip(maps["mtt"], 0, 100).astype(np.float64)
    delay[0, 0, 0], delay[0, 0, 1] = -400.0, 100.0
    folders = write_maps_dicom(PerfusionMaps(maps={"delay": delay}, affine=maps.affine),
                               tmp_path / "m")
    volume, _, meta = read_dicom_volume(folders[0])
    assert float(pydicom.dcmread(meta["files"][0]).RescaleSlope) == pytest.approx(0.01)
    np.testing.assert_allclose(volume, delay, atol=0.0051)  # half a step, and float32 reads
    assert "does not fit" not in caplog.text


def test_map_series_numbers_leave_the_source_and_other_methods_apart(tmp_path, maps,
                                                                     small_series):
    """A scan numbered 101 and its CBF map had both been series 101, and every method's maps
    were numbered 101 on: PACS lists and hanging protocols go by the number."""
    source = small_series.replace(affine=oblique_affine(),
                                  meta={**small_series.meta, "series_number": 101})
    numbers = {}
    for method in ("nlr-fast", "bayes", "unet"):
        m = maps.replace(provenance={"method": method})
        folders = write_maps_dicom(m, tmp_path / method, source=source)
        numbers[method] = [int(pydicom.dcmread(next(f.glob("*.dcm"))).SeriesNumber)
                           for f in folders]
        ds = pydicom.dcmread(next(folders[0].glob("*.dcm")))
        assert ds.BodyPartExamined == "HEAD"   # the General Series module's Type 2C
    every = [n for ns in numbers.values() for n in ns]
    assert 101 not in every and len(set(every)) == len(every)
    assert numbers["nlr-fast"] == [10115, 10116, 10117, 10118]


def test_a_narrow_map_gets_a_window_dicom_allows(tmp_path, rng):
    """An SD map of a few tenths (bayes's cbv_sd, the residual) had a window 0.4 wide, which
    dciodvfy rejects: a linear window is at least 1 wide."""
    sd = PerfusionMaps(maps={"cbv_sd": rng.uniform(0.0, 0.4, (2, 8, 8))},
                       affine=oblique_affine(), provenance={"method": "bayes"})
    (folder,) = write_maps_dicom(sd, tmp_path / "maps")
    ds = pydicom.dcmread(next(folder.glob("*.dcm")))
    assert float(ds.WindowWidth) == 1.0
    assert 0.1 < float(ds.WindowCenter) < 0.3


def test_dicom_from_a_nifti_without_orientation_says_so(tmp_path, maps, small_series):
    """DICOM must state an orientation; one written from a NIfTI header that set none is a
    guess, which the images' comments say (PACS shows left and right markers that nothing
    verified); maps and studies from an oriented source carry no such comment."""
    unknown = small_series.replace(meta={**small_series.meta, "nifti_xform_code": 0})
    for out, known in ((write_series_dicom(unknown, tmp_path / "s"), False),
                       (write_series_dicom(small_series, tmp_path / "k"), True)):
        ds = pydicom.dcmread(next(out.glob("*.dcm")))
        assert ("orientation unknown" in str(ds.get("ImageComments", ""))) is not known
    for code, note in ((0, True), (1, False)):
        oriented = maps.replace(provenance={**maps.provenance, "nifti_xform_code": code})
        (folder, *_) = write_maps_dicom(oriented, tmp_path / f"m{code}")
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert ("orientation unknown" in ds.ImageComments) is note
        assert ds.ImageComments.startswith("cbf in mL/100g/min; method: box-NLR")


def test_dicom_maps_name_the_constants_they_were_made_with(tmp_path, maps,
                                                           small_series):
    """CBF and CBV scale with kH / rho: maps made with other constants must say so in their
    DICOM too (they had the same description, comments and series number as the defaults)."""
    made = {}
    for kh, rho in ((0.73, 1.04), (1.0, 1.0)):
        scaled = maps.replace(provenance={**maps.provenance,
                                          "constants": {"kh": kh, "rho_g_per_ml": rho}})
        (folder, *_) = write_maps_dicom(scaled, tmp_path / f"k{kh}")
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert ds.DerivationDescription == f"box-NLR; kH {kh:g}, rho {rho:g} g/mL"
        assert ds.ImageComments.endswith(f"kH {kh:g}, rho {rho:g} g/mL")
        made[kh] = ds.ImageComments
    assert made[0.73] != made[1.0]
    # maps of a registered and filtered study say so too
    source = small_series.replace(meta={**small_series.meta,
                                        "preprocess": {"registered": True, "filtered": True}})
    (folder, *_) = write_maps_dicom(maps.replace(affine=source.affine), tmp_path / "p",
                                    source=source)
    ds = pydicom.dcmread(next(folder.glob("*.dcm")))
    assert ds.DerivationDescription == "box-NLR; from a study registered and filtered"
    # the maps' own record wins: filtered in the same run (`maps --filter`), or not at all
    for done, said in (({"registered": False, "filtered": True}, "; from a study filtered"),
                       ({"registered": False, "filtered": False}, "")):
        one_step = maps.replace(affine=source.affine,
                                provenance={**maps.provenance, **done})
        (folder, *_) = write_maps_dicom(one_step, tmp_path / f"o{said!s:.3}", source=small_series)
        ds = pydicom.dcmread(next(folder.glob("*.dcm")))
        assert ds.DerivationDescription == f"box-NLR{said}"


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) not installed: the standard's own validator")
def test_written_dicom_passes_the_standards_validator(tmp_path, maps, small_series, rng):
    """Every series ctperf writes (a study, its maps, an SD map of a few tenths, maps from a
    source without orientation) has no error by dciodvfy (a window under 1 wide had one)."""
    narrow = PerfusionMaps(maps={**maps.maps, "cbv_sd": rng.uniform(0.0, 0.4, maps.shape)},
                           affine=maps.affine,
                           provenance={"method": "bayes", "nifti_xform_code": 0})
    folders = [write_series_dicom(small_series, tmp_path / "study"),
               *write_maps_dicom(narrow, tmp_path / "maps", source=small_series.replace(
                   hu=small_series.hu[:, :maps.shape[0], :maps.shape[1], :maps.shape[2]],
                   affine=maps.affine))]
    for folder in folders:
        first = sorted(folder.glob("*.dcm"))[0]
        run = subprocess.run(["dciodvfy", str(first)], capture_output=True, text=True,
                             timeout=60)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines()
                  if ln.startswith("Error")]
        assert not errors, (folder.name, errors)


def test_written_code_strings_are_valid(tmp_path, maps, small_series):
    """Every code string (VR CS) of the study and maps ctperf writes passes pydicom's value
    check: the maps' RescaleType had been their unit, "mL/100g/min", where a code string takes
    upper case, digits, space and "_" only."""
    from pydicom.valuerep import validate_value

    folders = [write_series_dicom(small_series, tmp_path / "study"),
               *write_maps_dicom(maps, tmp_path / "maps")]
    for folder in folders:
        ds = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
        for elem in ds.iterall():
            if elem.VR == "CS" and elem.value is not None:
                for value in (elem.value if elem.VM > 1 else [elem.value]):
                    validate_value("CS", value, pydicom.config.RAISE)
    assert ds.RescaleType == "US" and "[s]" in ds.SeriesDescription
