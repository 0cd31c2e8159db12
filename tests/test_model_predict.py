"""Inference, checkpoint safety and the train/cv/predict command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctperf.cli import main
from ctperf.errors import InputError, ValidationError
from ctperf.io import read_maps, read_nifti_series, write_maps_nifti, write_series_nifti
from ctperf.model import (
    TARGET_WINDOWS,
    TrainConfig,
    build_slice_cache,
    load_checkpoint,
    predict_maps,
    save_checkpoint,
    train,
)
from ctperf.types import radiological_flips
from test_model_data import make_cohort


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    cohort = make_cohort(root / "cohort", subjects=2, seed=3, size=16, frames=12)
    cache = build_slice_cache(cohort, root / "cache", size=16, frames=6)
    config = TrainConfig(targets=("cbf", "delay"), epochs=1, width=2, depth=2, batch_size=2,
                         device="cpu")
    result = train(cache, root / "run", config, train_patients=["sub-0000"],
                   val_patients=["sub-0001"])
    return cohort, result.model_path


def test_predict_maps_names_units_and_shape(trained):
    cohort, ckpt = trained
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    maps = predict_maps(series, ckpt, device="cpu")
    assert maps.names == ["cbf", "delay"]
    assert maps.shape == series.shape[1:]
    assert maps.units["cbf"] == "mL/100g/min" and maps.units["delay"] == "s"
    for target, name in (("cbf", "cbf"), ("delay", "delay")):
        lo, hi = TARGET_WINDOWS[target]
        assert lo <= maps[name].min() and maps[name].max() <= hi
        assert np.ptp(maps[name]) > 0
    np.testing.assert_array_equal(maps.affine, series.affine)
    assert maps.provenance["method"] == "unet"
    # which network made the maps: two checkpoints' predictions had alike provenance
    stored = load_checkpoint(ckpt)
    assert maps.provenance["model_sha256"] == stored["model_sha256"]
    assert stored["torch_threads"] == torch.get_num_threads()  # the weights depend on it
    assert maps.provenance["training_seed"] == stored["config"]["seed"]
    assert maps.provenance["training_patients"] == 1
    mask = np.zeros(series.shape[1:], dtype=bool)
    mask[:, 4:12, 4:12] = True
    masked = predict_maps(series, ckpt, device="cpu", brain_mask=mask)
    assert np.all(masked["cbf"][~mask] == 0)
    np.testing.assert_array_equal(masked["cbf"][mask], maps["cbf"][mask])


def test_prediction_is_the_network_output_mapped_back(trained):
    # the physical map must be lo + (hi - lo) * sigmoid output of the standardised frames
    from ctperf.model import build_model, normalise_input, subsample_indices

    cohort, path = trained
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    series = read_nifti_series(cohort / "sub-0000" / "study.nii.gz")
    net = build_model(cfg)
    net.load_state_dict(ckpt["model"])
    net.eval()
    # the cohort is stored the way up the training slices are turned to: nothing reversed
    assert cfg["orientation"] == "radiological"
    assert radiological_flips(series.affine) == (False, False)
    x = series.hu[subsample_indices(12, 6), 1][None]
    x = normalise_input(x, window=cfg["hu_window"], mean=cfg["hu_mean"], std=cfg["hu_std"])
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()[0]
    maps = predict_maps(series, path, device="cpu")
    # float32 arithmetic through a sigmoid, scaled by the 100 mL/100g/min window
    np.testing.assert_allclose(maps["cbf"][1], 100.0 * out[0], atol=1e-3)
    np.testing.assert_allclose(maps["delay"][1], 15.0 * out[1], atol=1e-3)


def test_a_study_stored_flipped_is_predicted_the_same_way_up(trained):
    """The same study with its rows reversed (as a NIfTI converter may store a DICOM series;
    the affine says so) reaches the network the same way up: its maps are the first's, rows
    reversed. A checkpoint from before the orientation was recorded predicts as it was
    trained, on the slices as stored."""
    from dataclasses import replace

    cohort, path = trained
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    affine = series.affine.copy()
    affine[:3, 3] += affine[:3, 1] * (series.shape[2] - 1)
    affine[:3, 1] *= -1
    flipped = replace(series, hu=series.hu[:, :, ::-1].copy(), affine=affine)
    a = predict_maps(series, path, device="cpu")
    b = predict_maps(flipped, path, device="cpu")
    for name in ("cbf", "delay"):
        np.testing.assert_array_equal(b[name][:, ::-1], a[name])
    assert b.provenance["flipped_rows_columns"] == [True, False]
    old = load_checkpoint(path)
    del old["config"]["orientation"]
    as_stored = predict_maps(flipped, old, device="cpu")
    assert as_stored.provenance["flipped_rows_columns"] == [False, False]
    assert not np.array_equal(as_stored["cbf"], b["cbf"])


def test_a_study_on_an_offset_hu_scale_is_moved_back_for_the_network(trained):
    """The network learned calibrated HU: a study whose values were shifted by a constant (an
    intercept of -1000 applied for -1024) is moved back by the offset its brain's median shows,
    which the provenance records, instead of feeding the network inputs it never saw."""
    cohort, path = trained
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    hu = series.hu.copy()  # the cohort's disc of brain, given a skull and air around it
    _, _, ny, nx = hu.shape
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(yy - ny / 2 + 0.5, xx - nx / 2 + 0.5)
    hu[:, :, (r >= 0.42 * ny) & (r < 0.42 * ny + 1.2)] = 1000.0
    hu[:, :, r >= 0.42 * ny + 1.2] = -1000.0
    head = series.replace(hu=hu)
    assert predict_maps(head, path, device="cpu").provenance["hu_offset"] == 0.0
    b = predict_maps(head.replace(hu=hu - np.float32(30.0)), path, device="cpu")
    offset = b.provenance["hu_offset"]
    # the disc reads 30 HU: shifted by -30 it is moved back to the nominal 32 HU
    assert offset == pytest.approx(-32.0, abs=0.5)
    same = predict_maps(head.replace(hu=hu - np.float32(30.0 + offset)), path, device="cpu")
    assert same.provenance["hu_offset"] == 0.0
    for name in ("cbf", "delay"):
        # the same inputs up to float32 rounding of the constants added
        np.testing.assert_allclose(b[name], same[name], atol=1e-3)


def test_a_study_sampled_otherwise_is_resampled_to_the_training_spacing(trained):
    """The network takes every n-th frame; it reads the bolus's timing from the frame index.
    A study sampled at another rate is resampled onto the training studies' spacing (and says
    so), giving the maps of the same study acquired at that rate; one too short is refused."""
    cohort, ckpt = trained
    ckpt = load_checkpoint(ckpt)
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")  # 12 frames
    step = ckpt["config"]["input_step_s"]
    assert step == pytest.approx(2 * float(np.median(np.diff(series.times))))  # 12 -> 6 frames
    same = predict_maps(series, ckpt, device="cpu")
    assert same.provenance["input_note"] is None
    assert same.provenance["input_step_s"] == pytest.approx(step)
    # the same study with a frame between each pair (twice the rate): 6 frames per 2 steps
    mid = 0.5 * (series.hu[1:] + series.hu[:-1])
    hu = np.empty((2 * series.n_frames - 1, *series.shape[1:]), dtype=np.float32)
    hu[0::2], hu[1::2] = series.hu, mid
    t = np.interp(np.arange(hu.shape[0]) / 2.0, np.arange(series.n_frames), series.times)
    fast = predict_maps(series.replace(hu=hu, times=t), ckpt, device="cpu")
    assert fast.provenance["frame_mode"] == "resample" and "resampled" in fast.provenance[
        "input_note"]
    for name in same.names:  # the same input frames, up to float rounding
        np.testing.assert_allclose(fast[name], same[name], rtol=1e-4, atol=1e-4)
    short = series.replace(hu=series.hu[:7], times=series.times[:7])
    with pytest.raises(ValidationError, match="this study spans"):
        predict_maps(short, ckpt, device="cpu")
    # the median step the network's, but the frames it takes twice as far apart late in the
    # scan (a protocol slowing down): resampled too, not read as evenly spaced
    slow = series.times.copy()
    slow[8:] = slow[7] + 2.0 * (slow[8:] - slow[7])
    uneven = predict_maps(series.replace(times=slow), ckpt, device="cpu")
    assert uneven.provenance["frame_mode"] == "resample"
    assert "apart, so it was resampled" in uneven.provenance["input_note"]
    # the note gives the spread of the steps, not their median (which is the network's)
    assert f"frames {step:.2f}-{2 * step:.2f} s apart" in uneven.provenance["input_note"]
    # a scan a frame or two short of what the network takes: its last frame stands for the
    # rest, and the note says so
    cut = predict_maps(series.replace(hu=series.hu[:10], times=series.times[:10]), ckpt,
                       device="cpu")
    assert "its last frame stands for the last" in cut.provenance["input_note"]


def test_a_network_on_its_own_grid_refuses_a_study_too_short_for_it(trained):
    """A network trained with --frame-mode resample takes its frames on its own grid; a study
    a third as long as that grid had been predicted with its last frame repeated, exit 0 and
    no word (the subsampling networks' span check was skipped for it)."""
    cohort, path = trained
    ckpt = load_checkpoint(path)
    step = float(np.median(np.diff(read_nifti_series(
        cohort / "sub-0001" / "study.nii.gz").times)))
    own = {**ckpt, "config": {**ckpt["config"], "frame_mode": "resample",
                              "frame_interval": 2 * step}}  # 6 frames over the 12
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    # the checkpoint records its training studies' spans (the cohort's: 12 frames each)
    assert ckpt["config"]["study_span_s"][0] == pytest.approx(11 * step)
    assert predict_maps(series, own, device="cpu").provenance["input_note"] is None
    short = series.replace(hu=series.hu[:5], times=series.times[:5])
    with pytest.raises(ValidationError, match=r"takes 6 frames .* this study spans"):
        predict_maps(short, own, device="cpu")
    cut = predict_maps(series.replace(hu=series.hu[:10], times=series.times[:10]), own,
                       device="cpu")
    assert "its last frame stands for the last" in cut.provenance["input_note"]
    # trained on studies as short as this one (their last frames repeated too): predicted,
    # and said; a checkpoint that does not say how long its studies were judges the window
    span = float(short.times[-1] - short.times[0])
    alike = {**own, "config": {**own["config"], "study_span_s": [span, 2 * span]}}
    note = predict_maps(short, alike, device="cpu").provenance["input_note"]
    assert "its last frame stands for the last" in note
    # a checkpoint that does not record them (trained before) refuses under half its window
    unsaid = {**own, "config": {**own["config"], "study_span_s": None}}
    with pytest.raises(ValidationError, match="this study spans"):
        predict_maps(series.replace(hu=series.hu[:3], times=series.times[:3]), unsaid,
                     device="cpu")
    most = series.replace(hu=series.hu[:10], times=series.times[:10])
    assert "stands for the last" in predict_maps(most, unsaid, device="cpu").provenance[
        "input_note"]


def test_a_study_at_another_pixel_scale_is_said(trained, caplog):
    """The network learned one pixel scale: a study whose field of view, at the network's input
    size, gives pixels a quarter the size (a 512 px scan of a small field of view, resized)
    is predicted with a warning that its maps are unreliable; the training scale is not."""
    cohort, ckpt = trained
    ckpt = load_checkpoint(ckpt)
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    trained_mm = ckpt["config"]["pixel_mm"]
    assert trained_mm == pytest.approx(np.sqrt(series.spacing[1] * series.spacing[2]))
    assert predict_maps(series, ckpt, device="cpu").provenance["pixel_note"] is None
    small = series.affine.copy()
    small[:3, :2] /= 4.0  # the same 16 px, a field of view a quarter as wide
    with caplog.at_level("WARNING", logger="ctperf"):
        maps = predict_maps(series.replace(affine=small), ckpt, device="cpu")
    # pixels a quarter the size: the head covers four times the pixels it was trained on
    assert "4.00 times their trained size" in maps.provenance["pixel_note"]
    assert "unreliable" in caplog.text
    # a non-square crop resized to the square input is stretched across, not scaled: said so
    # (the geometric mean of the two pixels had stayed within the tolerance)
    narrow = predict_maps(series.replace(hu=series.hu[..., :11]), ckpt, device="cpu",
                          resize=True)
    assert "1.00 x 1.45 times their trained size, stretched" in narrow.provenance["pixel_note"]


def test_checkpoints_load_weights_only(trained):
    _, path = trained
    ckpt = torch.load(path, weights_only=True)  # would raise on any pickled Python object
    assert ckpt["format"] == "ctperf-unet" and "model" in ckpt


def test_a_run_folder_or_a_plain_pickle_given_as_the_model_is_refused_in_one_line(
        trained, tmp_path: Path, recwarn):
    """The train output folder as --model names the checkpoint to give; a pickle that is not
    weights is refused without torch's own two-line warning before the message."""
    import pickle

    _, path = trained
    with pytest.raises(InputError, match=r"is a folder, not a checkpoint file \(it holds "
                                         r"model\.pt.*: give .*model\.pt\)"):
        load_checkpoint(path.parent)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(InputError):
        load_checkpoint(plain)
    assert not [w for w in recwarn if "torch" in str(w.filename)]


def test_other_version_and_other_shapes_fail_clearly(trained, tmp_path: Path):
    cohort, path = trained
    ckpt = load_checkpoint(path)
    old = tmp_path / "old.pt"
    save_checkpoint({**ckpt, "format_version": 0}, old)
    with pytest.raises(InputError, match=r"format version 0.*reads version 1"):
        load_checkpoint(old)
    with pytest.raises(InputError, match="takes 6 frames, 10 were asked"):
        load_checkpoint(path, frames=10)
    with pytest.raises(InputError, match="trained on 16 x 16"):
        load_checkpoint(path, size=32)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not a ctperf U-Net checkpoint"):
        load_checkpoint(foreign)
    series = read_nifti_series(cohort / "sub-0000" / "study.nii.gz")
    big = series.replace(hu=np.tile(series.hu, (1, 1, 2, 2)))
    with pytest.raises(ValidationError, match="trained on 16 x 16 slices, the study has 32 x 32"):
        predict_maps(big, path, device="cpu")
    assert predict_maps(big, path, device="cpu", resize=True).shape == (2, 32, 32)
    short = series.replace(hu=series.hu[:4], times=series.times[:4])
    with pytest.raises(ValidationError, match=r"takes 6 frames .* this study spans"):
        predict_maps(short, path, device="cpu")


def test_cli_train_cv_predict(tmp_path: Path, capsys):
    cohort = make_cohort(tmp_path / "cohort", subjects=3, seed=4, size=16, frames=8)
    small = ["--reference", "truth", "--epochs", "1", "--pretrain-epochs", "0", "--width", "2",
             "--depth", "2", "--batch-size", "2", "--device", "cpu"]
    assert main(["train", str(cohort), str(tmp_path / "run"), "--target", "cbv", *small]) == 0
    assert "final train MSE" in capsys.readouterr().out
    assert (tmp_path / "run" / "cache").is_dir() and not (cohort / ".ctperf-cache").exists()
    (tmp_path / "test.txt").write_text("# held out\nsub-0002\n")
    assert main(["cv", str(cohort), str(tmp_path / "cv"), "--folds", "2", "--test",
                 str(tmp_path / "test.txt"), *small]) == 0
    out = capsys.readouterr().out
    assert "| mean +- SD |" in out and (tmp_path / "cv" / "table1.md").exists()
    header = (tmp_path / "cv" / "table1.csv").read_text().splitlines()[0]
    assert {"test_mse", "test_mse_paper"} <= set(header.split(","))
    cfg = load_checkpoint(tmp_path / "cv" / "fold-1" / "model.pt")["config"]
    assert "sub-0002" not in cfg["train_patients"] + cfg["val_patients"]
    study = cohort / "sub-0000" / "study.nii.gz"
    assert main(["predict", str(study), str(tmp_path / "maps"), "--model",
                 str(tmp_path / "run" / "model.pt"), "--device", "cpu", "--dicom"]) == 0
    assert any((tmp_path / "maps" / "dicom" / "cbv").iterdir())
    maps = read_maps(tmp_path / "maps")
    assert maps.names == ["cbv"] and maps.shape == (2, 16, 16)
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert summary["masks_given"] == {} and summary["training_seed"] == cfg["seed"]
    # bounded by the automatic brain mask, as `ctperf maps` is: air reads 0
    from ctperf.io import read_study, write_series_nifti
    from ctperf.masks import brain_mask

    series = read_study(study)
    hu = series.hu.copy()
    hu[:, :, :3] = -1000.0                                    # air in front of the head
    aired = write_series_nifti(series.replace(hu=hu), tmp_path / "aired.nii.gz")
    assert main(["predict", str(aired), str(tmp_path / "m3"), "--model",
                 str(tmp_path / "run" / "model.pt"), "--device", "cpu"]) == 0
    brain = brain_mask(read_study(aired))
    assert not brain[:, :3].any()
    cbv = read_maps(tmp_path / "m3")["cbv"]
    assert np.all(cbv[~brain] == 0) and np.any(cbv[brain] != 0)
    # a study without a head, or begun after the bolus reached its arteries, is refused as
    # `ctperf maps` refuses it, not predicted into blank or inflated maps
    air = write_series_nifti(series.replace(hu=np.full_like(series.hu, -1000.0)),
                             tmp_path / "air.nii.gz")
    assert main(["predict", str(air), str(tmp_path / "m4"), "--model",
                 str(tmp_path / "run" / "model.pt"), "--device", "cpu"]) == 2
    assert "no brain voxels found" in capsys.readouterr().err
    # a subject without its study is named, not left out of the folds
    (cohort / "sub-0001" / "study.nii.gz").rename(tmp_path / "kept.nii.gz")
    assert main(["train", str(cohort), str(tmp_path / "run2"), "--target", "cbv", *small]) == 2
    assert "sub-0001: no study.nii.gz" in capsys.readouterr().err
    (tmp_path / "kept.nii.gz").rename(cohort / "sub-0001" / "study.nii.gz")
    # a bad checkpoint is one line on stderr and exit status 2
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert main(["predict", str(study), str(tmp_path / "m2"), "--model",
                 str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt" in capsys.readouterr().err


def test_a_checkpoint_of_an_unfinished_run_is_said(trained, tmp_path: Path, caplog):
    """A run set to 3 epochs, stopped after 1 (its last.pt): predicted, with a warning; the
    finished model.pt predicts without one."""
    import logging

    cohort, model_path = trained
    study = cohort / "sub-0000" / "study.nii.gz"
    with caplog.at_level(logging.WARNING, logger="ctperf.workflow.study"):
        assert main(["predict", str(study), str(tmp_path / "done"), "--model",
                     str(model_path), "--device", "cpu"]) == 0
        assert not any("unfinished" in r.getMessage() for r in caplog.records)
        ckpt = load_checkpoint(model_path)
        ckpt["config"]["stages"] = [[name, size, 3] for name, size, _ in ckpt["config"]["stages"]]
        save_checkpoint(ckpt, tmp_path / "last.pt")
        assert main(["predict", str(study), str(tmp_path / "early"), "--model",
                     str(tmp_path / "last.pt"), "--device", "cpu"]) == 0
    assert any("epoch 1 of 3" in r.getMessage() for r in caplog.records)


def test_predicted_maps_keep_the_space_of_the_study(trained, tmp_path):
    """U-Net maps of a study whose header sets no orientation stay without one, as the
    model-based maps do (written as scanner space, they had stated a guessed orientation as
    fact)."""
    cohort, ckpt = trained
    series = read_nifti_series(cohort / "sub-0001" / "study.nii.gz")
    series = series.replace(meta={**series.meta, "nifti_xform_code": 0})
    study = write_series_nifti(series, tmp_path / "study.nii.gz")
    maps = predict_maps(read_nifti_series(study), ckpt, device="cpu")
    header = nib.load(str(write_maps_nifti(maps, tmp_path / "maps")[0])).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (0, 0)


def test_a_full_disk_while_training_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """numpy's and torch's own write errors on a full disk name no file and carry no errno (a
    traceback, exit 1): the slice cache and the checkpoint are named instead, as InputError."""
    import ctperf.model.data as data

    def full_numpy(*args, **kwargs):
        raise OSError("problem writing element 98304 to file")

    monkeypatch.setattr(data.np, "save", full_numpy)
    cohort = make_cohort(tmp_path / "cohort", subjects=1, size=16, frames=12)
    with pytest.raises(InputError, match=r"cache.*could not be written .*a full disk"):
        build_slice_cache(cohort, tmp_path / "cache", size=16, frames=6)
    monkeypatch.undo()

    def full_torch(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 248576")

    monkeypatch.setattr(torch, "save", full_torch)
    with pytest.raises(InputError, match=r"model\.pt: could not be written"):
        save_checkpoint({"config": {}}, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
