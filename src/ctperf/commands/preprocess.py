"""``ctperf preprocess STUDY OUT``: motion correction and joint bilateral filtering of a study."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import (
    add_anonymise_option,
    add_filter_options,
    add_overwrite_option,
    add_study_options,
    positive_int,
)

__all__ = ["ORDER", "register", "run"]

ORDER = 30


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "preprocess", help="register every frame to the first and filter (as in Gava 2023)",
        description="Rigid motion correction of every frame to the first (SimpleITK, two "
                    "resolution levels, mean squares, 2,000/8,000 random samples, 300 "
                    "iterations) and a 3D bilateral filter guided by the temporal mean (3 mm, "
                    "20 HU). Writes OUT/study.nii.gz (+ study.json), OUT/transforms.json, "
                    "OUT/qc.json, OUT/qc.png and, with --dicom, OUT/dicom/. OUT must not be or "
                    "hold the study; an existing OUT is replaced only when ctperf wrote it (or "
                    "with --overwrite).")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done)")
    add_overwrite_option(p)
    p.add_argument("--no-register", action="store_true", help="skip motion correction")
    p.add_argument("--no-filter", action="store_true", help="skip the bilateral filter")
    p.add_argument("--dicom", action="store_true", help="also write OUT/dicom/ (int16 HU)")
    add_anonymise_option(p)
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="frames registered at once (default: number of CPU cores)")
    add_study_options(p)
    add_filter_options(p)
    p.set_defaults(func=run)


def _noise(hu: Any, mask: Any, frames: int = 6) -> float:
    """SD of consecutive-frame differences over the mask / sqrt(2), first ``frames`` frames."""
    import numpy as np

    head = hu[:frames]
    if len(head) < 2 or not mask.any():
        return float("nan")
    return float(np.std(np.diff(head[:, mask], axis=0)) / np.sqrt(2.0))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctperf.io import (
        atomic_dir,
        check_output,
        read_study,
        write_json,
        write_series_dicom,
        write_series_nifti,
    )
    from ctperf.preprocess import preprocess
    from ctperf.reporting import motion_qc_figure, save_figure

    check_output(args.out, inputs=(args.study,), overwrite=args.overwrite)
    series = read_study(args.study, series_uid=args.series, frame_interval=args.frame_interval,
                        progress=True)
    result = preprocess(series, register=not args.no_register, filter=not args.no_filter,
                        spatial_sigma_mm=args.spatial_sigma, range_sigma_hu=args.range_sigma,
                        filter_weights=args.filter_weights,
                        workers=args.workers, progress=True)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:  # all appear together, or none
        # No study path in the outputs: folder names often hold the patient's name.
        meta = dict(result.series.meta)
        meta["preprocess"] = {"registered": not args.no_register, "filtered": not args.no_filter}
        final = result.series.replace(meta=meta)
        write_series_nifti(final, tmp / "study.nii.gz")
        if args.dicom:
            write_series_dicom(final, tmp / "dicom", anonymise=args.anonymise)
        write_json({
            "convention": "ITK Euler3DTransform: maps a point of frame 0 (patient mm of the "
                          "affine) to the same anatomy in frame t: x -> R (x - center_mm) + "
                          "center_mm + t, R = Rz Rx Ry of the rotations in degrees",
            "center_mm": result.center_mm,
            "parameter_names": ["rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm"],
            "times": series.times,
            "parameters": result.parameters,
            "registration": result.registration,
        }, tmp / "transforms.json")
        write_json({
            "frames": series.n_frames,
            "registered": not args.no_register,
            "filtered": not args.no_filter,
            "displacement_mm": result.displacement_mm,
            "max_displacement_mm": result.max_displacement_mm,
            "max_mean_displacement_mm": float(np.max(result.displacement_mm)),
            "max_max_displacement_mm": float(np.max(result.max_displacement_mm)),
            "brain_voxels": int(result.mask.sum()),
            # frame-to-frame noise over the brain in the first (pre-contrast) frames
            "noise_sd_hu_before": _noise(series.hu, result.mask),
            "noise_sd_hu_after": _noise(final.hu, result.mask),
        }, tmp / "qc.json")
        save_figure(motion_qc_figure(series, final, result), tmp / "qc.png", dpi=80)
    print(f"wrote {args.out} (max mean displacement {np.max(result.displacement_mm):.2f} mm)")
    return 0
