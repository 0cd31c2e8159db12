"""Cohorts: one task per study, run in parallel on Dask, resumable through a manifest.

A cohort run applies a per-study function ``task(source, target, options)`` to every study of a
cohort and writes study ``name`` into ``OUT/<name>/`` (the task writes that folder atomically,
see :func:`ctperf.io.atomic_dir`). ``OUT/manifest.json`` records the state of every study:

- ``pending``: submitted, not finished (or the run was killed);
- ``done``: its folder was renamed into place; a rerun with the same options, and the files
  its source names unchanged (size and modification time), skips it;
- ``failed``: with its one-line error; a rerun tries it again.

Only the client process writes the manifest, atomically, after each change of state, so a
killed run leaves a manifest that never claims more than is on disk: a rerun finishes only the
rest. A run holds ``OUT/.ctperf-lock`` while it writes: a second run into the same folder is
refused. Studies run on a local Dask cluster (worker processes, one thread each, sized to the
machine's cores and memory), on an existing cluster (``scheduler="tcp://host:port"``), or in
this process when one worker is asked for (or enough).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

from ctperf.errors import CTPerfError, InputError
from ctperf.io.atomic import current_writer, output_missing, writing_as
from ctperf.io.state import MANIFEST, MANIFEST_FORMAT, load_manifest
from ctperf.io.unitobrain import MAP_FOLDERS
from ctperf.parallel import usable_cores

__all__ = ["MANIFEST", "MEMORY_PER_WORKER", "CohortSummary", "Study", "discover_studies",
           "load_manifest", "options_hash", "refuse_other_versions", "run_cohort",
           "run_cohort_folder", "source_name", "source_state", "worker_count"]

log = logging.getLogger(__name__)

#: Name of the manifest in a cohort output folder.
#: Memory set aside per local Dask worker (bytes) when sizing a local cluster: a full-size
#: study and its intermediate arrays fit in it.
MEMORY_PER_WORKER = 4 * 2**30
_OWN_FILES = frozenset({MANIFEST, "cohort.json"})
#: Suffixes of files beside a cohort's studies that are no study (a broken link so named is
#: left out; any other is a study that fails).
_OTHER_FILES = frozenset({".json", ".txt", ".csv", ".tsv", ".md", ".pdf", ".png", ".jpg",
                          ".html", ".log", ".xml", ".yaml", ".yml", ".zip", ".gz", ".tar"})
_UNHASHED = frozenset({"progress", "overwrite", "workers"})
_PathLike = str | os.PathLike[str]
Task = Callable[[Any, Path, Any], Any]


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of a cohort: ``name`` (its output folder ``OUT/<name>``), ``source`` (what
    the task reads: a path, or for generated cohorts any picklable description) and ``root``,
    the cohort folder: paths in a failure's message are written relative to it, so the
    manifest holds no machine path."""

    name: str
    source: Any
    root: Path | None = None


@dataclasses.dataclass(frozen=True)
class CohortSummary:
    """What a cohort run did.

    Attributes
    ----------
    done : tuple of str
        Studies computed by this run.
    skipped : tuple of str
        Studies already done with the same options (not computed again).
    failed : dict of str to str
        Study name -> one-line error.
    manifest : Path
        ``OUT/manifest.json``.
    seconds : float
        Wall time of the run, s.
    flagged : dict of str to list of str
        Study name -> the QC flags its maps raised, for the studies done or skipped that
        raised any (a task that reports them: ``ctperf maps``).
    """

    done: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: dict[str, str]
    manifest: Path
    seconds: float
    flagged: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    @property
    def exit_code(self) -> int:
        """0 when every study is done, 1 when any failed."""
        return 1 if self.failed else 0

    def text(self) -> str:
        """One summary line, e.g. ``3 studies: 2 done (1 already done), 1 failed; ...``."""
        finished = len(self.done) + len(self.skipped)
        return (f"{self.total} studies: {finished} done ({len(self.skipped)} already done), "
                f"{len(self.failed)} failed; manifest {self.manifest}")

    def failure_lines(self) -> list[str]:
        """``<study>: <error>`` for every failed study."""
        return [f"{name}: {error}" for name, error in self.failed.items()]

    def flag_lines(self) -> list[str]:
        """``<study>: QC flags: <flags>`` for every study whose maps raised any."""
        return [f"{name}: QC flags: {', '.join(flags)}" for name, flags in self.flagged.items()]


# --- discovery -------------------------------------------------------------------------------

def _nifti_stem(name: str) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def _study_in_folder(folder: Path) -> Path:
    """A phantom or preprocess folder's ``study.nii.gz``, a folder's only NIfTI, else the
    folder itself (read as DICOM)."""
    for name in ("study.nii.gz", "study.nii"):
        if (folder / name).is_file():
            return folder / name
    niftis = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
              and _nifti_stem(p.name) is not None]
    return niftis[0] if len(niftis) == 1 else folder


def _sanitise(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return clean[:100] or "study"


def _unique_names(raw: Iterable[str], kept: Iterable[str | None] | None = None) -> list[str]:
    """Output names for the studies ``raw`` (cleaned, clashes numbered), in their order; where
    ``kept`` gives one (a name an output's manifest already holds for that study), that."""
    raw = list(raw)
    kept = list(kept) if kept is not None else [None] * len(raw)
    taken: set[str] = set(_OWN_FILES) | {k.lower() for k in kept if k is not None}
    names = []
    for name, keep in zip(raw, kept, strict=True):
        if keep is not None:
            names.append(keep)
            continue
        base, k, candidate = _sanitise(name), 1, _sanitise(name)
        while candidate.lower() in taken:
            k += 1
            candidate = f"{base}-{k}"
        taken.add(candidate.lower())
        names.append(candidate)
    return names


def source_name(source: Any, root: Path | None) -> str | None:
    """A study's input ``source`` as a path relative to its cohort folder ``root`` (POSIX), or
    None for a source that is not a path inside it (a generated cohort's description)."""
    if root is None or not isinstance(source, str | os.PathLike):
        return None
    try:
        return Path(source).relative_to(root).as_posix()
    except ValueError:
        return None


def _is_reference_maps(folder: Path) -> bool:
    """A UniToBrain ``<input>_Maps`` folder: beside its ``<input>`` study folder, or holding
    the dataset's map folders (``NLR_CBF``...)."""
    name = folder.name
    if not name.lower().endswith("_maps"):
        return False
    if (folder.parent / name[:-len("_Maps")]).is_dir():
        return True
    maps = {f.lower() for f in MAP_FOLDERS}
    return any(p.is_dir() and p.name.lower() in maps for p in folder.iterdir())


def discover_studies(cohort: _PathLike, *,
                     held: dict[str, str | None] | None = None) -> list[Study]:
    """The studies of a cohort folder, sorted by name.

    Each sub-folder is one study (but a UniToBrain ``..._Maps`` folder of reference maps beside
    its input folder): its ``study.nii.gz`` (phantom and ``ctperf preprocess``
    layouts), its only NIfTI file, or else the folder itself as DICOM (searched recursively).
    Each ``.nii``/``.nii.gz`` file beside them is one study (a JSON sidecar of the same stem
    goes with it). Hidden entries, ctperf's own files (``manifest.json``, ``cohort.json``) and
    other files are ignored. Names become output folder names: characters other than letters,
    digits, ``.``, ``_`` and ``-`` turn into ``_``; clashes get ``-2``, ``-3``... ``held``
    (an output's names -> the input each was made from, relative to ``cohort``,
    :func:`source_name`; None for a row from before inputs were recorded) keeps the names an
    output already holds: a study added later whose name clashes with one of them is the one
    numbered (``"a b"`` added beside ``a_b`` had taken ``a_b``, whose maps became ``a_b-2``:
    another patient's maps under a name the output held). A row without its input keeps its
    name for the entry of that very name, else the first whose name cleans to it; a held name
    that is no clean name (a hand-edited ``../x``) is not kept. An entry that is a broken
    symbolic link (a store offline) is a study too, which fails when read (it had been left
    out in silence, exit 0), unless it is named as a file of another kind (``.json``,
    ``.txt``...), which is left out with a warning.

    Raises
    ------
    InputError
        ``cohort`` is not a folder, or holds no study.
    """
    root = Path(cohort)
    if not root.is_dir():
        raise InputError(root, "is not a folder; --cohort expects a folder holding one "
                               "sub-folder or 4D NIfTI file per study")
    found: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name in _OWN_FILES:
            continue
        if entry.is_dir() and _is_reference_maps(entry):
            if (entry.parent / entry.name[:-len("_Maps")]).is_dir():
                log.info("%s: UniToBrain reference maps of %s, not a study; left out", entry,
                         entry.name[:-len("_Maps")])
            else:
                log.warning("%s: UniToBrain reference maps without their input study (%s); "
                            "left out", entry, entry.name[:-len("_Maps")])
        elif entry.is_dir():
            found.append((entry.name, _study_in_folder(entry)))
        elif entry.is_file() and (stem := _nifti_stem(entry.name)) is not None:
            found.append((stem, entry))
        elif entry.is_symlink() and not entry.exists():
            # a DICOM folder may be named by a UID or a date with dots: only a link named as
            # a file of another kind is not a study
            stem = _nifti_stem(entry.name) or (
                entry.name if entry.suffix.lower() not in _OTHER_FILES else None)
            log.warning("%s: a link to %s, which does not exist%s", entry,
                        os.readlink(entry), "" if stem else "; left out")
            if stem:
                found.append((stem, entry))
    if not found:
        raise InputError(root, "holds no study: expected one sub-folder (DICOM, or holding a "
                               "4D NIfTI) or one 4D NIfTI file per study")
    named = _unique_names((name for name, _ in found), _kept_names(found, root, held or {}))
    return [Study(name, path, root) for name, (_, path) in zip(named, found, strict=True)]


def _kept_names(found: list[tuple[str, Path]], root: Path, held: dict[str, str | None]
                ) -> list[str | None]:
    """The name an output already holds for each entry ``(raw name, path)`` of ``found``, or
    None (see :func:`discover_studies`)."""
    clean = {n: src for n, src in held.items()
             if _sanitise(n) == n and n.lower() not in _OWN_FILES}
    by_source = {src: n for n, src in clean.items() if src is not None}
    kept = [by_source.get(source_name(path, root) or "") for _, path in found]
    for name in sorted(n for n, src in clean.items() if src is None):
        free = [i for i, (raw, _) in enumerate(found) if kept[i] is None]
        match = ([i for i in free if found[i][0] == name]
                 or [i for i in free if _sanitise(found[i][0]) == name])
        if match:
            kept[match[0]] = name
    return kept


# --- manifest --------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _plain(value: Any, *, resolve: bool = False) -> Any:
    """``value`` as JSON-ready data; paths as strings, made absolute (symbolic links
    followed) with ``resolve``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(_as_path(getattr(value, f.name), f), resolve=resolve)
                for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v, resolve=resolve) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, resolve=resolve) for v in value]
    if isinstance(value, os.PathLike):
        return os.path.realpath(value) if resolve else os.fspath(value)
    return value


def _as_path(value: Any, field: dataclasses.Field[Any]) -> Any:
    """``value`` of a dataclass ``field`` typed as a path, given as a string, as a Path."""
    return Path(value) if isinstance(value, str) and "Path" in str(field.type) else value


def _path_options(value: Any) -> list[os.PathLike[str]]:
    """The paths among options (fields of dataclasses, values of mappings and sequences):
    ``os.PathLike`` values, and strings in a dataclass's fields typed as paths (a mask given
    as a string in Python had gone unhashed, its edits unseen), so that a method's name is
    never taken for a file."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [_as_path(getattr(value, f.name), f) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [p for item in value for p in _path_options(item)]
    return [value] if isinstance(value, os.PathLike) else []


def options_hash(task: Task, options: Any) -> str:
    """``sha256:<hex>`` of the task's qualified name and its options (a dataclass or mapping),
    as canonical JSON, with the state (:func:`source_state`) of the files its paths name (a
    checkpoint, a mask): studies done under another hash are computed again (a model replaced
    at the same path had left every study's maps those of the old one). Options that do not
    change what is written (``progress``, ``overwrite``, ``workers``) are left out. Paths
    count as the files they name, links followed: a mask given as ``m.nii.gz`` and as its
    absolute path is one option (a rerun from the cohort's parent folder had done every study
    again); moved to another folder, it is another."""
    name = f"{getattr(task, '__module__', '')}.{getattr(task, '__qualname__', repr(task))}"
    plain = _plain(options, resolve=True)
    if isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in _UNHASHED}
    files = source_state([Path(os.path.realpath(p)) for p in _path_options(options)])
    text = json.dumps({"task": name, "options": plain, "files": files}, sort_keys=True,
                      default=repr)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def source_state(source: Any) -> str:
    """``sha256:<hex>`` of the state (:func:`ctperf.io.state.files_state`) of every existing
    file or folder a study's ``source`` names (a path, or paths inside a mapping or sequence;
    a NIfTI study with its JSON sidecar): a study whose input was replaced since it was done
    is computed again (it had kept its stale maps, exit 0)."""
    from ctperf.io.nifti import is_nifti, sidecar_path
    from ctperf.io.state import files_state

    paths: list[Path] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)
        elif isinstance(value, str | os.PathLike):
            path = Path(value)
            try:
                if path.exists():
                    paths.extend([path, sidecar_path(path)] if is_nifti(path) else [path])
            except (OSError, ValueError):
                pass  # a name, not a path

    collect(source)
    blob = json.dumps([files_state(p) for p in paths])
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _save_manifest(out: Path, rows: dict[str, dict[str, Any]]) -> None:
    from ctperf.io import atomic_file

    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "studies": rows},
                                  indent=1)
                       + "\n")


# --- running ---------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, CTPerfError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _without_identifiers(error: str | None) -> str | None:
    """A failure's message for the manifest, which may be shared: DICOM UIDs and quoted series
    descriptions (which may name the patient) left out; stderr keeps them, to choose a
    ``--series`` from."""
    if error is None:
        return None
    error = re.sub(r"\b\d+(?:\.\d+){3,}\b", "<UID>", error)
    return re.sub(r"'[^']*'", "'...'", error)


#: The study whose task runs in this thread (its context), for :func:`_logs_named`.
_STUDY: contextvars.ContextVar[str | None] = contextvars.ContextVar("ctperf_study", default=None)
#: The texts of ctperf's warnings made meanwhile in this context (:func:`_logs_named`).
_SAID: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("ctperf_said",
                                                                        default=None)


def _named_record_factory(make: Callable[..., logging.LogRecord]
                          ) -> Callable[..., logging.LogRecord]:
    def named(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        name = _STUDY.get()
        if name is not None and record.name.startswith("ctperf"):
            record.msg = (name.replace("%", "%%") + ": " + str(record.msg) if record.args
                          else f"{name}: {record.msg}")
            said = _SAID.get()
            if said is not None and record.levelno >= logging.WARNING:
                said.append(record.getMessage())
        return record

    named.ctperf_names_studies = True  # type: ignore[attr-defined]
    return named


@contextlib.contextmanager
def _logs_named(name: str) -> Iterator[list[str]]:
    """ctperf's log records made meanwhile in this thread begin with the study's ``name`` (a
    cohort's warnings had named no study): a record factory, installed once per process,
    reads the thread's study (a worker of several threads runs several studies at once).
    Yields the list of the study's warnings, which the factory fills as they are made (no
    handler: one on ctperf's logger had silenced Python's last-resort printing of them in
    workers that configure no logging)."""
    if not getattr(logging.getLogRecordFactory(), "ctperf_names_studies", False):
        logging.setLogRecordFactory(_named_record_factory(logging.getLogRecordFactory()))
    said: list[str] = []
    token, kept = _STUDY.set(name), _SAID.set(said)
    try:
        yield said
    finally:
        _SAID.reset(kept)
        _STUDY.reset(token)


def _run_study(task: Task, study: Study, target: Path, options: Any,
               uid_key: str | None = None, writer: str | None = None,
               base: str | None = None) -> dict[str, Any]:
    """Run one study (in a worker or in this process); never raises an ``Exception``.
    ``uid_key``: the client's de-identification secret, which a worker process takes as its
    own (each had drawn its own, and one run's series came out as different studies);
    ``writer``: the command the client runs, which the study is written as (its outputs had
    named none, and a rerun in the client's process refused them); ``base``: the client's
    folder, left out of a failure's paths as the cohort's and the output's are (paths made
    absolute for another cluster's workers). The row's ``warnings`` are the study's
    warnings, for a client whose workers' logs it does not see."""
    from ctperf.io.privacy import UID_KEY_VARIABLE

    started = _now()
    if uid_key is not None:
        os.environ[UID_KEY_VARIABLE] = uid_key
    said: list[str] = []
    flags = None
    try:
        with writing_as(writer), _logs_named(study.name) as said:
            outcome = task(study.source, target, options)
        if not target.is_dir():
            raise CTPerfError(f"the task wrote no folder {target.name}")
        state, error = "done", None
        summary = getattr(outcome, "summary", None)
        if isinstance(summary, dict) and isinstance(summary.get("qc_flags"), list):
            flags = [str(f) for f in summary["qc_flags"]]
    except Exception as exc:  # a study's failure is recorded, the cohort goes on
        state, error = "failed", _one_line(exc)
        for folder in (study.root, target.parent, base):
            if folder is not None:  # where a path begins, not inside another
                error = re.sub(rf"(?<![\w.{re.escape(os.sep)}-]){re.escape(f'{folder}{os.sep}')}",
                               "", error)
    row = {"state": state, "error": error, "started": started, "finished": _now(),
           "warnings": said}
    return row if flags is None else {**row, "qc_flags": flags}


def _threads(options: Any, threads: int | None) -> Any:
    """``options`` with its ``workers`` field (threads per study) set to ``threads`` (None:
    every core)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type) and any(
            f.name == "workers" for f in dataclasses.fields(options)):
        return dataclasses.replace(options, workers=threads)
    return options


def worker_count(studies: int, workers: int | None = None) -> int:
    """Local workers for ``studies`` studies: ``workers`` if given, else one per two CPU cores
    (a study's fits and filter use threads, so one study already keeps two cores busy), as many
    as :data:`MEMORY_PER_WORKER` of the machine's memory allows; never more than ``studies``."""
    if workers is None:
        import psutil

        workers = min(max(1, usable_cores() // 2),
                      max(1, psutil.virtual_memory().total // MEMORY_PER_WORKER))
    return max(1, min(int(workers), studies))


def _in_process(todo: list[Study], out: Path, task: Task, options: Any
                ) -> Generator[tuple[Study, dict[str, Any]], None, None]:
    for study in todo:
        yield study, _run_study(task, study, out / study.name, options,
                                writer=current_writer())


def _not_slow_to_stop(record: logging.LogRecord) -> bool:
    """False for a nanny's "Worker process still alive after 4.0 seconds, killing", which it
    says of workers slow to stop after a run that succeeded (its other warnings, a worker
    restarted for memory among them, stay)."""
    return not str(record.msg).startswith("Worker process still alive")


@contextlib.contextmanager
def _dask_quiet() -> Iterator[None]:
    """distributed logs its start and stop at INFO through the root handler, and at WARNING
    the nannies' killing of workers slow to stop after a run that succeeded: kept for -v."""
    chatter, nanny = logging.getLogger("distributed"), logging.getLogger("distributed.nanny")
    level = chatter.level
    quiet = not log.isEnabledFor(logging.INFO)
    if quiet:
        chatter.setLevel(logging.WARNING)
        nanny.addFilter(_not_slow_to_stop)
    try:
        yield
    finally:
        chatter.setLevel(level)
        nanny.removeFilter(_not_slow_to_stop)


#: Seconds to wait for an existing Dask scheduler to answer.
SCHEDULER_TIMEOUT_S = 30


def _connect(scheduler: str) -> Any:
    """A client of the Dask scheduler at ``scheduler``, or CTPerfError naming it: asked before
    the output folder is made, so that an unreachable cluster leaves nothing behind.

    The client is made in a daemon thread given :data:`SCHEDULER_TIMEOUT_S` and a few seconds
    more: a server that accepts the connection and never answers held Dask's own timeout off,
    and the command, until Ctrl-C."""
    import threading

    import distributed

    made: dict[str, Any] = {}

    def connect() -> None:
        try:
            made["client"] = distributed.Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except Exception as exc:  # also a server that is no Dask scheduler (its bytes misread)
            made["error"] = exc

    with _dask_quiet():
        thread = threading.Thread(target=connect, name="ctperf-dask-connect", daemon=True)
        thread.start()
        thread.join(SCHEDULER_TIMEOUT_S + 5)
    if "client" in made:
        return made["client"]
    why = (_one_line(made["error"]) if "error" in made
           else f"no answer in {SCHEDULER_TIMEOUT_S + 5} s")
    raise CTPerfError(f"cannot reach the Dask scheduler at {scheduler} ({why})")


def _on_dask(todo: list[Study], out: Path, task: Task, options: Any, *,
             client: Any, workers: int
             ) -> Generator[tuple[Study, dict[str, Any]], None, None]:
    """The studies on ``client``'s cluster (its caller closes it), or on a local cluster of
    ``workers`` processes, started and closed here, when it is None."""
    import distributed

    from ctperf.io.privacy import uid_key

    cluster = None
    environment = dict(os.environ)
    base = None
    if client is not None:  # its workers run in other folders, maybe on other machines
        todo, out, options = _absolute(todo, out, options)
        base = os.getcwd()
    with _dask_quiet():
        try:
            if client is None:
                # port 0: the scheduler's web server (it runs even without a dashboard) on a
                # free port, so that clusters of several runs at once do not compete for one;
                # on this machine only (":0" had served the task keys, which name the studies,
                # to the whole network, with no login)
                cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                                   processes=True, host="127.0.0.1",
                                                   dashboard_address="127.0.0.1:0",
                                                   silence_logs=logging.WARNING)
                client = distributed.Client(cluster)
            with client if cluster is not None else contextlib.nullcontext(client):
                key = uid_key()
                futures = {client.submit(_run_study, task, s, out / s.name, options, key,
                                         current_writer(), base,
                                         key=f"ctperf-{s.name}-{time.time_ns()}",
                                         pure=False): s
                           for s in todo}
                for future in distributed.as_completed(futures):
                    study = futures[future]
                    try:
                        row = future.result()
                    except Exception as exc:  # the worker died (memory, kill) or was lost
                        row = {"state": "failed", "error": _one_line(exc), "started": None,
                               "finished": _now()}
                    if cluster is None:  # another machine's workers log where we cannot see
                        for text in row.get("warnings", []):
                            log.warning("%s", text)
                    yield study, row
        finally:
            if cluster is not None:
                cluster.close()
            # Dask's nannies write their workers' settings (one BLAS thread, a hash seed, ...)
            # into this process's environment, which the caller's later subprocesses inherit
            _restore_environment(environment)


def _same_version(client: Any, scheduler: str | None) -> None:
    """CTPerfError unless every worker of ``client``'s cluster runs this ctperf version (one a
    commit apart had failed every study with a TypeError; one another version's code would
    map differently, docs/cohorts.md)."""
    from ctperf.versioning import software_version

    mine = software_version()
    try:
        theirs = set(client.run(software_version).values())
    except Exception as exc:  # no ctperf there, or one too old to name its version
        raise CTPerfError(f"the workers of the Dask cluster at {scheduler} could not say "
                          f"their ctperf version ({_one_line(exc)}): install this ctperf "
                          f"({mine}) on them") from None
    if theirs - {mine}:
        raise CTPerfError(f"the workers of the Dask cluster at {scheduler} run ctperf "
                          f"{', '.join(sorted(theirs - {mine}))}, this is {mine}: install the "
                          "same version on them")


def _absolute(todo: list[Study], out: Path, options: Any
              ) -> tuple[list[Study], Path, Any]:
    """The studies' paths (sources given as paths, and their cohort folder), ``out`` and the
    paths among a dataclass's ``options`` (masks, a model) made absolute: an existing
    cluster's workers run in folders of their own, where a relative COHORT had failed every
    study ("no such file")."""
    here = os.getcwd()

    def whole(value: Any) -> Any:  # joined, not normalised: the client's folder stays a prefix
        return Path(here, value) if isinstance(value, os.PathLike) else value

    todo = [dataclasses.replace(
        s, source=(os.path.join(here, s.source) if isinstance(s.source, str)
                   else whole(s.source)),
        root=whole(s.root)) if isinstance(s.source, (str, os.PathLike)) else s for s in todo]
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = dataclasses.replace(options, **{
            f.name: whole(getattr(options, f.name)) for f in dataclasses.fields(options)
            if f.init and isinstance(getattr(options, f.name), os.PathLike)})
    return todo, whole(out), options


def _restore_environment(saved: dict[str, str]) -> None:
    """``os.environ`` as ``saved``: what was added since removed, what was changed set back."""
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def run_cohort(studies: Iterable[Study], out: _PathLike, task: Task, options: Any, *,
               scheduler: str | None = None, workers: int | None = None,
               progress: bool = False) -> CohortSummary:
    """Run ``task`` on every study not yet done and record each one's state in the manifest.

    Parameters
    ----------
    studies : iterable of Study
        From :func:`discover_studies`, or made by the caller (unique names).
    out : path
        Cohort output folder: created and marked as a ctperf output; study ``name`` goes to
        ``out/<name>`` and the states to ``out/manifest.json``.
    task : callable
        ``task(source, target, options)``, a module-level function (it is pickled to the
        workers) that writes ``target`` atomically and raises on failure.
    options : dataclass or mapping
        Handed to every call; their hash decides whether a done study is still done. A
        ``workers`` field of a dataclass (threads inside one study) is set to 1 when several
        studies run at once, so that they do not compete for the same cores, and to None
        (every core) when they run one after the other in this process.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:port``); its workers must import
        ctperf and see ``out`` and the sources at the same paths.
    workers : int, optional
        Local worker processes (default: :func:`worker_count`); with one, studies run in
        this process. Ignored with ``scheduler``.
    progress : bool
        A tqdm bar over studies.

    Returns
    -------
    CohortSummary
        Names done, skipped and failed (with their errors); see ``exit_code``.
    """
    from ctperf.io import mark_output
    from ctperf.io.state import folder_lock

    started = time.monotonic()
    studies = list(studies)
    names = [s.name for s in studies]
    if len(set(names)) != len(names):
        raise ValueError("study names must be unique")
    client = _connect(scheduler) if scheduler is not None else None
    try:
        if client is not None:
            _same_version(client, scheduler)
        root = mark_output(out)
        with folder_lock(root):
            return _run_locked(studies, root, task, options, client=client, workers=workers,
                               progress=progress, started=started)
    finally:
        if client is not None:
            client.close()


def _run_locked(studies: list[Study], root: Path, task: Task, options: Any, *,
                client: Any, workers: int | None, progress: bool,
                started: float) -> CohortSummary:
    """:func:`run_cohort` once it holds the output folder's lock."""
    from ctperf.io.atomic import remove_stale_temporaries
    from ctperf.versioning import software_version

    names = [s.name for s in studies]
    remove_stale_temporaries(root)
    rows = load_manifest(root)
    digest = options_hash(task, options)
    version = software_version()
    state = {s.name: source_state(s.source) for s in studies}
    source = {s.name: source_name(s.source, s.root) for s in studies}
    # a row from before sources were stamped (or named) keeps its maps, and is stamped now
    skipped = tuple(s.name for s in studies if rows.get(s.name, {}).get("state") == "done"
                    and rows[s.name].get("options_hash") == digest and (root / s.name).is_dir()
                    and not output_missing(root / s.name)  # a map deleted since: redone
                    and rows[s.name].setdefault("source_state", state[s.name]) == state[s.name]
                    and rows[s.name].setdefault("source", source[s.name]) == source[s.name]
                    # another version may map differently: one cohort, one version
                    and rows[s.name].get("ctperf_version", version) == version)
    older = _done_by_other_version(rows, names, version)  # none of them skipped
    if older:
        log.warning("%d studies were done by another ctperf version (%s): done again by %s",
                    len(older), rows[older[0]]["ctperf_version"], version)
    for s in studies:  # a name whose input was removed, now another's
        was = rows.get(s.name, {}).get("source")
        if isinstance(was, str) and source[s.name] is not None and was != source[s.name]:
            log.warning("%s was made from %s, now from %s: made again", s.name, was,
                        source[s.name])
    other = [n for n in names if rows.get(n, {}).get("state") == "done"
             and rows[n].get("options_hash") != digest and n not in older]
    if other:  # said by the docs, and had not been: a rerun replaced every study in silence
        log.warning("%d studies were done with other options (%s%s): done again with these",
                    len(other), ", ".join(other[:3]), " ..." if len(other) > 3 else "")
    todo = [s for s in studies if s.name not in skipped]
    for study in todo:
        rows[study.name] = {"state": "pending", "error": None, "started": None, "finished": None,
                            "ctperf_version": version, "options_hash": digest,
                            "source_state": state[study.name], "source": source[study.name]}
    _save_manifest(root, rows)
    if skipped:
        log.info("%d of %d studies already done with these options, skipped", len(skipped),
                 len(studies))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(studies), initial=len(skipped), desc="cohort", unit="study")
    done: list[str] = []
    failed: dict[str, str] = {}
    local = worker_count(len(todo), workers)
    if not todo or (client is None and local == 1):
        results = _in_process(todo, root, task, _threads(options, None))
    else:  # the cores shared out among the local workers; on another cluster one per study
        threads = 1 if client is not None else max(1, usable_cores() // local)
        results = _on_dask(todo, root, task, _threads(options, threads), client=client,
                           workers=local)
    try:
        for study, row in results:
            row.pop("warnings", None)  # said where the study ran (or by _on_dask)
            rows[study.name].update(row, error=_without_identifiers(row["error"]))
            _save_manifest(root, rows)
            if row["state"] == "done":
                done.append(study.name)
            else:
                failed[study.name] = row["error"]
                log.info("%s failed: %s", study.name, row["error"])
            if bar is not None:
                bar.update()
    finally:
        results.close()  # shuts a local cluster down at once, also on an interrupt
        if bar is not None:
            bar.close()
    order = {name: i for i, name in enumerate(names)}
    return CohortSummary(done=tuple(sorted(done, key=order.__getitem__)), skipped=skipped,
                         failed=dict(sorted(failed.items(), key=lambda kv: order[kv[0]])),
                         manifest=root / MANIFEST, seconds=time.monotonic() - started,
                         flagged={n: list(rows[n]["qc_flags"]) for n in names
                                  if rows[n].get("state") == "done" and rows[n].get("qc_flags")})


def _done_by_other_version(rows: dict[str, dict[str, Any]], names: Iterable[str],
                           version: str) -> list[str]:
    """The studies of ``names`` a manifest's ``rows`` record as done by another version."""
    return [n for n in names if rows.get(n, {}).get("state") == "done"
            and rows[n].get("ctperf_version", version) != version]


def refuse_other_versions(root: Path, names: Iterable[str]) -> None:
    """Refuse when a study of ``names`` that ``root``'s manifest records as done, and whose
    folder exists, was done by another ctperf version (a phantom cohort's subjects are data
    that maps and trainings were made from: made again by other code they would change under
    them; ``generate_cohort`` calls it before it writes anything).

    Raises
    ------
    InputError
        Naming the first studies and both versions.
    """
    from ctperf.versioning import software_version

    rows = load_manifest(root)
    version = software_version()
    other = [n for n in _done_by_other_version(rows, names, version) if (root / n).is_dir()]
    if other:
        raise InputError(root, f"{len(other)} done studies ({', '.join(other[:3])}"
                               f"{' ...' if len(other) > 3 else ''}) were made by ctperf "
                               f"{rows[other[0]]['ctperf_version']}, this is {version}; "
                               "finishing or extending this cohort would make them again: use "
                               "a new folder")


def run_cohort_folder(cohort: _PathLike, out: _PathLike, task: Task, options: Any, *,
                      scheduler: str | None = None, workers: int | None = None,
                      progress: bool = False) -> CohortSummary:
    """Check ``out``, find the studies of ``cohort`` and run ``task`` on them.

    ``out`` must not be, hold or lie inside ``cohort``, and must be new, empty, a ctperf
    output or hold a manifest (:func:`ctperf.io.check_output` ``kind="extend"``); then
    :func:`discover_studies` and :func:`run_cohort` with the same keywords.
    """
    from ctperf.io import check_output

    check_output(out, inputs=(cohort,), kind="extend", owned_by=(MANIFEST,))
    held = {name: row["source"] if isinstance(row.get("source"), str) else None
            for name, row in load_manifest(out).items()}
    studies = discover_studies(cohort, held=held)
    return run_cohort(studies, out, task, options, scheduler=scheduler, workers=workers,
                      progress=progress)
