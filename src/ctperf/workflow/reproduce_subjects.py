"""The per-subject tasks of ``ctperf reproduce`` (:mod:`ctperf.workflow.reproduce`), each run
by :func:`ctperf.workflow.cohort.run_cohort` into one maps-cohort folder: the model-based
reference maps of a phantom subject, a UniToBrain patient's own reference maps, and the U-Net
maps of a subject from the fold model that never saw it, with lesions segmented inside the
reference's brain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from ctperf.errors import AIFRefused, CTPerfError, ValidationError
from ctperf.lesion_options import LesionOptions
from ctperf.workflow.study import write_maps_and_summary, write_maps_outputs

__all__ = ["phantom_maps", "predict_subject", "reference_subject", "unitobrain_reference"]

log = logging.getLogger(__name__)


def phantom_maps(cohort: Path, studies_root: Path, target: Path, options: Any, *,
                 workers: int | None, progress: bool) -> Any:
    """Model-based maps of every phantom subject of ``studies_root`` (the cohort's studies or
    their preprocessed copies) into the maps cohort ``target``, with :func:`reference_subject`
    (the phantom's artery mask where the automatic AIF selection finds none or its choice is
    refused).

    Returns
    -------
    CohortSummary
    """
    from ctperf.workflow.cohort import Study, discover_studies, run_cohort

    studies = [Study(s.name, {"study": str(s.source),
                              "artery": str(cohort / s.name / "masks" / "artery.nii.gz")},
                     studies_root)
               for s in discover_studies(studies_root) if s.name.startswith("sub-")]
    return run_cohort(studies, target, reference_subject, options, workers=workers,
                      progress=progress)


def reference_subject(source: dict[str, str], target: Path, options: Any) -> None:
    """NLR maps of one phantom subject (:func:`ctperf.workflow.maps_study`); where the
    automatic AIF selection finds no artery or its choice is refused (small or noisy studies,
    :class:`~ctperf.errors.AIFRefused`), the phantom's artery mask ``source["artery"]`` is used
    instead, as a reader would place the AIF by hand, and
    ``summary.json`` says so (``aif.source``)."""
    from ctperf.workflow.study import maps_study

    study = Path(source["study"])
    try:
        maps_study(study, target, options)
    except ValidationError as exc:
        artery = Path(source["artery"])
        if not isinstance(exc, AIFRefused) or not _has_voxels(artery):
            raise
        log.warning("%s; the phantom's artery mask is used as the AIF mask",
                    exc if target.name in str(exc) else f"{target.name}: {exc}")
        maps_study(study, target, dataclasses.replace(options, aif_mask=artery))


def _has_voxels(mask: Path) -> bool:
    """Whether a mask file exists and marks at least one voxel (a phantom made before its
    artery mask was kept from being empty may hold none)."""
    from ctperf import io

    return mask.exists() and bool(io.read_volume(mask)[0].any())


def unitobrain_reference(source: tuple[str, str], target: Path, options: Any) -> None:
    """Write one UniToBrain patient's NLR maps as a maps-cohort folder (no lesions: the
    dataset has no Tmax map)."""
    from ctperf import io
    from ctperf.io.unitobrain import read_unitobrain_case

    case = read_unitobrain_case(target.name, source[0], source[1])
    maps = case.reference.replace(provenance={**case.reference.provenance, "method": "nlr",
                                              "source": "UniToBrain reference maps"})
    with io.atomic_dir(target) as tmp:
        write_maps_and_summary(maps, tmp)


def predict_subject(source: dict[str, Any], target: Path, options: dict[str, Any]) -> None:
    """U-Net maps of one subject from its fold's model(s), with lesions, written as a maps
    cohort folder (``<map>.nii.gz``, ``lesions/``, ``summary.json``, ``overview.png``).

    ``source`` holds the ``study`` (a NIfTI path, or the UniToBrain input and maps folders),
    the ``fold``, the ``models`` (one checkpoint per network) and the ``reference`` maps
    folder whose brain and vessel masks bound the maps and lesions.
    """
    import numpy as np

    from ctperf import io
    from ctperf.model import load_checkpoint, predict_maps
    from ctperf.types import PerfusionMaps

    if options["layout"] == "phantom":
        series = io.read_study(Path(source["study"]))
    else:
        from ctperf.io.unitobrain import read_unitobrain_case

        inp, maps_folder = source["study"]
        series = read_unitobrain_case(target.name, inp, maps_folder).series
    reference = Path(source["reference"])
    brain, vessels = _reference_masks(reference, series.shape[1:4], series.affine)
    maps: dict[str, Any] = {}
    trained: dict[str, list[str]] = {}
    for path in source["models"]:
        checkpoint = load_checkpoint(path)
        cfg = checkpoint["config"]
        if target.name in cfg["train_patients"]:  # never: the fold validated on this subject
            raise CTPerfError(f"{path} was trained on {target.name}")
        predicted = predict_maps(series, checkpoint, device=options["device"],
                                 batch_size=options["batch_size"], resize=True)
        for name in predicted.names:
            maps[name] = np.where(brain, predicted[name], np.nan).astype(np.float32)
        trained[Path(path).parent.parent.name] = sorted(cfg["train_patients"])
    provenance = _cnn_provenance(reference, source, trained)
    result = PerfusionMaps(maps=maps, affine=series.affine, provenance=provenance)
    if not {"cbf", "tmax"} <= set(result.names):  # no lesions, hence no overview
        with io.atomic_dir(target) as tmp:
            write_maps_and_summary(result, tmp)
        return
    write_maps_outputs(_cnn_result(result, brain, vessels, options["lesion_options"]), target,
                       title=f"U-Net, fold {source['fold']}")


def _reference_masks(reference: Path, shape: tuple[int, int, int], affine: Any) -> tuple[Any, Any]:
    """Brain and vessel masks of the reference run (UniToBrain:
    :func:`~ctperf.model.data.reference_brain`, no vessels)."""
    import numpy as np

    from ctperf import io

    lesions = reference / "lesions"
    if (lesions / "brain.nii.gz").exists():
        brain = io.read_mask(lesions / "brain.nii.gz", shape=shape, affine=affine)
        vessels = io.read_mask(lesions / "vessels.nii.gz", shape=shape, affine=affine)
        return brain, vessels
    from ctperf.model.data import reference_brain

    # as the training's loss reads it (only finite, the U-Net's maps had covered the air too)
    return reference_brain(io.read_maps(reference)), np.zeros(shape, dtype=bool)


def _cnn_provenance(reference: Path, source: dict[str, Any],
                    trained: dict[str, list[str]]) -> dict[str, Any]:
    """The U-Net's provenance; curves and constants are the reference run's (the network
    needs no AIF; they are shown for comparison)."""
    ref = json.loads((reference / "summary.json").read_text())
    return {"method": "unet", "fold": source["fold"],
            "checkpoints": [os.path.join(*Path(p).parts[-4:]) for p in source["models"]],
            "train_patients": trained,
            "constants": ref.get("constants", {"rho_g_per_ml": None, "kh": None}),
            "times_s": ref.get("times_s"), "aif": ref.get("aif"), "vof": ref.get("vof"),
            "curves_from": "reference NLR run (the U-Net uses no input function)",
            "qc": {}}


def _cnn_result(maps: Any, brain: Any, vessels: Any, lesion_options: LesionOptions) -> Any:
    """A :class:`ctperf.perfusion.PerfusionResult` of the U-Net's maps (``cbf`` and ``tmax``
    needed): lesions segmented as ``ctperf maps`` does, inside the reference's brain and
    outside its vessels."""
    import numpy as np

    from ctperf.perfusion import PerfusionResult, segment_lesions

    prov = dict(maps.provenance)
    # a poorly trained network may mark every voxel hypoperfused: the core's reference is
    # then the brain's median CBF, and the summary's thresholds say so
    lesions = segment_lesions(maps, brain=brain, exclude=vessels, options=lesion_options)
    prov["lesions"] = lesions.summary()
    times = np.asarray(prov.get("times_s") or [0.0], dtype=np.float64)
    aif = prov.get("aif") or {}
    vof = prov.get("vof") or {}
    return PerfusionResult(
        maps=maps.replace(provenance=prov), lesions=lesions, brain=brain, vessels=vessels,
        aif=np.asarray(aif.get("curve_hu") or np.zeros_like(times), dtype=np.float64),
        vof=np.asarray(vof["curve_hu"], dtype=np.float64) if vof.get("curve_hu") else None,
        times=times)
