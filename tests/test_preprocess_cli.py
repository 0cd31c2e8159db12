"""``ctperf preprocess``: outputs on a small moving phantom, and clean errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctperf.cli import main
from ctperf.io import read_nifti_series, write_series_nifti


@pytest.fixture(scope="module")
def moving_phantom(tmp_path_factory):
    from ctperf.phantom import generate_subject

    subject = generate_subject(seed=3, size=64, slices=4, frames=8, motion="severe")
    path = tmp_path_factory.mktemp("study") / "study.nii.gz"
    write_series_nifti(subject.series, path)
    return subject, path


def test_preprocess_writes_outputs(moving_phantom, tmp_path, capsys):
    subject, path = moving_phantom
    out = tmp_path / "out"
    assert main(["preprocess", str(path), str(out), "--workers", "2"]) == 0
    for name in ("study.nii.gz", "study.json", "transforms.json", "qc.json", "qc.png"):
        assert (out / name).is_file(), name
    result = read_nifti_series(out / "study.nii.gz")
    assert result.shape == subject.series.shape
    assert np.allclose(result.times, subject.series.times)
    assert np.allclose(result.affine, subject.series.affine)
    transforms = json.loads((out / "transforms.json").read_text())
    params = np.asarray(transforms["parameters"])
    assert params.shape == (8, 6) and np.all(params[0] == 0)
    qc = json.loads((out / "qc.json").read_text())
    assert len(qc["displacement_mm"]) == 8
    # the filter must lower the frame-to-frame noise inside the brain
    assert qc["noise_sd_hu_after"] < qc["noise_sd_hu_before"]
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_preprocess_no_steps_copies_study(moving_phantom, tmp_path):
    subject, path = moving_phantom
    out = tmp_path / "plain"
    assert main(["preprocess", str(path), str(out), "--no-register", "--no-filter"]) == 0
    result = read_nifti_series(out / "study.nii.gz")
    # float32 NIfTI round trip of the unchanged study
    assert np.allclose(result.hu, subject.series.hu, atol=1e-3)


def test_missing_study_exits_2(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nope.nii.gz"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
