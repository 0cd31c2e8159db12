"""Figures comparing estimated maps with a reference, lesion volumes and training curves
(matplotlib, imported when a figure is drawn).

Every figure of this package is a bare :class:`matplotlib.figure.Figure`, made outside pyplot:
drawing one selects no backend in the caller's session and leaves no figure open there (it is
freed with its last reference); ``fig.savefig`` writes it and Jupyter shows it as it is."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctperf.reporting.windows import colorbar_extend, display_window
from ctperf.types import PerfusionMaps, RadiologicalView, orientation_known

__all__ = [
    "bland_altman_figure",
    "comparison_figure",
    "curves_figure",
    "reduction_figure",
    "save_figure",
    "side_by_side_figure",
    "training_curves_figure",
    "volume_scatter_figure",
]


def new_figure(**options: Any) -> Any:
    """A bare :class:`matplotlib.figure.Figure` (``figsize``, ``facecolor``, ``layout``, ...)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def new_subplots(rows: int = 1, cols: int = 1, *, squeeze: bool = True,
                 **options: Any) -> tuple[Any, Any]:
    """``(figure, axes)`` like ``pyplot.subplots`` but on :func:`new_figure` (``options`` go to
    the figure)."""
    fig = new_figure(**options)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def colormap(name: str) -> Any:
    """The registered matplotlib colour map ``name``."""
    from matplotlib import colormaps

    return colormaps[name]


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int,
                facecolor: str | None = None) -> None:
    """Write a figure as PNG in one atomic step.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : path
        Output file (written whole or not at all, see :func:`ctperf.io.atomic_file`).
    dpi : int
        Resolution in dots per inch.
    facecolor : str, optional
        Background; by default matplotlib's (white).
    """
    from ctperf.io import atomic_file

    with atomic_file(path) as tmp:
        options = {} if facecolor is None else {"facecolor": facecolor}
        fig.savefig(tmp, dpi=dpi, format="png", **options)


def comparison_figure(estimate: PerfusionMaps, reference: PerfusionMaps, *,
                      names: Sequence[str] = ("cbf", "cbv", "tmax"), z: int | None = None,
                      mask: np.ndarray | None = None,
                      outlines: Mapping[str, np.ndarray] | None = None,
                      labels: tuple[str, str] = ("estimate", "truth"), title: str = "") -> Any:
    """Reference, estimate and their difference for each map on one slice.

    Parameters
    ----------
    estimate, reference : PerfusionMaps
        Same grid.
    names : sequence of str
        Maps to show (one column each; those missing on either side are skipped).
    z : int, optional
        Slice; by default the one with the largest ``mask`` area (or the middle one).
    mask : bool ndarray (Z, Y, X), optional
        Voxels to show; others are blank.
    outlines : mapping of str to bool ndarray (Z, Y, X), optional
        Contours drawn on every panel, e.g. true core and penumbra; one colour each.
    """
    names = [n for n in names if n in estimate and n in reference]
    if mask is None:
        mask = np.ones(reference.shape, dtype=bool)
    if z is None:
        area = mask.sum(axis=(1, 2))
        z = int(np.argmax(area)) if area.any() else reference.shape[0] // 2
    _, dy, dx = reference.spacing
    radio = RadiologicalView.of(reference.affine)
    colours = ("magenta", "white", "cyan", "yellow")
    fig, axes = new_subplots(3, len(names), figsize=(3.2 * len(names), 9.2), squeeze=False,
                             facecolor="black")
    for j, name in enumerate(names):
        ref = radio(np.where(mask[z], reference[name][z], np.nan))
        est = radio(np.where(mask[z], estimate[name][z], np.nan))
        lo, hi = display_window(name, ref)
        span = hi - lo
        panels = ((ref, f"{name} {labels[1]}", "turbo", lo, hi),
                  (est, f"{name} {labels[0]}", "turbo", lo, hi),
                  (est - ref, f"{labels[0]} - {labels[1]}", "RdBu_r", -span / 2, span / 2))
        for i, (img, label, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[i, j]
            shown = ax.imshow(img, cmap=colormap(cmap).with_extremes(bad="black"),
                              vmin=vmin, vmax=vmax, aspect=radio.aspect(dy, dx),
                              interpolation="nearest")
            drawn = [(k, key, outline) for k, (key, outline) in enumerate((outlines or {}).items())
                     if outline[z].any()]
            # the first outline (the core) on top: a penumbra's edge runs along it
            for k, _, outline in reversed(drawn):
                ax.contour(radio(outline[z]).astype(float), levels=[0.5],
                           colors=colours[k % len(colours)], linewidths=0.8)
            if i == 0 and j == 0:
                for k, key, _ in drawn:
                    ax.plot([], [], color=colours[k % len(colours)], label=key)
            ax.set_title(f"{label} [{reference.units[name]}]", color="white", fontsize=9)
            radiological_axes(ax, mark=j == 0, known=orientation_known(reference.provenance))
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02,
                               extend=colorbar_extend(img, (vmin, vmax)))
            bar.ax.tick_params(colors="white", labelsize=7)
    fig.suptitle(title or f"slice {z}", color="white")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    if outlines:
        _outline_legend(fig, axes[0, 0], fontsize=7)
    return fig


def _outline_legend(fig: Any, ax: Any, *, fontsize: int) -> None:
    """The outlines' colours in the figure's top left corner, beside the title: over a panel
    they hide the brain's edge."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.005, 0.995),
                   fontsize=fontsize, facecolor="black", labelcolor="white", frameon=False)


def radiological_axes(ax: Any, *, mark: bool, color: str = "white", fontsize: int = 8,
                      known: bool = True) -> None:
    """No ticks; with ``mark`` an "R" at the patient's right (the slice is shown
    radiologically, :class:`~ctperf.types.RadiologicalView`), or "L/R unknown" there when
    the orientation is not ``known`` (:func:`orientation_known`)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if mark:
        ax.text(0.02, 0.98, "R" if known else "L/R unknown", transform=ax.transAxes,
                color=color, fontsize=fontsize if known else max(fontsize - 2, 5), va="top")


def side_by_side_figure(readings: Sequence[tuple[str, PerfusionMaps]], *,
                        names: Sequence[str] = ("cbv", "cbf", "delay", "tmax"),
                        z: int | None = None, mask: np.ndarray | None = None,
                        outlines: Mapping[str, np.ndarray] | None = None,
                        title: str = "") -> Any:
    """One slice of several readers' maps and the first one's differences (paper, Figures 2-3).

    Parameters
    ----------
    readings : sequence of (label, PerfusionMaps)
        The estimate first (e.g. the prediction), then its references (e.g. NLR, truth); same
        grid. Rows: each reader, then ``estimate - reference`` for every reference.
    names : sequence of str
        Maps to show, one column each (those missing anywhere are skipped).
    z : int, optional
        Slice; by default the one with the largest ``mask`` area.
    mask : bool ndarray (Z, Y, X), optional
        Voxels to show (e.g. the brain); others are blank.
    outlines : mapping of str to bool ndarray (Z, Y, X), optional
        Contours drawn on every map panel (e.g. the reference core and hypoperfused region).
    """
    first = readings[0][1]
    names = [n for n in names if all(n in m for _, m in readings)]
    if mask is None:
        mask = np.ones(first.shape, dtype=bool)
    if z is None:
        area = mask.sum(axis=(1, 2))
        z = int(np.argmax(area)) if area.any() else first.shape[0] // 2
    _, dy, dx = first.spacing
    radio = RadiologicalView.of(first.affine)
    label0 = readings[0][0]
    rows = [(label, m, False) for label, m in readings]
    rows += [(f"{label0} - {label}", m, True) for label, m in readings[1:]]
    colours = ("magenta", "white", "cyan", "yellow")
    fig, axes = new_subplots(len(rows), max(len(names), 1), squeeze=False, facecolor="black",
                             figsize=(2.9 * max(len(names), 1), 2.7 * len(rows)))
    for j, name in enumerate(names):
        lo, hi = display_window(name, np.where(mask[z], first[name][z], np.nan))
        for i, (label, maps, is_diff) in enumerate(rows):
            ax = axes[i, j]
            img = np.where(mask[z], maps[name][z], np.nan)
            if is_diff:
                img = np.where(mask[z], first[name][z], np.nan) - img
                cmap, vmin, vmax = "RdBu_r", -(hi - lo) / 2, (hi - lo) / 2
            else:
                cmap, vmin, vmax = "turbo", lo, hi
            shown = ax.imshow(radio(img),
                              cmap=colormap(cmap).with_extremes(bad="black"),
                              vmin=vmin, vmax=vmax, aspect=radio.aspect(dy, dx),
                              interpolation="nearest")
            if not is_diff:
                for k, (key, outline) in enumerate((outlines or {}).items()):
                    if outline[z].any():
                        ax.contour(radio(outline[z]).astype(float), levels=[0.5],
                                   colors=colours[k % len(colours)], linewidths=0.8)
                    if i == 0 and j == 0:
                        ax.plot([], [], color=colours[k % len(colours)], label=key)
            ax.set_title(f"{name} {label} [{first.units.get(name, '')}]", color="white",
                         fontsize=8)
            radiological_axes(ax, mark=j == 0, known=orientation_known(first.provenance))
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02,
                               extend=colorbar_extend(img, (vmin, vmax)))
            bar.ax.tick_params(colors="white", labelsize=6)
    fig.suptitle(title or f"slice {z}", color="white")
    fig.subplots_adjust(left=0.02, right=0.95, bottom=0.02, top=0.93, wspace=0.15, hspace=0.18)
    if outlines and names:
        _outline_legend(fig, axes[0, 0], fontsize=6)
    return fig


def _panel_grid(n: int, *, width: float = 3.6, height: float = 3.2) -> tuple[Any, Any]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = new_subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def bland_altman_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """Bland-Altman plots of lesion volumes (paper, Figure 7): one panel per Table 2 row.

    Parameters
    ----------
    rows : sequence of mapping
        Lesion rows of :func:`ctperf.evaluation.cohort.evaluate_readers` (``lesion``,
        ``estimate``, ``reference``, ``cases`` with volumes in mL, ``volumes.bland_altman``).
    """
    fig, axes = _panel_grid(len(rows))
    for ax, row in zip(axes, rows, strict=False):
        a = np.array([c["volume_estimate_ml"] for c in row["cases"].values()])
        b = np.array([c["volume_reference_ml"] for c in row["cases"].values()])
        ba = row["volumes"]["bland_altman"]
        ax.scatter((a + b) / 2, a - b, s=18, color="tab:blue")
        lines = [(v, style, text, va) for v, style, text, va in (
            (ba["bias"], "-", "bias", "bottom"), (ba["loa_low"], "--", "-1.96 SD", "bottom"),
            (ba["loa_high"], "--", "+1.96 SD", "top")) if np.isfinite(v)]
        if len(lines) == 3 and lines[1][0] == lines[2][0]:  # no spread: one line, one label
            lines = [(lines[0][0], "-", "bias = limits", "bottom")]
        for value, style, text, va in lines:
            ax.axhline(value, color="tab:red", linestyle=style, linewidth=1)
            # +1.96 SD labelled under its line, the others over it: inside the frame
            ax.annotate(f"{text} {value:.1f}", (0.99, value), xycoords=("axes fraction",
                        "data"), ha="right", va=va, fontsize=7, color="tab:red")
        ax.axhline(0, color="grey", linewidth=0.6)
        ys = np.concatenate([a - b, [v for v, *_ in lines], [0.0]])
        ys = ys[np.isfinite(ys)]
        low, high = float(ys.min()), float(ys.max())
        pad = max(0.15 * (high - low), 0.5)  # mL: an all-zero panel spans -0.5 to 0.5
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("mean volume (mL)", fontsize=8)
        ax.set_ylabel(f"{row['estimate']} - {row['reference']} (mL)", fontsize=8)
        ax.set_title(f"{row['lesion']}: {row['estimate']} vs {row['reference']}", fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def volume_scatter_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """Lesion volumes of an estimate against its reference, with the identity line and r."""
    fig, axes = _panel_grid(len(rows), width=3.3)
    for ax, row in zip(axes, rows, strict=False):
        a = np.array([c["volume_estimate_ml"] for c in row["cases"].values()])
        b = np.array([c["volume_reference_ml"] for c in row["cases"].values()])
        top = float(max(a.max(initial=0), b.max(initial=0))) * 1.05 or 1.0
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.scatter(b, a, s=18, color="tab:green")
        r = row["volumes"]["pearson_r"]
        ax.set_title(f"{row['lesion']}: r = {r:.2f}" if np.isfinite(r) else row["lesion"],
                     fontsize=9)
        ax.set_xlabel(f"{row['reference']} (mL)", fontsize=8)
        ax.set_ylabel(f"{row['estimate']} (mL)", fontsize=8)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves_figure(log: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """Training and validation loss per epoch from a training log (``log.csv`` rows).

    Parameters
    ----------
    log : sequence of mapping
        Rows with ``epoch``, ``stage``, ``train_loss`` and ``val_loss`` (numbers or strings;
        empty validation losses are skipped).
    """
    fig, ax = new_subplots(figsize=(6.4, 3.6))
    stages = list(dict.fromkeys(str(r.get("stage", "")) for r in log))
    for k, stage in enumerate(stages):
        rows = [r for r in log if str(r.get("stage", "")) == stage]
        kind = str(rows[0].get("loss_function") or "mse").upper()  # older logs: MSE
        for key, style, what in (("train_loss", "-", f"train ({kind})"),
                                 ("val_loss", "--", "val (MSE)")):
            pts = [(float(r["epoch"]), float(r[key])) for r in rows
                   if str(r.get(key, "")).strip() not in ("", "nan")]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, style, color=f"C{k}", label=f"{stage} {what}".strip())
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss on [0, 1] maps")
    ax.legend(fontsize=8)
    ax.set_title(title or "training curves", fontsize=10)
    fig.tight_layout()
    return fig


#: Panels of :func:`reduction_figure`: (map or lesion, key of the row, axis label).
_REDUCTION_PANELS = (("cbv", "pearson_r", "CBV: r vs truth"),
                     ("cbf", "pearson_r", "CBF: r vs truth"),
                     ("tmax", "pearson_r", "Tmax: r vs truth"),
                     ("cbf", "mae", "CBF: MAE (mL/100 g/min)"),
                     ("hypoperfused", "dice", "hypoperfused lesion: Dice"),
                     ("hypoperfused", "volume_abs_error_ml", "hypoperfused: |volume error| (mL)"))


def reduction_figure(doc: Mapping[str, Any], *, title: str = "") -> Any:
    """The reduced-data experiment (:func:`ctperf.workflow.reduction.run_reduction`): one
    panel per figure of merit, the acquisition conditions along x, one line per estimate."""
    conditions = list(doc["conditions"])
    rows = doc["rows"]
    estimates = list(dict.fromkeys(r["estimate"] for r in rows))
    fig, axes = _panel_grid(len(_REDUCTION_PANELS), width=4.0, height=3.0)
    x = np.arange(len(conditions))
    for ax, (what, key, label) in zip(axes, _REDUCTION_PANELS, strict=False):
        for k, estimate in enumerate(estimates):
            values = []
            for c in conditions:
                row = next((r for r in rows if r["estimate"] == estimate and r["condition"] == c
                            and what in (r.get("map"), r.get("lesion"))), None)
                value = None if row is None else row.get(key)
                values.append(np.nan if value is None else value)
            neural = estimate.startswith("U-Net")
            ax.plot(x, values, marker="o" if neural else ".", linewidth=2.0 if neural else 1.0,
                    linestyle="-" if neural else "--", color=f"C{k}", label=estimate)
        ax.set_xticks(x, [c.replace(", ", ",\n") for c in conditions], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96 if title else 1))
    return fig


def curves_figure(times: np.ndarray, fit: Any, names: Sequence[str], *, title: str = "",
                  most: int = 12) -> Any:
    """The curves :func:`ctperf.perfusion.fit_curves` read (not its model's curves): the AIF
    (after any partial-volume scaling) and the VOF on the left, the tissue curves on the right with
    their CBF, Tmax and flags in the legend (the first ``most`` of them), the baseline frames
    shaded.

    Parameters
    ----------
    times : ndarray, shape (T,)
        Frame times, s (drawn from the first frame: clock times start at 0).
    fit : ctperf.perfusion.CurveFit
    names : sequence of str
        The tissue curves' names.
    """
    times = np.asarray(times, dtype=np.float64) - float(times[0])
    fig, (left, right) = new_subplots(1, 2, figsize=(11.0, 4.2))
    pv = fit.provenance.get("partial_volume", {})
    factor = float(pv.get("factor") or 1.0) if pv.get("corrected") else 1.0
    label = f"AIF x {factor:.2f} (scaled to the VOF's area)" if factor > 1.005 else "AIF"
    left.plot(times, fit.aif, color="tab:red", label=label)
    if fit.vof is not None:
        left.plot(times, fit.vof, color="tab:blue", label="VOF")
    n = min(len(names), most)
    # tab20 without its blues and reds, the VOF's and the AIF's colours beside
    palette = [c for i, c in enumerate(colormap("tab20").colors) if i not in (0, 1, 6, 7)]
    colours = [palette[i % len(palette)] for i in range(n)]
    for i in range(n):
        right.plot(times, fit.tissue[:, i], color=colours[i], linewidth=1.2,
                   label=f"{names[i]}: CBF {fit.cbf[i]:.1f}, Tmax {fit.tmax[i]:.1f} s"
                   + ("".join(f" [{f.replace('_', ' ')}]" for f in fit.flags[i])
                      if i < len(fit.flags) else ""))
    n_base = int(fit.provenance.get("baseline_frames") or 0)
    for ax in (left, right):
        if n_base > 1:
            ax.axvspan(times[0], times[n_base - 1], color="0.9", zorder=0,
                       label="baseline" if ax is left else None)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xlabel("time from the first frame (s)", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in (left, right):
        ax.set_ylabel("enhancement (input units)", fontsize=9)
    left.set_title("arterial and venous curves" if fit.vof is not None else "arterial curve",
                   fontsize=10)
    shown = f" (first {n} of {len(names)})" if n < len(names) else ""
    right.set_title(f"tissue curves{shown}", fontsize=10)
    for ax, size in ((left, 7), (right, 6)):  # room above the peaks for the legend
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.45 * (high - low))
        ax.legend(fontsize=size, loc="upper right")
    fig.suptitle(title or f"{fit.provenance.get('method', '')}: CBF mL/100g/min, Tmax s",
                 fontsize=11)
    fig.tight_layout()
    return fig
