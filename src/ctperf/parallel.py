"""One way to run work over chunks of items in threads, with an optional progress bar.

Threads, not processes: the work this package spreads over workers is NumPy, SciPy, SimpleITK
and DICOM decoding, which release the GIL in their heavy parts, and threads share the inputs
and the output arrays without copies. While the workers run, the BLAS library's own threads are
held to one (threadpoolctl): each worker's matrix products then run on its own core instead of
every worker starting as many BLAS threads as there are cores.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

from ctperf.errors import ValidationError

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController

__all__ = ["map_chunks", "usable_cores"]

R = TypeVar("R")


def map_chunks(fn: Callable[[int, int], R], n_items: int, *, chunk: int,
               workers: int | None = None, progress: bool = False, desc: str = "",
               unit: str = "item") -> list[R]:
    """Call ``fn(start, stop)`` on consecutive chunks of ``range(n_items)`` in a thread pool.

    Parameters
    ----------
    fn : callable ``(start, stop) -> R``
        Work on items ``start:stop``. Chunks run concurrently, so ``fn`` may write only to
        the part of a shared output that its own chunk owns.
    n_items : int
        Number of items (voxels, frames, files, ...); 0 runs nothing.
    chunk : int
        Items per call (the last chunk may be shorter), at least 1.
    workers : int, optional
        Threads; default :func:`usable_cores`. Never more than there are chunks. With 1 the
        chunks run one after the other in the calling thread (no pool).
    progress : bool
        Show a tqdm bar that counts items as their chunks finish.
    desc, unit : str
        The bar's label and the name of its items.

    Returns
    -------
    list
        The results of ``fn``, one per chunk, in the order of the chunks (whatever the order
        in which they finished).

    Raises
    ------
    Exception
        The first exception raised by ``fn`` (first to occur, not first in chunk order), after
        the chunks not yet started are cancelled and the running ones have finished. The same
        happens on ``KeyboardInterrupt``.
    """
    if n_items < 0:
        raise ValidationError(f"n_items must be >= 0, got {n_items}")
    if chunk < 1:
        raise ValidationError(f"chunk must be >= 1, got {chunk}")
    if workers is not None and workers < 1:
        raise ValidationError(f"workers must be >= 1, got {workers}")
    bounds = [(s, min(s + chunk, n_items)) for s in range(0, n_items, chunk)]
    n_workers = min(workers or usable_cores(), max(1, len(bounds)))
    # no bar at all without progress: even a disabled one creates tqdm's process-wide lock
    with _bar(n_items, desc, unit) if progress else nullcontext(None) as bar:
        update = bar.update if bar is not None else _count_nothing
        if n_workers == 1:
            results = []
            for start, stop in bounds:
                results.append(fn(start, stop))
                update(stop - start)
            return results
        with _blas_single_thread():
            return _run_pool(fn, bounds, n_workers, update)


def _bar(n_items: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    # SI prefixes (12.3k) for many items such as voxels, plain counts for frames and files
    return tqdm(total=n_items, desc=desc or None, unit=unit, unit_scale=n_items >= 10_000)


def _count_nothing(count: int) -> None:
    """The progress update of a run without a bar."""


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system has one (a batch
    job's or a container's allocation), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _run_pool(fn: Callable[[int, int], R], bounds: list[tuple[int, int]], n_workers: int,
              done: Callable[[int], object]) -> list[R]:
    """Run the chunks in ``n_workers`` threads; ``done(count)`` after each finished chunk."""
    pool = ThreadPoolExecutor(max_workers=n_workers)
    try:
        futures: dict[Future[R], tuple[int, int]] = {
            pool.submit(fn, start, stop): (start, stop) for start, stop in bounds}
        pending = set(futures)
        while pending:
            # every chunk as it finishes: the bar advances, and a failed chunk stops the rest
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                fut.result()  # raises the chunk's exception, if any
                start, stop = futures[fut]
                done(stop - start)
        return [fut.result() for fut in futures]
    finally:
        # On success nothing is left to cancel; on an error or an interrupt the chunks not yet
        # started are dropped and the running ones finish before the exception goes on.
        pool.shutdown(wait=True, cancel_futures=True)


_LOCK = threading.Lock()
_HELD: dict[str, Any] = {"pools": 0, "limiter": None}


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The thread pools of the libraries loaded at the first call (finding them takes a few
    milliseconds, so it is done once). threadpoolctl is imported here, not with this module:
    its import sets ``KMP_DUPLICATE_LIB_OK`` in the environment, which a program that only
    imports ctperf should not find changed."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def _blas_single_thread() -> Iterator[None]:
    """BLAS held to one thread while any pool runs: the first pool to start sets the limit and
    the last to finish restores the setting, whichever threads started them (pools of two
    threads may end in either order; a limit per pool would leave the first pool's value
    behind when the pools cross).

    OpenBLAS without OpenMP has one thread pool for the process, and threadpoolctl lets only
    one Python thread (the first to set it) change it; the pools here may start and end in
    different threads, so that claim is released before each change, under a lock.
    """
    with _LOCK:
        if _HELD["pools"] == 0:
            _release_blas_claim()
            _HELD["limiter"] = _blas_controller().limit(limits=1, user_api="blas")
        _HELD["pools"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _HELD["pools"] -= 1
            if _HELD["pools"] == 0:
                _release_blas_claim()
                _HELD["limiter"].restore_original_limits()
                _release_blas_claim()
                _HELD["limiter"] = None


def _release_blas_claim() -> None:
    """Let the calling thread set OpenBLAS's threads (threadpoolctl >= 3.6 keeps a claim)."""
    import threadpoolctl

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
