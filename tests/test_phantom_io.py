"""Phantom on disk: subject folders, resumable cohorts, the ``ctperf phantom`` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ctperf.cli import main
from ctperf.phantom import (
    MASK_NAMES,
    generate_subject,
    read_subject,
    simulate_subject,
    subject_seed,
    write_subject,
)
from ctperf.workflow import generate_cohort

TINY = {"size": 48, "slices": 2, "frames": 12, "anatomy": "procedural"}


@pytest.fixture(scope="module")
def subject():
    return generate_subject(seed=2, motion="mild", lesion=True, **TINY)


def test_write_read_roundtrip(subject, tmp_path):
    folder = write_subject(subject, tmp_path / "sub", dicom=True, preview=True)
    for name in ("study.nii.gz", "study.json", "curves.json", "motion.json", "params.json",
                 "preview.png", "truth/cbf.nii.gz", "truth/baseline.nii.gz",
                 "masks/territories.nii.gz"):
        assert (folder / name).exists(), name
    back = read_subject(folder)
    # int16 storage rounds HU to whole numbers
    np.testing.assert_allclose(back.series.hu, subject.series.hu, atol=0.5 + 1e-4)
    np.testing.assert_allclose(back.series.times, subject.series.times)
    np.testing.assert_allclose(back.series.affine, subject.series.affine, atol=1e-5)
    for name in subject.truth.names:
        np.testing.assert_array_equal(back.truth[name], subject.truth[name])
    for name in MASK_NAMES:
        np.testing.assert_array_equal(back.masks[name], subject.masks[name])
    np.testing.assert_allclose(back.aif, subject.aif)
    np.testing.assert_allclose(back.motion, subject.motion)
    np.testing.assert_array_equal(back.extras["cbf_healthy"], subject.extras["cbf_healthy"])
    assert back.params["physiology"] == json.loads(json.dumps(subject.params["physiology"]))
    assert back.truth.provenance["constants"]["rho"] == 1.04


def test_params_json_rebuilds_the_subject(subject, tmp_path):
    """params.json holds every drawn quantity: simulating it again gives the same subject."""
    folder = write_subject(subject, tmp_path / "sub", dicom=False)
    rebuilt = simulate_subject(read_subject(folder).params)
    np.testing.assert_array_equal(rebuilt.series.hu, subject.series.hu)
    for name in subject.truth.names:
        np.testing.assert_array_equal(rebuilt.truth[name], subject.truth[name])
    np.testing.assert_array_equal(rebuilt.motion, subject.motion)


def test_dicom_copy_has_the_study(subject, tmp_path):
    from ctperf.io import read_dicom_series

    folder = write_subject(subject, tmp_path / "sub", dicom=True)
    series = read_dicom_series(folder / "dicom")
    assert series.shape == subject.series.shape
    np.testing.assert_allclose(series.times - series.times[0],
                               subject.series.times - subject.series.times[0], atol=1e-3)
    # int16 HU: rounding only
    np.testing.assert_allclose(series.hu, subject.series.hu, atol=0.5 + 1e-4)


def test_cohort_is_deterministic_and_resumable(tmp_path):
    opts = {"dicom": False, **TINY}
    folders = generate_cohort(tmp_path / "c", subjects=3, seed=9, **opts)
    assert [f.name for f in folders] == ["sub-0000", "sub-0001", "sub-0002"]
    params = [json.loads((f / "params.json").read_text()) for f in folders]
    assert params[1]["config"]["seed"] == subject_seed(9, 1)
    assert params[1]["cohort"] == {"seed": 9, "index": 1}
    assert len({p["config"]["seed"] for p in params}) == 3
    marker = folders[0] / "marker"
    marker.write_text("kept")
    shutil.rmtree(folders[1])
    generate_cohort(tmp_path / "c", subjects=4, seed=9, **opts)
    assert marker.exists()  # finished subjects are skipped, not rewritten
    assert (folders[1] / "study.nii.gz").exists() and (tmp_path / "c" / "sub-0003").exists()
    again = read_subject(folders[1])
    orig = generate_subject(seed=subject_seed(9, 1), **TINY)
    np.testing.assert_allclose(again.series.hu, orig.series.hu, atol=0.5 + 1e-4)
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]
    assert leftovers == [".ctperf-output"]  # no half-written folders
    rows = json.loads((tmp_path / "c" / "manifest.json").read_text())["studies"]
    assert sorted(rows) == [f"sub-{i:04d}" for i in range(4)]
    assert {r["state"] for r in rows.values()} == {"done"}
    from ctperf.errors import InputError

    with pytest.raises(InputError, match="seed 9"):
        generate_cohort(tmp_path / "c", subjects=4, seed=10, **opts)


def test_read_subject_rejects_other_folders(tmp_path):
    from ctperf.errors import InputError

    with pytest.raises(InputError, match=r"study\.nii\.gz"):
        read_subject(tmp_path)


def test_cli_writes_cohort_and_previews(tmp_path, capsys):
    out = tmp_path / "cohort"
    rc = main(["phantom", str(out), "--subjects", "2", "--size", "48", "--slices", "1",
               "--frames", "10", "--seed", "4", "--anatomy", "procedural", "--preview",
               "--no-dicom", "--motion", "realistic", "--mas", "80", "--residues", "box,gamma",
               "--lesion-free", "0.5", "--workers", "1"])
    assert rc == 0
    for i in range(2):
        sub = out / f"sub-{i:04d}"
        assert (sub / "preview.png").stat().st_size > 1000
        assert not (sub / "dicom").exists()
        params = json.loads((sub / "params.json").read_text())
        assert params["config"]["mas"] == 80
        assert params["config"]["residues"] == ["box", "gamma"]
    assert "2 subjects" in capsys.readouterr().out


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # checked while parsing, before anything is written
        main(["phantom", str(tmp_path / "x"), "--size", "8", "--anatomy", "procedural"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    err = capsys.readouterr().err
    assert "size" in err and "Traceback" not in err
    (tmp_path / "file").write_text("")
    assert main(["phantom", str(tmp_path / "file"), "--size", "48", "--slices", "1",
                 "--frames", "4", "--anatomy", "procedural"]) == 2


def test_an_anatomy_this_machine_lacks_is_refused_before_anything_is_written(monkeypatch,
                                                                             tmp_path):
    """``--anatomy mni`` without nilearn: one line saying what to install, and no cohort
    files left behind that a rerun would trip over."""
    import ctperf.phantom.anatomy as anatomy
    from ctperf.cli import main

    monkeypatch.setattr(anatomy, "available_sources", lambda: ["procedural"])
    out = tmp_path / "c"
    assert main(["phantom", str(out), "--subjects", "1", "--size", "32", "--slices", "1",
                 "--anatomy", "mni", "--workers", "1"]) == 2
    assert not out.exists() or not any(out.iterdir())
