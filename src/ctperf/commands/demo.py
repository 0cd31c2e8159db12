"""``ctperf demo [OUT]``: the whole model-based pipeline on a digital phantom with known truth."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    MAX_MATRIX,
    METHOD_CHOICES,
    add_overwrite_option,
    add_preprocess_options,
    check_filter_args,
    count,
    seed,
    show_progress,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 0

#: The model-based demo's options and defaults; ``--neural`` runs a cohort of its own and
#: refuses them when changed (they had been ignored in silence).
_STUDY_DEFAULTS = {"size": 256, "slices": 8, "frames": 89, "motion": "none",
                   "method": "nlr-fast"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="end-to-end run on a digital phantom, scored against its true maps",
        description="Simulate a stroke CTP study with known perfusion (digital phantom), "
                    "preprocess it as the paper did (rigid motion correction of every frame to "
                    "the first, bilateral filter guided by the temporal mean; with --method "
                    "bayes not filtered unless asked: its spatial prior pools the neighbours), "
                    "compute the maps (box-model NLR unless --method) and lesions, and score "
                    "them against the truth. "
                    "Writes OUT/phantom/ (study, true maps, masks, preview.png), OUT/maps/ (as "
                    "`ctperf maps`), OUT/evaluation.json, OUT/comparison.png, OUT/report.md and "
                    "OUT/report.html (one self-contained file).")
    p.add_argument("out", type=Path, nargs="?", default=None,
                   help="output folder [ctperf-demo; ctperf-demo-neural with --neural]")
    p.add_argument("--neural", action="store_true",
                   help="the paper's neural experiment instead: a small phantom cohort into "
                        "OUT/cohort (24 subjects of 64 x 64 x 4 x 89, no motion), then `ctperf "
                        "reproduce` on it with the cpu preset (filtered, not registered: "
                        "nothing moves); --seed and --filter/--no-filter apply, the other "
                        "options do not (docs/reproduce.md)")
    p.add_argument("--size", type=count(32, MAX_MATRIX), default=_STUDY_DEFAULTS["size"],
                   help="in-plane pixels over a 230 mm field of view, >= 32 [%(default)s; "
                        "scanners give 512]")
    p.add_argument("--slices", type=count(1), default=_STUDY_DEFAULTS["slices"],
                   help="5 mm slices [%(default)s]")
    p.add_argument("--frames", type=count(30), default=_STUDY_DEFAULTS["frames"],
                   help="frames 0.5 s apart, >= 30 [%(default)s]")
    p.add_argument("--seed", type=seed, default=3, help="phantom seed [%(default)s]")
    p.add_argument("--motion", choices=("none", "mild", "severe", "realistic"),
                   default=_STUDY_DEFAULTS["motion"],
                   help="simulated head motion (realistic: drawn as a cohort's) [%(default)s]")
    p.add_argument("--method", choices=METHOD_CHOICES,
                   default=_STUDY_DEFAULTS["method"], help="perfusion method [%(default)s]")
    add_preprocess_options(p, default=True, filter_by_method=True)
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.filter_options import filters_by_default
    from ctperf.workflow.demo import DemoOptions, run_demo

    if args.neural:
        return _run_neural(args)
    check_filter_args(args, filters_by_default(args.method) if args.filter is None
                      else args.filter)
    args.out = args.out or Path("ctperf-demo")

    options = DemoOptions(size=args.size, slices=args.slices, frames=args.frames,
                          seed=args.seed, motion=args.motion, method=args.method,
                          register=args.register, filter=args.filter,
                          spatial_sigma_mm=args.spatial_sigma, range_sigma_hu=args.range_sigma,
                          filter_weights=args.filter_weights, overwrite=args.overwrite,
                          progress=show_progress())
    outcome = run_demo(args.out, options, echo=print)
    print(outcome.message)
    print(f"wrote {args.out}/report.html (self-contained), report.md, comparison.png, maps/ "
          "and phantom/")
    return 0


def _run_neural(args: argparse.Namespace) -> int:
    from ctperf.errors import ValidationError
    from ctperf.workflow.reproduce import NeuralDemoOptions, ReproduceOptions, run_neural_demo

    changed = [f"--{k}" for k, v in _STUDY_DEFAULTS.items() if getattr(args, k) != v]
    changed += ["--overwrite"] * bool(args.overwrite)  # a rerun continues what is done
    if changed:
        raise ValidationError(f"{', '.join(changed)} do not apply to --neural (its cohort is "
                              "24 subjects of 64 x 64 x 4 x 89, no motion, not registered; "
                              "docs/reproduce.md); --seed and --filter/--no-filter do")
    check_filter_args(args, args.filter is not False)
    import ctperf.model  # noqa: F401  (without PyTorch: refused before a time is promised)

    out = args.out or Path("ctperf-demo-neural")
    options = NeuralDemoOptions(seed=args.seed, reproduce=ReproduceOptions(
        register=False, filter=args.filter is not False, spatial_sigma_mm=args.spatial_sigma,
        range_sigma_hu=args.range_sigma, filter_weights=args.filter_weights, workers=1,
        progress=show_progress()))
    print("expected time: about 11 minutes on a 2-core CPU, measured once "
          "(docs/reproduce.md)")
    outcome = run_neural_demo(out, options, echo=print)
    print(outcome.message)
    print(f"wrote {outcome.report} (self-contained)")
    return 0
