"""``ctperf convert SRC DST``: DICOM -> 4D NIfTI (+ JSON sidecar) or any study -> DICOM folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    add_anonymise_option,
    add_overwrite_option,
    add_study_options,
    show_progress,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 11


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a study between DICOM and 4D NIfTI",
        description="Read SRC (DICOM folder or 4D NIfTI) and write DST: a 4D NIfTI with a JSON "
                    "sidecar of frame times and metadata when DST ends in .nii or .nii.gz, "
                    "otherwise a DICOM folder (one CT file per frame and slice, int16 HU, "
                    "real timing tags; a DERIVED series numbered 1000 + the source's, never "
                    "taken for the scanner's own). DST is written beside its final place and "
                    "renamed when complete; it must not be or hold SRC, and an existing DST is "
                    "replaced only when ctperf wrote it (a folder) or with --overwrite.")
    p.add_argument("src", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("dst", type=Path, help="output .nii/.nii.gz file or DICOM folder")
    add_study_options(p)
    add_overwrite_option(p)
    add_anonymise_option(p)
    p.add_argument("--compress", action="store_true",
                   help="DICOM output: JPEG Lossless (Process 14 SV1) pixel data (needs GDCM: "
                        "pip install 'ctperf[compress]')")
    p.add_argument("--int16", action="store_true",
                   help="NIfTI output: store integer HU as int16 instead of float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.workflow.convert import ConvertOptions, convert_study

    options = ConvertOptions(compress=args.compress, int16=args.int16, anonymise=args.anonymise,
                             series_uid=args.series, frame_interval=args.frame_interval,
                             overwrite=args.overwrite, progress=show_progress())
    print(convert_study(args.src, args.dst, options).message)
    return 0
