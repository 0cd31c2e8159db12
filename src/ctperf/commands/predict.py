"""``ctperf predict STUDY OUT --model CKPT``: perfusion maps from a trained U-Net."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    COHORT_WORKERS,
    add_anonymise_option,
    add_batch_size_option,
    add_brain_mask_option,
    add_cohort_options,
    add_device_option,
    add_overwrite_option,
    add_study_options,
    add_workers_option,
    run_study_command,
    study_io_options,
)

__all__ = ["ORDER", "predict_options", "register", "run"]

ORDER = 62


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="perfusion maps of a study from a trained U-Net",
        description="Run a trained U-Net on every slice of a study (DICOM folder or 4D NIfTI) "
                    "and write the maps in physical units as OUT/<name>.nii.gz (0 outside the "
                    "brain mask) plus OUT/summary.json; no lesions (ctperf reproduce segments "
                    "the U-Net's maps inside its references' brain and vessel masks). The "
                    "network sees the study as its training studies were: one sampled at "
                    "another rate or unevenly is resampled to their frame spacing, one shorter "
                    "than 90 % of their time window (or of the shortest of them, where the "
                    "checkpoint records it; of half the window where not) is refused, one of "
                    "another matrix is refused "
                    "unless --resize, one stored with rows or columns reversed is turned, one "
                    "on an HU scale offset by tens of HU is moved back; one begun after its "
                    "bolus arrived, with no bolus or no brain, or with a blanked slice is "
                    "refused. Its preprocessing (filter, registration) is not checked: give "
                    "it preprocessed as the training studies were. A study "
                    "whose pixels, at the network's input size, differ by more than 20 % from "
                    "the training studies', or whose bolus arrives more than 1 s (or the time "
                    "shifts the network trained with, when wider) outside their arrivals "
                    "(counted from its first frame), is predicted with a warning that "
                    "its maps are unreliable, in the log and the maps' provenance.")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study (with --cohort: a "
                                            "folder of studies)")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done; with "
                                          "--cohort: OUT/<study>/ each)")
    add_overwrite_option(p)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt or best.pt)")
    p.add_argument("--dicom", action="store_true", help="also write DICOM maps in OUT/dicom")
    add_anonymise_option(p)
    add_study_options(p)
    add_brain_mask_option(p)
    p.add_argument("--resize", action="store_true",
                   help="resample slices of another size to the model's training size")
    add_device_option(p, what="the U-Net's forward passes")
    add_batch_size_option(p, default=4, what="slices per forward pass")
    add_cohort_options(p)
    add_workers_option(p, what="with --cohort, studies predicted", default=COHORT_WORKERS)
    p.set_defaults(func=run)


def predict_options(args: argparse.Namespace) -> Any:
    """The :class:`~ctperf.workflow.PredictOptions` of parsed ``ctperf predict`` arguments."""
    from ctperf.workflow import PredictOptions

    return PredictOptions(model=args.model, device=args.device, batch_size=args.batch_size,
                          resize=args.resize, brain_mask=args.brain_mask,
                          **study_io_options(args))


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow import predict_study

    return run_study_command(args, predict_study, predict_options(args))
