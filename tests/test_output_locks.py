"""A run holds its output for its whole length: a second run into the same output refuses to
start, and a lock left by a killed run is no obstacle."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctperf.cli import main
from ctperf.errors import InputError
from ctperf.io import atomic_dir
from ctperf.io.state import LOCK, folder_lock, output_lock

_HOLDER = """
import sys, time
from pathlib import Path
from ctperf.io.state import folder_lock, output_lock
lock = folder_lock if sys.argv[1] == "folder" else output_lock
with lock(Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(kind: str, path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s lock (``kind`` "folder" or "output")."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, kind, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_command_into_an_output_being_written_refuses_to_start(tmp_path, capsys):
    """Three `ctperf maps` of different studies into one OUT had all exited 0, the last one's
    maps replacing the others' without a word. While one holds OUT, another is refused
    before it reads anything (exit 2, one line); once the first is gone (killed, its lock
    file left behind) the next runs."""
    out = tmp_path / "maps"
    holder = _hold("output", out)
    try:
        code = main(["phantom", str(out), "--size", "32", "--slices", "1", "--frames", "20"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and err.count("\n") == 1
        assert not out.exists()
    finally:
        _kill(holder)
    assert (tmp_path / f".maps{LOCK}").exists()           # what the killed run left
    assert main(["phantom", str(out), "--size", "32", "--slices", "1", "--frames", "20"]) == 0
    assert not (tmp_path / f".maps{LOCK}").exists()       # released at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]


def test_a_refused_phantom_cohort_run_leaves_the_running_ones_record(tmp_path):
    """A second `ctperf phantom` into a cohort being written was refused only after it had
    rewritten cohort.json with its own seed: the first run's cohort then refused its own
    rerun. The lock is now taken before the record is read or written."""
    from ctperf.workflow.phantoms import generate_cohort

    out = tmp_path / "cohort"
    out.mkdir()
    (out / "cohort.json").write_text(json.dumps({"subjects": 2, "seed": 1, "options": {}}))
    holder = _hold("output", out)
    try:
        with pytest.raises(InputError, match="is being written by process"):
            generate_cohort(out, subjects=2, seed=2, size=32, slices=1, frames=20)
    finally:
        _kill(holder)
    assert json.loads((out / "cohort.json").read_text())["seed"] == 1


def test_training_into_a_folder_being_trained_is_refused(tmp_path):
    """Two `ctperf train` runs into one OUT had both exited 0, leaving best.pt from one and
    last.pt, model.pt and log.csv from the other."""
    from ctperf.model import preset
    from ctperf.workflow.training import TrainingOptions, train_cohort

    out = tmp_path / "run"
    holder = _hold("output", out)
    try:
        with pytest.raises(InputError, match="is being written by process"):
            train_cohort(tmp_path / "no-cohort", out, preset("cpu"), TrainingOptions())
    finally:
        _kill(holder)


def test_a_folder_lock_goes_with_its_process(tmp_path):
    """A cohort's folder lock held by a live process refuses; the same lock file left by a
    killed process is taken, and removed at the end."""
    holder = _hold("folder", tmp_path)
    try:
        with pytest.raises(InputError, match=f"is being written by process {holder.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        _kill(holder)
    assert (tmp_path / LOCK).exists()
    with folder_lock(tmp_path), output_lock(tmp_path / "a"), output_lock(tmp_path / "a"):
        pass                                    # re-entrant within one process
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _race(folder: str, barrier, queue) -> None:
    barrier.wait()
    try:
        with folder_lock(Path(folder)):
            queue.put(("got", time.monotonic()))
            time.sleep(0.2)
            queue.put(("left", time.monotonic()))
    except InputError:
        queue.put(("refused", time.monotonic()))


def test_runs_starting_together_on_a_killed_runs_lock_hold_it_one_at_a_time(tmp_path):
    """Taking over a dead run's lock was read, unlink, create: in 21 of 150 trials two of
    three runs starting together held the folder at once. Now no two hold it together."""
    ctx = mp.get_context("fork")
    dead = ctx.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    for trial in range(20):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / LOCK).write_text(f"{os.uname().nodename} {dead.pid}\n")
        barrier, queue = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(folder), barrier, queue))
                 for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        events = []
        while len(events) < 3 or not queue.empty():
            events.append(queue.get(timeout=30))
        holding = 0
        for kind, _ in sorted(events, key=lambda e: e[1]):
            holding += {"got": 1, "left": -1}.get(kind, 0)
            assert holding <= 1, (trial, events)


def test_an_output_name_long_in_bytes_is_written(tmp_path):
    """A 240-byte name of 80 three-byte characters failed after the whole fit ("File name too
    long", naming ctperf's temporary): the temporary's name was kept under 160 characters,
    not bytes."""
    target = tmp_path / ("脑" * 80)
    with atomic_dir(target) as tmp:
        (tmp / "cbf.txt").write_text("1")
    assert (target / "cbf.txt").read_text() == "1"


def test_a_second_thread_writing_the_same_output_is_refused(tmp_path):
    """The lock was re-entrant per process: two threads both entered, and the first to leave
    removed the lock under the second (a KeyError). Re-entrant per thread now; another thread
    is refused as another process is."""
    import threading

    entered, results = threading.Event(), []

    def first():
        with output_lock(tmp_path / "out"):
            entered.set()
            time.sleep(0.5)
        results.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with pytest.raises(InputError, match="is being written by process"):
        with output_lock(tmp_path / "out"):
            pass
    thread.join()
    assert results == ["first done"] and list(tmp_path.iterdir()) == []


def test_the_demo_holds_its_output(tmp_path):
    """`ctperf demo` with its default output took no lock (the CLI saw no OUT): the demo takes
    it itself, before any work."""
    from ctperf.workflow.demo import DemoOptions, run_demo

    holder = _hold("output", tmp_path / "demo")
    try:
        with pytest.raises(InputError, match="is being written by process"):
            run_demo(tmp_path / "demo", DemoOptions())
    finally:
        _kill(holder)


def test_a_long_name_keeps_its_extensions_in_the_temporary():
    """A name over 160 bytes with an early dot ("Dr. ...") lost `.nii.gz` in its temporary's
    name, and nibabel, which reads the format from it, failed after the whole conversion."""
    from ctperf.io.atomic import _temp_suffix

    assert _temp_suffix("Dr. " + "検" * 60 + ".nii.gz") == ".nii.gz"
    assert _temp_suffix("Pat. " + "x" * 180 + ".csv") == ".csv"
    assert _temp_suffix("x" * 200) == ""
