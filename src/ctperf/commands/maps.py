"""``ctperf maps STUDY OUT --method M``: model-based perfusion maps, lesions, QC and an overview."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ctperf.commands import (
    add_anonymise_option,
    add_filter_options,
    add_overwrite_option,
    add_study_options,
    float_in,
    fraction,
    non_negative_float,
    positive_float,
)
from ctperf.lesion_options import LesionOptions

__all__ = ["ORDER", "register", "run", "write_outputs"]

ORDER = 20


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "maps", help="model-based perfusion maps (box-model NLR or SVD), lesions and QC",
        description="Compute CBF, CBV, MTT, TTP, Tmax and delay maps of a study (DICOM folder or "
                    "4D NIfTI) and write OUT/<name>.nii.gz, OUT/lesions/<mask>.nii.gz (core, "
                    "hypoperfused, penumbra, tmax10, brain, vessels), OUT/summary.json (method, "
                    "constants, AIF/VOF voxels and curves, lesion volumes, QC flags) and "
                    "OUT/overview.png. OUT is checked before the study is read: it must not be "
                    "or hold the study, and an existing OUT is replaced only when ctperf wrote "
                    "it (or with --overwrite).")
    p.add_argument("study", type=Path, help="DICOM folder or 4D NIfTI study")
    p.add_argument("out", type=Path, help="output folder (replaced whole when done)")
    add_overwrite_option(p)
    p.add_argument("--method", choices=("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes"),
                   default="nlr-fast", help="box-model NLR (nlr: the paper's Nelder-Mead; "
                   "nlr-fast: grid + Levenberg-Marquardt), SVD deconvolution, or bayes "
                   "(posterior over residue shapes with a neighbourhood prior; also writes "
                   "<map>_sd.nii.gz uncertainty maps) [nlr-fast]")
    p.add_argument("--aif-mask", type=Path, default=None, help="3D NIfTI of arterial voxels")
    p.add_argument("--vof-mask", type=Path, default=None, help="3D NIfTI of venous voxels")
    p.add_argument("--brain-mask", type=Path, default=None, help="3D NIfTI brain mask")
    p.add_argument("--dicom", action="store_true", help="also write DICOM maps in OUT/dicom")
    add_anonymise_option(p)
    p.add_argument("--preprocess", action="store_true",
                   help="motion correction and bilateral filtering first (as in the paper)")
    add_study_options(p)
    add_filter_options(p)
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where the box-model fits run: cpu (NumPy), cuda, cuda:N, or auto (a "
                        "GPU when PyTorch sees one, else cpu) [%(default)s]")
    p.add_argument("--rho", type=float_in(0.5, 2.0, "brain density rho (g/mL)"), default=1.04,
                   help="brain density g/mL, 0.5-2 [1.04]")
    p.add_argument("--kh", type=float_in(0.1, 1.0, "haematocrit ratio kH"), default=0.733,
                   help="haematocrit ratio kH = (1 - Hct large vessels) / (1 - Hct "
                        "capillaries), 0.1-1 [0.733]")
    p.add_argument("--core-cbv", type=positive_float, default=None, metavar="ML",
                   help="define the core as CBV below ML mL/100g instead of rCBF < 30 %%")
    p.add_argument("--core-rcbf", type=fraction, default=LesionOptions.core_rcbf,
                   help="core rCBF threshold, a fraction of normal tissue [%(default)s]")
    p.add_argument("--tmax", type=positive_float, default=LesionOptions.tmax_hypo,
                   help="hypoperfusion Tmax threshold s [%(default)s]")
    p.add_argument("--lesion-smooth", type=non_negative_float,
                   default=LesionOptions.smooth_mm,
                   metavar="MM", help="radius of an in-plane median filter on the maps before "
                   "the lesion thresholds [%(default)s]")
    p.add_argument("--min-lesion", type=non_negative_float,
                   default=LesionOptions.min_component_ml, metavar="ML",
                   help="drop lesion pieces smaller than ML mL [%(default)s]")
    p.set_defaults(func=run)


def write_outputs(result: Any, folder: Path, *, title: str = "",
                  dicom_source: Any = None, overwrite: bool = False,
                  anonymise: bool = False) -> None:
    """Write the maps, lesion masks, summary and overview of one perfusion run.

    Everything is written inside one :func:`ctperf.io.atomic_dir`: ``folder`` appears whole or
    not at all. An existing folder is replaced only when ctperf wrote it, it is empty, or
    ``overwrite`` is true.

    Parameters
    ----------
    result : PerfusionResult
        Output of :func:`ctperf.perfusion.run_perfusion` or
        :func:`ctperf.perfusion.analyse_study`.
    folder : Path
        Output folder: ``<map>.nii.gz``, ``lesions/<mask>.nii.gz`` (core, hypoperfused,
        penumbra, tmax10, brain, vessels), ``summary.json`` and ``overview.png``.
    title : str
        Title of the overview figure.
    dicom_source : CTPSeries, optional
        When given, DICOM maps are also written in ``folder/dicom`` with this study's metadata.
    overwrite : bool
        Replace an existing ``folder`` that ctperf did not write.
    anonymise : bool
        De-identified DICOM maps (see :func:`ctperf.io.write_maps_dicom`).
    """
    from ctperf import io
    from ctperf.reporting import maps_overview, save_figure

    maps = result.maps
    with io.atomic_dir(folder, overwrite=overwrite) as tmp:
        io.write_maps_nifti(maps, tmp)
        masks = {**result.lesions.masks(), "brain": result.brain, "vessels": result.vessels}
        for name, mask in masks.items():
            io.write_volume(mask, maps.affine, tmp / "lesions" / f"{name}.nii.gz")
        io.write_json(io.public_meta({**maps.provenance, "maps": maps.names,
                                      "units": dict(maps.units)}), tmp / "summary.json")
        save_figure(maps_overview(result, title=title), tmp / "overview.png", dpi=110,
                    facecolor="black")
        if dicom_source is not None:
            io.write_maps_dicom(maps, tmp / "dicom", source=dicom_source, anonymise=anonymise)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.perfusion import analyse_study
    from ctperf.reporting import volume_text

    io.check_output(args.out, inputs=(args.study, args.aif_mask, args.vof_mask, args.brain_mask),
                    overwrite=args.overwrite)
    series = io.read_study(args.study, series_uid=args.series,
                           frame_interval=args.frame_interval, progress=True)
    grid, affine = series.shape[1:], series.affine

    def mask_of(path: Path | None) -> Any:
        if path is None:
            return None
        return io.read_mask(path, shape=grid, affine=affine)

    aif_mask, vof_mask, brain = mask_of(args.aif_mask), mask_of(args.vof_mask), \
        mask_of(args.brain_mask)
    lesion_options = LesionOptions(core_rcbf=args.core_rcbf, core_cbv=args.core_cbv,
                                   tmax_hypo=args.tmax, smooth_mm=args.lesion_smooth,
                                   min_component_ml=args.min_lesion)
    # DICOM output only needs the study's metadata; keep the first frame, not the whole study.
    source = None
    if args.dicom:
        source = series.replace(hu=series.hu[:1], times=series.times[:1],
                                slice_times=None if series.slice_times is None
                                else series.slice_times[:1])
    # Handed over without a reference kept here, so the raw study is freed once registered.
    held = [series]
    del series
    result, _ = analyse_study(held.pop(), method=args.method, register=args.preprocess,
                              filter=args.preprocess, spatial_sigma_mm=args.spatial_sigma,
                              range_sigma_hu=args.range_sigma, filter_weights=args.filter_weights,
                              aif_mask=aif_mask, vof_mask=vof_mask,
                              brain_mask=brain, rho=args.rho, kh=args.kh, device=args.device,
                              lesion_options=lesion_options, progress=True)
    result = dataclasses.replace(result, maps=result.maps.replace(provenance={
        **result.maps.provenance, "preprocessed": bool(args.preprocess),
        **({"filter": {"spatial_sigma_mm": args.spatial_sigma, "range_sigma_hu": args.range_sigma,
                       "weights": args.filter_weights}} if args.preprocess else {})}))
    # No study path or name in the outputs: folder names often hold the patient's name.
    write_outputs(result, args.out, title=f"ctperf maps: {args.method}", dicom_source=source,
                  overwrite=args.overwrite, anonymise=args.anonymise)
    maps = result.maps
    les = maps.provenance["lesions"]
    raised = [k for k, v in maps.provenance["qc"].items() if v["flag"]]
    print(f"wrote {', '.join(maps.names)} to {args.out}: core {volume_text(les, 'core')}, "
          f"hypoperfused {volume_text(les, 'hypoperfused')}"
          + (f"; QC flags: {', '.join(raised)}" if raised else ""))
    return 0
