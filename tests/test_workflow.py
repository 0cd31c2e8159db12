"""ctperf.workflow: the per-study functions a CLI command (or a cohort runner) calls."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import ctperf
from ctperf.errors import InputError
from ctperf.io import read_maps, write_series_nifti, write_volume
from ctperf.lesion_options import LesionOptions
from ctperf.versioning import software_version
from ctperf.workflow import (
    MapsOptions,
    PredictOptions,
    PreprocessOptions,
    analyse_study,
    maps_study,
    preprocess_study,
)
from test_perfusion_pipeline import synthetic_study

SRC = Path(ctperf.__file__).resolve().parent  # the package tested, installed or not


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    series, truth = synthetic_study(np.random.default_rng(5), noise=2.0, size=40)
    folder = tmp_path_factory.mktemp("study")
    path = folder / "study.nii.gz"
    write_series_nifti(series, path)
    write_volume(truth["artery"], series.affine, folder / "aif.nii.gz")
    return path, series, truth


def test_stages_never_import_the_workflow():
    # data flows one way: the workflow sits above io, preprocess, perfusion, model, reporting
    offenders: list[str] = []
    read = 0
    for package in ("io", "preprocess", "perfusion", "model", "reporting", "evaluation",
                    "phantom"):
        for path in (SRC / package).rglob("*.py"):
            read += 1
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.name}: {n}" for n in names
                              if n.startswith(("ctperf.workflow", "ctperf.commands"))]
    assert read > 50 and offenders == []


def test_options_and_study_functions_travel_to_other_processes():
    # a cohort runner pickles the function and its options to send them to workers
    options = MapsOptions(method="bsvd", register=True, brain_mask=Path("b.nii.gz"))
    assert pickle.loads(pickle.dumps(options)) == options
    assert pickle.loads(pickle.dumps(maps_study)) is maps_study
    assert pickle.loads(pickle.dumps(PredictOptions(model=Path("m.pt")))).batch_size == 4
    with pytest.raises(AttributeError):
        options.method = "nlr"  # type: ignore[misc]  # frozen: one run, one set of options


def test_maps_study_writes_what_the_command_writes(study, tmp_path):
    path, _, _ = study
    out = tmp_path / "maps"
    aif = path.parent / "aif.nii.gz"
    outcome = maps_study(path, out, MapsOptions(method="bsvd", aif_mask=aif))
    assert outcome.out == out and "hypoperfused" in outcome.message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "bsvd" and summary["aif"]["source"] == "mask"
    assert summary["preprocessed"] is False
    assert outcome.summary["volumes_ml"] == summary["lesions"]["volumes_ml"]
    assert (out / "overview.png").exists() and (out / "lesions" / "core.nii.gz").exists()
    # the AIF given: the VOF's voxels, chosen automatically, are drawn
    assert "voxels_zyx" in summary["vof"] and (out / "vessels.png").exists()
    assert not any(p.name.startswith(".ctperf-tmp") for p in tmp_path.iterdir())
    # the same numbers as the library called directly on the series read back from disk
    from ctperf.io import read_mask, read_study

    again = read_study(path)
    direct, motion = analyse_study(
        again, method="bsvd", register=False, filter=False,
        aif_mask=read_mask(aif, shape=again.shape[1:], affine=again.affine),
        lesion_options=LesionOptions())
    assert motion is None
    written = read_maps(out)
    for name in ("cbf", "cbv", "tmax"):
        # float32 maps written and read back unchanged: bit-identical
        np.testing.assert_array_equal(written[name], direct.maps[name])


def test_maps_of_a_preprocessed_study_say_it_was_preprocessed(study, tmp_path):
    """Maps of a study that ``ctperf preprocess`` filtered: ``summary.json`` says so (from the
    study's own record), not "not preprocessed"."""
    path, _, _ = study
    pre = tmp_path / "pre"
    preprocess_study(path, pre, PreprocessOptions(register=False, filter=True))
    maps_study(pre / "study.nii.gz", tmp_path / "maps",
               MapsOptions(method="bsvd", aif_mask=path.parent / "aif.nii.gz"))
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert summary["preprocessed"] is True and summary["filtered"] is True
    assert summary["registered"] is False
    assert summary["preprocessed_before"] == {"registered": False, "filtered": True}
    # the earlier filter's settings and where the vessels were searched (a two-step run had
    # read "filter": null, and nothing said its AIF came from filtered voxels)
    assert summary["filter"]["range_sigma_hu"] == 20.0
    assert summary["vessels_searched_on"] == "the study filtered before"
    # filtered again: both filters' settings, and the vessels still on the once-filtered study
    maps_study(pre / "study.nii.gz", tmp_path / "twice",
               MapsOptions(method="bsvd", filter=True, range_sigma_hu=10.0,
                           aif_mask=path.parent / "aif.nii.gz"))
    twice = json.loads((tmp_path / "twice" / "summary.json").read_text())
    assert twice["filter"]["range_sigma_hu"] == 10.0
    assert twice["filter_before"]["range_sigma_hu"] == 20.0
    assert twice["vessels_searched_on"] == "the study filtered before"
    # preprocessed again with registration only: the earlier filtering stays on the record
    preprocess_study(pre / "study.nii.gz", tmp_path / "pre2",
                     PreprocessOptions(register=True, filter=False))
    side = json.loads((tmp_path / "pre2" / "study.json").read_text())
    assert side["meta"]["preprocess"]["registered"] and side["meta"]["preprocess"]["filtered"]
    for record in ("transforms.json", "qc.json"):
        assert json.loads((pre / record).read_text())["software_version"] == software_version()


def test_study_functions_check_the_output_before_reading(study, tmp_path):
    path, _, _ = study
    with pytest.raises(InputError, match="input"):
        maps_study(path, path.parent, MapsOptions())  # OUT holds the study
    with pytest.raises(InputError, match="input"):
        preprocess_study(path, path.parent, PreprocessOptions())
    assert sorted(p.name for p in path.parent.iterdir()) == ["aif.nii.gz", "study.json",
                                                              "study.nii.gz"]


@pytest.mark.parametrize("method, filtered", [("nlr-fast", True), ("bsvd", True),
                                              ("bayes", False)])
def test_the_filter_by_default_follows_the_method(study, monkeypatch, caplog, method,
                                                  filtered):
    """The paper's bilateral filter runs unless told for the box model and the SVD methods, not
    for bayes, whose spatial prior pools the neighbours itself (docs/bayes.md, "Filtered
    studies"); an explicit choice wins either way, with a warning for bayes."""
    import ctperf.workflow.analysis as analysis

    _, series, _ = study
    calls = []
    monkeypatch.setattr(analysis, "_filter", lambda s, **kw: calls.append(1) or s.replace(
        meta={**s.meta, "bilateral": kw}))  # as the filter records its settings
    from ctperf.perfusion.maps import PerfusionResult
    from ctperf.types import PerfusionMaps

    options: dict = {}

    def fake_run(s, **kw):
        options.clear()
        options.update(kw)
        return PerfusionResult(maps=PerfusionMaps(maps={"cbf": np.zeros((1, 2, 2))},
                                                  affine=np.eye(4)),
                               lesions=None, brain=None, vessels=None, aif=None, vof=None,
                               times=None)

    monkeypatch.setattr("ctperf.perfusion.run_perfusion", fake_run)
    result, _ = analyse_study(series, method=method, register=False)
    assert bool(calls) is filtered
    assert result.maps.provenance["filtered"] is filtered  # and the summary says so
    # the vessels come from the unfiltered study only where a filter ran
    assert ("vessel_series" in options) is filtered
    assert "filtered study" not in caplog.text
    calls.clear()
    analyse_study(series, method=method, register=False, filter=not filtered)
    assert bool(calls) is not filtered
    assert ("filtered study" in caplog.text) is not filtered


def test_a_failed_mapping_names_the_frames_registration_left(study, monkeypatch):
    """Frames moved beyond what registration corrects are left as they are; when the maps
    then fail (a 40 mm jerk put skull into the artery, and its curve read as a bolus begun
    before the scan), the error names those frames first, not only the symptom."""
    import types

    import ctperf.workflow.analysis as analysis
    from ctperf.errors import ValidationError

    _, series, _ = study
    moved = np.zeros(series.n_frames)
    moved[[10, 12]] = [17.9, 39.7]
    motion = types.SimpleNamespace(series=series, displacement_mm=np.zeros(series.n_frames),
                                   uncorrected_mm=moved)
    monkeypatch.setattr(analysis, "_register", lambda s, **kw: motion)

    def refuse(s, **kw):
        raise ValidationError("the arterial bolus had begun before the first frame")

    monkeypatch.setattr("ctperf.perfusion.run_perfusion", refuse)
    with pytest.raises(ValidationError, match=r"^frames 10, 12 \(from 0\) moved by "
                                              r"17\.9-39\.7 mm.*bolus had begun"):
        analyse_study(series, method="bsvd", register=True, filter=False)
    motion.uncorrected_mm = np.zeros(series.n_frames)  # nothing left: the error as it was
    with pytest.raises(ValidationError, match=r"^the arterial bolus"):
        analyse_study(series, method="bsvd", register=True, filter=False)
