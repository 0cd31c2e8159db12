"""``ctperf train COHORT OUT``: train the paper's U-Net on a cohort (phantom or UniToBrain layout).

The helpers here (options shared with ``ctperf cv`` and the cache/schedule set-up) are imported by
:mod:`ctperf.commands.cv`. Only argparse and the standard library are imported at module level.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctperf.commands import count, fraction, positive_float, positive_int, seed

__all__ = ["ORDER", "add_training_arguments", "check_run_folder", "prepare", "read_id_list",
           "register", "run"]

ORDER = 60
TARGETS = ("cbv", "cbf", "ttp", "delay", "mtt", "tmax")
logger = logging.getLogger(__name__)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv`` (defaults are the paper's)."""
    p.add_argument("cohort", type=Path, help="cohort folder (phantom or UniToBrain layout)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--target", nargs="+", choices=TARGETS, default=["cbv"],
                   help="map(s) to learn; several give one multi-output model; 'ttp' is the "
                        "tissue time to peak (the paper's TTP), 'delay' the box model's delay")
    p.add_argument("--reference", choices=("nlr", "truth"), default="nlr",
                   help="target maps: box-model NLR (cached in sub-*/nlr) or the phantom's truth")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="input frames t (default: all frames of the first study)")
    p.add_argument("--frame-mode", choices=("subsample", "resample"), default="subsample",
                   help="'subsample': arange(0, T, floor(T/t))[:t] as the authors; "
                        "'resample': interpolate onto a grid of --frame-interval s")
    p.add_argument("--frame-interval", type=positive_float, default=None,
                   help="grid step in s")
    p.add_argument("--size", type=positive_int, default=None,
                   help="training slice size (default: the studies' own, 512 in the paper)")
    p.add_argument("--pretrain-size", type=positive_int, default=128, help="pretraining size [128]")
    p.add_argument("--pretrain-epochs", type=count(0), default=250,
                   help="pretraining epochs [250]; skipped when --pretrain-size >= --size")
    p.add_argument("--epochs", type=positive_int, default=50, help="epochs at full size [50]")
    p.add_argument("--width", type=positive_int, default=64, help="filters at the first level [64]")
    p.add_argument("--depth", type=positive_int, default=5, help="resolution levels [5]")
    p.add_argument("--kernel", type=positive_int, default=2,
                   help="convolution kernel [2]; 3 for 3 x 3")
    p.add_argument("--norm", choices=("none", "batch", "group"), default="none",
                   help="normalisation after each convolution [none, as the paper]")
    p.add_argument("--batch", type=positive_int, default=8, help="batch size [8]")
    p.add_argument("--lr", type=positive_float, default=1e-5, help="Adam learning rate [1e-5]")
    p.add_argument("--plateau-patience", type=count(0), default=10,
                   help="epochs without validation improvement before the LR is halved [10]")
    p.add_argument("--whole-slice-loss", action="store_true",
                   help="MSE over the whole slice instead of the brain mask")
    p.add_argument("--augment", action="store_true", help="flips, small rotations, noise")
    p.add_argument("--test", type=Path, default=None,
                   help="text file of held-out patient ids (one per line), never trained on")
    p.add_argument("--cache", type=Path, default=None,
                   help="slice cache folder [COHORT/.ctperf-cache]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast (auto: bf16/fp16 on CUDA, none on CPU)")
    p.add_argument("--seed", type=seed, default=0, help="random seed [0]")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT")


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


def prepare(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Build the slice caches and the keyword arguments of :func:`ctperf.model.train`."""
    from ctperf.model import build_slice_cache

    cache_root = args.cache or args.cohort / ".ctperf-cache"
    common = {"reference": args.reference, "frame_mode": args.frame_mode,
              "frame_interval": args.frame_interval, "progress": True}
    cache = build_slice_cache(args.cohort, cache_root, size=args.size, frames=args.frames,
                              **common)
    pretrain = None
    epochs_pre = args.pretrain_epochs
    if epochs_pre > 0 and args.pretrain_size >= cache.size:
        logger.warning("pretraining skipped: --pretrain-size %d is not below the training size "
                       "%d", args.pretrain_size, cache.size)
        epochs_pre = 0
    if epochs_pre > 0:
        pretrain = build_slice_cache(args.cohort, cache_root, size=args.pretrain_size,
                                     frames=cache.n_frames, **common)
    options = {"targets": args.target, "epochs": args.epochs, "pretrain_cache": pretrain,
               "pretrain_epochs": epochs_pre, "width": args.width, "depth": args.depth,
               "kernel_size": args.kernel, "norm": args.norm, "batch_size": args.batch,
               "lr": args.lr, "plateau_patience": args.plateau_patience,
               "masked_loss": not args.whole_slice_loss, "augment": args.augment,
               "device": args.device, "amp": args.amp, "resume": args.resume,
               "progress": True}
    return cache, pretrain, options


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train the U-Net (Gava et al. 2023) on a cohort",
        description="Train the paper's U-Net to map a CTP slice's frames to a perfusion map. "
                    "Writes OUT/last.pt (every epoch; --resume continues it), best.pt, model.pt "
                    "and log.csv.")
    add_training_arguments(p)
    p.add_argument("--val-fraction", type=fraction, default=0.2,
                   help="fraction of patients (drawn with --seed) used for validation [0.2]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctperf.errors import ValidationError
    from ctperf.io import mark_output

    if not 0 <= args.val_fraction < 1:
        raise ValidationError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    check_run_folder(args, owned_by=("last.pt",))
    from ctperf.model import train  # torch: only once the arguments are known to be usable
    cache, _, options = prepare(args)
    test = set(read_id_list(args.test))
    pool = sorted(set(cache.patient_ids) - test)
    order = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))]
    n_val = round(args.val_fraction * len(pool))
    if n_val >= len(pool):
        raise ValidationError(f"{len(pool)} patients leave none for training")
    val, tr = sorted(order[:n_val]), sorted(order[n_val:])
    mark_output(args.out)
    result = train(cache, args.out, train_patients=tr, val_patients=val, seed=args.seed,
                   **options)
    last = result.history[-1]
    print(f"trained {'+'.join(args.target)} on {len(tr)} patients ({len(val)} validation): "
          f"final train MSE {last['train_loss']:.4f}, validation MSE {last['val_loss']:.4f} "
          f"-> {result.model_path}")
    return 0
