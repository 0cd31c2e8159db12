"""Cohort runs: study discovery, the manifest, reruns, failures, kills and Dask clusters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ctperf.errors import CTPerfError, InputError
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
    (root / "MOL-001_Registered_Filtered_3mm_20HU").mkdir()      # UniToBrain: input ...
    (root / "MOL-001_Registered_Filtered_3mm_20HU" / "IM1").write_bytes(b"x")
    (root / "MOL-001_Registered_Filtered_3mm_20HU_Maps").mkdir()  # ... and its maps, not a study
    (root / "MOL-002_Registered_Filtered_3mm_20HU_Maps" / "NLR_CBF").mkdir(parents=True)  # alone
    for ignored in (".hidden", ".ctperf-output", "cohort.json", MANIFEST, "notes.txt"):
        (root / ignored).write_text("")
    (root / ".ctperf-tmp.host.1.x.sub").mkdir()
    found = {s.name: s.source for s in discover_studies(root)}
    assert found == {"dicom_one": root / "dicom one", "holder": root / "holder" / "ctp.nii",
                     "MOL-001_Registered_Filtered_3mm_20HU":
                         root / "MOL-001_Registered_Filtered_3mm_20HU",
                     "patient_7": root / "patient#7.nii.gz", "patient_7-2": root / "patient_7",
                     "sub-0000": root / "sub-0000" / "study.nii.gz"}


def test_discover_refuses_an_empty_cohort_or_a_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme.txt").write_text("")
    with pytest.raises(InputError, match="holds no study"):
        discover_studies(tmp_path / "c")
    with pytest.raises(InputError, match="not a folder"):
        discover_studies(tmp_path / "c" / "readme.txt")


def _folder_task(source, target, options):
    """A study folder's ``id.txt``, copied to its output (a broken link fails as a reader's
    missing file does)."""
    path = Path(source) / "id.txt"
    if not path.is_file():
        raise InputError(source, "does not exist")
    with atomic_dir(target) as tmp:
        (tmp / "id.txt").write_text(path.read_text())


def test_a_study_keeps_its_name_when_a_clashing_one_is_added(tmp_path):
    """A folder "a b" added beside "a_b" had taken the name a_b, whose maps became a_b-2: a
    rerun left another patient's maps under a name the output held (exit 0). Names the
    manifest holds stay with their studies, which it records relative to COHORT; a new
    output names them afresh."""
    from ctperf.workflow.cohort import run_cohort_folder

    root, out = tmp_path / "cohort", tmp_path / "out"
    for folder, patient in (("a_b", "patient 0"), ("c", "patient 2")):
        (root / folder).mkdir(parents=True)
        (root / folder / "id.txt").write_text(patient)
    assert run_cohort_folder(root, out, _folder_task, {}, workers=1).done == ("a_b", "c")
    (root / "a b").mkdir()
    (root / "a b" / "id.txt").write_text("patient 1")
    again = run_cohort_folder(root, out, _folder_task, {}, workers=1)
    assert again.skipped == ("a_b", "c") and again.done == ("a_b-2",)
    assert (out / "a_b" / "id.txt").read_text() == "patient 0"
    assert (out / "a_b-2" / "id.txt").read_text() == "patient 1"
    assert {n: r["source"] for n, r in load_manifest(out).items()} == {
        "a_b": "a_b", "a_b-2": "a b", "c": "c"}
    fresh = run_cohort_folder(root, tmp_path / "fresh", _folder_task, {}, workers=1)
    assert fresh.done == ("a_b", "a_b-2", "c")  # sorted: "a b" first
    assert (tmp_path / "fresh" / "a_b" / "id.txt").read_text() == "patient 1"


def test_names_of_older_or_edited_manifests(tmp_path, caplog):
    """A review: rows from before inputs were recorded lost their names as before (a_c's maps
    moved to a_c-2), and a hand-edited name ('../escaped') wrote outside OUT. A row without
    its input keeps its name for the entry of that name; a name that is no clean name is not
    kept; a name whose input is gone and now another's is made again, with a warning."""
    from ctperf.workflow.cohort import run_cohort_folder

    root, out = tmp_path / "cohort", tmp_path / "out"
    for folder, patient in (("a_c", "patient 0"), ("d", "patient 3")):
        (root / folder).mkdir(parents=True)
        (root / folder / "id.txt").write_text(patient)
    run_cohort_folder(root, out, _folder_task, {}, workers=1)
    doc = json.loads((out / MANIFEST).read_text())
    for row in doc["studies"].values():
        del row["source"]  # as an older version wrote it
    doc["studies"]["../escaped"] = doc["studies"].pop("d")
    (out / MANIFEST).write_text(json.dumps(doc))
    (root / "a c").mkdir()
    (root / "a c" / "id.txt").write_text("patient 1")
    again = run_cohort_folder(root, out, _folder_task, {}, workers=1)
    assert again.skipped == ("a_c",) and again.done == ("a_c-2", "d")
    assert (out / "a_c" / "id.txt").read_text() == "patient 0"
    assert not (tmp_path / "escaped").exists() and (out / "d" / "id.txt").is_file()
    shutil.rmtree(root / "a_c")  # its name goes to another input: made again, and said
    (root / "a#c").mkdir()
    (root / "a#c" / "id.txt").write_text("patient 4")
    with caplog.at_level("WARNING"):
        last = run_cohort_folder(root, out, _folder_task, {}, workers=1)
    assert last.done == ("a_c",) and last.skipped == ("a_c-2", "d")  # "a c" keeps its name
    assert "a_c was made from a_c, now from a#c" in caplog.text


def test_a_broken_link_is_a_failed_study_not_a_missing_one(tmp_path, caplog):
    """A study linked to a store that is offline had been left out in silence: "1 studies:
    1 done", exit 0. It is a study that fails, named on stderr and in the manifest."""
    from ctperf.workflow.cohort import run_cohort_folder

    root = tmp_path / "cohort"
    (root / "a").mkdir(parents=True)
    (root / "a" / "id.txt").write_text("patient 0")
    (root / "gone").symlink_to(tmp_path / "offline" / "gone")
    (root / "gone.nii.gz").symlink_to(tmp_path / "offline" / "gone.nii.gz")
    (root / "notes.txt").symlink_to(tmp_path / "offline" / "notes.txt")  # no study's name
    # a DICOM folder named by its UID: a review found it left out, exit 0, by a first rule
    (root / "1.2.840.113619.2.55.3").symlink_to(tmp_path / "offline" / "1.2.840.113619.2.55.3")
    summary = run_cohort_folder(root, tmp_path / "out", _folder_task, {}, workers=1)
    assert summary.done == ("a",) and set(summary.failed) == {
        "gone", "gone-2", "1.2.840.113619.2.55.3"}
    assert summary.exit_code == 1
    assert "a link to" in caplog.text and "notes.txt" in caplog.text


def test_quiet_dask_hides_only_the_nannies_slow_stop(caplog):
    """The nannies' "still alive ... killing" after a successful run is hidden without -v; a
    first version hid every nanny warning, a worker restarted for its memory among them (a
    review: a frozen progress bar, no reason given)."""
    import logging

    from ctperf.workflow.cohort import _dask_quiet

    with caplog.at_level(logging.WARNING), _dask_quiet():
        logging.getLogger("distributed.nanny").warning(
            "Worker process still alive after 4.0 seconds, killing")
        logging.getLogger("distributed.nanny").warning("Restarting worker")
        logging.getLogger("distributed.nanny.memory").warning(
            "Worker exceeded 95% memory budget. Restarting...")
    assert [r.getMessage() for r in caplog.records] == [
        "Restarting worker", "Worker exceeded 95% memory budget. Restarting..."]


def test_a_rerun_with_other_options_says_so(tmp_path, caplog):
    """docs/cohorts.md promised a warning when changed options redo every study; only a
    change of version had one (a probe's nlr-fast cohort was replaced by ssvd in silence)."""
    out = tmp_path / "out"
    run_cohort(_studies("a", "c"), out, _echo_task, {"upper": False}, workers=1)
    with caplog.at_level("WARNING"):
        assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True},
                          workers=1).done == ("a", "c")
    assert "2 studies were done with other options (a, c): done again" in caplog.text



def test_a_path_option_said_relative_or_absolute_is_one_option(tmp_path, monkeypatch):
    """The options' hash had taken paths as typed: a mask said ``mask.nii.gz`` in one run
    and by its absolute path (or from the parent folder) in the next redid every study."""
    (tmp_path / "mask.nii.gz").write_bytes(b"mask")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    run_cohort(_studies("a"), out, _echo_task, {"upper": False, "mask": Path("mask.nii.gz")},
               workers=1)
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "mask.nii.gz")
    for said in (tmp_path / "mask.nii.gz", Path(tmp_path.name) / "mask.nii.gz",
                 tmp_path / "link.nii.gz"):
        assert run_cohort(_studies("a"), out, _echo_task, {"upper": False, "mask": said},
                          workers=1).skipped == ("a",)
    (tmp_path / "other.nii.gz").write_bytes(b"mask")  # another file, same size and time
    os.utime(tmp_path / "other.nii.gz", ns=((tmp_path / "mask.nii.gz").stat().st_mtime_ns,) * 2)
    assert run_cohort(_studies("a"), out, _echo_task,
                      {"upper": False, "mask": tmp_path / "other.nii.gz"},
                      workers=1).done == ("a",)

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
    assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": False},
                      workers=1).done == ("c",)
    CALLS.clear()
    upper = run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True, "progress": True},
                       workers=1)
    assert upper.done == ("a", "c") and (out / "a" / "value.txt").read_text() == "A"
    CALLS.clear()  # progress does not change what is written: still done
    assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True},
                      workers=1).skipped == ("a", "c")
    # a study done by another ctperf version is done again (its maps had been kept in silence)
    doc = json.loads((out / MANIFEST).read_text())
    doc["studies"]["a"]["ctperf_version"] = "0.0.9"
    (out / MANIFEST).write_text(json.dumps(doc))
    CALLS.clear()
    assert run_cohort(_studies("a", "c"), out, _echo_task, {"upper": True},
                      workers=1).done == ("a",)
    assert load_manifest(out)["a"]["ctperf_version"] != "0.0.9"


def _read_task(source, target, options):
    """A study whose output is its source file's text."""
    with atomic_dir(target) as tmp:
        (tmp / "value.txt").write_text(Path(source).read_text())


def _text_studies(tmp_path):
    """Studies a and b, each a text file ("first a", "first b") in ``tmp_path/in``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        (inputs / f"{name}.txt").write_text(f"first {name}")
    return inputs, [Study(n, str(inputs / f"{n}.txt")) for n in ("a", "b")]


def test_a_study_whose_input_changed_is_computed_again(tmp_path):
    """A study replaced since it was done had kept its stale maps (rerun: "already done",
    exit 0); the state of the files a source names is part of what makes it done."""
    inputs, studies = _text_studies(tmp_path)
    out = tmp_path / "out"
    assert run_cohort(studies, out, _read_task, {}, workers=1).done == ("a", "b")
    assert run_cohort(studies, out, _read_task, {}, workers=1).skipped == ("a", "b")
    (inputs / "b.txt").write_text("second b, replaced")  # another size
    again = run_cohort(studies, out, _read_task, {}, workers=1)
    assert again.done == ("b",) and again.skipped == ("a",)
    assert (out / "b" / "value.txt").read_text() == "second b, replaced"
    assert str(inputs) not in (out / MANIFEST).read_text()  # a digest, not the path


def _strict_read_task(source, target, options):
    """_read_task refusing a source that says it is damaged."""
    if "damaged" in Path(source).read_text():
        raise InputError(source, "damaged file")
    _read_task(source, target, options)


def test_a_changed_study_that_fails_keeps_its_folder_and_says_failed(tmp_path):
    """A done study whose input was replaced by a damaged file: the rerun fails it and leaves
    its earlier folder as it is (the failure may lie outside the study: another command's
    folder, a missing device), the manifest says failed; `ctperf evaluate` reads that
    (tests/test_evaluation_gaps.py)."""
    inputs, studies = _text_studies(tmp_path)
    out = tmp_path / "out"
    run_cohort(studies, out, _strict_read_task, {}, workers=1)
    (inputs / "b.txt").write_text("damaged, replaced")
    again = run_cohort(studies, out, _strict_read_task, {}, workers=1)
    assert again.skipped == ("a",) and set(again.failed) == {"b"}
    assert (out / "b" / "value.txt").read_text() == "first b"
    assert json.loads((out / MANIFEST).read_text())["studies"]["b"]["state"] == "failed"


def test_a_done_study_missing_an_output_file_is_computed_again(tmp_path):
    """A map deleted from a done study's folder: the rerun had said "already done", exit 0,
    the map still missing. The folder's marker lists what was written: the study is redone."""
    _, studies = _text_studies(tmp_path)
    out = tmp_path / "out"
    run_cohort(studies, out, _read_task, {}, workers=1)
    (out / "b" / "value.txt").unlink()
    again = run_cohort(studies, out, _read_task, {}, workers=1)
    assert again.skipped == ("a",) and again.done == ("b",)
    assert (out / "b" / "value.txt").read_text() == "first b"


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    """Two runs into one OUT had each rewritten the manifest from memory and replaced the
    other's studies, both exit 0: the folder's lock refuses the second; a lock whose process
    is gone is taken over."""
    from ctperf.io.state import LOCK

    out = tmp_path / "out"
    out.mkdir()
    (out / ".ctperf-output").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ctperf.io.state "
                               "import folder_lock\nwith folder_lock(sys.argv[1]):\n"
                               "    print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(InputError, match=rf"is being written by process {holder.pid}"):
            run_cohort(_studies("a"), out, _echo_task, {"upper": False}, workers=1)
    finally:
        holder.kill()                           # its run killed: the lock file stays
        holder.wait()
    assert CALLS == [] and not (out / MANIFEST).exists() and (out / LOCK).exists()
    assert run_cohort(_studies("a"), out, _echo_task, {"upper": False}, workers=1).done == ("a",)
    assert not (out / LOCK).exists()  # released at the end


def _several_series_task(source, target, options):
    raise InputError(source, "holds 2 series; choose one with --series UID: "
                             "1.2.826.0.1.3680043.8.498.25753 CT 'Perfusion Mueller Joerg' "
                             "(60 files)")


def test_the_manifest_leaves_out_uids_and_series_descriptions(tmp_path):
    """A failure listing a folder's series put their UIDs and descriptions (which may name the
    patient) into manifest.json; stderr keeps them, to choose a series from."""
    summary = run_cohort(_studies("a"), tmp_path / "out", _several_series_task, {}, workers=1)
    assert "Mueller" in summary.failed["a"]  # the command prints this
    saved = load_manifest(tmp_path / "out")["a"]["error"]
    assert saved == "a: holds 2 series; choose one with --series UID: <UID> CT '...' (60 files)"


def test_a_local_cluster_runs_the_studies_in_worker_processes(tmp_path, monkeypatch):
    import distributed
    import psutil

    listening: list[str] = []

    class Cluster(distributed.LocalCluster):
        """The local cluster, noting where this process (its scheduler) listens once up."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            listening.extend(c.laddr.ip for c in psutil.Process().net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN)

    monkeypatch.setattr(distributed, "LocalCluster", Cluster)
    out = tmp_path / "out"
    environment = dict(os.environ)
    summary = run_cohort(_studies("a", "bug", "c"), out, _echo_task, {"upper": True},
                         workers=2)
    # on this machine only: the scheduler's web server had listened on every interface,
    # serving the task keys (which name the studies: a folder named after the patient) to
    # the network with no login
    assert listening and set(listening) == {"127.0.0.1"}
    # Dask's nannies set their workers' OMP_NUM_THREADS=1, PYTHONHASHSEED, ... in this
    # process's environment: the caller's later subprocesses must not inherit them
    assert dict(os.environ) == environment
    assert summary.done == ("a", "c") and summary.failed == {
        "bug": "ZeroDivisionError: division by zero"}
    assert (out / "c" / "value.txt").read_text() == "C"
    assert CALLS == []  # not in this process
    assert {s: r["state"] for s, r in load_manifest(out).items()} == {
        "a": "done", "bug": "failed", "c": "done"}


def test_worker_processes_write_as_the_command_that_runs_them(tmp_path):
    """A review: subjects written by a local cluster's workers named no command, so a rerun
    in the command's own process (one study left to redo) refused them, and the reverse."""
    from ctperf.io.atomic import set_writer

    inputs, studies = _text_studies(tmp_path)
    out = tmp_path / "out"
    set_writer("ctperf maps")
    try:
        assert run_cohort(studies, out, _read_task, {}, workers=2).done == ("a", "b")
        assert "# command: ctperf maps" in (out / "b" / ".ctperf-output").read_text()
        (inputs / "b.txt").write_text("second b, replaced")  # one study to redo: in process
        again = run_cohort(studies, out, _read_task, {}, workers=1)
        assert again.done == ("b",) and not again.failed
        (inputs / "a.txt").write_text("second a")
        (inputs / "b.txt").write_text("third b")
        assert run_cohort(studies, out, _read_task, {}, workers=2).done == ("a", "b")
    finally:
        set_writer(None)
    assert (out / "b" / "value.txt").read_text() == "third b"


def test_an_unexpected_exception_is_one_line_with_its_type(tmp_path):
    summary = run_cohort(_studies("bug"), tmp_path / "out", _echo_task, {"upper": False},
                         workers=1)
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
    for text in (json.dumps({"studies": []}), "[1, 2]", json.dumps(
            {"format": "ctperf-cohort-manifest", "studies": {"a": {"state": "half"}}})):
        (out / MANIFEST).write_text(text)
        with pytest.raises(InputError, match="not a ctperf cohort manifest"):
            run_cohort(_studies("a"), out, _echo_task, {"upper": False}, workers=1)
    (out / MANIFEST).write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        run_cohort(_studies("a"), out, _echo_task, {"upper": False}, workers=1)
    assert CALLS == [] and not (out / "a").exists()


# --- ctperf maps --cohort on small phantoms --------------------------------------------------

# 32 px, 2 slices, 30 frames 2 s apart: a whole bolus in a study that maps in about a second
PHANTOM = {"size": 32, "slices": 2, "frames": 30, "frame_interval": 2.0, "anatomy": "procedural",
           "dicom": False}
MAPS = ["--method", "nlr-fast", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """sub-0000 and sub-0001: phantom studies; sub-0002: a truncated .nii.gz."""
    from ctperf.workflow import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root / "phantom", subjects=2, seed=1, workers=1, **PHANTOM)
    studies = root / "studies"
    for i in range(2):
        (studies / f"sub-000{i}").mkdir(parents=True)
        for name in ("study.nii.gz", "study.json"):
            shutil.copy(root / "phantom" / f"sub-000{i}" / name, studies / f"sub-000{i}")
    data = (studies / "sub-0001" / "study.nii.gz").read_bytes()
    (studies / "sub-0002").mkdir()
    (studies / "sub-0002" / "study.nii.gz").write_bytes(data[: len(data) // 2])
    return studies


def _rows(out):
    return json.loads((out / MANIFEST).read_text())["studies"]


def _maps_equal(a, b):
    from ctperf.io import read_maps

    for study in ("sub-0000", "sub-0001"):
        one, two = read_maps(a / study), read_maps(b / study)
        assert one.names == two.names
        for name in one.names:
            np.testing.assert_array_equal(one[name], two[name], err_msg=f"{study} {name}")


def test_maps_cohort_with_a_corrupt_study(cohort, tmp_path, capsys):
    from ctperf.cli import main

    out = tmp_path / "out"
    assert main(["maps", str(cohort), str(out), "--cohort", "--workers", "1", *MAPS]) == 1
    std = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [".ctperf-output", MANIFEST, "sub-0000",
                                                     "sub-0001"]
    for study in ("sub-0000", "sub-0001"):
        assert (out / study / "cbf.nii.gz").is_file() and (out / study / "summary.json").is_file()
    rows = _rows(out)
    assert [rows[s]["state"] for s in sorted(rows)] == ["done", "done", "failed"]
    assert rows["sub-0002"]["error"].startswith("sub-0002/study.nii.gz: damaged or truncated")
    assert str(cohort) not in (out / MANIFEST).read_text()  # no machine path
    errors = [line for line in std.err.splitlines()  # all but the progress bar
              if line.strip() and not line.startswith("cohort:")]
    assert errors == [f"ctperf maps: sub-0002: {rows['sub-0002']['error']}"]
    assert "3 studies: 2 done (0 already done), 1 failed" in std.out
    assert "Traceback" not in std.out + std.err

    # a rerun redoes nothing that is done (the corrupt study is tried again, and fails again)
    assert main(["maps", str(cohort), str(out), "--cohort", "--workers", "1", *MAPS]) == 1
    again = _rows(out)
    for study in ("sub-0000", "sub-0001"):
        assert again[study] == rows[study]
    assert again["sub-0002"]["finished"] > rows["sub-0002"]["finished"]
    assert "2 done (2 already done), 1 failed" in capsys.readouterr().out


def test_preprocess_and_predict_cohorts(cohort, tmp_path, capsys):
    """preprocess --cohort writes a cohort that maps --cohort reads (study.nii.gz in each
    folder); predict --cohort records a per-study failure for each study."""
    from ctperf.cli import main

    pre, maps = tmp_path / "pre", tmp_path / "maps"
    assert main(["preprocess", str(cohort), str(pre), "--cohort", "--workers", "1",
                 "--no-register"]) == 1
    assert (pre / "sub-0001" / "study.nii.gz").is_file() and not (pre / "sub-0002").exists()
    assert main(["maps", str(pre), str(maps), "--cohort", "--workers", "1", *MAPS]) == 0
    assert sorted(_rows(maps)) == ["sub-0000", "sub-0001"]
    assert json.loads((maps / "sub-0000" / "summary.json").read_text())["maps"]
    capsys.readouterr()
    assert main(["predict", str(cohort), str(tmp_path / "pred"), "--cohort", "--workers", "1",
                 "--model", str(tmp_path / "none.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("ctperf predict: sub-000") == 3 and "none.pt" in err


def test_cohort_output_is_checked_before_any_work(cohort, tmp_path, capsys):
    from ctperf.cli import main

    assert main(["maps", str(cohort), str(cohort / "out"), "--cohort"]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "a.pdf").write_bytes(b"%PDF")
    assert main(["maps", str(cohort), str(foreign), "--cohort"]) == 2
    assert sorted(p.name for p in foreign.iterdir()) == ["a.pdf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["maps", str(empty), str(tmp_path / "o"), "--cohort"]) == 2
    assert "holds no study" in capsys.readouterr().err


def _poll_until_one_done(proc, out, *, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(r["state"] == "done" for r in _rows(out).values()):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError("no study was done before the deadline")


def test_a_killed_run_is_finished_by_a_rerun(cohort, tmp_path):
    from ctperf.cli import main

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ctperf", "maps", str(cohort), str(out),
                             "--cohort", "--workers", "1", *MAPS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MPLBACKEND": "Agg"})
    try:
        _poll_until_one_done(proc, out, timeout_s=180)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = _rows(out)
    # studies run in name order: killed while the second one was computed
    assert {s: r["state"] for s, r in killed.items()} == {
        "sub-0000": "done", "sub-0001": "pending", "sub-0002": "pending"}
    assert not (out / "sub-0001").exists()
    assert main(["maps", str(cohort), str(out), "--cohort", "--workers", "1", *MAPS]) == 1
    rows = _rows(out)
    assert rows["sub-0000"] == killed["sub-0000"]  # not computed again
    assert rows["sub-0001"]["state"] == "done" and rows["sub-0002"]["state"] == "failed"
    assert rows["sub-0001"]["started"] > killed["sub-0000"]["finished"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".ctperf-tmp")] == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_existing_dask_cluster_gives_the_local_clusters_maps(cohort, tmp_path):
    from distributed import Client

    from ctperf.cli import main

    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["maps", str(cohort), str(local), "--cohort", "--workers", "2", *MAPS]) == 1
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path}
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **quiet)]
    try:
        procs.append(subprocess.Popen([*dask, "worker", address, "--nworkers", "1",
                                       "--nthreads", "1", "--no-dashboard"], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        assert main(["maps", str(cohort), str(remote), "--cohort", "--scheduler", address,
                     *MAPS]) == 1
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert {s: r["state"] for s, r in _rows(remote).items()} == {
        "sub-0000": "done", "sub-0001": "done", "sub-0002": "failed"}
    _maps_equal(local, remote)


def test_an_unreachable_scheduler_leaves_no_output(tmp_path, monkeypatch):
    """The scheduler is asked before OUT is made: a cluster that does not answer is one error
    naming it, and no OUT holding a manifest of studies 'pending' that were never sent."""
    import ctperf.workflow.cohort as cohort_module

    monkeypatch.setattr(cohort_module, "SCHEDULER_TIMEOUT_S", 1)
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    with pytest.raises(CTPerfError, match=f"cannot reach the Dask scheduler at {address}"):
        run_cohort(_studies("a", "b"), out, _echo_task, {"upper": False}, scheduler=address)
    assert not out.exists() and CALLS == []


def test_a_scheduler_that_never_answers_is_one_error(tmp_path, monkeypatch):
    """A server that accepts the connection and says nothing had held the command until
    Ctrl-C (Dask's own timeout did not end it): the connection now has a deadline."""
    import socket
    import time

    import ctperf.workflow.cohort as cohort_module

    monkeypatch.setattr(cohort_module, "SCHEDULER_TIMEOUT_S", 1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        out = tmp_path / "out"
        start = time.monotonic()
        with pytest.raises(CTPerfError, match=f"cannot reach the Dask scheduler at {address}"):
            run_cohort(_studies("a", "b"), out, _echo_task, {"upper": False},
                       scheduler=address)
        # the deadline (1 s and 5 more) and no more, with room for a busy machine
        assert time.monotonic() - start < 30
    assert not out.exists() and CALLS == []


def test_default_workers_one_per_two_cores(monkeypatch):
    # one study's threaded fits keep two cores busy (docs/cohorts.md, Throughput): a 2-core
    # machine runs in one process, a 16-core one on 8 workers; memory and the studies cap it
    import psutil

    import ctperf.workflow.cohort as cohort_module

    big = type("Memory", (), {"total": 64 * cohort_module.MEMORY_PER_WORKER})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: big)
    monkeypatch.setattr(cohort_module, "usable_cores", lambda: 2)
    assert cohort_module.worker_count(10) == 1
    monkeypatch.setattr(cohort_module, "usable_cores", lambda: 16)
    assert cohort_module.worker_count(10) == 8
    assert cohort_module.worker_count(3) == 3
    assert cohort_module.worker_count(10, workers=5) == 5
    small = type("Memory", (), {"total": 3 * cohort_module.MEMORY_PER_WORKER})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    assert cohort_module.worker_count(10) == 3


def _warning_task(source, target, options):
    """A study that warns, as the AIF search does, and then writes its output."""
    import logging

    logging.getLogger("ctperf.perfusion.inputs").warning("automatic VOF rejected (%s)", "why")
    _echo_task(source, target, {"upper": False})


def test_a_cohorts_warnings_name_their_study(tmp_path, caplog):
    """Warnings made while a study runs begin with its name (a cohort's 'automatic VOF
    rejected' had named none); the process's other records are left as they are."""
    import logging

    with caplog.at_level(logging.WARNING):
        run_cohort(_studies("a", "b%"), tmp_path / "out", _warning_task, {}, workers=1)
        logging.getLogger("ctperf.elsewhere").warning("after the cohort")
    said = [r.getMessage() for r in caplog.records]
    assert "a: automatic VOF rejected (why)" in said and "b%: automatic VOF rejected (why)" in said
    assert "after the cohort" in said


def test_study_names_in_the_logs_hold_per_thread(caplog):
    """A Dask worker of several threads runs studies at once: each thread's records carry its
    own study (a swapped global factory had written 'b: a: ...' and kept naming study a after
    both ended)."""
    import logging
    import threading

    from ctperf.workflow.cohort import _logs_named

    inside = threading.Barrier(2)

    def study(name):
        with _logs_named(name):
            inside.wait(timeout=10)  # both studies running
            logging.getLogger("ctperf.x").warning("warning of %s", name)
            inside.wait(timeout=10)

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=study, args=(n,)) for n in ("a", "b")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        logging.getLogger("ctperf.x").warning("after both")
    said = sorted(r.getMessage() for r in caplog.records)
    assert said == ["a: warning of a", "after both", "b: warning of b"]


def test_a_workers_warnings_still_reach_its_stderr_when_kept():
    """Keeping a study's warnings for the client must not silence them where it runs: a
    handler on ctperf's logger had stopped Python's last-resort printing in worker processes
    that configure no logging (a local cluster's warnings vanished from the terminal, an
    external worker's from its log)."""
    code = ("import logging\nfrom ctperf.workflow.cohort import _logs_named\n"
            "with _logs_named('a') as said:\n"
            "    logging.getLogger('ctperf.x').warning('automatic VOF rejected')\n"
            "print(said)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.strip() == "['a: automatic VOF rejected']"
    assert "a: automatic VOF rejected" in run.stderr


def test_an_existing_clusters_studies_get_absolute_paths(tmp_path, monkeypatch):
    """`ctperf maps cohort out --cohort --scheduler ...` with relative paths had failed every
    study ("no such file"): the cluster's workers run in folders of their own. Sources, the
    cohort folder, OUT and the options' paths go to them absolute; other sources as they are."""
    import dataclasses

    from ctperf.workflow.cohort import _absolute, _run_study

    @dataclasses.dataclass(frozen=True)
    class Options:
        brain_mask: Path | None
        method: str = "bsvd"

    monkeypatch.chdir(tmp_path)
    todo = [Study("a", Path("cohort") / "a.nii.gz", Path("cohort")), Study("b", "cohort/b"),
            Study("sub-0000", 0)]
    got, out, options = _absolute(todo, Path("out"), Options(Path("masks/brain.nii.gz")))
    assert got[0].source == tmp_path / "cohort" / "a.nii.gz" and got[0].root == tmp_path / "cohort"
    assert got[1].source == str(tmp_path / "cohort" / "b") and got[1].root is None
    assert got[2] == todo[2]
    assert out == tmp_path / "out"
    assert options == Options(tmp_path / "masks" / "brain.nii.gz")

    def bad_mask(source, target, options):
        raise InputError(options.brain_mask, "mask grid differs from the study's")

    # the paths made absolute are left out of the manifest's error as the cohort's are
    row = _run_study(bad_mask, got[0], out / "a", options, base=str(tmp_path))
    assert row["error"] == "masks/brain.nii.gz: mask grid differs from the study's"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # a path said from another folder keeps its '..'
    _, _, up = _absolute([], Path("out"), Options(Path("../masks/brain.nii.gz")))
    row = _run_study(bad_mask, got[0], out / "a", up, base=str(tmp_path / "work"))
    assert row["error"] == "../masks/brain.nii.gz: mask grid differs from the study's"
    # a folder is left out where a path begins, not inside another path
    elsewhere = Options(Path("/mnt") / tmp_path.relative_to("/") / "masks" / "brain.nii.gz")
    row = _run_study(bad_mask, got[0], out / "a", elsewhere, base=str(tmp_path))
    assert row["error"].startswith(f"{elsewhere.brain_mask}: ")


def test_studies_at_once_in_one_worker_each_keep_their_writer(tmp_path):
    """A Dask worker of two threads runs two studies at once: the first to end had set the
    process's writer back to none under the other, whose folder then named no command (a
    review: a rerun refused it, "holds the output of ..."). Each thread writes as its own."""
    import threading

    from ctperf.io.atomic import current_writer
    from ctperf.workflow.cohort import _run_study

    seen, both = {}, threading.Barrier(2)

    def task(source, target, options):
        both.wait(timeout=10)
        if source == "slow":
            both.wait(timeout=10)  # the fast study has ended
        seen[source] = current_writer()
        _echo_task(source, target, {"upper": False})

    def run(name):
        _run_study(task, Study(name, name), tmp_path / name, {}, writer="ctperf maps")
        if name == "fast":
            both.wait(timeout=10)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("fast", "slow")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"fast": "ctperf maps", "slow": "ctperf maps"}
    assert current_writer() is None


def test_a_cluster_of_another_ctperf_version_is_refused(tmp_path):
    """A worker one commit behind the client had failed every study with a TypeError (a
    review), and another version maps differently: refused before OUT is made."""
    from ctperf.versioning import software_version
    from ctperf.workflow.cohort import _same_version

    class Client:
        def __init__(self, answer):
            self.answer = answer

        def run(self, fn):
            if isinstance(self.answer, Exception):
                raise self.answer
            return {"tcp://w1": self.answer, "tcp://w2": software_version()}

    _same_version(Client(software_version()), "tcp://h:1")
    with pytest.raises(CTPerfError, match=r"run ctperf 0\.0\.1, this is .*install the same"):
        _same_version(Client("0.0.1"), "tcp://h:1")
    with pytest.raises(CTPerfError, match="could not say their ctperf version"):
        _same_version(Client(ModuleNotFoundError("No module named 'ctperf'")), "tcp://h:1")


def test_warnings_of_studies_on_another_cluster_are_said_here(tmp_path, caplog):
    """With --scheduler the studies' warnings (an automatic VOF rejected...) had been written
    in the workers' logs only, on the cluster's machines: the client says them too, named by
    study, and the manifest keeps none of them (it may be shared)."""
    import logging

    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address="127.0.0.1:0") as cluster, \
            caplog.at_level(logging.WARNING):
        summary = run_cohort(_studies("a", "b"), tmp_path / "out", _warning_task, {},
                             scheduler=cluster.scheduler_address)
    assert summary.done == ("a", "b")
    here = sorted(r.getMessage() for r in caplog.records
                  if r.name == "ctperf.workflow.cohort")
    assert here == ["a: automatic VOF rejected (why)", "b: automatic VOF rejected (why)"]
    assert "warnings" not in _rows(tmp_path / "out")["a"]


def _flag_task(source, target, options):
    """A study whose maps raise the QC flags its source names ('a,b'; '' none)."""
    from ctperf.workflow.study import StudyOutcome

    with atomic_dir(target) as tmp:
        (tmp / "value.txt").write_text(str(source))
    return StudyOutcome(out=target, message="", summary={
        "qc_flags": [f for f in str(source).split(",") if f]})


def test_the_qc_flags_of_a_cohorts_studies_are_said_and_kept(tmp_path):
    """`ctperf maps --cohort` had said only "N done, M failed": a study's QC flags (no_vof,
    truncation...) were in its summary.json alone. The summary names each flagged study, the
    manifest keeps its flags, and a rerun that skips it says them again."""
    studies = [Study("a", "no_vof,truncation"), Study("b", ""), Study("c", "motion")]
    first = run_cohort(studies, tmp_path / "out", _flag_task, {}, workers=1)
    assert first.flagged == {"a": ["no_vof", "truncation"], "c": ["motion"]}
    assert first.flag_lines() == ["a: QC flags: no_vof, truncation", "c: QC flags: motion"]
    assert _rows(tmp_path / "out")["b"]["qc_flags"] == []
    again = run_cohort(studies, tmp_path / "out", _flag_task, {}, workers=1)
    assert again.skipped == ("a", "b", "c") and again.flagged == first.flagged


def test_the_software_version_changes_with_the_code(tmp_path):
    """Records said "0.1.0" for 339 commits whose maps differed (CBV 32.4 against 21.4 on one
    study), so a cohort's one-version guard never fired: the version carries a digest of the
    package's files, which any change to them moves and compiled caches do not."""
    import ctperf
    from ctperf.versioning import software_version, source_digest

    assert software_version().startswith(ctperf.__version__ + "+src.")
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("")
    before = source_digest(package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert source_digest(package) == before
    # what a wheel does not ship, or a checkout's line endings, changes nothing: an editor's
    # backup had made one code two versions (and refused the cohort it had made)
    (package / "a.py~").write_text("x = 0\n")
    (package / ".a.py.swp").write_bytes(b"\0")
    (package / ".mypy_cache").mkdir()
    (package / ".mypy_cache" / "c.py").write_text("y = 1\n")
    (package / "a.py").write_bytes(b"x = 1\r\n")
    assert source_digest(package) == before
    (package / "a.py").write_text("x = 2\n")
    assert source_digest(package) != before
    (package / "c.py").write_text("z = 1\n")
    after = source_digest(package)
    (package / "c.py").chmod(0)                # unreadable: named, not fatal
    try:
        assert source_digest(package) not in (after, before) or os.geteuid() == 0
    finally:
        (package / "c.py").chmod(0o644)


def test_a_path_field_given_as_a_string_is_hashed_as_its_file(tmp_path):
    """``MapsOptions(brain_mask="m.nii.gz")`` in Python: the string was not taken for a file,
    so an edited mask left the hash, and a cohort's stale maps, as they were."""
    from ctperf.workflow import MapsOptions
    from ctperf.workflow.cohort import options_hash
    from ctperf.workflow.study import maps_study

    mask = tmp_path / "m.nii.gz"
    mask.write_bytes(b"first")
    options = MapsOptions(brain_mask=str(mask))  # type: ignore[arg-type]
    before = options_hash(maps_study, options)
    mask.write_bytes(b"a second mask")
    after = options_hash(maps_study, options)
    assert after != before
    # and counts as its file, as a Path does: said absolute or relative, one option
    assert options_hash(maps_study, MapsOptions(brain_mask=mask)) == after
