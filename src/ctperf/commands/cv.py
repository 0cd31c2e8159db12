"""``ctperf cv COHORT OUT``: K-fold cross-validation of the U-Net over patients (Table 1)."""

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
                    "OUT/table1.csv and OUT/table1.md.")
    add_training_arguments(p)
    p.add_argument("--folds", type=count(2), default=3,
                   help="number of folds K, >= 2 [%(default)s]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.commands.train import check_run_folder, prepare, read_id_list
    from ctperf.io import mark_output

    check_run_folder(args, owned_by=("fold-0", "table1.csv"))
    from ctperf.model import cross_validate, format_table  # torch: once OUT is known usable
    cache, pretrain, config = prepare(args)
    mark_output(args.out)
    rows = cross_validate(cache, args.out, config, folds=args.folds,
                          test_patients=read_id_list(args.test), pretrain_cache=pretrain,
                          resume=args.resume, progress=True)
    print(format_table(rows, target="+".join(config.targets)), end="")
    print(f"saved {args.out / 'table1.csv'} and {args.out / 'table1.md'}")
    return 0
