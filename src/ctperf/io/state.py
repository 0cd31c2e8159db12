"""The state of the files a run reads, and a lock on the folder a run writes.

A run that continues what another left (a cohort's manifest, a shared slice cache) must know
whether its inputs are still the ones it computed from, and that no other run is writing the
same folder at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctperf.errors import InputError
from ctperf.io.atomic import _pid_alive

__all__ = ["LOCK", "MANIFEST", "MANIFEST_FORMAT", "MANIFEST_STATES", "files_state",
           "folder_lock", "load_manifest"]

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


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.ctperf-lock`` while a run writes ``folder``: a second run refused while
    the first is alive (two cohort runs into one folder had each rewritten the manifest from
    its own memory and replaced the other's studies, both exiting 0). A lock left by a process
    of this host that no longer runs is taken over.

    Raises
    ------
    InputError
        Another live run (this host's, or any other host's) holds the lock.
    """
    lock = Path(folder) / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _holder(lock)
            if (attempt == 0 and holder is not None and holder[0] == socket.gethostname()
                    and not _pid_alive(holder[1])):
                lock.unlink(missing_ok=True)  # its run ended without releasing it
                continue
            who = (f"process {holder[1]} on {holder[0]}" if holder is not None
                   else "another run")
            raise InputError(folder, f"is being written by {who} ({LOCK}); wait for it to "
                                     f"end, or delete {LOCK} if that run is gone") from None
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    try:
        yield lock
    finally:
        if _holder(lock) == (socket.gethostname(), os.getpid()):
            lock.unlink(missing_ok=True)


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
