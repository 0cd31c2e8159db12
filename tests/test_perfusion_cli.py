"""``ctperf maps`` on a small synthetic study written as NIfTI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ctperf.cli import main
from ctperf.io import write_series_nifti, write_volume
from test_perfusion_pipeline import synthetic_study


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    series, truth = synthetic_study(np.random.default_rng(3), noise=3.0, size=48)
    folder = tmp_path_factory.mktemp("study")
    path = folder / "study.nii.gz"
    write_series_nifti(series, path)
    return path, series, truth


def _maps_with_aif_mask(study_file, tmp_path, method: str):
    """``ctperf maps`` on the study with the true artery as the AIF mask; returns OUT."""
    path, series, truth = study_file
    out = tmp_path / "out"
    aif_mask = tmp_path / "aif.nii.gz"
    write_volume(truth["artery"], series.affine, aif_mask)
    assert main(["maps", str(path), str(out), "--method", method,
                 "--aif-mask", str(aif_mask)]) == 0
    return out


def test_maps_cli_writes_everything(study_file, tmp_path, capsys):
    series = study_file[1]
    out = _maps_with_aif_mask(study_file, tmp_path, "bsvd")
    for name in ("cbf", "cbv", "mtt", "ttp", "tmax", "delay"):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == series.shape[:0:-1]  # (X, Y, Z) on disk
    for name in ("core", "hypoperfused", "penumbra", "tmax10", "brain", "vessels"):
        assert (out / "lesions" / f"{name}.nii.gz").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "bsvd"
    assert summary["aif"]["source"] == "mask"
    # the masks given are recorded (by count and digest, not by a path that may name the
    # patient): with and without one, summaries had been alike
    truth = study_file[2]
    given = summary["masks_given"]
    assert list(given) == ["aif_mask"] and given["aif_mask"]["voxels"] == truth["artery"].sum()
    assert len(given["aif_mask"]["sha256"]) == 64
    assert summary["constants"] == {"rho_g_per_ml": 1.04, "kh": 0.733}
    assert summary["lesions"]["volumes_ml"]["hypoperfused"] > 0
    assert (out / "overview.png").stat().st_size > 10_000
    assert not (out / "uncertainty.png").exists()           # no SD maps, no figure of them
    assert "hypoperfused" in capsys.readouterr().out


def test_maps_cli_bayes_writes_uncertainty(study_file, tmp_path, capsys):
    """``--method bayes`` writes an SD map beside each map it estimates, in the map's units,
    a figure of them, and lesion volumes with their SDs in ``summary.json`` and on the
    terminal."""
    out = _maps_with_aif_mask(study_file, tmp_path, "bayes")
    for name, unit in (("cbf", "mL/100g/min"), ("cbv", "mL/100g"), ("mtt", "s"), ("tmax", "s")):
        sd = np.asanyarray(nib.load(out / f"{name}_sd.nii.gz").dataobj)
        value = np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj)
        inside = np.isfinite(value)
        assert sd.shape == value.shape and np.all(np.isfinite(sd[inside]))
        assert np.all(sd[inside] >= 0) and np.median(sd[inside]) > 0
        assert unit in (out / f"{name}_sd.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "bayes"
    assert set(summary["lesions"]["volumes_sd_ml"]) >= {"core", "hypoperfused"}
    assert "+-" in capsys.readouterr().out
    assert (out / "uncertainty.png").stat().st_size > 10_000


def test_maps_cli_rejects_mask_on_another_grid(study_file, tmp_path, capsys):
    path, series, _ = study_file
    bad = tmp_path / "aif.nii.gz"
    write_volume(np.ones((1, 8, 8), dtype=bool), series.affine, bad)
    assert main(["maps", str(path), str(tmp_path / "out"), "--aif-mask", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "aif.nii.gz" in err and "grid" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_maps_cli_unusable_device_is_a_clean_error(study_file, tmp_path, capsys):
    path, _, _ = study_file
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --device cuda is usable here")
    assert main(["maps", str(path), str(tmp_path / "out"), "--method", "nlr-fast",
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_maps_help_is_fast_and_lists_methods(capsys):
    with pytest.raises(SystemExit):
        main(["maps", "--help"])
    assert "nlr-fast" in capsys.readouterr().out


def _key_paths(record: dict, depth: int = 2) -> set[str]:
    """``a`` and ``a.b`` for the nested objects of a JSON record (qc's flags, units and the
    volumes by lesion are documented as tables of their own)."""
    paths = set()
    for key, value in record.items():
        paths.add(key)
        if isinstance(value, dict) and depth > 1 and key not in ("qc", "units"):
            paths |= {f"{key}.{k}" for k in _key_paths(value, depth - 1)}
    return paths


@pytest.mark.parametrize("method", ["bsvd", "bayes"])
def test_every_summary_key_is_documented(study_file, tmp_path, method):
    """docs/inputs.md describes summary.json: every key a run writes (two levels deep, and the
    lesion thresholds' three) is named there, so a key added to the record without a word for
    its users fails here. Automatic vessels and a filtered run for one method, given masks for
    the other, between them write every optional key but the notes."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "inputs.md").read_text(encoding="utf-8")
    section = page[page.index("## `summary.json` of `ctperf maps`"):]
    if method == "bayes":
        out = _maps_with_aif_mask(study_file, tmp_path, method)
    else:
        out = tmp_path / "out"
        assert main(["maps", str(study_file[0]), str(out), "--method", method,
                     "--register", "--filter"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    paths = _key_paths(summary) | {f"lesions.thresholds.{k}"
                                   for k in summary["lesions"]["thresholds"]}
    for path in sorted(paths):
        key = path.rsplit(".", 1)[-1]
        assert f"`{key}`" in section, f"summary.json key {path} is not in docs/inputs.md"
