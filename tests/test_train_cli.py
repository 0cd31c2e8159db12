"""``ctperf train``/``cv`` options: a preset as the base configuration, explicit options over it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctperf.cli import build_parser
from ctperf.commands import train as train_command
from ctperf.model import PRESETS


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


def test_frame_interval_is_not_the_resampling_grid(capsys):
    # --frame-interval means "seconds between frames of a file without timing" everywhere;
    # the resampling grid of the slice cache has its own name
    with pytest.raises(SystemExit):
        _args("train", "--frame-interval", "1")
    assert _args("train", "--resample-interval", "1.5").resample_interval == 1.5


def test_prepare_builds_the_caches_the_config_asks_for(monkeypatch, caplog):
    import ctperf.model

    calls: list[dict] = []

    def fake_cache(cohort: Path, root: Path, *, size, frames, **kw):
        calls.append({"size": size, "frames": frames, **kw})
        return SimpleNamespace(size=size or 256, n_frames=frames or 40)

    monkeypatch.setattr(ctperf.model, "build_slice_cache", fake_cache)
    _, pretrain, config = train_command.prepare(
        _args("train", "--preset", "cpu", "--frame-mode", "resample", "--resample-interval", "2"))
    assert pretrain is None and len(calls) == 1
    assert (calls[0]["size"], calls[0]["frames"], calls[0]["frame_interval"]) == (64, 30, 2.0)
    assert calls[0]["frame_mode"] == "resample"
    # the paper's pretraining at 128 px is skipped when the studies are smaller
    calls.clear()
    _, pretrain, config = train_command.prepare(_args("train", "--size", "64"))
    assert pretrain is None and config.pretrain_epochs == 0 and len(calls) == 1
    assert "pretraining skipped" in caplog.text
    calls.clear()
    _, pretrain, config = train_command.prepare(_args("train"))  # studies' own: 256 px
    assert pretrain is not None and [c["size"] for c in calls] == [None, 128]
    assert config.pretrain_epochs == PRESETS["paper"].pretrain_epochs and config.size == 256
