"""``ctperf maps STUDY OUT --method M``: model-based perfusion maps, lesions, QC and an overview."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    COHORT_WORKERS,
    METHOD_CHOICES,
    add_anonymise_option,
    add_brain_mask_option,
    add_cohort_options,
    add_constants_options,
    add_device_option,
    add_overwrite_option,
    add_preprocess_options,
    add_study_options,
    add_workers_option,
    float_in,
    fraction,
    non_negative_float,
    preprocess_step_options,
    run_study_command,
    study_io_options,
)
from ctperf.errors import ValidationError
from ctperf.lesion_options import MAX_SMOOTH_MM, REFERENCES, TMAX_RANGE_S, LesionOptions

__all__ = ["ORDER", "maps_options", "register", "run"]

ORDER = 20


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "maps", help="model-based perfusion maps (box-model NLR, SVD or Bayesian), lesions and QC",
        description="Compute CBF, CBV, MTT, TTP, Tmax and delay maps of a study (DICOM folder or "
                    "4D NIfTI) and write OUT/<name>.nii.gz, OUT/lesions/<mask>.nii.gz (core, "
                    "hypoperfused, penumbra, tmax10, brain, vessels), OUT/summary.json (method, "
                    "constants, AIF/VOF voxels and curves, lesion volumes, QC flags), "
                    "OUT/overview.png and, where the AIF or VOF was chosen automatically, "
                    "OUT/vessels.png (their voxels on the CBV map). OUT is checked before "
                    "the study is read: it must not be or hold the study, and an existing "
                    "OUT is replaced only when ctperf wrote it (or with --overwrite).")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study (with --cohort: a "
                                            "folder of studies)")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done; with "
                                          "--cohort: OUT/<study>/ each)")
    add_overwrite_option(p)
    p.add_argument("--method", choices=METHOD_CHOICES,
                   default="nlr-fast", help="box-model NLR (nlr: the paper's Nelder-Mead; "
                   "nlr-fast: grid + Levenberg-Marquardt), SVD deconvolution, or bayes "
                   "(posterior over residue shapes with a neighbourhood prior; also writes "
                   "<map>_sd.nii.gz uncertainty maps) [%(default)s]")
    p.add_argument("--aif-mask", type=Path, default=None, help="3D NIfTI of arterial voxels")
    p.add_argument("--vof-mask", type=Path, default=None, help="3D NIfTI of venous voxels")
    add_brain_mask_option(p, vessels=True)
    p.add_argument("--dicom", action="store_true", help="also write DICOM maps in OUT/dicom")
    add_anonymise_option(p)
    add_study_options(p)
    add_preprocess_options(p, default=False)
    add_workers_option(p, what="frames registered (with --cohort: studies, as Dask worker "
                               "processes)",
                       default=f"one per CPU core; {COHORT_WORKERS}")
    add_cohort_options(p)
    add_device_option(p, what="the box-model fits")
    add_constants_options(p)
    p.add_argument("--core-cbv", type=float_in(0.1, 10.0, "--core-cbv (mL/100g)"), default=None,
                   metavar="ML",
                   help="define the core as CBV below ML mL/100g instead of the relative CBF "
                        "threshold (--core-rcbf)")
    p.add_argument("--core-rcbf", type=fraction, default=None,
                   help=f"core rCBF threshold, a fraction of normal tissue "
                        f"[{LesionOptions.core_rcbf}]")
    p.add_argument("--core-reference", choices=REFERENCES, default=None,
                   help="normal CBF of the core's rCBF: normally perfused tissue mirrored "
                        "across the midline (where the mirror is hypoperfused too, the "
                        "median of all normally perfused brain: QC core_off_mirror), "
                        "or that median everywhere (mostly white matter's flow: grey "
                        f"matter's core reads smaller) [{LesionOptions.reference}]")
    p.add_argument("--tmax", type=float_in(*TMAX_RANGE_S, "--tmax (s)"),
                   default=LesionOptions.tmax_hypo,
                   help="hypoperfusion Tmax threshold s (the tmax10 mask keeps its 10 s) "
                        "[%(default)s]")
    p.add_argument("--lesion-smooth", type=float_in(0.0, MAX_SMOOTH_MM, "--lesion-smooth (mm)"),
                   default=LesionOptions.smooth_mm,
                   metavar="MM", help="radius of an in-plane median filter on the maps before "
                   "the lesion thresholds, 0-20 [%(default)s]")
    p.add_argument("--min-lesion", type=non_negative_float,
                   default=LesionOptions.min_component_ml, metavar="ML",
                   help="drop lesion pieces smaller than ML mL [%(default)s]")
    p.set_defaults(func=run)


def maps_options(args: argparse.Namespace) -> Any:
    """The :class:`~ctperf.workflow.MapsOptions` of parsed ``ctperf maps`` arguments."""
    from ctperf.workflow import MapsOptions

    rcbf = {"--core-rcbf": args.core_rcbf, "--core-reference": args.core_reference}
    if args.core_cbv is not None and (given := [k for k, v in rcbf.items() if v is not None]):
        raise ValidationError(f"--core-cbv defines the core by CBV alone: {' and '.join(given)} "
                              "(the relative-CBF rule's) would be ignored; give one rule")
    lesions = LesionOptions(core_rcbf=LesionOptions.core_rcbf if args.core_rcbf is None
                            else args.core_rcbf, core_cbv=args.core_cbv,
                            tmax_hypo=args.tmax, smooth_mm=args.lesion_smooth,
                            min_component_ml=args.min_lesion,
                            reference=args.core_reference or LesionOptions.reference)
    return MapsOptions(method=args.method, aif_mask=args.aif_mask, vof_mask=args.vof_mask,
                       brain_mask=args.brain_mask, rho=args.rho, kh=args.kh, device=args.device,
                       lesion_options=lesions, **preprocess_step_options(args),
                       **study_io_options(args))


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow import maps_study

    return run_study_command(args, maps_study, maps_options(args))
