"""``ctperf train``/``cv`` options: a preset as the base configuration, explicit options over it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctperf.cli import build_parser
from ctperf.commands import train as train_command
from ctperf.errors import InputError, ValidationError
from ctperf.model import PRESETS
from ctperf.workflow.training import (
    TrainingOptions,
    held_out_patients,
    prepare_training,
    split_patients,
)


def _args(command: str, *extra: str):
    return build_parser().parse_args([command, "cohort", "out", *extra])


def test_command_knows_the_library_presets():
    # the command lists the names without importing torch; they must not drift apart
    assert set(train_command.PRESETS) == set(PRESETS)


@pytest.mark.parametrize("command", ["train", "cv"])
def test_default_is_the_paper_preset(command):
    config = train_command.train_config(_args(command))
    assert config == replace(PRESETS["paper"], device="auto", amp="auto", seed=0)


def test_explicit_options_override_the_preset():
    args = _args("train", "--preset", "cpu", "--width", "20", "--no-augment",
                 "--whole-slice-loss", "--target", "cbf", "ttp", "--batch-size", "3",
                 "--lr", "0.01", "--device", "cuda:1", "--seed", "7")
    config = train_command.train_config(args)
    assert config == replace(PRESETS["cpu"], width=20, augment=False, masked_loss=False,
                             targets=("cbf", "ttp"), batch_size=3, lr=0.01, device="cuda:1",
                             seed=7)
    # options not given keep the preset's values, not the paper's
    assert (config.depth, config.schedule, config.size) == (4, "cosine", 64)


def test_frames_and_depth_are_checked_with_the_preset(capsys):
    """A probe's --frames 1 had ended in NumPy's traceback and --frames 2 or 3 in an error about
    baseline_frames, which it never set; --depth 50 asked for gigabytes (killed for memory)."""
    from ctperf.cli import main

    for extra, said in ((["--frames", "3"], "frames must be 7 or more (the 4 frames before"),
                        (["--depth", "50"], "depth must be 1 to 8")):
        assert main(["train", "cohort", "out", "--preset", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
    assert replace(PRESETS["paper"], frames=3).frames == 3  # no baseline frames: three do
    with pytest.raises(ValidationError, match="frames must be 3 or more, got 2"):
        replace(PRESETS["paper"], frames=2)
    # each level halves the slice (a probe's size 1 trained to a NaN validation loss, exit 0)
    with pytest.raises(ValidationError, match=r"\(--size\) must be 16 pixels or more .* depth 4"):
        replace(PRESETS["cpu"], size=8)
    with pytest.raises(ValidationError, match=r"\(--pretrain-size\) must be 32 pixels"):
        replace(PRESETS["paper"], pretrain_size=16)
    assert replace(PRESETS["cpu"], size=16).size == 16


def test_frame_interval_is_not_the_resampling_grid(capsys):
    # --frame-interval means "seconds between frames of a file without timing" everywhere;
    # the resampling grid of the slice cache has its own name
    with pytest.raises(SystemExit):
        _args("train", "--frame-interval", "1")
    assert _args("train", "--resample-interval", "1.5").resample_interval == 1.5
    # given without --frame-mode resample it had been ignored in silence
    with pytest.raises(ValidationError, match="give --frame-mode resample too"):
        train_command.training_options(_args("train", "--resample-interval", "1.5"))


def _fake_caches(monkeypatch) -> list[dict]:
    import ctperf.model

    calls: list[dict] = []

    def fake_cache(cohort: Path, root: Path, *, size, frames, **kw):
        calls.append({"root": Path(root), "size": size, "frames": frames, **kw})
        return SimpleNamespace(size=size or 256, n_frames=frames or 40)

    monkeypatch.setattr(ctperf.model, "build_slice_cache", fake_cache)
    return calls


def test_prepare_builds_the_caches_the_config_asks_for(monkeypatch, caplog, tmp_path):
    calls = _fake_caches(monkeypatch)
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    cohort.mkdir()
    args = _args("train", "--preset", "cpu", "--frame-mode", "resample",
                 "--resample-interval", "2", "--reference", "truth")
    _, pretrain, config = prepare_training(cohort, out, train_command.train_config(args),
                                           train_command.training_options(args))
    assert pretrain is None and len(calls) == 1
    assert (calls[0]["size"], calls[0]["frames"], calls[0]["frame_interval"]) == (
        64, PRESETS["cpu"].frames, 2.0)
    assert calls[0]["frame_mode"] == "resample"
    assert calls[0]["root"] == out / "cache"  # the default cache lies in OUT, not the cohort
    # the paper's pretraining at 128 px is skipped when the studies are smaller
    calls.clear()
    args = _args("train", "--size", "64", "--reference", "truth")
    _, pretrain, config = prepare_training(cohort, out, train_command.train_config(args),
                                           train_command.training_options(args))
    assert pretrain is None and config.pretrain_epochs == 0 and len(calls) == 1
    assert "pretraining skipped" in caplog.text
    calls.clear()
    args = _args("train", "--reference", "truth")  # studies' own: 256 px
    _, pretrain, config = prepare_training(cohort, out, train_command.train_config(args),
                                           train_command.training_options(args))
    assert pretrain is not None and [c["size"] for c in calls] == [None, 128]
    assert config.pretrain_epochs == PRESETS["paper"].pretrain_epochs and config.size == 256
    assert list(cohort.iterdir()) == []  # nothing written into the cohort


def test_nlr_references_go_to_out_and_a_given_cache_is_used(monkeypatch, tmp_path):
    calls = _fake_caches(monkeypatch)
    cohort, out, shared = tmp_path / "cohort", tmp_path / "out", tmp_path / "shared"
    cohort.mkdir()
    args = _args("train", "--preset", "cpu", "--cache", str(shared))
    prepare_training(cohort, out, train_command.train_config(args),
                     train_command.training_options(args))
    assert calls[0]["root"] == shared and calls[0]["references"] == out / "references"


@pytest.mark.parametrize("where", ["inside", "out", "cohort"])
def test_a_cache_in_the_cohort_or_equal_to_out_is_refused(monkeypatch, tmp_path, where):
    calls = _fake_caches(monkeypatch)
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    cohort.mkdir()
    cache = {"inside": cohort / ".cache", "out": out, "cohort": cohort}[where]
    with pytest.raises(InputError, match=r"is the output folder|lies inside the cohort"):
        prepare_training(cohort, out, PRESETS["cpu"],
                         TrainingOptions(reference="truth", cache=cache))
    assert calls == [] and list(cohort.iterdir()) == []


def test_validation_fraction_and_test_list_are_checked(tmp_path):
    with pytest.raises(ValidationError, match="validation fraction"):
        TrainingOptions(val_fraction=1.0)
    ids = tmp_path / "test.txt"
    ids.write_text("# held out\nsub-0002\n\nsub-0001\n")
    options = TrainingOptions(test_patients=("sub-0003",), test_list=ids)
    assert held_out_patients(options) == ["sub-0001", "sub-0002", "sub-0003"]
    train, val = split_patients([f"sub-{i:04d}" for i in range(10)], val_fraction=0.25, seed=0,
                                test_patients=held_out_patients(options))
    assert len(val) == 2 and len(train) == 5 and not set(train) & set(val)
    assert not {"sub-0001", "sub-0002", "sub-0003"} & set(train + val)


def test_a_held_out_id_that_names_no_patient_is_refused(tmp_path):
    """A mistyped id in the test list left its patient in training, and the "held-out" scores
    were on data the network had seen (exit 0): refused, naming the list and the id."""
    from ctperf.workflow.training import check_held_out

    ids = tmp_path / "test.txt"
    ids.write_text("sub-000\n")
    options = TrainingOptions(test_list=ids)
    patients = ["sub-0000", "sub-0001", "sub-0002"]
    with pytest.raises(InputError, match=r"test\.txt: held-out patient sub-000 not in the "
                                         r"cohort \(its patients: sub-0000, sub-0001, sub-0002"):
        check_held_out(held_out_patients(options), patients, options)
    with pytest.raises(InputError, match=r"--test: held-out patients sub-9, sub-x not in"):
        check_held_out(["sub-x", "sub-9"], patients, TrainingOptions())
    check_held_out(["sub-0001"], patients, options)  # a patient of the cohort: fine


@pytest.mark.parametrize("cohort_kind", ["missing", "empty"])
def test_a_cohort_that_is_not_one_leaves_no_output_folder(tmp_path, cohort_kind):
    """A wrong cohort path or an empty folder was refused, but left OUT with its marker and an
    empty cache behind; OUT is now made only once the cohort is there, and taken back when
    the refusal comes before anything was written in it."""
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    if cohort_kind == "empty":
        cohort.mkdir()
    with pytest.raises(InputError):
        prepare_training(cohort, out, PRESETS["cpu"], TrainingOptions(reference="truth"))
    assert not out.exists()
    out.mkdir()  # a folder the user made: left as it was, empty
    with pytest.raises(InputError):
        prepare_training(cohort, out, PRESETS["cpu"], TrainingOptions(reference="truth"))
    assert out.is_dir()


def test_references_a_caller_made_are_not_computed_again(monkeypatch, tmp_path):
    """`ctperf reproduce` computes and records its references itself (its method, with the
    summary its prediction reads); training on them must not refit them. In a copied run the
    studies looked newer than their references, training refitted them with plain nlr and no
    summary, and every prediction then failed."""
    import ctperf.workflow.references as references

    calls = _fake_caches(monkeypatch)
    refits: list[Path] = []
    monkeypatch.setattr(references, "nlr_references",
                        lambda cohort, out, **kw: refits.append(Path(out)) or Path(out))
    cohort, out, made = tmp_path / "cohort", tmp_path / "out", tmp_path / "nlr"
    cohort.mkdir()
    prepare_training(cohort, out, PRESETS["cpu"],
                     TrainingOptions(references=made, references_ready=True))
    assert refits == [] and calls[0]["references"] == made
    prepare_training(cohort, out, PRESETS["cpu"], TrainingOptions(references=made))
    assert refits == [made]  # a plain training run completes what is missing


def test_resuming_a_folder_with_nothing_to_resume_is_said(monkeypatch, tmp_path, caplog):
    """`train --resume` into a new (or mistyped) folder trained from the start in silence."""
    import ctperf.workflow.training as training

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(training, "prepare_training", stop)
    with pytest.raises(Stop):
        training.train_cohort(tmp_path / "cohort", tmp_path / "run", PRESETS["cpu"],
                              TrainingOptions(resume=True))
    assert "nothing to resume in" in caplog.text and "training from the start" in caplog.text


def test_a_run_that_cannot_be_continued_is_refused_before_any_cache(monkeypatch, tmp_path):
    """An older ctperf's run folder: `train` (with or without --resume) built a whole new slice
    cache beside the old one, then refused ("cache_version=2 vs 3", which no setting of the
    user's had changed). Both are refused before any work now, the second saying why."""
    import ctperf.model
    import ctperf.workflow.training as training

    def never(*args, **kwargs):
        raise AssertionError("the references and caches were computed")

    monkeypatch.setattr(training, "prepare_training", never)
    monkeypatch.setattr(ctperf.model, "load_checkpoint", lambda path: {
        "config": {"cache_version": 2}, "software_version": "0.1.0"})
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"old")
    with pytest.raises(InputError, match="already holds a training run"):
        training.train_cohort(tmp_path / "cohort", run, PRESETS["cpu"], TrainingOptions())
    with pytest.raises(InputError, match=r"made by ctperf 0.1.0 on slice caches of format 2; "
                                         r"this ctperf builds format 3"):
        training.train_cohort(tmp_path / "cohort", run, PRESETS["cpu"],
                              TrainingOptions(resume=True))
    (run / "fold-1").mkdir()
    (run / "last.pt").rename(run / "fold-1" / "last.pt")
    with pytest.raises(InputError, match="format 2"):
        training.cross_validate_cohort(tmp_path / "cohort", run, PRESETS["cpu"],
                                       TrainingOptions(resume=True), folds=2)
    assert sorted(p.name for p in run.iterdir()) == ["fold-1"]


def test_a_refusal_to_extend_a_finished_run_names_the_epochs():
    """A run resumed with more epochs was refused as "stages=[['train', 32, 3]] vs [['train',
    32, 5]]", the trainer's own names."""
    from ctperf.model.train import _difference

    assert _difference("stages", [["train", 32, 3]], [["train", 32, 5]]) == (
        "epochs: 3 epochs at 32 px vs 5 epochs at 32 px (a finished run is not extended)")


@pytest.mark.parametrize("command", ["train", "cv"])
def test_workers_bound_the_patients_read_into_the_caches(command):
    """The caches read up to 4 patients at once (each a study in memory): `train` and `cv` had
    no way to hold that down, as `reproduce --workers` does."""
    assert train_command.training_options(_args(command, "--workers", "1")).cache_workers == 1
    assert train_command.training_options(_args(command)).cache_workers is None
