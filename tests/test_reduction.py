"""The reduced-data experiment (:mod:`ctperf.workflow.reduction`): its options, tables and
figure, and one tiny end-to-end run (slow) that checks the plumbing, not the accuracy
(docs/reduced_data.md has the measured figures)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.workflow.reduction import (
    CONDITIONS,
    REDUCTION_MAPS,
    ReductionOptions,
    reduction_table,
    run_reduction,
)
from ctperf.workflow.reproduce import ReproduceOptions


def _doc(conditions: list[str], estimates: list[str]) -> dict:
    rows = []
    for k, c in enumerate(conditions):
        for j, e in enumerate(estimates):
            for name in REDUCTION_MAPS:
                rows.append({"condition": c, "estimate": e, "map": name, "unit": "u",
                             "pearson_r": 0.9 - 0.1 * k - 0.01 * j, "mae": 1.0 + k,
                             "bias": -0.5 * j, "subjects": 3})
            for lesion in ("hypoperfused", "core"):
                rows.append({"condition": c, "estimate": e, "lesion": lesion,
                             "dice": None if lesion == "core" else 0.8 - 0.1 * k,
                             "dice_subjects": 2, "volume_error_ml": 1.5 * j,
                             "volume_abs_error_ml": 2.0 + j})
    return {"conditions": {c: CONDITIONS[c] for c in conditions}, "rows": rows}


def test_options_are_checked():
    with pytest.raises(ValidationError, match="conditions"):
        ReductionOptions(conditions=("low dose",))
    with pytest.raises(ValidationError, match="too few"):
        ReductionOptions(subjects=5)


def test_table_has_a_row_per_estimate_and_a_column_per_condition():
    conditions = ["standard", "half frames"]
    text = reduction_table(_doc(conditions, ["U-Net (NLR-trained)", "bsvd"]))
    blocks = text.strip().split("\n\n")
    # three maps and two lesions, each a title line then a table
    assert len(blocks) == 2 * (len(REDUCTION_MAPS) + 2)
    cbv = blocks[1].splitlines()
    assert cbv[0] == "| estimate | standard | half frames |"
    assert cbv[2] == "| U-Net (NLR-trained) | 0.90 / 1 / +0 | 0.80 / 2 / +0 |"
    assert cbv[3].startswith("| bsvd | 0.89 / 1 / -0.5 |")
    core = blocks[-1].splitlines()
    assert core[3] == "| bsvd | - / +1.5 | - / +1.5 |"  # no Dice without a true core


def test_figure_draws_every_estimate(tmp_path: Path):
    from ctperf.reporting import reduction_figure, save_figure

    doc = _doc(list(CONDITIONS), ["U-Net (NLR-trained)", "nlr", "bayes"])
    fig = reduction_figure(doc, title="t")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["U-Net (NLR-trained)", "nlr", "bayes"]
    np.testing.assert_allclose(lines[0].get_ydata(), [0.9, 0.8, 0.7, 0.6])
    save_figure(fig, tmp_path / "r.png", dpi=60)
    assert (tmp_path / "r.png").stat().st_size > 5_000


@pytest.mark.slow
def test_tiny_reduction_run_end_to_end(tmp_path: Path, monkeypatch):
    import ctperf.model

    tiny = replace(ctperf.model.PRESETS["cpu"], width=4, depth=2, device="cpu")
    monkeypatch.setattr(ctperf.model, "preset", lambda name: tiny)  # plumbing only
    options = ReductionOptions(subjects=6, size=64, slices=2, seed=5, epochs=1,
                               conditions=("standard", "half dose, half frames"),
                               methods=("bsvd",), reproduce=ReproduceOptions(
                                   register=False, workers=1, device="cpu", folds=3))
    doc = run_reduction(tmp_path / "out", options)
    saved = json.loads((tmp_path / "out" / "reduction.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    estimates = {"U-Net (NLR-trained)", "U-Net (truth-trained)", "nlr", "bsvd"}
    for condition in options.conditions:
        rows = [r for r in doc["rows"] if r["condition"] == condition]
        assert {r["estimate"] for r in rows} == estimates
        for row in (r for r in rows if "map" in r):
            assert row["subjects"] == 6 and row["mae"] is not None and row["mae"] >= 0
        # the model-based maps follow the truth; the one-epoch network need not
        nlr_cbv = next(r for r in rows if r["estimate"] == "nlr" and r.get("map") == "cbv")
        assert nlr_cbv["pearson_r"] > 0.3
    # the truth-trained networks learned the phantom's truth: their checkpoints say so
    half = tmp_path / "out" / "half-dose-half-frames"
    record = json.loads((half / "truth-trained" / "reproduce.json").read_text())
    assert record["settings"]["options"]["reference"] == "truth"
    assert record["settings"]["config"]["frames"] == 45  # every frame of the acquisition
    standard = json.loads((tmp_path / "out" / "standard" / "nlr-trained" / "reproduce.json")
                          .read_text())
    assert standard["settings"]["config"]["frames"] == 89
    # a rerun reuses everything
    again = run_reduction(tmp_path / "out", options)
    assert again["rows"] == doc["rows"]
