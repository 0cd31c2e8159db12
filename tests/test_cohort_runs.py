"""Cohort runs: study discovery, the manifest, reruns, failures, kills and Dask clusters."""

from __future__ import annotations

import json
import shutil

import pytest

from ctperf.errors import InputError
from ctperf.io import atomic_dir
from ctperf.workflow.cohort import (
    MANIFEST,
    Study,
    discover_studies,
    load_manifest,
    run_cohort,
)

CALLS: list[str] = []
STOP: dict[str, str | None] = {"at": None}


def _echo_task(source, target, options):
    """A study that writes its source text (in upper case when asked); 'bad' fails, and the
    study named ``STOP["at"]`` interrupts the run as Ctrl-C would."""
    if target.name == STOP["at"]:
        raise KeyboardInterrupt
    CALLS.append(target.name)
    if "bad" in str(source):
        raise InputError(source, "truncated file\n(second line)")
    if "bug" in str(source):
        raise ZeroDivisionError("division by zero")
    with atomic_dir(target) as tmp:
        text = str(source).upper() if options["upper"] else str(source)
        (tmp / "value.txt").write_text(text)


@pytest.fixture(autouse=True)
def _no_calls():
    CALLS.clear()
    STOP["at"] = None


def _studies(*names):
    return [Study(n, n) for n in names]


# --- discovery -------------------------------------------------------------------------------

def test_discover_studies_layouts_and_names(tmp_path):
    root = tmp_path / "cohort"
    (root / "sub-0000").mkdir(parents=True)
    (root / "sub-0000" / "study.nii.gz").write_bytes(b"x")       # phantom / preprocess layout
    (root / "sub-0000" / "truth").mkdir()
    (root / "dicom one").mkdir()                                 # a DICOM folder
    (root / "dicom one" / "IM0001").write_bytes(b"x")
    (root / "holder").mkdir()                                    # a folder holding one NIfTI
    (root / "holder" / "ctp.nii").write_bytes(b"x")
    (root / "patient#7.nii.gz").write_bytes(b"x")                # a NIfTI file + sidecar
    (root / "patient#7.json").write_text("{}")
    (root / "patient_7").mkdir()                                 # clashes once sanitised
    for ignored in (".hidden", ".ctperf-output", "cohort.json", MANIFEST, "notes.txt"):
        (root / ignored).write_text("")
    (root / ".ctperf-tmp.host.1.x.sub").mkdir()
    found = {s.name: s.source for s in discover_studies(root)}
    assert found == {"dicom_one": root / "dicom one", "holder": root / "holder" / "ctp.nii",
                     "patient_7": root / "patient#7.nii.gz", "patient_7-2": root / "patient_7",
                     "sub-0000": root / "sub-0000" / "study.nii.gz"}


def test_discover_refuses_an_empty_cohort_or_a_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme.txt").write_text("")
    with pytest.raises(InputError, match="holds no study"):
        discover_studies(tmp_path / "c")
    with pytest.raises(InputError, match="not a folder"):
        discover_studies(tmp_path / "c" / "readme.txt")


# --- the engine, in this process ---------------------------------------------------------------

def test_failures_are_recorded_and_reruns_skip_what_is_done(tmp_path):
    out = tmp_path / "out"
    summary = run_cohort(_studies("a", "bad", "c"), out, _echo_task, {"upper": False},
                         workers=1)
    assert summary.done == ("a", "c") and summary.skipped == ()
    assert summary.failed == {"bad": "bad: truncated file (second line)"}
    assert summary.exit_code == 1 and "3 studies: 2 done" in summary.text()
    assert (out / "a" / "value.txt").read_text() == "a" and not (out / "bad").exists()
    assert (out / ".ctperf-output").is_file()
    rows = json.loads((out / MANIFEST).read_text())["studies"]
    assert {n: r["state"] for n, r in rows.items()} == {"a": "done", "bad": "failed",
                                                        "c": "done"}
    assert rows["bad"]["error"] == "bad: truncated file (second line)"
    assert rows["a"]["started"] <= rows["a"]["finished"] and rows["a"]["ctperf_version"]

    CALLS.clear()
    again = run_cohort(_studies("a", "bad", "c"), out, _echo_task, {"upper": False}, workers=1)
    assert CALLS == ["bad"]  # only the failed study is tried again
    assert again.skipped == ("a", "c") and again.exit_code == 1
    assert load_manifest(out)["a"]["finished"] == rows["a"]["finished"]

    CALLS.clear()
    shutil.rmtree(out / "c")  # a done study whose folder is gone is done again
    assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": False}).done == ("c",)
    CALLS.clear()
    upper = run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True, "progress": True})
    assert upper.done == ("a", "c") and (out / "a" / "value.txt").read_text() == "A"
    CALLS.clear()  # progress does not change what is written: still done
    assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True}).skipped == ("a", "c")


def test_an_unexpected_exception_is_one_line_with_its_type(tmp_path):
    summary = run_cohort(_studies("bug"), tmp_path / "out", _echo_task, {"upper": False})
    assert summary.failed == {"bug": "ZeroDivisionError: division by zero"}


def test_an_interrupted_run_leaves_pending_studies_and_a_rerun_finishes_them(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        STOP["at"] = "b"
        run_cohort(_studies("a", "b", "c"), out, _echo_task, {"upper": False}, workers=1)
    STOP["at"] = None
    rows = load_manifest(out)
    assert [rows[n]["state"] for n in "abc"] == ["done", "pending", "pending"]
    assert not (out / "b").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".ctperf-tmp")] == []
    CALLS.clear()
    summary = run_cohort(_studies("a", "b", "c"), out, _echo_task, {"upper": False}, workers=1)
    assert CALLS == ["b", "c"] and summary.skipped == ("a",) and summary.exit_code == 0


def test_a_foreign_manifest_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"studies": []}))
    with pytest.raises(InputError, match="not a ctperf cohort manifest"):
        run_cohort(_studies("a"), out, _echo_task, {"upper": False})
