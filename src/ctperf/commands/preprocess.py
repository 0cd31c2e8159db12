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


def _qc_figure(before: Any, after: Any, result: Any, path: Path) -> None:
    """Displacement plot and the middle slice of the most displaced frame, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ctperf.io import atomic_file

    t = int(np.argmax(result.displacement_mm))
    z = before.shape[1] // 2
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(before.times, result.displacement_mm, label="mean over brain")
    ax.plot(before.times, result.max_displacement_mm, label="max over brain")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("displacement from frame 0 (mm)")
    ax.legend()
    ax.set_title("frame-wise displacement")
    panels = [(before.hu[0, z], "frame 0"), (before.hu[t, z], f"frame {t} before"),
              (after.hu[t, z], f"frame {t} after")]
    for ax, (img, title) in zip(axes[1:], panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=80, origin="upper")
        ax.contour(result.mask[z], levels=[0.5], colors="r", linewidths=0.5)
        ax.set_title(f"{title}, slice {z} (W 80 / L 40)")
        ax.axis("off")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


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
        _qc_figure(series, final, result, tmp / "qc.png")
    print(f"wrote {args.out} (max mean displacement {np.max(result.displacement_mm):.2f} mm)")
    return 0
