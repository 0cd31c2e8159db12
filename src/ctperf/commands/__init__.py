"""CLI subcommands, one module each, and the option helpers they share.

Every module defines ``ORDER`` (its place in ``ctperf --help``) and ``register(subparsers)``, which
adds its parser and sets ``func`` to a ``run(args) -> int`` function. Modules import only argparse
and the standard library at top level; heavy imports happen inside ``run`` so ``--help`` is instant.

Numbers are checked while the command line is parsed, with one type helper per idea (a count, a
positive quantity, a fraction, a value in a plausible range), so a bad value ends in argparse's
one-line error and exit code 2 before anything is read or written.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_MATRIX",
    "METHOD_CHOICES",
    "add_anonymise_option",
    "add_batch_size_option",
    "add_brain_mask_option",
    "add_cohort_options",
    "add_constants_options",
    "add_device_option",
    "add_filter_options",
    "add_overwrite_option",
    "add_preprocess_options",
    "add_scheduler_option",
    "add_study_options",
    "add_workers_option",
    "check_filter_args",
    "count",
    "device",
    "float_in",
    "fraction",
    "frame_interval",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "run_study_command",
    "seed",
    "show_progress",
]


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def show_progress() -> bool:
    """Whether a command draws progress bars: only when stderr is a terminal, so that a log
    file it is piped into holds messages, not a bar redrawn hundreds of times."""
    return sys.stderr.isatty()


def count(least: int = 1, most: int | None = None) -> Callable[[str], int]:
    """Argparse type: a whole number >= ``least`` (frames, epochs, batch size, workers...), and
    <= ``most`` where one is given (a matrix's pixels)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < least or (most is not None and value > most):
            bound = f">= {least}" if most is None else f"between {least} and {most}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text!r}")
        return int(value)

    parse.__name__ = f"count>={least}"
    return parse


#: The largest matrix (pixels across) a phantom, a demo or a network's slices may have: CT
#: reconstructs at most 1024.
MAX_MATRIX = 1024


#: Argparse type: a whole number >= 1.
positive_int = count(1)


#: Argparse type: a random seed, a whole number >= 0.
seed = count(0)


def positive_float(text: str) -> float:
    """Argparse type: a finite number > 0 (intervals, sigmas, learning rates, thresholds)."""
    value = float(_number(text, float))
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Argparse type: a finite number >= 0 (sizes where 0 switches a step off)."""
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """Argparse type: a number in [0, 1]."""
    value = float(_number(text, float))
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def float_in(low: float, high: float, what: str) -> Callable[[str], float]:
    """Argparse type: a finite number in the plausible range [``low``, ``high``] of ``what``."""
    def parse(text: str) -> float:
        value = float(_number(text, float))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low:g} and {high:g}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = what
    return parse


def frame_interval(text: str) -> float:
    """Argparse type: seconds between frames, in the range the study readers accept
    (:data:`ctperf.io.integrity.FRAME_STEP_RANGE_S`; 500 is milliseconds typed as seconds)."""
    from ctperf.io.integrity import FRAME_STEP_RANGE_S

    lo, hi = FRAME_STEP_RANGE_S
    value = float(_number(text, float))
    if not lo <= value <= hi:
        hint = " (milliseconds given as seconds?)" if value > hi and value / 1000 >= lo else ""
        raise argparse.ArgumentTypeError(f"seconds between frames must be between {lo:g} and "
                                         f"{hi:g}, got {text!r}{hint}")
    return value


def device(text: str) -> str:
    """Argparse type: where tensors live: ``auto`` (a GPU when PyTorch sees one), ``cpu``,
    ``cuda`` or ``cuda:N``."""
    value = text.strip().lower()
    head, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def add_device_option(parser: Any, *, what: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N, for ``what`` (e.g. "the box-model fits")."""
    parser.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                        help=f"where {what} run: auto (a GPU when PyTorch sees one, else the "
                             "CPU), cpu, cuda or cuda:N [%(default)s]")


def add_batch_size_option(parser: Any, *, default: int | None, what: str) -> None:
    """``--batch-size N``: slices per optimiser step or per forward pass (``what``); None: no
    default of its own (``what`` says where the value comes from)."""
    parser.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                        help=what if default is None else f"{what} [%(default)s]")


#: What ``--workers`` defaults to when it counts studies of a cohort (Dask worker processes).
COHORT_WORKERS = "with --cohort, one per two CPU cores, so one process on 2 cores"


def add_workers_option(parser: Any, *, what: str, default: str = "one per CPU core") -> None:
    """``--workers N``: how many ``what`` run at once; ``default`` says what None means."""
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help=f"{what} at once [{default}]")


def add_scheduler_option(parser: Any) -> None:
    """``--scheduler ADDRESS``: run a cohort's studies on an existing Dask cluster."""
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="address of a running Dask scheduler (tcp://host:port) whose "
                             "workers run the studies, instead of a local cluster; they must "
                             "see the input and output at the same paths (docs/cohorts.md)")


def add_cohort_options(parser: Any) -> None:
    """``--cohort`` (STUDY is a folder of studies, OUT gets one folder per study and a
    manifest) and ``--scheduler``; ``--workers`` is added by the command."""
    parser.add_argument("--cohort", action="store_true",
                        help="STUDY is a folder of studies (sub-folders or 4D NIfTI files): "
                             "run them all in parallel on Dask into OUT/<study>/, with "
                             "OUT/manifest.json; a rerun skips studies done (docs/cohorts.md)")
    add_scheduler_option(parser)


def run_study_command(args: argparse.Namespace, task: Callable[..., Any], options: Any) -> int:
    """Run ``task`` (a per-study function of :mod:`ctperf.workflow`) on ``args.study`` into
    ``args.out`` and print its line; with ``--cohort`` on every study of the folder
    ``args.study`` into ``args.out/<study>/``, with a progress bar, the summary and one line per
    failed study. An error in what one study holds names the study. Returns the exit code (1
    when a study of a cohort failed)."""
    import dataclasses
    import sys

    if not args.cohort:
        from ctperf.errors import InputError, ValidationError

        if getattr(args, "scheduler", None):
            raise ValidationError("--scheduler runs a cohort's studies on a Dask cluster: give "
                                  "--cohort too")
        try:
            outcome = task(args.study, args.out, options)
        except ValidationError as exc:  # what the study holds cannot be analysed: name it
            raise InputError(args.study, str(exc)) from None
        print(outcome.message)
        return 0
    from ctperf.workflow.cohort import run_cohort_folder

    summary = run_cohort_folder(args.study, args.out, task,
                                dataclasses.replace(options, progress=False),
                                scheduler=args.scheduler, workers=args.workers,
                                progress=show_progress())
    for line in summary.failure_lines():
        print(f"ctperf {args.command}: {line}", file=sys.stderr)
    for line in summary.flag_lines():
        print(line)
    print(summary.text())
    return summary.exit_code


def study_io_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of :class:`ctperf.workflow.study.StudyIOOptions` from the options of
    :func:`add_study_options`, ``--dicom``, ``--anonymise`` and ``--overwrite`` (progress on)."""
    from ctperf.errors import ValidationError

    if args.anonymise and not args.dicom:
        raise ValidationError("--anonymise de-identifies the DICOM copy: give --dicom too "
                              "(NIfTI and JSON outputs carry no patient identity)")
    return {"series_uid": args.series, "frame_interval": args.frame_interval,
            "dicom": args.dicom, "anonymise": args.anonymise, "overwrite": args.overwrite,
            "progress": show_progress()}


def preprocess_step_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keywords of :class:`ctperf.workflow.study.PreprocessSteps` from the options of
    :func:`add_preprocess_options` and ``--workers``."""
    check_filter_args(args, args.filter)
    return {"register": args.register, "filter": args.filter,
            "spatial_sigma_mm": args.spatial_sigma, "range_sigma_hu": args.range_sigma,
            "filter_weights": args.filter_weights, "workers": args.workers}


def check_filter_args(args: argparse.Namespace, filter: bool) -> None:
    """Refuse the filter's options (:func:`add_filter_options`) set while it is off."""
    from ctperf.filter_options import check_filter_settings

    check_filter_settings(filter, spatial_sigma_mm=args.spatial_sigma,
                          range_sigma_hu=args.range_sigma, filter_weights=args.filter_weights,
                          cli=True)


def add_brain_mask_option(parser: Any, *, vessels: bool = False) -> None:
    """``--brain-mask PATH``: a 3D NIfTI brain mask on the study's grid (``vessels``: the
    command also searches it for the AIF and VOF)."""
    also = (" (also where the automatic AIF and VOF are searched: give --aif-mask and "
            "--vof-mask for vessels outside it)") if vessels else ""
    parser.add_argument("--brain-mask", type=Path, default=None, metavar="PATH",
                        help="3D NIfTI brain mask on the study's grid, its voxels stored in "
                             f"any axis order (nonzero = brain) instead of the automatic "
                             f"one{also}")


def add_preprocess_options(parser: Any, *, default: bool, filter_by_method: bool = False
                           ) -> None:
    """``--register/--no-register`` and ``--filter/--no-filter`` (the paper's two
    preprocessing steps, both on or off by ``default``; with ``filter_by_method`` the filter
    by default as the method asks, :func:`ctperf.filter_options.filters_by_default`), then the
    filter's options."""
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=default,
                        help="rigid motion correction of every frame to the first "
                             "[%(default)s]")
    parser.add_argument("--filter", action=argparse.BooleanOptionalAction,
                        default=None if filter_by_method else default,
                        help="bilateral filter guided by the temporal mean ["
                             + ("on, except for bayes, whose spatial prior pools the "
                                "neighbours itself" if filter_by_method else "%(default)s")
                             + "]")
    add_filter_options(parser)


def add_study_options(parser: Any) -> None:
    """``--series`` and ``--frame-interval``: how to read a study (see ``ctperf.io.read_study``)."""
    parser.add_argument("--series", default=None, metavar="UID",
                        help="SeriesInstanceUID to read when the DICOM folder holds several "
                             "(default: the one series acquired several times, when only one "
                             "is)")
    parser.add_argument("--frame-interval", type=frame_interval, default=None, metavar="SECONDS",
                        help="seconds between frames, for files without usable acquisition times")


def add_filter_options(parser: Any) -> None:
    """``--spatial-sigma``, ``--range-sigma`` (the paper's 3 mm, 20 HU) and ``--filter-weights``
    of the bilateral filter."""
    from ctperf.filter_options import (
        FILTER_WEIGHTS,
        MAX_RANGE_SIGMA_HU,
        MAX_SPATIAL_SIGMA_MM,
        RANGE_SIGMA_HU,
        SPATIAL_SIGMA_MM,
    )

    parser.add_argument("--spatial-sigma",
                        type=float_in(0.01, MAX_SPATIAL_SIGMA_MM, "--spatial-sigma (mm)"),
                        default=SPATIAL_SIGMA_MM, metavar="MM",
                        help="bilateral filter: spatial sigma in mm, up to 20 [%(default)s]")
    parser.add_argument("--range-sigma",
                        type=float_in(0.01, MAX_RANGE_SIGMA_HU, "--range-sigma (HU)"),
                        default=RANGE_SIGMA_HU, metavar="HU",
                        help="bilateral filter: range sigma in HU, up to 500 [%(default)s]; a "
                             "smaller value keeps grey matter/CSF edges sharper "
                             "(docs/preprocessing.md)")
    parser.add_argument("--filter-weights", choices=("linear", "quadratic"),
                        default=FILTER_WEIGHTS,
                        help="bilateral grid weights: linear (faster) or quadratic (closer to "
                             "a brute-force filter next to arteries, slower) [%(default)s]")


def add_overwrite_option(parser: Any) -> None:
    """``--overwrite``: allow replacing an existing output folder ctperf did not write."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT even when it exists and holds files ctperf did not "
                             "write (all of them are deleted); a previous ctperf output is "
                             "replaced without it")


def add_anonymise_option(parser: Any) -> None:
    """``--anonymise``: de-identify the DICOM written (``anonymise=True`` of the io writers)."""
    parser.add_argument("--anonymise", action="store_true",
                        help="de-identify the DICOM files written (DICOM PS3.15 basic profile: "
                             "no patient name, birth date, accession number or institution, a "
                             "keyed pseudonym for the ID, new UIDs, kept for a series ctperf "
                             "de-identified; docs/inputs.md, Privacy); JSON never carries them")


#: ``--method`` of the model-based commands (``ctperf.types.METHODS``, spelled out here so
#: that ``--help`` needs no scientific imports).
METHOD_CHOICES: tuple[str, ...] = ("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes")


def add_constants_options(parser: Any) -> None:
    """``--rho`` and ``--kh``: the tissue constants of CBF and CBV."""
    parser.add_argument("--rho", type=float_in(0.5, 2.0, "brain density rho (g/mL)"),
                        default=1.04, help="brain density g/mL, 0.5-2 [%(default)s]")
    parser.add_argument("--kh", type=float_in(0.1, 1.0, "haematocrit ratio kH"), default=0.733,
                        help="haematocrit ratio kH = (1 - Hct large vessels) / (1 - Hct "
                             "capillaries), 0.1-1 [%(default)s]")
