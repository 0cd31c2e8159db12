"""``ctperf train COHORT OUT``: train the paper's U-Net on a cohort (phantom or UniToBrain layout).

The helpers here (options shared with ``ctperf cv`` and the cache/schedule set-up) are imported by
:mod:`ctperf.commands.cv`. Only argparse and the standard library are imported at module level.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctperf.commands import (
    add_batch_size_option,
    add_device_option,
    count,
    fraction,
    positive_float,
    positive_int,
    seed,
)

__all__ = ["ORDER", "add_training_arguments", "check_run_folder", "prepare", "read_id_list",
           "register", "run", "train_config"]

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
    p.add_argument("--target", nargs="+", choices=TARGETS, default=None,
                   help="map(s) to learn (default: the preset's); several give one multi-output "
                        "model; 'ttp' is the tissue time to peak (the paper's TTP), 'delay' the "
                        "box model's delay")
    p.add_argument("--reference", choices=("nlr", "truth"), default="nlr",
                   help="target maps: box-model NLR (cached in sub-*/nlr) or the phantom's truth "
                        "[%(default)s]")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="input frames t (default: the preset's; all frames of the first study "
                        "with 'paper')")
    p.add_argument("--frame-mode", choices=("subsample", "resample"), default="subsample",
                   help="'subsample': arange(0, T, floor(T/t))[:t] as the authors; "
                        "'resample': interpolate onto a grid of --resample-interval s "
                        "[%(default)s]")
    p.add_argument("--resample-interval", type=positive_float, default=None, metavar="SECONDS",
                   help="grid step of --frame-mode resample, in s")
    p.add_argument("--size", type=positive_int, default=None,
                   help="training slice size (default: the preset's; the studies' own with "
                        "'paper')")
    p.add_argument("--pretrain-size", type=count(0), default=None,
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
                   help="MSE over the whole slice instead of the brain mask")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="flips, small rotations, noise (default: the preset's)")
    p.add_argument("--test", type=Path, default=None,
                   help="text file of held-out patient ids (one per line), never trained on")
    p.add_argument("--cache", type=Path, default=None,
                   help="slice cache folder (default: COHORT/.ctperf-cache)")
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
              "plateau_patience": "plateau_patience", "augment": "augment"}


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


def read_id_list(path: Path | None) -> list[str]:
    """Patient ids from a text file, one per line (blank lines and # comments ignored)."""
    from ctperf.errors import InputError

    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read the patient list ({exc.strerror})") from None
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def check_run_folder(args: argparse.Namespace, *, owned_by: tuple[str, ...]) -> None:
    """Refuse an OUT that is, holds or lies inside the cohort or the patient list, is the slice
    cache, or is a folder of other files (``owned_by``: files of an earlier run), before any
    work is done."""
    from ctperf.errors import InputError
    from ctperf.io import check_output

    check_output(args.out, inputs=(args.cohort, args.test), kind="extend", owned_by=owned_by)
    if args.cache is not None and args.cache.resolve() == args.out.resolve():
        raise InputError(args.out, "is the slice cache folder (--cache); choose another output")


def prepare(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The slice caches (final size, pretraining or None) and the run's
    :class:`ctperf.model.TrainConfig`; NLR references are computed into ``OUT/references``."""
    from dataclasses import replace

    from ctperf.errors import ValidationError
    from ctperf.model import build_slice_cache

    config = train_config(args)
    cache_root = args.cache or args.cohort / ".ctperf-cache"
    references = None
    if args.reference == "nlr":  # computed into OUT, never into the cohort; a rerun reuses them
        from ctperf.io import mark_output
        from ctperf.workflow import nlr_references

        mark_output(args.out)  # OUT is this run's from here on, even if a reference fails
        references = nlr_references(args.cohort, args.out / "references", progress=True)
    common = {"reference": args.reference, "references": references,
              "frame_mode": args.frame_mode, "frame_interval": args.resample_interval,
              "progress": True}
    cache = build_slice_cache(args.cohort, cache_root, size=config.size, frames=config.frames,
                              **common)
    config = replace(config, size=cache.size, frames=cache.n_frames)
    if config.pretrain_epochs > 0 and config.pretrain_size >= cache.size:
        log.warning("pretraining skipped: --pretrain-size %d is not below the training size "
                    "%d", config.pretrain_size, cache.size)
        config = replace(config, pretrain_epochs=0)
    if config.pretrain_epochs > 0 and config.pretrain_size < 1:
        raise ValidationError("--pretrain-epochs needs a --pretrain-size of 1 or more")
    pretrain = None
    if config.pretrain_epochs > 0:
        pretrain = build_slice_cache(args.cohort, cache_root, size=config.pretrain_size,
                                     frames=cache.n_frames, **common)
    return cache, pretrain, config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train the U-Net (Gava et al. 2023) on a cohort",
        description="Train the paper's U-Net to map a CTP slice's frames to a perfusion map. "
                    "Writes OUT/last.pt (every epoch; --resume continues it), best.pt, model.pt "
                    "and log.csv.")
    add_training_arguments(p)
    p.add_argument("--val-fraction", type=fraction, default=0.2,
                   help="fraction of patients (drawn with --seed) used for validation "
                        "[%(default)s]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctperf.errors import ValidationError
    from ctperf.io import mark_output

    if not 0 <= args.val_fraction < 1:
        raise ValidationError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    check_run_folder(args, owned_by=("last.pt",))
    from ctperf.model import train  # torch: only once the arguments are known to be usable
    cache, pretrain, config = prepare(args)
    test = set(read_id_list(args.test))
    pool = sorted(set(cache.patient_ids) - test)
    order = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))]
    n_val = round(args.val_fraction * len(pool))
    if n_val >= len(pool):
        raise ValidationError(f"{len(pool)} patients leave none for training")
    val, tr = sorted(order[:n_val]), sorted(order[n_val:])
    mark_output(args.out)
    result = train(cache, args.out, config, train_patients=tr, val_patients=val,
                   pretrain_cache=pretrain, resume=args.resume, progress=True)
    last = result.history[-1]
    print(f"trained {'+'.join(config.targets)} on {len(tr)} patients ({len(val)} validation): "
          f"final train MSE {last['train_loss']:.4f}, validation MSE {last['val_loss']:.4f} "
          f"-> {result.model_path}")
    return 0
