import json

import nibabel as nib
import numpy as np
import pytest

from ctperf import InputError, PerfusionMaps
from ctperf.io import (
    read_maps,
    read_mask,
    read_nifti_series,
    read_study,
    write_maps_nifti,
    write_series_nifti,
    write_volume,
)


def test_series_round_trip_keeps_values_times_and_geometry(small_series, tmp_path):
    path = write_series_nifti(small_series, tmp_path / "study.nii.gz")
    back = read_nifti_series(path)
    np.testing.assert_array_equal(back.hu, small_series.hu)
    np.testing.assert_allclose(back.times, small_series.times)  # non-uniform: from the sidecar
    np.testing.assert_allclose(back.affine, small_series.affine)
    assert back.meta["timing_source"] == "sidecar FrameTimes"
    assert back.meta["kvp"] == 80
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_time_step_from_pixdim_in_milliseconds(tmp_path):
    data = np.zeros((4, 5, 2, 6), dtype=np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((1, 1, 1, 500))
    nib.save(img, tmp_path / "s.nii.gz")
    series = read_nifti_series(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(series.times, np.arange(6) * 0.5)
    assert series.shape == (6, 2, 5, 4)


@pytest.mark.parametrize("unit, scale", [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0)])
def test_spatial_unit_is_converted_to_mm(tmp_path, unit, scale):
    """The same voxels with the affine written in metres or microns: one geometry in mm, which
    volumes in mL and the lesions' millimetre sizes rely on."""
    affine = np.diag([-0.9, 0.9, 5.0, 1.0])
    affine[:3, 3] = (100.0, -80.0, 20.0)
    img = nib.Nifti1Image(np.zeros((4, 5, 2, 6), dtype=np.float32),
                          np.vstack([affine[:3] * scale, [0, 0, 0, 1]]))
    img.header.set_xyzt_units(unit, "sec")
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, path)
    np.testing.assert_allclose(read_nifti_series(path).affine, affine, atol=1e-9)
    mask = nib.Nifti1Image(np.ones((4, 5, 2), dtype=np.uint8), img.affine)
    mask.header.set_xyzt_units(unit)
    nib.save(mask, tmp_path / "mask.nii.gz")
    assert read_mask(tmp_path / "mask.nii.gz", shape=(2, 5, 4), affine=affine).all()


def _blank_study(path, pixdim: float, unit: str | None = None):
    """A 4 x 5 x 2 x 6 study of zeros with pixdim[4] set (time ``unit``, or none), saved at
    ``path``."""
    img = nib.Nifti1Image(np.zeros((4, 5, 2, 6), dtype=np.float32), np.eye(4))
    if unit is not None:
        img.header.set_xyzt_units("mm", unit)
    img.header["pixdim"][4] = pixdim
    nib.save(img, path)
    return path


def test_pixdim_timing_errors_say_what_is_missing(tmp_path):
    path = _blank_study(tmp_path / "s.nii.gz", -1.0)
    with pytest.raises(InputError, match=r"pixdim\[4\] is -1 and there is no JSON sidecar"):
        read_nifti_series(path)
    (tmp_path / "s.json").write_text(json.dumps({"Modality": "CT"}))
    with pytest.raises(InputError, match="its JSON sidecar has no FrameTimes or Repetition"):
        read_nifti_series(path)


def test_bids_repetition_time_in_the_sidecar_gives_the_frame_step(tmp_path, caplog):
    """ISLES 2024 and dcm2niix give the step as BIDS' RepetitionTime (s): it is used, and wins
    over a header that says 1 s (ITK's default), with a warning; in ms it is refused."""
    path = _blank_study(tmp_path / "s.nii.gz", 1.0, "sec")
    (tmp_path / "s.json").write_text(json.dumps({"Modality": "CT", "RepetitionTime": 1.5}))
    with caplog.at_level("WARNING", logger="ctperf"):
        series = read_nifti_series(path)
    np.testing.assert_allclose(series.times, np.arange(6) * 1.5)
    assert series.meta["timing_source"] == "sidecar RepetitionTime"
    assert "pixdim[4] gives 1 s between frames, the sidecar's RepetitionTime 1.5 s;" in caplog.text
    (tmp_path / "s.json").write_text(json.dumps({"RepetitionTime": 1500}))
    with pytest.raises(InputError, match="milliseconds read as seconds"):
        read_nifti_series(path)
    (tmp_path / "s.json").write_text(json.dumps({"RepetitionTime": "1.5"}))
    with pytest.raises(InputError, match="RepetitionTime must be a number"):
        read_nifti_series(path)


def test_a_one_second_header_step_is_read_with_a_warning(tmp_path, caplog):
    """ITK writes pixdim[4] = 1 with the unit s when no step was set: 1 s is also a real
    protocol step, so it is read, but said."""
    path = _blank_study(tmp_path / "s.nii.gz", 1.0, "sec")
    with caplog.at_level("WARNING", logger="ctperf"):
        series = read_nifti_series(path)
    np.testing.assert_allclose(series.times, np.arange(6) * 1.0)
    assert "which writers such as ITK also leave" in caplog.text
    caplog.clear()
    _blank_study(path, 1.5, "sec")
    with caplog.at_level("WARNING", logger="ctperf"):
        read_nifti_series(path)
    assert "ITK" not in caplog.text


def test_unit_and_axis_mistakes_are_named(tmp_path, caplog):
    """Seconds stored under a millisecond unit, a 5D file with a singleton 4th axis and the
    time axis stored first each get a message saying what is wrong."""
    path = _blank_study(tmp_path / "s.nii.gz", 1.5, "msec")
    with pytest.raises(InputError, match="seconds stored as milliseconds"):
        read_nifti_series(path)
    five = nib.Nifti1Image(np.zeros((4, 5, 2, 1, 6), dtype=np.float32), np.eye(4))
    nib.save(five, tmp_path / "five.nii.gz")
    with pytest.raises(InputError, match="remove its singleton 4th axis"):
        read_nifti_series(tmp_path / "five.nii.gz")
    last = nib.Nifti1Image(np.zeros((4, 5, 2, 6, 1), dtype=np.float32), np.eye(4))
    nib.save(last, tmp_path / "last.nii.gz")
    with pytest.raises(InputError, match="remove its singleton 5th axis"):
        read_nifti_series(tmp_path / "last.nii.gz")
    first = nib.Nifti1Image(np.zeros((12, 5, 4, 3), dtype=np.float32), np.eye(4))
    first.header.set_xyzt_units("mm", "sec")
    first.header["pixdim"][4] = 1.5
    nib.save(first, tmp_path / "first.nii.gz")
    with caplog.at_level("WARNING", logger="ctperf"):
        read_nifti_series(tmp_path / "first.nii.gz")
    assert "is the time axis stored elsewhere" in caplog.text


def test_a_folder_holding_one_4d_nifti_is_that_study(tmp_path, caplog):
    """ISLES 2018 keeps each case's 4D study in a folder beside folders of 3D maps: a folder
    with no DICOM is read as its one 4D NIfTI; 3D frames, or several 4D files, are refused
    saying what to do."""
    case = tmp_path / "case_1"
    (case / "CT_4DPWI.1").mkdir(parents=True)
    (case / "CT_CBF.2").mkdir()
    _blank_study(case / "CT_4DPWI.1" / "pwi.nii", 1.5, "sec")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), dtype=np.float32), np.eye(4)),
             case / "CT_CBF.2" / "cbf.nii")
    with caplog.at_level("WARNING", logger="ctperf"):
        series = read_study(case)
    np.testing.assert_allclose(series.times, np.arange(6) * 1.5)
    assert "skipped" not in caplog.text  # the NIfTI files are not called stray DICOM
    _blank_study(case / "CT_CBF.2" / "second.nii", 1.5, "sec")
    with pytest.raises(InputError, match=r"2 4D NIfTI files .*pass the study's file itself"):
        read_study(case)
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(4):
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), dtype=np.float32), np.eye(4)),
                 frames / f"f{k}.nii.gz")
    with pytest.raises(InputError, match="one per frame, must be merged into one 4D file"):
        read_study(frames)


def test_a_placeholder_frame_spacing_is_not_taken_for_one(tmp_path, caplog):
    """pixdim[4] = 1 with no time unit (as ISLES 2018 and many writers leave it, whatever the
    sampling) is refused; another value without a unit is read as seconds, with a warning,
    and the maps' provenance names where the times came from."""
    path = _blank_study(tmp_path / "s.nii.gz", 1.0)
    with pytest.raises(InputError, match="pixdim\\[4\\] is 1 with no time unit"):
        read_nifti_series(path)
    _blank_study(path, 2.0)
    with caplog.at_level("WARNING", logger="ctperf"):
        series = read_nifti_series(path)
    np.testing.assert_allclose(series.times, np.arange(6) * 2.0)
    assert "has no time unit; taken as seconds" in caplog.text
    assert series.meta["timing_source"] == "pixdim[4] (unknown unit, taken as s)"


def test_frame_interval_replaces_missing_or_wrong_header_timing(tmp_path, caplog):
    """Files converted by other tools often carry pixdim[4] = 0 (or 1 whatever the sampling):
    without timing the error says how to give it; with ``frame_interval`` (``--frame-interval``)
    the frames are that far apart, whatever the header or a sidecar says."""
    path = _blank_study(tmp_path / "s.nii.gz", 0.0)
    with pytest.raises(InputError, match="--frame-interval"):
        read_nifti_series(path)
    series = read_study(path, frame_interval=2.0)
    np.testing.assert_allclose(series.times, np.arange(6) * 2.0)
    assert series.meta["timing_source"] == "frame_interval 2 s"
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimes": [0, 1, 2, 3, 4, 5]}))
    with caplog.at_level("WARNING", logger="ctperf.io.nifti"):
        np.testing.assert_allclose(read_nifti_series(path, frame_interval=0.5).times,
                                   np.arange(6) * 0.5)
    # said, as the DICOM reader says it: a cohort's script passing it for every study had
    # read 0.5 s frames as 1 s in silence (CBF halved)
    assert "frame_interval 0.5 s replaces the file's own frame times (FrameTimes: steps of " \
           "1-1 s)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctperf.io.nifti"):
        read_nifti_series(path, frame_interval=1.0)   # the same times: nothing to say
    assert "replaces" not in caplog.text
    # a sidecar whose times cannot be used (one entry short) is what the option is for: it
    # had refused the study, naming the sidecar's count
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimes": [0, 1, 2, 3, 4],
                                                 "SliceTiming": [0, 250]}))
    with pytest.raises(InputError, match="FrameTimes has 5 entries"):
        read_nifti_series(path)
    series = read_nifti_series(path, frame_interval=0.5)
    np.testing.assert_allclose(series.times, np.arange(6) * 0.5)
    assert series.slice_times is None


def test_bids_frame_start_times_in_the_sidecar(tmp_path):
    """A BIDS-style sidecar gives the frames' start times as FrameTimesStart (uneven here)."""
    path = _blank_study(tmp_path / "s.nii.gz", 0.0)
    starts = [0.0, 1.0, 2.0, 3.5, 5.0, 7.0]
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimesStart": starts,
                                                 "FrameDuration": [1.0] * 6}))
    series = read_nifti_series(path)
    np.testing.assert_allclose(series.times, starts)
    assert series.meta["timing_source"] == "sidecar FrameTimesStart"
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimesStart": starts[:4]}))
    with pytest.raises(InputError, match="FrameTimesStart has 4 entries"):
        read_nifti_series(path)


def test_bids_slice_timing_in_the_sidecar(tmp_path, caplog):
    """dcm2niix's SliceTiming (each slice's time within its frame, along the third axis) times
    the slices as ctperf's own SliceTimes would; along another axis it is said not to be
    applied. A sidecar saved with a byte-order mark reads the same."""
    path = _blank_study(tmp_path / "s.nii.gz", 0.0)
    starts = np.array([0.0, 1.0, 2.0, 3.5, 5.0, 7.0])
    side = {"FrameTimesStart": starts.tolist(), "SliceTiming": [0.0, 0.4]}
    (tmp_path / "s.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(side).encode())
    series = read_nifti_series(path)
    np.testing.assert_allclose(series.slice_times, starts[:, None] + [0.0, 0.4])
    # each frame at its slices' mean time, as a DICOM series of these slices is read
    np.testing.assert_allclose(series.times, starts + 0.2)
    assert series.meta["timing_source"] == "sidecar FrameTimesStart and SliceTiming"
    (tmp_path / "s.json").write_text(json.dumps(side | {"SliceEncodingDirection": "j"}))
    assert read_nifti_series(path).slice_times is None
    assert "SliceTiming along 'j'" in caplog.text
    (tmp_path / "s.json").write_text(json.dumps(side | {"SliceTiming": [0.0, 0.4, 0.8]}))
    with pytest.raises(InputError, match="SliceTiming has 3 entries, the image has 2 slices"):
        read_nifti_series(path)


@pytest.mark.parametrize(("offsets", "match"), [
    ([0.0, 400.0], r"s\.json: SliceTiming runs from 0 to 400 s.*milliseconds\?"),
    ([0.0, 1.0], r"SliceTiming runs from 0 to 1 s, outside a frame \(0 to the 1 s[^;]*$"),
    ([-0.2, 0.2], r"SliceTiming runs from -0\.2 to 0\.2 s")])
def test_slice_timing_outside_a_frame_is_refused(tmp_path, offsets, match):
    """SliceTiming is each slice's time within its frame (BIDS: at least 0, under the time
    between frames). Given in milliseconds it had put the frames 375 s late (the maps then
    found no enhancement); offsets of whole frames had moved the slices a frame apart and
    doubled a study's hypoperfused volume, exit 0."""
    path = _blank_study(tmp_path / "s.nii.gz", 0.0)
    starts = [0.0, 1.0, 2.0, 3.5, 5.0, 7.0]
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimesStart": starts,
                                                 "SliceTiming": offsets}))
    with pytest.raises(InputError, match=match):
        read_nifti_series(path)


def test_a_default_header_step_is_not_compared_with_the_sidecar(tmp_path, caplog):
    """pixdim[4] = 1 without a unit is what writers leave when they set no spacing (refused
    as one without a sidecar): a sidecar at 2 s is used without a warning that the header
    says otherwise; a header that gives a spacing (0.5 s) is still compared."""
    (tmp_path / "s.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    path = _blank_study(tmp_path / "s.nii.gz", 1.0)
    with caplog.at_level("WARNING", logger="ctperf"):
        np.testing.assert_allclose(read_nifti_series(path).times, np.arange(6) * 2.0)
    assert "pixdim[4] gives" not in caplog.text
    path = _blank_study(tmp_path / "s.nii.gz", 0.5, unit="sec")
    with caplog.at_level("WARNING", logger="ctperf"):
        read_nifti_series(path)
    assert "pixdim[4] gives 0.5 s between frames" in caplog.text


def test_a_voxel_size_of_zero_is_refused(tmp_path):
    """A header with a slice thickness of 0 and no sform: nibabel would take 1 mm, and every
    volume in mL would be off by the true thickness. Refused; an sform gives the size."""
    img = nib.Nifti1Image(np.zeros((4, 5, 2, 6), dtype=np.float32), None)
    img.header.set_qform(np.diag([2.0, 2.0, 5.0, 1.0]), code=1)
    img.header.set_sform(None, code=0)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][3], img.header["pixdim"][4] = 0.0, 1.0
    nib.save(img, tmp_path / "z.nii")
    with pytest.raises(InputError, match=r"voxel size \(pixdim\[1:4\]\) is \[2.0, 2.0, 0.0\]"):
        read_nifti_series(tmp_path / "z.nii")
    img.header.set_sform(np.diag([2.0, 2.0, 5.0, 1.0]), code=2)
    nib.save(img, tmp_path / "s.nii")
    assert read_nifti_series(tmp_path / "s.nii").spacing == pytest.approx((5.0, 2.0, 2.0))


def test_header_and_sidecar_timing_that_disagree_are_reported(tmp_path, caplog):
    """pixdim[4] of 1 s beside a sidecar 0.5 s apart: the sidecar is used, and said so."""
    path = _blank_study(tmp_path / "s.nii.gz", 1.0, unit="sec")
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimes": [0.5 * i for i in range(6)]}))
    with caplog.at_level("WARNING", logger="ctperf"):
        np.testing.assert_allclose(read_nifti_series(path).times, np.arange(6) * 0.5)
    assert "pixdim[4] gives 1 s between frames" in caplog.text
    caplog.clear()
    (tmp_path / "s.json").write_text(json.dumps({"FrameTimes": [0, 1, 2, 3, 5, 7]}))
    with caplog.at_level("WARNING", logger="ctperf"):
        read_nifti_series(path)                 # uneven steps of 1-2 s: 1 s is one of them
    assert "pixdim" not in caplog.text


@pytest.mark.parametrize(
    ("shape", "fill", "sidecar", "message"),
    [
        ((4, 4, 2), 0.0, None, "must be 4D"),
        ((4, 4, 2, 3), np.nan, None, "NaN"),
        ((4, 4, 2, 3), 0.0, {"FrameTimes": [0, 1]}, "FrameTimes has 2 entries"),
        ((4, 4, 2, 3), 0.0, {"FrameTimes": [0, 2, 1]}, "strictly increasing"),
    ],
)
def test_bad_nifti_studies_name_the_file(tmp_path, shape, fill, sidecar, message):
    path = tmp_path / "bad.nii.gz"
    img = nib.Nifti1Image(np.full(shape, fill, dtype=np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", "sec")
    if len(shape) == 4:
        img.header.set_zooms((1, 1, 1, 1.0))
    nib.save(img, path)
    if sidecar is not None:
        (tmp_path / "bad.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match=message) as info:
        read_nifti_series(path)
    assert "bad." in str(info.value)


def test_truncated_file_is_a_clear_error(small_series, tmp_path):
    path = write_series_nifti(small_series, tmp_path / "study.nii.gz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match=r"study\.nii\.gz: not a readable NIfTI"):
        read_nifti_series(path)


def test_maps_round_trip_with_units_and_provenance(tmp_path, rng):
    affine = np.diag([0.5, 0.5, 5.0, 1.0])
    maps = PerfusionMaps(
        maps={"cbf": rng.random((2, 3, 4)) * 80, "tmax": rng.random((2, 3, 4)) * 10},
        affine=affine, provenance={"method": "nlr", "constants": {"rho": 1.04, "kh": 0.733}})
    write_maps_nifti(maps, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cbf.json", "cbf.nii.gz", "tmax.json", "tmax.nii.gz"]
    back = read_maps(tmp_path)
    np.testing.assert_allclose(back["cbf"], maps["cbf"])
    np.testing.assert_allclose(back.affine, affine)
    assert back.units["cbf"] == "mL/100g/min"
    assert back.provenance["constants"] == {"rho": 1.04, "kh": 0.733}


def test_mask_on_another_grid_is_rejected(tmp_path):
    mask = np.zeros((2, 3, 4), dtype=bool)
    mask[1, 1, 1] = True
    write_volume(mask, np.eye(4), tmp_path / "m.nii.gz")
    assert read_mask(tmp_path / "m.nii.gz", shape=(2, 3, 4), affine=np.eye(4)).sum() == 1
    with pytest.raises(InputError, match="mask grid"):
        read_mask(tmp_path / "m.nii.gz", shape=(2, 3, 5), affine=np.eye(4))
    with pytest.raises(InputError, match=r"voxels 1, 1, 1 mm .* differs from the study's "
                                         r"\(2, 3, 4\), voxels 2, 1, 1 mm"):
        read_mask(tmp_path / "m.nii.gz", shape=(2, 3, 4), affine=np.diag([2, 1, 1, 1.0]))


def test_mask_storing_the_same_voxels_another_way_is_turned_onto_the_study(tmp_path):
    """A mask written by another tool with its rows reversed and its rows and columns swapped
    (its affine saying so) is read on the study's grid, voxel for voxel."""
    rng = np.random.default_rng(3)
    mask = rng.random((2, 3, 4)) > 0.5
    study = np.diag([-0.5, -0.7, 5.0, 1.0])
    study[:3, 3] = [60.0, 80.0, -10.0]
    other = study.copy()
    other[:3, 3] += other[:3, 1] * (mask.shape[1] - 1)  # rows reversed
    other[:3, 1] *= -1
    other = other[:, [1, 0, 2, 3]]  # then rows and columns swapped
    write_volume(np.swapaxes(mask[:, ::-1], 1, 2), other, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nii.gz", shape=(2, 3, 4),
                                            affine=study), mask)


def test_a_study_whose_sidecar_cannot_be_written_leaves_no_image(small_series, tmp_path,
                                                                  monkeypatch):
    """A full disk while writing the sidecar: the image had already taken its name and stayed
    alone, read later with its header's even frame steps (a probe's 2-then-3 s study read 0-50
    s for 0-60 s, Tmax 2.85 for 3.01 s, no warning). Now neither is written."""
    from ctperf.io import nifti as nifti_module

    def full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti_module, "write_json", full)
    with pytest.raises(OSError, match="No space"):
        write_series_nifti(small_series, tmp_path / "study.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_atomic_outputs_get_ordinary_permissions(small_series, tmp_path):
    import os
    import stat

    from ctperf.io import atomic_dir

    mask = os.umask(0o022)
    try:
        path = write_series_nifti(small_series, tmp_path / "study.nii.gz")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_the_umask_is_read_without_being_changed(monkeypatch):
    # setting the umask to 0 to read it let another thread create a file writable by all
    import os
    import sys

    from ctperf.io import atomic

    expected = os.umask(0o027)
    os.umask(0o027)
    try:
        if sys.platform.startswith("linux"):
            def refuse(mask):
                raise AssertionError("os.umask called")

            monkeypatch.setattr(os, "umask", refuse)
        assert atomic._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(expected)


@pytest.mark.parametrize("shear", [0.0, 1.82], ids=["straight", "tilted gantry"])
def test_written_maps_carry_qform_and_sform_and_their_unit(tmp_path, shear):
    """Tools that read only the qform (or only the sform) see the same grid, coded 1 (scanner:
    maps lie in the scanner's space); a sheared grid, which a qform cannot hold, has the
    nearest unsheared grid as its qform, so that ITK opens it, each voxel within half the
    slab's shear of its true place."""
    affine = np.diag([-0.9, 0.9, 5.0, 1.0])
    affine[1, 2] = shear  # 5 mm slices, 20 degrees: 5 tan(20) = 1.82 mm per slice
    shape = (8, 30, 40)  # (Z, Y, X)
    path = write_volume(np.zeros(shape, np.float32), affine, tmp_path / "cbf.nii.gz",
                        sidecar={"map": "cbf", "units": "mL/100g/min"})
    img = nib.load(path)
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
    assert img.get_qform(coded=True)[1] == img.get_sform(coded=True)[1] == 1
    qform = img.get_qform()
    if shear == 0.0:
        np.testing.assert_allclose(qform, affine, atol=1e-5)
    else:  # in plane as it is, slices along the planes' normal at their 5 mm along it
        np.testing.assert_allclose(qform[:3, :2], affine[:3, :2], atol=1e-5)
        np.testing.assert_allclose(qform[:3, 2], [0, 0, 5.0], atol=1e-4)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[::-1]], indexing="ij"), -1)
    ijk = np.c_[ijk.reshape(-1, 3), np.ones(ijk[..., 0].size)]
    off = np.linalg.norm(ijk @ (qform - affine).T, axis=1)
    # half the slab's shear: 3.5 slices from the centre times 1.82 mm (a rotation about the
    # first voxel: 7.3 mm here, 40 mm across a 230 mm field of view at 20 degrees)
    assert off.max() == pytest.approx(3.5 * shear, abs=1e-3)
    sitk = pytest.importorskip("SimpleITK")
    itk = sitk.ReadImage(str(path))  # ITK opens it, on the qform
    lps = np.array(itk.TransformIndexToPhysicalPoint((39, 29, 7)))
    np.testing.assert_allclose(lps * [-1, -1, 1], (qform @ [39, 29, 7, 1])[:3], atol=1e-3)
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"cbf mL/100g/min"


def test_a_mask_an_itk_tool_saved_on_a_tilted_study_is_read(tmp_path, caplog):
    """ITK-SNAP and Slicer save a mask drawn on a tilted study on the qform's unsheared grid:
    it is the same voxels, and it is read; the study's grid rotated is refused, saying that only
    the axes differ."""
    sitk = pytest.importorskip("SimpleITK")
    from ctperf.io import read_mask

    affine = np.diag([-0.9, 0.9, 5.0, 1.0])
    affine[1, 2] = 1.82
    mask = np.zeros((4, 20, 24), np.uint8)
    mask[1:3, 5:9, 6:12] = 1
    drawn = write_volume(mask, affine, tmp_path / "drawn.nii.gz")
    saved = tmp_path / "saved.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(drawn)), str(saved))
    assert not np.allclose(nib.load(saved).affine, affine, atol=1e-3)  # ITK dropped the tilt
    np.testing.assert_array_equal(read_mask(saved, shape=mask.shape, affine=affine), mask)
    turned = affine.copy()
    turned[:3, :2] = [[0, 0.9], [-0.9, 0], [0, 0]]  # in plane by 90 degrees: other axes
    write_volume(mask, turned, tmp_path / "turned.nii.gz")
    with pytest.raises(InputError, match="same spacing and first voxel, other axes"):
        read_mask(tmp_path / "turned.nii.gz", shape=mask.shape, affine=affine)


def test_a_grid_of_another_extent_is_not_the_same_voxels():
    """Same affine, fewer columns (a cropped map): not a reordering of the reference's grid."""
    from ctperf.io import reorientation

    affine = np.diag([-0.9, 0.9, 5.0, 1.0])
    assert reorientation(affine, (2, 24, 24), affine, target_shape=(2, 24, 24)) is not None
    assert reorientation(affine, (2, 24, 20), affine, target_shape=(2, 24, 24)) is None
