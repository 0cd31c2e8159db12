"""The maps overview of one study (``overview.png`` of ``ctperf maps``): maps of up to four
slices with lesion outlines, the AIF and VOF, lesion volumes and QC flags; with uncertainty
maps (``bayes``), the same figure of them (``uncertainty.png``); where the AIF and VOF were
chosen automatically, the voxels chosen (``vessels.png``)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctperf.reporting.figures import colormap, new_figure, radiological_axes
from ctperf.reporting.windows import colorbar_extend, display_window, map_title
from ctperf.types import RadiologicalView, orientation_known, radiological_flips

__all__ = ["maps_overview", "radiological_flips", "vessels_overview", "volume_text"]

#: Maps shown, one column each, when present.
_OVERVIEW_MAPS: tuple[str, ...] = ("cbf", "cbv", "mtt", "tmax", "ttp")
#: Maps that carry the lesion outlines.
_OUTLINED = ("cbf", "tmax", "cbv")
#: The summary's font (monospace, points) and its characters per inch and lines per inch.
_TEXT_PT = 8
_CHARS_PER_INCH = 72 / (0.65 * _TEXT_PT)  # DejaVu Sans Mono: 0.60-0.63 em, as rendered
_LINES_PER_INCH = 72 / (1.2 * _TEXT_PT)


def volume_text(lesions: Mapping[str, Any], name: str) -> str:
    """``"12.3 mL"``, or ``"12.3 +- 1.4 mL"`` when the summary holds the volume's SD.

    Parameters
    ----------
    lesions : mapping
        Lesion summary (``provenance["lesions"]`` of the maps): ``volumes_ml`` and optionally
        ``volumes_sd_ml``.
    name : str
        Lesion name (``core``, ``hypoperfused``, ``penumbra``, ``tmax10``).
    """
    sd = (lesions.get("volumes_sd_ml") or {}).get(name)
    value = lesions["volumes_ml"][name]
    return f"{value:.1f} mL" if sd is None else f"{value:.1f} +- {sd:.1f} mL"


def _summary_lines(prov: Mapping[str, Any], width: int) -> list[str]:
    """The summary beside the curves, wrapped to ``width`` characters."""
    les = prov["lesions"]
    mr = les["mismatch_ratio"]
    hir = les.get("hypoperfusion_intensity_ratio")  # absent from summaries before it
    vol = {k: volume_text(les, k) for k in ("core", "hypoperfused", "penumbra", "tmax10")}
    lines = [f"method {prov['method']}   rho {prov['constants']['rho_g_per_ml']}   "
             f"kH {prov['constants']['kh']}",
             f"core {vol['core']}  ({les['thresholds']['core']['label']})",
             f"hypoperfused {vol['hypoperfused']}  "
             f"(Tmax > {les['thresholds']['hypoperfused']['tmax_above_s']} s)",
             f"penumbra {vol['penumbra']}   "
             f"Tmax>{les['thresholds']['tmax10']['tmax_above_s']:g} s {vol['tmax10']}",
             f"mismatch ratio {'-' if mr is None else f'{mr:.1f}'}   "
             f"hypoperfusion intensity ratio {'-' if hir is None else f'{hir:.2f}'}",
             "outlines: magenta core, white Tmax > threshold", "QC:"]
    raised = [k for k, v in prov["qc"].items() if v["flag"]]
    # names only: each reason is a paragraph, and five of them ran off the figure, hiding the
    # last flags raised; the reasons are in summary.json
    flags = ["  ".join(f"!\u00a0{k}" for k in raised), "(the reasons: summary.json, under qc)"]
    # a value kept with its unit, and a threshold with its comparison, on a narrow column
    kept = [re.sub(r" ?([<>]) ", "\u00a0\\1\u00a0", re.sub(r"(?<=\d) (?=(mL|s)\b)", "\u00a0", line))
            for line in lines]
    wrapped = [part for line in kept
               for part in textwrap.wrap(line, width, subsequent_indent="  ")]
    for line in flags if raised else ["no flags raised"]:
        wrapped += textwrap.wrap(line, width, initial_indent="  ", subsequent_indent="  ")
    return [line.replace("\u00a0", " ") for line in wrapped]


def _shown_slices(brain: np.ndarray, lesion: np.ndarray, most: int = 4) -> list[int]:
    """Up to ``most`` slices, in order: those holding the most lesion voxels, then those of
    the largest brain area (the largest brain alone had left out the slices that held half
    of a high lesion's core, and could have shown none of it)."""
    area = brain.sum(axis=(1, 2))
    held = (lesion & brain).sum(axis=(1, 2))
    order = np.lexsort((-area, -held))[:most]  # the last key ranks first
    return sorted(int(z) for z in order if area[z] > 0) or [brain.shape[0] // 2]


def maps_overview(result: Any, *, title: str = "",
                  names: tuple[str, ...] = _OVERVIEW_MAPS) -> Any:
    """A matplotlib Figure: maps of up to 4 slices with lesion outlines, AIF/VOF, volumes, QC.

    Parameters
    ----------
    result : PerfusionResult
        Output of :func:`ctperf.perfusion.run_perfusion`: maps (Z, Y, X) with their provenance
        (AIF, lesion summary, QC), ``brain`` and ``vessels`` masks, lesions, times (T,) in s,
        and the AIF and VOF (T,) in HU of enhancement.
    title : str
        Figure title.
    names : tuple of str
        Maps shown, one column each, those present (e.g. :data:`~ctperf.perfusion.SD_MAPS`
        for the uncertainty maps, shown in the study's own range).

    Returns
    -------
    matplotlib.figure.Figure
        Black background; the four slices holding the most lesion (then the largest brain
        area; :func:`_shown_slices`), shown radiologically. Colour
        limits from :data:`ctperf.reporting.windows.DISPLAY_WINDOWS`, over brain voxels outside
        vessels for maps shown in the study's own range.
    """
    maps = result.maps
    names = tuple(n for n in names if n in maps)
    slices = _shown_slices(result.brain, result.lesions.hypoperfused | result.lesions.core)
    radio = RadiologicalView.of(maps.affine)
    _, dy, dx = maps.spacing
    # At least three columns: the curves take two and the text one when few maps are shown.
    columns = max(3, len(names))
    split = max(2, columns - 2)
    brain_any = result.brain.any(axis=0)
    rows = np.flatnonzero(brain_any.any(axis=1))
    cols = np.flatnonzero(brain_any.any(axis=0))
    r0, r1 = max(rows[0] - 2, 0), rows[-1] + 3
    c0, c1 = max(cols[0] - 2, 0), cols[-1] + 3
    # The figure is sized to its content (inches): each map as tall as the cropped brain is for
    # its width, room for the column titles, the colour bars and the title, and no more.
    cell_w = 2.8
    high, wide = radio(np.empty((r1 - r0, c1 - c0))).shape
    map_h = cell_w * high * radio.aspect(dy, dx) / wide
    prov = maps.provenance
    summary = _summary_lines(prov, int((cell_w * (columns - split) - 0.2) * _CHARS_PER_INCH))
    heights = [map_h] * len(slices) + [max(2.9, (len(summary) + 1) / _LINES_PER_INCH)]
    gap, top, bottom = 0.1, 0.7, 0.45  # gap: of the mean row's height
    fig_w = cell_w * columns + 0.85
    fig_h = sum(heights) * (1 + gap * len(slices) / len(heights)) + top + bottom
    fig = new_figure(figsize=(fig_w, fig_h), facecolor="black")
    grid = fig.add_gridspec(len(slices) + 1, columns, height_ratios=heights, hspace=gap,
                            wspace=0.04, left=0.75 / fig_w, right=1 - 0.1 / fig_w,
                            top=1 - top / fig_h, bottom=bottom / fig_h)

    def view(a: Any) -> Any:
        return radio(a[r0:r1, c0:c1])

    for j, name in enumerate(names):
        shown_values = maps[name][result.brain & ~result.vessels]
        window = display_window(name, shown_values)
        cmap = colormap("turbo").with_extremes(bad="black")
        for i, z in enumerate(slices):
            ax = fig.add_subplot(grid[i, j])
            im = ax.imshow(view(maps[name][z]), cmap=cmap, vmin=window[0], vmax=window[1],
                           interpolation="nearest", aspect=radio.aspect(dy, dx))
            for mask, colour in ((result.lesions.hypoperfused, "white"),
                                 (result.lesions.core, "magenta")):
                m = view(mask[z]).astype(float)
                if m.any() and name.removesuffix("_sd") in _OUTLINED:
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=1.0)
            # the patient's right, in the corner the elliptical head leaves free
            radiological_axes(ax, mark=j == 0, fontsize=9, known=orientation_known(prov))
            if j == 0:
                ax.set_ylabel(f"slice {z}", color="white")
            if i == 0:
                ax.set_title(map_title(name), color="white", fontsize=10)
        cb = fig.colorbar(im, ax=[fig.axes[-1]], fraction=0.05, pad=0.01, location="bottom",
                          shrink=0.85, extend=colorbar_extend(shown_values, window))
        cb.ax.tick_params(colors="white", labelsize=7)
    ax = fig.add_subplot(grid[-1, :split])
    t = result.times
    corrected = bool(prov.get("partial_volume", {}).get("corrected"))
    if corrected:  # else the AIF used is the measured one: one curve, named as it is
        ax.plot(t, prov["aif"]["measured_hu"], color="tab:red", lw=1, ls="--",
                label="AIF measured")
    ax.plot(t, result.aif, color="tab:red", lw=2,
            label="AIF (partial-volume corrected)" if corrected else "AIF (not corrected)")
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
    text = fig.add_subplot(grid[-1, split:])
    text.axis("off")
    text.text(0.0, 1.0, "\n".join(summary), va="top", ha="left", fontsize=_TEXT_PT,
              color="white", family="monospace")
    if title:
        fig.suptitle(title, color="white", y=1 - 0.1 / fig_h, va="top")
    return fig


def _vessel_voxels(provenance: Mapping[str, Any], shape: tuple[int, int, int]
                  ) -> dict[str, np.ndarray]:
    """The voxels (Z, Y, X) masks of the AIF and the VOF that were chosen automatically
    (``provenance["aif"|"vof"]["voxels_zyx"]``); a curve or mask given has none."""
    out = {}
    for name in ("aif", "vof"):
        zyx = np.asarray(provenance.get(name, {}).get("voxels_zyx", []), dtype=np.intp)
        if zyx.size:
            mask = np.zeros(shape, dtype=bool)
            mask[tuple(zyx.reshape(-1, 3).T)] = True
            out[name] = mask
    return out


def vessels_overview(result: Any, *, title: str = "", most: int = 4) -> Any | None:
    """A matplotlib Figure: the voxels the AIF (red) and the VOF (blue; grey when it was
    rejected and scaled nothing) were taken from, on the CBV map in grey, in the (up to
    ``most``) slices holding the most of them, shown radiologically; None when neither was
    chosen automatically.

    The AIF's choice judges each voxel's curve, not its place (docs/methods.md): this is where
    a reader checks that it sits on an artery and the VOF on a large vein (the superior
    sagittal sinus), not on a streak, bone or the skull's edge."""
    maps = result.maps
    chosen = _vessel_voxels(maps.provenance, maps.shape)
    if not chosen:
        return None
    counts = sum(m.sum(axis=(1, 2)) for m in chosen.values())
    slices = sorted(int(z) for z in np.argsort(-counts, kind="stable")[:most] if counts[z])
    radio = RadiologicalView.of(maps.affine)
    _, dy, dx = maps.spacing
    shown = result.brain | result.vessels | np.logical_or.reduce(list(chosen.values()))
    rows = np.flatnonzero(shown.any(axis=(0, 2)))
    cols = np.flatnonzero(shown.any(axis=(0, 1)))
    box = (slice(max(rows[0] - 2, 0), rows[-1] + 3), slice(max(cols[0] - 2, 0), cols[-1] + 3))
    cbv = np.where(shown, maps["cbv"], np.nan)
    # grey up to tissue's high values, so grey and white matter show and vessels stand white
    tissue = maps["cbv"][result.brain & ~result.vessels]
    tissue = tissue[np.isfinite(tissue)]
    top = float(np.percentile(tissue, 99.0)) if tissue.size else 0.0
    cell = 3.4
    high, wide = radio(np.empty(maps.shape[1:])[box]).shape
    fig = new_figure(figsize=(cell * len(slices) + 0.2,
                              cell * high * radio.aspect(dy, dx) / wide + 0.9),
                     facecolor="black", layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    prov = maps.provenance
    # a VOF found but not used (rejected: no partial-volume scaling) is drawn apart
    used = prov.get("vof", {}).get("used", True) is not False
    styles = {"aif": ("tab:red", "AIF"),
              "vof": ("deepskyblue", "VOF") if used else ("darkgrey", "VOF (rejected)")}
    for ax, z in zip(axes, slices, strict=True):
        ax.imshow(radio(cbv[z][box]), cmap=colormap("gray").with_extremes(bad="black"),
                  vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest",
                  aspect=radio.aspect(dy, dx))
        parts = []
        for name, mask in chosen.items():
            ys, xs = np.nonzero(radio(mask[z][box]))
            colour, label = styles[name]
            if ys.size:
                ax.scatter(xs, ys, s=36, facecolors="none", edgecolors=colour, linewidths=1.3)
                parts.append(f"{label} {ys.size}")
        radiological_axes(ax, mark=True, fontsize=9, known=orientation_known(prov))
        ax.set_title(f"slice {z}: " + ", ".join(parts), color="white", fontsize=9)
    total = ", ".join(f"{styles[n][1]} {int(m.sum())} voxels" for n, m in chosen.items())
    # the U-Net's maps show the reference run's curves (it uses none), and say so
    notes = [n for n in (prov.get("partial_volume", {}).get("reason", ""),
                         prov.get("curves_from", "")) if n]
    fig.suptitle(f"{title + ': ' if title else ''}{total} (on CBV)"
                 + "".join(f"; {n}" for n in notes), color="white", fontsize=9, wrap=True)
    return fig
