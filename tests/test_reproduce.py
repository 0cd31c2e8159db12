"""``ctperf reproduce`` and ``ctperf demo --neural``: the paper's experiment as one resumable run.

The end-to-end runs use small phantoms of 64 px: at 32-48 px the automatic AIF selection (and
even the phantom's artery mask) finds no artery in some subjects, so the NLR references could not
be computed. Training is one epoch of a tiny network: these tests check the plumbing (layout,
folds, reruns), not the network's accuracy (docs/reproduce.md has measured figures).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.workflow.phantoms import generate_cohort
from ctperf.workflow.reproduce import (
    NeuralDemoOptions,
    ReproduceOptions,
    reproduce_cohort,
    run_neural_demo,
)

TINY_PHANTOM = {"size": 64, "slices": 2, "frames": 32, "frame_interval": 1.5, "motion": "none",
                "anatomy": "procedural", "dicom": False}
SUBJECTS = 6


def _tiny_config():
    from ctperf.model import PRESETS

    return replace(PRESETS["cpu"], epochs=1, width=4, depth=2, device="cpu")


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file()}


def test_a_folder_that_is_no_cohort_is_refused(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["reproduce", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "neither phantom subjects" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_more_folds_than_subjects_is_refused_before_any_work(tmp_path: Path, capsys):
    """3 folds of a 2-subject cohort: one line, exit 2, before the preprocessing and the
    references (it had been refused at the cross-validation, after both), nothing written."""
    for i in range(2):  # only the layout is read: the studies are never opened
        (tmp_path / "cohort" / f"sub-{i:04d}").mkdir(parents=True)
        (tmp_path / "cohort" / f"sub-{i:04d}" / "study.nii.gz").write_bytes(b"")
    assert main(["reproduce", str(tmp_path / "cohort"), str(tmp_path / "out")]) == 2
    assert "folds must be 2 to 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_inside_the_cohort_and_other_settings_are_refused(tmp_path: Path):
    cohort = tmp_path / "cohort"
    (cohort / "sub-0000").mkdir(parents=True)
    (cohort / "sub-0000" / "study.nii.gz").write_bytes(b"")  # never read: refused first
    before = _tree(cohort)
    with pytest.raises(InputError, match="lies inside the input"):
        reproduce_cohort(cohort, cohort / "run", _tiny_config(), ReproduceOptions())
    out = tmp_path / "out"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps({"settings": {"layout": "phantom"}}))
    with pytest.raises(InputError, match=r"other settings \(reproduce.json: .*config\.epochs"):
        reproduce_cohort(cohort, out, _tiny_config(), ReproduceOptions())
    # a finished run continued on another cohort mixed two cohorts' maps (exit 0)
    (out / "reproduce.json").write_text(json.dumps({"cohort_id": "0" * 16, "settings": {}}))
    with pytest.raises(InputError, match="another cohort"):
        reproduce_cohort(cohort, out, _tiny_config(), ReproduceOptions())
    assert _tree(cohort) == before


@pytest.mark.slow
def test_reproduce_on_a_phantom_cohort_end_to_end(tmp_path: Path):
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, subjects=SUBJECTS, seed=5, **TINY_PHANTOM)
    before = _tree(cohort)
    out = tmp_path / "run"
    options = ReproduceOptions(targets=("cbv", "cbf", "tmax"), register=False, workers=1,
                               device="cpu")
    lines: list[str] = []
    outcome = reproduce_cohort(cohort, out, _tiny_config(), options, echo=lines.append)
    steps = [line[:5] for line in lines if line.startswith("[")]
    assert steps == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    # the preset's 44 frames exceed the studies' 32: the networks take all 32
    assert any("the networks take 32" in line for line in lines)
    record = json.loads((out / "reproduce.json").read_text())
    assert record["settings"]["config"]["frames"] == TINY_PHANTOM["frames"]
    assert outcome.computed == ("preprocessing", "references", "cross-validation",
                                "prediction", "evaluation")
    # the layout: maps cohorts as `ctperf maps` writes them, the cohort linked, a report
    names = [f"sub-{i:04d}" for i in range(SUBJECTS)]
    for reader in ("nlr", "cnn"):
        for name in names:
            folder = out / reader / name
            assert {"cbf.nii.gz", "tmax.nii.gz", "summary.json", "overview.png"} <= {
                p.name for p in folder.iterdir()}
            assert {"core.nii.gz", "hypoperfused.nii.gz", "brain.nii.gz"} <= {
                p.name for p in (folder / "lesions").iterdir()}
    assert (out / "cohort").resolve() == cohort.resolve()
    assert (out / "report.html").stat().st_size > 10_000
    assert _tree(cohort) == before  # the cohort is only read
    # every subject was predicted by the fold model that validated on it, never trained on it
    record = json.loads((out / "folds.json").read_text())
    assert sorted(record["subject_fold"]) == names
    assert sorted(p for f in record["folds"] for p in f["validation"]) == names
    from ctperf.model import load_checkpoint

    for name in names:
        fold = record["subject_fold"][name]
        summary = json.loads((out / "cnn" / name / "summary.json").read_text())
        assert summary["method"] == "unet" and summary["fold"] == fold
        assert summary["checkpoints"] == [f"cv/{t}/fold-{fold}/model.pt"
                                          for t in ("cbv", "cbf", "tmax")]
        for checkpoint in summary["checkpoints"]:
            cfg = load_checkpoint(out / checkpoint)["config"]
            assert name in cfg["val_patients"] and name not in cfg["train_patients"]
    assert set(outcome.agreement["maps"]) == {"cbv", "cbf", "tmax"}
    assert "hypoperfused" in outcome.agreement["lesions"]
    # a rerun computes nothing and rewrites nothing (the cohort manifests are saved again,
    # with the same rows)
    def results() -> dict[str, int]:
        return {k: v for k, v in _tree(out).items() if not k.endswith("manifest.json")}

    written = results()
    again = reproduce_cohort(cohort, out, _tiny_config(), options)
    assert again.computed == () and again.subject_fold == outcome.subject_fold
    assert results() == written
    assert again.agreement == outcome.agreement


@pytest.mark.slow
def test_neural_demo_generates_its_cohort_inside_out(tmp_path: Path):
    out = tmp_path / "demo"
    options = NeuralDemoOptions(subjects=SUBJECTS, size=64, slices=2, frames=60, seed=5,
                                epochs=1, reproduce=ReproduceOptions(
                                    targets=("cbv",), register=False, workers=1,
                                    device="cpu"))
    outcome = run_neural_demo(out, options)
    assert (out / "cohort" / "sub-0005" / "study.nii.gz").exists()
    assert not (out / "cohort").is_symlink()
    assert set(outcome.agreement["maps"]) == {"cbv"}
    assert outcome.report.exists() and sorted(outcome.subject_fold) == [
        f"sub-{i:04d}" for i in range(SUBJECTS)]


@pytest.mark.slow
def test_reproduce_on_a_unitobrain_folder(tmp_path: Path, rng):
    from test_unitobrain import make_patient

    root = tmp_path / "unitobrain"
    patients = ("MOL-001", "MOL-002", "MOL-003")
    for patient in patients:
        make_patient(root, rng, patient)
    before = _tree(root)
    # the fake studies have 4 frames of 8 x 10 pixels: a network that takes them
    config = replace(_tiny_config(), frames=4, size=16, baseline_frames=1)
    out = tmp_path / "run"
    outcome = reproduce_cohort(root, out, config, ReproduceOptions(workers=1, device="cpu"))
    assert sorted(outcome.subject_fold) == list(patients)
    assert set(outcome.agreement["maps"]) == {"cbv", "cbf", "ttp"}
    for patient in patients:
        assert {"cbv.nii.gz", "cbf.nii.gz", "ttp.nii.gz", "summary.json"} <= {
            p.name for p in (out / "cnn" / patient).iterdir()}
        assert (out / "nlr" / patient / "delay.nii.gz").exists()  # the dataset's own maps
    assert not (out / "preprocessed").exists() and not (out / "cohort").exists()
    assert (out / "report.html").exists() and _tree(root) == before


def test_the_reference_the_network_learns_is_checked_and_recorded(tmp_path: Path):
    from ctperf.errors import ValidationError
    from ctperf.workflow.reproduce import _settings

    with pytest.raises(ValidationError, match="reference"):
        ReproduceOptions(reference="rapid")
    config = _tiny_config()
    # runs made before the option existed learned the NLR maps: their records stay valid
    assert "reference" not in _settings("phantom", config, ReproduceOptions())["options"]
    truth = _settings("phantom", config, ReproduceOptions(reference="truth"))
    assert truth["options"]["reference"] == "truth"
    # likewise the loss: MSE runs keep their records, an L1 run is another run
    mse = _settings("phantom", replace(config, loss="mse"), ReproduceOptions())
    assert "loss" not in mse["config"]
    l1 = _settings("phantom", replace(config, loss="l1"), ReproduceOptions())
    assert l1["config"]["loss"] == "l1"


def test_training_compute_counts_slices_networks_and_stages(tmp_path: Path):
    import nibabel as nib
    import numpy as np

    from ctperf.commands.reproduce import _paper_estimate
    from ctperf.model import PRESETS, unet_flops
    from ctperf.workflow.reproduce import training_compute

    cohort = tmp_path / "cohort"
    for i, slices in enumerate((3, 3, 2)):  # header-only reads: the voxels are never used
        (cohort / f"sub-{i:04d}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((32, 32, slices, 20), np.int16), np.eye(4)),
                 cohort / f"sub-{i:04d}" / "study.nii.gz")
    paper = PRESETS["paper"]
    c = training_compute(cohort, paper, ReproduceOptions(folds=2))
    assert (c["slices"], c["training_slices"], c["networks"]) == (8, 4.0, 2 * 4)
    arch = {"in_frames": 20, "width": 64, "depth": 5, "kernel_size": 2}
    # forward and backward: 3 forward passes per training slice and epoch, both stages
    one = 3 * 4.0 * (50 * unet_flops(size=32, **arch) + 250 * unet_flops(size=128, **arch))
    assert c["flops_per_network"] == pytest.approx(one)
    assert c["flops"] == pytest.approx(8 * one)
    shared = training_compute(cohort, paper, ReproduceOptions(folds=2, per_map=False))
    assert shared["networks"] == 2  # one network with four outputs per fold
    assert shared["flops_per_network"] > c["flops_per_network"]
    cpu = training_compute(cohort, PRESETS["cpu"], ReproduceOptions(folds=2))
    assert cpu["flops_per_network"] < c["flops_per_network"] / 100  # no pretraining, narrow
    line = _paper_estimate(cohort, paper, ReproduceOptions(folds=2))
    assert line.startswith("expected time (paper preset, a GPU job): 8 networks") and "min" in line


def test_runs_on_one_unitobrain_cohort_share_its_slice_cache(tmp_path: Path, rng):
    """A UniToBrain cohort brings its own reference maps: the name of a cache shared by two runs
    had held each run's own (unused) references folder, so each built its own copy."""
    from ctperf.workflow.training import TrainingOptions, prepare_training
    from test_unitobrain import make_patient

    root = tmp_path / "unitobrain"
    for patient in ("MOL-001", "MOL-002"):
        make_patient(root, rng, patient)
    config = replace(_tiny_config(), frames=4, size=16, baseline_frames=1)
    options = TrainingOptions(cache=tmp_path / "shared")
    first, _, _ = prepare_training(root, tmp_path / "run1", config, options)
    second, _, _ = prepare_training(root, tmp_path / "run2", config, options)
    assert first.path == second.path and len(list((tmp_path / "shared").iterdir())) == 1


def test_unitobrain_patients_without_a_target_map_are_named_before_training(tmp_path: Path,
                                                                             rng):
    """A patient without its NLR_TTP folder had been named only after the other maps'
    networks were trained (reproduce) or the slice cache built (train, cv), one patient per
    run; every gap is now named at once, before either."""
    import shutil

    from ctperf.workflow.training import TrainingOptions, train_cohort
    from test_unitobrain import make_patient

    root = tmp_path / "unitobrain"
    for patient in ("MOL-001", "MOL-002", "MOL-003"):
        make_patient(root, rng, patient)
    shutil.rmtree(root / "MOL-002_Registered_Filtered_3mm_20HU_Maps" / "NLR_TTP")
    shutil.rmtree(root / "MOL-003_Registered_Filtered_3mm_20HU_Maps" / "NLR_CBV")
    config = replace(_tiny_config(), frames=4, size=16, baseline_frames=1)
    out = tmp_path / "run"
    with pytest.raises(InputError) as err:
        reproduce_cohort(root, out, config, ReproduceOptions(workers=1, device="cpu",
                                                             per_map=True))
    assert "MOL-002: ttp" in str(err.value) and "MOL-003: cbv" in str(err.value)
    assert not list(out.rglob("*.pt")) and not (out / "cache").exists()
    with pytest.raises(InputError) as err:
        train_cohort(root, tmp_path / "train", replace(config, targets=("cbv", "cbf", "ttp")),
                     TrainingOptions())
    assert "MOL-002: NLR_TTP" in str(err.value) and "MOL-003: NLR_CBV" in str(err.value)
    assert not (tmp_path / "train").exists()
    with pytest.raises(InputError, match="no tmax maps"):
        train_cohort(root, tmp_path / "tmax", replace(config, targets=("tmax",)),
                     TrainingOptions())


def test_references_written_again_identical_keep_the_networks(tmp_path: Path, rng):
    """Another ctperf version writes a UniToBrain cohort's references again (the dataset's
    maps, byte for byte the same): its networks had been deleted and trained again from
    scratch; they are kept. References that change still retrain."""
    from test_unitobrain import make_patient

    root = tmp_path / "unitobrain"
    for patient in ("MOL-001", "MOL-002", "MOL-003"):
        make_patient(root, rng, patient)
    config = replace(_tiny_config(), frames=4, size=16, baseline_frames=1)
    out = tmp_path / "run"
    options = ReproduceOptions(workers=1, device="cpu")
    reproduce_cohort(root, out, config, options)
    models = {p: p.stat().st_mtime_ns for p in out.rglob("model.pt")}
    assert models

    def another_version() -> None:
        manifest = out / "nlr" / "manifest.json"
        doc = json.loads(manifest.read_text())
        for row in doc["studies"].values() if isinstance(doc["studies"], dict) else \
                doc["studies"]:
            row["ctperf_version"] = "0.0.1"
        manifest.write_text(json.dumps(doc))

    another_version()
    again = reproduce_cohort(root, out, config, options)
    assert "references" in again.computed and "cross-validation" not in again.computed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.pt")} == models
    # a dataset map changed: the references differ, and the networks are trained again
    cbf = root / "MOL-001_Registered_Filtered_3mm_20HU_Maps" / "NLR_CBF"
    first = sorted(cbf.iterdir())[0]
    import pydicom

    ds = pydicom.dcmread(first)
    ds.RescaleIntercept = float(getattr(ds, "RescaleIntercept", 0.0)) + 1.0
    ds.save_as(first)
    another_version()
    third = reproduce_cohort(root, out, config, options)
    assert "cross-validation" in third.computed
