"""``ctperf predict STUDY OUT --model CKPT``: perfusion maps from a trained U-Net."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    add_anonymise_option,
    add_overwrite_option,
    add_study_options,
    positive_int,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 62


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="perfusion maps of a study from a trained U-Net",
        description="Run a trained U-Net on every slice of a study (DICOM folder or 4D NIfTI) "
                    "and write the maps in physical units as OUT/<name>.nii.gz plus "
                    "OUT/summary.json.")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done)")
    add_overwrite_option(p)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt or best.pt)")
    p.add_argument("--dicom", action="store_true", help="also write DICOM maps in OUT/dicom")
    add_anonymise_option(p)
    add_study_options(p)
    p.add_argument("--mask", type=Path, default=None, help="brain mask; outside is set to 0")
    p.add_argument("--resize", action="store_true",
                   help="resample slices of another size to the model's training size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=positive_int, default=4, help="slices per forward pass [4]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.model import load_checkpoint, predict_maps

    io.check_output(args.out, inputs=(args.study, args.model, args.mask),
                    overwrite=args.overwrite)
    ckpt = load_checkpoint(args.model)
    series = io.read_study(args.study, series_uid=args.series,
                           frame_interval=args.frame_interval, progress=True)
    mask = None
    if args.mask is not None:
        mask = io.read_mask(args.mask, shape=series.shape[1:], affine=series.affine)
    maps = predict_maps(series, ckpt, device=args.device, batch_size=args.batch,
                        resize=args.resize, mask=mask, progress=True)
    # The checkpoint's file name only, and no study path: paths often hold a patient's name.
    maps = maps.replace(provenance={**maps.provenance, "checkpoint": args.model.name})
    with io.atomic_dir(args.out, overwrite=args.overwrite) as tmp:  # all appear, or none
        io.write_maps_nifti(maps, tmp)
        io.write_json(io.public_meta({**maps.provenance, "maps": maps.names,
                                      "units": dict(maps.units)}), tmp / "summary.json")
        if args.dicom:
            io.write_maps_dicom(maps, tmp / "dicom", source=series, anonymise=args.anonymise)
    print(f"wrote {', '.join(maps.names)} to {args.out}")
    return 0
