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


def test_a_scan_begun_earlier_than_the_training_scans_is_said(tmp_path, caplog):
    """The network reads the bolus's timing from the frame index: the same study with three
    more frames before its bolus (8 s) is predicted with a warning, the study as trained
    without one; the arrivals are read on the frames the network takes."""
    import numpy as np

    from ctperf.io import read_nifti_series
    from ctperf.model import TrainConfig, build_slice_cache, predict_maps, train
    from test_model_data import make_cohort

    cohort = make_cohort(tmp_path / "cohort", subjects=2, seed=3, size=16, frames=12)
    cache = build_slice_cache(cohort, tmp_path / "cache", size=16, frames=12)
    assert cache.meta["arrivals_on"] == "input"
    config = TrainConfig(targets=("delay",), epochs=1, width=2, depth=2, batch_size=2,
                         device="cpu")
    ckpt = load_checkpoint(train(cache, tmp_path / "run", config,
                                 train_patients=["sub-0000", "sub-0001"]).model_path)
    assert ckpt["config"]["bolus_arrival_on"] == "input"
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    low, high = ckpt["config"]["bolus_arrival_s"]
    assert predict_maps(series, ckpt, device="cpu").provenance["arrival_note"] is None
    step = float(np.median(np.diff(series.times)))
    early = series.replace(hu=np.concatenate([np.repeat(series.hu[:1], 3, axis=0), series.hu]),
                           times=np.r_[series.times[0] - step * np.arange(3, 0, -1),
                                       series.times])
    with caplog.at_level("WARNING", logger="ctperf"):
        note = predict_maps(early, ckpt, device="cpu").provenance["arrival_note"]
    assert note is not None and f"{low:.1f}-{high:.1f} s after it" in note
    assert "unreliable" in caplog.text


def test_arrivals_are_read_on_the_frames_the_network_takes():
    """One bolus at 0.5 s and at 1.5 s frames: its arrival on the study's own frames moved with
    their spacing (a probe's 5.5 s and 3.0 s), so a scan begun 10 s early passed unsaid at
    1.5 s frames and a normal one was warned of. On the 1 s grid a network takes, the two agree
    within that grid's step."""
    import numpy as np

    from ctperf.model import input_arrival_s
    from ctperf.model.unet import input_times, select_frames
    from ctperf.perfusion.onset import bolus_arrival_s
    from test_aif_failsafe import skullless_study

    fine = skullless_study(np.random.default_rng(0), times=np.arange(0.0, 45.0, 0.5))[0]
    coarse = fine.replace(hu=fine.hu[::3], times=fine.times[::3])
    own = [bolus_arrival_s(s) for s in (fine, coarse)]
    on_grid = []
    for s in (fine, coarse):
        kw = {"n_frames": 40, "mode": "resample", "frame_interval": 1.0}
        on_grid.append(input_arrival_s(s, select_frames(s.hu, s.times, **kw),
                                       input_times(s.times, **kw)))
    assert abs(on_grid[0] - on_grid[1]) <= 1.0, (own, on_grid)
    assert abs(own[0] - own[1]) > abs(on_grid[0] - on_grid[1])  # what moved before


def test_a_scan_begun_1_5_s_early_is_said():
    """A probe's network (arrivals 6.5-9.0 s in training) moved Tmax by -2.2 s on a study whose
    bolus arrived at 10.5 s, which the 2 s margin let pass unsaid; the margin is 1 s now, the
    Tmax error it lets pass."""
    from ctperf.model.predict import _arrival

    cfg = {"bolus_arrival_s": [6.5, 9.0]}
    assert _arrival(cfg, 9.8) is None
    assert _arrival(cfg, 5.6) is None
    note = _arrival(cfg, 10.5)
    assert note is not None and "10.5 s after this study's first frame" in note
    assert _arrival(cfg, 5.0) is not None


def test_a_moving_head_is_said(trained):  # noqa: F811
    """`ctperf maps` flags an unregistered moving head (motion_unregistered); the U-Net's maps of
    a probe's severely moved subject (CBV 45 % low, Tmax 2.5 s high) had been written without a
    word. The same skull-edge reading says so now; a still head is not."""
    from ctperf.model import predict_maps
    from ctperf.phantom import generate_subject

    _, ckpt = trained
    for motion in ("none", "severe"):
        series = generate_subject(seed=1, size=96, slices=2, motion=motion).series
        note = predict_maps(series, ckpt, device="cpu", resize=True).provenance["motion_note"]
        if motion == "none":
            assert note is None
        else:
            assert note is not None and "the head moved" in note and "--register" in note


def test_an_offset_hu_scale_is_said_once(trained, caplog):  # noqa: F811
    """Prediction reads a study's HU scale in each of its checks (scan start, arrival, motion,
    input): an offset scale had been warned of four times in one run."""
    from ctperf.model import predict_maps
    from ctperf.phantom import generate_subject

    _, ckpt = trained
    series = generate_subject(seed=1, size=64, slices=2).series
    with caplog.at_level("WARNING", logger="ctperf"):
        predict_maps(series.replace(hu=series.hu - 24), ckpt, device="cpu", resize=True)
    assert caplog.text.count("HU scale looks offset by -24 HU") == 1, caplog.text
