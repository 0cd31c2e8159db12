"""Training: a batch can be overfitted, a killed run resumes exactly, logs and guards."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctperf.errors import InputError, ValidationError
from ctperf.model import TrainConfig, UNet, build_slice_cache, load_checkpoint, masked_mse, train
from test_model_data import make_cohort

TINY = TrainConfig(width=4, depth=3, batch_size=2, lr=1e-3, device="cpu")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train")
    cohort = make_cohort(root / "cohort", subjects=3, seed=1)
    full = build_slice_cache(cohort, root / "cache", size=32, frames=8)
    small = build_slice_cache(cohort, root / "cache", size=16, frames=8)
    return full, small


def test_one_batch_overfits(caches):
    cache, _ = caches
    rows = cache.rows(["sub-0000", "sub-0001"])
    mean, std = cache.input_stats(["sub-0000", "sub-0001"])
    x, y, m = (torch.from_numpy(a) for a in cache.batch(
        rows, target_idx=[cache.target_index("cbv")], mean=mean, std=std))
    torch.manual_seed(0)
    net = UNet(8, width=8, depth=3, norm="batch")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = masked_mse(net(x), y, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_masked_mse_ignores_outside_voxels():
    pred = torch.tensor([[[[0.0, 1.0]]]])
    target = torch.tensor([[[[0.0, 0.0]]]])
    assert float(masked_mse(pred, target, torch.tensor([[[[1.0, 0.0]]]]))) == 0.0
    assert float(masked_mse(pred, target, None)) == 0.5
    # the mean absolute error, on the same voxels
    pred2 = torch.tensor([[[[0.0, 2.0]]]])
    assert float(masked_mse(pred2, target, None, "l1")) == 1.0          # (0 + 2) / 2
    assert float(masked_mse(pred2, target, None)) == 2.0                # (0 + 4) / 2
    assert float(masked_mse(pred2, target, torch.tensor([[[[1.0, 0.0]]]]), "l1")) == 0.0


def test_l1_loss_trains_other_weights_and_is_part_of_the_run(caches, tmp_path: Path):
    full, _ = caches
    one = replace(TINY, epochs=1)
    runs = {}
    for loss in ("mse", "l1"):
        train(full, tmp_path / loss, replace(one, loss=loss), train_patients=["sub-0000"])
        runs[loss] = torch.load(tmp_path / loss / "last.pt", weights_only=True)
    assert runs["l1"]["config"]["loss"] == "l1" and runs["mse"]["config"]["loss"] == "mse"
    differ = [not torch.equal(runs["l1"]["model"][k], runs["mse"]["model"][k])
              for k in runs["mse"]["model"] if runs["mse"]["model"][k].is_floating_point()]
    assert any(differ)
    # a run is not continued with the other loss; one written before the option was MSE
    with pytest.raises(InputError, match=r"different settings.*loss='mse' vs 'l1'"):
        train(full, tmp_path / "mse", replace(one, loss="l1"), train_patients=["sub-0000"],
              resume=True)
    ckpt = runs["mse"]
    del ckpt["config"]["loss"]
    torch.save(ckpt, tmp_path / "mse" / "last.pt")
    train(full, tmp_path / "mse", one, train_patients=["sub-0000"], resume=True)
    with pytest.raises(ValidationError, match="loss must be one of"):
        replace(TINY, loss="huber")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_killed_and_resumed_run_equals_uninterrupted_run(caches, tmp_path: Path):
    full, small = caches
    # a Tmax network: the augmentation draws its shifts in time too
    config = replace(TINY, epochs=2, pretrain_epochs=2, seed=3, augment=True,
                     targets=("tmax",), augment_shift=2)
    kw = {"train_patients": ["sub-0000", "sub-0002"], "val_patients": ["sub-0001"],
          "pretrain_cache": small}
    straight = train(full, tmp_path / "straight", config, **kw)

    class Killed(Exception):
        pass

    def kill_after_3(row):
        if row["epoch"] == 3:  # the first fine-tuning epoch, in the second stage
            raise Killed

    with pytest.raises(Killed):
        train(full, tmp_path / "resumed", config, on_epoch=kill_after_3, **kw)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train(full, tmp_path / "resumed", config, resume=True, **kw)
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical, not just close
    assert [r["val_loss"] for r in straight.history] == [r["val_loss"] for r in resumed.history]
    with (tmp_path / "resumed" / "log.csv").open() as f:
        log = list(csv.DictReader(f))
    assert [r["epoch"] for r in log] == ["1", "2", "3", "4"]
    assert [r["stage"] for r in log] == ["pretrain", "pretrain", "finetune", "finetune"]
    assert set(log[0]) == {"epoch", "stage", "train_loss", "loss_function", "val_loss", "lr",
                           "seconds"}
    # the training loss is named: the cpu preset's L1 had been reported as "MSE"
    assert {r["loss_function"] for r in log} == {config.loss}


def test_kill_at_stage_boundary_resumes_exactly(caches, tmp_path: Path):
    full, small = caches
    config = replace(TINY, epochs=1, pretrain_epochs=1, seed=5)
    kw = {"train_patients": ["sub-0000"], "val_patients": ["sub-0001"], "pretrain_cache": small}
    straight = train(full, tmp_path / "a", config, **kw)

    def kill(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(full, tmp_path / "b", config, on_epoch=kill, **kw)
    resumed = train(full, tmp_path / "b", config, resume=True, **kw)
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_states_and_loads_weights_only(caches, tmp_path: Path):
    full, _ = caches
    result = train(full, tmp_path, replace(TINY, epochs=1), train_patients=["sub-0000"],
                   val_patients=["sub-0001"])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "config", "history"} <= set(last)
    assert last["config"]["hu_std"] > 0 and last["config"]["windows"] == {"cbv": [0.0, 10.0]}
    assert result.best_path.exists() and len(result.history) == 1


def test_guards(caches, tmp_path: Path, caplog):
    full, _ = caches
    with pytest.raises(ValidationError, match="both training and validation"):
        train(full, tmp_path, TINY, train_patients=["sub-0000"], val_patients=["sub-0000"])
    one = replace(TINY, epochs=1)
    train(full, tmp_path, one, train_patients=["sub-0000"])
    # without validation patients the best epoch is the training loss's: said
    assert any("no validation patients" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="already holds a training run"):
        train(full, tmp_path, one, train_patients=["sub-0000"])
    with pytest.raises(InputError, match=r"cannot resume with different settings.*width"):
        train(full, tmp_path, replace(TINY, epochs=2, width=8), train_patients=["sub-0000"],
              resume=True)
    # another split of the patients, or another reference, is named (not one of the numbers
    # derived from them, such as the input's contrast gain)
    with pytest.raises(InputError, match=r"train_patients differ \(1 added: sub-0001; 1 gone: "
                                         r"sub-0000\)"):
        train(full, tmp_path, replace(TINY, epochs=2), train_patients=["sub-0001"], resume=True)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    trained_on = ckpt["config"]["reference"]
    ckpt["config"]["reference"] = "nlr" if trained_on != "nlr" else "truth"
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(InputError, match=r"different settings.*reference="):
        train(full, tmp_path, replace(TINY, epochs=2), train_patients=["sub-0000"], resume=True)
    ckpt["config"]["reference"] = trained_on
    torch.save(ckpt, tmp_path / "last.pt")
    # a run trained on a cache built by an older ctperf (other masks) is not continued on the
    # rebuilt one: the checkpoint says which cache version it learnt from
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["config"]["cache_version"]  # written before the key existed: version 1
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(InputError, match=r"different settings.*cache_version=1 vs 3"):
        train(full, tmp_path, replace(TINY, epochs=2), train_patients=["sub-0000"], resume=True)
    with pytest.raises(ValidationError, match="enhancement_quantile"):
        replace(TINY, enhancement_quantile=0.9)  # needs the baseline input
    with pytest.raises(ValidationError, match="target 'bogus' is not in the cache"):
        train(full, tmp_path / "x", replace(TINY, targets=("bogus",)),
              train_patients=["sub-0000"])
    with pytest.raises(ValidationError, match="the config asks for size 64, the cache has 32"):
        train(full, tmp_path / "y", replace(TINY, size=64), train_patients=["sub-0000"])
    with pytest.raises(ValidationError, match="needs a pretrain_cache"):
        train(full, tmp_path / "z", replace(TINY, pretrain_epochs=1),
              train_patients=["sub-0000"])


def train_under_torchrun(cache, out: Path, *, device: str, processes: int) -> list[dict]:
    """Train a small network on ``cache`` into ``out`` under ``torchrun`` with ``processes``
    processes; returns the rows of its log.csv."""
    import subprocess
    import sys

    code = (
        "from ctperf.model import TrainConfig, open_slice_cache, train\n"
        f"c = open_slice_cache({str(cache.path)!r})\n"
        f"train(c, {str(out)!r}, TrainConfig(epochs=2, width=4, depth=3, batch_size=1, "
        f"device={device!r}), train_patients=['sub-0000', 'sub-0002'], "
        "val_patients=['sub-0001'])\n")
    script = out.parent / f"{out.name}_train.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={processes}", str(script)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ddp_under_torchrun_on_cpu(caches, tmp_path: Path):
    # two gloo processes share the epoch: each sees half the slices, losses are all-reduced
    full, _ = caches
    log = train_under_torchrun(full, tmp_path / "ddp", device="cpu", processes=2)
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert load_checkpoint(tmp_path / "ddp" / "model.pt")["config"]["train_patients"] == [
        "sub-0000", "sub-0002"]


def test_baseline_input_is_recorded_and_old_configs_still_load(caches, tmp_path: Path):
    from ctperf.model import build_model, predict_maps
    from ctperf.model.train import PRESETS, preset

    full, _ = caches
    result = train(full, tmp_path / "b", replace(TINY, epochs=1, baseline_frames=2,
                                                  contrast_hu=10.0), train_patients=["sub-0000"])
    cfg = load_checkpoint(result.model_path)["config"]
    _, std = full.input_stats(["sub-0000"])
    assert cfg["baseline_frames"] == 2
    assert cfg["contrast_gain"] == pytest.approx(std / 10.0)  # standardised units -> 10 HU
    # a checkpoint written before the baseline option existed builds the paper's plain input
    old = {k: v for k, v in cfg.items() if k not in ("baseline_frames", "contrast_gain")}
    net = build_model(old)
    assert net.config["baseline_frames"] == 0 and net.config["contrast_gain"] == 1.0
    # and resuming a run from such a checkpoint is not refused as a change of settings
    plain = train(full, tmp_path / "p", replace(TINY, epochs=1), train_patients=["sub-0000"])
    ckpt = torch.load(tmp_path / "p" / "last.pt", weights_only=True)
    for k in ("baseline_frames", "contrast_gain"):
        del ckpt["config"][k]
    torch.save(ckpt, tmp_path / "p" / "last.pt")
    resumed = train(full, tmp_path / "p", replace(TINY, epochs=1), train_patients=["sub-0000"],
                    resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in plain.history]
    # the presets: the paper's network on the studies' own grid, and the narrow CPU one
    assert preset("paper") is PRESETS["paper"] and preset("cpu") is PRESETS["cpu"]
    paper, cpu = PRESETS["paper"], PRESETS["cpu"]
    assert (paper.width, paper.lr, paper.pretrain_epochs, paper.size) == (64, 1e-5, 250, None)
    assert paper.baseline_frames == 0 and cpu.baseline_frames > 0 and cpu.size == 64
    with pytest.raises(ValidationError, match="unknown preset"):
        preset("gpu")
    from ctperf.io import read_nifti_series

    series = read_nifti_series(next(Path(full.meta["cohort"]).glob("sub-*")) / "study.nii.gz")
    maps = predict_maps(series, result.model_path, device="cpu", resize=True)
    assert np.all(np.isfinite(maps["cbv"]))


def test_bf16_autocast_path_runs_on_cpu(caches, tmp_path: Path):
    # the mixed-precision branch used on GPUs, exercised with CPU bf16 autocast
    full, _ = caches
    result = train(full, tmp_path, replace(TINY, epochs=1, amp="bf16"),
                   train_patients=["sub-0000"], val_patients=["sub-0001"])
    row = result.history[0]
    assert 0 < row["train_loss"] < 1 and 0 < row["val_loss"] < 1
    with pytest.raises(ValidationError, match="amp must be"):
        replace(TINY, amp="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    from ctperf.model import resolve_device

    with pytest.raises(ValidationError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValidationError, match="'cuda:1' asked for but torch sees no CUDA"):
        resolve_device("cuda:1")
    with pytest.raises(ValidationError, match="unknown device"):
        resolve_device("warp-drive")
    assert resolve_device("auto").type == "cpu"


def test_augmentation_is_a_seeded_flip_rotation_and_noise():
    import numpy as np

    from ctperf.model.augment import apply_augmentation, draw_augmentation

    a = draw_augmentation(np.random.default_rng(7), 4)
    b = draw_augmentation(np.random.default_rng(7), 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # parameters come from the seed only
    assert np.all(np.abs(a["degrees"]) <= 10)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    y, m = x[:, :1] / 100, (x[:, :1] > 50).float()
    flip = {"flip": np.array([True, False]), "degrees": np.zeros(2), "noise_sd": np.zeros(2),
            "noise_seed": np.array([1, 2])}
    xa, ya, ma = apply_augmentation(x, y, m, flip)
    # a pure flip samples pixel centres exactly: float32 bilinear weights of 0 and 1
    torch.testing.assert_close(xa[0], x[0].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(xa[1], x[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(ma[0], m[0].flip(-1))
    noisy = {**flip, "noise_sd": np.full(2, 0.5)}
    xn, yn, _ = apply_augmentation(x, y, m, noisy)
    assert 0.3 < float((xn - xa).std()) < 0.7  # SD 0.5 noise on the inputs only
    torch.testing.assert_close(yn, ya)


def test_contrast_gain_scales_the_enhancement_not_the_baseline():
    import numpy as np

    from ctperf.model.augment import apply_augmentation, draw_augmentation

    a = draw_augmentation(np.random.default_rng(3), 64, max_log_gain=0.5)
    assert np.all((a["gain"] >= np.exp(-0.5)) & (a["gain"] <= np.exp(0.5)))
    assert np.all(draw_augmentation(np.random.default_rng(3), 4)["gain"] == 1.0)  # off by default
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6)
    y, m = torch.rand(2, 1, 6, 6), torch.ones(2, 1, 6, 6)
    params = {"flip": np.array([False, False]), "degrees": np.zeros(2),
              "noise_sd": np.zeros(2), "noise_seed": np.array([1, 2]),
              "gain": np.array([2.0, 0.5])}
    xa, ya, _ = apply_augmentation(x, y, m, params, baseline_frames=2)
    base = x[:, :2].mean(dim=1, keepdim=True)
    gain = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    # identity resampling leaves float32 rounding only
    torch.testing.assert_close(xa, base + gain * (x - base), atol=1e-5, rtol=0)
    torch.testing.assert_close(xa[:, :2].mean(dim=1, keepdim=True), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(ya, y, atol=1e-5, rtol=0)  # perfusion does not change


def test_time_shift_moves_the_frames_and_only_for_timing_maps():
    import numpy as np

    from ctperf.model.augment import apply_augmentation, draw_augmentation
    from ctperf.model.train import time_shift

    plain = draw_augmentation(np.random.default_rng(5), 8)
    shifted = draw_augmentation(np.random.default_rng(5), 8, max_shift=2)
    assert "shift" not in plain                         # off by default
    # drawn last: the other parameters are those of the same seed without it
    assert all(np.array_equal(plain[k], shifted[k]) for k in plain)
    assert set(np.unique(draw_augmentation(np.random.default_rng(1), 400, max_shift=2)["shift"])
               ) == {-2, -1, 0, 1, 2}
    t = torch.arange(6, dtype=torch.float32)
    x = t.view(1, 6, 1, 1).expand(2, 6, 3, 3).clone()
    y, m = torch.rand(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    params = {"flip": np.array([False, False]), "degrees": np.zeros(2),
              "noise_sd": np.zeros(2), "noise_seed": np.array([1, 2]),
              "shift": np.array([2, -1])}
    xa, ya, _ = apply_augmentation(x, y, m, params)
    # later by 2 frames (the first frame repeated), earlier by 1 (the last repeated)
    torch.testing.assert_close(xa[0, :, 1, 1], torch.tensor([0.0, 0, 0, 1, 2, 3]), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(xa[1, :, 1, 1], torch.tensor([1.0, 2, 3, 4, 5, 5]), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(ya, y, atol=1e-5, rtol=0)
    # only networks of timing maps measured from the arterial input shift their studies
    config = TrainConfig(targets=("tmax",), augment=True, augment_shift=4)
    assert time_shift(config) == 4
    assert time_shift(replace(config, targets=("tmax", "delay"))) == 4
    assert time_shift(replace(config, targets=("tmax", "ttp"))) == 0
    assert time_shift(replace(config, targets=("cbf",))) == 0
    assert time_shift(replace(config, augment=False)) == 0
    with pytest.raises(ValidationError, match="augment_shift"):
        TrainConfig(augment_shift=-1)


def test_config_is_frozen_validated_and_replaced():
    config = TrainConfig(targets=["cbv", "cbf"], betas=[0.8, 0.9])
    assert config.targets == ("cbv", "cbf") and config.betas == (0.8, 0.9)  # lists kept as tuples
    with pytest.raises(AttributeError):
        config.epochs = 3  # type: ignore[misc]
    assert replace(config, epochs=3).epochs == 3 and config.epochs == 50
    bad = [({"schedule": "step"}, "schedule"), ({"contrast_hu": 0.0}, "contrast_hu"),
           ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"targets": ()}, "targets"),
           ({"targets": ("cbv", "cbf", "cbv")}, "targets name cbv more than once")]
    for change, match in bad:
        with pytest.raises(ValidationError, match=match):
            replace(config, **change)


@pytest.mark.parametrize("command", ["train", "cv", "reproduce"])
def test_the_target_option_repeated_adds_maps(command):
    """``--target cbv --target cbf --target tmax`` had kept only tmax (argparse's default
    store): a training run without the maps asked for, and no word."""
    from ctperf.cli import build_parser

    args = build_parser().parse_args([command, "cohort", "out", "--target", "cbv", "--target",
                                      "cbf", "tmax"])
    assert args.target == ["cbv", "cbf", "tmax"]


def test_a_timing_map_trained_with_another_is_said_to_go_without_shifts(caches, tmp_path,
                                                                        caplog):
    """Time shifts apply only to a network whose every target is a timing map: asked for with
    Tmax beside CBV, the run says so (it had trained without them in silence)."""
    _, small = caches
    config = replace(TINY, targets=("cbv", "tmax"), epochs=1, augment=True, augment_shift=3)
    with caplog.at_level("WARNING", logger="ctperf.model.train"):
        train(small, tmp_path / "run", config, train_patients=["sub-0000"],
              val_patients=["sub-0001"])
    assert "tmax learnt without time shifts" in caplog.text


def test_training_curves_name_the_training_loss():
    """The figure had labelled an L1 training loss "MSE loss": the training curve names its
    loss (older logs, without the column, read as MSE), validation stays MSE."""
    from ctperf.reporting.figures import training_curves_figure

    rows = [{"epoch": e, "stage": "finetune", "train_loss": 0.2 / e, "loss_function": "l1",
             "val_loss": 0.06 / e} for e in (1, 2)]
    fig = training_curves_figure(rows)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["finetune train (L1)", "finetune val (MSE)"]
    assert fig.axes[0].get_ylabel() == "loss on [0, 1] maps"
    old = training_curves_figure([{k: v for k, v in r.items() if k != "loss_function"}
                                  for r in rows])
    assert next(t.get_text() for t in old.axes[0].get_legend().get_texts()) == \
        "finetune train (MSE)"


def test_building_a_network_leaves_the_callers_random_state_alone():
    # training reseeded the program's global generator (torch.manual_seed), and prediction's
    # model construction drew from it: a caller's own torch.rand changed with ctperf's calls
    from ctperf.model.checkpoint import build_model

    config = {"in_frames": 4, "out_channels": 1, "width": 4, "depth": 2, "kernel_size": 2,
              "norm": "none"}
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first = build_model(config, seed=5)
    unseeded = build_model(config)
    assert torch.equal(torch.rand(3), expected)
    again = build_model(config, seed=5)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the seed alone sets the weights
    assert any(not torch.equal(a, b) for a, b in zip(
        first.state_dict().values(), unseeded.state_dict().values(), strict=True))


def test_a_run_is_not_resumed_on_other_frames_or_other_studies(caches, tmp_path: Path):
    """Resumed with another frame selection, a probe's run trained its last 25 epochs on 1 s
    frames after 55 on 2 s ones, and a finished run's model.pt was relabelled around the same
    weights; resumed after a study changed, its input normalisation moved mid-run. Refused."""
    full, _ = caches
    one = replace(TINY, epochs=1)
    train(full, tmp_path / "run", one, train_patients=["sub-0000"])
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key, value, said in (("frame_mode", "resample", "frame_mode='resample' vs"),
                             ("frame_interval", 1.0, "frame_interval=1.0 vs None"),
                             ("hu_mean", 123.0, "a study changed since")):
        torch.save({**saved, "config": {**saved["config"], key: value}},
                   tmp_path / "run" / "last.pt")
        with pytest.raises(InputError, match=re.escape(said)):
            train(full, tmp_path / "run", one, train_patients=["sub-0000"], resume=True)
    # the same studies' statistics summed in another order (a cache rebuilt by another
    # version): equal to rounding, resumed (a review's run had been refused on 3e-16)
    rounded = {**saved["config"], "hu_std": saved["config"]["hu_std"] * (1 + 3e-16)}
    torch.save({**saved, "config": rounded}, tmp_path / "run" / "last.pt")
    train(full, tmp_path / "run", one, train_patients=["sub-0000"], resume=True)
