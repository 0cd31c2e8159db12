"""``ctperf preprocess STUDY OUT``: motion correction and joint bilateral filtering of a study."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    COHORT_WORKERS,
    add_anonymise_option,
    add_cohort_options,
    add_overwrite_option,
    add_preprocess_options,
    add_study_options,
    add_workers_option,
    preprocess_step_options,
    run_study_command,
    study_io_options,
)

__all__ = ["ORDER", "preprocess_options", "register", "run"]

ORDER = 30


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "preprocess", help="register every frame to the first and filter (as in Gava 2023)",
        description="Rigid motion correction of every frame to the first (SimpleITK, two "
                    "resolution levels, mean squares, 2,000/8,000 random samples, 300 "
                    "iterations) and a 3D bilateral filter guided by the temporal mean "
                    "(--spatial-sigma, --range-sigma). Writes OUT/study.nii.gz (+ study.json), "
                    "OUT/transforms.json, OUT/qc.json, OUT/qc.png and, with --dicom, "
                    "OUT/dicom/. OUT must not be or hold the study; an existing OUT is replaced "
                    "only when ctperf wrote it (or with --overwrite).")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study (with --cohort: a "
                                            "folder of studies)")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done; with "
                                          "--cohort: OUT/<study>/ each)")
    add_overwrite_option(p)
    p.add_argument("--dicom", action="store_true", help="also write OUT/dicom/ (int16 HU)")
    add_anonymise_option(p)
    add_workers_option(p, what="frames registered (with --cohort: studies, as Dask worker "
                               "processes)",
                       default=f"one per CPU core; {COHORT_WORKERS}")
    add_cohort_options(p)
    add_study_options(p)
    add_preprocess_options(p, default=True)
    p.set_defaults(func=run)


def preprocess_options(args: argparse.Namespace) -> Any:
    """The :class:`~ctperf.workflow.PreprocessOptions` of parsed ``ctperf preprocess``
    arguments."""
    from ctperf.workflow import PreprocessOptions

    return PreprocessOptions(**preprocess_step_options(args), **study_io_options(args))


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow import preprocess_study

    return run_study_command(args, preprocess_study, preprocess_options(args))
