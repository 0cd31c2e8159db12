"""The reduced-data experiment: does the U-Net need less data than the model-based methods?

Gava et al. (2023) argue that a network may do with less data (dose, frames) than
deconvolution, but could not test it: on patients the truth is unknown. On phantoms it is
known, so :func:`run_reduction` measures it. For each acquisition condition (:data:`CONDITIONS`:
the standard protocol, half the dose, half the frames, both) the same subjects are simulated
(same anatomy, physiology and AIF; only the noise and the sampling differ) into
``OUT/<condition>/cohort``, and

1. :func:`ctperf.workflow.reproduce_cohort` runs the paper's study twice, the U-Net learning the
   box-model NLR maps (``OUT/<condition>/nlr-trained``, as the paper) and the phantom's truth
   (``OUT/<condition>/truth-trained``); each subject is predicted by the fold model that never
   saw it;
2. the other model-based methods (``methods``) map the same preprocessed studies with the same
   arterial input handling as the NLR references (``OUT/<condition>/maps/<method>``);
3. every estimate is compared with the truth inside one region per subject (the phantom's
   brain, inside the NLR run's brain mask, outside its vessels), the same voxels for all.

``OUT/reduction.json`` holds every figure; :func:`reduction_table` renders it as Markdown and
:func:`ctperf.reporting.reduction_figure` draws it. A rerun skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.workflow.reproduce import ReproduceOptions

__all__ = ["CONDITIONS", "REDUCTION_MAPS", "ReductionOptions", "reduction_table",
           "run_reduction"]

log = logging.getLogger(__name__)

#: Acquisition per condition: tube current-time product (mAs), frame interval (s) and frames
#: (the same 44 s of acquisition).
CONDITIONS: dict[str, dict[str, float]] = {
    "standard": {"mas": 150.0, "frame_interval": 0.5, "frames": 89},
    "half dose": {"mas": 75.0, "frame_interval": 0.5, "frames": 89},
    "half frames": {"mas": 150.0, "frame_interval": 1.0, "frames": 45},
    "half dose, half frames": {"mas": 75.0, "frame_interval": 1.0, "frames": 45},
}

#: Maps compared with the truth; the lesions need ``cbf`` and ``tmax``.
REDUCTION_MAPS = ("cbv", "cbf", "tmax")

_FORMAT = "ctperf-reduction"


@dataclass(frozen=True, kw_only=True)
class ReductionOptions:
    """Options of :func:`run_reduction`.

    Attributes
    ----------
    subjects, size, slices, seed : int
        The phantom cohort of every condition (no motion).
    noise_matrix : int or None
        The noise of a reconstruction of that many pixels across, averaged into the
        phantom's pixels (:func:`ctperf.phantom.generate_subject`).
    conditions : tuple of str
        Keys of :data:`CONDITIONS`.
    methods : tuple of str
        Model-based methods compared besides the NLR references.
    window_s : float or None
        The U-Net sees every frame of the first ``window_s`` seconds (None: of the whole
        acquisition, as the model-based methods), so that fewer frames are fewer inputs; the
        preset's own frame count is not used (the ``cpu`` preset's 44 frames are 0-43 s at
        1 s in both samplings).
    preset : str
        U-Net preset (:data:`ctperf.model.PRESETS`); ``epochs`` overrides its epochs.
    reproduce : ReproduceOptions
        The runs' options; ``targets`` and ``reference`` are set per run.
    """

    subjects: int = 12
    size: int = 64
    slices: int = 4
    seed: int = 3
    noise_matrix: int | None = 512
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    methods: tuple[str, ...] = ("ssvd", "bsvd", "osvd", "bayes")
    window_s: float | None = None
    preset: str = "cpu"
    epochs: int | None = None
    reproduce: ReproduceOptions = field(
        default_factory=lambda: ReproduceOptions(register=False, workers=1))

    def __post_init__(self) -> None:
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ValidationError(f"conditions must be among {', '.join(CONDITIONS)}; got "
                                  f"{', '.join(bad) or 'none'}")
        if self.subjects < 2 * self.reproduce.folds:
            raise ValidationError(f"{self.subjects} subjects are too few for "
                                  f"{self.reproduce.folds} folds (two per fold at least)")


def run_reduction(out: str | Path, options: ReductionOptions = ReductionOptions(), *,
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the experiment into ``out`` and return the content of ``OUT/reduction.json``.

    Returns
    -------
    dict
        ``conditions`` (name -> acquisition), ``rows`` (one per condition, estimate and map:
        per-subject means of Pearson r, MAE and bias against the truth; one per condition,
        estimate and lesion: mean Dice and volume error), ``options``.
    """
    from ctperf import io

    say = echo or (lambda line: None)
    out = Path(out)
    io.check_output(out, kind="extend", owned_by=("reduction.json",))
    io.mark_output(out)
    rows: list[dict[str, Any]] = []
    for k, name in enumerate(options.conditions, start=1):
        acq = CONDITIONS[name]
        say(f"== condition {k}/{len(options.conditions)}: {name} ({acq['mas']:g} mAs, "
            f"{int(acq['frames'])} frames at {acq['frame_interval']:g} s)")
        rows += _condition(out / _slug(name), name, acq, options, say)
    doc = {"format": _FORMAT, "version": 1, "conditions": {
               n: CONDITIONS[n] for n in options.conditions},
           "options": json.loads(json.dumps(dataclasses.asdict(options), default=repr)),
           "rows": rows}
    io.write_json(doc, out / "reduction.json")
    return doc


def _slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-")


def _condition(folder: Path, name: str, acq: dict[str, float], options: ReductionOptions,
               say: Callable[[str], None]) -> list[dict[str, Any]]:
    from ctperf.model import preset
    from ctperf.workflow.phantoms import generate_cohort
    from ctperf.workflow.reproduce import reproduce_cohort

    cohort = folder / "cohort"
    generate_cohort(cohort, subjects=options.subjects, seed=options.seed, size=options.size,
                    slices=options.slices, frames=int(acq["frames"]),
                    frame_interval=acq["frame_interval"], mas=acq["mas"], motion="none",
                    dicom=False, noise_matrix=options.noise_matrix,
                    progress=options.reproduce.progress)
    config = preset(options.preset)
    frames = int(acq["frames"])
    if options.window_s is not None:
        frames = min(frames, round(options.window_s / acq["frame_interval"]))
    config = dataclasses.replace(config, frames=frames)
    if options.epochs is not None:
        config = dataclasses.replace(config, epochs=options.epochs)
    runs = {}
    for reference in ("nlr", "truth"):
        run = folder / f"{reference}-trained"
        say(f"-- U-Net learning {'the NLR maps' if reference == 'nlr' else 'the truth'}, "
            f"{frames} input frames -> {run}")
        reproduce_cohort(cohort, run, config, dataclasses.replace(
            options.reproduce, targets=REDUCTION_MAPS, reference=reference), echo=say)
        runs[reference] = run
    base = runs["nlr"]
    for method in options.methods:
        say(f"-- {method} maps -> {folder / 'maps' / method}")
        _method_maps(cohort, base, folder / "maps" / method, method, options)
    estimates = {"U-Net (NLR-trained)": runs["nlr"] / "cnn",
                 "U-Net (truth-trained)": runs["truth"] / "cnn", "nlr": base / "nlr",
                 **{m: folder / "maps" / m for m in options.methods}}
    return _score(name, cohort, base / "nlr", estimates, options)


def _method_maps(cohort: Path, run: Path, target: Path, method: str,
                 options: ReductionOptions) -> None:
    """One model-based method on the run's preprocessed studies, the AIF handled as for the
    NLR references (:func:`ctperf.workflow.reproduce_subjects.phantom_maps`)."""
    from ctperf.workflow.reproduce_subjects import phantom_maps
    from ctperf.workflow.study import MapsOptions

    root = run / "preprocessed" if (run / "preprocessed").is_dir() else cohort
    r = options.reproduce
    summary = phantom_maps(cohort, root, target, MapsOptions(
        method=method, device=r.device, lesion_options=r.lesion_options),
        workers=r.workers, progress=r.progress)
    if summary.failed:
        raise ValidationError(f"{method}: {len(summary.failed)} studies failed; see "
                              f"{target / 'manifest.json'}")


def _score(condition: str, cohort: Path, reference: Path, estimates: dict[str, Path],
           options: ReductionOptions) -> list[dict[str, Any]]:
    """Every estimate against the truth over the same voxels of every subject."""
    from ctperf.evaluation.cohort import load_maps_cohort
    from ctperf.evaluation.metrics import dice, map_agreement

    truth = load_maps_cohort(cohort, label="truth")
    readers = {label: load_maps_cohort(path, label=label,
                                       lesion_options=options.reproduce.lesion_options)
               for label, path in estimates.items()}
    ref = next(r for r in readers.values() if Path(r.path) == reference)  # the NLR run's
    subjects = sorted(truth.maps)
    voxel_ml = {s: truth.maps[s].voxel_ml for s in subjects}
    region = {s: truth.brain[s] & ref.brain.get(s, truth.brain[s])
              & ~_vessels(reference / s, truth.maps[s]) for s in subjects}
    rows: list[dict[str, Any]] = []
    for label, reader in readers.items():
        missing = [s for s in subjects if s not in reader.maps]
        if missing:
            raise ValidationError(f"{label}: no maps for {', '.join(missing)}")
        for name in REDUCTION_MAPS:
            per = [map_agreement(reader.maps[s][name], truth.maps[s][name], mask=region[s])
                   for s in subjects]
            rows.append({"condition": condition, "estimate": label, "map": name,
                         "unit": truth.maps[subjects[0]].units.get(name, ""),
                         "pearson_r": _mean([a.pearson_r for a in per]),
                         "mae": _mean([a.mae for a in per]),
                         "bias": _mean([a.bias for a in per]), "subjects": len(per)})
        for lesion in ("hypoperfused", "core"):
            with_lesion = [s for s in subjects if truth.lesions[s][lesion].any()]
            scores = [dice(reader.lesions[s][lesion] & region[s],
                           truth.lesions[s][lesion] & region[s]) for s in with_lesion]
            errors = [(np.count_nonzero(reader.lesions[s][lesion] & region[s])
                       - np.count_nonzero(truth.lesions[s][lesion] & region[s])) * voxel_ml[s]
                      for s in subjects]
            rows.append({"condition": condition, "estimate": label, "lesion": lesion,
                         "dice": _mean(scores), "dice_subjects": len(with_lesion),
                         "volume_error_ml": _mean(errors),
                         "volume_abs_error_ml": _mean(np.abs(errors))})
    return rows


def _vessels(folder: Path, grid: Any) -> np.ndarray:
    """The reference run's vessel mask on the grid of the maps ``grid``."""
    from ctperf import io

    return io.read_mask(folder / "lesions" / "vessels.nii.gz", shape=grid.shape,
                        affine=grid.affine)


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else None


def reduction_table(doc: dict[str, Any]) -> str:
    """Markdown tables of ``reduction.json``: per map, rows of estimates and columns of
    conditions (r / MAE / bias against the truth), then the lesions (Dice / volume error)."""
    conditions = list(doc["conditions"])
    estimates = list(dict.fromkeys(r["estimate"] for r in doc["rows"]))

    def cell(row: dict[str, Any] | None, keys: Sequence[str], fmts: Sequence[str]) -> str:
        if row is None:
            return "-"
        return " / ".join("-" if row[k] is None else format(row[k] + 0.0, f)  # no "-0"
                          for k, f in zip(keys, fmts, strict=True))

    def find(estimate: str, condition: str, **key: str) -> dict[str, Any] | None:
        return next((r for r in doc["rows"] if r["estimate"] == estimate
                     and r["condition"] == condition
                     and all(r.get(k) == v for k, v in key.items())), None)

    head = "| estimate | " + " | ".join(conditions) + " |"
    rule = "|---|" + "---|" * len(conditions)
    blocks: list[str] = []
    for name in REDUCTION_MAPS:
        unit = next((r["unit"] for r in doc["rows"] if r.get("map") == name), "")
        lines = [f"**{name.upper()}** ({unit}): Pearson r / MAE / bias against the truth, "
                 "mean over subjects", "", head, rule]
        lines += [f"| {e} | " + " | ".join(
            cell(find(e, c, map=name), ("pearson_r", "mae", "bias"), (".2f", ".3g", "+.3g"))
            for c in conditions) + " |" for e in estimates]
        blocks.append("\n".join(lines))
    for lesion in ("hypoperfused", "core"):
        lines = [f"**{lesion} lesion**: Dice against the truth / mean volume error (mL)",
                 "", head, rule]
        lines += [f"| {e} | " + " | ".join(
            cell(find(e, c, lesion=lesion), ("dice", "volume_error_ml"), (".2f", "+.1f"))
            for c in conditions) + " |" for e in estimates]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
