"""One function per CLI command that does the whole work for ONE study: read -> compute -> write.

Each function takes the study's path, the output folder and a frozen options dataclass, checks
the output before reading anything, and writes every file inside one :func:`ctperf.io.atomic_dir`
(the folder appears whole or not at all). They are module-level functions of picklable arguments,
independent of argparse, so a cohort runner can send them to other processes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctperf.errors import ValidationError
from ctperf.filter_options import check_filter_settings
from ctperf.lesion_options import LesionOptions
from ctperf.workflow.analysis import analyse_study, preprocessed_before

__all__ = ["MapsOptions", "PredictOptions", "PreprocessOptions", "StudyOutcome", "maps_study",
           "predict_study", "preprocess_study", "write_maps_outputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyOutcome:
    """What one study's run wrote.

    Attributes
    ----------
    out : Path
        The output folder.
    message : str
        One line for the user (what was written, lesion volumes, QC flags raised).
    summary : dict
        Small JSON-compatible facts of the run (maps written, volumes in mL, QC flags...).
    """

    out: Path
    message: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class StudyIOOptions:
    """How a study is read and its outputs written, shared by the per-study functions:
    ``series_uid`` and ``frame_interval`` (s) go to :func:`~ctperf.io.read_study`; ``dicom``
    also writes DICOM outputs (``anonymise``: de-identified); ``overwrite`` replaces an OUT
    ctperf did not write; ``progress`` shows bars."""

    series_uid: str | None = None
    frame_interval: float | None = None
    dicom: bool = False
    anonymise: bool = False
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.anonymise and not self.dicom:
            raise ValidationError("anonymise=True de-identifies the DICOM copy: set dicom=True "
                                  "too (NIfTI and JSON outputs carry no patient identity)")


@dataclass(frozen=True, kw_only=True)
class PreprocessSteps:
    """The paper's two preprocessing steps and the filter's settings, as in
    :func:`~ctperf.workflow.analyse_study`: ``register``, ``filter``, ``spatial_sigma_mm``
    (mm), ``range_sigma_hu`` (HU), ``filter_weights``, and ``workers`` (frames registered at
    once)."""

    register: bool = True
    filter: bool = True
    spatial_sigma_mm: float = 3.0
    range_sigma_hu: float = 20.0
    filter_weights: str = "linear"
    workers: int | None = None

    def __post_init__(self) -> None:
        check_filter_settings(self.filter, spatial_sigma_mm=self.spatial_sigma_mm,
                              range_sigma_hu=self.range_sigma_hu,
                              filter_weights=self.filter_weights)
        # the study's own options, in the options of a command that has both
        getattr(super(), "__post_init__", lambda: None)()


@dataclass(frozen=True, kw_only=True)
class MapsOptions(PreprocessSteps, StudyIOOptions):
    """Options of :func:`maps_study` (``ctperf maps``): no preprocessing unless asked;
    ``aif_mask``, ``vof_mask`` and ``brain_mask`` are 3D NIfTI files on the study's grid (in any
    axis order: :func:`ctperf.io.read_mask`);
    ``rho`` (g/mL), ``kh``, ``device`` and ``lesion_options`` (by default those of ``ctperf
    maps``) go to :func:`~ctperf.perfusion.run_perfusion`."""

    method: str = "nlr-fast"
    register: bool = False
    filter: bool = False
    aif_mask: Path | None = None
    vof_mask: Path | None = None
    brain_mask: Path | None = None
    rho: float = 1.04
    kh: float = 0.733
    device: str = "auto"
    lesion_options: LesionOptions = field(default_factory=LesionOptions)


@dataclass(frozen=True, kw_only=True)
class PreprocessOptions(PreprocessSteps, StudyIOOptions):
    """Options of :func:`preprocess_study` (``ctperf preprocess``); see
    :func:`ctperf.preprocess.preprocess`."""


@dataclass(frozen=True, kw_only=True)
class PredictOptions(StudyIOOptions):
    """Options of :func:`predict_study` (``ctperf predict``): the checkpoint ``model`` and the
    keywords of :func:`ctperf.model.predict_maps`; ``brain_mask`` is a 3D NIfTI file."""

    model: Path
    device: str = "auto"
    batch_size: int = 4
    resize: bool = False
    brain_mask: Path | None = None


# --- ctperf maps ---------------------------------------------------------------------------

def maps_study(study: Path, out: Path, options: MapsOptions) -> StudyOutcome:
    """Perfusion maps, lesions, QC and an overview of one study, written to ``out``.

    Steps: check ``out`` -> read the study and the masks -> (register -> filter ->) maps and
    lesions -> write ``out`` (:func:`write_maps_outputs`).

    Parameters
    ----------
    study : Path
        DICOM folder or 4D NIfTI study.
    out : Path
        Output folder, replaced whole when done.
    options : MapsOptions

    Returns
    -------
    StudyOutcome
    """
    from ctperf import io

    o = options
    io.check_output(out, inputs=(study, o.aif_mask, o.vof_mask, o.brain_mask),
                    overwrite=o.overwrite)
    series = io.read_study(study, series_uid=o.series_uid, frame_interval=o.frame_interval,
                           progress=o.progress)
    masks = {name: _read_mask(path, series) for name, path in
             (("aif_mask", o.aif_mask), ("vof_mask", o.vof_mask), ("brain_mask", o.brain_mask))}
    source = _first_frame(series) if o.dicom else None
    # Handed over without a reference kept here, so the raw study is freed once registered.
    held = [series]
    del series
    result, _ = analyse_study(
        held.pop(), method=o.method, register=o.register, filter=o.filter,
        spatial_sigma_mm=o.spatial_sigma_mm, range_sigma_hu=o.range_sigma_hu,
        filter_weights=o.filter_weights, workers=o.workers,
        aif_mask=masks["aif_mask"], vof_mask=masks["vof_mask"], brain_mask=masks["brain_mask"],
        rho=o.rho, kh=o.kh, device=o.device,
        lesion_options=o.lesion_options, progress=o.progress)
    result = dataclasses.replace(result, maps=result.maps.replace(provenance={
        **result.maps.provenance, "masks_given": _masks_record(masks)}))
    # No study path or name in the outputs: folder names often hold the patient's name.
    write_maps_outputs(result, out, title=f"ctperf maps: {o.method}", dicom_source=source,
                       overwrite=o.overwrite, anonymise=o.anonymise)
    return _maps_outcome(result, out)


def _say_if_unfinished(checkpoint: dict[str, Any], path: Path) -> None:
    """Warn when a checkpoint holds fewer epochs than its run was set to train (a ``last.pt``
    of a run still going or killed): its maps are an unfinished network's."""
    planned = sum(int(n) for *_, n in checkpoint["config"].get("stages", []))
    done = len(checkpoint.get("history") or [])
    if planned and done < planned:
        log.warning("%s: a checkpoint of an unfinished training run (epoch %d of %d): the maps "
                    "are an unfinished network's; use the run's model.pt once it is done",
                    path.name, done, planned)


def _masks_record(masks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The masks a run was given, each by its voxel count and a digest of its voxels (not its
    file name: paths often hold a patient's name); masks not given are left out."""
    import hashlib

    import numpy as np

    def digest(mask: Any) -> str:
        return hashlib.sha256(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).hexdigest()

    return {name: {"voxels": int(np.count_nonzero(m)), "sha256": digest(m)}
            for name, m in masks.items() if m is not None}


def _read_mask(path: Path | None, series: Any) -> Any:
    from ctperf import io

    return None if path is None else io.read_mask(path, shape=series.shape[1:],
                                                  affine=series.affine,
                                                  qform=io.kept_qform(series.meta))


def _first_frame(series: Any) -> Any:
    """The study's metadata with its first frame only: all that DICOM output needs."""
    return series.replace(hu=series.hu[:1], times=series.times[:1],
                          slice_times=None if series.slice_times is None
                          else series.slice_times[:1])


def _maps_outcome(result: Any, out: Path) -> StudyOutcome:
    from ctperf.perfusion.qc import raised_flags
    from ctperf.reporting import volume_text

    maps = result.maps
    les = maps.provenance["lesions"]
    raised = raised_flags(maps.provenance["qc"])
    message = (f"wrote {', '.join(maps.names)} to {out}: core {volume_text(les, 'core')}, "
               f"hypoperfused {volume_text(les, 'hypoperfused')}"
               + (f"; QC flags: {', '.join(raised)}" if raised else ""))
    return StudyOutcome(out=out, message=message, summary={
        "maps": list(maps.names), "volumes_ml": dict(les["volumes_ml"]), "qc_flags": raised})


def write_maps_and_summary(maps: Any, folder: Path) -> None:
    """``<map>.nii.gz`` (with sidecars) and ``summary.json`` (provenance without patient
    identity or paths, map names and units) of ``maps`` into ``folder``, usually the temporary
    folder of an :func:`ctperf.io.atomic_dir`."""
    from ctperf import io

    io.write_maps_nifti(maps, folder)
    io.write_json(io.public_meta({**maps.provenance, "maps": maps.names,
                                  "units": dict(maps.units)}), folder / "summary.json")


def write_maps_outputs(result: Any, folder: Path, *, title: str = "",
                       dicom_source: Any = None, overwrite: bool = False,
                       anonymise: bool = False) -> None:
    """Write the maps, lesion masks, summary and overview of one perfusion run.

    Everything is written inside one :func:`ctperf.io.atomic_dir`: ``folder`` appears whole or
    not at all. An existing folder is replaced only when ctperf wrote it, it is empty, or
    ``overwrite`` is true.

    Parameters
    ----------
    result : PerfusionResult
        Output of :func:`ctperf.perfusion.run_perfusion` or :func:`analyse_study`.
    folder : Path
        Output folder: ``<map>.nii.gz``, ``lesions/<mask>.nii.gz`` (core, hypoperfused,
        penumbra, tmax10, brain, vessels), ``summary.json``, ``overview.png``, where the AIF
        or the VOF was chosen automatically ``vessels.png`` (its voxels), and, with uncertainty
        maps, ``uncertainty.png``.
    title : str
        Title of the overview figure.
    dicom_source : CTPSeries, optional
        When given, DICOM maps are also written in ``folder/dicom`` with this study's metadata.
    overwrite : bool
        Replace an existing ``folder`` that ctperf did not write.
    anonymise : bool
        De-identified DICOM maps (see :func:`ctperf.io.write_maps_dicom`).
    """
    from ctperf import io
    from ctperf.perfusion import SD_MAPS
    from ctperf.reporting import maps_overview, save_figure, vessels_overview

    if anonymise and dicom_source is None:
        raise ValidationError("anonymise=True de-identifies the DICOM maps: give the "
                              "dicom_source they are written with")

    maps = result.maps
    with io.atomic_dir(folder, overwrite=overwrite) as tmp:
        write_maps_and_summary(maps, tmp)
        masks = {**result.lesions.masks(), "brain": result.brain, "vessels": result.vessels}
        rules = {n: r.get("label", "") for n, r in result.lesions.thresholds.items()
                 if isinstance(r, dict)}
        rules["penumbra"] = "hypoperfused outside the core"
        for name, mask in masks.items():  # each mask's rule in its header
            io.write_volume(mask, maps.affine, tmp / "lesions" / f"{name}.nii.gz",
                            description=f"{name}: {rules[name]}" if rules.get(name) else name,
                            **io.nifti_space(maps.provenance))
        save_figure(maps_overview(result, title=title), tmp / "overview.png", dpi=110,
                    facecolor="black")
        vessels = vessels_overview(result, title=title)
        if vessels is not None:
            save_figure(vessels, tmp / "vessels.png", dpi=110, facecolor="black")
        if any(name in maps for name in SD_MAPS):
            save_figure(maps_overview(result, title=f"{title}, uncertainty (posterior SD)",
                                      names=SD_MAPS),
                        tmp / "uncertainty.png", dpi=110, facecolor="black")
        if dicom_source is not None:
            io.write_maps_dicom(maps, tmp / "dicom", source=dicom_source, anonymise=anonymise)


# --- ctperf preprocess ---------------------------------------------------------------------

def preprocess_study(study: Path, out: Path, options: PreprocessOptions) -> StudyOutcome:
    """Motion correction and bilateral filtering of one study, written to ``out``.

    Steps: check ``out`` -> read -> register -> filter -> write ``study.nii.gz`` (+ JSON),
    ``transforms.json``, ``qc.json``, ``qc.png`` and, with ``options.dicom``, ``dicom/``.

    Parameters
    ----------
    study : Path
        DICOM folder or 4D NIfTI study.
    out : Path
        Output folder, replaced whole when done.
    options : PreprocessOptions

    Returns
    -------
    StudyOutcome
    """
    import numpy as np

    from ctperf import io
    from ctperf.preprocess import preprocess
    from ctperf.versioning import software_version

    o = options
    io.check_output(out, inputs=(study,), overwrite=o.overwrite)
    read = [io.read_study(study, series_uid=o.series_uid, frame_interval=o.frame_interval,
                          progress=o.progress)]
    # what the records and qc.png need of the study as read: its first frames and its middle
    # slice; the study itself is handed over, and freed once registered
    series, first_frames = _as_read(read[0])
    result = preprocess(read.pop(), register=o.register, filter=o.filter,
                        spatial_sigma_mm=o.spatial_sigma_mm, range_sigma_hu=o.range_sigma_hu,
                        filter_weights=o.filter_weights, workers=o.workers,
                        progress=o.progress)
    # No study path in the outputs: folder names often hold the patient's name.
    done = preprocessed_before(result.series.meta)  # a study ctperf preprocessed before
    meta = {**result.series.meta, "preprocess": {
        "registered": bool(o.register or done.get("registered")),
        "filtered": bool(o.filter or done.get("filtered")),
        "software_version": software_version()}}
    final = result.series.replace(meta=meta)
    with io.atomic_dir(out, overwrite=o.overwrite) as tmp:  # all appear together, or none
        io.write_series_nifti(final, tmp / "study.nii.gz")
        if o.dicom:  # DERIVED, with the steps of meta["preprocess"]
            io.write_series_dicom(final, tmp / "dicom", anonymise=o.anonymise,
                                  progress=o.progress)
        io.write_json({**_transforms_record(series, result),
                       "software_version": software_version()}, tmp / "transforms.json")
        qc = _preprocess_qc(series, final, result, o, first_frames)
        io.write_json({**qc, "software_version": software_version()}, tmp / "qc.json")
        _write_qc_figure(series, final, result, tmp / "qc.png")
    if not o.register:  # nothing was measured: no motion is no figure of 0 mm
        return StudyOutcome(out=out, message=f"wrote {out} (not registered: motion not "
                                             "measured)",
                            summary={"max_mean_displacement_mm": None,
                                     "max_uncorrected_mm": None})
    largest = float(np.max(result.displacement_mm))
    left = float(np.max(result.uncorrected_mm, initial=0.0))
    note = (f"; {int(np.sum(result.uncorrected_mm > 0))} frames moved by up to {left:.1f} mm "
            "and were NOT corrected (qc.json uncorrected_frames)" if left > 0 else "")
    return StudyOutcome(out=out, message=f"wrote {out} (max mean displacement {largest:.2f} mm"
                                         f"{note})",
                        summary={"max_mean_displacement_mm": largest,
                                 "max_uncorrected_mm": left})


def _as_read(series: Any) -> tuple[Any, Any]:
    """What ``qc.json`` and ``qc.png`` show of a study as read: its middle slice as a study
    (T, 1, Y, X) and its first :data:`NOISE_FRAMES` frames (T, Z, Y, X), copies."""
    z = series.shape[1] // 2
    affine = series.affine.copy()
    affine[:3, 3] += z * affine[:3, 2]  # the origin of slice z
    middle = series.replace(hu=series.hu[:, z:z + 1].copy(), slice_times=None, affine=affine)
    return middle, series.hu[:NOISE_FRAMES].copy()


def _transforms_record(series: Any, result: Any) -> dict[str, Any]:
    return {
        "convention": "ITK Euler3DTransform: maps a point of frame 0 (patient mm of the "
                      "affine) to the same anatomy in frame t: x -> R (x - center_mm) + "
                      "center_mm + t, R = Rz Rx Ry of the rotations in degrees",
        "center_mm": result.center_mm,
        "parameter_names": ["rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm"],
        "times": series.times,
        "parameters": result.parameters,
        "registration": result.registration,
    }


def _preprocess_qc(series: Any, final: Any, result: Any, o: PreprocessOptions,
                   first_frames: Any) -> dict[str, Any]:
    import numpy as np

    motion = {
        "displacement_mm": result.displacement_mm,
        "max_displacement_mm": result.max_displacement_mm,
        "max_mean_displacement_mm": float(np.max(result.displacement_mm)),
        "max_max_displacement_mm": float(np.max(result.max_displacement_mm)),
        "uncorrected_mm": result.uncorrected_mm,
        "uncorrected_frames": [int(t) for t in np.flatnonzero(result.uncorrected_mm > 0)],
    }
    if not o.register:  # no motion was measured: null, not 0 mm
        motion = dict.fromkeys(motion)
    return {
        "frames": series.n_frames,
        "registered": o.register,
        "filtered": o.filter,
        **motion,
        "brain_voxels": int(result.mask.sum()),
        # frame-to-frame noise over the brain in the first (pre-contrast) frames
        "noise_sd_hu_before": _noise(first_frames, result.mask),
        "noise_sd_hu_after": _noise(final.hu, result.mask),
    }


#: The first frames (pre-contrast) whose frame-to-frame noise ``qc.json`` gives.
NOISE_FRAMES = 6


def _noise(hu: Any, mask: Any, frames: int = NOISE_FRAMES) -> float:
    """SD of consecutive-frame differences over the mask / sqrt(2), first ``frames`` frames."""
    import numpy as np

    head = hu[:frames]
    if len(head) < 2 or not mask.any():
        return float("nan")
    return float(np.std(np.diff(head[:, mask], axis=0)) / np.sqrt(2.0))


def _write_qc_figure(before: Any, after: Any, result: Any, path: Path) -> None:
    from ctperf.reporting import motion_qc_figure, save_figure

    save_figure(motion_qc_figure(before, after, result), path, dpi=80)


# --- ctperf predict ------------------------------------------------------------------------

def predict_study(study: Path, out: Path, options: PredictOptions) -> StudyOutcome:
    """U-Net perfusion maps of one study in physical units, written to ``out``.

    Steps: check ``out`` -> load the checkpoint -> read the study (and brain mask) -> predict
    -> write ``<map>.nii.gz``, ``summary.json`` and, with ``options.dicom``, ``dicom/``.

    Parameters
    ----------
    study : Path
        DICOM folder or 4D NIfTI study.
    out : Path
        Output folder, replaced whole when done.
    options : PredictOptions

    Returns
    -------
    StudyOutcome
    """
    from ctperf import io
    from ctperf.model import load_checkpoint, predict_maps

    o = options
    io.check_output(out, inputs=(study, o.model, o.brain_mask), overwrite=o.overwrite)
    checkpoint = load_checkpoint(o.model)
    _say_if_unfinished(checkpoint, o.model)
    series = io.read_study(study, series_uid=o.series_uid, frame_interval=o.frame_interval,
                           progress=o.progress)
    given = mask = _read_mask(o.brain_mask, series)
    if mask is None:  # the automatic brain mask, as the maps of `ctperf maps` are bounded by
        from ctperf.errors import InputError
        from ctperf.masks import brain_mask

        try:
            mask = brain_mask(series)
        except ValidationError as exc:
            raise InputError(study, f"{exc}; give the brain with --brain-mask") from None
        if not mask.any():
            raise InputError(study, "no brain voxels found (no tissue at brain densities); "
                                    "check that the study is in HU, or give the brain with "
                                    "--brain-mask")
    from ctperf.masks import offset_said_once
    from ctperf.perfusion.onset import check_scan_start

    with offset_said_once():  # the study's HU offset, read by every check, said once
        try:  # the network's input must start before the bolus, as its training studies did
            arrival = check_scan_start(series, given)
        except ValidationError as exc:
            raise InputError(study, str(exc)) from None
        maps = predict_maps(series, checkpoint, device=o.device, batch_size=o.batch_size,
                            resize=o.resize, brain_mask=mask, progress=o.progress,
                            bolus_arrival_s=arrival)
    # The checkpoint's file name only, and no study path: paths often hold a patient's name.
    maps = maps.replace(provenance={**maps.provenance, "checkpoint": o.model.name,
                                    "masks_given": _masks_record({"brain_mask": given})})
    with io.atomic_dir(out, overwrite=o.overwrite) as tmp:  # all appear, or none
        write_maps_and_summary(maps, tmp)
        if o.dicom:
            io.write_maps_dicom(maps, tmp / "dicom", source=series, anonymise=o.anonymise)
    return StudyOutcome(out=out, message=f"wrote {', '.join(maps.names)} to {out}",
                        summary={"maps": list(maps.names)})
