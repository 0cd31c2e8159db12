"""``ctperf info`` and ``ctperf convert`` through the CLI entry point and once as a process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.io import read_dicom_series, read_nifti_series, write_series_nifti
from dicom_factory import write_fake_study


def test_info_dicom(tmp_path, rng, capsys):
    study = write_fake_study(tmp_path / "s", rng, n_frames=5, n_slices=3)
    assert main(["info", str(study.folder)]) == 0
    out = capsys.readouterr().out
    assert "5 frames x 3 slices x 8 rows x 10 columns" in out
    assert "5 x 0.5 x 0.45 mm" in out
    span = study.times[-1] - study.times[0]
    assert f"span {span:.3f} s" in out
    assert "AcquisitionDateTime" in out
    assert "ACME Scan 9" in out and "CTP 5mm" in out
    assert "kVp          80" in out and "mAs          150" in out


def test_progress_bars_only_on_a_terminal(tmp_path, rng, capsys, monkeypatch):
    """A log file that stderr is piped into holds messages, not a bar redrawn for every file
    decoded; on a terminal the bar is drawn."""
    from ctperf.commands import show_progress

    study = write_fake_study(tmp_path / "s", rng)
    assert main(["info", str(study.folder)]) == 0
    assert "decode DICOM" not in capsys.readouterr().err
    assert not show_progress()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress()


def test_info_reads_the_headers_once(tmp_path, rng, caplog):
    """A folder with a stray file: the warning about it is given once, not once per pass."""
    study = write_fake_study(tmp_path / "s", rng, n_frames=5, n_slices=2)
    (study.folder / "notes.txt").write_text("acquisition notes")
    assert main(["info", str(study.folder)]) == 0
    said = [r for r in caplog.records if "notes.txt" in r.getMessage()]
    assert len(said) == 1


def test_info_lists_series(tmp_path, rng, capsys):
    a = write_fake_study(tmp_path / "s", rng, description="CTP A", nested=False)
    b = write_fake_study(tmp_path / "s" / "b", rng, description="CTP B", nested=False)
    assert main(["info", str(a.folder)]) == 0
    out = capsys.readouterr().out
    assert "2 series" in out and a.series_uid in out and b.series_uid in out
    assert main(["info", str(a.folder), "--series", b.series_uid]) == 0
    assert "CTP B" in capsys.readouterr().out


def test_info_nifti(tmp_path, small_series, capsys):
    path = write_series_nifti(small_series, tmp_path / "study.nii.gz")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "12 frames x 3 slices x 16 rows x 20 columns" in out
    assert "sidecar FrameTimes" in out
    assert "format       NIfTI\n" in out
    # a folder holding it alone (ISLES' layout, a phantom subject without DICOM): the NIfTI
    # read is named (it had said "DICOM, None")
    assert main(["info", str(tmp_path)]) == 0
    assert "format       NIfTI, study.nii.gz\n" in capsys.readouterr().out


def test_convert_dicom_to_nifti_and_back(tmp_path, rng, capsys):
    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    nii = tmp_path / "study.nii.gz"
    assert main(["convert", str(study.folder), str(nii)]) == 0
    from_nifti = read_nifti_series(nii)
    from_dicom = read_dicom_series(study.folder)
    np.testing.assert_array_equal(from_nifti.hu, from_dicom.hu)
    np.testing.assert_allclose(from_nifti.affine, from_dicom.affine, atol=1e-5)  # float32 header
    np.testing.assert_allclose(from_nifti.times, from_dicom.times)
    np.testing.assert_allclose(from_nifti.slice_times, from_dicom.slice_times)
    out_dir = tmp_path / "back"
    assert main(["convert", str(nii), str(out_dir), "--compress"]) == 0
    assert pydicom.dcmread(next(out_dir.glob("*.dcm"))).file_meta.TransferSyntaxUID.is_compressed
    again = read_dicom_series(out_dir)
    np.testing.assert_array_equal(again.hu, from_dicom.hu)
    np.testing.assert_allclose(again.affine, from_dicom.affine, atol=1e-4)  # float32 header
    np.testing.assert_allclose(again.slice_times, from_dicom.slice_times, atol=1e-6)  # us digits
    # the NIfTI sidecar carries no patient identity, so neither does DICOM made from it
    assert "P001" not in nii.with_name("study.json").read_text()
    assert again.meta["dicom"].get("PatientID") != "P001"


def test_a_converted_copy_is_never_taken_for_the_scan(tmp_path, rng):
    """A DICOM study converted to DICOM is DERIVED, "rewritten by ctperf", under SeriesNumber
    1000 + the source's, with ctperf as contributing equipment: it had kept the scanner's
    ORIGINAL\\PRIMARY, number and description while its pixels changed (padding to air, whole
    HU), two series alike in PACS."""
    study = write_fake_study(tmp_path / "s", rng)
    source = pydicom.dcmread(next(iter(study.files.values())))
    assert main(["convert", str(study.folder), str(tmp_path / "copy")]) == 0
    ds = pydicom.dcmread(next((tmp_path / "copy").glob("*.dcm")))
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.DerivationDescription == "rewritten by ctperf"
    assert ds.SeriesNumber == 1000 + int(source.get("SeriesNumber") or 1)
    assert ds.SeriesDescription.endswith("(rewritten by ctperf)")
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "ctperf"
    # converted again: one suffix, one offset
    assert main(["convert", str(tmp_path / "copy"), str(tmp_path / "again")]) == 0
    twice = pydicom.dcmread(next((tmp_path / "again").glob("*.dcm")))
    assert (twice.SeriesNumber, twice.SeriesDescription) == (ds.SeriesNumber,
                                                            ds.SeriesDescription)


def test_converted_nifti_sidecar_has_bids_timing(tmp_path, rng):
    """The sidecar of a converted study also holds BIDS' FrameTimesStart, so that a tool
    reading only that times the frames (the header's one step had said a two-rate study ran
    15 s where it ran 27); FrameTimes edited without SliceTimes is refused (the stale slice
    times had won, silently)."""
    import json

    study = write_fake_study(tmp_path / "s", rng, shuttle=True)
    nii = tmp_path / "study.nii.gz"
    assert main(["convert", str(study.folder), str(nii)]) == 0
    side = json.loads(nii.with_name("study.json").read_text())
    from_dicom = read_dicom_series(study.folder)
    np.testing.assert_allclose(side["FrameTimesStart"], from_dicom.slice_times.min(axis=1))
    bids_only = {k: v for k, v in side.items() if k not in ("FrameTimes", "SliceTimes")}
    nii.with_name("study.json").write_text(json.dumps(bids_only))
    np.testing.assert_allclose(read_nifti_series(nii).times,
                               from_dicom.slice_times.min(axis=1), atol=1e-9)
    edited = side | {"FrameTimes": (np.asarray(side["FrameTimes"]) + 10.0).tolist()}
    nii.with_name("study.json").write_text(json.dumps(edited))
    with pytest.raises(InputError, match=r"study\.json: the frame times \(FrameTimes\) and "
                                         r"SliceTimes disagree: frame 0 at 10\.\d+ s"):
        read_nifti_series(nii)


def test_convert_with_frame_interval(tmp_path, rng):
    def edit(ds, t, z):
        for keyword in ("AcquisitionDateTime", "AcquisitionTime", "ContentTime"):
            delattr(ds, keyword)

    study = write_fake_study(tmp_path / "s", rng, edit=edit)
    nii = tmp_path / "study.nii"
    assert main(["convert", str(study.folder), str(nii)]) == 2
    assert not nii.exists()
    assert main(["convert", str(study.folder), str(nii), "--frame-interval", "2"]) == 0
    np.testing.assert_allclose(read_nifti_series(nii).times, 2.0 * np.arange(5))


def test_preprocess_reads_with_frame_interval_and_series(tmp_path, rng):
    def edit(ds, t, z):
        for keyword in ("AcquisitionDateTime", "AcquisitionTime", "ContentTime"):
            delattr(ds, keyword)

    uid = "1.2.826.0.1.3680043.8.498.1"
    study = write_fake_study(tmp_path / "s", rng, edit=edit, series_uid=uid)
    out = tmp_path / "pre"
    argv = ["preprocess", str(study.folder), str(out), "--no-register", "--no-filter",
            "--series", uid]
    assert main(argv) == 2  # no acquisition times: the reader asks for --frame-interval
    assert main([*argv, "--frame-interval", "2"]) == 0
    np.testing.assert_allclose(read_nifti_series(out / "study.nii.gz").times, 2.0 * np.arange(5))
    assert main([*argv[:4], "--series", "1.2.3", "--frame-interval", "2", "--overwrite"]) == 2


@pytest.mark.parametrize("argv, problem", [
    (["info", "{tmp}/absent"], "no such file or folder"),
    (["info", "{tmp}/empty"], "no DICOM image files"),
    (["convert", "{tmp}/empty", "{tmp}/o.nii.gz"], "no DICOM image files"),
    (["convert", "{tmp}/empty", "{tmp}/o.nii.gz", "--compress"], "--compress applies"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, problem):
    (tmp_path / "empty").mkdir()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]


def test_bad_input_as_a_process(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    result = subprocess.run([sys.executable, "-m", "ctperf", "info", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.nii.gz" in lines[0]
    assert "Traceback" not in result.stderr


def test_compression_without_gdcm_is_refused_before_reading(tmp_path, rng, capsys, monkeypatch):
    """Without GDCM, --compress was refused once the study was read and writing had begun,
    naming the Python option; now before anything is read, naming the extra."""
    import sys

    study = write_fake_study(tmp_path / "s", rng)
    monkeypatch.setitem(sys.modules, "gdcm", None)
    assert main(["convert", str(study.folder), str(tmp_path / "out"), "--compress"]) == 2
    err = capsys.readouterr().err
    assert "needs GDCM, which is not installed: pip install 'ctperf[compress]'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_compressed_file_cut_short_is_one_line(tmp_path, rng):
    """An RLE file cut inside its pixel data: pydicom reads it without the pixel data and warns;
    the one line names the file as truncated (it had said "has no pixel data", under two lines
    of pydicom's warning)."""
    from pydicom.uid import RLELossless

    study = write_fake_study(tmp_path / "s", rng, n_frames=3, n_slices=2,
                             edit=lambda ds, t, z: ds.compress(RLELossless))
    cut = study.files[(1, 0)]
    cut.write_bytes(cut.read_bytes()[:-60])
    result = subprocess.run([sys.executable, "-m", "ctperf", "info", str(study.folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.strip().splitlines() if "decode DICOM" not in ln]
    assert len(lines) == 1 and cut.name in lines[0], result.stderr
    assert "truncated" in lines[0]


def test_unet_commands_without_torch_say_what_to_install(tmp_path):
    # torch is an optional dependency (ctperf[model]): without it the U-Net commands end with
    # one line that names it, exit 2, and leave no output behind.
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    runs = [["train", str(cohort), str(tmp_path / "t"), "--target", "cbv"],
            ["cv", str(cohort), str(tmp_path / "c"), "--target", "cbv"],
            ["predict", str(cohort), str(tmp_path / "p"), "--model", str(tmp_path / "m.pt")],
            ["reproduce", str(cohort), str(tmp_path / "r")],
            ["demo", "--neural", str(tmp_path / "d")]]  # had promised 11 minutes first
    script = ("import importlib.abc, sys\n"
              "class NoTorch(importlib.abc.MetaPathFinder):  # an environment without torch\n"
              "    def find_spec(self, name, path, target=None):\n"
              "        if name.split('.')[0] == 'torch':\n"
              "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
              "sys.meta_path.insert(0, NoTorch())\n"
              "from ctperf.cli import main\n"
              f"print([main(a) for a in {runs!r}])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "[2, 2, 2, 2, 2]", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5 and "Traceback" not in result.stderr
    for line, run in zip(lines, runs, strict=True):
        assert line.startswith(f"ctperf {run[0]}: error: the U-Net needs PyTorch"), line
        assert "pip install 'ctperf[model]'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]
