"""map_chunks: results in chunk order, first error raised with the rest cancelled, bar, workers."""

from __future__ import annotations

import re
import threading
import time

import pytest

from ctperf.errors import ValidationError
from ctperf.parallel import map_chunks

LOCK = threading.Lock()


def test_results_in_chunk_order_whatever_finishes_first():
    def work(start: int, stop: int) -> list[int]:
        time.sleep(0.02 * (10 - start) / 10)  # early chunks finish last
        return list(range(start, stop))

    got = map_chunks(work, 10, chunk=3, workers=4)
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_every_item_once_for_any_chunk():
    for n, chunk in [(0, 1), (1, 5), (7, 7), (8, 3), (100, 1)]:
        seen: list[int] = []

        def work(start: int, stop: int, seen: list[int] = seen) -> None:
            with LOCK:
                seen.extend(range(start, stop))

        out = map_chunks(work, n, chunk=chunk, workers=3)
        assert sorted(seen) == list(range(n))
        assert len(out) == -(-n // chunk)


def test_one_worker_runs_in_the_calling_thread():
    names = map_chunks(lambda s, e: threading.current_thread().name, 5, chunk=2, workers=1)
    assert names == [threading.current_thread().name] * 3


def test_several_workers_run_concurrently():
    barrier = threading.Barrier(2, timeout=5)

    def work(start: int, stop: int) -> int:
        barrier.wait()  # only passes when two chunks run at the same time
        return start

    assert map_chunks(work, 2, chunk=1, workers=2) == [0, 1]


def test_first_exception_propagates_and_pending_chunks_are_cancelled():
    started: list[int] = []

    def work(start: int, stop: int) -> int:
        started.append(start)
        if start == 0:
            raise KeyError("chunk 0 failed")
        time.sleep(0.01)
        return start

    with pytest.raises(KeyError, match="chunk 0 failed"):
        map_chunks(work, 200, chunk=1, workers=2)
    # Chunk 0 fails at once; the one other worker gets through at most a few chunks before
    # the pool cancels the rest (a generous bound: timing on a loaded machine varies).
    assert len(started) < 100


def test_exception_with_one_worker_stops_at_once():
    started: list[int] = []

    def work(start: int, stop: int) -> None:
        started.append(start)
        if start == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        map_chunks(work, 10, chunk=1, workers=1)
    assert started == [0, 1, 2]


def test_progress_bar_counts_items(capsys):
    map_chunks(lambda s, e: None, 10, chunk=4, workers=2, progress=True, desc="test", unit="px")
    err = capsys.readouterr().err
    assert "test" in err and "100%" in err
    map_chunks(lambda s, e: None, 10, chunk=4, workers=2)
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_progress_bar_advances_while_chunks_run(capsys):
    """The bar counts each chunk when it finishes, not all of them at the end."""
    map_chunks(lambda s, e: time.sleep(0.15), 8, chunk=1, workers=2, progress=True,
               desc="test")
    states = set(re.findall(r"(\d+)%", capsys.readouterr().err)) - {"0", "100"}
    # four pairs of chunks end 0.15 s apart, more than tqdm's 0.1 s between redraws; a bar
    # updated only at the end shows one state between 0 and 100 %
    assert len(states) >= 2, states


def test_invalid_arguments():
    with pytest.raises(ValidationError, match="chunk"):
        map_chunks(lambda s, e: None, 5, chunk=0)
    with pytest.raises(ValidationError, match="workers"):
        map_chunks(lambda s, e: None, 5, chunk=1, workers=0)
    with pytest.raises(ValidationError, match="n_items"):
        map_chunks(lambda s, e: None, -1, chunk=1)


def test_interrupt_cancels_the_chunks_not_started():
    started: list[int] = []

    def work(start: int, stop: int) -> None:
        started.append(start)
        if start == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, reaching the caller
        time.sleep(0.01)

    with pytest.raises(KeyboardInterrupt):
        map_chunks(work, 200, chunk=1, workers=2)
    # the chunks queued behind the interrupt never start (a generous bound, as above)
    assert len(started) < 100


def _blas_threads() -> list[int]:
    import numpy as np
    from threadpoolctl import threadpool_info

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_blas_held_to_one_thread_while_several_workers_run():
    # two workers each starting as many BLAS threads as there are cores oversubscribe the CPU;
    # the pool holds BLAS to one thread and gives the setting back afterwards
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see")
    inside = map_chunks(lambda s, e: _blas_threads(), 4, chunk=1, workers=2)
    assert all(n == [1] * len(before) for n in inside)
    assert _blas_threads() == before


@pytest.mark.parametrize("first_ends_first", [False, True])
def test_overlapping_pools_of_two_threads_restore_the_blas_setting(first_ends_first):
    # pools started from two threads, ending in either order: BLAS stays at one thread while
    # either runs, and the setting before both comes back when both are done
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see")
    started = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    seen: list[list[int]] = []

    def pool(k: int) -> None:
        def work(start: int, stop: int) -> None:
            started[k].set()
            assert release[k].wait(10)
            with LOCK:
                seen.append(_blas_threads())
        map_chunks(work, 2, chunk=1, workers=2)

    threads = [threading.Thread(target=pool, args=(k,)) for k in (0, 1)]
    threads[0].start()
    assert started[0].wait(10)
    threads[1].start()
    assert started[1].wait(10)
    order = (0, 1) if first_ends_first else (1, 0)
    for k in order:
        release[k].set()
        threads[k].join()
        if k == order[0]:
            assert _blas_threads() == [1] * len(before)    # the other pool still runs
    assert all(n == [1] * len(before) for n in seen)
    assert _blas_threads() == before


def test_default_workers_are_the_cores_this_process_may_use(monkeypatch):
    # a batch job or a container allotted one core of a large machine runs one thread
    import os

    import ctperf.parallel as parallel

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel.usable_cores() == 1
    threads = set()
    map_chunks(lambda a, b: threads.add(threading.get_ident()), 8, chunk=1)
    assert threads == {threading.get_ident()}  # one worker: the calling thread


def test_no_progress_bar_is_made_without_progress(monkeypatch):
    # even a disabled tqdm bar creates tqdm's process-wide lock (a semaphore that spawned
    # pools report as leaked at their shutdown)
    import tqdm.auto

    def refuse(*args, **kwargs):
        raise AssertionError("a bar was made")

    monkeypatch.setattr(tqdm.auto, "tqdm", refuse)
    assert map_chunks(lambda a, b: b - a, 10, chunk=3, workers=2) == [3, 3, 3, 1]


def test_importing_the_package_leaves_the_environment_alone():
    # threadpoolctl's import sets KMP_DUPLICATE_LIB_OK: it waits for the first pool
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KMP_DUPLICATE_LIB_OK"}
    code = ("import os, ctperf.parallel, ctperf.perfusion, ctperf.workflow; "
            "print(os.environ.get('KMP_DUPLICATE_LIB_OK'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "None"
