"""``ctperf demo``: the whole pipeline on a phantom, run in-process."""

from __future__ import annotations

import json
import math

from ctperf.cli import main


def _finite_numbers(node: object) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _finite_numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _finite_numbers(v)]
    if isinstance(node, float):
        return [node]
    return []


def test_demo_tiny_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--size", "64", "--slices", "2", "--frames", "40",
                 "--motion", "none"]) == 0
    for rel in ("report.md", "evaluation.json", "comparison.png", "maps/overview.png",
                "maps/summary.json", "maps/cbf.nii.gz", "maps/lesions/core.nii.gz",
                "phantom/preview.png"):
        assert (out / rel).is_file(), rel
    scores = json.loads((out / "evaluation.json").read_text())
    for name in ("cbf", "cbv", "mtt", "tmax"):
        brain = scores["maps"][name]["brain"]
        assert brain["n"] > 0
        assert all(math.isfinite(brain[k]) for k in ("mae", "bias", "pearson_r"))
    assert scores["phantom"]["shape"] == [40, 2, 64, 64]
    assert "comparison.png" in (out / "report.md").read_text()
    # no half-written sibling folders left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_rejects_bad_size(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "d"), "--size", "0"]) == 2
    assert not (tmp_path / "d").exists()
