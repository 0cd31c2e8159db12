"""``ctperf predict STUDY OUT --model CKPT``: perfusion maps from a trained U-Net."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["ORDER", "register", "run"]

ORDER = 62


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="perfusion maps of a study from a trained U-Net",
        description="Run a trained U-Net on every slice of a study (DICOM folder or 4D NIfTI) "
                    "and write the maps in physical units as OUT/<name>.nii.gz plus "
                    "OUT/summary.json.")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt or best.pt)")
    p.add_argument("--dicom", action="store_true", help="also write DICOM maps in OUT/dicom")
    p.add_argument("--mask", type=Path, default=None, help="brain mask; outside is set to 0")
    p.add_argument("--resize", action="store_true",
                   help="resample slices of another size to the model's training size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, default=4, help="slices per forward pass [4]")
    p.set_defaults(func=run)


def _read_study(path: Path) -> Any:
    from ctperf import io

    reader = getattr(io, "read_study", None)
    if reader is not None:
        return reader(path)
    return io.read_nifti_series(path)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.model import load_checkpoint, predict_maps

    ckpt = load_checkpoint(args.model)
    series = _read_study(args.study)
    mask = None
    if args.mask is not None:
        mask = io.read_mask(args.mask, shape=series.shape[1:], affine=series.affine)
    maps = predict_maps(series, ckpt, device=args.device, batch_size=args.batch,
                        resize=args.resize, mask=mask, progress=True)
    maps = maps.replace(provenance={**maps.provenance, "checkpoint": str(args.model)})
    io.write_maps_nifti(maps, args.out)
    io.write_json({**maps.provenance, "maps": maps.names, "units": dict(maps.units),
                   "study": str(args.study)}, args.out / "summary.json")
    if args.dicom:
        io.write_maps_dicom(maps, args.out / "dicom", source=series)
    print(f"wrote {', '.join(maps.names)} to {args.out}")
    return 0
