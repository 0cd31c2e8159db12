"""Checkpoints that must not be predicted from: names that would be written outside the
output folder, outputs without a target, weights damaged or diverged; and a cohort whose
model file was replaced at the same path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctperf.errors import InputError
from ctperf.model import load_checkpoint, save_checkpoint
from ctperf.workflow.cohort import options_hash
from ctperf.workflow.study import PredictOptions, predict_study
from test_model_predict import trained  # noqa: F401 (the module's fixture)


def test_map_names_that_are_paths_are_refused(trained, tmp_path: Path):  # noqa: F811
    """A map name is a file name: '../../notes' had overwritten a user's notes.json beside
    the output folder, exit 0."""
    _, path = trained
    ckpt = load_checkpoint(path)
    for names, match in ((["../../notes", "delay"], "not maps ctperf writes"),
                         (["cbf"], "one target and one map name per output channel")):
        bad = tmp_path / "bad.pt"
        save_checkpoint({**ckpt, "config": {**ckpt["config"], "map_names": names}}, bad)
        with pytest.raises(InputError, match=match):
            load_checkpoint(bad)


def test_damaged_or_diverged_weights_are_refused(trained, tmp_path: Path):  # noqa: F811
    """Bytes changed inside a tensor load without complaint from torch (a probe's damaged file
    predicted CBV 0 in 99 % of the brain, exit 0): the digest written with the weights no
    longer matches. NaN weights written as such are refused too."""
    _, path = trained
    ckpt = load_checkpoint(path)
    assert "model_sha256" in ckpt
    name = next(iter(ckpt["model"]))
    damaged = {k: v.clone() for k, v in ckpt["model"].items()}
    damaged[name].view(-1)[0] += 1.0
    torch.save({**ckpt, "model": damaged}, tmp_path / "damaged.pt")  # the old digest kept
    with pytest.raises(InputError, match="differ from the digest"):
        load_checkpoint(tmp_path / "damaged.pt")
    damaged[name].view(-1)[0] = float("nan")
    save_checkpoint({**ckpt, "model": damaged}, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="NaN or infinite"):
        load_checkpoint(tmp_path / "nan.pt")
    legacy = {k: v for k, v in ckpt.items() if k != "model_sha256"}  # written before digests
    torch.save(legacy, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt")["config"] == ckpt["config"]


def test_a_model_replaced_at_its_path_changes_the_options(tmp_path: Path):
    model = tmp_path / "current.pt"
    model.write_bytes(b"first model")
    options = PredictOptions(model=model)
    before = options_hash(predict_study, options)
    assert options_hash(predict_study, options) == before
    model.write_bytes(b"a second, different model")
    assert options_hash(predict_study, options) != before


def test_a_scan_begun_earlier_than_the_training_scans_is_said(trained, caplog):  # noqa: F811
    """The network reads the bolus's timing from the frame index: the same study with three
    more frames before its bolus (8 s) is predicted with a warning, the study as trained
    without one."""
    import numpy as np

    from ctperf.io import read_nifti_series
    from ctperf.model import predict_maps

    cohort, path = trained
    ckpt = load_checkpoint(path)
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    low, high = ckpt["config"]["bolus_arrival_s"]
    assert predict_maps(series, ckpt, device="cpu").provenance["arrival_note"] is None
    # the arrival the command line's scan-start check reads and passes on is the same
    from ctperf.perfusion.onset import bolus_arrival_s, check_scan_start

    assert check_scan_start(series) == bolus_arrival_s(series)
    step = float(np.median(np.diff(series.times)))
    early = series.replace(hu=np.concatenate([np.repeat(series.hu[:1], 3, axis=0), series.hu]),
                           times=np.r_[series.times[0] - step * np.arange(3, 0, -1),
                                       series.times])
    with caplog.at_level("WARNING", logger="ctperf"):
        note = predict_maps(early, ckpt, device="cpu").provenance["arrival_note"]
    assert note is not None and f"{low:.1f}-{high:.1f} s after it" in note
    assert "unreliable" in caplog.text


def test_a_scan_begun_1_5_s_early_is_said():
    """A probe's network (arrivals 6.5-9.0 s in training) moved Tmax by -2.2 s on a study whose
    bolus arrived at 10.5 s, which the 2 s margin let pass unsaid; the margin is 1 s now, the
    Tmax error it lets pass."""
    from ctperf.model.predict import _arrival

    cfg = {"bolus_arrival_s": [6.5, 9.0]}
    assert _arrival(None, cfg, 9.8) is None  # type: ignore[arg-type]
    assert _arrival(None, cfg, 5.6) is None  # type: ignore[arg-type]
    note = _arrival(None, cfg, 10.5)  # type: ignore[arg-type]
    assert note is not None and "10.5 s after this study's first frame" in note
    assert _arrival(None, cfg, 5.0) is not None  # type: ignore[arg-type]
