"""Training runs on a cohort: NLR references, slice caches and the U-Net's training or
patient-level cross-validation, as one call each (``ctperf train`` and ``ctperf cv``).

Everything a run writes lies in its output folder ``OUT`` unless told otherwise:

- ``OUT/references/<subject>/`` box-model NLR targets (``reference="nlr"``), reused on rerun;
- ``OUT/cache/`` the slice caches (``TrainingOptions.cache`` shares one cache folder between
  runs; it may lie neither inside the cohort nor be ``OUT`` itself);
- the training's checkpoints and logs (:func:`ctperf.model.train`,
  :func:`ctperf.model.cross_validate`).

The cohort is only read.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ctperf.errors import InputError, ValidationError
from ctperf.io.state import holds_output
from ctperf.io.study import phantom_studies

__all__ = [
    "TrainingOptions",
    "TrainingOutcome",
    "check_folds",
    "cohort_layout",
    "cohort_patients",
    "cross_validate_cohort",
    "held_out_patients",
    "prepare_training",
    "read_id_list",
    "split_patients",
    "train_cohort",
]

log = logging.getLogger(__name__)

#: Files whose presence marks a training or cross-validation folder written before output
#: markers existed.
_OWNED_BY = ("last.pt", "fold-0", "table1.csv")


@dataclass(frozen=True)
class TrainingOptions:
    """The options of a training run that are not hyper-parameters of the network.

    Attributes
    ----------
    reference : {"nlr", "truth"}
        Target maps: box-model NLR maps (computed into ``references``) or a phantom's truth; a
        UniToBrain cohort brings its own reference.
    references : Path or None
        ``reference="nlr"``: folder of NLR reference maps ``<subject>/<map>.nii.gz``; missing
        ones are computed into it (:func:`ctperf.workflow.nlr_references`). Default
        ``OUT/references``. ``reference="truth"``: the phantom cohort whose truth and brain
        masks belong to the studies trained on (when those are preprocessed copies); default
        the cohort itself.
    frame_mode : {"subsample", "resample"}
        Frame selection of the slice cache (:func:`ctperf.model.build_slice_cache`).
    resample_interval : float or None
        Grid step in s of ``frame_mode="resample"``.
    cache : Path or None
        Folder of slice caches; default ``OUT/cache``. It must not be ``OUT`` nor lie inside
        the cohort (ctperf never writes into its inputs).
    test_patients : tuple of str
        Held-out patients, never trained on.
    test_list : Path or None
        A text file of more held-out patient ids, one per line (blank lines and ``#``
        comments ignored).
    val_fraction : float
        Fraction of the patients (drawn with the config's seed) that validate a single
        training run (:func:`train_cohort`), in [0, 1).
    resume : bool
        Continue the run in ``OUT`` from its checkpoints.
    progress : bool
        Progress bars.
    references_ready : bool
        ``references`` were computed and checked by the caller (``ctperf reproduce``, with its
        own method and record): used as they are, none computed again here.
    cache_workers : int or None
        Patients read into the slice caches at once (threads; default
        :func:`ctperf.model.build_slice_cache`'s).
    """

    reference: str = "nlr"
    references: Path | None = None
    frame_mode: str = "subsample"
    resample_interval: float | None = None
    cache: Path | None = None
    test_patients: tuple[str, ...] = ()
    test_list: Path | None = None
    val_fraction: float = 0.2
    resume: bool = False
    progress: bool = False
    references_ready: bool = False
    cache_workers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_patients", tuple(self.test_patients))
        if self.reference not in ("nlr", "truth"):
            raise ValidationError(f"reference must be 'nlr' or 'truth', got {self.reference!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValidationError(f"the validation fraction must be in [0, 1), got "
                                  f"{self.val_fraction}")


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training run or a cross-validation did.

    Attributes
    ----------
    out : Path
        The run's folder.
    config : TrainConfig
        The configuration trained with (slice size and frames as cached).
    folds : list of (train ids, validation ids)
        One pair for a single run, one per fold for a cross-validation.
    model_paths : tuple of Path
        The final checkpoint of each pair in ``folds``.
    rows : list of dict
        Table 1 rows of a cross-validation (:func:`ctperf.model.cross_validate`); for a single
        run one row with the last epoch's ``train_loss`` and ``val_loss``.
    message : str
        One line for the user.
    """

    out: Path
    config: Any
    folds: list[tuple[list[str], list[str]]]
    model_paths: tuple[Path, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


def _check_run(cohort: Path, out: Path, options: TrainingOptions) -> Path:
    """Refuse an unusable OUT or cache before any work; return the cache folder."""
    from ctperf.io import check_output

    check_output(out, inputs=(cohort, options.test_list), kind="extend", owned_by=_OWNED_BY)
    cache = options.cache if options.cache is not None else out / "cache"
    resolved, source = cache.resolve(), cohort.resolve()
    if resolved == out.resolve():
        raise InputError(cache, "is the output folder; give the slice cache a folder of its own "
                                "(default OUT/cache)")
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise InputError(cache, f"is, holds or lies inside the cohort {cohort}; ctperf never "
                                "writes into its inputs, choose a slice cache folder outside it")
    if cache.exists() and not cache.is_dir():  # had said "File exists", after OUT was made
        raise InputError(cache, "exists and is a file; the slice cache is a folder")
    return cache


def prepare_training(cohort: str | Path, out: str | Path, config: Any,
                     options: TrainingOptions) -> tuple[Any, Any, Any]:
    """NLR references, the slice caches (final size, pretraining or None) and the run's config.

    ``OUT`` is marked as this run's before references are computed, so a failing reference
    leaves a folder a rerun may continue.

    Parameters
    ----------
    cohort, out : path
        Cohort (phantom or UniToBrain layout) and the run's folder.
    config : TrainConfig
        Hyper-parameters; ``size`` and ``frames`` choose the caches (None: the studies' own).
    options : TrainingOptions

    Returns
    -------
    (SliceCache, SliceCache or None, TrainConfig)
        The config has the cache's size and frame count, and no pretraining when the
        pretraining size is not below the training size.
    """
    from ctperf.io import mark_output

    cohort, out = Path(cohort), Path(out)
    cache_root = _check_run(cohort, out, options)
    if not cohort.is_dir():  # before OUT is made: a wrong path leaves nothing behind
        raise InputError(cohort, "cohort folder does not exist")
    created = not out.exists()
    mark_output(out)
    try:
        return _prepare(cohort, out, cache_root, config, options)
    except (InputError, ValidationError):
        if created and not _holds_work(out):  # only the marker and empty folders: take it back
            shutil.rmtree(out, ignore_errors=True)
        raise


def _holds_work(out: Path) -> bool:
    """Whether a run's folder holds any file but its ctperf marker."""
    from ctperf.io.atomic import MARKER

    return any(p.is_file() and p.name != MARKER for p in out.rglob("*"))


def cohort_layout(cohort: Path) -> str:
    """``"phantom"`` or ``"unitobrain"``: what kind of cohort a folder holds."""
    from ctperf.io.unitobrain import find_unitobrain

    if not cohort.is_dir():
        raise InputError(cohort, "is not a folder; expected a phantom cohort (ctperf phantom) "
                                 "or a UniToBrain folder")
    if phantom_studies(cohort):
        return "phantom"
    try:
        if find_unitobrain(cohort):
            return "unitobrain"
    except InputError:
        pass
    raise InputError(cohort, "holds neither phantom subjects (sub-*/study.nii.gz) nor "
                             "UniToBrain patients (MOL-*_Registered_Filtered_3mm_20HU)")


def _check_before_work(cohort: Path, out: Path, config: Any, options: TrainingOptions,
                       held_out: Sequence[str], folds: int | None = None) -> None:
    """Refuse, before a cohort's references and caches are computed (minutes to hours; these
    had been refused after them), a device torch does not see, held-out ids that name no
    subject folder, more ``folds`` than patients to validate on (a cohort of neither layout
    is left to the cache to describe), pretraining epochs without a pretraining size, and a
    run's checkpoint that cannot be continued (without ``resume``, or of another slice-cache
    format)."""
    from ctperf.model import resolve_device

    resolve_device(config.device)
    _check_checkpoints(out, folds, resume=options.resume)
    if config.pretrain_epochs > 0 and config.pretrain_size < 1:
        raise ValidationError("pretraining epochs need a pretraining size of 1 or more "
                              "(--pretrain-size; the preset has none)")
    layout = _layout_or_none(cohort)
    if layout is None:
        return
    ids = cohort_patients(cohort, layout)
    if layout == "unitobrain":
        _check_dataset_maps(cohort, config.targets)
    check_held_out(held_out, ids, options)
    pool = len(set(ids) - set(held_out))
    if ids and pool == 0:  # had read "folds must be 2 to 0", or failed after the caches
        raise ValidationError(f"every one of the cohort's {len(set(ids))} patients is held out "
                              "(--test); none is left to train on")
    if folds is not None:
        check_folds(folds, pool)


def cohort_patients(cohort: Path, layout: str) -> list[str]:
    """The patient ids of a cohort of the given :func:`cohort_layout`."""
    from ctperf.io.unitobrain import find_unitobrain

    if layout == "phantom":
        return [p.parent.name for p in phantom_studies(cohort)]
    return [pid for pid, _, _ in find_unitobrain(cohort)]


def check_folds(folds: int, patients: int) -> None:
    """Refuse more cross-validation folds than patients to validate on, before any work."""
    if not 2 <= folds <= patients:
        raise ValidationError(f"folds must be 2 to {patients} (one patient per fold at most; "
                              f"the cohort has {patients} to validate on), got {folds}")


def _check_dataset_maps(cohort: Path, targets: Sequence[str]) -> None:
    """Refuse a UniToBrain cohort in which any patient lacks the map folder of a target,
    naming every patient and map at once (they had been found by the slice cache, after it
    was built, one run at a time)."""
    from ctperf.io.unitobrain import FOLDER_OF_MAP, find_unitobrain, lacking_maps
    from ctperf.model.normalise import target_maps

    needed = target_maps(targets)
    unknown = [n for n in needed if n not in FOLDER_OF_MAP]
    if unknown:
        raise InputError(cohort, f"the UniToBrain dataset has no {', '.join(unknown)} maps to "
                                 f"learn (its NLR maps: {', '.join(FOLDER_OF_MAP)}); train other "
                                 "targets")
    gaps = [f"{pid}: {', '.join(FOLDER_OF_MAP[n] for n in lack)}"
            for pid, _, maps in find_unitobrain(cohort) if (lack := lacking_maps(maps, needed))]
    if gaps:
        listed = "; ".join(gaps[:10]) + (f" and {len(gaps) - 10} more" if len(gaps) > 10 else "")
        raise InputError(cohort, f"patients without the reference maps of the targets "
                                 f"({', '.join(targets)}): {listed}; train other targets or "
                                 "leave these patients out of the cohort")


def _check_checkpoints(out: Path, folds: int | None, *, resume: bool) -> None:
    """Refuse a run's ``last.pt`` (OUT's, or each fold's) that this run could not continue:
    without ``resume``, or written for another slice-cache format (an older ctperf's run,
    which had been refused only after a new cache was built beside the old one)."""
    from ctperf.model import load_checkpoint
    from ctperf.model.data import CACHE_VERSION
    from ctperf.model.train import refuse_unresumed

    lasts = sorted(out.glob("fold-*/last.pt")) if folds is not None else [out / "last.pt"]
    for last in (p for p in lasts if p.exists()):
        refuse_unresumed(last, resume=resume)
        ckpt = load_checkpoint(last)
        made = int(ckpt["config"].get("cache_version", 1))
        if made != CACHE_VERSION:
            by = ckpt.get("software_version", "of an older version")
            raise InputError(last, f"was made by ctperf {by} on slice caches of format {made}; "
                                   f"this ctperf builds format {CACHE_VERSION} and cannot "
                                   "continue it: train into a new folder")


def _layout_or_none(cohort: Path) -> str | None:
    """:func:`cohort_layout`, or None for a folder of neither kind (the slice cache says what
    is wrong with it)."""
    try:
        return cohort_layout(cohort)
    except InputError:
        return None


def _prepare(cohort: Path, out: Path, cache_root: Path, config: Any,
             options: TrainingOptions) -> tuple[Any, Any, Any]:
    """:func:`prepare_training` once OUT is marked."""
    from ctperf.model import build_slice_cache
    from ctperf.workflow.references import nlr_references

    if options.reference == "truth" and _layout_or_none(cohort) == "unitobrain":
        raise InputError(cohort, "has no true maps: --reference truth needs a phantom cohort "
                                 "(a UniToBrain cohort's reference is its own NLR maps)")
    references = options.references  # the truth's phantom cohort, for reference="truth"
    # into OUT (or the given folder), never into the cohort; not where the caller made them (a
    # study copied after its references looked newer, and they were refitted with plain nlr
    # over reproduce's own method, without the summary its prediction step reads)
    if _layout_or_none(cohort) == "unitobrain":
        references = None  # its own maps: no run's folder in the cache's name (shared caches)
    elif options.reference == "nlr" and not (options.references_ready and options.references):
        references = nlr_references(cohort, options.references or out / "references",
                                    progress=options.progress)
    common: dict[str, Any] = {
        "reference": options.reference, "references": references,
        "frame_mode": options.frame_mode, "frame_interval": options.resample_interval,
        "workers": options.cache_workers, "progress": options.progress}
    cache = build_slice_cache(cohort, cache_root, size=config.size, frames=config.frames,
                              **common)
    config = replace(config, size=cache.size, frames=cache.n_frames)
    if config.pretrain_epochs > 0 and config.pretrain_size >= cache.size:
        log.warning("pretraining skipped: the pretraining size %d is not below the training "
                    "size %d", config.pretrain_size, cache.size)
        config = replace(config, pretrain_epochs=0)
    pretrain = None
    if config.pretrain_epochs > 0:
        pretrain = build_slice_cache(cohort, cache_root, size=config.pretrain_size,
                                     frames=cache.n_frames, **common)
    return cache, pretrain, config


def read_id_list(path: Path | None) -> list[str]:
    """Patient ids from a text file, one per line (blank lines and ``#`` comments ignored)."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the patient list ({exc})") from None
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def held_out_patients(options: TrainingOptions) -> list[str]:
    """The held-out patients of ``options``: ``test_patients`` and those of ``test_list``."""
    return sorted(set(options.test_patients) | set(read_id_list(options.test_list)))


def check_held_out(held_out: Sequence[str], patients: Sequence[str],
                   options: TrainingOptions) -> None:
    """Refuse held-out ids that name no patient of the cohort: a mistyped id would leave its
    patient in training, and the "held-out" scores would be on data the network saw."""
    unknown = sorted(set(held_out) - set(patients))
    if unknown:
        where = options.test_list if options.test_list is not None else "--test"
        raise InputError(where, f"held-out patient{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(unknown[:5])} not in the cohort (its patients: "
                                f"{', '.join(sorted(patients)[:5])}"
                                f"{', ...' if len(patients) > 5 else ''})")


def split_patients(patients: Sequence[str], *, val_fraction: float, seed: int,
                   test_patients: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(training, validation) patients: the pool without the test list, shuffled with
    ``numpy.random.default_rng(seed)``; the first ``round(val_fraction * n)`` validate."""
    import numpy as np

    pool = sorted(set(patients) - set(test_patients))
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    n_val = round(val_fraction * len(pool))
    if n_val >= len(pool):
        raise ValidationError(f"{len(pool)} patients leave none for training")
    return sorted(order[n_val:]), sorted(order[:n_val])


@holds_output("out")
def train_cohort(cohort: str | Path, out: str | Path, config: Any,
                 options: TrainingOptions = TrainingOptions()) -> TrainingOutcome:
    """Train the U-Net on a cohort: references -> slice caches -> split -> train.

    Parameters
    ----------
    cohort : path
        Phantom cohort (``sub-*/study.nii.gz``) or UniToBrain folder.
    out : path
        The run's folder: ``last.pt`` (every epoch), ``best.pt``, ``model.pt``, ``log.csv``,
        ``references/`` and ``cache/`` by default.
    config : TrainConfig
        Hyper-parameters (:data:`ctperf.model.PRESETS`, changed with
        :func:`dataclasses.replace`).
    options : TrainingOptions

    Returns
    -------
    TrainingOutcome
    """
    from ctperf.model import train

    cohort, out = Path(cohort), Path(out)
    held_out = held_out_patients(options)
    _check_before_work(cohort, out, config, options, held_out)
    if options.resume and not (out / "last.pt").exists():  # a mistyped folder is noticed
        log.warning("nothing to resume in %s (no last.pt): training from the start", out)
    cache, pretrain, config = prepare_training(cohort, out, config, options)
    check_held_out(held_out, cache.patient_ids, options)
    tr, va = split_patients(cache.patient_ids, val_fraction=options.val_fraction,
                            seed=config.seed, test_patients=held_out)
    result = train(cache, out, config, train_patients=tr, val_patients=va,
                   pretrain_cache=pretrain, resume=options.resume, progress=options.progress)
    last = result.history[-1]
    message = (f"trained {'+'.join(config.targets)} on {len(tr)} patients, validated on "
               f"{len(va)} others: final train {_loss_name(config)} {last['train_loss']:.4f} "
               f"({'augmented, ' if config.augment else ''}training mode), validation MSE "
               f"{last['val_loss']:.4f} -> {result.model_path}")
    return TrainingOutcome(out=out, config=config, folds=[(tr, va)],
                           model_paths=(result.model_path,),
                           rows=[{"train_loss": last["train_loss"],
                                  "val_loss": last["val_loss"]}], message=message)


def _loss_name(config: Any) -> str:
    """The training loss's name as the log reports it (the cpu preset's is L1, not MSE)."""
    return {"mse": "MSE", "l1": "L1"}.get(str(getattr(config, "loss", "mse")), "loss")


@holds_output("out")
def cross_validate_cohort(cohort: str | Path, out: str | Path, config: Any,
                          options: TrainingOptions = TrainingOptions(), *,
                          folds: int = 3) -> TrainingOutcome:
    """Patient-level K-fold cross-validation on a cohort: references -> slice caches -> one
    model per fold (``OUT/fold-<k>/``) -> Table 1 (``OUT/table1.csv``, ``OUT/table1.md``).

    Parameters
    ----------
    cohort, out, config, options
        As :func:`train_cohort`; ``options.val_fraction`` is not used (each fold validates on
        its own group of patients).
    folds : int
        Number of folds K >= 2 (:func:`ctperf.model.make_folds`, drawn with ``config.seed``).

    Returns
    -------
    TrainingOutcome
        ``folds`` in fold order (fold k is ``folds[k - 1]``), ``rows`` Table 1.
    """
    from ctperf.model import cross_validate, format_table, make_folds

    cohort, out = Path(cohort), Path(out)
    held_out = held_out_patients(options)
    _check_before_work(cohort, out, config, options, held_out, folds)
    cache, pretrain, config = prepare_training(cohort, out, config, options)
    check_held_out(held_out, cache.patient_ids, options)
    pairs = make_folds(cache.patient_ids, k=folds, seed=config.seed, test_patients=held_out)
    rows = cross_validate(cache, out, config, folds=folds, test_patients=held_out,
                          pretrain_cache=pretrain, resume=options.resume,
                          progress=options.progress)
    message = (format_table(rows, target="+".join(config.targets))
               + f"saved {out / 'table1.csv'} and {out / 'table1.md'}")
    return TrainingOutcome(out=out, config=config, folds=pairs,
                           model_paths=tuple(out / f"fold-{k}" / "model.pt"
                                             for k in range(1, folds + 1)),
                           rows=rows, message=message)
