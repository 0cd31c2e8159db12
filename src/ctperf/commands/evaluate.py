"""``ctperf evaluate PRED REF OUT``: the paper's Tables 1 and 2, figures and an HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ctperf.commands import add_overwrite_option, count

__all__ = ["ORDER", "register", "run"]

ORDER = 63


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="compare two maps cohorts: Tables 1 and 2, figures, an HTML report",
        description="Compare the maps and lesions of PRED with REF (each a folder with one "
                    "sub-folder per study, as `ctperf maps` writes it; a phantom cohort also "
                    "serves as REF or --truth). Writes OUT/table1.csv (MSE in the paper's "
                    "min-max normalisation and in ctperf's windows, PSNR, SSIM, MAE, bias, RMSE, "
                    "Pearson r, Lin's CCC per map), OUT/table2.csv (Dice, volumes, Pearson r, "
                    "Bland-Altman, coefficient of repeatability, ICC(1,k) per lesion), "
                    "OUT/evaluation.json, OUT/figures/ and OUT/report.html (one self-contained "
                    "file). Map folders without lesions/ (e.g. from `ctperf predict`) get "
                    "lesions segmented from their cbf and tmax maps with the rules REF's "
                    "lesions of the same study were made with (its summary.json), else with "
                    "the defaults of `ctperf maps`.")
    p.add_argument("pred", type=Path, help="maps cohort to evaluate (e.g. U-Net predictions)")
    p.add_argument("ref", type=Path, help="reference maps cohort (e.g. box-model NLR)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--truth", type=Path, default=None, metavar="COHORT",
                   help="phantom cohort: every method is also compared with its true maps")
    p.add_argument("--raters", type=Path, nargs="+", default=[], metavar="DIR",
                   help="manual segmentations, one folder per rater: <study>/<lesion>.nii.gz "
                        "masks or an ITK-SNAP label image <study>.nii.gz (1 core, 2 penumbra)")
    p.add_argument("--compare", type=Path, nargs="+", default=[], metavar="MAPS_COHORT",
                   help="further maps cohorts compared like PRED (three or more readers add "
                        "Friedman tests of lesion volumes)")
    p.add_argument("--train-log", type=Path, default=None, metavar="CSV",
                   help="log.csv of `ctperf train` for training curves [PRED/log.csv if present]")
    p.add_argument("--map-figures", type=count(0), default=6, metavar="N",
                   help="studies shown as map figures, the first N by name [%(default)s]")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.evaluation.report import evaluate_cohorts
    from ctperf.lesion_options import LesionOptions

    inputs = [args.pred, args.ref, args.truth, *args.raters, *args.compare, args.train_log]
    io.check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    doc = evaluate_cohorts(args.pred, args.ref, args.out, truth=args.truth, raters=args.raters,
                           compare=args.compare, train_log=args.train_log,
                           overwrite=args.overwrite, max_map_figures=args.map_figures,
                           lesion_options=LesionOptions())
    labels = ", ".join(r["label"] for r in doc["readers"])
    n = len(doc["studies"])
    print(f"evaluated {n} stud{'y' if n == 1 else 'ies'} ({labels}); wrote {args.out}/report.html, "
          "table1.csv, table2.csv, evaluation.json, figures/")
    for study, why in doc["excluded_studies"].items():
        print(f"left out {study}: {why}", file=sys.stderr)
    if doc["warnings"]:
        print(f"{len(doc['warnings'])} warning(s) in the report, e.g. {doc['warnings'][0]}",
              file=sys.stderr)
    return 0
