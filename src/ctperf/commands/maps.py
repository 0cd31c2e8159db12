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

__all__ = ["ORDER", "overview_figure", "register", "run", "volume_text",
           "write_outputs"]

ORDER = 20

_TITLES = {"cbf": "CBF mL/100g/min", "cbv": "CBV mL/100g", "mtt": "MTT s", "tmax": "Tmax s",
           "ttp": "TTP s", "delay": "delay s"}


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


def _orient(affine: Any) -> tuple[bool, bool]:
    """Flips (rows, columns) that show a slice radiologically: anterior up, patient right on
    the viewer's left (RAS affine)."""
    import numpy as np

    a = np.asarray(affine)[:3, :3]
    col_axis = int(np.argmax(np.abs(a[:, 0])))
    row_axis = int(np.argmax(np.abs(a[:, 1])))
    flip_cols = col_axis == 0 and a[0, 0] > 0
    flip_rows = row_axis == 1 and a[1, 1] > 0
    return flip_rows, flip_cols


def volume_text(lesions: dict[str, Any], name: str) -> str:
    """``"12.3 mL"``, or ``"12.3 +- 1.4 mL"`` when the summary holds the volume's SD."""
    sd = (lesions.get("volumes_sd_ml") or {}).get(name)
    value = lesions["volumes_ml"][name]
    return f"{value:.1f} mL" if sd is None else f"{value:.1f} +- {sd:.1f} mL"


def overview_figure(result: Any, *, title: str = "") -> Any:
    """A matplotlib Figure: maps of up to 4 slices with lesion outlines, AIF/VOF, volumes, QC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    maps = result.maps
    names = [n for n in ("cbf", "cbv", "mtt", "tmax", "ttp") if n in maps]
    n_z = maps.shape[0]
    area = result.brain.sum(axis=(1, 2))
    order = np.argsort(-area, kind="stable")[: min(4, n_z)]
    slices = sorted(int(z) for z in order if area[z] > 0) or [n_z // 2]
    flip_rows, flip_cols = _orient(maps.affine)
    _, dy, dx = maps.spacing
    fig = plt.figure(figsize=(3.0 * len(names), 2.9 * len(slices) + 3.4), facecolor="black")
    grid = fig.add_gridspec(len(slices) + 1, len(names),
                            height_ratios=[1.0] * len(slices) + [1.15], hspace=0.12, wspace=0.04)
    brain_any = result.brain.any(axis=0)
    rows = np.flatnonzero(brain_any.any(axis=1))
    cols = np.flatnonzero(brain_any.any(axis=0))
    r0, r1 = max(rows[0] - 2, 0), rows[-1] + 3
    c0, c1 = max(cols[0] - 2, 0), cols[-1] + 3

    def view(a: Any) -> Any:
        a = a[r0:r1, c0:c1]
        if flip_rows:
            a = a[::-1]
        if flip_cols:
            a = a[:, ::-1]
        return a

    from ctperf.evaluation.plots import DISPLAY_WINDOWS

    for j, name in enumerate(names):
        vals = maps[name][result.brain & ~result.vessels]
        # TTP counts from the first frame, so it depends on when the bolus came: the study's own
        # range shows it; the other maps use the one table of display windows.
        window = DISPLAY_WINDOWS[name] if name in DISPLAY_WINDOWS and name != "ttp" else (
            float(np.nanpercentile(vals, 2)), float(np.nanpercentile(vals, 98)))
        cmap = plt.get_cmap("turbo").with_extremes(bad="black")
        for i, z in enumerate(slices):
            ax = fig.add_subplot(grid[i, j])
            im = ax.imshow(view(maps[name][z]), cmap=cmap, vmin=window[0], vmax=window[1],
                           interpolation="nearest", aspect=dy / dx)
            for mask, colour in ((result.lesions.hypoperfused, "white"),
                                 (result.lesions.core, "magenta")):
                m = view(mask[z]).astype(float)
                if m.any() and name in ("cbf", "tmax", "cbv"):
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"slice {z}", color="white")
                ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="white", fontsize=9,
                        va="center")
            if i == 0:
                ax.set_title(_TITLES[name], color="white", fontsize=10)
        cb = fig.colorbar(im, ax=[fig.axes[-1]], fraction=0.05, pad=0.01, location="bottom")
        cb.ax.tick_params(colors="white", labelsize=7)
    ax = fig.add_subplot(grid[-1, : max(2, len(names) - 2)])
    t = result.times
    prov = maps.provenance
    ax.plot(t, prov["aif"]["measured_hu"], color="tab:red", lw=1, ls="--", label="AIF measured")
    ax.plot(t, result.aif, color="tab:red", lw=2, label="AIF (partial-volume corrected)")
    if result.vof is not None:
        ax.plot(t, result.vof, color="tab:blue", lw=2, label="VOF")
    ax.set_facecolor("black")
    ax.set_xlabel("time s", color="white")
    ax.set_ylabel("enhancement HU", color="white")
    ax.tick_params(colors="white")
    for side in ax.spines.values():
        side.set_color("grey")
    ax.legend(fontsize=8, facecolor="black", labelcolor="white", edgecolor="grey")
    ax.grid(alpha=0.25)
    text = fig.add_subplot(grid[-1, max(2, len(names) - 2):])
    text.axis("off")
    les = prov["lesions"]
    mr = les["mismatch_ratio"]
    vol = {k: volume_text(les, k) for k in ("core", "hypoperfused", "penumbra", "tmax10")}
    lines = [f"method {prov['method']}   rho {prov['constants']['rho_g_per_ml']}   "
             f"kH {prov['constants']['kh']}",
             f"core {vol['core']}  ({les['thresholds']['core']['label']})",
             f"hypoperfused {vol['hypoperfused']}  (Tmax > "
             f"{les['thresholds']['hypoperfused']['tmax_above_s']} s)",
             f"penumbra {vol['penumbra']}   Tmax>10 s {vol['tmax10']}",
             f"mismatch ratio {'-' if mr is None else f'{mr:.1f}'}",
             "outlines: magenta core, white Tmax > threshold", "QC:"]
    raised = [k for k, v in prov["qc"].items() if v["flag"]]
    lines += [f"  ! {k}: {prov['qc'][k]['reason']}" for k in raised] or ["  no flags raised"]
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, color="white",
              family="monospace", wrap=True)
    if title:
        fig.suptitle(title, color="white")
    return fig


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
    import matplotlib.pyplot as plt

    from ctperf import io

    maps = result.maps
    with io.atomic_dir(folder, overwrite=overwrite) as tmp:
        io.write_maps_nifti(maps, tmp)
        masks = {**result.lesions.masks(), "brain": result.brain, "vessels": result.vessels}
        for name, mask in masks.items():
            io.write_volume(mask, maps.affine, tmp / "lesions" / f"{name}.nii.gz")
        io.write_json(io.public_meta({**maps.provenance, "maps": maps.names,
                                      "units": dict(maps.units)}), tmp / "summary.json")
        fig = overview_figure(result, title=title)
        try:
            with io.atomic_file(tmp / "overview.png") as png:
                fig.savefig(png, dpi=110, facecolor="black")
        finally:
            plt.close(fig)
        if dicom_source is not None:
            io.write_maps_dicom(maps, tmp / "dicom", source=dicom_source, anonymise=anonymise)


def run(args: argparse.Namespace) -> int:
    from ctperf import io
    from ctperf.perfusion import analyse_study

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
