"""Patient-level folds and the cross-validation table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ctperf.errors import InputError, ValidationError
from ctperf.model import TrainConfig, build_slice_cache, cross_validate, format_table, make_folds
from test_model_data import make_cohort

IDS = [f"p{i:02d}" for i in range(11)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_never_share_a_patient_and_cover_all(k: int):
    folds = make_folds(IDS, k=k, seed=4)
    assert len(folds) == k
    vals = [set(v) for _, v in folds]
    for tr, va in folds:
        assert not set(tr) & set(va)
        assert set(tr) | set(va) == set(IDS)
    for i in range(k):
        for j in range(i + 1, k):
            assert not vals[i] & vals[j]
    assert sorted(len(v) for v in vals)[-1] - sorted(len(v) for v in vals)[0] <= 1


def test_folds_are_deterministic_from_the_seed_and_order_free():
    assert make_folds(IDS, seed=1) == make_folds(list(reversed(IDS)), seed=1)
    assert make_folds(IDS, seed=1) != make_folds(IDS, seed=2)


def test_test_patients_are_in_no_fold():
    folds = make_folds(IDS, k=3, seed=0, test_patients=["p03", "p07"])
    for tr, va in folds:
        assert not {"p03", "p07"} & (set(tr) | set(va))


def test_fold_errors():
    with pytest.raises(ValidationError, match="unique"):
        make_folds(["a", "a", "b"], k=2)
    with pytest.raises(ValidationError, match="folds must be 2 to 2"):
        make_folds(["a", "b", "c"], k=3, test_patients=["c"])
    with pytest.raises(ValidationError, match=r"at least 2 patients .* has 1"):
        make_folds(["a", "b"], k=2, test_patients=["b"])
    with pytest.raises(ValidationError, match="not in the cohort"):
        make_folds(["a", "b"], k=2, test_patients=["z"])


def test_format_table_mean_and_sd():
    rows = [{"fold": 1, "train_mse": 0.010, "val_mse": 0.012},
            {"fold": 2, "train_mse": 0.012, "val_mse": 0.016}]
    text = format_table(rows, target="cbv")
    # mean of (0.012, 0.016) = 0.014, sample SD = 0.004 / sqrt(2) = 0.0028
    assert "| mean +- SD | 0.0110 +- 0.0014 | 0.0140 +- 0.0028 |" in text
    assert "ctperf windows" in text and "paper" not in text
    paper = [{**r, "train_mse_paper": r["train_mse"] / 4, "val_mse_paper": r["val_mse"] / 4}
             for r in rows]
    text = format_table(paper, target="cbv")
    assert "train MSE (paper min-max*)" in text and "validation MSE (ctperf windows)" in text
    # 0.011 / 4 = 0.00275 prints as 0.0027 (binary float just below the half)
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean"))
    assert mean_row.endswith("| 0.0027 +- 0.0004 | 0.0035 +- 0.0007 |")
    assert "references beyond a window count at its edge" in text  # what the * means
    # held-out patients' MSE is a column of its own when the rows have it
    tested = [{**r, "test_mse": 0.02, "test_mse_paper": 0.005} for r in paper]
    text = format_table(tested, target="cbv")
    assert "| test MSE (ctperf windows) |" in text and "test MSE (paper min-max*)" in text


def test_paper_scale_from_window_and_dataset_range():
    from ctperf.model.crossval import paper_scale

    meta = {"windows": {"cbv": [0.0, 10.0]}, "image_ranges": {"cbv": [0.0, 40.0]}}
    # a 0-10 window against a 0-40 data set range: differences shrink 4x, squared 16x
    assert paper_scale(meta, "cbv") == pytest.approx(1 / 16)
    assert paper_scale({"windows": meta["windows"]}, "cbv") is None  # an older cache


def test_paper_mse_per_channel_equals_pooled_mse_at_unit_scale(tmp_path: Path):
    import torch

    from ctperf.model.crossval import _paper_mse
    from ctperf.model.train import evaluate_mse

    cohort = make_cohort(tmp_path / "cohort", subjects=2, seed=1, size=16, frames=8)
    cache = build_slice_cache(cohort, tmp_path / "cache", size=16, frames=8)
    assert set(cache.meta["image_ranges"]) >= {"cbv", "ttp"}

    class Constant(torch.nn.Module):  # channel 0 predicts 0.2, channel 1 predicts 0.7
        def forward(self, x):
            shape = (x.shape[0], 1, *x.shape[2:])
            return torch.cat([torch.full(shape, 0.2), torch.full(shape, 0.7)], dim=1)

    stats = cache.input_stats(cache.patient_ids)
    kw = {"target_idx": [cache.target_index("cbv"), cache.target_index("ttp")],
          "mean": stats[0], "std": stats[1], "masked": True, "device": "cpu"}
    rows = cache.rows(cache.patient_ids)
    pooled = evaluate_mse(Constant(), cache, rows, **kw)
    # both targets share the loss mask, so the mean of per-channel MSEs is the pooled MSE
    got = _paper_mse(Constant(), cache, rows, pooled, [1.0, 1.0], kw)
    assert got == pytest.approx(pooled, rel=1e-6)  # float32 sums in two orders
    assert _paper_mse(Constant(), cache, rows, pooled, [1.0, None], kw) is None
    assert _paper_mse(Constant(), cache, rows, 0.5, [0.25], kw) == 0.125


def test_cross_validate_writes_table(tmp_path: Path):
    cohort = make_cohort(tmp_path / "cohort", subjects=4, seed=2, size=16, frames=8)
    cache = build_slice_cache(cohort, tmp_path / "cache", size=16, frames=8)
    config = TrainConfig(targets=("cbv", "ttp"), epochs=1, width=2, depth=2, batch_size=2,
                         lr=1e-3, seed=0, device="cpu")
    rows = cross_validate(cache, tmp_path / "cv", config, folds=2, test_patients=["sub-0003"])
    assert [r["fold"] for r in rows] == [1, 2]
    assert all(r["n_train"] + r["n_val"] == 3 for r in rows)
    assert all(0 < r["val_mse"] < 1 and 0 < r["test_mse"] < 1 for r in rows)
    # the paper's scale depends on this tiny cohort's ranges (ttp spans only a few seconds, so
    # its min-max MSE is larger than the window MSE); _paper_mse is checked exactly above
    assert all(np.isfinite(r["val_mse_paper"]) and r["val_mse_paper"] > 0 for r in rows)
    csv_text = (tmp_path / "cv" / "table1.csv").read_text().splitlines()
    assert csv_text[0] == ("fold,n_train,n_val,train_mse,val_mse,test_mse,train_mse_paper,"
                           "val_mse_paper,test_mse_paper") and len(csv_text) == 3
    assert "CBV+TTP" in (tmp_path / "cv" / "table1.md").read_text()
    assert (tmp_path / "cv" / "fold-2" / "model.pt").exists()
    # continued: the same folds give the same table; another split or other settings are
    # refused, naming what differs (a finished fold's model had been scored, unchecked, on
    # validation patients it trained on)
    again = cross_validate(cache, tmp_path / "cv", config, folds=2,
                           test_patients=["sub-0003"], resume=True)
    assert again == rows
    with pytest.raises(InputError, match=r"cannot resume with different settings.*"
                                         r"train_patients differ"):
        cross_validate(cache, tmp_path / "cv", config, folds=2, resume=True)  # sub-0003 joins
    with pytest.raises(InputError, match="cannot resume with different settings"):
        cross_validate(cache, tmp_path / "cv", replace(config, epochs=3), folds=2,
                       test_patients=["sub-0003"], resume=True)


def test_more_folds_than_patients_is_refused_before_the_references(tmp_path):
    """5 folds of a 3-subject cohort: refused before any reference or cache is computed (it
    had been refused after them, leaving references/ and cache/), nothing written."""
    from ctperf.workflow.training import cross_validate_cohort

    for i in range(3):  # only the layout is read: the studies are never opened
        (tmp_path / "cohort" / f"sub-{i:04d}").mkdir(parents=True)
        (tmp_path / "cohort" / f"sub-{i:04d}" / "study.nii.gz").write_bytes(b"")
    with pytest.raises(ValidationError, match=r"folds must be 2 to 3 .* got 5"):
        cross_validate_cohort(tmp_path / "cohort", tmp_path / "cv", TrainConfig(), folds=5)
    assert not (tmp_path / "cv").exists()


def test_pretraining_without_a_size_is_refused_before_the_references(tmp_path):
    """Pretraining epochs with a pretraining size of 0 (the cpu preset's): refused before the
    references and the cache (it had been refused after them), naming the option."""
    from ctperf.workflow.training import train_cohort

    for i in range(3):  # only the layout is read: the studies are never opened
        (tmp_path / "cohort" / f"sub-{i:04d}").mkdir(parents=True)
        (tmp_path / "cohort" / f"sub-{i:04d}" / "study.nii.gz").write_bytes(b"")
    config = TrainConfig(pretrain_epochs=1, pretrain_size=0)
    with pytest.raises(ValidationError, match=r"pretraining size of 1 or more \(--pretrain-size"):
        train_cohort(tmp_path / "cohort", tmp_path / "train", config)
    assert not (tmp_path / "train").exists()


def test_a_mistyped_held_out_id_or_an_absent_gpu_is_refused_before_any_work(tmp_path):
    """A held-out id that names no subject, or a CUDA device torch does not see: refused before
    the references and caches (they had been computed first, 56 NIfTIs left behind)."""
    import torch

    from ctperf.workflow.training import TrainingOptions, cross_validate_cohort, train_cohort

    for i in range(3):
        (tmp_path / "cohort" / f"sub-{i:04d}").mkdir(parents=True)
        (tmp_path / "cohort" / f"sub-{i:04d}" / "study.nii.gz").write_bytes(b"")
    typo = TrainingOptions(test_patients=("sub-9999",))
    with pytest.raises(InputError, match="held-out patient sub-9999 not in the cohort"):
        train_cohort(tmp_path / "cohort", tmp_path / "train", TrainConfig(), typo)
    with pytest.raises(InputError, match="held-out patient sub-9999 not in the cohort"):
        cross_validate_cohort(tmp_path / "cohort", tmp_path / "cv", TrainConfig(), typo, folds=2)
    everyone = TrainingOptions(test_patients=tuple(f"sub-{i:04d}" for i in range(3)))
    for run in (lambda: train_cohort(tmp_path / "cohort", tmp_path / "train", TrainConfig(),
                                     everyone),
                lambda: cross_validate_cohort(tmp_path / "cohort", tmp_path / "cv",
                                              TrainConfig(), everyone, folds=2)):
        with pytest.raises(ValidationError, match="every one of the cohort's 3 patients is "
                                                  "held out"):
            run()
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="torch sees no CUDA"):
            train_cohort(tmp_path / "cohort", tmp_path / "train", TrainConfig(device="cuda"))
    assert not (tmp_path / "train").exists() and not (tmp_path / "cv").exists()


def test_a_slice_cache_given_as_a_file_is_refused_in_one_line(tmp_path):
    """--cache naming a file: refused before OUT is made (it had read "File exists" and left
    OUT holding only its marker)."""
    from ctperf.workflow.training import TrainingOptions, train_cohort

    (tmp_path / "cohort" / "sub-0000").mkdir(parents=True)
    (tmp_path / "cohort" / "sub-0000" / "study.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"notes\.txt: exists and is a file"):
        train_cohort(tmp_path / "cohort", tmp_path / "train", TrainConfig(device="cpu"),
                     TrainingOptions(cache=tmp_path / "notes.txt"))
    assert not (tmp_path / "train").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
