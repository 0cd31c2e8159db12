"""``ctperf phantom OUTDIR``: a resumable cohort of digital CTP subjects with known truth."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    MAX_MATRIX,
    add_scheduler_option,
    add_workers_option,
    count,
    fraction,
    frame_interval,
    positive_float,
    positive_int,
    seed,
    show_progress,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 5


def _residues(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    allowed = ("box", "exponential", "gamma")
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"residue shapes must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return names


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "phantom", help="generate digital CTP subjects with known perfusion truth",
        description="Write OUTDIR/sub-0000 ... : each a simulated 80 kV head CTP study (4D NIfTI "
                    "and DICOM), its true cbf, cbv, mtt, ttp, tmax and delay maps, masks, the "
                    "noise-free AIF and VOF, motion and every sampled parameter. Subjects are "
                    "simulated in parallel (a local Dask cluster of --workers processes, or "
                    "--scheduler; --workers 1: in this process); "
                    "OUTDIR/manifest.json records each one, so an interrupted run resumes "
                    "with the subjects not yet written. OUTDIR "
                    "must be new, empty or a cohort made with the same options.")
    p.add_argument("outdir", type=Path, help="cohort folder")
    p.add_argument("--subjects", type=positive_int, default=1,
                   help="number of subjects [%(default)s]")
    p.add_argument("--size", type=count(32, MAX_MATRIX), default=512,
                   help="in-plane pixels, >= 32 [%(default)s]")
    p.add_argument("--slices", type=positive_int, default=8, help="5 mm slices [%(default)s]")
    p.add_argument("--frames", type=count(3), default=89,
                   help="time frames, >= 3 (what the readers take) [%(default)s]")
    p.add_argument("--frame-interval", type=frame_interval, default=0.5, metavar="SECONDS",
                   help="seconds between frames [%(default)s]")
    p.add_argument("--seed", type=seed, default=0, help="cohort seed [%(default)s]")
    p.add_argument("--motion", choices=("none", "mild", "severe", "realistic"), default="none",
                   help="head motion; realistic draws none/mild/severe as 58/24/19 %% "
                        "[%(default)s]")
    p.add_argument("--mas", type=positive_float, default=150.0,
                   help="tube current-time product; noise sigma = 103/sqrt(mAs) HU [%(default)s]")
    p.add_argument("--noise-matrix", type=count(32, MAX_MATRIX), default=None, metavar="PIXELS",
                   help="pixels across the field of view of the image whose noise --mas sets "
                        "(512 for a clinical scanner); a smaller --size then carries that "
                        "image's noise averaged into its pixels [the phantom's own --size]")
    p.add_argument("--lesion-free", type=fraction, default=0.25, metavar="FRACTION",
                   help="fraction of subjects without an occlusion [%(default)s]")
    # A string default goes through _residues too, so the help shows it as typed.
    p.add_argument("--residues", type=_residues, default="box,exponential,gamma",
                   metavar="LIST", help="residue shapes to draw from [%(default)s]")
    p.add_argument("--anatomy", choices=("procedural", "mni", "auto"), default="procedural",
                   help="head template: procedural, MNI152 via nilearn (pip install "
                        "'ctperf[anatomy]'), or auto (mni when nilearn is installed) "
                        "[%(default)s]")
    p.add_argument("--no-dicom", dest="dicom", action="store_false",
                   help="skip the DICOM copy of each study")
    p.add_argument("--preview", action="store_true", help="write sub-*/preview.png montages")
    add_workers_option(p, what="subjects simulated",
                       default="one per two CPU cores, so one process on 2 cores")
    add_scheduler_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from ctperf.io import check_output
    from ctperf.workflow import generate_cohort

    check_output(args.outdir, kind="extend", owned_by=("cohort.json",))
    folders = generate_cohort(
        args.outdir, subjects=args.subjects, seed=args.seed, progress=show_progress(),
        dicom=args.dicom,
        preview=args.preview, workers=args.workers, scheduler=args.scheduler, size=args.size,
        slices=args.slices, frames=args.frames, frame_interval=args.frame_interval, mas=args.mas,
        motion=args.motion, lesion_free_fraction=args.lesion_free, residues=args.residues,
        anatomy=args.anatomy, noise_matrix=args.noise_matrix)
    logging.getLogger(__name__).info("%d subjects in %s", len(folders), args.outdir)
    print(f"{len(folders)} subjects in {args.outdir}")
    return 0
