"""Cohort -> compact slice cache for training: float16 memory-mapped arrays, built once and reused.

A cache holds, for every slice of every patient at one size (H = W = ``size``):

- ``inputs.npy``  float16 (N, t, H, W): the selected frames in HU, clipped to the HU window;
- ``targets.npy`` float16 (N, K, H, W): the reference maps of every available target in [0, 1];
- ``masks.npy``   uint8 (N, H, W): brain mask AND every target finite;
- ``index.json``  patient id and slice z of each row, per-patient HU sums for the input statistics
  and the configuration the cache was built with.

Inputs are stored as float16, half the size of float32. The cache is written in a temporary folder
and renamed when complete, so a killed build leaves nothing that looks finished. Sizes other than
the study's are resampled slice by slice (area averaging down, bilinear up), which gives the
down-sampled copies used for pretraining.

Cohort layouts: the phantom's (``sub-*/study.nii.gz`` with ``truth/``, ``masks/brain.nii.gz`` and
optionally precomputed ``nlr/`` maps) and UniToBrain's
(:func:`ctperf.io.unitobrain.read_unitobrain_case`). This module only reads: NLR references
are computed beforehand by :func:`ctperf.workflow.nlr_references` into a folder of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError, ValidationError
from ctperf.evaluation.metrics import image_range
from ctperf.io.state import files_state
from ctperf.masks import first_frame_as_air, hu_offset
from ctperf.model.normalise import (
    DEFAULT_HU_WINDOW,
    TARGET_MAPS,
    TARGET_WINDOWS,
    normalise_input,
    to_unit,
)
from ctperf.model.unet import input_step, input_times, select_frames
from ctperf.perfusion.onset import bolus_arrival_s
from ctperf.types import CTPSeries, PerfusionMaps, orient, radiological_flips

__all__ = ["CACHE_VERSION", "ORIENTATION", "SliceCache", "build_slice_cache", "input_arrival_s",
           "iter_cohort", "network_pixel_mm", "open_slice_cache", "reference_brain",
           "resize_slices"]

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: NLR references' vessels left out of the masks; 3: radiological slices

#: How the cache and the checkpoints trained on it turn every slice: to the orientation DICOM
#: stores axial images in (:func:`ctperf.types.radiological_flips` of the study's affine), so
#: that a network sees every study the same way up whatever the file stored (a NIfTI converter
#: may reverse the rows of the DICOM series it read).
ORIENTATION = "radiological"


_REFERENCES = ("truth", "nlr")


@dataclass(frozen=True, eq=False)
class SliceCache:
    """An opened slice cache (arrays are read-only memory maps)."""

    path: Path
    inputs: np.ndarray
    targets: np.ndarray
    masks: np.ndarray
    patients: np.ndarray
    z: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[-1])

    @property
    def n_frames(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def patient_ids(self) -> list[str]:
        """Patients in the cache, in cohort order."""
        return list(self.meta["patients"])

    def rows(self, patients: Sequence[str]) -> np.ndarray:
        """Row indices of every slice of the given patients."""
        missing = set(patients) - set(self.patient_ids)
        if missing:
            raise ValidationError(f"patients not in the cache {self.path}: {sorted(missing)}")
        return np.flatnonzero(np.isin(self.patients, list(patients)))

    def target_index(self, target: str) -> int:
        have = self.meta["targets"]
        lacking = self.meta.get("targets_lacking", {}).get(target)
        if target not in have and lacking:
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more"
                                              if len(lacking) > 5 else "")
            raise ValidationError(
                f"target {target!r} is not in the cache {self.path}: {shown} "
                f"ha{'s' if len(lacking) == 1 else 've'} no {TARGET_MAPS.get(target, target)!r} "
                f"reference map; leave {'it' if len(lacking) == 1 else 'them'} out of the "
                f"cohort or train another target (available: {have})")
        if target not in have:
            raise ValidationError(
                f"target {target!r} is not in the cache {self.path} (its reference has no "
                f"{TARGET_MAPS.get(target, target)!r} map); available: {have}")
        return int(have.index(target))

    def input_stats(self, patients: Sequence[str]) -> tuple[float, float]:
        """Mean and SD in HU of the clipped inputs of these patients (training statistics)."""
        sums = np.array([self.meta["stats"][p] for p in patients], dtype=np.float64).sum(axis=0)
        n, s, ss = sums
        mean = s / n
        return float(mean), float(np.sqrt(max(ss / n - mean**2, 1e-12)))

    def batch(self, rows: np.ndarray, *, target_idx: Sequence[int], mean: float,
              std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Standardised inputs (B, t, H, W), targets (B, C, H, W) in [0, 1], masks (B, 1, H, W)."""
        order = np.argsort(rows)  # memory maps read fastest in file order
        rows_sorted = np.asarray(rows)[order]
        back = np.argsort(order)
        x = normalise_input(self.inputs[rows_sorted], window=self.meta["hu_window"], mean=mean,
                            std=std)[back]
        y = self.targets[rows_sorted][:, list(target_idx)].astype(np.float32)[back]
        m = self.masks[rows_sorted][back, None].astype(np.float32)
        return x, y, m


def resize_slices(arr: np.ndarray, size: int, *, mask: bool = False) -> np.ndarray:
    """Resize the last two axes to size x size: area averaging down, bilinear up.

    ``mask=True`` thresholds the resampled fraction at 0.5.
    """
    if arr.shape[-2:] == (size, size):
        return arr > 0.5 if mask else arr
    import torch
    import torch.nn.functional as F

    lead = arr.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(
        -1, 1, *arr.shape[-2:])
    mode = "area" if size <= min(arr.shape[-2:]) else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(t, size=(size, size), mode=mode, **kw).reshape(*lead, size, size).numpy()
    return out > 0.5 if mask else out


def _phantom_subjects(root: Path) -> list[Path]:
    """The ``sub-*`` folders of a phantom-layout cohort; one without its study is an error (a
    subject left out silently would change the folds)."""
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    missing = [p.name for p in subjects if not (p / "study.nii.gz").exists()]
    if missing:
        raise InputError(root / missing[0], f"no study.nii.gz ({len(missing)} subject"
                                            f"{'s' if len(missing) > 1 else ''} without one: "
                                            f"{', '.join(missing[:5])}); restore or remove them")
    return subjects


def _reference_folder(sub: Path, reference: str, references: Path | None) -> Path:
    """The folder of one phantom-layout subject's reference maps: ``references/<subject>/``
    (NLR) or ``references/<subject>/truth/``, else the subject's own ``nlr/`` or ``truth/``."""
    needed = ("cbf", "cbv", "mtt", "delay")
    folders = [sub / reference]
    if references is not None:  # looked at first
        given = references / sub.name
        folders.insert(0, given / "truth" if reference == "truth" else given)
    for folder in folders:
        if all((folder / f"{n}.nii.gz").exists() for n in needed):
            return folder
    missing = ", ".join(n for n in needed if not (folders[0] / f"{n}.nii.gz").exists())
    if reference == "truth":
        raise InputError(folders[0], f"missing true maps: {missing} (of {', '.join(needed)})")
    raise InputError(folders[0], f"missing NLR reference maps: {missing} (of "
                                 f"{', '.join(needed)}); compute them with "
                                 "ctperf.workflow.nlr_references (ctperf train and cv do) and "
                                 "pass their folder as references")


def reference_brain(ref: PerfusionMaps) -> np.ndarray:
    """Where a dataset's reference maps hold tissue, (Z, Y, X) bool: every map finite and the
    CBV (or CBF, or the first map) positive. UniToBrain's maps are computed inside the brain
    only and store 0 outside it, never NaN (its delay may be 0 inside too)."""
    tissue = next(ref[n] for n in ("cbv", "cbf", *ref.names) if n in ref)
    return np.all([np.isfinite(a) for a in ref.maps.values()], axis=0) & (tissue > 0)


def iter_cohort(root: str | Path, *, reference: str = "truth",
                references: str | Path | None = None,
                ) -> Iterator[tuple[str, CTPSeries, PerfusionMaps, np.ndarray]]:
    """Yield (patient id, series, reference maps, brain mask (Z, Y, X) bool) for each patient.

    ``reference`` is ``"truth"`` (phantom's true maps) or ``"nlr"`` (box-model NLR maps read from
    ``references/<subject>/``, see :func:`ctperf.workflow.nlr_references`, or from a cohort's
    precomputed ``sub-*/nlr/``); on UniToBrain it is the dataset's own reference. With
    ``"nlr"``, the vessels of the reference run (its ``lesions/vessels.nii.gz``) are left out
    of the mask. With
    ``"truth"``, ``references`` may name the phantom cohort that the studies of ``root`` were
    made from (preprocessed studies carry no truth): its ``truth/`` and brain masks are read.
    """
    for pid, load in _cohort_loaders(root, reference=reference, references=references):
        yield (pid, *load())


_Patient = tuple[CTPSeries, PerfusionMaps, np.ndarray]


def _cohort_loaders(root: str | Path, *, reference: str, references: str | Path | None,
                    ) -> list[tuple[str, Callable[[], _Patient]]]:
    """(patient id, a function that reads its series, reference maps and brain mask) for each
    patient of the cohort, in order: what :func:`iter_cohort` yields, read when called."""
    root = Path(root)
    if reference not in _REFERENCES:
        raise ValidationError(f"reference must be one of {_REFERENCES}, got {reference!r}")
    if not root.is_dir():
        raise InputError(root, "cohort folder does not exist")
    subs = _phantom_subjects(root)
    if subs:
        refs = None if references is None else Path(references)
        return [(sub.name, partial(_read_phantom_subject, sub, reference, refs))
                for sub in subs]
    from ctperf.io.unitobrain import find_unitobrain

    return [(patient, partial(_read_unitobrain_patient, patient, folder, maps))
            for patient, folder, maps in find_unitobrain(root)]


def _read_phantom_subject(sub: Path, reference: str, refs: Path | None) -> _Patient:
    from ctperf import io

    series = io.read_nifti_series(sub / "study.nii.gz")
    shape = series.shape[1:]
    folder = _reference_folder(sub, reference, refs)
    maps = io.read_maps(folder)
    # the phantom's brain, the source cohort's, or the reference run's
    brains = [p for p in (sub / "masks" / "brain.nii.gz",
                          None if refs is None or reference != "truth"
                          else refs / sub.name / "masks" / "brain.nii.gz",
                          folder / "lesions" / "brain.nii.gz")
              if p is not None and p.exists()]
    if brains:
        mask = io.read_mask(brains[0], shape=shape, affine=series.affine)
    else:  # the whole slice had counted, air included, in silence
        log.warning("%s: no brain mask (masks/brain.nii.gz); the loss is taken where "
                    "the reference maps hold tissue (finite, CBV > 0)", sub.name)
        mask = reference_brain(maps)
    # vessel voxels hold the vessel's own CBV and CBF, tens of times tissue's, which no
    # perfusion map is read for and which would dominate the loss
    vessels = folder / "lesions" / "vessels.nii.gz"
    if reference == "nlr" and vessels.exists():
        mask = mask & ~io.read_mask(vessels, shape=shape, affine=series.affine)
    return series, maps, mask


def _read_unitobrain_patient(patient: str, folder: Path, maps: Path) -> _Patient:
    from ctperf.io.unitobrain import read_unitobrain_case

    case = read_unitobrain_case(patient, folder, maps)
    return case.series, case.reference, reference_brain(case.reference)


def _cache_key(root: Path, config: dict[str, Any], references: Path | None) -> str:
    """The cache's name: its cohort, settings and references, and the state of their files
    (a cache shared by runs is rebuilt when a study or reference changed, not reused)."""
    refs = None if references is None else str(references.resolve())
    blob = json.dumps({"root": str(root.resolve()), **config,
                       **({"references": refs} if refs is not None else {}),
                       "files": files_state(root),
                       **({"reference_files": files_state(references)}
                          if references is not None and references.is_dir() else {})},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def open_slice_cache(path: str | Path) -> SliceCache:
    """Open a finished cache folder (memory-mapped, read-only)."""
    p = Path(path)
    try:
        meta = json.loads((p / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(p, f"not a slice cache ({exc})") from None
    if meta.get("version") != CACHE_VERSION:
        raise InputError(p, f"slice cache version {meta.get('version')}, this ctperf reads "
                            f"{CACHE_VERSION}; delete the folder to rebuild it")
    try:
        arrays = {n: np.load(p / f"{n}.npy", mmap_mode="r")
                  for n in ("inputs", "targets", "masks")}
    except (OSError, ValueError, EOFError) as exc:  # a file cut short or damaged since
        raise InputError(p, f"damaged slice cache ({' '.join(str(exc).split())}); delete the "
                            "folder to rebuild it") from None
    return SliceCache(path=p, patients=np.asarray(meta["rows_patient"]),
                      z=np.asarray(meta["rows_z"], dtype=np.int64), meta=meta, **arrays)


def network_pixel_mm(series: CTPSeries, size: int) -> float:
    """The in-plane pixel (mm) of a study's slices resized to ``size`` x ``size``, as the
    network sees them: its field of view over ``size``."""
    _, dy, dx = series.spacing
    _, _, ny, nx = series.shape
    return float(np.sqrt(ny * dy * nx * dx)) / size


#: Patients a slice cache reads at once by default: each holds its study (a 512 x 512 x 8 x 89
#: one about 2 GB at its peak) while it is read, resampled and written.
CACHE_WORKERS = 4


@dataclass(frozen=True)
class _Part:
    """One patient's rows of a cache being built, written to ``part-<i>-*.npy``, and what the
    index records of them."""

    index: int
    pid: str
    names: tuple[str, ...]   # its targets, in the order of its part's target columns
    n_z: int
    size: int
    frames: int
    stats: list[float]       # count, sum and sum of squares of its input HU
    step: float              # s between its input frames
    pixel: float             # its pixel as the network sees it, mm
    arrival: float | None    # s from its first frame to the bolus, None where none is found
    span: float              # s from its first frame to its last
    ranges: dict[str, tuple[float, float]]  # whole-image min and max per target


def _write_part(i: int, pid: str, load: Callable[[], _Patient], *, size: int | None,
                frames: int | None, root: Path, tmp: Path, path: Path, frame_mode: str,
                frame_interval: float | None, hu_window: Sequence[float]) -> _Part:
    """Read patient ``i``, select, calibrate, orient, resample and clip its frames and maps, and
    write them as the cache's part ``i``."""
    series, maps, mask = load()
    if frames is None:
        frames = series.n_frames
    if size is None:
        if series.shape[2] != series.shape[3]:
            raise InputError(root, f"{pid} has non-square slices {series.shape[2:]}; give a size")
        size = series.shape[3]
    try:
        x = select_frames(series.hu, series.times, n_frames=frames, mode=frame_mode,
                          frame_interval=frame_interval)
    except ValidationError as exc:
        raise InputError(root, f"{pid}: {exc}") from None
    step = input_step(series.times, n_frames=frames, mode=frame_mode,
                      frame_interval=frame_interval)
    arrival = input_arrival_s(series, x, input_times(series.times, n_frames=frames,
                                                     mode=frame_mode,
                                                     frame_interval=frame_interval))
    span = float(series.times[-1] - series.times[0])
    window = (frames - 1) * frame_interval if frame_mode == "resample" and frame_interval else 0
    if span < window:
        log.warning("%s spans %.1f s of the %.1f s the network takes (%d frames %g s apart): "
                    "its last frame stands for the last %.1f s", pid, span, window, frames,
                    frame_interval, window - span)
    _, offset = hu_offset(first_frame_as_air(series.hu), spacing=series.spacing)  # calibrated HU
    if offset:
        x -= np.float32(offset)
    flips = radiological_flips(series.affine)
    x = np.clip(resize_slices(orient(x, flips), size), hu_window[0], hu_window[1])
    targets, names, ranges = [], [], {}
    valid = resize_slices(orient(mask, flips).astype(np.float32), size, mask=True)
    for target, map_name in TARGET_MAPS.items():
        if map_name in maps:
            raw = orient(maps[map_name], flips)
            if (whole := image_range(raw)) is not None:  # the paper's min-max
                ranges[target] = (float(whole[0]), float(whole[1]))
            valid &= resize_slices(np.isfinite(raw).astype(np.float32), size, mask=True)
            targets.append(resize_slices(to_unit(np.nan_to_num(raw), target), size))
            names.append(target)
    for kind, array in (("inputs", x.transpose(1, 0, 2, 3).astype(np.float16)),
                        ("targets", np.stack(targets, axis=1).astype(np.float16)),
                        ("masks", valid.astype(np.uint8))):
        try:
            np.save(tmp / f"part-{i}-{kind}.npy", array)
        except OSError as exc:  # numpy's own write error names no file and no errno
            raise InputError(path, f"could not be written ({exc}): a full disk?") from None
    # frame by frame in float64: a float64 copy of the whole input had doubled the peak memory
    total = sum(float(np.sum(frame, dtype=np.float64)) for frame in x)
    squares = sum(float(np.sum(np.square(frame, dtype=np.float64))) for frame in x)
    return _Part(index=i, pid=pid, names=tuple(names), n_z=x.shape[1], size=size, frames=frames,
                 stats=[float(x.size), total, squares], step=step,
                 pixel=network_pixel_mm(series, size), arrival=arrival, span=span,
                 ranges=ranges)


def input_arrival_s(series: CTPSeries, frames: np.ndarray, times: np.ndarray) -> float | None:
    """When the bolus reaches a study (:func:`ctperf.perfusion.onset.bolus_arrival_s`), s after
    its first frame, read on the frames the network takes (``frames`` (t, Z, Y, X) HU at
    ``times``): on the study's own frames it moves with their spacing (a bolus read 5.5 s at
    0.5 s frames read 3.0 s at 1.5 s), which the network, given every study on one grid, does
    not see. None where no bolus is found."""
    try:
        return bolus_arrival_s(series.replace(hu=frames, times=times, slice_times=None))
    except ValidationError:  # no bolus the maps' reading finds
        return None


def _kept_targets(parts: Sequence[_Part]) -> list[str]:
    """The targets every patient has, in :data:`TARGET_MAPS` order."""
    have = set.intersection(*(set(p.names) for p in parts))
    return [t for t in TARGET_MAPS if t in have]


def _assemble(tmp: Path, parts: Sequence[_Part], *, size: int, frames: int, root: Path) -> int:
    """Join the parts' files into ``inputs.npy``, ``targets.npy`` and ``masks.npy`` (the targets
    every patient has), deleting each part once copied; returns the number of slices."""
    kept = _kept_targets(parts)
    if not kept:
        raise InputError(root, "the cohort yielded no patients with reference maps")
    n = sum(p.n_z for p in parts)
    shapes = {"inputs": (n, frames, size, size), "targets": (n, len(kept), size, size),
              "masks": (n, size, size)}
    dtypes = {"inputs": np.float16, "targets": np.float16, "masks": np.uint8}
    for name, shape in shapes.items():
        out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtypes[name],
                                        shape=shape)
        start = 0
        for p in parts:
            part_file = tmp / f"part-{p.index}-{name}.npy"
            block = np.load(part_file, mmap_mode="r")
            if name == "targets":
                block = block[:, [p.names.index(t) for t in kept]]
            out[start:start + len(block)] = block
            start += len(block)
            del block
            part_file.unlink()
        out.flush()
        del out
    return n


def _index(parts: Sequence[_Part]) -> dict[str, Any]:
    """What ``index.json`` records of the patients' parts: their rows, input sums, targets
    (those every patient has, and who lacks each other), the paper's dataset-wide min-max per
    target, frame steps, pixels and bolus arrivals (read on the input frames)."""
    ranges = {t: [min(p.ranges[t][0] for p in parts if t in p.ranges),
                  max(p.ranges[t][1] for p in parts if t in p.ranges)]
              for t in TARGET_MAPS if any(t in p.ranges for p in parts)}
    lacking = {t: [p.pid for p in parts if t not in p.names] for t in TARGET_MAPS}
    return {"targets": _kept_targets(parts), "patients": [p.pid for p in parts],
            "stats": {p.pid: p.stats for p in parts},
            "rows_patient": [p.pid for p in parts for _ in range(p.n_z)],
            "rows_z": [z for p in parts for z in range(p.n_z)], "image_ranges": ranges,
            "input_steps_s": {p.pid: p.step for p in parts},
            "pixels_mm": {p.pid: p.pixel for p in parts},
            "arrivals_s": {p.pid: p.arrival for p in parts if p.arrival is not None},
            "arrivals_on": "input", "spans_s": {p.pid: p.span for p in parts},
            "targets_lacking": {t: v for t, v in lacking.items() if v}}


def _warn_mixed_steps(steps: dict[str, float]) -> None:
    spread = sorted(steps.values())
    if spread and spread[-1] > 1.1 * spread[0]:
        log.warning("the patients' input frames are %.2f to %.2f s apart: one network "
                    "then reads one frame index as different times; resample them onto one "
                    "spacing (frame_mode='resample', train --frame-mode resample)",
                    spread[0], spread[-1])


def build_slice_cache(cohort: str | Path, cache_root: str | Path, *, size: int | None = None,
                      frames: int | None = None,
                      reference: str = "truth", references: str | Path | None = None,
                      frame_mode: str = "subsample",
                      frame_interval: float | None = None,
                      hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
                      workers: int | None = None,
                      progress: bool = False) -> SliceCache:
    """Build (or reuse) the slice cache of a cohort at one size and frame count.

    Parameters
    ----------
    cohort : path
        Cohort folder (phantom or UniToBrain layout).
    cache_root : path
        Folder holding caches; each configuration gets its own sub-folder (reused if present).
    size : int, optional
        Slice size H = W in pixels (resampled from the study's grid when different); default
        the first study's (square) size.
    frames : int, optional
        Input frames t (see :func:`ctperf.model.unet.select_frames`); default the first
        study's frame count.
    reference : {"truth", "nlr"}
        Target maps (phantom layout).
    references : path, optional
        ``reference="nlr"``: folder of NLR reference maps, ``<subject>/<map>.nii.gz``, written
        by :func:`ctperf.workflow.nlr_references` (without it, or for a subject it lacks, the
        cohort's precomputed ``sub-*/nlr/`` is read). ``reference="truth"``: the phantom
        cohort whose ``<subject>/truth/`` and brain masks belong to the studies of ``cohort``
        (e.g. their originals before preprocessing).
    frame_mode : {"subsample", "resample"}
        Frame selection; ``frame_interval`` (s) for resampling.
    hu_window : (float, float)
        HU clip window stored with the inputs.
    workers : int, optional
        Patients read and written at once, in threads (each holds its study in memory);
        default :data:`CACHE_WORKERS` or the usable cores, whichever is fewer. The cache is the
        same whatever their number.
    progress : bool
        Show a progress bar over patients.
    """
    from tqdm.auto import tqdm

    from ctperf.io import atomic_dir
    from ctperf.parallel import map_chunks, usable_cores

    if (size is not None and size < 1) or (frames is not None and frames < 1):
        raise ValidationError(f"size and frames must be >= 1, got size={size}, frames={frames}")
    root = Path(cohort)
    config = {"version": CACHE_VERSION, "size": size, "frames": frames,
              "orientation": ORIENTATION,
              "reference": reference, "frame_mode": frame_mode, "frame_interval": frame_interval,
              "hu_window": [float(v) for v in hu_window],
              "windows": {k: list(v) for k, v in TARGET_WINDOWS.items()}}
    refs = None if references is None else Path(references)
    key = _cache_key(root, config, refs)
    path = Path(cache_root) / (f"{root.resolve().name}-{size or 'native'}px-"
                               f"{frames or 'all'}f-{reference}-{key}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        while not (path / "index.json").exists():  # under torchrun, process 0 builds the cache
            time.sleep(1.0)
    if (path / "index.json").exists():
        log.info("reusing slice cache %s", path)
        return open_slice_cache(path)
    loaders = _cohort_loaders(root, reference=reference, references=refs)
    try:
        with atomic_dir(path) as tmp:
            part = partial(_write_part, root=root, tmp=tmp, path=path, frame_mode=frame_mode,
                           frame_interval=frame_interval, hu_window=hu_window)
            # one bar over every patient, the first one too when it is read alone first
            bar = tqdm(total=len(loaders), desc="slice cache", unit="patient",
                       disable=not progress)

            def one(i: int) -> _Part:
                done = part(i, *loaders[i], size=size, frames=frames)
                bar.update()
                return done

            with bar:
                first = []
                if size is None or frames is None:  # the first patient's own, read first
                    first = [one(0)]
                    size, frames = first[0].size, first[0].frames
                k = len(first)
                parts = [*first, *map_chunks(
                    lambda i, _: one(i + k), len(loaders) - k, chunk=1,
                    workers=workers or min(CACHE_WORKERS, usable_cores()))]
            n = _assemble(tmp, parts, size=size, frames=frames, root=root)
            _warn_mixed_steps({p.pid: p.step for p in parts})
            meta = {**config, **_index(parts), "size": size, "frames": frames,
                    "cohort": str(root)}
            (tmp / "index.json").write_text(json.dumps(meta) + "\n")
    except InputError as exc:
        # the same cache finished meanwhile by another run (train and cv started together on
        # one --cache): theirs is used, ours is left
        if Path(exc.path) != path or not (path / "index.json").exists():
            raise
        log.info("slice cache %s was built meanwhile by another run: reused", path)
        return open_slice_cache(path)
    log.info("built slice cache %s (%d slices)", path, n)
    return open_slice_cache(path)
