"""``ctperf info STUDY``: what a study holds (grid, timing, scanner) without computing anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import add_study_options, show_progress

__all__ = ["ORDER", "describe", "register", "run"]

ORDER = 10


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info", help="describe a study: shape, spacing, frames, timing, scanner",
        description="Read a study (DICOM folder, searched recursively, or 4D NIfTI) and print its "
                    "shape, voxel spacing, frame count, time span and spacing, timing source, "
                    "series description, scanner, kVp and mAs. A DICOM folder with several "
                    "series lists them (unless they are one scan's time points), marking the "
                    "one the other commands read when only one is a time course; --series "
                    "chooses one.")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study")
    add_study_options(p)
    p.set_defaults(func=run)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or value == "":
        return "unknown"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


def describe(series: Any, path: Path) -> list[str]:
    """Lines of ``ctperf info`` for a CTPSeries read from ``path``."""
    import numpy as np

    meta = series.meta
    t, z, y, x = series.shape
    dz, dy, dx = series.spacing
    steps = np.diff(series.times)
    timing = str(meta.get("timing_source") or "unknown")
    if series.slice_times is not None:
        timing += " (each slice has its own times)"
    if meta.get("transfer_syntax"):
        kind = f"DICOM, {meta['transfer_syntax']}"
    else:  # a folder without DICOM images is read as the one 4D NIfTI under it
        from ctperf.io.study import nifti_study_in

        found = nifti_study_in(path) if path.is_dir() else None
        kind = "NIfTI" if found is None else f"NIfTI, {found.relative_to(path)}"
    lines = [
        f"study        {path}",
        f"format       {kind}",
        f"shape        {t} frames x {z} slices x {y} rows x {x} columns (T, Z, Y, X)",
        f"spacing      {dz:.4g} x {dy:.4g} x {dx:.4g} mm (slice, row, column)",
        f"frames       {t}, {series.times[0]:.3f} to {series.times[-1]:.3f} s "
        f"(span {series.times[-1] - series.times[0]:.3f} s)",
        f"frame step   median {np.median(steps):.3f} s, min {steps.min():.3f} s, "
        f"max {steps.max():.3f} s",
        f"timing from  {timing}",
        f"series       {_fmt(meta.get('description'))}",
        f"series UID   {_fmt(meta.get('series_uid'))}"
        + (f" (and {meta['time_point_series'] - 1} more: one series per time point)"
           if meta.get("time_point_series") else ""),
        f"scanner      {_fmt(meta.get('scanner'))}",
        f"kVp          {_fmt(meta.get('kvp'))}",
        f"mAs          {_fmt(meta.get('mas'))}",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    from ctperf import io

    groups = None
    if args.study.is_dir() and args.series is None:
        try:
            groups = io.read_dicom_headers(args.study)
        except io.NoDicomError:  # read_study reads the folder's 4D NIfTI, if it holds one
            groups = {}
        if len(groups) > 1 and io.time_point_series(groups) is None:
            chosen = io.time_course_series(groups)
            print(f"{args.study} holds {len(groups)} series; "
                  + ("choose one with --series UID:" if chosen is None else
                     "the one time course (*) is read as the study, --series UID chooses "
                     "another:"))
            for uid, headers in groups.items():
                first = headers[0].ds
                files = f"{len(headers)} file{'s' if len(headers) != 1 else ''}"
                print(f"{'*' if uid == chosen else ' '} {uid}  {first.get('Modality', '?')}  "
                      f"'{first.get('SeriesDescription', '')}'  {files}")
            if chosen is None:
                return 0
            print()
            groups = {chosen: groups[chosen]}  # the study the other commands read, described
    if groups:  # headers read once: their warnings said once
        series = io.read_dicom_series(args.study, frame_interval=args.frame_interval,
                                      progress=show_progress(), headers_by_series=groups)
    else:
        series = io.read_study(args.study, series_uid=args.series,
                               frame_interval=args.frame_interval, progress=show_progress())
    print("\n".join(describe(series, args.study)))
    return 0
