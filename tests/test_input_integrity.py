"""A study is read whole or refused: damaged, incomplete or implausible input on disk gives an
InputError naming the file and the problem (the CLI's one line, exit 2), never a traceback or a
silently wrong study."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.io import read_dicom_series, read_nifti_series, read_study
from ctperf.model.checkpoint import load_checkpoint, save_checkpoint
from ctperf.model.unet import UNet
from dicom_factory import START, patch_bytes, write_fake_study


def brain_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, T) float32: air around a block of soft tissue, as CT numbers."""
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[2:-2, 2:-2] = 35 + 5 * rng.standard_normal(data[2:-2, 2:-2].shape)
    return data


def write_nifti(path: Path, data: np.ndarray, *, unit: str = "sec", step: float = 1.0) -> Path:
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm", unit)
    if data.ndim == 4:
        img.header.set_zooms((1, 1, 1, step))
    nib.save(img, path)
    return path


@pytest.fixture
def nifti_study(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_nifti(tmp_path / "study.nii.gz", brain_like(rng, (12, 10, 2, 12)))


# ---- NIfTI ----------------------------------------------------------------------------------

def test_crc_corrupt_gzip_is_refused(nifti_study):
    data = bytearray(nifti_study.read_bytes())
    data[-6] ^= 0xFF  # the gzip trailer's CRC: nibabel alone reads these pixels silently
    nifti_study.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"study\.nii\.gz: damaged .*CRC"):
        read_nifti_series(nifti_study)


def test_corrupt_gzip_payload_and_truncation_are_refused(nifti_study, tmp_path):
    data = nifti_study.read_bytes()
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF
    (tmp_path / "mid.nii.gz").write_bytes(bytes(middle))
    (tmp_path / "cut.nii.gz").write_bytes(data[:-20])
    for name in ("mid.nii.gz", "cut.nii.gz"):
        with pytest.raises(InputError, match=rf"{name}: damaged or truncated"):
            read_nifti_series(tmp_path / name)


def test_truncated_uncompressed_nifti(tmp_path, rng):
    path = write_nifti(tmp_path / "s.nii", brain_like(rng, (12, 10, 2, 12)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"s\.nii: truncated"):
        read_nifti_series(path)


def test_cli_prints_one_line_and_exits_2(nifti_study, capsys):
    nifti_study.write_bytes(nifti_study.read_bytes()[:-20])
    assert main(["info", str(nifti_study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "study.nii.gz" in err and "Traceback" not in err


@pytest.mark.parametrize("unit, step", [("sec", 500.0), ("unknown", 500.0), ("sec", 0.01)])
def test_implausible_frame_step_is_refused(tmp_path, rng, unit, step):
    path = write_nifti(tmp_path / "s.nii.gz", brain_like(rng, (8, 8, 2, 12)), unit=unit,
                       step=step)
    with pytest.raises(InputError, match=r"s\.nii\.gz: pixdim\[4\]: frames are .* apart"):
        read_nifti_series(path)


def test_milliseconds_are_converted(tmp_path, rng):
    path = write_nifti(tmp_path / "s.nii.gz", brain_like(rng, (8, 8, 2, 12)), unit="msec",
                       step=750.0)
    np.testing.assert_allclose(read_nifti_series(path).times, 0.75 * np.arange(12))


def test_non_time_unit_is_refused(tmp_path, rng):
    path = write_nifti(tmp_path / "s.nii.gz", brain_like(rng, (8, 8, 2, 12)), unit="hz")
    with pytest.raises(InputError, match="not a time"):
        read_nifti_series(path)


def test_memory_guard_before_reading(nifti_study, monkeypatch):
    monkeypatch.setattr("ctperf.io.integrity.available_memory", lambda: 1000)
    with pytest.raises(InputError, match=r"study\.nii\.gz: .*GiB of memory"):
        read_nifti_series(nifti_study)


@pytest.mark.parametrize("text, message", [
    ('{"FrameTimes": "fast"}', "FrameTimes must be a list of numbers"),
    ('{"FrameTimes": [0, 1, "2"]}', "FrameTimes must be a list of numbers"),
    ('[0, 1, 2]', "must be a JSON object"),
    ('"hello"', "must be a JSON object"),
    ('{"FrameTimes": [0, 1', "not valid JSON"),
    ('{"meta": [1]}', "meta must be a JSON object"),
    ('{"SliceTimes": [[0, 0.1], [1]]}', "SliceTimes must be"),
    ('{"FrameTimes": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, NaN]}', "NaN"),
])
def test_malformed_sidecar_names_the_sidecar(nifti_study, text, message):
    nifti_study.with_name("study.json").write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_nifti_series(nifti_study)
    assert "study.json" in str(info.value)


def test_non_uniform_frame_times_from_sidecar(nifti_study):
    # a real protocol: 0.5 s steps through the bolus, then 3 s steps
    times = np.r_[0.5 * np.arange(8), 3.5 + 3.0 * np.arange(1, 5)]
    nifti_study.with_name("study.json").write_text(json.dumps({"FrameTimes": times.tolist()}))
    series = read_nifti_series(nifti_study)
    np.testing.assert_array_equal(series.times, times)
    assert series.meta["timing_source"] == "sidecar FrameTimes"


@pytest.mark.parametrize("shape, message", [
    ((8, 8, 2, 1), "1 frame: a CT perfusion study is a time course"),
    ((8, 8, 2, 2), "2 frames"),
    ((8, 8, 2), "must be 4D"),
])
def test_too_few_frames_or_3d(tmp_path, rng, shape, message, capsys):
    path = write_nifti(tmp_path / "s.nii.gz", brain_like(rng, shape))
    with pytest.raises(InputError, match=message):
        read_nifti_series(path)
    assert main(["info", str(path)]) == 2
    assert "s.nii.gz" in capsys.readouterr().err


def test_one_frame_scaled_wrongly_is_named(tmp_path, rng):
    data = brain_like(rng, (12, 10, 2, 12))
    data[..., 1, 5] *= 100  # frame 5, slice 1: tissue at thousands of HU
    path = write_nifti(tmp_path / "s.nii.gz", data)
    with pytest.raises(InputError, match=r"s\.nii\.gz: frame 5, slice 1: implausible CT"):
        read_nifti_series(path)


def test_blank_frame_is_named(tmp_path, rng):
    data = brain_like(rng, (12, 10, 2, 12))
    data[..., 0, 7] = -1024  # a frame the scanner filled with air
    with pytest.raises(InputError, match=r"frame 7, slice 0: .*a blank image"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", data))


@pytest.mark.parametrize("fill", [0.0, -1024.0])
def test_a_slice_blanked_in_every_frame_is_named(tmp_path, rng, fill):
    """A middle slice filled with one value in every frame passed every image check (each image
    like its slice's other frames) and the brain mask's largest component then dropped the
    slice beyond it from the U-Net's maps too, exit 0 (a probe). The same blank at an end (above
    a stripped brain) is read."""
    data = brain_like(rng, (12, 10, 4, 12))
    data[:, :, 1] = fill
    with pytest.raises(InputError, match=r"s\.nii\.gz: slice 1 holds .* between slices that "
                                         r"hold images: a missing or blanked slice"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", data))
    data = brain_like(rng, (12, 10, 4, 12))
    data[:, :, 3] = fill
    assert read_nifti_series(write_nifti(tmp_path / "end.nii.gz", data)).shape[1] == 4


def test_an_image_unlike_its_slice_is_named(tmp_path, rng):
    """A truncated compressed stream decodes to CT-like values in the wrong places: the
    image's range passes, its pixels do not match the slice's other frames."""
    data = brain_like(rng, (12, 10, 2, 12))
    # from row 3 on, the stream decodes to noise about soft tissue: air and tissue misplaced
    data[:, 3:, 1, 4] = 35.0 + rng.normal(0.0, 200.0, data[:, 3:, 1, 4].shape)
    with pytest.raises(InputError, match=r"frame 4, slice 1: unlike this slice's other frames"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", data))


def test_raw_values_not_hu_are_refused(tmp_path, rng):
    data = brain_like(rng, (12, 10, 2, 12)) * 100  # air at -100000: not CT numbers
    with pytest.raises(InputError, match=r"outside the -1100\.\.3100 HU"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", data))


def _bolus(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, T) brain-like study with a bolus through a vessel and the tissue."""
    data = brain_like(rng, shape)
    t = np.arange(shape[3], dtype=np.float32)
    data[2:-2, 2:-2] += 15 * np.exp(-0.5 * ((t - 7) / 3) ** 2)
    data[3:7, 3:7] += 300 * np.exp(-0.5 * ((t - 6) / 2) ** 2)
    return data


@pytest.mark.parametrize("background", [None, 0.0], ids=["air", "skull-stripped"])
def test_values_stored_without_the_intercept_are_refused(tmp_path, rng, background):
    # HU + 1024 with air at about 0 passes every per-image range check: only the pre-contrast
    # level of what enhances (1059 here, for blood and brain at 35 HU) gives it away
    hu = _bolus(rng, (12, 10, 2, 12))
    air = hu < -500
    if background is not None:
        hu[air] = background
    read_nifti_series(write_nifti(tmp_path / "hu.nii.gz", hu))
    stored = hu + 1024
    if background is not None:
        stored[air] = background
    with pytest.raises(InputError, match=r"s\.nii\.gz: .*enhance start at 10\d\d HU.*HU \+ 1024"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", stored))


def test_a_skull_moving_over_edge_voxels_is_no_unscaled_study(tmp_path, rng):
    """A head tilted through 5 mm slices brings bone into the voxels at its edge, which then
    rise by hundreds of HU from bone's partial volume, more than any artery: a review's tilts
    of 2-4 degrees were refused as unscaled (their most enhancing voxels starting at 428-513
    HU). A study with air at its level was rescaled; without it, the check stands."""
    hu = _bolus(rng, (12, 10, 2, 12))
    edge = np.zeros(hu.shape[:3], dtype=bool)
    edge[0, 1:-1] = True  # a column of voxels at the head's edge, partly bone
    hu[edge] = 500.0
    hu[edge, 6:] = 1400.0  # the skull moves in from frame 6 on
    assert (hu < -500).mean() > 0.05  # air around the head (the test's own)
    read_nifti_series(write_nifti(tmp_path / "hu.nii.gz", hu))
    with pytest.raises(InputError, match=r"s\.nii\.gz: .*enhance start at .*HU \+ 1024"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", hu + 1024))


def test_values_stored_without_the_intercept_in_an_unsigned_type_are_refused(tmp_path, rng):
    """HU + 1024 stored as uint16 without clipping: air a little below -1024 HU wraps to about
    65,530. Those voxels "rose" by 65,000 and were taken for the most enhancing ones, at a
    plausible level before it, so the study passed (and the maps failed on no arterial
    candidates); what lies beyond the CT scale is no blood."""
    hu = _bolus(rng, (12, 10, 2, 12))
    air = hu < -500
    hu[air] = -1000.0 + rng.normal(0.0, 12.0, int(air.sum()))  # 2 % of air under -1024
    stored = (np.rint(hu + 1024.0).astype(np.int64) % 65536).astype(np.uint16)
    assert 0.0 < (stored > 3100).mean() < 0.02  # under the share of the beyond-CT check
    with pytest.raises(InputError, match=r"s\.nii\.gz: .*enhance start at 10\d\d HU.*HU \+ 1024"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", stored))


def test_values_stored_as_tenths_above_air_are_refused(tmp_path, rng):
    """(HU + 1000) x 10 without its rescale, in an image mostly of air (stored near 0): the
    air passed for tissue and the tissue, above 1500 HU, was left out of the enhancing check.
    Most of the values then lie above the CT scale's top, which only metal reaches."""
    hu = _bolus(rng, (16, 16, 2, 12))
    hu[:, :6] = -1000.0 + rng.normal(0.0, 5.0, hu[:, :6].shape)  # air over a third of it
    read_nifti_series(write_nifti(tmp_path / "hu.nii.gz", hu))
    with pytest.raises(InputError, match=r"s\.nii\.gz: .*% of the values lie above 3100 HU"):
        read_nifti_series(write_nifti(tmp_path / "s.nii.gz", (hu + 1000.0) * 10.0))


def _with_skull(hu: np.ndarray) -> np.ndarray:
    """``hu`` (X, Y, Z, T) with a 1-voxel ring of bone (1200-1600 HU) around its tissue."""
    out = hu.copy()
    ring = np.zeros(hu.shape[:3], dtype=bool)
    ring[1:-1, 1:-1] = True
    ring[2:-2, 2:-2] = False
    out[ring] = np.linspace(1200, 1600, int(ring.sum()))[:, None]
    return out


@pytest.mark.parametrize("window", [250.0, 150.0])
def test_values_clipped_to_a_display_window_are_refused(tmp_path, rng, window):
    """An export clipped at the top of a display window had its bone, AIF and VOF cut
    together: CBF up to 5.8 times too high, exit 0, no flag."""
    hu = _with_skull(_bolus(rng, (12, 10, 2, 12)))
    read_nifti_series(write_nifti(tmp_path / "full.nii.gz", hu))
    with pytest.raises(InputError, match=rf"sit at the study's highest, {window:g} HU, in 100% "
                                         r"of the frames.*clipped"):
        read_nifti_series(write_nifti(tmp_path / "c.nii.gz", np.minimum(hu, window)))


def test_metal_that_flickers_between_frames_is_no_unscaled_study(tmp_path, rng):
    """Streaks at 3000 HU that change by +-300 HU from frame to frame had been taken for the
    most enhancing voxels, and the study refused as stored without its intercept."""
    hu = _with_skull(_bolus(rng, (24, 24, 2, 12)))
    hu[8:16, 18:20, 0] = 3000 + 300 * rng.standard_normal((8, 2, 12))  # most of the top 20
    read_nifti_series(write_nifti(tmp_path / "metal.nii.gz", hu))


def test_frame_interval_override_is_checked(nifti_study):
    with pytest.raises(InputError, match="frames are 500 s apart"):
        read_study(nifti_study, frame_interval=500.0)


# ---- DICOM ----------------------------------------------------------------------------------

def test_unreadable_subfolder_is_an_error(tmp_path, rng, monkeypatch):
    study = write_fake_study(tmp_path / "s", rng)
    locked = study.folder / "d1"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"d1: cannot read folder \(Permission denied\)"):
        read_dicom_series(study.folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders without read permission")
def test_unreadable_subfolder_on_disk(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    locked = study.folder / "d1"
    locked.chmod(0)
    try:
        with pytest.raises(InputError, match="d1: cannot read folder"):
            read_dicom_series(study.folder)
    finally:
        locked.chmod(0o755)


def test_unreadable_file_is_an_error(tmp_path, rng, monkeypatch):
    study = write_fake_study(tmp_path / "s", rng)
    locked = study.files[(2, 1)]
    real_dcmread = pydicom.dcmread

    def dcmread(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    with pytest.raises(InputError, match=rf"{locked.name}: cannot read file"):
        read_dicom_series(study.folder)


def test_broken_link_is_an_error(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    (study.folder / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="gone: broken link"):
        read_dicom_series(study.folder)


def test_rescale_outlier_names_the_file(tmp_path, rng):
    """Each file is read with its own rescale: a wrong one shows in the HU it gives."""
    def edit(ds, t, z):
        if (t, z) == (3, 1):
            ds.RescaleSlope = "100"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=rf"{study.files[(3, 1)].name}: implausible CT"):
        read_dicom_series(study.folder)


def test_pixels_off_by_orders_of_magnitude_name_the_file(tmp_path, rng):
    def edit(ds, t, z):
        if (t, z) == (2, 0):
            ds.PixelData = np.full((8, 10), 40000, np.uint16).tobytes()  # 38976 HU

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    with pytest.raises(InputError, match=rf"{study.files[(2, 0)].name}: implausible CT"):
        read_dicom_series(study.folder)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the bad value is the point
def test_unparsable_numeric_tags(tmp_path, rng):
    def edit(ds, t, z):
        if (t, z) == (1, 2):
            ds.RescaleSlope = "1.23456789012"

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    bad = study.files[(1, 2)]
    patch_bytes(bad, "1.23456789012", "ab")
    with pytest.raises(InputError, match=rf"{bad.name}: RescaleSlope is not numeric: 'ab'"):
        read_dicom_series(study.folder)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the bad values are the point
def test_unparsable_geometry_and_descriptive_tags(tmp_path, rng):
    def edit(ds, t, z):
        ds.KVP = "81.2345678901"
        ds.PixelSpacing = ["0.5", "0.4567891"]

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    for path in study.files.values():
        patch_bytes(path, "81.2345678901", "x")
    # a descriptive value that cannot be read is left out
    assert read_dicom_series(study.folder).meta["kvp"] is None
    patch_bytes(study.files[(0, 0)], "0.4567891", "zz")
    with pytest.raises(InputError, match=rf"{study.files[(0, 0)].name}: PixelSpacing is not"):
        read_dicom_series(study.folder)


def test_duplicate_file_is_named_with_two_slices(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, n_slices=2)
    copy = study.folder / "zz_copy.dcm"
    shutil.copy(study.files[(2, 1)], copy)
    with pytest.raises(InputError, match=rf"zz_copy\.dcm: duplicate of "
                                         rf"{study.files[(2, 1)].relative_to(study.folder)} "):
        read_dicom_series(study.folder)


def test_an_export_copied_whole_is_counted(tmp_path, rng):
    """A folder holding the export twice names the first pair and counts the rest, so that
    the user removes the copy, not one file at a time."""
    study = write_fake_study(tmp_path / "s", rng, n_frames=5, n_slices=2)
    shutil.copytree(study.folder, tmp_path / "copy")
    shutil.move(tmp_path / "copy", study.folder / "copy")
    with pytest.raises(InputError, match=r": duplicate of .*; 10 files in all duplicate "
                                         r"others \(the folder holds the export twice\?\)"):
        read_dicom_series(study.folder)


def test_duplicate_with_new_uid_is_named(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng, n_slices=2)
    ds = pydicom.dcmread(study.files[(3, 0)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(study.folder / "zz_again.dcm")
    with pytest.raises(InputError, match=r"zz_again\.dcm: duplicate of .*same slice position"):
        read_dicom_series(study.folder)


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("missing", [(3, 0), (0, 1)])
def test_missing_file_names_frame_and_slice(tmp_path, rng, index, missing):
    def edit(ds, t, z):
        if not index:
            del ds.TemporalPositionIndex

    study = write_fake_study(tmp_path / "s", rng, n_slices=2, edit=edit)
    study.files[missing].unlink()
    t, z = missing
    with pytest.raises(InputError, match=rf"slice {z} of 2 .* no file for frame {t} of 5"):
        read_dicom_series(study.folder)


def test_non_uniform_dicom_timing(tmp_path, rng):
    times = np.r_[0.5 * np.arange(6), 2.5 + 3.0 * np.arange(1, 4)]

    def edit(ds, t, z):
        when = START + dt.timedelta(seconds=float(times[t]))
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
        ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S.%f")

    study = write_fake_study(tmp_path / "s", rng, n_frames=len(times), edit=edit)
    series = read_dicom_series(study.folder)
    np.testing.assert_allclose(series.times, times, atol=1e-6)  # microsecond digits
    np.testing.assert_array_equal(series.hu, study.hu)


def test_dicom_frame_interval_is_checked(tmp_path, rng):
    study = write_fake_study(tmp_path / "s", rng)
    with pytest.raises(InputError, match="frames are 500 s apart"):
        read_dicom_series(study.folder, frame_interval=500.0)


def test_dicom_memory_guard(tmp_path, rng, monkeypatch):
    study = write_fake_study(tmp_path / "s", rng)
    monkeypatch.setattr("ctperf.io.integrity.available_memory", lambda: 100)
    with pytest.raises(InputError, match="GiB of memory"):
        read_dicom_series(study.folder)


# ---- checkpoints ------------------------------------------------------------------------------

def small_checkpoint(**config_changes) -> dict:
    config = {"in_frames": 4, "out_channels": 1, "width": 2, "depth": 2, "kernel_size": 3,
              "norm": "none", "size": 16, "frames": 4, "frame_mode": "first",
              "frame_interval": 1.0, "hu_window": [0, 100], "hu_mean": 0.0, "hu_std": 1.0,
              "targets": ["cbf"], "map_names": ["cbf"], "windows": {"cbf": [0, 100]},
              "reference": "nlr"}
    model = UNet(4, out_channels=1, width=2, depth=2, kernel_size=3)
    return {"config": {**config, **config_changes}, "model": model.state_dict()}


def test_good_checkpoint_loads(tmp_path):
    path = save_checkpoint(small_checkpoint(), tmp_path / "m.pt")
    assert load_checkpoint(path)["config"]["width"] == 2


def test_checkpoint_without_config(tmp_path):
    state = small_checkpoint()
    del state["config"]
    path = save_checkpoint(state, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"m\.pt: checkpoint has no config"):
        load_checkpoint(path)


def test_checkpoint_with_wrong_weight_shapes(tmp_path):
    path = save_checkpoint(small_checkpoint(width=4), tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"m\.pt: weights do not match .* has shape"):
        load_checkpoint(path)


def test_pickle_checkpoint_is_refused_without_unsafe_advice(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "ctperf-unet", "payload": Payload()}, path)
    with pytest.raises(InputError, match=r"evil\.pt: holds Python objects") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)
    assert "this would run" not in capsys.readouterr().out


def test_checkpoint_file_that_is_not_torch(tmp_path):
    path = tmp_path / "m.pt"
    with gzip.open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(InputError, match=r"m\.pt: not a loadable ctperf checkpoint"):
        load_checkpoint(path)
