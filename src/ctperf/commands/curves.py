"""``ctperf curves CURVES.csv OUT.csv --method M``: perfusion parameters of time curves."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ctperf.commands import (
    METHOD_CHOICES,
    add_constants_options,
    add_device_option,
    seed,
    show_progress,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 21


def _baseline(text: str) -> str | int:
    """Argparse type: ``auto`` or a whole number of frames >= 0."""
    if text == "auto":
        return text
    try:
        return seed(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 0, got "
                                         f"{text!r}") from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "curves", help="perfusion parameters of time curves (regions or voxels) in a CSV table",
        description="Read CURVES, a CSV table (comma, semicolon or tab separated; with "
                    "semicolons or tabs, numbers may have a decimal comma; UTF-8, UTF-16 or "
                    "Windows-1252 text) with a header row "
                    "(optionally a row of units under it: the time's in s, ms or min): a "
                    "column of frame times in s, or in the unit its name ends in ('time (ms)', "
                    "'time_min'), or clock times (hh:mm:ss.fff, mm:ss.f), spanning 15 s or more "
                    "(--time-column), the "
                    "arterial curve "
                    "(--aif-column), optionally the venous curve (--vof-column, used when "
                    "present: the AIF is scaled to its area when it is a plausible outflow) and "
                    "one column per tissue curve, all in the same units (HU, concentration or "
                    "any other). Fit each tissue curve with the method of `ctperf maps` and "
                    "write OUT (CSV: one row per curve with CBF mL/100g/min, CBV mL/100g, MTT, "
                    "Tmax, delay (the SVD methods' delay is their Tmax) and TTP s, the SDs "
                    "for bayes, and flags: below_baseline for a curve that falls below its "
                    "pre-bolus level by more than its noise allows, "
                    "no_enhancement for one that never rises above it, at_bound for a box "
                    "fit that ended on a bound of its parameters (or at no flow for a curve "
                    "that enhances) or a bayes posterior with a fifth of its mass on its "
                    "grid's edge of MTT or delay, peaks_before_aif for one "
                    "that peaks before the AIF by more than 1 s or a frame interval, "
                    "truncated for one still above 30 % of its peak at the last frame, spike "
                    "for one with a frame standing far off the line through its neighbours "
                    "(motion, a streak), tmax_before_aif for a Tmax below 0 by more than "
                    "1 s or a frame interval (an AIF taken downstream), tmax_after_peak for a "
                    "Tmax after the curve's own peak, which no residue gives, vessel for one "
                    "peaking above a quarter of "
                    "the AIF's peak, as only a vessel does), a JSON "
                    "sidecar of the "
                    "same stem (method, constants, the columns read as time, AIF and VOF, the "
                    "baseline asked for and the frames it took, partial-volume step, QC, "
                    "units) and a PNG of the curves the fit read (baseline subtracted, the "
                    "AIF after its partial-volume scaling; no model curves drawn).")
    p.add_argument("curves", type=Path, help="CSV table of curves")
    p.add_argument("out", type=Path, help="output CSV file (a .json sidecar and a .png figure "
                                          "are written beside)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT, its sidecar and figure when they exist")
    p.add_argument("--method", choices=METHOD_CHOICES,
                   default="nlr-fast", help="as for `ctperf maps`; bayes fits each curve on its "
                   "own (no neighbourhood prior) [%(default)s]")
    p.add_argument("--time-column", default="time", metavar="NAME",
                   help="column of frame times, s or the unit its name ends in; by default also "
                        "found as 't' or 'seconds'; names match in any case, and with a unit or "
                        "suffix after them ('Time (s)', 'AIF_HU') when only one column does "
                        "[%(default)s]")
    p.add_argument("--aif-column", default="aif", metavar="NAME",
                   help="column of the arterial curve; by default also found as 'artery' or "
                        "'arterial' [%(default)s]")
    p.add_argument("--vof-column", default="vof", metavar="NAME",
                   help="column of the venous curve: by default used when present and also "
                        "found as 'vein', 'venous', 'SSS' or 'sinus'; another name must be "
                        "there [%(default)s]")
    p.add_argument("--baseline", type=_baseline, default="auto", metavar="N",
                   help="pre-bolus frames whose mean is subtracted from every curve: auto (read "
                        "from the AIF's arrival, as the maps do), or N, no more frames than "
                        "precede the AIF's arrival; 0 when the curves are "
                        "enhancement or concentration already (curves still at their "
                        "unenhanced HU before the AIF's bolus are then refused; bayes "
                        "accounts for the subtracted baseline's error in its likelihood, so "
                        "noisy curves read differently with 0 than with the baseline "
                        "subtracted by ctperf, by up to a few posterior SDs: docs/bayes.md; "
                        "each curve's flags are judged on the curves as given, so a noisy "
                        "curve's can differ between the two too) [%(default)s]")
    add_constants_options(p)
    add_device_option(p, what="the box-model fits")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf.errors import InputError, ValidationError
    from ctperf.io import atomic_file, check_output, write_json
    from ctperf.io.curves_csv import read_curves_csv, write_curves_csv
    from ctperf.perfusion import fit_curves
    from ctperf.reporting import curves_figure, save_figure
    from ctperf.types import MAP_UNITS
    from ctperf.versioning import software_version

    sidecar, figure = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    if args.out in (sidecar, figure):
        raise InputError(args.out, "is the name of the JSON sidecar or the figure; give a .csv "
                                   "name")
    for target in (args.out, sidecar, figure):
        check_output(target, inputs=[args.curves], overwrite=args.overwrite, kind="file")
    table = read_curves_csv(args.curves, time_column=args.time_column,
                            aif_column=args.aif_column, vof_column=args.vof_column)
    try:
        fit = fit_curves(table.tissue, table.aif, table.times, method=args.method,
                         vof=table.vof, baseline=args.baseline, rho=args.rho, kh=args.kh,
                         device=args.device, progress=show_progress())
    except ValidationError as exc:  # what the curves cannot give: the file's problem
        raise InputError(args.curves, str(exc)) from None
    rows = fit.rows()
    units = {k: MAP_UNITS[k.removesuffix("_sd")] for k in rows[0]}
    with ExitStack() as stack:  # the three files appear together, or none of them
        tmp_csv, tmp_json, tmp_png = (stack.enter_context(atomic_file(p))
                                      for p in (args.out, sidecar, figure))
        write_curves_csv(tmp_csv, table.names, rows, flags=fit.flags)
        write_json({**fit.provenance, "columns": table.columns,
                    "baseline_asked": args.baseline, "curves": list(table.names),
                    "units": units,
                    # from the first frame: a clock-time column's time of day is not kept
                    "times_s": [round(float(v - table.times[0]), 4) for v in table.times],
                    "software_version": software_version()}, tmp_json)
        save_figure(curves_figure(table.times, fit, table.names), tmp_png, dpi=110)
    width = max(len(n) for n in table.names)
    shown = ("cbf", "cbv", "mtt", "tmax")
    print(f"{'curve':<{width}}  " + "  ".join(f"{k.upper():>8}" for k in shown))
    for name, row in zip(table.names, rows, strict=True):
        print(f"{name:<{width}}  " + "  ".join(f"{row[k]:8.2f}" for k in shown))
    pv = fit.provenance["partial_volume"]
    aif = f"scaled to the VOF by {pv['factor']:.3f}" if pv["corrected"] else \
        f"as given ({pv['reason']})"
    print(f"{len(rows)} curves, {args.method}, baseline {fit.provenance['baseline_frames']} "
          f"frames, AIF {aif} -> {args.out}")
    for name, flag in fit.provenance["qc"].items():
        if flag["flag"]:
            print(f"QC {name}: {flag['reason']}")
    for name, flagged in fit.provenance["curve_flags"].items():
        if flagged["curves"]:
            which = ", ".join(table.names[i] for i in flagged["curves"])
            each = "each " if len(flagged["curves"]) > 1 else ""
            print(f"QC {name}: {which}: {each}{flagged['reason']}")
    return 0
