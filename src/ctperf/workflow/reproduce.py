"""``ctperf reproduce``: the study of Gava et al. 2023 (doi:10.3389/fninf.2023.852105) on a
cohort, as one resumable run.

Steps, each skipped when a previous run into the same folder finished it:

1. preprocessing (phantom cohorts): every frame registered to the first, then the bilateral
   filter guided by the temporal mean, into ``OUT/preprocessed/<subject>/`` (a UniToBrain
   folder holds registered and filtered studies already);
2. NLR reference maps: the box model (``ctperf maps --method nlr``) on the preprocessed studies
   into ``OUT/nlr/<subject>/``, a maps cohort with lesions (UniToBrain: the dataset's own NLR
   maps, written in the same layout);
3. patient-level K-fold cross-validation of the U-Net, one network per map as the paper (or one
   network for every map), into ``OUT/cv/<map>/fold-<k>/`` with the slice caches in
   ``OUT/cache/``; the fold of every subject in ``OUT/folds.json``;
4. prediction of every subject by the model of the fold that validated on it (never saw it),
   into ``OUT/cnn/<subject>/``: maps, lesions segmented as ``ctperf maps`` does, summary.json
   and overview.png;
5. evaluation (``ctperf evaluate OUT/cnn OUT/nlr``, with the phantom's truth) into
   ``OUT/evaluation/``, and the self-contained ``OUT/report.html``.

The input cohort is only read; for a phantom cohort ``OUT/cohort`` points to it (a symbolic
link, or ``cohort.json`` holding its path where links cannot be made).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ctperf.errors import CTPerfError, InputError, ValidationError
from ctperf.filter_options import check_filter_settings
from ctperf.io.state import holds_output
from ctperf.io.study import phantom_studies
from ctperf.lesion_options import LesionOptions
from ctperf.workflow.reproduce_subjects import (
    phantom_maps,
    predict_subject,
    unitobrain_reference,
)
from ctperf.workflow.training import check_folds, cohort_layout, cohort_patients

__all__ = ["PHANTOM_TARGETS", "UNITOBRAIN_TARGETS", "NeuralDemoOptions", "ReproduceOptions",
           "ReproduceOutcome", "reproduce_cohort", "run_neural_demo", "training_compute"]

log = logging.getLogger(__name__)

#: Maps learned on a phantom cohort: the paper's CBV, CBF and TTP, and Tmax for the lesions.
PHANTOM_TARGETS = ("cbv", "cbf", "ttp", "tmax")
#: Maps learned on UniToBrain (its NLR reference has no Tmax).
UNITOBRAIN_TARGETS = ("cbv", "cbf", "ttp")
_RECORD = "reproduce.json"
#: What the networks were trained on (:func:`_inputs_digest`), beside the run's record.
_TRAINED_ON = "trained_on.json"
_FORMAT = "ctperf-reproduce"
_STEPS = 5


@dataclass(frozen=True)
class ReproduceOptions:
    """Options of :func:`reproduce_cohort` other than the network's hyper-parameters.

    Attributes
    ----------
    targets : tuple of str or None
        Maps to learn; None: :data:`PHANTOM_TARGETS` or :data:`UNITOBRAIN_TARGETS`. Lesions of
        the U-Net's maps need ``cbf`` and ``tmax``.
    per_map : bool
        One network per map, as the paper (else one network with one output per map).
    folds : int
        Folds K of the patient-level cross-validation, >= 2.
    register, filter : bool
        Preprocessing of a phantom cohort: rigid registration of every frame to the first, and
        the bilateral filter (``spatial_sigma_mm`` mm, ``range_sigma_hu`` HU,
        ``filter_weights``).
    method : str
        Reference method of ``ctperf maps`` (``nlr``: the paper's Nelder-Mead box model).
    reference : {"nlr", "truth"}
        What the network learns: the reference method's maps (``"nlr"``, whatever
        ``method`` is, as the paper) or, on a phantom cohort, its true maps (``"truth"``);
        the reference method's maps are computed either way (``OUT/nlr``), for comparison
        and for the brain and vessel masks of the lesions.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, for the box-model fits and prediction
        (training uses the config's device).
    batch_size : int
        Slices per forward pass when predicting.
    workers : int or None
        Studies preprocessed and fitted at once (:func:`ctperf.workflow.cohort.run_cohort`):
        1 in this process, None a local cluster sized to the machine; also the patients read
        into the slice caches at once (threads; None: :func:`ctperf.model.build_slice_cache`'s
        default).
    lesion_options : LesionOptions
        Lesion thresholds of both readers (defaults of ``ctperf maps``).
    progress : bool
        Progress bars.
    """

    targets: tuple[str, ...] | None = None
    per_map: bool = True
    folds: int = 3
    register: bool = True
    filter: bool = True
    spatial_sigma_mm: float = 3.0
    range_sigma_hu: float = 20.0
    filter_weights: str = "linear"
    method: str = "nlr"
    reference: str = "nlr"
    device: str = "auto"
    batch_size: int = 4
    workers: int | None = None
    lesion_options: LesionOptions = field(default_factory=LesionOptions)
    progress: bool = False

    def __post_init__(self) -> None:
        check_filter_settings(self.filter, spatial_sigma_mm=self.spatial_sigma_mm,
                              range_sigma_hu=self.range_sigma_hu,
                              filter_weights=self.filter_weights)
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets:
                raise ValidationError("targets must name at least one map")
            twice = sorted({t for t in self.targets if self.targets.count(t) > 1})
            if twice:
                raise ValidationError(f"targets name {', '.join(twice)} more than once")
        if self.folds < 2:
            raise ValidationError(f"folds must be 2 or more, got {self.folds}")
        if self.reference not in ("nlr", "truth"):
            raise ValidationError(f"reference must be 'nlr' or 'truth', got {self.reference!r}")


@dataclass(frozen=True)
class ReproduceOutcome:
    """What :func:`reproduce_cohort` did.

    Attributes
    ----------
    out : Path
        The run's folder.
    report : Path
        ``OUT/report.html``.
    subject_fold : dict of str to int
        Subject -> the fold (1..K) whose model predicted it (it validated that fold).
    agreement : dict
        U-Net against NLR per map (``pearson_r``, ``mse_window``, ``mae``, ``bias``: mean over
        subjects) and per lesion (``dice``: mean over subjects with a reference lesion).
    computed : tuple of str
        The steps this run computed something in (empty for a finished run run again).
    message : str
        Lines for the user: the agreement table.
    """

    out: Path
    report: Path
    subject_fold: dict[str, int]
    agreement: dict[str, Any]
    computed: tuple[str, ...]
    message: str


@holds_output("out")
def reproduce_cohort(cohort: str | Path, out: str | Path, config: Any,
                     options: ReproduceOptions = ReproduceOptions(), *,
                     echo: Callable[[str], None] | None = None) -> ReproduceOutcome:
    """Run the paper's study on a phantom cohort or a UniToBrain folder (see the module).

    Parameters
    ----------
    cohort : path
        A phantom cohort (``ctperf phantom``: ``sub-*/study.nii.gz`` with truth and masks) or
        a UniToBrain folder (:func:`ctperf.io.iter_unitobrain`).
    out : path
        The run's folder; a rerun into it continues or skips the steps done. It must be new,
        empty or a previous run of this function with the same settings, and must not hold
        the cohort, except as ``OUT/cohort`` (:func:`run_neural_demo`).
    config : TrainConfig
        The U-Net's hyper-parameters (:data:`ctperf.model.PRESETS`); its ``targets`` are
        replaced by the options'.
    options : ReproduceOptions
    echo : callable, optional
        Receives one line per step.

    Returns
    -------
    ReproduceOutcome
    """
    from ctperf import io

    say = echo or (lambda line: None)
    cohort, out = Path(cohort), Path(out)
    layout = cohort_layout(cohort)
    if options.reference == "truth" and layout != "phantom":
        raise InputError(cohort, "has no true maps: --reference truth needs a phantom cohort")
    targets = options.targets or (PHANTOM_TARGETS if layout == "phantom"
                                  else UNITOBRAIN_TARGETS)
    config = dataclasses.replace(config, targets=targets)
    inside = cohort.resolve() == (out / "cohort").resolve()  # the demo's own cohort
    io.check_output(out, inputs=() if inside else (cohort,), kind="extend",
                    owned_by=(_RECORD,))
    config = _fit_frames(config, cohort, layout, say)
    _check_record(out, cohort, layout, config, options)
    # refused here, not after the preprocessing and the references (minutes to hours)
    check_folds(options.folds, len(cohort_patients(cohort, layout)))
    io.mark_output(out)
    if layout == "phantom" and not inside:
        _link_cohort(cohort, out)
    _write_record(out, cohort, layout, config, options)
    computed: list[str] = []
    studies_root = _preprocess(cohort, out, layout, options, say, computed)
    _references(cohort, studies_root, out, layout, options, say, computed)
    subject_fold = _cross_validate(cohort, studies_root, out, layout, config, options, say,
                                   computed)
    _predict(cohort, studies_root, out, layout, config, options, subject_fold, say, computed)
    agreement = _evaluate(out, layout, options, say, computed)
    message = _agreement_text(agreement)
    return ReproduceOutcome(out=out, report=out / "report.html", subject_fold=subject_fold,
                            agreement=agreement, computed=tuple(computed), message=message)


# Slices per UniToBrain study (89 volumes of 8 slices) and its image size, for estimates made
# without reading its DICOM files.
_UNITOBRAIN_SLICES, _UNITOBRAIN_SIZE, _UNITOBRAIN_FRAMES = 8, 512, 89


def training_compute(cohort: str | Path, config: Any,
                     options: ReproduceOptions = ReproduceOptions()) -> dict[str, Any]:
    """What the cross-validation of :func:`reproduce_cohort` will cost, before it runs.

    Counts the cohort's slices (phantom: from the studies' headers; UniToBrain: its patients
    x 8 slices of 512 x 512 x 89), the networks (one per map and fold, or one per fold) and
    the floating-point operations of their training: 3 forward passes' worth per training
    slice and epoch (forward and backward, :func:`ctperf.model.unet_flops`), pretraining
    stage included. Returns ``networks``, ``slices``, ``training_slices`` (per fold),
    ``flops_per_network`` and ``flops``.
    """
    from ctperf.model import unet_flops

    cohort = Path(cohort)
    layout = cohort_layout(cohort)
    if layout == "phantom":
        import nibabel as nib

        shapes = [tuple(int(n) for n in cast(Any, nib.load(p)).shape)
                  for p in phantom_studies(cohort)]
        slices = sum(sh[2] for sh in shapes)
        size, frames = max(sh[0] for sh in shapes), min(sh[3] for sh in shapes)
    else:
        from ctperf.io.unitobrain import find_unitobrain

        slices = _UNITOBRAIN_SLICES * len(find_unitobrain(cohort))
        size, frames = _UNITOBRAIN_SIZE, _UNITOBRAIN_FRAMES
    targets = options.targets or (PHANTOM_TARGETS if layout == "phantom"
                                  else UNITOBRAIN_TARGETS)
    outputs = 1 if options.per_map else len(targets)
    networks = options.folds * (len(targets) if options.per_map else 1)
    training = slices * (options.folds - 1) / options.folds
    arch = {"in_frames": min(config.frames or frames, frames), "out_channels": outputs,
            "width": config.width, "depth": config.depth, "kernel_size": config.kernel_size}
    per_epoch = 3 * training
    per_network = per_epoch * config.epochs * unet_flops(size=config.size or size, **arch)
    if config.pretrain_epochs and config.pretrain_size:
        per_network += (per_epoch * config.pretrain_epochs
                        * unet_flops(size=config.pretrain_size, **arch))
    return {"layout": layout, "networks": networks, "slices": slices,
            "training_slices": training, "flops_per_network": per_network,
            "flops": per_network * networks}


@dataclass(frozen=True)
class NeuralDemoOptions:
    """Options of :func:`run_neural_demo`: the phantom cohort (``subjects`` of ``size`` px,
    ``slices`` of 5 mm, ``frames`` 0.5 s apart, no motion, ``seed``; the noise of a
    ``noise_matrix``-pixel reconstruction at 150 mAs averaged into its pixels, as in a study
    downsampled to ``size``), the U-Net ``preset`` and the :class:`ReproduceOptions` of the
    run (registration off: nothing moves)."""

    subjects: int = 24
    size: int = 64
    slices: int = 4
    frames: int = 89
    seed: int = 3
    noise_matrix: int | None = 512
    preset: str = "cpu"
    epochs: int | None = None
    reproduce: ReproduceOptions = field(
        default_factory=lambda: ReproduceOptions(register=False, workers=1))


def run_neural_demo(out: str | Path, options: NeuralDemoOptions = NeuralDemoOptions(), *,
                    echo: Callable[[str], None] | None = None) -> ReproduceOutcome:
    """Generate a small phantom cohort into ``OUT/cohort`` and run :func:`reproduce_cohort`
    on it into ``OUT`` (``ctperf demo --neural``); a rerun continues or skips what is done.

    Returns
    -------
    ReproduceOutcome
    """
    from ctperf import io
    from ctperf.model import preset
    from ctperf.workflow.phantoms import generate_cohort

    say = echo or (lambda line: None)
    o = options
    out = Path(out)
    io.check_output(out, kind="extend", owned_by=(_RECORD,))
    io.mark_output(out)
    noise = f", noise of a {o.noise_matrix} px image" if o.noise_matrix else ""
    say(f"[0/{_STEPS}] phantom cohort: {o.subjects} subjects of {o.size} x {o.size} x "
        f"{o.slices} x {o.frames} (seed {o.seed}, no motion{noise}) -> {out / 'cohort'}")
    generate_cohort(out / "cohort", subjects=o.subjects, seed=o.seed, size=o.size,
                    slices=o.slices, frames=o.frames, motion="none", dicom=False,
                    noise_matrix=o.noise_matrix, progress=o.reproduce.progress)
    config = preset(o.preset)
    if o.epochs is not None:
        config = dataclasses.replace(config, epochs=o.epochs)
    return reproduce_cohort(out / "cohort", out, config, o.reproduce, echo=echo)


# --- set-up ----------------------------------------------------------------------------------

def _fit_frames(config: Any, cohort: Path, layout: str, say: Callable[[str], None]) -> Any:
    """The config with no more input frames than the cohort's shortest phantom study has
    (the ``cpu`` preset's 44 frames assume 89-frame studies)."""
    if layout != "phantom" or config.frames is None:
        return config
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        shortest = min(int(cast(Any, nib.load(p)).shape[3])
                       for p in phantom_studies(cohort))
    except (OSError, ValueError, IndexError, ImageFileError):
        return config  # an unreadable study is reported by the step that reads it
    if shortest >= config.frames:
        return config
    say(f"      the shortest study has {shortest} frames, fewer than the preset's "
        f"{config.frames}: the networks take {shortest}")
    return dataclasses.replace(config, frames=shortest)


#: Settings added after records were first written, at the value every earlier run had: left
#: out of the record at that value, so that those runs' records stay valid.
_LEGACY: dict[str, dict[str, Any]] = {"options": {"reference": "nlr"}, "config": {"loss": "mse"}}
_UNSET = object()


def _settings(layout: str, config: Any, options: ReproduceOptions) -> dict[str, Any]:
    from ctperf.workflow.cohort import _plain

    # where and how fast it runs does not change what is computed
    plain = {k: v for k, v in _plain(options).items()
             if k not in ("progress", "workers", "device", "batch_size")
             and _LEGACY["options"].get(k, _UNSET) != v}
    trained = {k: v for k, v in _plain(config).items()
               if k not in ("device", "amp") and _LEGACY["config"].get(k, _UNSET) != v}
    return json.loads(json.dumps({"layout": layout, "config": trained, "options": plain},
                                 default=repr))


def _cohort_id(cohort: Path, layout: str) -> str:
    """A digest of which subjects the cohort holds and how large their studies are (no path:
    the record carries no folder name), so that a run continued on another cohort is refused."""
    if layout == "phantom":
        items = [(p.parent.name, p.stat().st_size)
                 for p in phantom_studies(cohort)]
    else:
        from ctperf.io.unitobrain import find_unitobrain

        items = [(pid, sum(1 for f in inp.iterdir() if f.is_file()))
                 for pid, inp, _ in find_unitobrain(cohort)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _check_record(out: Path, cohort: Path, layout: str, config: Any,
                  options: ReproduceOptions) -> None:
    """Refuse to continue a run made with other settings or on another cohort (its steps
    would mix)."""
    path = out / _RECORD
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc}); delete it or choose another "
                               "output folder") from None
    if old.get("cohort_id") not in (None, _cohort_id(cohort, layout)):
        raise InputError(out, "holds a run made on another cohort (other subjects, or other "
                              "studies; reproduce.json); choose another output folder")
    now = _settings(layout, config, options)
    if old.get("settings") != now:
        was = old.get("settings") or {}
        changed = sorted(f"{part}.{k}" for part in ("config", "options")
                         for k in set(was.get(part, {})) | set(now[part])
                         if was.get(part, {}).get(k) != now[part].get(k))
        if was.get("layout") != now["layout"]:
            changed.insert(0, "layout")
        raise InputError(out, "holds a run made with other settings (reproduce.json: "
                              f"{', '.join(changed) or 'its format'}); choose another output "
                              "folder to change them")


def _write_record(out: Path, cohort: Path, layout: str, config: Any,
                  options: ReproduceOptions) -> None:
    from ctperf.io import write_json
    from ctperf.versioning import software_version

    if (out / _RECORD).exists():  # checked by _check_record: the same settings
        return
    write_json({"format": _FORMAT, "version": 1, "ctperf_version": software_version(),
                "cohort_id": _cohort_id(cohort, layout),
                "settings": _settings(layout, config, options)}, out / _RECORD)


def _link_cohort(cohort: Path, out: Path) -> None:
    """``OUT/cohort``: a symbolic link to the phantom cohort (else ``cohort.json``)."""
    from ctperf.io import write_json

    link = out / "cohort"
    target = cohort.resolve()
    if link.is_symlink() and link.resolve() == target:
        return
    if link.is_symlink():
        link.unlink()
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        write_json({"cohort": str(target)}, out / "cohort.json")


def _truth(out: Path) -> Path | None:
    link = out / "cohort"
    if link.is_dir():
        return link
    pointer = out / "cohort.json"
    if pointer.exists():
        return Path(json.loads(pointer.read_text())["cohort"])
    return None


def _cohort_step(name: str, summary: Any, computed: list[str]) -> None:
    """Record a step that computed something; stop on a failed study."""
    if summary.done:
        computed.append(name)
    if summary.failed:
        raise CTPerfError(f"{name}: {len(summary.failed)} studies failed "
                          f"({summary.failure_lines()[0]}); {summary.manifest} lists them, "
                          "and running again tries them again")


# --- steps -----------------------------------------------------------------------------------

def _preprocess(cohort: Path, out: Path, layout: str, options: ReproduceOptions,
                say: Callable[[str], None], computed: list[str]) -> Path:
    """The folder of the studies the reference and the network see."""
    from ctperf.workflow.cohort import discover_studies, run_cohort
    from ctperf.workflow.study import PreprocessOptions, preprocess_study

    if layout != "phantom":
        say(f"[1/{_STEPS}] preprocessing: none (UniToBrain studies are registered and "
            "filtered)")
        return cohort
    if not (options.register or options.filter):
        say(f"[1/{_STEPS}] preprocessing: none (no registration, no filter)")
        return cohort
    steps = " + ".join([*(["registration"] if options.register else []),
                        *(["bilateral filter"] if options.filter else [])])
    say(f"[1/{_STEPS}] preprocessing ({steps}) -> {out / 'preprocessed'}")
    studies = [s for s in discover_studies(cohort) if s.name.startswith("sub-")]
    summary = run_cohort(studies, out / "preprocessed", preprocess_study, PreprocessOptions(
        register=options.register, filter=options.filter,
        spatial_sigma_mm=options.spatial_sigma_mm, range_sigma_hu=options.range_sigma_hu,
        filter_weights=options.filter_weights),
        workers=options.workers, progress=options.progress)
    _cohort_step("preprocessing", summary, computed)
    return out / "preprocessed"


def _references(cohort: Path, studies_root: Path, out: Path, layout: str,
                options: ReproduceOptions, say: Callable[[str], None],
                computed: list[str]) -> None:
    from ctperf.workflow.cohort import Study, run_cohort
    from ctperf.workflow.study import MapsOptions

    if layout == "unitobrain":
        say(f"[2/{_STEPS}] NLR references: the dataset's own -> {out / 'nlr'}")
        from ctperf.io.unitobrain import find_unitobrain

        studies = [Study(pid, (str(inp), str(maps)), cohort)
                   for pid, inp, maps in find_unitobrain(cohort)]
        summary = run_cohort(studies, out / "nlr", unitobrain_reference, {}, workers=1,
                             progress=options.progress)
    else:
        say(f"[2/{_STEPS}] NLR references ({options.method}) -> {out / 'nlr'}")
        summary = phantom_maps(cohort, studies_root, out / "nlr", MapsOptions(
            method=options.method, device=options.device,
            lesion_options=options.lesion_options), workers=options.workers,
            progress=options.progress)
    _cohort_step("references", summary, computed)


def _cross_validate(cohort: Path, studies_root: Path, out: Path, layout: str, config: Any,
                    options: ReproduceOptions, say: Callable[[str], None],
                    computed: list[str]) -> dict[str, int]:
    """Train every fold's model(s); return subject -> fold and write ``OUT/folds.json``."""
    from ctperf.io import write_json
    from ctperf.workflow.training import TrainingOptions, cross_validate_cohort

    groups = [(t,) for t in config.targets] if options.per_map else [config.targets]
    record = out / "folds.json"
    finished = record.exists() and all(
        (out / "cv" / "+".join(g) / "table1.csv").exists() for g in groups)
    what = "one network per map" if options.per_map else "one network for all maps"
    learns = "the phantom's truth" if options.reference == "truth" else options.method
    say(f"[3/{_STEPS}] {options.folds}-fold cross-validation over patients "
        f"({', '.join(config.targets)} of {learns}; {what}) -> {out / 'cv'}"
        + (": done before" if finished else ""))
    redone = bool({"preprocessing", "references"} & set(computed))
    digest = _inputs_digest(out) if redone else None  # read once: minutes on a large cohort
    if redone and _trained_on(out) == digest:
        log.warning("the studies and references were written again, identical to those the "
                    "networks were trained on: training kept")
        redone = False
    if finished and not redone:
        return {k: int(v) for k, v in json.loads(record.read_text())["subject_fold"].items()}
    if redone:
        _forget_training(out)
    _check_references(out, layout, config.targets, options.method)
    references = (None if layout != "phantom"
                  else cohort if options.reference == "truth" else out / "nlr")
    train_options = TrainingOptions(
        reference=options.reference, references=references,
        cache=out / "cache", resume=True, progress=options.progress,
        references_ready=references == out / "nlr", cache_workers=options.workers)
    if not (out / _TRAINED_ON).exists():
        write_json({"sha256": digest or _inputs_digest(out)}, out / _TRAINED_ON)
    folds: list[tuple[list[str], list[str]]] = []
    for group in groups:
        name = "+".join(group)
        if len(groups) > 1:
            say(f"      {name}")
        outcome = cross_validate_cohort(studies_root if layout == "phantom" else cohort,
                                        out / "cv" / name,
                                        dataclasses.replace(config, targets=group),
                                        train_options, folds=options.folds)
        if folds and outcome.folds != folds:
            raise CTPerfError("the folds differ between maps; the cross-validation is "
                              "inconsistent")
        folds = outcome.folds
    computed.append("cross-validation")
    subject_fold = {p: k for k, (_, val) in enumerate(folds, start=1) for p in val}
    write_json({"folds": [{"fold": k, "train": sorted(tr), "validation": sorted(va)}
                          for k, (tr, va) in enumerate(folds, start=1)],
                "subject_fold": subject_fold, "models": {
                    "+".join(g): [f"cv/{'+'.join(g)}/fold-{k}/model.pt"
                                  for k in range(1, len(folds) + 1)] for g in groups}}, record)
    return subject_fold


def _check_references(out: Path, layout: str, targets: tuple[str, ...], method: str) -> None:
    """Refuse, before any network is trained, references that lack a map the training needs,
    naming every subject and map at once (a UniToBrain patient without its NLR_TTP folder had
    been named only after the other maps' networks were trained, one patient per run)."""
    from ctperf.model.normalise import target_maps
    from ctperf.workflow.references import REFERENCE_MAPS

    needed = REFERENCE_MAPS if layout == "phantom" else target_maps(targets)
    gaps = {sub.name: [n for n in needed if not (sub / f"{n}.nii.gz").exists()]
            for sub in sorted(p for p in (out / "nlr").iterdir() if p.is_dir())}
    gaps = {k: v for k, v in gaps.items() if v}
    if not gaps:
        return
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in gaps.items())
    if layout == "phantom":
        raise InputError(out / "nlr", f"the reference method {method} wrote no map of "
                                      f"{listed}; the slice cache needs "
                                      f"{', '.join(REFERENCE_MAPS)}")
    raise InputError(out / "nlr", f"the dataset has no readable reference for {listed} (the "
                                  "log of step 2 says why: a missing or damaged NLR_ folder); "
                                  "train other targets (--targets) or leave these patients out "
                                  "of the cohort, into a new output folder")


def _inputs_digest(out: Path) -> str:
    """A digest of the images the networks learn from: the studies ``OUT/preprocessed``
    holds and the references in ``OUT/nlr``: their NIfTI files' names and bytes (ctperf writes
    the same image to the same bytes; not the sidecars, which carry the version that wrote
    them)."""
    digest = hashlib.sha256()
    for folder in (out / "preprocessed", out / "nlr"):
        for path in sorted(folder.rglob("*.nii*")) if folder.is_dir() else ():
            digest.update(path.relative_to(out).as_posix().encode())
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def _trained_on(out: Path) -> str | None:
    """The digest (:func:`_inputs_digest`) of what the run's networks were trained on."""
    try:
        return str(json.loads((out / _TRAINED_ON).read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _forget_training(out: Path) -> None:
    """Remove the models, caches and fold record made from references that have changed."""
    import shutil

    (out / _TRAINED_ON).unlink(missing_ok=True)
    stale = [p for p in (out / "cv", out / "cache") if p.is_dir()]
    if stale:
        log.warning("the references changed: training again from scratch")
    for folder in stale:
        shutil.rmtree(folder)
    (out / "folds.json").unlink(missing_ok=True)


def _models_stamp(out: Path) -> dict[str, int]:
    """Every checkpoint of ``OUT/cv`` with its modification time (ns): predictions made by
    other models are made again."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in sorted((out / "cv").glob("*/fold-*/model.pt"))}


def _predict(cohort: Path, studies_root: Path, out: Path, layout: str, config: Any,
             options: ReproduceOptions, subject_fold: dict[str, int],
             say: Callable[[str], None], computed: list[str]) -> None:
    from ctperf.workflow.cohort import Study, run_cohort

    say(f"[4/{_STEPS}] predicting every subject with the fold model that never saw it -> "
        f"{out / 'cnn'}")
    groups = ([(t,) for t in config.targets] if options.per_map else [config.targets])
    sources: dict[str, Any]
    if layout == "phantom":
        sources = {name: str(studies_root / name / "study.nii.gz") for name in subject_fold}
    else:
        from ctperf.io.unitobrain import find_unitobrain

        sources = {pid: (str(inp), str(maps)) for pid, inp, maps in find_unitobrain(cohort)}
    studies = [Study(name, {
        "study": sources[name], "fold": fold, "reference": str(out / "nlr" / name),
        "models": [str(out / "cv" / "+".join(g) / f"fold-{fold}" / "model.pt") for g in groups],
    }, out) for name, fold in sorted(subject_fold.items())]
    task_options = {"device": options.device, "batch_size": options.batch_size,
                    "lesion_options": options.lesion_options, "layout": layout,
                    "config": _settings(layout, config, options)["config"],
                    "models": _models_stamp(out)}
    summary = run_cohort(studies, out / "cnn", predict_subject, task_options, workers=1,
                         progress=options.progress)
    _cohort_step("prediction", summary, computed)


def _evaluate(out: Path, layout: str, options: ReproduceOptions,
              say: Callable[[str], None], computed: list[str]) -> dict[str, Any]:
    from ctperf.evaluation.report import evaluate_cohorts
    from ctperf.io import atomic_file

    result = out / "evaluation" / "evaluation.json"
    fresh = not computed and result.exists() and (out / "report.html").exists()
    say(f"[5/{_STEPS}] evaluation (U-Net against NLR"
        + (" and the phantom's truth" if layout == "phantom" else "") + ") -> "
        + str(out / "report.html") + (": done before" if fresh else ""))
    if fresh:
        doc = json.loads(result.read_text())
    else:
        doc = evaluate_cohorts(out / "cnn", out / "nlr", out / "evaluation",
                               truth=_truth(out) if layout == "phantom" else None,
                               lesion_options=options.lesion_options)
        with atomic_file(out / "report.html") as tmp:
            tmp.write_bytes((out / "evaluation" / "report.html").read_bytes())
        computed.append("evaluation")
    return _agreement(doc, reference="nlr" if layout == "unitobrain" else options.method)


def _agreement(doc: dict[str, Any], *, reference: str) -> dict[str, Any]:
    """U-Net against the reference from ``evaluation.json``: per map and per lesion."""
    maps = {row["map"]: {k: row["summary"][k]["mean"]
                         for k in ("pearson_r", "mse_window", "mse_minmax", "mae", "bias")}
            for row in doc["maps"]
            if row["estimate"] == "unet" and row["reference"] == reference}
    lesions = {row["lesion"]: {"dice": row["dice"]["mean"], "n": row["dice"]["n"]}
               for row in doc["lesions"]
               if row["estimate"] == "unet" and row["reference"] == reference}
    return {"maps": maps, "lesions": lesions, "studies": len(doc["studies"])}


def _agreement_text(agreement: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"U-Net vs NLR over {agreement['studies']} subjects (mean over subjects)",
             "| map | Pearson r | MSE (ctperf windows) | MAE | bias |", "|---|---|---|---|---|"]
    for name, row in agreement["maps"].items():
        lines.append(f"| {name} | {num(row['pearson_r'], '.3f')} | "
                     f"{num(row['mse_window'], '.4f')} | {num(row['mae'], '.3g')} | "
                     f"{num(row['bias'], '+.3g')} |")
    for name, row in agreement["lesions"].items():
        lines.append(f"{name} Dice {num(row['dice'], '.3f')} (n = {row['n']})")
    return "\n".join(lines)
