"""Phantom cohorts: subjects simulated and written as a resumable cohort run.

Subject ``i`` of a cohort seeded with ``seed`` is :func:`ctperf.phantom.generate_subject` with
seed :func:`ctperf.phantom.subject_seed` ``(seed, i)``, written by
:func:`ctperf.phantom.write_subject` into ``sub-<i:04d>``; :func:`generate_cohort` runs them
through :func:`ctperf.workflow.cohort.run_cohort` (manifest, Dask workers or one process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from ctperf.errors import CTPerfError, InputError
from ctperf.io import write_json
from ctperf.io.state import holds_output
from ctperf.phantom import draw_parameters, generate_subject, subject_seed, write_subject
from ctperf.phantom.anatomy import check_source
from ctperf.workflow.cohort import Study, refuse_other_versions, run_cohort

__all__ = ["generate_cohort", "make_cohort_subject"]

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def _count(stored: Path) -> int:
    return int(_read_json(stored).get("subjects", 0)) if stored.exists() else 0


def make_cohort_subject(index: int, folder: Path, options: dict[str, Any]) -> None:
    """Simulate and write subject ``index`` of a cohort (the per-study task of
    :func:`generate_cohort`; ``options`` holds ``seed``, ``subject_options``, ``dicom`` and
    ``preview``)."""
    seed = options["seed"]
    sub = generate_subject(seed=subject_seed(seed, index), **options["subject_options"])
    params = {**sub.params, "cohort": {"seed": seed, "index": index}}
    write_subject(dataclasses.replace(sub, params=params), folder, dicom=options["dicom"],
                  preview=options["preview"])


def _check_recipe(root: Path, recipe: dict[str, Any]) -> int:
    """Subjects recorded in a matching ``cohort.json`` (0 when there is none); a different
    design for a cohort that holds subjects is refused."""
    stored = root / "cohort.json"
    if not stored.exists():
        return 0
    old = _read_json(stored)
    if {"seed": old.get("seed"), "options": old.get("options")} == recipe:
        return _count(stored)
    if any(p.is_dir() for p in root.glob("sub-*")):
        was, now = old.get("options") or {}, recipe["options"]
        changed = [f"seed {old.get('seed')} -> {recipe['seed']}"] \
            if old.get("seed") != recipe["seed"] else []
        changed += [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted({*was, *now})
                    if was.get(k) != now.get(k)]
        raise InputError(stored, f"this cohort was made with other settings ("
                                 f"{'; '.join(changed)}); use another folder to change them")
    log.info("%s describes no subject yet; replaced by the new seed and options", stored)
    return 0


# held from before cohort.json is read: a refused second run had rewritten it
@holds_output("folder")
def generate_cohort(folder: str | os.PathLike[str], *, subjects: int, seed: int,
                    progress: bool = False, dicom: bool = True, preview: bool = False,
                    workers: int | None = 1, scheduler: str | None = None,
                    **subject_options: Any) -> list[Path]:
    """Generate ``sub-0000`` ... in ``folder``, skipping subjects already written.

    Subject ``i`` is :func:`generate_subject` with seed :func:`subject_seed` ``(seed, i)`` and
    ``subject_options``; its params record the cohort seed and index. The subjects run as a
    cohort (:func:`ctperf.workflow.cohort.run_cohort`): ``folder/manifest.json`` records each
    one's state, so interrupting and running again finishes only the rest, and asking for more
    subjects extends the cohort. The seed and options are kept in ``cohort.json``, written once
    they have been checked (the first subject's parameters drawn), so invalid options leave
    nothing behind; a different seed or options for a cohort that holds subjects is an
    :class:`~ctperf.errors.InputError` (it would mix two designs), while a ``cohort.json``
    without subjects is replaced.

    Parameters
    ----------
    workers : int or None
        Subjects simulated at once: 1 runs them in this process, more on a local Dask cluster
        of that many processes, ``None`` sizes the cluster to the machine.
    scheduler : str, optional
        Address of an existing Dask scheduler to run the subjects on instead.

    Returns
    -------
    list of Path
        All subject folders, in order.

    Raises
    ------
    CTPerfError
        When a subject failed (after the others were written); the manifest names each
        failure.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    recipe = json.loads(json.dumps({"seed": seed, "options": subject_options}))
    known = _check_recipe(root, recipe)
    draw_parameters(seed=subject_seed(seed, 0),
                    **{k: v for k, v in subject_options.items() if k != "progress"})
    check_source(str(subject_options.get("anatomy", "procedural")))  # before any file
    root.mkdir(parents=True, exist_ok=True)
    studies = [Study(f"sub-{i:04d}", i) for i in range(subjects)]
    refuse_other_versions(root, [s.name for s in studies])  # before the record changes
    write_json({"subjects": max(subjects, known), **recipe}, root / "cohort.json")
    options = {"seed": seed, "subject_options": subject_options, "dicom": dicom,
               "preview": preview}
    summary = run_cohort(studies, root, make_cohort_subject, options, workers=workers,
                         scheduler=scheduler, progress=progress)
    if summary.failed:
        first = summary.failure_lines()[0]
        raise CTPerfError(f"{len(summary.failed)} of {subjects} subjects failed ({first}); "
                          f"{summary.manifest} lists them, and a rerun tries them again")
    return [root / s.name for s in studies]
