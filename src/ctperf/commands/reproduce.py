"""``ctperf reproduce COHORT OUT``: the paper's whole experiment on a phantom cohort or a
UniToBrain folder: argument parsing plus one call to
:func:`ctperf.workflow.reproduce.reproduce_cohort`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    METHOD_CHOICES,
    add_batch_size_option,
    add_device_option,
    add_preprocess_options,
    add_workers_option,
    check_filter_args,
    count,
    positive_int,
    seed,
    show_progress,
)

__all__ = ["ORDER", "add_reproduce_options", "register", "reproduce_options", "run"]

ORDER = 64


def add_reproduce_options(p: argparse.ArgumentParser) -> None:
    """The options of ``reproduce`` after COHORT and OUT (shared with ``demo --neural``)."""
    from ctperf.commands.train import PRESETS, TARGETS

    p.add_argument("--preset", choices=PRESETS, default="cpu",
                   help="U-Net configuration: 'cpu' (a narrow network on 64 x 64 slices of 44 "
                        "frames) or 'paper' (the published network and schedule on the "
                        "studies' own grid, a GPU job) [%(default)s]")
    p.add_argument("--target", nargs="+", action="extend", choices=TARGETS, default=None,
                   help="maps to learn (default: cbv cbf ttp tmax on a phantom, cbv cbf ttp "
                        "on UniToBrain); lesions of the U-Net's maps need cbf and tmax")
    p.add_argument("--one-network", action="store_true",
                   help="one network with one output per map instead of one network per map "
                        "(the paper's)")
    p.add_argument("--folds", type=count(2), default=3,
                   help="folds of the patient-level cross-validation, >= 2 [%(default)s]")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs at full size (default: the preset's)")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed of the weights, slice order, augmentation and folds "
                        "[%(default)s]")
    p.add_argument("--method", choices=METHOD_CHOICES,
                   default="nlr", help="reference method the U-Net learns (nlr: the paper's "
                   "Nelder-Mead box model) [%(default)s]")
    p.add_argument("--reference", choices=("nlr", "truth"), default="nlr",
                   help="target maps: the reference method's (--method) as the paper, or a "
                        "phantom's truth; the reference method's maps are computed either way, "
                        "for comparison and for the masks of the lesions [%(default)s]")
    add_preprocess_options(p, default=True)
    add_device_option(p, what="the box-model fits, training and prediction")
    add_batch_size_option(p, default=4, what="slices per forward pass when predicting")
    add_workers_option(p, what="studies preprocessed and fitted (and read into the slice "
                       "caches)", default="one per two CPU cores, so one process on 2 cores; "
                       "up to 4 for the caches")


def reproduce_options(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (TrainConfig, ReproduceOptions) of the command line."""
    from dataclasses import replace

    from ctperf.lesion_options import LesionOptions
    from ctperf.model import preset
    from ctperf.workflow.reproduce import ReproduceOptions

    check_filter_args(args, args.filter)
    config = replace(preset(args.preset), device=args.device, seed=args.seed,
                     **({"epochs": args.epochs} if args.epochs is not None else {}))
    options = ReproduceOptions(
        targets=None if args.target is None else tuple(args.target),
        per_map=not args.one_network, folds=args.folds, register=args.register,
        filter=args.filter, spatial_sigma_mm=args.spatial_sigma,
        range_sigma_hu=args.range_sigma, filter_weights=args.filter_weights,
        method=args.method, reference=args.reference, device=args.device,
        batch_size=args.batch_size,
        workers=args.workers, lesion_options=LesionOptions(), progress=show_progress())
    return config, options


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reproduce", help="the paper's whole experiment on a cohort, resumable",
        description="Reproduce Gava et al. 2023 on a phantom cohort (ctperf phantom) or a "
                    "UniToBrain folder: preprocessing (registration, bilateral filter), "
                    "box-model NLR references, patient-level cross-validation of the U-Net, "
                    "prediction of every subject by the fold model that never saw it, and the "
                    "evaluation (Tables 1 and 2, figures). Writes OUT/preprocessed/, OUT/nlr/ "
                    "and OUT/cnn/ (maps cohorts as `ctperf maps` writes them), OUT/cv/, "
                    "OUT/cache/, OUT/folds.json, OUT/evaluation/ and OUT/report.html; for a "
                    "phantom OUT/cohort links to the cohort. Running it again skips the steps "
                    "done (docs/reproduce.md).")
    p.add_argument("cohort", type=Path, help="phantom cohort or UniToBrain folder")
    p.add_argument("out", type=Path, help="output folder (new, or a previous run to continue)")
    add_reproduce_options(p)
    p.set_defaults(func=run)


# Sustained training throughputs for the paper preset's time estimate: a data-centre GPU in
# bf16 at a good and at a poor share of its peak (a range; docs/reproduce.md gives one GPU's
# measured rates, docs/results_unet_phantom.md the CPU's).
_GPU_FLOPS = (100e12, 20e12)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _paper_estimate(cohort: Path, config: Any, options: Any) -> str:
    """One line: the paper preset's training compute on ``cohort`` and its time on a GPU."""
    from ctperf.workflow.reproduce import training_compute

    c = training_compute(cohort, config, options)
    fast, slow = (_duration(c["flops"] / rate) for rate in _GPU_FLOPS)
    return (f"expected time (paper preset, a GPU job): {c['networks']} networks of "
            f"{c['flops_per_network'] / 1e15:.2f} PFLOP each ({c['slices']} slices, "
            f"{c['training_slices']:.0f} per training fold): {fast} to {slow} of training on "
            f"one GPU sustaining {_GPU_FLOPS[0] / 1e12:.0f} to {_GPU_FLOPS[1] / 1e12:.0f} "
            "TFLOP/s (a range: docs/reproduce.md has one GPU's rates; shared among the GPUs "
            "under torchrun), the slice caches, NLR references and other steps on top")


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow.reproduce import reproduce_cohort

    config, options = reproduce_options(args)
    if args.preset == "paper":
        print(_paper_estimate(args.cohort, config, options))
    outcome = reproduce_cohort(args.cohort, args.out, config, options, echo=print)
    print(outcome.message)
    print(f"wrote {outcome.report} (self-contained)"
          + ("" if outcome.computed else "; nothing left to compute"))
    return 0
