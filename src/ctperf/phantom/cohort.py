"""Phantom subjects on disk: write, read, and generate a resumable cohort.

Layout of one subject folder (docs/ARCHITECTURE.md): ``study.nii.gz`` + ``study.json``,
``dicom/``, ``truth/<map>.nii.gz`` (plus ``cbf_healthy``, ``dispersion``, ``severity``,
``artery_pv``, ``vessel_fraction``, ``gm_fraction``, ``wm_fraction`` and the noise-free
``baseline``), ``masks/<name>.nii.gz``,
``curves.json``, ``motion.json``, ``params.json`` and optionally ``preview.png``. A subject
folder is written beside its final name and renamed when complete, so an existing folder is a
finished subject.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError
from ctperf.io import (
    atomic_dir,
    read_maps,
    read_nifti_series,
    read_volume,
    write_json,
    write_maps_nifti,
    write_series_dicom,
    write_series_nifti,
    write_volume,
)
from ctperf.phantom.generate import MASK_NAMES, PhantomSubject, generate_subject

__all__ = ["generate_cohort", "make_cohort_subject", "read_subject", "subject_seed",
           "write_subject"]

log = logging.getLogger(__name__)

_EXTRAS = ("cbf_healthy", "dispersion", "severity", "artery_pv", "vessel_fraction",
           "gm_fraction", "wm_fraction")
_EXTRA_UNITS = {"cbf_healthy": "mL/100g/min", "dispersion": "s", "severity": "1",
                "artery_pv": "1", "vessel_fraction": "1", "gm_fraction": "1",
                "wm_fraction": "1"}
MOTION_COLUMNS = ("rot_x_deg", "rot_y_deg", "rot_z_deg", "shift_x_mm", "shift_y_mm",
                  "shift_z_mm")


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a cohort seeded with ``seed`` (deterministic, independent)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_subject(subject: PhantomSubject, folder: str | os.PathLike[str], *, dicom: bool = True,
                  preview: bool = False, nifti_dtype: str = "int16") -> Path:
    """Write a subject folder (replaced whole, never half-written).

    ``nifti_dtype="int16"`` stores whole HU as a scanner does; ``"float32"`` keeps fractions
    (useful for noise-free studies).
    """
    out = Path(folder)
    with atomic_dir(out) as tmp:
        write_series_nifti(subject.series, tmp / "study.nii.gz", dtype=nifti_dtype)
        if dicom:
            write_series_dicom(subject.series, tmp / "dicom")
        write_maps_nifti(subject.truth, tmp / "truth")
        aff = subject.truth.affine
        for name in _EXTRAS:
            write_volume(subject.extras[name], aff, tmp / "truth" / f"{name}.nii.gz",
                         sidecar={"map": name, "units": _EXTRA_UNITS[name]})
        write_volume(subject.baseline, aff, tmp / "truth" / "baseline.nii.gz",
                     sidecar={"map": "baseline", "units": "HU",
                              "description": "noise-free unenhanced image, without motion"})
        for name in MASK_NAMES:
            mask = subject.masks[name]
            write_volume(mask.astype(np.int16 if name == "territories" else np.uint8), aff,
                         tmp / "masks" / f"{name}.nii.gz")
        write_json({"units": "HU above baseline", "times": subject.series.times,
                    "aif": subject.aif, "vof": subject.vof, "fine_times": subject.fine_times,
                    "aif_fine": subject.aif_fine, "vof_fine": subject.vof_fine,
                    "note": "aif is the true arterial enhancement, without partial volume"},
                   tmp / "curves.json")
        write_json({"columns": list(MOTION_COLUMNS), "motion": subject.motion,
                    "category": subject.params.get("motion_category"),
                    "convention": "frame t shows the head moved by x -> R x + s about the slab "
                                  "centre; R from extrinsic x, y, z rotations"},
                   tmp / "motion.json")
        write_json(subject.params, tmp / "params.json")
        if preview:
            from ctperf.phantom.preview import write_preview

            write_preview(subject, tmp / "preview.png")
    return out


def _json(path: Path) -> Any:
    if not path.exists():
        raise InputError(path, "missing from the phantom subject folder")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def read_subject(folder: str | os.PathLike[str]) -> PhantomSubject:
    """Read a folder written by :func:`write_subject`."""
    root = Path(folder)
    if not (root / "study.nii.gz").exists():
        raise InputError(root, "not a phantom subject folder (no study.nii.gz)")
    series = read_nifti_series(root / "study.nii.gz")
    truth = read_maps(root / "truth")
    masks: dict[str, np.ndarray] = {}
    for name in MASK_NAMES:
        vol, _ = read_volume(root / "masks" / f"{name}.nii.gz")
        masks[name] = vol.astype(np.int16) if name == "territories" else vol != 0
    extras = {name: read_volume(root / "truth" / f"{name}.nii.gz")[0] for name in _EXTRAS}
    baseline = read_volume(root / "truth" / "baseline.nii.gz")[0]
    curves = _json(root / "curves.json")
    motion = _json(root / "motion.json")
    params = _json(root / "params.json")
    return PhantomSubject(series=series, truth=truth, masks=masks,
                          aif=np.asarray(curves["aif"], dtype=np.float64),
                          vof=np.asarray(curves["vof"], dtype=np.float64),
                          motion=np.asarray(motion["motion"], dtype=np.float64).reshape(-1, 6),
                          params=params, baseline=baseline, extras=extras,
                          fine_times=np.asarray(curves["fine_times"], dtype=np.float64),
                          aif_fine=np.asarray(curves["aif_fine"], dtype=np.float64),
                          vof_fine=np.asarray(curves["vof_fine"], dtype=np.float64))


def _count(stored: Path) -> int:
    return int(_json(stored).get("subjects", 0)) if stored.exists() else 0


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
    old = _json(stored)
    if {"seed": old.get("seed"), "options": old.get("options")} == recipe:
        return _count(stored)
    if any(p.is_dir() for p in root.glob("sub-*")):
        raise InputError(stored, f"this cohort was made with seed {old.get('seed')} and "
                                 f"options {old.get('options')}, not seed {recipe['seed']} and "
                                 f"{recipe['options']}; use another folder to change them")
    log.info("%s describes no subject yet; replaced by the new seed and options", stored)
    return 0


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
    # Generating subjects is a cohort run; the runner is imported here, so that importing the
    # phantom stays free of the workflow layer above it.
    from ctperf.errors import CTPerfError
    from ctperf.phantom.generate import draw_parameters
    from ctperf.workflow.cohort import Study, run_cohort

    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    recipe = json.loads(json.dumps({"seed": seed, "options": subject_options}))
    known = _check_recipe(root, recipe)
    draw_parameters(seed=subject_seed(seed, 0),
                    **{k: v for k, v in subject_options.items() if k != "progress"})
    root.mkdir(parents=True, exist_ok=True)
    write_json({"subjects": max(subjects, known), **recipe}, root / "cohort.json")
    studies = [Study(f"sub-{i:04d}", i) for i in range(subjects)]
    options = {"seed": seed, "subject_options": subject_options, "dicom": dicom,
               "preview": preview}
    summary = run_cohort(studies, root, make_cohort_subject, options, workers=workers,
                         scheduler=scheduler, progress=progress)
    if summary.failed:
        first = summary.failure_lines()[0]
        raise CTPerfError(f"{len(summary.failed)} of {subjects} subjects failed ({first}); "
                          f"{summary.manifest} lists them, and a rerun tries them again")
    return [root / s.name for s in studies]
