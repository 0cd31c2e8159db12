"""``ctperf cv COHORT OUT``: K-fold cross-validation of the U-Net over patients (Table 1):
argument parsing plus one call to :func:`ctperf.workflow.training.cross_validate_cohort`."""

from __future__ import annotations

import argparse
from typing import Any

from ctperf.commands import count

__all__ = ["ORDER", "register", "run"]

ORDER = 61


def register(subparsers: Any) -> None:
    from ctperf.commands.train import add_training_arguments

    p = subparsers.add_parser(
        "cv", help="cross-validate the U-Net over patients (the paper's Table 1)",
        description="Train one U-Net per fold (folds over patients, never slices) and print and "
                    "save the per-fold train and validation MSE on [0, 1] maps, mean +- SD, as "
                    "OUT/table1.csv and OUT/table1.md; NLR references go to OUT/references and "
                    "the slice caches to OUT/cache (or --cache).")
    add_training_arguments(p)
    p.add_argument("--folds", type=count(2), default=3,
                   help="number of folds K, >= 2 [%(default)s]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.commands.train import train_config, training_options
    from ctperf.workflow.training import cross_validate_cohort

    outcome = cross_validate_cohort(args.cohort, args.out, train_config(args),
                                    training_options(args), folds=args.folds)
    print(outcome.message)
    return 0
