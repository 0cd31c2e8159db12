"""CLI subcommands, one module each.

Every module defines ``ORDER`` (its place in ``ctperf --help``) and ``register(subparsers)``, which
adds its parser and sets ``func`` to a ``run(args) -> int`` function. Modules import only argparse
and the standard library at top level; heavy imports happen inside ``run`` so ``--help`` is instant.
"""

from typing import Any

__all__ = ["add_filter_options", "add_study_options"]


def add_study_options(parser: Any) -> None:
    """``--series`` and ``--frame-interval``: how to read a study (see ``ctperf.io.read_study``)."""
    parser.add_argument("--series", default=None, metavar="UID",
                        help="SeriesInstanceUID to read when the DICOM folder holds several")
    parser.add_argument("--frame-interval", type=float, default=None, metavar="SECONDS",
                        help="seconds between frames, for files without usable acquisition times")


def add_filter_options(parser: Any) -> None:
    """``--spatial-sigma``, ``--range-sigma`` (the paper's 3 mm, 20 HU) and ``--filter-weights``
    of the bilateral filter."""
    parser.add_argument("--spatial-sigma", type=float, default=3.0, metavar="MM",
                        help="bilateral filter: spatial sigma in mm [%(default)s]")
    parser.add_argument("--range-sigma", type=float, default=20.0, metavar="HU",
                        help="bilateral filter: range sigma in HU [%(default)s]; 10 keeps "
                             "grey matter/CSF edges within 1 mm, 20 widens them ~4 mm")
    parser.add_argument("--filter-weights", choices=("linear", "quadratic"), default="linear",
                        help="bilateral grid weights: linear (faster) or quadratic (within "
                             "0.3 HU of a brute-force filter also next to arteries, ~40 %% "
                             "slower) [%(default)s]")

