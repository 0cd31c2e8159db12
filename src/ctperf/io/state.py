"""The state of the files a run reads, and a lock on the folder a run writes.

A run that continues what another left (a cohort's manifest, a shared slice cache) must know
whether its inputs are still the ones it computed from, and that no other run is writing the
same folder at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ctperf.errors import InputError

__all__ = ["LOCK", "MANIFEST", "MANIFEST_FORMAT", "MANIFEST_STATES", "files_state",
           "folder_lock", "holds_output", "load_manifest", "output_lock"]

log = logging.getLogger(__name__)

#: The lock file a running cohort holds in its output folder.
LOCK = ".ctperf-lock"

#: The record a cohort run keeps in its output folder of each study's state
#: (:mod:`ctperf.workflow.cohort` writes it; ``ctperf evaluate`` reads it), its format's name
#: and the states a study may be in.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ctperf-cohort-manifest"
MANIFEST_STATES = ("pending", "done", "failed")

#: Files beside studies and maps that no run reads (a cohort runner rewrites its manifest on
#: every run; figures and notes are outputs).
_NOT_READ = (MANIFEST, "cohort.json")
_NOT_READ_SUFFIXES = (".png", ".html", ".md", ".txt", ".csv", ".log")


def files_state(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of ``path`` (a file) or of the files
    under it (a folder) that may be studies or maps: not hidden ones, manifests, figures or
    notes. A study or map replaced since changes it; [] for a path that does not exist."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for item in path.rglob("*") if path.is_dir() else ():
        rel = item.relative_to(path)
        if (any(part.startswith(".") for part in rel.parts) or not item.is_file()
                or item.name in _NOT_READ or item.suffix.lower() in _NOT_READ_SUFFIXES):
            continue
        st = item.stat()
        out.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _holder(lock: Path) -> tuple[str, int] | None:
    """(host, pid) written in a lock file, None when it cannot be read."""
    try:
        host, _, pid = lock.read_text().strip().partition(" ")
        return host, int(pid)
    except (OSError, ValueError):
        return None


#: Locks held in this process, with the thread holding each: a run's inner steps take the
#: lock their command already holds; another thread is refused, as another process is, by
#: the kernel.
_HELD: set[tuple[Path, int]] = set()


def _take(lock: Path, what: Path, *, required: bool) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive ``flock``; None where the file
    system keeps no locks (a warning says so), or, when not ``required``, where the lock file
    cannot be made (the run then meets the folder's own refusal).

    A lock lives as long as its holder's process: the kernel lets it go when that process
    ends, however it ends, so the file a killed run leaves is simply taken by the next.
    The holder removes the file before letting it go; a run that opened the file just before
    (its lock then on a file no longer in the folder) sees this and opens it again.
    """
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:
            if required:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(lock)
            who = (f"process {holder[1]} on {holder[0]}" if holder is not None
                   else "another run")
            raise InputError(what, f"is being written by {who}; wait for it to end, or "
                                   "choose another output") from None
        except OSError as exc:                  # a file system without locks (some NFS)
            os.close(fd)
            log.warning("%s: cannot lock (%s): a second run into it would not be noticed",
                        what, exc.strerror)
            return None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise InputError(what, f"could not take its lock {lock.name}: it kept being replaced")


@contextlib.contextmanager
def _hold(lock: Path, what: Path, *, required: bool = True) -> Iterator[Path]:
    """Hold ``lock`` (re-entrant within one thread) while a run writes ``what``."""
    key = (lock.absolute(), threading.get_ident())
    if key in _HELD:                            # the outermost holder lets it go
        yield lock
        return
    fd = _take(lock, what, required=required)
    if fd is None:
        yield lock
        return
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield lock
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            lock.unlink()                       # before letting go: see _take
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.ctperf-lock`` while a run writes ``folder``: a second run refused while
    the first is alive (two cohort runs into one folder had each rewritten the manifest from
    its own memory and replaced the other's studies, both exiting 0). The lock goes with the
    process that holds it, however that process ends.

    Raises
    ------
    InputError
        Another live run (of this host or, on a file system that shares locks, any other)
        holds the lock.
    """
    with _hold(Path(folder) / LOCK, Path(folder)) as lock:
        yield lock


def _sibling_lock(path: Path) -> Path:
    """The lock file beside ``path``: ``.<name>.ctperf-lock`` (a digest for long names)."""
    name = f".{path.name}{LOCK}"
    if len(name.encode()) > 200:
        name = f"{LOCK}.{hashlib.sha1(path.name.encode()).hexdigest()[:16]}"
    return path.parent / name


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a lock beside ``out`` (a file or a folder, existing or not) for a whole run, so
    that a second run writing the same output refuses to start instead of both running and
    the last one's output silently replacing the first's. Parent folders it has to make for
    the lock and that stay empty are removed again.

    Raises
    ------
    InputError
        Another live run holds the lock.
    """
    path = Path(os.path.abspath(out))             # "a/b/.." and "a" share one lock
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        made = []                               # the command's own checks say why
    try:
        with _hold(_sibling_lock(path), Path(out), required=False):
            yield
    finally:
        for folder in made:                     # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def load_manifest(out: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The per-study rows of ``OUT/manifest.json`` (empty when there is none).

    Raises
    ------
    InputError
        The file exists but is not a ctperf cohort manifest.
    """
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc}); delete it to start the cohort "
                               "again") from None
    studies = data.get("studies") if isinstance(data, dict) else None
    if not isinstance(studies, dict) or data.get("format") != MANIFEST_FORMAT or not all(
            isinstance(row, dict) and row.get("state") in MANIFEST_STATES
            for row in studies.values()):
        raise InputError(path, "is not a ctperf cohort manifest; delete it or choose another "
                               "output folder")
    return studies


_P = ParamSpec("_P")
_R = TypeVar("_R")


def holds_output(name: str = "out") -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a function that writes the output its argument ``name`` names: it runs
    holding :func:`output_lock` on it, from its first check to its last write."""
    def decorate(func: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with output_lock(signature.bind(*args, **kwargs).arguments[name]):
                return func(*args, **kwargs)
        return run
    return decorate
