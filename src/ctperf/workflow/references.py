"""Box-model NLR reference maps of a phantom-layout cohort, the targets of U-Net training.

The references are written to an output folder (a training run's, or a cache), never into the
input cohort: ``OUT/<subject>/<map>.nii.gz`` for each ``COHORT/sub-*`` with a ``study.nii.gz``.
:func:`ctperf.model.build_slice_cache` then reads them (``references=OUT``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ctperf.errors import AIFRefused, CTPerfError, InputError
from ctperf.io.state import files_state

__all__ = ["REFERENCE_MAPS", "nlr_references"]

log = logging.getLogger(__name__)

#: Maps a reference folder must hold to count as complete.
REFERENCE_MAPS = ("cbf", "cbv", "mtt", "delay")


#: The file in a reference folder recording the state of the study it was computed from.
SOURCE_RECORD = "source.json"


def _complete(folder: Path, study: Path | None = None) -> bool:
    """All reference maps are in ``folder``, computed from ``study`` as it is now: its size and
    modification time as recorded in the folder's :data:`SOURCE_RECORD` (a study replaced by a
    copy that kept an older time, ``cp -p`` or ``rsync -a``, had kept references of the study
    before), or, in a folder without the record (a phantom's own ``nlr/``, or one written
    before the record), none of the maps older than the study."""
    files = [folder / f"{name}.nii.gz" for name in REFERENCE_MAPS]
    if not all(f.exists() for f in files):
        return False
    if study is None:
        return True
    record = folder / SOURCE_RECORD
    if record.exists():
        try:
            return bool(json.loads(record.read_text()) == [list(v) for v in files_state(study)])
        except (OSError, json.JSONDecodeError):
            return False
    return min(f.stat().st_mtime_ns for f in files) >= study.stat().st_mtime_ns


def nlr_references(cohort: str | Path, out: str | Path, *, progress: bool = False) -> Path:
    """Compute the box-model NLR maps (``method="nlr"``) of every phantom-layout subject.

    Subjects whose references already exist (``OUT/<subject>/`` or, precomputed with the cohort,
    ``COHORT/<subject>/nlr/``) and were computed from the study as it is (``source.json``
    records its size and time; without it, not older than the study) are skipped, so a rerun
    resumes (and a study replaced since has its references computed again). Each subject's
    folder is written atomically with the vessel mask of the fit (``lesions/vessels.nii.gz``),
    which training leaves out of its loss. Each study is fitted as ``ctperf maps`` fits it
    (automatic brain, AIF and VOF; the phantom's artery mask as the AIF mask where no artery
    is found).

    Parameters
    ----------
    cohort : path
        Cohort folder, ``sub-*/study.nii.gz`` (a UniToBrain cohort brings its own reference:
        nothing is computed).
    out : path
        Folder receiving ``<subject>/<map>.nii.gz``; it must not be or lie inside the cohort.
    progress : bool
        A progress bar over subjects.

    Returns
    -------
    Path
        ``out``, to pass as ``references`` to :func:`ctperf.model.build_slice_cache`.

    Raises
    ------
    InputError
        ``out`` is, holds or lies inside the cohort, or a subject's reference cannot be
        computed (naming the subject).
    """
    from tqdm.auto import tqdm

    from ctperf import io

    root, out = Path(cohort), Path(out)
    io.check_output(out, inputs=(root,), kind="extend")
    subjects = [p.parent for p in io.phantom_studies(root)]
    todo = [s for s in subjects if not (_complete(out / s.name, s / "study.nii.gz")
                                        or _complete(s / "nlr", s / "study.nii.gz"))]
    if todo:
        io.mark_output(out)
    for sub in tqdm(todo, desc="NLR references", disable=not progress or not todo):
        source = files_state(sub / "study.nii.gz")  # before it is read: one replaced meanwhile
        maps, vessels = _subject_reference(sub, out / sub.name)  # is computed again next time
        with io.atomic_dir(out / sub.name) as tmp:
            io.write_maps_nifti(maps, tmp)
            (tmp / SOURCE_RECORD).write_text(json.dumps(source))
            if vessels.any():  # the slice cache leaves them out of the training loss
                io.write_volume(vessels, maps.affine, tmp / "lesions" / "vessels.nii.gz",
                                **io.nifti_space(maps.provenance))
    return out


def _subject_reference(sub: Path, folder: Path) -> tuple[Any, Any]:
    """(NLR maps, vessel mask) of one phantom-layout subject, fitted as ``ctperf maps`` fits a
    study: in its automatic brain, with the AIF and VOF found in the study (the phantom's
    brain mask holds neither its arteries nor its sinus: fitted in it, the AIF had no VOF to
    correct its partial volume, and CBF and CBV read twice the truth); where the automatic
    selection finds no artery (small or noisy phantoms), the phantom's artery mask is the AIF
    mask, as ``ctperf reproduce`` does (``folder``: where they go, for the error message)."""
    from ctperf import io, perfusion

    series = io.read_nifti_series(sub / "study.nii.gz")
    artery = sub / "masks" / "artery.nii.gz"
    log.info("computing the NLR reference of %s", sub.name)
    try:
        try:
            result = perfusion.run_perfusion(series, method="nlr")
        except CTPerfError as exc:
            if not isinstance(exc, AIFRefused) or not artery.exists():
                raise
            log.warning("%s: %s; the phantom's artery mask is used as the AIF mask", sub.name,
                        exc)
            mask = io.read_mask(artery, shape=series.shape[1:], affine=series.affine)
            result = perfusion.run_perfusion(series, method="nlr", aif_mask=mask)
    except CTPerfError as exc:
        raise InputError(sub, f"the NLR reference could not be computed ({exc}); compute it "
                              f"into {folder} yourself (e.g. with an AIF mask)") from None
    return result.maps, result.vessels
