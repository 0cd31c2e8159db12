"""Figures comparing estimated maps with a reference (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctperf.types import PerfusionMaps

__all__ = ["DISPLAY_WINDOWS", "comparison_figure"]

#: Display window per map in its physical unit.
DISPLAY_WINDOWS: dict[str, tuple[float, float]] = {
    "cbf": (0.0, 80.0), "cbv": (0.0, 6.0), "mtt": (0.0, 14.0), "tmax": (0.0, 14.0),
    "delay": (0.0, 10.0), "ttp": (0.0, 40.0),
}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if n in estimate and n in reference]
    if mask is None:
        mask = np.ones(reference.shape, dtype=bool)
    if z is None:
        area = mask.sum(axis=(1, 2))
        z = int(np.argmax(area)) if area.any() else reference.shape[0] // 2
    _, dy, dx = reference.spacing
    colours = ("magenta", "white", "cyan", "yellow")
    fig, axes = plt.subplots(3, len(names), figsize=(3.2 * len(names), 9.2), squeeze=False,
                             facecolor="black")
    for j, name in enumerate(names):
        ref = np.where(mask[z], reference[name][z], np.nan)
        est = np.where(mask[z], estimate[name][z], np.nan)
        lo, hi = DISPLAY_WINDOWS.get(name, (float(np.nanmin(ref)), float(np.nanmax(ref))))
        span = hi - lo
        panels = ((ref, f"{name} {labels[1]}", "turbo", lo, hi),
                  (est, f"{name} {labels[0]}", "turbo", lo, hi),
                  (est - ref, f"{labels[0]} - {labels[1]}", "RdBu_r", -span / 2, span / 2))
        for i, (img, label, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[i, j]
            shown = ax.imshow(img, cmap=plt.get_cmap(cmap).with_extremes(bad="black"),
                              vmin=vmin, vmax=vmax, aspect=dy / dx, interpolation="nearest")
            for k, (key, outline) in enumerate((outlines or {}).items()):
                if outline[z].any():
                    ax.contour(outline[z].astype(float), levels=[0.5],
                               colors=colours[k % len(colours)], linewidths=0.8)
                    if i == 0 and j == 0:
                        ax.plot([], [], color=colours[k % len(colours)], label=key)
            ax.set_title(f"{label} [{reference.units[name]}]", color="white", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            bar.ax.tick_params(colors="white", labelsize=7)
    if outlines:
        axes[0, 0].legend(fontsize=7, facecolor="black", labelcolor="white", loc="lower left")
    fig.suptitle(title or f"slice {z}", color="white")
    fig.tight_layout()
    return fig
