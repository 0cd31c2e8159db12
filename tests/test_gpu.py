"""On a CUDA device: training is repeatable and resumes bit-identically, mixed precision and DDP
run, and the U-Net's and the box model's results agree with the CPU's.

Every test here needs a GPU and is skipped without one (CI has none): run ``pytest -m gpu``
on a machine with CUDA.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctperf.model import TrainConfig, load_checkpoint, predict_maps, train
from test_model_train import caches, train_under_torchrun  # noqa: F401 (its fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

ON_GPU = TrainConfig(width=8, depth=3, batch_size=2, lr=1e-3, device="cuda", norm="batch")
KW = {"train_patients": ["sub-0000", "sub-0002"], "val_patients": ["sub-0001"]}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit-identical, not just close


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_a_gpu_repeats_and_resumes_bit_identically(caches, tmp_path, amp):  # noqa: F811
    # fp16 runs through the gradient scaler, whose state the checkpoint must carry
    full, small = caches
    config = replace(ON_GPU, epochs=2, pretrain_epochs=1, seed=4, amp=amp, augment=True,
                     targets=("tmax",), augment_shift=2)
    kw = {**KW, "pretrain_cache": small}
    first = train(full, tmp_path / "first", config, **kw)
    second = train(full, tmp_path / "second", config, **kw)
    _identical(first.model_path, second.model_path)

    class Killed(Exception):
        pass

    def kill_after_2(row):
        if row["epoch"] == 2:  # the first fine-tuning epoch
            raise Killed

    with pytest.raises(Killed):
        train(full, tmp_path / "resumed", config, on_epoch=kill_after_2, **kw)
    resumed = train(full, tmp_path / "resumed", config, resume=True, **kw)
    _identical(first.model_path, resumed.model_path)
    assert [r["val_loss"] for r in first.history] == [r["val_loss"] for r in resumed.history]
    assert all(np.isfinite(r["train_loss"]) for r in first.history)


def test_gpu_training_and_prediction_agree_with_the_cpu(caches, tmp_path):  # noqa: F811
    full, _ = caches
    config = replace(ON_GPU, epochs=1, seed=7, amp="none")
    gpu = train(full, tmp_path / "gpu", config, **KW)
    cpu = train(full, tmp_path / "cpu", replace(config, device="cpu"), **KW)
    # Different kernels sum in other orders (and cuDNN may use TF32): one epoch from the same
    # initial weights stays close, not equal. 2 % is far below the epoch's own change of loss
    # (the loss falls by tens of percent in it) and far above float32 rounding.
    assert gpu.history[0]["train_loss"] == pytest.approx(cpu.history[0]["train_loss"], rel=0.02)
    assert gpu.history[0]["val_loss"] == pytest.approx(cpu.history[0]["val_loss"], rel=0.02)

    # the same weights predict the same maps on either device
    from ctperf.io import read_nifti_series

    series = read_nifti_series(next(Path(full.meta["cohort"]).glob("sub-*")) / "study.nii.gz")
    on_cpu = predict_maps(series, gpu.model_path, device="cpu", resize=True)
    on_gpu = predict_maps(series, gpu.model_path, device="cuda", resize=True)
    for name in on_cpu.maps:
        a, b = np.asarray(on_cpu[name]), np.asarray(on_gpu[name])
        scale = max(float(np.abs(a).max()), 1e-6)
        # TF32 convolutions round inputs to 10-bit mantissas (1e-3 relative): 1 % of the
        # map's range leaves room for that through the network's depth.
        assert np.abs(a - b).max() <= 0.01 * scale, name


def test_ddp_under_torchrun_on_one_gpu(caches, tmp_path):  # noqa: F811
    # the NCCL process group of a multi-GPU run, with one process
    full, _ = caches
    log = train_under_torchrun(full, tmp_path / "ddp", device="cuda", processes=1)
    assert [r["epoch"] for r in log] == ["1", "2"]


@pytest.mark.parametrize("method", ["nlr-fast", "nlr"])
def test_maps_with_box_fits_on_a_gpu_equal_the_cpus(tmp_path, method):
    import json

    from ctperf.cli import main
    from ctperf.io import write_series_nifti
    from ctperf.phantom import generate_subject

    subject = generate_subject(seed=3, size=64, slices=2, lesion=True, motion="none")
    study = tmp_path / "study.nii.gz"
    write_series_nifti(subject.series, study)
    for device in ("cpu", "cuda"):
        assert main(["maps", str(study), str(tmp_path / device), "--method", method,
                     "--device", device]) == 0
    import nibabel as nib

    for name in ("cbf", "cbv", "tmax"):
        a = np.asarray(nib.load(tmp_path / "cpu" / f"{name}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "cuda" / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))  # vessels, outside: NaN
        brain = np.isfinite(a) & (a != 0)
        rel = np.abs(a - b)[brain] / np.maximum(np.abs(a[brain]), 1e-3)
        # as test_boxnlr_backend.test_cuda_matches_numpy: a simplex can stop elsewhere inside
        # its tolerance on a near-tie, so nearly all voxels equal and none far apart
        assert np.mean(rel <= 1e-6) >= 0.97, name
        assert np.median(rel) <= 1e-9, name
    vols = [json.loads((tmp_path / d / "summary.json").read_text())["lesions"]["volumes_ml"]
            for d in ("cpu", "cuda")]
    for name in ("core", "hypoperfused"):
        assert vols[0][name] == pytest.approx(vols[1][name], abs=0.1), name
