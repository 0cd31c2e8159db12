"""Reading CT perfusion studies from DICOM folders: ordering, geometry, timing and bad input."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.io import read_dicom_series, read_study, write_series_dicom, write_series_nifti
from dicom_factory import (
    START,
    FakeStudy,
    gdcm_recompress,
    write_bare_dataset,
    write_enhanced_study,
    write_fake_study,
)


def expected_affine(study: FakeStudy) -> np.ndarray:
    """RAS affine written out from the LPS geometry tags, the naive way."""
    iop = study.iop
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * study.spacing[1]
    lps[:3, 1] = iop[3:] * study.spacing[0]
    lps[:3, 2] = study.positions[1] - study.positions[0]
    lps[:3, 3] = study.positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_reads_shuffled_nested_study(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, tilt_deg=12.0)
    series = read_dicom_series(study.folder)
    # stored integers times slope 1 plus intercept: HU come back exactly
    np.testing.assert_array_equal(series.hu, study.hu)
    # times are written with microsecond digits; 1e-6 s covers that rounding
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)
    # positions are written with 6 significant digits: 1e-4 mm covers the rounding
    np.testing.assert_allclose(series.affine, expected_affine(study), atol=1e-4)
    assert series.slice_times is None
    assert series.meta["timing_source"] == "AcquisitionDateTime"
    assert series.meta["scanner"] == "ACME Scan 9"
    assert series.meta["kvp"] == 80 and series.meta["mas"] == 150
    assert series.meta["series_uid"] == study.series_uid
    assert series.meta["dicom"]["PatientID"] == "P001"


def test_shuttle_mode_gives_slice_times(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    series = read_dicom_series(study.folder, workers=1)
    assert series.slice_times is not None
    # microsecond digits in the files, see above
    np.testing.assert_allclose(series.slice_times, study.slice_times, atol=1e-6)
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)


def test_times_are_read_to_the_microsecond(tmp_path, rng):
    """Frame and slice times read as the microseconds the files hold, exactly: seconds since
    1970 had left up to 1e-7 s of rounding (frames at 0.44999999 s), and a study read from
    DICOM and from its NIfTI copy with the same times then gave nlr-fast maps whose
    ill-conditioned voxels differed by up to 69 mL/100 g/min."""
    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    series = read_dicom_series(study.folder, workers=1)
    np.testing.assert_array_equal(series.slice_times, np.round(study.slice_times, 6))
    np.testing.assert_array_equal(series.times, np.round(study.slice_times, 6).mean(axis=1))


@pytest.mark.parametrize("drop, source", [
    (("AcquisitionDateTime",), "AcquisitionTime"),
    (("AcquisitionDateTime", "AcquisitionTime"), "ContentTime"),
])
def test_timing_fallbacks(tmp_path, rng, drop, source):
    def edit(ds, t, z):
        for keyword in drop:
            delattr(ds, keyword)

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == source
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)  # microsecond digits
    np.testing.assert_array_equal(series.hu, study.hu)


def drop_times(ds, t, z):
    for keyword in ("AcquisitionDateTime", "AcquisitionTime", "ContentTime"):
        delattr(ds, keyword)


def test_missing_times_need_frame_interval(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, edit=drop_times)
    with pytest.raises(InputError, match="frame-interval"):
        read_dicom_series(study.folder)
    series = read_dicom_series(study.folder, frame_interval=2.0)
    np.testing.assert_array_equal(series.hu, study.hu)
    np.testing.assert_allclose(series.times, 2.0 * np.arange(5))
    assert "TemporalPositionIndex" in series.meta["timing_source"]


def test_instance_number_fallback(tmp_path, rng):
    def edit(ds, t, z):
        drop_times(ds, t, z)
        del ds.TemporalPositionIndex

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder, frame_interval=1.0)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert "InstanceNumber" in series.meta["timing_source"]


def test_identical_times_rejected(tmp_path, rng):
    """Every timing tag the same in all frames: the first one's error, unless the spacing is
    given (frames then ordered by TemporalPositionIndex)."""
    def edit(ds, t, z):
        ds.AcquisitionDateTime = "20210304102030.000000"
        ds.AcquisitionTime = ds.ContentTime = "102030.000000"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match="AcquisitionDateTime is identical for all 5 frames"):
        read_dicom_series(study.folder)
    series = read_dicom_series(study.folder, frame_interval=1.5)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert "TemporalPositionIndex" in series.meta["timing_source"]


def _whole_seconds(ds, t, z):
    """AcquisitionTime in whole seconds only: frames less than 1 s apart repeat it."""
    del ds.AcquisitionDateTime
    ds.AcquisitionTime = ds.AcquisitionTime.split(".")[0]


def _start_time_everywhere(ds, t, z):
    """AcquisitionDateTime holding the series' start in every image."""
    ds.AcquisitionDateTime = "20210304102030.000000"


def _acquisition_time_constant(ds, t, z):
    del ds.AcquisitionDateTime
    ds.AcquisitionTime = "102030.000000"


@pytest.mark.parametrize("edit, frame_step, source", [
    (_start_time_everywhere, 1.5, "AcquisitionTime"),
    (_acquisition_time_constant, 1.5, "ContentTime"),
    (_whole_seconds, 0.5, "ContentTime"),
])
def test_timing_tag_that_cannot_order_frames_is_passed_over(tmp_path, rng, caplog, edit,
                                                            frame_step, source):
    """A tag that is flat (the series' start in every image) or repeats within a slice (whole
    seconds, frames 0.5 s apart) gives way to the next tag that increases."""
    study = write_fake_study(tmp_path / "s", rng, frame_step=frame_step, edit=edit)
    with caplog.at_level(logging.INFO, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == source
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)  # microsecond digits
    np.testing.assert_array_equal(series.hu, study.hu)
    assert f"frame times from {source} (passed over:" in caplog.text


def test_tag_passed_over_is_said_before_whole_seconds(tmp_path, rng, caplog):
    """AcquisitionTime the series' start in every image, TriggerTime in whole seconds: the log
    says why AcquisitionTime was passed over (it did only when a finer tag followed)."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime, ds.ContentTime
        ds.AcquisitionTime = "102030.000000"
        ds.TriggerTime = f"{2000 * t}"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with caplog.at_level(logging.INFO, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "TriggerTime"
    np.testing.assert_array_equal(series.times, 2.0 * np.arange(5))
    assert "frame times from TriggerTime (passed over: AcquisitionTime" in caplog.text


def _ge_console(delay_s: float | None):
    """An edit of write_fake_study's images as a GE console writes them: AcquisitionTime the
    series' start in every image, TriggerTime the ms from the start, and ContentTime either the
    console's own clock, one image every 0.1 s (``delay_s`` None), or the acquisition's
    clock ``delay_s`` later."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime
        start = dt.datetime.strptime("102030", "%H%M%S")
        when = dt.datetime.strptime(ds.AcquisitionTime, "%H%M%S.%f")
        ds.TriggerTime = f"{(when - start).total_seconds() * 1000:.1f}"
        made = (start + dt.timedelta(seconds=60.0 + 0.1 * (3 * t + z)) if delay_s is None
                else when + dt.timedelta(seconds=delay_s))
        ds.ContentTime = made.strftime("%H%M%S.%f")
        ds.AcquisitionTime = "102030.000000"
    return edit


def test_a_consoles_content_time_gives_way_to_the_acquisitions_time(tmp_path, rng, caplog):
    """ContentTime is when the pixels were made: a console writing an image every 0.1 s had
    been read as the frames' times (0.3 s apart for 1.5-1.75 s frames: CBF three times too
    high, no lesion, an INFO line only). TriggerTime, held by every image, is read instead."""
    study = write_fake_study(tmp_path / "s", rng, edit=_ge_console(None))
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "TriggerTime"
    # times written in 0.1 ms
    np.testing.assert_allclose(series.times, study.times - study.times[0], atol=1e-4)
    assert "ContentTime does not tick at the acquisition's pace" in caplog.text
    # a ContentTime that is the acquisition's clock a reconstruction's delay later is read
    caplog.clear()
    study = write_fake_study(tmp_path / "d", rng, edit=_ge_console(4.0))
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "ContentTime" and not caplog.text



@pytest.mark.parametrize("kind", ["restarting", "ecg", "pass_start"])
def test_content_time_stays_where_the_relative_tag_is_no_acquisition_clock(tmp_path, rng,
                                                                            caplog, kind):
    """ContentTime the images' true times beside a TriggerTime that restarts with a protocol's
    second acquisition, an ECG trigger's delay in no time order, or a FrameReferenceTime that is
    the start of each pass of a sweep (the slices 0.2 s apart within it): ContentTime is read,
    as before the console rule (a review had the frames reordered by the restarting tag)."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime
        when = dt.datetime.strptime(ds.AcquisitionTime, "%H%M%S.%f")
        ds.ContentTime = when.strftime("%H%M%S.%f")
        seconds = (when - dt.datetime.strptime("102030", "%H%M%S")).total_seconds()
        tag, value = {"restarting": ("TriggerTime", seconds - (6.0 if t >= 3 else 0.0)),
                      "ecg": ("TriggerTime", 0.25 + 0.1 * ((7 * t + z) % 5)),
                      "pass_start": ("FrameReferenceTime", seconds - 0.2 * z)}[kind]
        setattr(ds, tag, f"{1000 * value:.1f}")
        ds.AcquisitionTime = "102030.000000"

    study = write_fake_study(tmp_path / "s", rng, shuttle=True, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "ContentTime" and "pace" not in caplog.text
    np.testing.assert_allclose(series.slice_times, study.slice_times - study.slice_times[0, 0],
                               atol=1e-5)


def test_times_in_whole_ms_are_not_a_clock_cut_to_the_second(tmp_path, rng, caplog):
    """TriggerTime of 0, 1000, 3000 ms is exact to the ms: it had been warned of as whole
    seconds read up to 1 s off, advising --frame-interval; and that option, given, spaced a
    two-rate protocol evenly without a word, as the series' flat AcquisitionTime hid it."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime, ds.ContentTime
        ds.TriggerTime = f"{1000 * (t + max(0, t - 2))}"  # 1 s steps, then 2 s
        ds.AcquisitionTime = "102030.000000"

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.times, [0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    assert not caplog.text
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        read_dicom_series(study.folder, frame_interval=1.0)
    assert "frame_interval), but TriggerTime steps by 1-2 s" in caplog.text


@pytest.mark.parametrize("tag", ["FrameReferenceTime", "TriggerTime"])
def test_relative_times_in_ms_are_a_last_resort(tmp_path, rng, tag):
    """Only a relative time in ms (and an AcquisitionTime holding the series' start): read,
    with no clock time claimed for the start."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime, ds.ContentTime
        ms = (dt.datetime.strptime(ds.AcquisitionTime, "%H%M%S.%f")
              - dt.datetime.strptime("102030", "%H%M%S")).total_seconds() * 1000
        setattr(ds, tag, f"{ms:.1f}")
        ds.AcquisitionTime = "102030.000000"

    study = write_fake_study(tmp_path / "s", rng, shuttle=True, edit=edit)
    series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == tag
    # times written in 0.1 ms: 1e-4 s covers the rounding
    np.testing.assert_allclose(series.slice_times, study.slice_times, atol=1e-4)
    assert "acquisition_start" not in series.meta
    np.testing.assert_array_equal(series.hu, study.hu)


def test_a_shuttle_scan_ending_on_one_table_position_is_read(tmp_path, rng, caplog):
    """Slices at the scan's last table position got one pass more than the others: a valid
    acquisition that had been refused, naming a frame that was not the one lacking. Their
    last frame is left out, with a warning; a frame missing inside the scan is still refused."""
    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    for z in (1, 2):
        study.files[(4, z)].unlink()  # the last pass imaged slice 0 only
    with caplog.at_level(logging.WARNING, logger="ctperf.io"):
        series = read_dicom_series(study.folder)
    assert series.hu.shape[0] == 4
    np.testing.assert_array_equal(series.hu, study.hu[:4])
    np.testing.assert_allclose(series.slice_times, study.slice_times[:4] - study.slice_times[0, 0],
                               atol=1e-6)
    assert "slices 0 of 3 hold 5 frames, the others 4" in caplog.text
    inside = write_fake_study(tmp_path / "i", rng, shuttle=True)
    for z in (1, 2):
        inside.files[(2, z)].unlink()
    with pytest.raises(InputError, match="has no file for frame 2 of 5"):
        read_dicom_series(inside.folder)
    # slices that lost their first frame are no pass left unfinished (a review's case)
    lost = write_fake_study(tmp_path / "f", rng, shuttle=True)
    for z in (1, 2):
        lost.files[(0, z)].unlink()
    with pytest.raises(InputError, match="no file for frame"):
        read_dicom_series(lost.folder)


def test_a_copy_exported_again_is_named_as_one(tmp_path, rng):
    """A file copied under a new SOPInstanceUID and InstanceNumber had been reported as frame 0
    missing from another slice; a whole frame copied so, as frames to order by index with
    --frame-interval."""
    study = write_fake_study(tmp_path / "s", rng)
    ds = pydicom.dcmread(study.files[(2, 1)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 500
    ds.save_as(study.folder / "reexport.dcm")
    with pytest.raises(InputError, match=r"reexport.dcm: the same image as .*exported again"):
        read_dicom_series(study.folder)
    (study.folder / "reexport.dcm").unlink()
    for z in range(3):
        ds = pydicom.dcmread(study.files[(2, z)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = 500 + z
        ds.save_as(study.folder / f"again{z}.dcm")
    with pytest.raises(InputError, match=r"the same image as .*exported again"):
        read_dicom_series(study.folder)


@pytest.mark.parametrize(("value", "signed"), [(63536, False), (-2000, True), (4095, False)])
def test_declared_padding_is_read_as_air(tmp_path, rng, value, signed):
    """Pixels a file declares padding (PixelPaddingValue: outside the field of view) had been
    read as HU: 63536 stored with intercept -1024 as 62,512 HU (the study refused, blaming its
    rescale), 4095 in 12-bit data as 3,071 HU of bone. They read as air now."""
    def edit(ds, t, z):
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        stored = stored.astype(np.int16 if signed else np.uint16).copy()
        stored[0, :3] = value
        ds.PixelData = stored.tobytes()
        ds.PixelRepresentation = int(signed)
        ds["PixelPaddingValue"] = pydicom.DataElement(0x00280120, "SS" if signed else "US",
                                                      value)

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder)
    assert np.all(series.hu[:, :, 0, :3] == -1000.0)
    np.testing.assert_array_equal(series.hu[:, :, 1:], study.hu[:, :, 1:])


def test_rescale_slope_and_intercept(tmp_path, rng):
    def edit(ds, t, z):
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16)
        ds.PixelData = (stored // 2).astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder)
    naive = 2.0 * ((study.hu + 1024) // 2) - 1024  # the edit's rescale, done by hand
    np.testing.assert_array_equal(series.hu, naive)


def test_each_file_read_with_its_own_rescale(tmp_path, rng):
    """Files of one series scaled differently (as derived images often are) are each read with
    their own slope and intercept; a file that lost its intercept is still refused, by the
    check of images against their slice's other frames."""
    def edit(ds, t, z):
        if (t + z) % 2:
            stored = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.int64) - 1024
            ds.PixelData = ((stored + 4096) // 4).astype(np.uint16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = "4", "-4096"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder)
    odd = (np.arange(study.hu.shape[0])[:, None] + np.arange(study.hu.shape[1])) % 2 == 1
    expected = np.where(odd[:, :, None, None], 4.0 * ((study.hu + 4096) // 4) - 4096, study.hu)
    np.testing.assert_array_equal(series.hu, expected)

    yy, xx = np.mgrid[:16, :16]
    head = np.where(np.hypot(yy - 7.5, xx - 7.5) < 6, 35.0, -1000.0)

    def strip(ds, t, z):  # a head in every image; one file lost its intercept
        hu = head + rng.normal(0.0, 5.0, head.shape)
        ds.PixelData = np.round(hu + 1024).astype(np.uint16).tobytes()
        if (t, z) == (5, 1):
            ds.RescaleIntercept = "0"

    damaged = write_fake_study(tmp_path / "d", rng, n_frames=8, rows=16, cols=16, edit=strip)
    with pytest.raises(InputError, match="unlike this slice's other frames"):
        read_dicom_series(damaged.folder)

    def lost(ds, t, z):  # the tag itself gone: said as such, not as a damaged image
        if (t, z) == (2, 0):
            del ds.RescaleIntercept

    bare = write_fake_study(tmp_path / "b", rng, edit=lost)
    with pytest.raises(InputError, match=r"no RescaleIntercept, while the series' other images "
                                         r"hold one \(-1024 in .*read as RescaleIntercept 0"):
        read_dicom_series(bare.folder)


def _whole_seconds(ds) -> None:
    """AcquisitionTime cut to whole seconds, as some scanners write it."""
    del ds.AcquisitionDateTime
    ds.AcquisitionTime = str(ds.AcquisitionTime).split(".")[0]


def test_whole_second_acquisition_time_gives_way_to_a_finer_clock(tmp_path, rng):
    """Frames 1.5-1.75 s apart: AcquisitionTime in whole seconds still increases (0, 1, 3,
    ... s), but ContentTime holds the same clock to the microsecond and is used."""
    study = write_fake_study(tmp_path / "s", rng, edit=lambda ds, t, z: _whole_seconds(ds))
    series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "ContentTime"
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)


def _clock_seconds(ds) -> float:
    """Seconds from the factory's START of an image's AcquisitionTime."""
    hms = str(ds.AcquisitionTime)
    return (int(hms[:2]) * 3600 + int(hms[2:4]) * 60 + float(hms[4:])
            - (START.hour * 3600 + START.minute * 60 + START.second))


def test_a_trigger_time_finer_than_whole_second_clocks(tmp_path, rng, caplog):
    """Every clock in whole seconds (frames 1.5-1.75 s apart read 0, 1, 3, 4, ... s) but
    TriggerTime in ms from the start: it is the same clock less one start time, and times the
    frames. Without it the whole seconds are read, with a warning that they may be a second
    off."""
    def edit(ds, t, z, trigger=True):
        if trigger:
            ds.TriggerTime = f"{1000.0 * _clock_seconds(ds):.1f}"
        _whole_seconds(ds)
        ds.ContentTime = str(ds.ContentTime).split(".")[0]

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    series = read_dicom_series(study.folder)
    assert series.meta["timing_source"] == "TriggerTime"
    np.testing.assert_allclose(series.times, study.times, atol=1e-3)
    coarse = write_fake_study(tmp_path / "c", rng, n_frames=6,
                              edit=lambda ds, t, z: edit(ds, t, z, trigger=False))
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(coarse.folder)
    assert series.meta["timing_source"] == "AcquisitionTime"
    assert np.max(np.abs(series.times - study.times)) > 0.3  # the whole seconds' error
    assert "whole seconds, 1 or 2 s apart" in caplog.text


def test_localisers_and_derived_images_in_the_scan_series_are_left_out(tmp_path, rng, caplog):
    """A scout and an average image stored under the perfusion series' UID (as scanners and
    workstations may do): left out with a warning, the study read as without them; a series
    all DERIVED (a processed study) is read whole."""
    study = write_fake_study(tmp_path / "s", rng, n_frames=6, nested=False)
    clean = read_dicom_series(study.folder)
    first = sorted(study.folder.iterdir())[0]
    for name, kind, rows in (("scout", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 16),
                             ("average", ["DERIVED", "SECONDARY", "AVERAGE"], None)):
        ds = pydicom.dcmread(first)
        ds.ImageType, ds.SOPInstanceUID = kind, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AcquisitionDateTime = (START + dt.timedelta(seconds=90)).strftime("%Y%m%d%H%M%S.%f")
        ds.AcquisitionTime = (START + dt.timedelta(seconds=90)).strftime("%H%M%S.%f")
        if rows:
            ds.Rows, ds.ImageOrientationPatient = rows, [1, 0, 0, 0, 0, -1]
            ds.PixelData = np.zeros((rows, ds.Columns), dtype=np.int16).tobytes()
        ds.save_as(study.folder / name, enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert "left out 2 localiser or derived images" in caplog.text
    np.testing.assert_array_equal(series.hu, clean.hu)
    np.testing.assert_array_equal(series.times, clean.times)
    derived = write_fake_study(tmp_path / "d", rng, n_frames=6,
                               edit=lambda ds, t, z: setattr(ds, "ImageType",
                                                             ["DERIVED", "SECONDARY", "AXIAL"]))
    assert read_dicom_series(derived.folder).hu.shape[0] == 6


def test_dates_and_dose_as_the_files_give_them(tmp_path, rng):
    """Acquisition and content dates removed (an anonymiser), the study date kept: the times
    are dated by it, not by 1970. The dose is the frames' median (a first, high-dose mask
    volume is not the study's); the nominal slice thickness is kept beside the spacing."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime, ds.AcquisitionDate, ds.ContentDate
        if t == 0:
            ds.Exposure = 450
        ds.SliceThickness = "10"

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    series = read_dicom_series(study.folder)
    assert series.meta["acquisition_start"].startswith(START.strftime("%Y%m%d"))
    assert series.meta["mas"] == 150.0
    assert series.meta["slice_thickness_mm"] == 10.0
    assert series.spacing[0] == pytest.approx(5.0)
    written = pydicom.dcmread(next(p for p in write_series_dicom(series, tmp_path / "o").rglob("*")
                                   if p.is_file()), stop_before_pixels=True)
    assert (float(written.SliceThickness), float(written.SpacingBetweenSlices)) == (10.0, 5.0)
    assert written.AcquisitionDate == START.strftime("%Y%m%d")


def test_frames_told_apart_by_acquisition_number(tmp_path, rng):
    """Half-second frames with whole-second times, InstanceNumber restarting in each time
    point and no TemporalPositionIndex: no duplicates (their AcquisitionNumbers differ), and
    with the frame spacing given they are ordered by AcquisitionNumber."""
    def edit(ds, t, z):
        _whole_seconds(ds)
        del ds.ContentTime, ds.TemporalPositionIndex
        ds.InstanceNumber, ds.AcquisitionNumber = z + 1, t + 1

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, frame_step=0.5, edit=edit)
    with pytest.raises(InputError, match="non-monotonic frame times"):
        read_dicom_series(study.folder)
    series = read_dicom_series(study.folder, frame_interval=0.5)
    np.testing.assert_array_equal(series.hu, study.hu)


def test_two_series_listed_and_chosen(tmp_path, rng):
    a = write_fake_study(tmp_path / "s", rng, description="CTP A", nested=False)
    b = write_fake_study(tmp_path / "s" / "other", rng, description="CTP B", nested=False)
    with pytest.raises(InputError, match=r"CTP A.*CTP B|CTP B.*CTP A") as info:
        read_dicom_series(a.folder)
    assert a.series_uid in str(info.value) and b.series_uid in str(info.value)
    series = read_dicom_series(a.folder, series_uid=b.series_uid)
    np.testing.assert_array_equal(series.hu, b.hu)
    with pytest.raises(InputError, match=r"no series 9\.9"):
        read_dicom_series(a.folder, series_uid="9.9")


def _one_series_per_time_point(uids: list[str], study: tuple[str, str] | None = None):
    """An edit that files each time point as its own series, numbered as scanners do (the
    instance number restarting in each series, no temporal index); ``study``: the study's and
    frame of reference's UIDs to use."""
    def edit(ds, t, z):
        if study is not None:
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = study
        ds.SeriesInstanceUID = uids[t]
        ds.SeriesNumber = 100 + t
        ds.InstanceNumber = z + 1
        del ds.TemporalPositionIndex
    return edit


def test_one_series_per_time_point_is_one_study(tmp_path, rng, caplog, capsys):
    uids = [generate_uid() for _ in range(5)]
    study = write_fake_study(tmp_path / "s", rng, n_frames=5, shuttle=True,
                             edit=_one_series_per_time_point(uids))
    with caplog.at_level(logging.INFO, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)
    np.testing.assert_allclose(series.slice_times, study.slice_times, atol=1e-6)
    assert series.meta["time_point_series"] == 5
    assert "5 series of one scan" in caplog.text
    assert main(["info", str(study.folder)]) == 0           # described, not listed
    out = capsys.readouterr().out
    assert "5 frames x 3 slices" in out and "4 more: one series per time point" in out
    # one of them can still be chosen, and is then a single frame: not a perfusion study
    with pytest.raises(InputError, match="one frame per slice"):
        read_dicom_series(study.folder, series_uid=uids[2])


def test_a_derived_series_beside_the_time_points_is_no_time_point(tmp_path, rng, caplog):
    """A temporal average (DERIVED) filed beside a scan exported one series per time point, on
    its grid and timed after it, had been read as one more frame (CBF halved, exit 0); maps
    that ctperf wrote back beside the scan made the study unreadable. Derived series are no
    time points of an original scan."""
    uids = [generate_uid() for _ in range(6)]
    per_point = _one_series_per_time_point(uids)

    def edit(ds, t, z):
        per_point(ds, t, z)
        if t == 5:  # the last "frame" is a derived average over time
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "AVERAGE"]
            ds.SeriesDescription = "AVERAGE"

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, shuttle=True, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.n_frames == 5 and series.meta["time_point_series"] == 5
    np.testing.assert_array_equal(series.hu, study.hu[:5])
    assert uids[5] in caplog.text  # named among what was left out


def _shift_times(ds, seconds: float) -> None:
    """Move an image's acquisition and content times by ``seconds``."""
    for date, time in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        when = dt.datetime.strptime(f"{ds[date].value}{ds[time].value}", "%Y%m%d%H%M%S.%f")
        when += dt.timedelta(seconds=seconds)
        ds[date].value, ds[time].value = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    when = dt.datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S.%f")
    ds.AcquisitionDateTime = (when + dt.timedelta(seconds=seconds)).strftime("%Y%m%d%H%M%S.%f")


def test_a_plain_ct_on_the_time_points_grid_is_no_time_point(tmp_path, rng, caplog):
    """A plain CT of the perfusion scan's coverage (same grid and frame of reference, 120 kV)
    exported beside a scan filed one series per time point had been read as its first frame,
    20 s before the others (hypoperfused volume 32 % low, exit 0). A series of another kV,
    kernel or slice thickness is no time point: it is left out, and named."""
    uids = [generate_uid() for _ in range(6)]
    per_point = _one_series_per_time_point(uids)

    def edit(ds, t, z):
        per_point(ds, t, z)
        if t == 0:          # the plain CT, 20 s before the perfusion scan's first frame
            ds.KVP, ds.SeriesDescription = 120, "Head NCCT"
            _shift_times(ds, -20.0)

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    assert series.n_frames == 5 and series.meta["time_point_series"] == 5
    np.testing.assert_array_equal(series.hu, study.hu[1:])
    assert "Head NCCT" in caplog.text and uids[0] in caplog.text
    assert "KVP 120.0, the scan's 80.0" in caplog.text
    # however close in time (a review's NCCT 5 s before a 1 s scan had become frame 0): an
    # image at another kV holds other HU, iodine's above all, and is no time point
    close = _one_series_per_time_point([generate_uid() for _ in range(6)])

    def near(ds, t, z):
        close(ds, t, z)
        if t == 0:
            ds.KVP = 120
            _shift_times(ds, -1.0)

    study = write_fake_study(tmp_path / "near", rng, n_frames=6, edit=near)
    assert read_dicom_series(study.folder).n_frames == 5


@pytest.mark.parametrize("change", ["no_kvp", "kernel_late", "thick_early"])
def test_time_points_that_differ_in_a_tag_stay_one_scan(tmp_path, rng, change):
    """A KVP absent from some time points (an anonymiser's or an export's doing) tells nothing,
    and a kernel or slice thickness of their own does not make time points another scan's: the
    first protocol split had dropped the first frame (exit 0) or refused the scan as two sets,
    a later one cut a scan whose kernel changed part-way to the usual kernel's frames."""
    uids = [generate_uid() for _ in range(8)]
    per_point = _one_series_per_time_point(uids)

    def edit(ds, t, z):
        per_point(ds, t, z)
        if change == "kernel_late":
            ds.ConvolutionKernel = "B30f" if t < 4 else "B40f"
        elif change == "thick_early" and t < 5:
            ds.SliceThickness = "10"
        elif change == "no_kvp" and t % 3 == 0:
            del ds.KVP

    study = write_fake_study(tmp_path / "s", rng, n_frames=8, edit=edit)
    series = read_dicom_series(study.folder)
    assert series.n_frames == 8
    np.testing.assert_array_equal(series.hu, study.hu)


def test_a_copied_per_time_point_export_is_a_duplicate(tmp_path, rng):
    """A scan exported one series per time point and copied into its folder again had been
    refused as series that are no time course; one copied file had dropped its time point
    with a warning (exit 0). Both are now refused as duplicates, the original named by its
    path in the folder."""
    uids = [generate_uid() for _ in range(5)]
    study = write_fake_study(tmp_path / "s", rng, n_frames=5,
                             edit=_one_series_per_time_point(uids))
    one = study.files[(2, 1)]
    shutil.copy(one, study.folder / "again.dcm")
    rel = re.escape(str(one.relative_to(study.folder)))
    with pytest.raises(InputError, match=rf"(again\.dcm: duplicate of {rel}|{rel}: duplicate of "
                                         r"again\.dcm) \(same SOPInstanceUID .*\); remove one "
                                         r"of the two"):
        read_dicom_series(study.folder)
    (study.folder / "again.dcm").unlink()
    # one image of another series copied (a scout, a single plain CT image) blocks no study
    other = write_fake_study(tmp_path / "single", rng, n_frames=1, n_slices=1)
    shutil.copytree(other.folder, study.folder / "single")
    one = next(iter(other.files.values()))
    shutil.copy(one, study.folder / "single" / one.relative_to(other.folder).parent / "copy")
    assert read_dicom_series(study.folder).n_frames == 5
    shutil.rmtree(study.folder / "single")
    shutil.copytree(study.folder, tmp_path / "copy")
    shutil.move(tmp_path / "copy", study.folder / "copy")
    with pytest.raises(InputError, match=r"15 files in all duplicate others"):
        read_dicom_series(study.folder)


def test_an_image_minutes_before_the_time_points_is_named(tmp_path, rng):
    """An image of the same protocol ten minutes before the scan (a test bolus's) makes a gap
    no time course has: the refusal names the files on both sides and their series."""
    uids = [generate_uid() for _ in range(6)]
    per_point = _one_series_per_time_point(uids)

    def edit(ds, t, z):
        per_point(ds, t, z)
        if t == 0:
            ds.SeriesDescription = "Test bolus"
            _shift_times(ds, -600.0)

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    with pytest.raises(InputError, match=r"a gap of 60\d(\.\d+)? s between frame 0 \(.*series "
                                         r"100 'Test bolus'\) and frame 1 .*series 101.*another "
                                         r"scan's image"):
        read_dicom_series(study.folder)


def test_series_that_are_not_time_points_are_listed(tmp_path, rng):
    """Series on another grid (a second study beside it), or two reconstructions of the same
    time points, are not merged: the reader asks which series to read."""
    uids = [generate_uid() for _ in range(4)]
    write_fake_study(tmp_path / "a", rng, n_frames=4, edit=_one_series_per_time_point(uids))
    other = write_fake_study(tmp_path / "a" / "localiser", rng, n_frames=3, n_slices=2)
    with pytest.raises(InputError, match="holds 5 series, 1 of them a time course and 4 of "
                                         "them one scan's time points; choose one") as info:
        read_dicom_series(tmp_path / "a")
    assert other.series_uid in str(info.value)

    scan = (generate_uid(), generate_uid())       # one study, one frame of reference
    for folder in ("b", "b/sharp"):                 # the same times and slices, twice
        write_fake_study(tmp_path / folder, rng, n_frames=3, edit=_one_series_per_time_point(
            [generate_uid() for _ in range(3)], scan))
    with pytest.raises(InputError, match="holds 6 series, none a time course; choose one"):
        read_dicom_series(tmp_path / "b")


def test_an_exams_folder_reads_its_one_time_course(tmp_path, rng, caplog, capsys):
    """An exam exported whole: the perfusion scan beside a localiser, a plain CT volume on
    another grid and a report. The one series acquired several times is read (and the log
    says which); a second time course makes the reader ask."""
    study = write_fake_study(tmp_path / "exam" / "ctp", rng, n_frames=5)
    write_fake_study(tmp_path / "exam" / "scout", rng, n_frames=1, n_slices=1, rows=12)
    write_fake_study(tmp_path / "exam" / "plain", rng, n_frames=1, n_slices=6, rows=12)
    (tmp_path / "exam" / "dose_report.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        series = read_dicom_series(tmp_path / "exam")
    np.testing.assert_array_equal(series.hu, study.hu)
    assert f"reading the one time course, {study.series_uid}" in caplog.text
    assert main(["info", str(tmp_path / "exam")]) == 0  # info lists them, marking that one,
    out = capsys.readouterr().out                      # and describes it as the study read
    assert f"* {study.series_uid}  CT" in out
    assert "5 frames x 3 slices" in out and f"series UID   {study.series_uid}" in out
    assert "  1 file\n" in out                          # the scout: one file, singular
    write_fake_study(tmp_path / "exam" / "ctp_thick", rng, n_frames=5)
    with pytest.raises(InputError, match="holds 4 series, 2 of them time courses; choose one"):
        read_dicom_series(tmp_path / "exam")


def test_non_dicom_files_skipped_with_warning(tmp_path, rng, caplog):
    study = write_fake_study(tmp_path / "s", rng)
    (study.folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        series = read_dicom_series(study.folder)
    assert "notes.txt" in caplog.text
    np.testing.assert_array_equal(series.hu, study.hu)


def test_threads_match_serial(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    a = read_dicom_series(study.folder, workers=1)
    b = read_dicom_series(study.folder, workers=3)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(b.hu, study.hu)


def test_jpeg_lossless_round_trip(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    series = read_dicom_series(study.folder)
    out = write_series_dicom(series, tmp_path / "jpeg", compress=True)
    first = next(out.glob("*.dcm"))
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    again = read_dicom_series(out)
    np.testing.assert_array_equal(again.hu, series.hu)
    np.testing.assert_allclose(again.affine, series.affine, atol=1e-6)  # DS digits
    np.testing.assert_allclose(again.slice_times, series.slice_times, atol=1e-6)  # us digits


# ---- bad input: each raises InputError naming the file and the problem ----

def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(InputError, match="no DICOM image files"):
        read_dicom_series(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        read_dicom_series(tmp_path / "absent")


def test_truncated_file(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    path = study.files[(2, 1)]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(InputError, match=path.name):
        read_dicom_series(study.folder)


def test_truncated_header(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    path = study.files[(0, 0)]
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match=f"{path.name}.*(damaged|truncated|pixel)"):
        read_dicom_series(study.folder)


def test_missing_pixel_data(tmp_path, rng):
    def edit(ds, t, z):
        if (t, z) == (1, 1):
            del ds.PixelData

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=f"{study.files[(1, 1)].name}: has no pixel data"):
        read_dicom_series(study.folder)


def test_mixed_modalities(tmp_path, rng):
    def edit(ds, t, z):
        if t == 0:
            ds.Modality = "MR"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match="mixed modalities"):
        read_dicom_series(study.folder)


@pytest.mark.parametrize("keyword, value, match", [
    ("PixelSpacing", ["0.7", "0.7"], "inconsistent PixelSpacing"),
    ("ImageOrientationPatient", ["0", "1", "0", "1", "0", "0"], "inconsistent ImageOrientation"),
])
def test_inconsistent_geometry(tmp_path, rng, keyword, value, match):
    def edit(ds, t, z):
        if (t, z) == (3, 2):
            setattr(ds, keyword, value)

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=f"{study.files[(3, 2)].name}: {match}"):
        read_dicom_series(study.folder)


def test_uneven_slice_spacing(tmp_path, rng):
    def edit(ds, t, z):
        if z == 2:
            ds.ImagePositionPatient = ["-20", "-15", "52"]

    study = write_fake_study(tmp_path / "s", rng, n_slices=4, edit=edit)
    with pytest.raises(InputError, match="inconsistent slice spacing"):
        read_dicom_series(study.folder)


def test_a_stray_image_at_its_own_position_is_named(tmp_path, rng):
    """One image of another scan filed in the series, at a position of its own: the refusal
    names that file, not a slice of the scan."""
    study = write_fake_study(tmp_path / "s", rng, n_frames=5, n_slices=3)
    ds = pydicom.dcmread(study.files[(0, 0)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + 40.0]
    ds.save_as(study.folder / "stray.dcm")
    with pytest.raises(InputError, match=r"stray\.dcm: inconsistent slice spacing.*1 image\(s\) "
                                         r"at .* 5 at the others: a stray image"):
        read_dicom_series(study.folder)


def test_different_frame_counts(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    study.files[(4, 1)].unlink()
    with pytest.raises(InputError, match=r"slice 1 of 3 .* no file for frame 4 of 5"):
        read_dicom_series(study.folder)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the NaN slope is the point
def test_nan_values(tmp_path, rng):
    def edit(ds, t, z):
        if (t, z) == (0, 2):
            ds.RescaleSlope = "nan"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=f"{study.files[(0, 2)].name}: .*NaN"):
        read_dicom_series(study.folder)


def test_single_frame_is_not_4d(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, n_frames=1)
    with pytest.raises(InputError, match="3D volume"):
        read_dicom_series(study.folder)


def test_duplicate_times_are_non_monotonic(tmp_path, rng):
    def edit(ds, t, z):
        del ds.AcquisitionTime, ds.ContentTime     # no other tag to fall back on
        if t == 3:
            ds.AcquisitionDateTime = "20210304102030.000000"  # the same time as frame 0

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match="non-monotonic"):
        read_dicom_series(study.folder)


def test_copy_of_folder_reads_the_same(tmp_path, rng):
    # names and sub-folders carry no meaning: a flattened copy gives the same series
    study = write_fake_study(tmp_path / "s", rng)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(study.files.values(), key=lambda p: p.name, reverse=True)):
        shutil.copy(path, flat / f"x{i}.dcm")
    np.testing.assert_array_equal(read_dicom_series(flat).hu, read_dicom_series(study.folder).hu)


def test_read_study_dispatches_on_path(tmp_path, rng, small_series):
    study = write_fake_study(tmp_path / "s", rng)
    np.testing.assert_array_equal(read_study(study.folder).hu, study.hu)
    nii = write_series_nifti(small_series, tmp_path / "study.nii.gz")
    np.testing.assert_array_equal(read_study(nii).hu, small_series.hu)
    resampled = read_study(nii, frame_interval=2.5)
    np.testing.assert_allclose(resampled.times, 2.5 * np.arange(12))
    assert resampled.meta["timing_source"] == "frame_interval 2.5 s"
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt: not a study"):
        read_study(other)
    export = tmp_path / "export" / "study.zip"
    export.parent.mkdir()
    export.write_bytes(b"PK\x03\x04")
    with pytest.raises(InputError, match=r"study\.zip: an archive: extract it"):
        read_study(export)
    with pytest.raises(InputError, match=r"export: no DICOM image files found \(1 other files; "
                                         r"study\.zip is an archive: extract it first\)"):
        read_study(export.parent)
    with pytest.raises(InputError, match="no such file"):
        read_study(tmp_path / "absent.nii.gz")
    with pytest.raises(InputError, match="no such file or folder"):
        read_study(tmp_path / "absent")
    with pytest.raises(InputError, match="series_uid"):
        read_study(nii, series_uid="1.2")


def test_files_without_preamble_are_read(tmp_path, rng):
    # old scanners wrote bare datasets without the 128-byte preamble and "DICM"
    study = write_fake_study(tmp_path / "s", rng)
    for path in study.files.values():
        path.write_bytes(path.read_bytes()[132:])
    np.testing.assert_array_equal(read_dicom_series(study.folder).hu, study.hu)


def test_junk_beside_a_study_is_passed_over_without_pydicom_noise(tmp_path, rng):
    """Bytes that are no DICOM, named .dcm (seed 170's make pydicom warn twice, in its log and
    as a UserWarning, when parsed by force), and a file of "DICM" alone: left out as other
    files, with nothing from pydicom on the terminal (a separate process: pytest would catch
    the warnings); alone in a folder, one line and exit 2."""
    study = write_fake_study(tmp_path / "s", rng)
    (study.folder / "junk.dcm").write_bytes(np.random.default_rng(170).bytes(3000))
    (study.folder / "magic.dcm").write_bytes(b"DICM")
    np.testing.assert_array_equal(read_dicom_series(study.folder).hu, study.hu)
    for f in study.folder.rglob("0*"):
        f.unlink()
    run = subprocess.run([sys.executable, "-m", "ctperf", "info", str(study.folder)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"ctperf info: error: {study.folder}: no DICOM image files found (2 other files)"]


def test_acquisition_time_across_midnight(tmp_path, rng):
    def edit(ds, t, z):
        del ds.AcquisitionDateTime, ds.AcquisitionDate
        seconds = (86400 - 4.0 + 1.5 * t) % 86400  # 23:59:56 then past midnight
        h, rest = divmod(seconds, 3600)
        m, sec = divmod(rest, 60)
        ds.AcquisitionTime = f"{int(h):02d}{int(m):02d}{sec:09.6f}"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    np.testing.assert_allclose(series.times, 1.5 * np.arange(5), atol=1e-6)  # us digits


def test_thread_pool_reports_the_bad_file(tmp_path, rng):
    def edit(ds, t, z):
        if (t, z) == (2, 0):
            del ds.PixelData

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=f"{study.files[(2, 0)].name}: has no pixel data"):
        read_dicom_series(study.folder, workers=2)


def test_gantry_tilt_keeps_the_voxel_volume(tmp_path, rng):
    """A tilted gantry: the image planes tilted by 20 degrees, the slices stepped 5 mm along
    the table (patient z), so the grid is sheared. The affine keeps the geometry, and a voxel
    holds 0.5 x 0.45 x 5 cos(20 deg) mm^3 (the slab between planes), not the 5 mm step."""
    tilt = np.deg2rad(20.0)

    def table_steps(ds, t, z):
        ds.ImagePositionPatient = [-20.0, -15.0, 40.0 + 5.0 * z]

    study = write_fake_study(tmp_path / "s", rng, tilt_deg=20.0, edit=table_steps)
    series = read_dicom_series(study.folder)
    np.testing.assert_allclose(series.affine[:3, 2], [0.0, 0.0, 5.0], atol=1e-4)
    assert series.spacing[0] == pytest.approx(5.0, abs=1e-4)  # centre to centre along k
    # positions are written with 6 significant digits: 1e-6 mL covers the rounding
    assert series.voxel_ml == pytest.approx(0.5 * 0.45 * 5.0 * np.cos(tilt) / 1000, abs=1e-6)


def test_one_slice_takes_its_thickness_and_needs_one(tmp_path, rng):
    """A study of one slice has no second position to step to: its voxel depth is
    SpacingBetweenSlices, else SliceThickness (a negative spacing, as some writers store it,
    by its size). With neither (SliceThickness is type 2, present and empty), every volume in
    mL is unknown: refused, naming the file, rather than read as 1 mm deep."""
    def spacing_6(ds, t, z):
        ds.SpacingBetweenSlices = "-6"

    one = read_dicom_series(write_fake_study(tmp_path / "a", rng, n_slices=1,
                                             edit=spacing_6).folder)
    assert one.voxel_ml == pytest.approx(0.5 * 0.45 * 6.0 / 1000)
    assert read_dicom_series(write_fake_study(tmp_path / "b", rng, n_slices=1).folder
                             ).voxel_ml == pytest.approx(0.5 * 0.45 * 5.0 / 1000)

    def no_thickness(ds, t, z):
        ds.SliceThickness = None

    study = write_fake_study(tmp_path / "c", rng, n_slices=1, edit=no_thickness)
    with pytest.raises(InputError, match="one slice and no SliceThickness or "
                                         "SpacingBetweenSlices: its thickness"):
        read_dicom_series(study.folder)
    # three slices without a thickness are stepped by their positions, as before
    assert read_dicom_series(write_fake_study(tmp_path / "d", rng, edit=no_thickness).folder
                             ).spacing[0] == pytest.approx(5.0, abs=1e-4)


@pytest.mark.parametrize("cosines, match", [
    ([2, 0, 0, 0, 2, 0], r"direction cosines have lengths \[2.0, 2.0\], not 1"),
    ([1, 0, 0, np.sin(np.deg2rad(17)), np.cos(np.deg2rad(17)), 0],
     "rows and columns are 73.0 degrees apart, not perpendicular")])
def test_orientation_that_no_scanner_writes_is_refused(tmp_path, rng, cosines, match):
    """ImageOrientationPatient holds two perpendicular unit vectors. Cosines of length 2 would
    double every pixel (4x every volume) against PixelSpacing, and skewed axes put the image
    nowhere: both refused, naming the file. Cosines of a tilted gantry written with six
    digits, or two, are read."""
    def edit(ds, t, z):
        ds.ImageOrientationPatient = [f"{v:.8g}" for v in cosines]

    study = write_fake_study(tmp_path / "s", rng, n_slices=1, edit=edit)
    with pytest.raises(InputError, match=match):
        read_dicom_series(study.folder)

    for digits in (["1", "0", "0", "0", "0.978148", "-0.207912"],  # six digits
                   ["1", "0", "0", "0", "0.98", "-0.17"]):  # two: 10 degrees, length 0.9946
        def tilted(ds, t, z, digits=digits):
            ds.ImageOrientationPatient = digits

        assert read_dicom_series(write_fake_study(tmp_path / digits[-1], rng, edit=tilted
                                                  ).folder).hu.shape[1] == 3


@pytest.mark.parametrize("per_slice, shuttle", [(True, False), (False, True)])
def test_reads_enhanced_multiframe_study(tmp_path, rng, per_slice, shuttle):
    """Enhanced CT: many frames per file, in any order, with position, orientation, spacing,
    rescale and times only in the functional groups, read as the same study in classic files."""
    study = write_enhanced_study(tmp_path / "s", rng, per_slice=per_slice, shuttle=shuttle,
                                 tilt_deg=12.0)
    series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    # microsecond digits and 6 significant digits in the files, as for the classic study
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)
    np.testing.assert_allclose(series.affine, expected_affine(study), atol=1e-4)
    if shuttle:
        np.testing.assert_allclose(series.slice_times, study.slice_times, atol=1e-6)
    else:
        assert series.slice_times is None
    assert series.meta["timing_source"] == "AcquisitionDateTime"
    assert series.meta["n_files"] == (3 if per_slice else 1)


def test_enhanced_frames_need_their_functional_groups(tmp_path, rng):
    def drop_one(ds):
        del ds.PerFrameFunctionalGroupsSequence[0]

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=True, edit=drop_one)
    with pytest.raises(InputError, match="5 frames with 4 per-frame functional group items"):
        read_dicom_series(study.folder)


def test_enhanced_frames_without_times_are_ordered_by_index(tmp_path, rng):
    """Without per-frame times every frame carries the object's start time: refused unless
    the spacing is given, then ordered by TemporalPositionIndex."""
    def drop_times(ds):
        for item in ds.PerFrameFunctionalGroupsSequence:
            del item.FrameContentSequence[0].FrameAcquisitionDateTime

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=False, edit=drop_times)
    with pytest.raises(InputError, match="frame-interval"):
        read_dicom_series(study.folder)
    series = read_dicom_series(study.folder, frame_interval=1.5)
    np.testing.assert_array_equal(series.hu, study.hu)


def test_enhanced_short_pixel_data_names_the_file(tmp_path, rng):
    def truncate(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=False, edit=truncate)
    with pytest.raises(InputError, match=r"000\.dcm"):
        read_dicom_series(study.folder)


def test_enhanced_compressed_frames(tmp_path, rng):
    """Encapsulated multi-frame pixel data (RLE Lossless, which pydicom encodes itself): each
    file decoded once into all its frames."""
    from pydicom.uid import RLELossless

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=True,
                                 edit=lambda ds: ds.compress(RLELossless))
    series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert series.meta["transfer_syntax"] == "RLE Lossless"


def test_enhanced_per_frame_rescale(tmp_path, rng):
    """The Pixel Value Transformation in each frame's functional group, not the shared one:
    each frame is read with its own intercept."""
    def edit(ds):
        transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.NumberOfFrames, -1)
        stored = stored.astype(np.int64)
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            shift = 100 * (i % 3)                  # stored values moved, intercept back
            stored[i] += shift
            own = copy.deepcopy(transform)
            own[0].RescaleIntercept = str(-1024 - shift)
            item.PixelValueTransformationSequence = own
        ds.PixelData = stored.astype(np.uint16).tobytes()

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=True, edit=edit)
    np.testing.assert_array_equal(read_dicom_series(study.folder).hu, study.hu)


@pytest.mark.parametrize("number_of_frames", ["1", None])
def test_enhanced_one_frame_per_file(tmp_path, rng, number_of_frames):
    """Enhanced CT stored one frame per file (NumberOfFrames 1, or absent as some exports
    write it): geometry and times are in the functional groups all the same."""
    def edit(ds):
        if number_of_frames is None:
            del ds.NumberOfFrames
        else:
            ds.NumberOfFrames = number_of_frames

    study = write_enhanced_study(tmp_path / "s", rng, per_slice=False, per_image=True,
                                 tilt_deg=12.0, edit=edit)
    series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)  # microsecond digits
    np.testing.assert_allclose(series.affine, expected_affine(study), atol=1e-4)  # DS digits
    assert series.meta["n_files"] == 15


def _exam_uids() -> tuple[str, str]:
    return generate_uid(), generate_uid()


def _same_exam(uids: tuple[str, str], *, image_type: str | None = None):
    """An edit putting a series in one study and frame of reference, with an ImageType."""
    def edit(ds, t, z):
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = uids
        if image_type is not None:
            ds.ImageType = [image_type, "PRIMARY", "AXIAL"]
    return edit


def test_time_point_series_beside_other_objects(tmp_path, rng, caplog, capsys):
    """One series per time point in a folder that also holds a localiser, a plain CT on
    another grid and a dose report without position: the time points are read, the others
    left out and named in the log."""
    exam = _exam_uids()
    uids = [generate_uid() for _ in range(5)]
    study = write_fake_study(tmp_path / "exam" / "ctp", rng, n_frames=5,
                             edit=_one_series_per_time_point(uids, exam))
    scout = write_fake_study(tmp_path / "exam" / "scout", rng, n_frames=1, n_slices=1, rows=12,
                             edit=_same_exam(exam))
    plain = write_fake_study(tmp_path / "exam" / "plain", rng, n_frames=1, n_slices=6,
                             edit=_same_exam(exam))     # the same pixel grid, more slices

    def no_position(ds, t, z):
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.Modality = "OT"

    report = write_fake_study(tmp_path / "exam" / "dose", rng, n_frames=1, n_slices=1,
                              edit=no_position)
    with caplog.at_level(logging.INFO, logger="ctperf.io.dicom"):
        series = read_dicom_series(tmp_path / "exam")
    np.testing.assert_array_equal(series.hu, study.hu)
    np.testing.assert_allclose(series.times, study.times, atol=1e-6)  # microsecond digits
    assert series.meta["time_point_series"] == 5
    assert "reading the 5 that are one scan's time points, leaving out 3" in caplog.text
    for other in (scout, plain, report):
        assert other.series_uid in caplog.text
    assert main(["info", str(tmp_path / "exam")]) == 0
    assert "4 more: one series per time point" in capsys.readouterr().out
    # a time point series without one of its slices is still one of them: refused, named
    study.files[(2, 1)].unlink()
    with pytest.raises(InputError, match=r"slice 1 of 3 .* no file for frame 2 of 5"):
        read_dicom_series(tmp_path / "exam")


def test_bare_implicit_dataset_is_decoded(tmp_path, rng):
    """No preamble, no file meta: implicit VR little endian, as the header was read."""
    study = write_fake_study(tmp_path / "s", rng)
    for path in study.files.values():
        write_bare_dataset(path)
    assert not pydicom.dcmread(study.files[(0, 0)], force=True).file_meta.get(
        "TransferSyntaxUID")
    series = read_dicom_series(study.folder)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert series.meta["transfer_syntax"] == "Implicit VR Little Endian"


@pytest.mark.parametrize("index, declared, gone, match, refused", [
    (True, False, 2, "no image has TemporalPositionIndex 3 ", True),
    (True, True, 2, "no image has TemporalPositionIndex 3 .*NumberOfTemporalPositions 6", True),
    (False, True, 2, "5 time points, but NumberOfTemporalPositions says 6", True),
    # the last one missing (a scan ended early): no frame is misplaced, it is only said
    (True, True, 5, "5 time points, TemporalPositionIndex 1 to 5, but NumberOfTemporal", False),
])
def test_missing_time_point_is_refused(tmp_path, rng, caplog, index, declared, gone, match,
                                       refused):
    """All images of one time point deleted: every slice has the same frames, but the
    indices have a hole (or fall short of NumberOfTemporalPositions). Spaced evenly by
    --frame-interval in the order of their times it is refused; timed by the files' own
    clocks it is read with the gap, with a warning (it had been refused: a frame left out for
    motion could not be read)."""
    def edit(ds, t, z):
        if not index:
            del ds.TemporalPositionIndex
        if declared:
            ds.NumberOfTemporalPositions = 6

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=edit)
    for (t, _), path in study.files.items():
        if t == gone:
            path.unlink()
    if refused:
        with pytest.raises(InputError, match=f"{study.folder.name}: .*{match}"):
            read_dicom_series(study.folder, frame_interval=1.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctperf.io"):
        series = read_dicom_series(study.folder)
    assert re.search(match, caplog.text), caplog.text
    # said once (the index's warning, not the times' one beside it)
    assert len(caplog.records) == 1, caplog.text
    kept = [t for t in range(6) if t != gone]
    np.testing.assert_allclose(series.times - series.times[0],
                               study.times[kept] - study.times[kept[0]], atol=1e-3)


@pytest.mark.parametrize("numbering", ["twos", "shuttle", "offset"])
def test_temporal_positions_not_counted_in_ones_are_spaced_by_rank(tmp_path, rng, numbering):
    """Identifiers counting in twos (1, 3, 5, ...), a shuttle scan's numbering across its
    table positions (one slice the odd ones, the other the even ones), each slice from its
    own offset: with --frame-interval the frames are the interval apart (a version that
    placed frames at their values had doubled every time in twos)."""
    def number(ds, t, z):
        for tag in ("AcquisitionTime", "ContentTime", "AcquisitionDateTime",
                    "TemporalPositionIndex"):
            if tag in ds:
                delattr(ds, tag)
        ds.TemporalPositionIdentifier = {"twos": 1 + 2 * t, "shuttle": 1 + 2 * t + z % 2,
                                         "offset": 1 + t + 6 * z}[numbering]

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, n_slices=2, edit=number)
    series = read_dicom_series(study.folder, frame_interval=1.5)
    np.testing.assert_allclose(series.times, 1.5 * np.arange(6))
    np.testing.assert_array_equal(series.hu, study.hu)


def test_frame_interval_across_a_gap_in_the_files_own_times_is_said(tmp_path, rng, caplog):
    """A frame missing, no index, the files' own times showing the gap: --frame-interval
    (which a whole-second clock's warning may advise) spaces the frames evenly across it, and
    had said nothing."""
    def no_index(ds, t, z):
        del ds.TemporalPositionIndex

    study = write_fake_study(tmp_path / "s", rng, n_frames=8, edit=no_index)
    for (t, _), path in study.files.items():
        if t == 4:
            path.unlink()
    with caplog.at_level(logging.WARNING, logger="ctperf.io"):
        assert read_dicom_series(study.folder, frame_interval=1.6).n_frames == 7
    assert "missing from every slice? (frame_interval spaces the frames evenly" in caplog.text


def test_a_hole_in_temporal_position_identifiers_is_refused(tmp_path, rng, caplog):
    """Files with no times, ordered by TemporalPositionIdentifier with --frame-interval: a
    time point deleted from every slice had been read as 5 evenly spaced frames (a probe's
    CBF -14 % with nlr-fast, +15 % with bSVD, exit 0). Placing the frames at the identifiers'
    values was tried and dropped: a count in twos and every other frame missing look alike.
    Acquisition numbers with a hole are warned of: they may skip legitimately."""
    def identifier(ds, t, z):
        for tag in ("AcquisitionTime", "ContentTime", "AcquisitionDateTime",
                    "TemporalPositionIndex"):
            if tag in ds:
                delattr(ds, tag)
        ds.TemporalPositionIdentifier = t + 1

    study = write_fake_study(tmp_path / "s", rng, n_frames=6, edit=identifier)
    assert read_dicom_series(study.folder, frame_interval=1.0).n_frames == 6
    for (t, _), path in study.files.items():
        if t == 2:
            path.unlink()
    with pytest.raises(InputError, match="no image has TemporalPositionIdentifier 3 "):
        read_dicom_series(study.folder, frame_interval=1.0)
    for path in study.files.values():
        if not path.exists():
            continue
        ds = pydicom.dcmread(path)
        ds.AcquisitionNumber = ds.TemporalPositionIdentifier
        del ds.TemporalPositionIdentifier
        ds.save_as(path)
    with caplog.at_level("WARNING"):
        assert read_dicom_series(study.folder, frame_interval=1.0).n_frames == 5
    assert "AcquisitionNumber, which steps by 1 within a slice but by 2 once" in caplog.text


def test_position_jitter_between_frames(tmp_path, rng, capsys):
    """Positions of one slice differing by 0.02 mm between frames (rounding in the scanner)
    are one slice, also where they straddle a 0.1 mm rounding step, and the series is still
    the exam's one time course."""
    def jitter(ds, t, z):
        ds.ImagePositionPatient = ["-20", "-15", f"{40.04 + 5 * z + 0.02 * (t % 2):.2f}"]

    study = write_fake_study(tmp_path / "exam" / "ctp", rng, edit=jitter)
    write_fake_study(tmp_path / "exam" / "plain", rng, n_frames=1, n_slices=6, rows=12)
    series = read_dicom_series(tmp_path / "exam")
    np.testing.assert_array_equal(series.hu, study.hu)
    # the slices are 5 mm apart, within the 0.02 mm jitter
    assert series.spacing[0] == pytest.approx(5.0, abs=0.03)


def test_derived_and_monitor_series_give_way(tmp_path, rng, caplog):
    """Beside the perfusion scan, a derived 4D MIP (one slab, every time point) and a
    one-slice bolus-tracking monitor of the same exam are time courses too: the original
    series with the most slice positions is read and the others named as left out."""
    exam = _exam_uids()
    study = write_fake_study(tmp_path / "exam" / "ctp", rng,
                             edit=_same_exam(exam, image_type="ORIGINAL"))
    mip = write_fake_study(tmp_path / "exam" / "mip", rng, n_slices=1, description="4D MIP",
                           edit=_same_exam(exam, image_type="DERIVED"))
    monitor = write_fake_study(tmp_path / "exam" / "monitor", rng, n_frames=6, n_slices=1,
                               description="Monitoring",
                               edit=_same_exam(exam, image_type="ORIGINAL"))
    with caplog.at_level(logging.WARNING):
        series = read_dicom_series(tmp_path / "exam")
    np.testing.assert_array_equal(series.hu, study.hu)
    assert f"reading {study.series_uid}" in caplog.text
    assert mip.series_uid in caplog.text and monitor.series_uid in caplog.text
    # a second original series with as many slices: the choice is the user's
    write_fake_study(tmp_path / "exam" / "ctp_b", rng, edit=_same_exam(exam))
    with pytest.raises(InputError, match="holds 4 series, 4 of them time courses; choose one"):
        read_dicom_series(tmp_path / "exam")


def test_damaged_jpeg_ls_stream_names_the_file(tmp_path, rng, caplog):
    """A truncated JPEG-LS stream: the decoder's failure is the file's error (no traceback
    logged, no other plugin decoding it to garbage)."""
    pytest.importorskip("gdcm")
    study = write_fake_study(tmp_path / "s", rng, rows=16, cols=16)
    for path in study.files.values():
        gdcm_recompress(path, "JPEGLSLossless")
    np.testing.assert_array_equal(read_dicom_series(study.folder).hu, study.hu)
    path = study.files[(2, 1)]
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xe0\x7f\x10\x00")                 # (7FE0,0010) Pixel Data
    data[start + (len(data) - start) // 2:-12] = bytes(len(data) - 12
                                                        - start - (len(data) - start) // 2)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(InputError, match=f"{path.name}: cannot decode pixel data "
                                             r"\(JPEG-LS Lossless"):
            read_dicom_series(study.folder, workers=1)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_time_point_missing_from_every_slice_is_said(tmp_path, caplog):
    """With no index tag, a time point missing from every slice left one doubled step that was
    read without a word; it is now named. Protocols that change their step (1 s, then 3 s)
    and frames a little uneven say nothing."""
    from ctperf.io.dicom import _missing_time_point_warning

    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        gap = np.r_[np.arange(0, 15, 1.5), np.arange(16.5, 30, 1.5)]  # 15.0 s missing
        _missing_time_point_warning(tmp_path, gap)
    assert "frames every 1.5 s but 3 s apart at 13.5-16.5 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        _missing_time_point_warning(tmp_path, np.r_[np.arange(0, 30, 1.0), np.arange(30, 60, 3)])
        _missing_time_point_warning(tmp_path, np.cumsum(np.r_[0, np.tile([1.0, 1.25], 10)]))
        # a slower start, a pause after the first frame, a slower end: protocols, not gaps
        _missing_time_point_warning(tmp_path, np.r_[0, 2, 4, np.arange(5, 30, 1.0)])
        _missing_time_point_warning(tmp_path, np.r_[0, np.arange(2, 30, 1.0)])
        _missing_time_point_warning(tmp_path, np.r_[np.arange(0, 30, 1.0), 31, 33])
    assert caplog.text == ""


def test_exact_whole_seconds_of_a_two_rate_protocol_are_not_doubted(tmp_path, rng, caplog):
    """20 frames 1 s apart, then 10 frames 2 s apart, their clock written to the microsecond
    (as ctperf writes it): whole seconds that step by 1 and 2 s are exact readings here, not a
    clock cut to the second (the warning had advised --frame-interval, which would have
    squeezed the 38 s scan into 29 s)."""
    from ctperf.io import write_series_dicom
    from ctperf.types import CTPSeries

    times = np.r_[np.arange(20.0), 19.0 + 2.0 * np.arange(1, 11)]
    hu = (30 + 5 * rng.standard_normal((times.size, 2, 8, 8))).astype(np.float32)
    series = CTPSeries(hu=hu, times=times, affine=np.diag([0.5, 0.5, 5.0, 1.0]))
    write_series_dicom(series, tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        back = read_dicom_series(tmp_path / "d")
    np.testing.assert_allclose(back.times - back.times[0], times, atol=1e-6)
    assert "whole seconds" not in caplog.text


def _recon_clock(ds, t, z):
    """AcquisitionDateTime gone; ContentTime a reconstruction's clock, 0.5 s per image."""
    del ds.AcquisitionDateTime
    ds.ContentTime = f"1100{int(0.5 * (t * 3 + z)):02d}.{int(5e5 * ((t * 3 + z) % 2)):06d}"


def test_a_time_tag_some_images_lack_is_not_passed_over_for_another_clock(tmp_path, rng):
    """One image without AcquisitionTime made every image's times come from ContentTime, a
    reconstruction's clock here: the frames were read 0.5 s apart instead of 1.5-1.75 s,
    exit 0. The reader names the image and refuses; with the spacing given it orders by
    index, saying why."""
    def edit(ds, t, z):
        _recon_clock(ds, t, z)
        if (t, z) == (2, 1):
            del ds.AcquisitionTime

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=r"has no AcquisitionTime, which 14 of the series' 15 "
                                         r"images carry; ContentTime.*another clock"):
        read_dicom_series(study.folder)
    series = read_dicom_series(study.folder, frame_interval=1.5)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert "TemporalPositionIndex" in series.meta["timing_source"]


def test_a_time_tag_some_images_lack_gives_way_to_one_that_agrees(tmp_path, rng, caplog):
    """ContentTime equal to AcquisitionTime (to one offset) where both are: read from it,
    with a warning naming how many images lack AcquisitionTime."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime
        if t == 3:
            del ds.AcquisitionTime

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    np.testing.assert_allclose(series.times, study.times, atol=1e-4)
    assert "3 of 15 images have no AcquisitionTime" in caplog.text


def test_a_time_tag_only_some_images_hold_is_named(tmp_path, rng):
    """Two thirds of the images hold AcquisitionTime and none another time tag: the error
    named "no acquisition times"; now the image without it and how many have it."""
    def edit(ds, t, z):
        for tag in ("AcquisitionDateTime", "ContentTime"):
            delattr(ds, tag)
        if z == 2:
            del ds.AcquisitionTime

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match="has no AcquisitionTime, which 10 of the series' 15 "
                                         "images carry, and no other time tag"):
        read_dicom_series(study.folder)


def test_a_clock_that_jumps_back_against_the_temporal_index_is_refused(tmp_path, rng, caplog):
    """Frame 4's clock stamped 3.5 s early in every slice while TemporalPositionIndex keeps
    the acquisition's order: read before, with frame 4 moved into the middle of the scan and
    exit 0. Refused now, naming the image; with the spacing given, ordered by the index."""
    def edit(ds, t, z):
        if t == 3:
            when = dt.datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S.%f") \
                - dt.timedelta(seconds=3.5)
            ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
            ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S.%f")

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=r"TemporalPositionIndex 4.*contradicts "
                                         r"TemporalPositionIndex"):
        read_dicom_series(study.folder)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder, frame_interval=1.5)
    np.testing.assert_array_equal(series.hu, study.hu)
    assert "frames ordered by index" in caplog.text


def test_a_frame_interval_that_flattens_the_files_own_times_is_warned_of(tmp_path, rng,
                                                                        caplog):
    """A two-rate protocol (1 s, then 3 s) read with --frame-interval 1: the last frames
    placed seconds early, without a word before; now a warning gives the files' steps."""
    steps = np.r_[0.0, 1.0, 1.0, 3.0, 3.0]

    def edit(ds, t, z):
        when = dt.datetime(2021, 3, 4, 10, 20, 30) + dt.timedelta(seconds=float(steps[:t + 1]
                                                                                 .sum()))
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
        ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S.%f")

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        read_dicom_series(study.folder)
    assert "frame_interval" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder, frame_interval=1.0)
    np.testing.assert_array_equal(series.times, np.arange(5.0))
    assert "AcquisitionDateTime steps by 1-3 s: the files' own times are not used" in caplog.text


def test_slices_imaged_in_two_passes_are_named_as_such(tmp_path, rng):
    """Two table positions overlapping by a slice: that slice holds every frame twice. The
    error had named a missing frame of another slice; it now says which slices were imaged
    twice."""
    uid = generate_uid()
    write_fake_study(tmp_path / "s", rng, n_slices=3, series_uid=uid, nested=False)

    def later(ds, t, z):
        when = dt.datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S.%f") \
            + dt.timedelta(seconds=0.5)
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
        ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S.%f")

    write_fake_study(tmp_path / "s" / "second pass", rng, n_slices=1, series_uid=uid,
                     nested=False, edit=later)
    with pytest.raises(InputError, match=r"slices 0 of 3 hold 2 times as many images"):
        read_dicom_series(tmp_path / "s")


def test_a_reconstruction_clock_a_few_ms_later_per_slice_still_agrees(tmp_path, rng, caplog):
    """ContentTime = AcquisitionTime + 40 s + 10 ms per slice (images reconstructed one after
    another), one AcquisitionTime missing: one amount within each slice, so the frames are
    read at their true times (a first version of the check compared all slices at once and
    refused this series over 20 ms)."""
    def edit(ds, t, z):
        del ds.AcquisitionDateTime
        when = dt.datetime.strptime(ds.AcquisitionTime, "%H%M%S.%f") \
            + dt.timedelta(seconds=40 + 0.01 * z)
        ds.ContentTime = when.strftime("%H%M%S.%f")
        if (t, z) == (1, 2):
            del ds.AcquisitionTime

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.dicom"):
        series = read_dicom_series(study.folder)
    np.testing.assert_allclose(series.times, study.times, atol=0.011)
    assert "1 of 15 images have no AcquisitionTime" in caplog.text


def test_decodes_that_cross_in_two_threads_leave_no_warnings_filter():
    """Two DICOM reads at once: the second began before the first ended and ended after it.
    Each restoring the filters it had found left the first's filter for pydicom's cut-short
    warning installed for good, hiding it from the program's own pydicom reads."""
    import warnings

    from ctperf.io.dicom_decode import _cut_short_unsaid

    before = list(warnings.filters)
    first, second = _cut_short_unsaid(), _cut_short_unsaid()
    first.__enter__()
    second.__enter__()
    assert any("End of file" in str(f[1]) for f in warnings.filters)  # quiet while they run
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert warnings.filters == before
