"""Cohorts of maps and lesion masks on disk, and their agreement: the paper's Tables 1 and 2.

A *reader* is one source of maps or lesions for every study: a method (a maps cohort as ``ctperf
maps`` writes it, ``<root>/<study>/<map>.nii.gz`` and ``<root>/<study>/lesions/<mask>.nii.gz``),
the phantom's truth (``<root>/<study>/truth/`` and ``masks/``) or a rater's manual segmentations
(``<root>/<study>/<lesion>.nii.gz`` masks, or one ITK-SNAP label image ``<root>/<study>.nii.gz``
or ``<root>/<study>/labels.nii.gz`` with :data:`RATER_LABELS`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError, ValidationError
from ctperf.evaluation.agreement import case_dice, friedman, summarise_dice, volume_agreement
from ctperf.evaluation.metrics import (
    MAP_METRICS,
    UNIT_WINDOWS,
    dataset_range,
    map_agreement,
    psnr,
    ssim,
    unit_mse,
)
from ctperf.lesion_options import LesionOptions
from ctperf.types import SVD_METHODS, PerfusionMaps

log = logging.getLogger(__name__)

__all__ = [
    "LESION_NAMES",
    "MAP_METRICS",
    "MAP_ORDER",
    "RATER_LABELS",
    "Reader",
    "comparison_grid",
    "comparison_regions",
    "evaluate_readers",
    "lesion_rule_warnings",
    "load_maps_cohort",
    "load_rater",
]

#: Maps compared, in table order.
MAP_ORDER = ("cbv", "cbf", "delay", "tmax", "mtt", "ttp")
#: Lesions compared, in table order.
LESION_NAMES = ("core", "hypoperfused", "penumbra")
#: Least share of the region's reference values an estimate should hold a value at: below it,
#: Table 1 compares only the rest, and a warning says so (a reader's NaN where it is wrong had
#: halved its MSE and MAE in silence).
MIN_COVERAGE = 0.95
#: Label values of a rater's ITK-SNAP segmentation: 1 core, 2 penumbra (hypoperfused = both).
RATER_LABELS: dict[str, int] = {"core": 1, "penumbra": 2}


@dataclass
class Reader:
    """One reader's maps and lesion masks, per study.

    ``maps[study]`` is a :class:`PerfusionMaps` (absent for raters), ``lesions[study][name]`` a
    bool (Z, Y, X) mask, ``brain[study]`` the brain mask when the reader has one; ``kind`` is
    ``"method"``, ``"truth"`` or ``"rater"``; ``warnings`` what reading it found doubtful
    (a map's values implausible for its unit); ``rules[study]`` the definition of its core and
    hypoperfused lesions where known (``summary.json``'s thresholds, or those it was segmented
    with here), as labels such as ``"Tmax > 6.0 s"``; ``left_out[study]`` why a study its
    cohort's manifest names was not read (its run failed or did not finish); ``qc_flags[study]``
    the QC flags its ``summary.json`` raised (docs/qc.md); ``lesion_options[study]`` the options
    its lesions were made with, where known; ``segmented[study]`` for the studies whose lesions
    were segmented here from their maps (they had no ``lesions/``): with whose rules,
    ``"like"`` (another reader's: ``like`` of :func:`load_maps_cohort`), ``"given"`` (the
    options given, the other reader's not known) or ``"no cbv"`` (the options given: the other
    reader's core is defined by CBV and these maps have none); ``unoriented`` the studies
    whose maps or masks carry no orientation (taken voxel for voxel), ``turned`` those whose
    oriented masks stored the voxels in another order than the grid they were read on.
    """

    label: str
    kind: str
    path: str
    maps: dict[str, PerfusionMaps] = field(default_factory=dict)
    lesions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    brain: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rules: dict[str, dict[str, str]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    qc_flags: dict[str, list[str]] = field(default_factory=dict)
    lesion_options: dict[str, LesionOptions] = field(default_factory=dict)
    segmented: dict[str, str] = field(default_factory=dict)
    unoriented: set[str] = field(default_factory=set)
    turned: set[str] = field(default_factory=set)

    @property
    def studies(self) -> list[str]:
        return sorted(set(self.maps) | set(self.lesions))

    @property
    def delay_is_tmax(self) -> bool:
        """Whether its delay maps are an SVD method's Tmax (its maps' provenance), not an
        arrival delay."""
        return any(m.provenance.get("method") in SVD_METHODS for m in self.maps.values())


def _background_as_nan(maps: PerfusionMaps, folder: Path) -> PerfusionMaps:
    """The maps with their background (:func:`~ctperf.io.maps.background_value`) set to NaN
    where every map holds it and it reaches the image's edge, so that it is never compared as
    a measurement where the comparison's brain mask is wider; and, with a time map (Tmax, TTP
    or delay) among them, where every map holds it inside the head too (another tool's 0 in
    every map where ctperf writes NaN, which had entered the lesions as CBF 0 and Tmax 0). A
    core's CBF of 0 stays a measurement where its Tmax is given (not 0), and without a time map
    nothing enclosed by the head is taken for background (a core written as CBF, CBV and MTT of
    0 had been dropped, and the reader scored as perfect); one joining the air is lost without
    a time map, since every map holds 0 there as in the air."""
    from ctperf.io.maps import background_value, edge_background

    arrays = [maps[name] for name in maps.names]
    outside = edge_background(*arrays)
    if len(arrays) >= 2 and {"tmax", "ttp", "delay"} & set(maps.names):
        everywhere = np.ones(maps.shape, dtype=bool)
        for arr in arrays:
            value = background_value(arr)
            everywhere &= arr == (0.0 if value is None else value)
        outside |= everywhere
    out = {}
    for name, arr in zip(maps.names, arrays, strict=True):
        gone = outside & np.isfinite(arr)
        if gone.any():
            log.info("%s: %s holds %g where every map holds its background (%.0f%% of its "
                     "voxels), read as no value", folder, name, float(arr[gone][0]),
                     100 * gone.mean())
            arr = np.where(gone, np.float32(np.nan), arr)
        out[name] = arr
    return maps.replace(maps=out)


def _labels(path: Path, study: str, shape: tuple[int, ...], affine: np.ndarray,
            qform: np.ndarray | None, reader: Reader) -> np.ndarray:
    """A mask or label image (int64, 0 outside) on the maps' grid of ``study`` (or on the
    study's own ``qform``: :func:`_on_grid`, which tells ``reader``); values between whole
    numbers, as a probability map has, are refused."""
    vol = np.nan_to_num(_on_grid(path, study, shape, affine, qform, reader))
    if np.any(vol != np.round(vol)):
        raise InputError(path, f"study {study}: not a mask: values between whole numbers "
                               f"(from {vol.min():.3g} to {vol.max():.3g}), such as a "
                               "probability map; threshold it into 0 and 1 first")
    return vol.astype(np.int64)


def _study_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(root, "not a folder (expected one sub-folder per study)")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise InputError(root, "no study sub-folders")
    return subs


#: The masks a reader's ``lesions/`` folder (a phantom's ``masks/``) is read for, and those of
#: ctperf's own that are not compared.
_MASK_NAMES = ("core", "penumbra", "hypoperfused", "brain")
_MASKS_UNREAD = ("tmax10", "vessels")


def load_maps_cohort(root: str | Path, *, label: str | None = None,
                     lesion_options: LesionOptions | None = None,
                     like: Mapping[str, LesionOptions] | None = None) -> Reader:
    """Read a maps cohort (``ctperf maps`` layout) or a phantom cohort (its truth).

    Parameters
    ----------
    root : path
        One sub-folder per study.
    label : str, optional
        Reader name; default the ``method`` of the first ``summary.json``, ``truth`` for a
        phantom cohort, else the folder name.
    lesion_options : LesionOptions, optional
        Lesion thresholds (:func:`ctperf.perfusion.segment_lesions`) for studies without a
        ``lesions/`` folder (e.g. U-Net predictions): their lesions are segmented from the maps
        when they include ``cbf`` and ``tmax`` (and ``cbv`` for a core defined by CBV). Without
        options (here or in ``like``) such studies have no lesions.
    like : mapping of str to LesionOptions, optional
        Per study, options that replace ``lesion_options`` for that study (another reader's
        :attr:`Reader.lesion_options`: its lesions' own rules, so that both are segmented
        alike).
    """
    from ctperf.io import kept_qform, map_file, read_maps
    from ctperf.types import MAP_NAMES

    root = Path(root)
    subs = _study_dirs(root)
    phantom = all((s / "truth").is_dir() and (s / "masks").is_dir() for s in subs)
    reader = Reader(label="", kind="truth" if phantom else "method", path=str(root))
    made_by: dict[str, list[str]] = {}  # method -> its studies, from their summary.json
    unfinished = _unfinished(root)
    for name, state in unfinished.items():  # with a folder of an earlier run, or none
        reader.left_out[name] = f"its manifest says '{state}'"
        reader.warnings.append(f"{name}: left out: the cohort's manifest says '{state}' (maps "
                               "of an earlier run, or none)")
    for sub in subs:
        if sub.name in unfinished:
            continue
        folder = sub / "truth" if phantom else sub
        names = [n for n in MAP_NAMES if map_file(folder, n) is not None]
        others = sorted(f.name for f in folder.glob("*.nii*")
                        if (stem := f.name.split(".")[0].lower()) not in MAP_NAMES
                        and stem != "residual" and not stem.endswith("_sd"))  # ctperf's too
        if others and not phantom:  # a phantom's truth holds more of its own (dispersion...)
            said = (f"left out NIfTI files not named as a map ({', '.join(MAP_NAMES)}): "
                    f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}")
            log.warning("%s: %s", folder, said)
            reader.warnings.append(f"{sub.name}: {said}")
        if not names:
            raise InputError(folder, f"no map files ({', '.join(MAP_NAMES)}, each .nii.gz or "
                                     ".nii, any case); is this a maps cohort? DICOM maps "
                                     "are not read: use the NIfTI maps ctperf writes beside "
                                     "them, or convert another tool's with dcm2niix")
        maps = read_maps(folder, names=names)
        reader.warnings += [f"{sub.name}: {w}" for w in maps.provenance.get("unit_warnings", [])]
        if not phantom:
            maps = _background_as_nan(maps, folder)
        reader.maps[sub.name] = maps
        masks = sub / ("masks" if phantom else "lesions")
        found = {n: map_file(masks, n) for n in _MASK_NAMES} if masks.is_dir() else {}
        unread = sorted(f.name for f in masks.glob("*.nii*")
                        if f.name.split(".")[0].lower() not in (*_MASK_NAMES, *_MASKS_UNREAD)
                        ) if masks.is_dir() and not phantom else []
        if unread:
            said = (f"left out lesion files not named {', '.join(_MASK_NAMES[:3])} (or brain): "
                    f"{', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}")
            log.warning("%s: %s", masks, said)
            reader.warnings.append(f"{sub.name}: {said}")
        if maps.provenance.get("orientation_unknown"):
            reader.unoriented.add(sub.name)
        les = {n: _labels(f, sub.name, maps.shape, maps.affine, kept_qform(maps.provenance),
                          reader) != 0
               for n, f in found.items() if f is not None}
        if "brain" in les:
            reader.brain[sub.name] = les.pop("brain")
        _complete_lesions(les)
        doc = _summary(sub)
        qc, lesion_doc = (d if isinstance(d := doc.get(k), dict) else {} for k in ("qc", "lesions"))
        if raised := [name for name, f in qc.items() if isinstance(f, dict) and f.get("flag")]:
            reader.qc_flags[sub.name] = raised
        if les:  # read from its files: defined as its summary says
            thresholds = lesion_doc.get("thresholds")
            reader.rules[sub.name] = _rule_labels(thresholds)
            if (made_with := LesionOptions.from_thresholds(thresholds)) is not None:
                reader.lesion_options[sub.name] = made_with
        if not phantom and not masks.is_dir() and {"cbf", "tmax"} <= set(names):
            options, whose = _segmenting_options(reader, sub.name, names, lesion_options, like)
            if options is not None:
                segmented, thresholds = _segment(maps, reader.brain.get(sub.name), options)
                les.update(segmented)
                reader.rules[sub.name] = _rule_labels(thresholds)
                reader.lesion_options[sub.name] = options
                reader.segmented[sub.name] = whose
        if isinstance(constants := doc.get("constants"), dict) and all(
                isinstance(constants.get(k), int | float) for k in ("rho_g_per_ml", "kh")):
            reader.rules.setdefault(sub.name, {})["constants"] = (
                f"rho {constants['rho_g_per_ml']:g}, kH {constants['kh']:g}")
        if les:
            reader.lesions[sub.name] = les
        if doc.get("method"):
            made_by.setdefault(str(doc["method"]), []).append(sub.name)
    if len(made_by) > 1:  # a rerun into the cohort with another method, on some studies only
        said = "; ".join(f"{m}: {', '.join(s[:3])}{' ...' if len(s) > 3 else ''}"
                         for m, s in made_by.items())
        raise InputError(root, f"its studies were mapped by different methods ({said}): a "
                               "reader is one method; map them all again with one, or "
                               "evaluate each method's studies as their own cohort")
    method = next(iter(made_by), None)
    reader.label = label or ("truth" if phantom else (method or root.name))
    return reader


def _segmenting_options(reader: Reader, study: str, names: list[str],
                        given: LesionOptions | None, like: Mapping[str, LesionOptions] | None
                        ) -> tuple[LesionOptions | None, str]:
    """The options a study without lesions is segmented with (None: not segmented), and whose
    they are (:attr:`Reader.segmented`): a core defined by CBV needs a ``cbv`` map (its
    absence had ended the evaluation in a KeyError); said among the reader's warnings when it
    is missing."""
    alike = like is not None and study in like
    wanted = like[study] if like is not None and alike else given
    if wanted is None or wanted.core_cbv is None or "cbv" in names:
        return wanted, "like" if alike else "given"
    whose = "the reference's core is" if alike else "the core is"
    if alike and given is not None and given.core_cbv is None:
        reader.warnings.append(f"{study}: {whose} defined by CBV and these maps have no cbv: "
                               "segmented with the options given instead")
        return given, "no cbv"
    reader.warnings.append(f"{study}: {whose} defined by CBV and these maps have no cbv: no "
                           "lesions segmented")
    return None, "given"


def _unfinished(root: Path) -> dict[str, str]:
    """Studies a cohort run's manifest in ``root`` (:func:`ctperf.io.state.load_manifest`) does
    not record as done, with their state: a study failed on a rerun keeps the folder of its
    earlier run (other inputs or options), which had been scored as if current. {} without a
    manifest, or with another tool's ``manifest.json``."""
    from ctperf.io.state import load_manifest

    try:
        rows = load_manifest(root)
    except InputError:
        return {}
    return {name: row["state"] for name, row in rows.items() if row["state"] != "done"}


def _summary(sub: Path) -> dict[str, Any]:
    """A study folder's ``summary.json``, or {} (none, or unreadable)."""
    try:
        doc = json.loads((sub / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _rule_labels(thresholds: Any) -> dict[str, str]:
    """The core's and the hypoperfused lesion's definitions (their ``label``) of a lesion
    summary's ``thresholds``, and their clean-up (``clean-up``: the maps' median and the
    smallest piece kept)."""
    if not isinstance(thresholds, dict):
        return {}
    labels = {n: str(rule["label"]) for n in ("core", "hypoperfused")
              if isinstance(rule := thresholds.get(n), dict) and "label" in rule}
    smooth, smallest = thresholds.get("smooth_mm"), thresholds.get("min_component_ml")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in (smooth, smallest)):
        labels["clean-up"] = f"median {smooth:g} mm, pieces under {smallest:g} mL dropped"
    return labels


def lesion_rule_warnings(readers: list[Reader], studies: list[str]) -> list[str]:
    """One line per lesion (core, hypoperfused) that the readers defined differently on
    ``studies`` (a Tmax threshold of 12 s against 6 s had been compared as one lesion), one
    when their clean-up differs (no median and no smallest piece had passed unsaid), and one
    when their maps' constants (rho, kH) differ (a kH of 0.5 against 0.733 had read as a CBF
    bias of -26 mL/100 g/min between methods). Rules
    are compared study by study: readers that change rules between studies alike (a cohort
    mapped in two runs) do not differ."""
    out = []
    for name in ("core", "hypoperfused", "clean-up", "constants"):
        split = [s for s in studies if len({r.rules[s][name] for r in readers
                                            if name in r.rules.get(s, {})}) > 1]
        seen: dict[str, list[str]] = {}
        for r in readers:
            for rule in sorted({r.rules[s][name] for s in split if name in r.rules.get(s, {})}):
                seen.setdefault(rule, []).append(r.label)
        if len(seen) > 1:
            what = {"clean-up": "lesions cleaned up differently by the readers",
                    "constants": "maps made with other constants by the readers"}.get(
                        name, f"{name} lesion defined differently by the readers")
            where = ("" if len(split) == len(studies) else  # name the studies, when not all
                     f" in {', '.join(split[:5])}{' ...' if len(split) > 5 else ''}")
            out.append(f"{what}{where} ("
                       + "; ".join(f"{rule}: {', '.join(who)}" for rule, who in seen.items())
                       + ("): their CBF and CBV differ by the constants' ratio as well as by "
                          "the methods" if name == "constants" else
                          "): their volumes and Dice compare different definitions"))
    return out


def _segment(maps: PerfusionMaps, brain: np.ndarray | None, options: LesionOptions
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Lesion masks segmented from ``maps`` and the thresholds used."""
    from ctperf.perfusion import segment_lesions

    finite = np.isfinite(maps["cbf"]) & np.isfinite(maps["tmax"])
    result = segment_lesions(maps, brain=finite if brain is None else brain & finite,
                             options=options)
    return ({n: m for n, m in result.masks().items() if n in LESION_NAMES},
            dict(result.thresholds))


def _on_grid(path: Path, study: str, shape: tuple[int, ...], affine: np.ndarray,
             qform: np.ndarray | None, reader: Reader) -> np.ndarray:
    """A mask's volume on the maps' grid of ``study`` (:func:`ctperf.io.nifti.place_on_grid`;
    its warnings go to ``reader``'s, led by the study, and a file without orientation or
    stored in another order puts the study among ``reader.unoriented`` or ``reader.turned``)."""
    from ctperf.io.nifti import place_on_grid

    said: list[str] = []
    try:
        vol, placed = place_on_grid(path, shape=shape, affine=affine, qform=qform, notes=said)
    except InputError as exc:
        raise InputError(path, f"study {study}: not on the maps' grid ({exc.problem})") from None
    reader.warnings += [f"{study}: {w}" for w in said]
    if placed == "unoriented":
        reader.unoriented.add(study)
    elif placed == "turned":
        reader.turned.add(study)
    return vol


def load_rater(root: str | Path, grids: Mapping[str, tuple[Any, ...]], *,
               label: str | None = None) -> Reader:
    """Read one rater's manual lesion segmentations for the given studies.

    Parameters
    ----------
    root : path
        ``<root>/<study>/{core,hypoperfused,penumbra}.nii.gz`` masks, or one label image per study
        (``<root>/<study>.nii.gz`` or ``<root>/<study>/labels.nii.gz``, :data:`RATER_LABELS`).
    grids : mapping of study -> ((Z, Y, X), affine) or ((Z, Y, X), affine, qform)
        The studies to read and the reference maps' grid of each: a segmentation storing the
        same voxels in another order is turned onto it, one on another grid refused; one on
        the study's own qform (:func:`ctperf.io.kept_qform`, or None) is taken as stored.
    label : str, optional
        Reader name; default the folder name.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "rater folder does not exist")
    reader = Reader(label=label or root.name, kind="rater", path=str(root))
    for study, grid in grids.items():
        shape, affine, qform = grid[0], grid[1], grid[2] if len(grid) > 2 else None
        labels = next((p for p in (root / f"{study}.nii.gz", root / study / "labels.nii.gz")
                       if p.exists()), None)
        if labels is not None:
            img = _labels(labels, study, shape, affine, qform, reader)
            if other := sorted(set(np.unique(img).tolist()) - {0, *RATER_LABELS.values()}):
                raise InputError(labels, f"study {study}: labels {other} are neither core "
                                         f"({RATER_LABELS['core']}) nor penumbra "
                                         f"({RATER_LABELS['penumbra']}), 0 outside: relabel "
                                         "them (or give core.nii.gz and penumbra.nii.gz masks)")
            les = {n: img == v for n, v in RATER_LABELS.items()}
            les["hypoperfused"] = les["core"] | les["penumbra"]
        else:
            les = {n: _labels(root / study / f"{n}.nii.gz", study, shape, affine, qform,
                              reader) != 0
                   for n in LESION_NAMES
                   if (root / study / f"{n}.nii.gz").exists()}
            _complete_lesions(les)
        if les:
            reader.lesions[study] = les
    if not reader.lesions:
        raise InputError(root, f"no segmentations for any of the studies {sorted(grids)} "
                               "(<study>.nii.gz label image or <study>/<lesion>.nii.gz masks)")
    return reader


def _complete_lesions(les: dict[str, np.ndarray]) -> None:
    """The lesion a reader gives by its parts: the penumbra as the hypoperfused tissue outside
    the core (RAPID-style outputs give core and hypoperfused), the hypoperfused as core and
    penumbra together."""
    if "penumbra" not in les and {"core", "hypoperfused"} <= set(les):
        les["penumbra"] = les["hypoperfused"] & ~les["core"]
    if "hypoperfused" not in les and {"core", "penumbra"} <= set(les):
        les["hypoperfused"] = les["core"] | les["penumbra"]


def map_case_metrics(estimate: np.ndarray, reference: np.ndarray, *, name: str,
                     minmax: tuple[float, float], region: np.ndarray | None) -> dict[str, float]:
    """Every per-case figure of one map (Table 1), inside ``region``.

    ``mse_minmax`` scales both maps with the reference data set's min-max (the paper's [0, 1]
    maps), ``mse_window`` with ctperf's fixed window (:data:`UNIT_WINDOWS`, clipped); PSNR (dB)
    and SSIM are computed on the fixed-window maps; MAE, bias, RMSE, Pearson r and Lin's CCC in
    the map's unit; ``coverage``, the share of the reference's values in the region that the
    estimate holds a value at too (the figures are over those voxels only).
    """
    window = UNIT_WINDOWS.get(name, minmax)
    agree = map_agreement(estimate, reference, mask=region)
    valued = np.isfinite(reference) if region is None else np.isfinite(reference) & region
    n_ref = int(np.count_nonzero(valued))
    mse_w = unit_mse(estimate, reference, window=window, mask=region)
    lo, hi = window
    scaled = [np.clip((np.asarray(a, np.float64) - lo) / (hi - lo), 0, 1)
              for a in (estimate, reference)]
    paper = (unit_mse(estimate, reference, window=minmax, clip=False, mask=region)
             if minmax[1] > minmax[0] else float("nan"))  # NaN: no range (a constant map)
    return {"mse_minmax": paper,
            "mse_window": mse_w, "psnr": psnr(mse_w),
            "ssim": ssim(scaled[0], scaled[1], mask=region),
            "mae": agree.mae, "bias": agree.bias, "rmse": agree.rmse,
            "pearson_r": agree.pearson_r, "ccc": agree.ccc,
            "coverage": agree.n / n_ref if n_ref else float("nan"), "n_voxels": agree.n}


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    nan = float("nan")
    return {"mean": float(v.mean()) if v.size else nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else nan, "n": int(v.size)}


def _map_pairs(readers: Sequence[Reader]) -> list[tuple[Reader, Reader]]:
    """Methods against the first method (the reference), then every method against the truth."""
    methods = [r for r in readers if r.kind == "method"]
    truth = [r for r in readers if r.kind == "truth"]
    pairs = [(m, methods[1]) for m in methods if m is not methods[1]] if len(methods) > 1 else []
    return pairs + [(m, t) for t in truth for m in methods]


def comparison_grid(readers: Sequence[Reader], study: str) -> Any:
    """The maps on whose grid ``study`` is compared: the reference's (the second reader with
    maps, else the first), or, when they carry no orientation, an oriented reader's of the
    same shape, the truth's first (its voxel sizes give the volumes: a file without
    orientation may say 1 mm, and the volumes had read 64 times too small); the reference's
    when no reader is oriented. Every map and mask without orientation is taken voxel for
    voxel on it."""
    with_maps = [r for r in readers if r.maps]
    grid = with_maps[1] if len(with_maps) > 1 else with_maps[0]
    target = grid.maps[study]
    if not target.provenance.get("orientation_unknown"):
        return target
    ordered = sorted(with_maps, key=lambda r: r.kind != "truth")
    return next((r.maps[study] for r in ordered if study in r.maps
                 and not r.maps[study].provenance.get("orientation_unknown")
                 and r.maps[study].shape == target.shape), target)


def align_readers(readers: Sequence[Reader], studies: Sequence[str]) -> list[str]:
    """Put every reader's maps, lesions and brain masks on the grid of each study's
    :func:`comparison_grid` (raters' masks are read on it), study by study, in place: a
    cohort written by another tool may store the same voxels in another order (rows reversed,
    as a NIfTI converter may), which a voxel-by-voxel comparison would otherwise pair wrongly.
    Grids that do not hold the same voxels are refused, naming the study and both readers.
    Maps without an orientation are taken voxel for voxel on that grid (the oriented readers
    are still turned onto it). Returns warnings: maps without an orientation, compared voxel
    for voxel."""
    with_maps = [r for r in readers if r.maps]
    unoriented: dict[str, list[str]] = {}  # readers without orientation -> their studies
    if not with_maps:
        return []
    from ctperf.io import reorient, reorientation

    ambiguous: dict[str, list[str]] = {}  # grid owner -> studies of oriented readers whose
    # stored orders differ, beside maps or masks without orientation
    for s in studies:
        target = comparison_grid(with_maps, s)
        owner = next(r for r in with_maps if r.maps.get(s) is target)
        guessed = bool(target.provenance.get("orientation_unknown"))  # no reader oriented
        if guessed:
            unoriented.setdefault(owner.label, []).append(s)
            owner.unoriented.add(s)
        turned = False
        for r in with_maps:
            if r is owner or s not in r.maps:
                continue
            own = r.maps[s]
            if (guessed or own.provenance.get("orientation_unknown")) and \
                    own.shape == target.shape:
                if own.provenance.get("orientation_unknown"):
                    unoriented.setdefault(r.label, []).append(s)
                    r.unoriented.add(s)
                r.maps[s] = own.replace(affine=target.affine)
                continue
            if own.shape == target.shape and np.allclose(own.affine, target.affine, atol=1e-3):
                continue
            how = reorientation(own.affine, own.shape, target.affine, target_shape=target.shape)
            if how is None:
                raise ValidationError(
                    f"study {s}: the maps of {r.label} and {owner.label} are not on the same "
                    f"grid (shapes {own.shape} and {target.shape}, affines differ beyond the "
                    "voxels' order); resample one onto the other")
            turned = True
            r.maps[s] = own.replace(maps={n: reorient(own[n], how) for n in own.names},
                                    affine=target.affine)
            r.lesions[s] = {n: reorient(m, how) for n, m in r.lesions.get(s, {}).items()}
            if s in r.brain:
                r.brain[s] = reorient(r.brain[s], how)
        if (turned or any(s in r.turned for r in readers)) and any(
                s in r.unoriented for r in readers):
            ambiguous.setdefault(owner.label, []).append(s)
    return [f"the maps of {who} carry no orientation (no sform or qform) in "
            f"{', '.join(s[:3])}{' ...' if len(s) > 3 else ''}: compared voxel for voxel (same "
            "shape), which pairs the wrong voxels if they are stored mirrored"
            for who, s in unoriented.items()] + [
        f"the oriented readers store the voxels in different orders in "
        f"{', '.join(s[:3])}{' ...' if len(s) > 3 else ''}: the maps and masks without "
        f"orientation there were taken in the order of {who}'s, which may not be theirs "
        "(check their Dice against each reader)" for who, s in ambiguous.items()]


def comparison_regions(readers: Sequence[Reader], studies: Sequence[str]
                       ) -> tuple[str, dict[str, np.ndarray | None]]:
    """Where each study's maps are compared, and its description: the first brain mask with a
    voxel among the truth's, the reference's (the second reader), the other methods' and last
    the estimate's own (the first reader; so that it cannot choose where it is scored), per
    study; None (every voxel finite on both sides) where no reader has one. An empty mask is
    passed over (one had dropped its study from Table 1 unsaid)."""
    reference = readers[1] if len(readers) > 1 else None
    methods = sorted((r for r in readers if r.kind == "method"),
                     key=lambda r: (r is not reference, r is readers[0]))
    ordered = [r for r in readers if r.kind == "truth"] + methods
    regions: dict[str, np.ndarray | None] = {}
    source: dict[str, list[str]] = {}
    for s in studies:
        r = next((r for r in ordered if s in r.brain and r.brain[s].any()), None)
        regions[s] = None if r is None else r.brain[s]
        source.setdefault("all finite voxels" if r is None else f"brain mask of {r.label}",
                          []).append(s)
    if len(source) == 1:
        return next(iter(source)), regions
    return "; ".join(f"{what} ({', '.join(ss[:3])}{' ...' if len(ss) > 3 else ''})"
                     for what, ss in source.items()), regions


def evaluate_readers(readers: Sequence[Reader], *, studies: Sequence[str]) -> dict[str, Any]:
    """Tables 1 and 2 and the Friedman tests for a list of readers over the same studies.

    Parameters
    ----------
    readers : sequence of Reader
        In order: the prediction, the reference, further methods, then the truth and raters in
        any order. Maps compare every method with the reference and with the truth; lesions
        also compare raters with each other and the first two methods with every rater.
    studies : sequence of str
        Studies every reader has (maps for methods and truth, lesions for raters).

    Returns
    -------
    dict
        ``maps`` (Table 1 rows), ``lesions`` (Table 2 rows), ``friedman`` (one per lesion when
        three or more readers segmented it), ``minmax`` (the paper's ranges per reference and
        map; NaN for a constant map), ``region`` (where maps were compared),
        ``table_warnings`` (rows left out, ranges that could not be had). Keys are documented in
        ``docs/evaluation.md``.
    """
    studies = list(studies)
    aligned = align_readers(readers, studies)
    region, region_of = comparison_regions(readers, studies)
    if not any(r.maps for r in readers):
        raise ValidationError("no reader has maps: the voxel size of the lesions is unknown")
    voxel_ml = {s: comparison_grid(readers, s).voxel_ml for s in studies}
    out: dict[str, Any] = {
        "region": region,
        "voxel_ml": voxel_ml, "maps": [], "lesions": [], "friedman": [], "minmax": {},
        "table_warnings": []}

    def warn(text: str) -> None:
        out["table_warnings"].append(text)
        log.warning("%s", text)

    for text in aligned:
        warn(text)
    for r in readers:  # the maps' own doubts, which the tables' figures include
        by_flag: dict[str, list[str]] = {}
        for s in studies:
            for flag in r.qc_flags.get(s, []):
                by_flag.setdefault(flag, []).append(s)
        if by_flag:
            warn(f"QC flags of {r.label} (its summary.json says why; docs/qc.md): " + "; ".join(
                f"{flag} in {len(ss)} of {len(studies)} studies ({', '.join(ss[:3])}"
                f"{' ...' if len(ss) > 3 else ''})" for flag, ss in by_flag.items())
                 + "; the tables include those studies")

    for est, ref in _map_pairs(readers):
        for name in MAP_ORDER:
            lacking = [s for s in studies if name not in est.maps[s] or name not in ref.maps[s]]
            if lacking:
                if len(lacking) < len(studies):  # (a reader that never makes it: no row)
                    warn(f"{name}, {est.label} vs {ref.label}: left out of Table 1 (missing in "
                         f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''})")
                else:
                    log.info("%s, %s vs %s: not compared (not in both readers)", name,
                             est.label, ref.label)
                continue
            if name == "delay" and (svd := [r.label for r in (est, ref) if r.delay_is_tmax]):
                warn(f"delay, {est.label} vs {ref.label}: left out of Table 1 ({', '.join(svd)}'s "
                     "delay map is its Tmax, not an arrival delay: compare tmax)")
                continue
            key = f"{ref.label}/{name}"
            if key not in out["minmax"]:
                try:
                    out["minmax"][key] = list(dataset_range([ref.maps[s][name]
                                                             for s in studies]))
                except ValidationError:
                    out["minmax"][key] = [float("nan"), float("nan")]
                    warn(f"{name} of {ref.label}: constant or without finite voxels over the "
                         "studies, so no min-max range: its MSE in the paper's normalisation "
                         "is left empty")
            lo_hi = tuple(out["minmax"][key])
            cases = {s: map_case_metrics(est.maps[s][name], ref.maps[s][name], name=name,
                                         minmax=lo_hi, region=region_of[s]) for s in studies}
            summary = {m: _mean_sd([c[m] for c in cases.values()]) for m in MAP_METRICS}
            if name in RATIO_MAPS and (said := _scale_mismatch(est, ref, name, studies,
                                                                region_of)) is not None:
                warn(said)
            empty = [s for s, c in cases.items() if not np.isfinite(c["coverage"])]
            if empty:
                warn(f"{name}, {est.label} vs {ref.label}: {ref.label} has no value in the "
                     f"region in {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}: "
                     "left out of Table 1")
            short = {s: c["coverage"] for s, c in cases.items() if c["coverage"] < MIN_COVERAGE}
            if short:
                named = ", ".join(f"{s} ({f'{c:.2%}' if c > 0 else 'no values'})"
                                  for s, c in list(short.items())[:3])
                warn(f"{name}, {est.label} vs {ref.label}: {est.label} has a value in under "
                     f"{MIN_COVERAGE:.0%} of the region where {ref.label} has one in "
                     f"{len(short)} of {len(cases)} studies: {named}"
                     f"{' ...' if len(short) > 3 else ''}; Table 1 compares the rest only "
                     "(a study with no values is left out of it)")
            out["maps"].append({
                "estimate": est.label, "reference": ref.label, "map": name,
                "unit": ref.maps[studies[0]].units.get(name, ""), "window": list(
                    UNIT_WINDOWS.get(name, lo_hi)), "minmax": list(lo_hi),
                "summary": summary,
                "cases": cases})
    for est, ref in _lesion_pairs(readers):
        for name in LESION_NAMES:
            absent = {r.label: [s for s in studies if name not in r.lesions.get(s, {})]
                       for r in (est, ref)}
            if not any(absent.values()):
                out["lesions"].append(_lesion_row(est, ref, name, studies, voxel_ml))
                note = out["lesions"][-1]["volumes"].get("icc1k_note")
                if note and not any(note in w for w in out["table_warnings"]):
                    warn(f"Table 2's ICC is left empty: {note}")
            elif any(len(v) < len(studies) for v in absent.values()):  # not a cohort of maps
                said = "; ".join(f"{label} has none in {', '.join(v[:3])}"
                                 f"{' ...' if len(v) > 3 else ''}"
                                 for label, v in absent.items() if v)
                warn(f"{name}, {est.label} vs {ref.label}: left out of Table 2 ({said})")
    for name in LESION_NAMES:
        have = [r for r in readers
                if all(name in r.lesions.get(s, {}) for s in studies)]
        if len(have) >= 3:
            table = np.array([[np.count_nonzero(r.lesions[s][name]) * voxel_ml[s] for r in have]
                              for s in studies])
            out["friedman"].append({"lesion": name, "readers": [r.label for r in have],
                                    "variable": "volume_ml", **friedman(table)})
    return out


#: Medians of one map by two readers further apart than this factor are said to be in other
#: units or scales: the mistakes of other tools' files are factors of 10 (a CBF stored x 10),
#: 60 (per second), 100 (a fraction as %) or 1,000 (ms), where methods that differ in model
#: read within a factor of 2 or 3 of each other (the box model's 0.5x CBF on dispersed tissue).
SCALE_MISMATCH = 5.0
#: The maps whose medians are compared so: those on a ratio scale (a healthy Tmax or delay sits
#: near 0 s, where two valid methods' medians are any factor apart: 0.24 and 1.64 s).
RATIO_MAPS = ("cbf", "cbv", "mtt")


def _scale_mismatch(est: Reader, ref: Reader, name: str, studies: Sequence[str],
                    region_of: Mapping[str, np.ndarray | None]) -> str | None:
    """A warning when ``est``'s median of map ``name`` over the voxels both readers hold a
    value at (in the compared region, every study pooled) is more than :data:`SCALE_MISMATCH`
    times ``ref``'s, or less than its inverse: a unit or scale that reading the files could not
    tell (a CBF stored x 10 whose values stay within the plausible window at low flow)."""
    pairs = []
    for s in studies:
        a, b = np.asarray(est.maps[s][name], float), np.asarray(ref.maps[s][name], float)
        both = np.isfinite(a) & np.isfinite(b)
        if region_of.get(s) is not None:
            both &= np.asarray(region_of[s], bool)
        pairs.append((a[both], b[both]))
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    if a.size == 0:
        return None
    ma, mb = float(np.median(a)), float(np.median(b))
    if ma <= 0 or mb <= 0 or 1 / SCALE_MISMATCH <= ma / mb <= SCALE_MISMATCH:
        return None
    return (f"{name}, {est.label} vs {ref.label}: {est.label}'s median ({ma:.3g}) is "
            f"{ma / mb:.3g} times {ref.label}'s ({mb:.3g}) where both have values: another "
            "unit or scale (a map stored x 10, per second, in ms)? Table 1 compares them as "
            "read; give the unit in a JSON sidecar (docs/evaluation.md)")


def _lesion_pairs(readers: Sequence[Reader]) -> list[tuple[Reader, Reader]]:
    raters = [r for r in readers if r.kind == "rater"]
    methods = [r for r in readers if r.kind == "method"]
    pairs = _map_pairs(readers)
    pairs += [(raters[i], raters[j]) for i in range(len(raters))
              for j in range(i + 1, len(raters))]
    return pairs + [(m, r) for r in raters for m in methods[:2]]


def _lesion_row(est: Reader, ref: Reader, name: str, studies: Sequence[str],
                voxel_ml: Mapping[str, float]) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for s in studies:
        a, b = est.lesions[s][name], ref.lesions[s][name]
        if a.shape != b.shape:
            raise ValidationError(f"{name} of {s}: {est.label} grid {a.shape} differs from "
                                  f"{ref.label} grid {b.shape}")
        cases[s] = {**case_dice(a, b), "volume_estimate_ml": np.count_nonzero(a) * voxel_ml[s],
                    "volume_reference_ml": np.count_nonzero(b) * voxel_ml[s]}
    va = [c["volume_estimate_ml"] for c in cases.values()]
    vb = [c["volume_reference_ml"] for c in cases.values()]
    return {"lesion": name, "estimate": est.label, "reference": ref.label,
            "dice": summarise_dice(list(cases.values())).as_dict(),
            "volumes": volume_agreement(va, vb), "cases": cases}
