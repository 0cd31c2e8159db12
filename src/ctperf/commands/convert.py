"""``ctperf convert SRC DST``: DICOM -> 4D NIfTI (+ JSON sidecar) or any study -> DICOM folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import add_anonymise_option, add_overwrite_option, add_study_options

__all__ = ["ORDER", "register", "run"]

ORDER = 11


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a study between DICOM and 4D NIfTI",
        description="Read SRC (DICOM folder or 4D NIfTI) and write DST: a 4D NIfTI with a JSON "
                    "sidecar of frame times and metadata when DST ends in .nii or .nii.gz, "
                    "otherwise a DICOM folder (one CT file per frame and slice, int16 HU, "
                    "real timing tags). DST is written beside its final place and renamed "
                    "when complete; it must not be or hold SRC, and an existing DST is "
                    "replaced only when ctperf wrote it (a folder) or with --overwrite.")
    p.add_argument("src", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("dst", type=Path, help="output .nii/.nii.gz file or DICOM folder")
    add_study_options(p)
    add_overwrite_option(p)
    add_anonymise_option(p)
    p.add_argument("--compress", action="store_true",
                   help="DICOM output: JPEG Lossless (Process 14 SV1) pixel data")
    p.add_argument("--int16", action="store_true",
                   help="NIfTI output: store integer HU as int16 instead of float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.errors import InputError

    to_nifti = io.is_nifti(args.dst)
    if to_nifti and args.compress:
        raise InputError(args.dst, "--compress applies to DICOM output, not NIfTI")
    if not to_nifti and args.int16:
        raise InputError(args.dst, "--int16 applies to NIfTI output; DICOM is always int16")
    if not to_nifti and args.dst.exists() and not args.dst.is_dir():
        raise InputError(args.dst, "exists and is a file; DICOM output needs a folder (or give "
                                   "a .nii/.nii.gz name for NIfTI)")
    inputs = [args.src]
    if io.is_nifti(args.src):
        inputs.append(io.nifti.sidecar_path(args.src))
    if to_nifti:
        for path in (args.dst, io.nifti.sidecar_path(args.dst)):
            io.check_output(path, inputs=inputs, overwrite=args.overwrite, kind="file")
    else:
        io.check_output(args.dst, inputs=inputs, overwrite=args.overwrite)
    series = io.read_study(args.src, series_uid=args.series,
                           frame_interval=args.frame_interval, progress=True)
    if to_nifti:
        io.write_series_nifti(series, args.dst, dtype="int16" if args.int16 else "float32")
        print(f"wrote {args.dst} and {io.nifti.sidecar_path(args.dst).name} "
              f"({series.n_frames} frames)")
    else:
        # The outer folder carries --overwrite; the writer then replaces its own empty folder.
        with io.atomic_dir(args.dst, overwrite=args.overwrite) as tmp:
            io.write_series_dicom(series, tmp, compress=args.compress, anonymise=args.anonymise,
                                  progress=True)
        print(f"wrote {args.dst} ({series.n_frames * series.shape[1]} DICOM files)")
    return 0
