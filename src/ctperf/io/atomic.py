"""Safe outputs: checks before a run, write-then-rename while it runs, cleanup after a kill.

Three rules keep a command from destroying data it did not make:

- :func:`check_output` runs before anything is read or computed and refuses an output that is,
  contains or lies inside an input, the current folder, a filesystem root, a file where a folder
  is expected (or the reverse), or a place that cannot be written.
- :func:`atomic_dir` writes a marker file (``.ctperf-output``, naming the command, see
  :func:`set_writer`, and listing what it wrote) into every folder it creates and replaces an
  existing folder only when it carries that marker, was written by the same command and holds
  nothing more than the marker lists, is empty, or the caller allows it (``overwrite=True``,
  the CLI's ``--overwrite``).
- Temporaries are named ``.ctperf-tmp.<host>.<pid>.<random>.<name>``; those left by a killed run
  (its process gone, or older than :data:`STALE_AFTER_S`) are removed by the next write into the
  same folder. Nothing without that prefix is ever removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ctperf.errors import InputError
from ctperf.io.state import LOCK

__all__ = [
    "MARKER",
    "STALE_AFTER_S",
    "TEMP_PREFIX",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "current_writer",
    "mark_output",
    "output_missing",
    "remove_stale_temporaries",
    "set_writer",
    "writing_as",
]

log = logging.getLogger(__name__)

#: Name of the file that marks a folder as written by ctperf (and so replaceable by ctperf).
MARKER = ".ctperf-output"
#: Prefix of every temporary file or folder ctperf creates beside an output.
TEMP_PREFIX = ".ctperf-tmp."
#: A temporary older than this (s) is stale even when its process cannot be checked (another
#: host on a shared file system, or a process id reused since).
STALE_AFTER_S = 2 * 24 * 3600.0

_MARKER_TEXT = ("This folder was written by ctperf. ctperf replaces it whole when asked to write "
                "here again; delete this file to protect the folder from that.\n")
# Header of the inventory that follows the marker's text in folders made by atomic_dir: the
# paths ctperf wrote there, one per line, relative to the folder.
_INVENTORY = "# written by ctperf:\n"
# The line naming the command that wrote the folder, before the inventory.
_COMMAND = "# command: "
# The marker of a folder that mark_output made (a cohort, a training run): written into file by
# file over one or more runs, with no inventory, and never replaced whole.
_PARTS_TEXT = ("This folder was written by ctperf, file by file over one or more runs; ctperf "
               "adds to it and does not replace it whole.\n")
# The command this process runs (set by the CLI), None from Python.
_writer: str | None = None
#: A thread's own writer (:func:`writing_as`), over the process's.
_thread = threading.local()


def set_writer(command: str | None) -> None:
    """Name the command whose outputs this process writes (``ctperf maps``...; None: a Python
    call): a folder that another wrote is then replaced only with ``overwrite``."""
    global _writer
    _writer = command


def current_writer() -> str | None:
    """The command this thread writes as (:func:`writing_as`), else the one :func:`set_writer`
    named in this process (None: a Python call): a cohort's workers take it on
    (:func:`ctperf.workflow.run_cohort`)."""
    return getattr(_thread, "writer", _writer)


@contextlib.contextmanager
def writing_as(command: str | None) -> Iterator[None]:
    """Write as ``command`` in this thread meanwhile: a cohort's study in a worker, whose
    threads run several studies at once (setting the process's writer, one study's end had
    taken it from another still running, whose folder then named no command)."""
    had, before = hasattr(_thread, "writer"), getattr(_thread, "writer", None)
    _thread.writer = command
    try:
        yield
    finally:
        if had:
            _thread.writer = before
        else:
            del _thread.writer


def _marker_text(folder: Path) -> str:
    """``folder``'s marker as text ("" when it has none or it cannot be read)."""
    try:
        return (folder / MARKER).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _written_by(marker: str) -> str | None:
    """The command a marker's text names, or None."""
    line = next((x for x in marker.splitlines() if x.startswith(_COMMAND)), None)
    return None if line is None else line[len(_COMMAND):].strip() or None
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_PathLike = str | os.PathLike[str]


def _umask() -> int:
    """The process's file mode creation mask, read without changing it where the system says
    it (Linux): setting it to read it would let another thread create a file under the
    momentary mask 0, writable by all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere it can only be read by setting it
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_HOST}.{os.getpid()}."


def _temp_suffix(name: str) -> str:
    """``.<name>`` (keeps ``.nii.gz`` for writers that choose a format by extension); for a
    name over 160 bytes (a file system's limit is 255 bytes, not characters) its extensions,
    when they are short."""
    if len(name.encode()) <= 160:
        return f".{name}"
    kept = ""
    for suffix in reversed(Path(name).suffixes):   # ".gz", then ".nii"; not ". Smith ..."
        if len(suffix.encode()) > 10 or len((suffix + kept).encode()) > 20:
            break
        kept = suffix + kept
    return kept


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: leave it to the age rule
    return True


def _is_stale(entry: os.DirEntry[str], now: float) -> bool:
    parts = entry.name[len(TEMP_PREFIX):].split(".", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    if host == _HOST and pid == os.getpid():
        return False
    if host == _HOST and not _pid_alive(pid):
        return True
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _restored(entry: os.DirEntry[str]) -> bool:
    """Put back an earlier output that a killed run had moved aside to replace it
    (``<prefix><random>.old.<name>``, :func:`atomic_dir`) when ``<name>`` is missing: the run
    died between its two renames. True when it was put back."""
    parts = entry.name[len(TEMP_PREFIX):].split(".", 3)
    if len(parts) < 4 or not parts[3].startswith("old."):
        return False
    name = parts[3][len("old."):]
    target = Path(entry.path).parent / name
    if (not name or _temp_suffix(name) != f".{name}" or target.exists()
            or not entry.is_dir(follow_symlinks=False)
            or not (Path(entry.path) / MARKER).is_file()):
        return False
    try:
        os.replace(entry.path, target)
    except OSError:
        return False
    log.warning("%s: put back the earlier output that an interrupted run had moved aside to "
                "replace it", target)
    return True


def remove_stale_temporaries(folder: _PathLike) -> list[Path]:
    """Remove ctperf temporaries in ``folder`` left by runs that were killed.

    Only entries named ``.ctperf-tmp.<host>.<pid>....`` are considered: one is removed when its
    process no longer runs on this host, or when it is older than :data:`STALE_AFTER_S`; an
    earlier output that such a run had moved aside to replace it is put back instead, when
    nothing has taken its name. Symbolic links are never followed.

    Returns
    -------
    list of Path
        What was removed.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        if not _is_stale(entry, now):
            continue
        path = Path(entry.path)
        if _restored(entry):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove the stale temporary %s (%s)", path, exc)
            continue
        log.info("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


def _contents(folder: Path) -> list[str]:
    """Relative paths of everything under ``folder`` (links not followed), ctperf's marker,
    temporaries and lock files left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            if (name != MARKER and not name.startswith(TEMP_PREFIX)
                    and not name.endswith(LOCK)):  # a killed run's lock file
                found.append((Path(parent) / name).relative_to(folder).as_posix())
        dirs[:] = [d for d in dirs if not d.startswith(TEMP_PREFIX)]
    return sorted(found)


def _not_written(contents: list[str], marker: str) -> list[str]:
    """What a folder holds (its ``contents``) that ctperf did not write there: what is missing
    from its marker's inventory (none when the marker predates inventories)."""
    if _INVENTORY not in marker:
        return []
    written = set(marker.split(_INVENTORY, 1)[1].splitlines())
    return [p for p in contents if p not in written]


def _owned_or_empty(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    try:
        return not any(os.scandir(folder))
    except OSError:
        return False


def output_missing(folder: _PathLike) -> list[str]:
    """What an output folder of :func:`atomic_dir` lacks of what its marker lists as written
    (a map deleted since): relative paths; [] when whole, or when it has no inventory."""
    out = Path(folder)
    marker = _marker_text(out)
    if _INVENTORY not in marker:
        return []
    return [p for p in marker.split(_INVENTORY, 1)[1].splitlines()
            if p and not os.path.lexists(out / p)]


def _mount_table() -> str:
    """Linux's table of this process's mounts ("" elsewhere)."""
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is mounted on: :func:`os.path.ismount`, or listed in Linux's
    ``/proc/self/mountinfo`` (a bind mount within one file system, which ismount misses)."""
    if os.path.ismount(path):
        return True
    table = _mount_table()
    target = str(path.resolve())
    octal = re.compile(r"\\([0-7]{3})")  # spaces and tabs are written as \040, \011
    return any(len(f := line.split()) > 4
               and octal.sub(lambda m: chr(int(m.group(1), 8)), f[4]) == target
               for line in table.splitlines())


def _refuse_mount_point(path: Path, remedy: str) -> None:
    """A container's volume or bound file cannot be renamed away, as outputs are replaced."""
    if path.exists() and _is_mount_point(path):
        raise InputError(path, "is a mount point, which ctperf cannot replace (an output is "
                               "written under a temporary name, then renamed into place); "
                               f"{remedy}")


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if target.is_symlink():
        raise InputError(target, "is a symbolic link; give the folder it points to, or another "
                                 "name")
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(target, "exists and is a file, but a folder is expected; remove it or "
                                 "choose another name")
    _refuse_mount_point(target, "give a folder inside it")
    if overwrite:
        return
    if not _owned_or_empty(target):
        raise InputError(target, f"exists and holds files ctperf did not write (no {MARKER}); "
                                 "choose another folder, or --overwrite to replace it and all "
                                 "its contents")
    marker = _marker_text(target)
    other = _written_by(marker)
    contents = _contents(target)
    if _INVENTORY not in marker and contents:
        # made by mark_output (a cohort, a training run: what it holds is not listed), or by a
        # version that kept no inventory: nothing tells its outputs from a user's files
        what = f"the output of `{other}`" if other else "a ctperf output"
        raise InputError(target, f"holds {what} with no list of what ctperf wrote there (a "
                                 "cohort or a training run, written file by file, or an older "
                                 "version's output), which would be replaced whole; choose "
                                 "another folder, or --overwrite")
    writer = current_writer()
    if other != writer and contents:
        # another command's output, or one that names none (written from Python, or by a
        # version that did not name it) replaced by a command, or the reverse
        theirs = (f"the output of `{other}`" if other else
                  "an output that names no command (written from Python, or by an older version)")
        ours = f"`{writer}`" if writer else "this call"
        raise InputError(target, f"holds {theirs}, which {ours} would replace whole; choose "
                                 "another folder, or --overwrite")
    added = _not_written(contents, marker)
    if added:
        more = f" and {len(added) - 3} more" if len(added) > 3 else ""
        raise InputError(target, f"holds files ctperf did not write ({', '.join(added[:3])}"
                                 f"{more}) beside an earlier output, which would be replaced "
                                 "whole; move them, choose another folder, or --overwrite")


@contextlib.contextmanager
def atomic_file(path: _PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name ends with the target's name (``.nii.gz`` stays ``.nii.gz``), so writers
    that choose a format by extension still work. An existing file is replaced; an existing
    folder is an :class:`~ctperf.errors.InputError`.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(target, "is a folder, but a file is expected; choose another name")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix=_temp_suffix(target.name),
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: _PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    The folder gets a ``.ctperf-output`` marker listing what was written. An existing ``path``
    is replaced only when it carries that marker (an earlier ctperf output) and holds nothing
    the marker does not list (files a user added there), is empty, or ``overwrite`` is true;
    otherwise, and when ``path`` is a file or a symbolic link, an
    :class:`~ctperf.errors.InputError` is raised before anything is written (and again, if
    such a folder appeared meanwhile, instead of the final rename).
    """
    target = Path(path)
    _check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    suffix = _temp_suffix(target.name)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(), suffix=suffix, dir=target.parent))
    try:
        (tmp_path / MARKER).write_text(_MARKER_TEXT)
        yield tmp_path
        command = "" if (writer := current_writer()) is None else f"{_COMMAND}{writer}\n"
        (tmp_path / MARKER).write_text(_MARKER_TEXT + command + _INVENTORY
                                       + "".join(f"{p}\n" for p in _contents(tmp_path)))
        os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp creates 0700
        _check_replaceable(target, overwrite)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(), suffix=".old" + suffix,
                                        dir=target.parent))
            try:
                os.replace(target, old)  # rename onto the empty folder just made
            except BaseException:
                # a signal may arrive just after the rename: the earlier output is then in
                # ``old``, and goes back
                if target.exists():
                    old.rmdir()
                else:
                    os.replace(old, target)
                raise
            try:
                os.replace(tmp_path, target)
            except BaseException:
                if tmp_path.exists():  # not renamed: the earlier output goes back
                    os.replace(old, target)
                else:  # renamed just before the signal: the new output stands
                    shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, target)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def mark_output(folder: _PathLike) -> Path:
    """Create ``folder`` (and parents) if needed and mark it as a ctperf output folder that is
    written into file by file (a cohort, a training run), naming the command: such a folder
    is never replaced whole by :func:`atomic_dir` without ``overwrite``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        command = "" if (writer := current_writer()) is None else f"{_COMMAND}{writer}\n"
        marker.write_text(_PARTS_TEXT + command)
    return out


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _check_parent(out: Path, resolved: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a writable folder."""
    ancestor = resolved.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(out, f"cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(out, f"cannot be written: no write permission in {ancestor}")
    try:  # permission bits say yes on a read-only mount, /proc or a full quota: try it
        probe = Path(tempfile.mkdtemp(prefix=_temp_prefix(), suffix=".probe", dir=ancestor))
    except OSError as exc:
        raise InputError(out, f"cannot be written in {ancestor} "
                              f"({exc.strerror or type(exc).__name__})") from None
    probe.rmdir()


#: Extensions of files, never of an output folder: a folder named so is a typo or a request for
#: a format ctperf does not write (``convert x.nrrd``), not a DICOM folder to create.
_FILE_SUFFIXES = frozenset((".nii", ".gz", ".nrrd", ".nhdr", ".mgz", ".mgh", ".mha", ".mhd",
                            ".hdr", ".img", ".dcm", ".json", ".csv", ".txt", ".npy", ".npz",
                            ".h5", ".png", ".tif", ".tiff", ".zip", ".pt"))


def _file_like(name: str) -> bool:
    """Whether a new output folder's name ends like a file (``.nii.gzz`` too)."""
    lower = name.lower()
    return Path(lower).suffix in _FILE_SUFFIXES or ".nii" in lower


def check_output(out: _PathLike, *, inputs: Iterable[_PathLike | None] = (),
                 overwrite: bool = False, kind: str = "folder",
                 owned_by: Iterable[str] = ()) -> Path:
    """Refuse an output that would destroy data or cannot be written, before any work is done.

    Parameters
    ----------
    out : path
        The output a command is about to write.
    inputs : iterable of path or None
        Everything the command reads (studies, masks, checkpoints, cohorts; ``None`` is
        skipped). Symbolic links are resolved before comparing.
    overwrite : bool
        Allow replacing an existing output ctperf did not write (``--overwrite``).
    kind : {"folder", "file", "extend"}
        ``"folder"``: a folder replaced whole (see :func:`atomic_dir`); ``"file"``: one file,
        an existing one replaced only when ``overwrite``; ``"extend"``: a folder written into
        and never emptied (a phantom cohort, a training run), which must be new, empty, marked
        by :func:`mark_output` (by the same command, when the marker names one) or hold one
        of the ``owned_by`` names, and never a single output of :func:`atomic_dir`.
    owned_by : iterable of str
        For ``"extend"``: names whose presence marks a folder ctperf made before markers
        existed (e.g. ``cohort.json``).

    Returns
    -------
    Path
        ``out`` as given.

    Raises
    ------
    InputError
        Naming ``out`` and the reason: it is, contains or lies inside an input; it is the
        current folder (or contains it), the home folder or a filesystem root; it is a file
        where a folder is expected or the reverse; it holds files ctperf did not write; its
        parent cannot be created or written.
    """
    if kind not in ("folder", "file", "extend"):
        raise ValueError(f"kind must be 'folder', 'file' or 'extend', got {kind!r}")
    path = Path(out)
    resolved = path.resolve()
    if resolved == resolved.parent:
        raise InputError(path, "is a filesystem root; choose a new folder for the output")
    cwd = Path.cwd().resolve()
    if kind == "folder" and (resolved == cwd or _inside(cwd, resolved)):
        raise InputError(path, "is or contains the current folder, which the output would "
                               "replace; choose a new folder")
    if kind == "folder" and resolved == _home():
        raise InputError(path, "is the home folder; choose a new folder for the output")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if resolved == source:
            raise InputError(path, f"is the input {given}; choose another output")
        if _inside(resolved, source):
            raise InputError(path, f"lies inside the input {given}; choose an output outside it")
        if _inside(source, resolved):
            raise InputError(path, f"contains the input {given}; choose an output that does "
                                   "not hold the inputs")
    if path.is_symlink() and kind != "extend":
        raise InputError(path, "is a symbolic link; give the real path or another name")
    if kind == "file":
        if path.is_dir():
            raise InputError(path, "is a folder, but a file is expected; choose another name")
        if path.exists() and not overwrite:
            raise InputError(path, "exists; choose another name, or --overwrite to replace it")
        _refuse_mount_point(path, "give another name")
    elif path.exists() and not path.is_dir():
        raise InputError(path, "exists and is a file, but a folder is expected; remove it or "
                               "choose another name")
    elif not path.exists() and _file_like(path.name):
        raise InputError(path, f"ends like a file ({path.name[path.name.find('.'):]}), but "
                               "this output is a folder; give a folder name (NIfTI, where a "
                               "command writes it, takes a .nii or .nii.gz name)")
    elif kind == "folder":
        _check_replaceable(path, overwrite)
    elif path.exists() and not (_owned_or_empty(path)
                                or any((path / name).exists() for name in owned_by)):
        raise InputError(path, "exists and holds files ctperf did not write; choose a new or "
                               "empty folder")
    elif path.exists() and _contents(path):  # kind "extend", into a folder ctperf marked
        marker = _marker_text(path)
        other = _written_by(marker)
        writer = current_writer()
        if _INVENTORY in marker or (other is not None and writer is not None
                                    and other != writer):
            # a single output, which its command replaces whole; or another command's folder
            raise InputError(path, f"holds the output of `{other or 'another command'}`, "
                                   "which this command would mix its own files into; choose a "
                                   "new or empty folder")
    _check_parent(path, resolved)
    return path
