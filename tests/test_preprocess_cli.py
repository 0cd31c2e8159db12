"""``ctperf preprocess``: outputs on a small moving head, and clean errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctperf.cli import main
from ctperf.io import read_nifti_series, write_series_nifti


@pytest.fixture(scope="module")
def moving_head(tmp_path_factory):
    """A small moving head (the synthetic head of test_registration, seconds to make)."""
    from test_registration import moving_study

    motion = np.zeros((8, 6))
    motion[:, 2] = np.linspace(0, 4, 8)  # rotation about z up to 4 degrees
    motion[:, 3] = np.linspace(0, 3, 8)  # shift up to 3 mm
    series, _ = moving_study(np.random.default_rng(7), motion, shape=(4, 64, 64),
                             spacing=(5.0, 3.0, 3.0))
    path = tmp_path_factory.mktemp("study") / "study.nii.gz"
    write_series_nifti(series, path)
    return series, path


def test_preprocess_writes_outputs(moving_head, tmp_path, capsys):
    series, path = moving_head
    out = tmp_path / "out"
    assert main(["preprocess", str(path), str(out), "--workers", "2"]) == 0
    for name in ("study.nii.gz", "study.json", "transforms.json", "qc.json", "qc.png"):
        assert (out / name).is_file(), name
    result = read_nifti_series(out / "study.nii.gz")
    assert result.shape == series.shape
    assert np.allclose(result.times, series.times)
    assert np.allclose(result.affine, series.affine)
    transforms = json.loads((out / "transforms.json").read_text())
    params = np.asarray(transforms["parameters"])
    assert params.shape == (8, 6) and np.all(params[0] == 0)
    qc = json.loads((out / "qc.json").read_text())
    assert len(qc["displacement_mm"]) == 8
    # the filter must lower the frame-to-frame noise inside the brain
    assert qc["noise_sd_hu_after"] < qc["noise_sd_hu_before"]
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_preprocess_no_steps_copies_study(moving_head, tmp_path, capsys):
    series, path = moving_head
    out = tmp_path / "plain"
    assert main(["preprocess", str(path), str(out), "--no-register", "--no-filter",
                 "--dicom"]) == 0
    result = read_nifti_series(out / "study.nii.gz")
    assert len(list((out / "dicom").rglob("*.dcm"))) == series.hu.shape[0] * series.hu.shape[1]
    # nothing registered, so no motion measured: null, not 0 mm (the head moves)
    qc = json.loads((out / "qc.json").read_text())
    assert qc["displacement_mm"] is None and qc["max_mean_displacement_mm"] is None
    assert "not registered: motion not measured" in capsys.readouterr().out
    # float32 NIfTI round trip of the unchanged study
    assert np.allclose(result.hu, series.hu, atol=1e-3)


@pytest.mark.parametrize("command", ["preprocess", "maps"])
def test_options_of_a_step_left_off_are_refused(moving_head, tmp_path, capsys, command):
    """The filter's settings without the filter, or --anonymise without a DICOM copy, had been
    accepted and ignored: a researcher asking for sigma 5 mm could believe the study filtered."""
    _, path = moving_head
    for extra, said in ((["--no-filter", "--spatial-sigma", "5"], "--spatial-sigma sets the "
                         "bilateral filter, which is off"),
                        (["--no-filter", "--range-sigma", "40", "--filter-weights", "quadratic"],
                         "--range-sigma, --filter-weights set the bilateral filter"),
                        (["--anonymise"], "--anonymise de-identifies the DICOM copy: give "
                                          "--dicom too")):
        out = tmp_path / "o"
        assert main([command, str(path), str(out), "--no-register", *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("args", [
    ["demo", "--method", "bayes", "--range-sigma", "40"],  # bayes does not filter unless told
    ["demo", "--no-filter", "--spatial-sigma", "5"],
    ["demo", "--neural", "--no-filter", "--filter-weights", "quadratic"],
    ["reproduce", "cohort", "--no-filter", "--spatial-sigma", "5"]])
def test_demo_and_reproduce_refuse_filter_settings_without_the_filter(tmp_path, capsys, args):
    """The demos and the paper's experiment had ignored them too; refused before any work."""
    out = tmp_path / "o"
    assert main([*args, str(out)]) == 2
    err = capsys.readouterr().err
    assert "the bilateral filter, which is off: give --filter too" in err
    assert "Traceback" not in err and not out.exists()


def test_the_api_refuses_filter_settings_without_the_filter(tmp_path):
    """The options of the Python API refuse them as the command line does, by their names."""
    from ctperf.errors import ValidationError
    from ctperf.workflow import (
        DemoOptions,
        MapsOptions,
        PredictOptions,
        PreprocessOptions,
        ReproduceOptions,
        write_maps_outputs,
    )

    for make in (lambda: MapsOptions(range_sigma_hu=40.0),  # maps do not filter unless told
                 lambda: PreprocessOptions(filter=False, spatial_sigma_mm=5.0),
                 lambda: DemoOptions(method="bayes", filter_weights="quadratic"),
                 lambda: ReproduceOptions(filter=False, range_sigma_hu=40.0)):
        with pytest.raises(ValidationError, match="which is off: set filter=True too"):
            make()
    # --anonymise without a DICOM copy likewise, in a command's options and when writing maps
    for make in (lambda: MapsOptions(anonymise=True), lambda: PredictOptions(
            model="m.pt", anonymise=True), lambda: PreprocessOptions(anonymise=True)):
        with pytest.raises(ValidationError, match="set dicom=True too"):
            make()
    with pytest.raises(ValidationError, match="give the dicom_source"):
        write_maps_outputs(None, tmp_path / "maps", anonymise=True)
    assert not (tmp_path / "maps").exists()
    # with the filter on, or the settings left at their defaults, nothing is refused
    MapsOptions(filter=True, range_sigma_hu=40.0, dicom=True, anonymise=True)
    DemoOptions(spatial_sigma_mm=5.0)  # nlr-fast filters by default
    ReproduceOptions(filter=False)


def test_missing_study_exits_2(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nope.nii.gz"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_preprocess_range_sigma_option(moving_head, tmp_path):
    _, path = moving_head
    noise = {}
    for sigma in ("5", "40"):
        out = tmp_path / f"s{sigma}"
        assert main(["preprocess", str(path), str(out), "--no-register",
                     "--range-sigma", sigma]) == 0
        noise[sigma] = json.loads((out / "qc.json").read_text())["noise_sd_hu_after"]
        sidecar = json.loads((out / "study.json").read_text())
        bilateral = sidecar["meta"]["bilateral"]  # what the filter ran, as it records it
        assert bilateral["range_sigma_hu"] == float(sigma)
        assert bilateral["filter_weights"] == "linear"
    # a wider range kernel averages more neighbours: less noise left
    assert noise["40"] < noise["5"]
    out = tmp_path / "quadratic"
    assert main(["preprocess", str(path), str(out), "--no-register",
                 "--filter-weights", "quadratic"]) == 0
    sidecar = json.loads((out / "study.json").read_text())
    assert sidecar["meta"]["bilateral"]["filter_weights"] == "quadratic"
