"""``ctperf train COHORT OUT``: train the paper's U-Net on a cohort (phantom or UniToBrain layout).

Argument parsing plus one call to :func:`ctperf.workflow.training.train_cohort`; the options and
their conversion are shared with :mod:`ctperf.commands.cv`. Only argparse and the standard
library are imported at module level.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctperf.commands import (
    MAX_MATRIX,
    add_batch_size_option,
    add_device_option,
    add_workers_option,
    count,
    fraction,
    positive_float,
    positive_int,
    seed,
    show_progress,
)

__all__ = ["ORDER", "add_training_arguments", "register", "run", "train_config",
           "training_options"]

ORDER = 60
TARGETS = ("cbv", "cbf", "ttp", "delay", "mtt", "tmax")
#: The names of :data:`ctperf.model.PRESETS` (a test keeps them equal; torch stays unimported).
PRESETS = ("paper", "cpu")
log = logging.getLogger(__name__)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv``: ``--preset`` chooses the base configuration
    (:data:`ctperf.model.PRESETS`) and the options given explicitly override it."""
    p.add_argument("cohort", type=Path, help="cohort folder (phantom or UniToBrain layout)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="base configuration: 'paper' (the published network and schedule on the "
                        "studies' own grid and frames, a GPU job) or 'cpu' (a narrow network on "
                        "small slices of fewer frames, for a CPU); the options below override "
                        "it [%(default)s]")
    p.add_argument("--target", nargs="+", action="extend", choices=TARGETS, default=None,
                   help="map(s) to learn (default: the preset's); several (--target cbv cbf, "
                        "or the option repeated) give one multi-output model; 'ttp' is the "
                        "tissue time to peak (UniToBrain's NLR_TTP, which the paper's network "
                        "learned), 'delay' the box model's delay (NLR_Delay)")
    p.add_argument("--reference", choices=("nlr", "truth"), default="nlr",
                   help="target maps: box-model NLR (computed into OUT/references, reused by a "
                        "rerun) or the phantom's truth; a UniToBrain cohort brings its own NLR "
                        "maps [%(default)s]")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="input frames t (default: the preset's; all frames of the first study "
                        "with 'paper')")
    p.add_argument("--frame-mode", choices=("subsample", "resample"), default="subsample",
                   help="'subsample': arange(0, T, floor(T/t))[:t] as the authors; "
                        "'resample': interpolate onto a grid of --resample-interval s "
                        "[%(default)s]")
    p.add_argument("--resample-interval", type=positive_float, default=None, metavar="SECONDS",
                   help="grid step of --frame-mode resample, in s")
    p.add_argument("--size", type=count(1, MAX_MATRIX), default=None,
                   help="training slice size (default: the preset's; the studies' own with "
                        "'paper')")
    p.add_argument("--pretrain-size", type=count(0, MAX_MATRIX), default=None,
                   help="pretraining slice size (default: the preset's)")
    p.add_argument("--pretrain-epochs", type=count(0), default=None,
                   help="pretraining epochs (default: the preset's); skipped when "
                        "--pretrain-size >= --size")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs at full size (default: the preset's)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="filters at the first level (default: the preset's)")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="resolution levels (default: the preset's)")
    p.add_argument("--kernel", type=positive_int, default=None,
                   help="convolution kernel, 3 for 3 x 3 (default: the preset's)")
    p.add_argument("--norm", choices=("none", "batch", "group"), default=None,
                   help="normalisation after each convolution (default: the preset's)")
    add_batch_size_option(p, default=None,
                          what="slices per optimiser step (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: the preset's)")
    p.add_argument("--plateau-patience", type=count(0), default=None,
                   help="epochs without validation improvement before the plateau schedule "
                        "lowers the learning rate (default: the preset's)")
    p.add_argument("--whole-slice-loss", action="store_true",
                   help="the training loss (the preset's: MSE, or L1 for cpu) over the whole "
                        "slice instead of the brain mask")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="flips, small rotations, noise (default: the preset's)")
    p.add_argument("--augment-shift", type=count(0), default=None, metavar="FRAMES",
                   help="with --augment, networks of Tmax or delay only see each slice moved "
                        "in time by up to this many frames (default: the preset's)")
    p.add_argument("--test", type=Path, default=None,
                   help="text file of held-out patient ids (one per line), never trained on")
    p.add_argument("--cache", type=Path, default=None,
                   help="slice cache folder, e.g. one shared by several runs (a cache is "
                        "reused only while the cohort's files are unchanged); not inside the "
                        "cohort, not OUT itself (default: OUT/cache)")
    add_workers_option(p, what="patients read into the slice caches (threads, each holding "
                       "its study)", default="up to 4, one per CPU core")
    add_device_option(p, what="training and evaluation")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast (auto: bf16/fp16 on CUDA, none on CPU) [%(default)s]")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed of the weights, slice order, augmentation and patient "
                        "split [%(default)s]")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT")


#: --option dest -> TrainConfig field, for the options that override the preset when given.
_OVERRIDES = {"target": "targets", "frames": "frames", "size": "size",
              "pretrain_size": "pretrain_size", "pretrain_epochs": "pretrain_epochs",
              "epochs": "epochs", "width": "width", "depth": "depth", "kernel": "kernel_size",
              "norm": "norm", "batch_size": "batch_size", "lr": "lr",
              "plateau_patience": "plateau_patience", "augment": "augment",
              "augment_shift": "augment_shift"}


def train_config(args: argparse.Namespace) -> Any:
    """The :class:`ctperf.model.TrainConfig` of the command line: the preset, with the options
    given explicitly in its place."""
    from dataclasses import replace

    from ctperf.model import preset

    changes: dict[str, Any] = {field: getattr(args, dest) for dest, field in _OVERRIDES.items()
                               if getattr(args, dest) is not None}
    if "targets" in changes:
        changes["targets"] = tuple(changes["targets"])
    if args.whole_slice_loss:
        changes["masked_loss"] = False
    return replace(preset(args.preset), **changes, device=args.device, amp=args.amp,
                   seed=args.seed)


def training_options(args: argparse.Namespace, **extra: Any) -> Any:
    """The :class:`ctperf.workflow.training.TrainingOptions` of the command line."""
    from ctperf.errors import ValidationError
    from ctperf.workflow.training import TrainingOptions

    if args.resample_interval is not None and args.frame_mode != "resample":
        raise ValidationError("--resample-interval is the grid of --frame-mode resample: give "
                              "--frame-mode resample too, or leave it out")
    return TrainingOptions(reference=args.reference, frame_mode=args.frame_mode,
                           resample_interval=args.resample_interval, cache=args.cache,
                           test_list=args.test, resume=args.resume, progress=show_progress(),
                           cache_workers=args.workers, **extra)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train the U-Net (Gava et al. 2023) on a cohort",
        description="Train the paper's U-Net to map a CTP slice's frames to a perfusion map. "
                    "Writes OUT/last.pt (every epoch; --resume continues it), best.pt, model.pt "
                    "and log.csv, the NLR references in OUT/references and the slice caches in "
                    "OUT/cache (or --cache); the cohort is only read.")
    add_training_arguments(p)
    p.add_argument("--val-fraction", type=fraction, default=0.2,
                   help="fraction of patients (drawn with --seed) used for validation "
                        "[%(default)s]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow.training import train_cohort

    outcome = train_cohort(args.cohort, args.out, train_config(args),
                           training_options(args, val_fraction=args.val_fraction))
    print(outcome.message)
    return 0
