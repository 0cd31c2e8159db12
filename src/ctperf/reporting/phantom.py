"""The montage of a phantom subject (``preview.png``): frames, true maps, lesion masks and the
AIF/VOF curves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ctperf.phantom.physiology import TERRITORIES
from ctperf.reporting.figures import colormap, new_subplots, radiological_axes
from ctperf.reporting.windows import (
    BRAIN_WINDOW_HU,
    VESSEL_WINDOW_HU,
    display_window,
    map_title,
)
from ctperf.types import RadiologicalView

if TYPE_CHECKING:
    from ctperf.phantom.generate import PhantomSubject

__all__ = ["phantom_preview_figure"]

def phantom_preview_figure(subject: PhantomSubject, *, slice_index: int | None = None) -> Any:
    """A montage of one slice (the middle one by default).

    Panels: baseline frame and the frame of the arterial peak (brain window), the venous-peak
    frame in a vessel window, true CBF, CBV and Tmax, core (red) and penumbra (yellow) over the
    baseline, the vascular territories, and the noise-free AIF and VOF with measured curves.

    Parameters
    ----------
    subject : PhantomSubject
        Output of :func:`ctperf.phantom.generate_subject`.
    slice_index : int, optional
        Slice shown; default the middle one.

    Returns
    -------
    matplotlib.figure.Figure
    """
    s = subject.series
    z = s.hu.shape[1] // 2 if slice_index is None else int(slice_index)
    t_art = int(np.argmax(subject.aif))
    t_ven = int(np.argmax(subject.vof))
    fig, axes = new_subplots(3, 3, figsize=(13, 13))
    gray = {"cmap": "gray", "interpolation": "nearest"}
    brain_lo, brain_hi = BRAIN_WINDOW_HU
    vessel_lo, vessel_hi = VESSEL_WINDOW_HU
    panels: list[tuple[np.ndarray, dict[str, Any], str]] = [
        (s.hu[0, z], {"vmin": brain_lo, "vmax": brain_hi, **gray},
         f"frame 0 ({s.times[0]:.1f} s)"),
        (s.hu[t_art, z], {"vmin": brain_lo, "vmax": brain_hi, **gray},
         f"arterial peak, frame {t_art} ({s.times[t_art]:.1f} s)"),
        (s.hu[t_ven, z], {"vmin": vessel_lo, "vmax": vessel_hi, **gray},
         f"venous peak, frame {t_ven}, vessel window"),
    ]
    for name in ("cbf", "cbv", "tmax"):  # the windows and colours of the maps' overview
        lo, hi = display_window(name)
        panels.append((subject.truth[name][z], {"vmin": lo, "vmax": hi, "cmap": "turbo"},
                       f"true {map_title(name)}"))
    # radiological, as every other figure: the patient's right on the image's left
    radio = RadiologicalView.of(s.affine)
    for ax, (img, kw, title) in zip(axes.flat, panels, strict=False):
        im = ax.imshow(radio(img), **kw)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax = axes[2, 0]
    rgb = np.clip(subject.baseline[z] / brain_hi, 0, 1)[..., None].repeat(3, axis=-1)
    rgb[subject.masks["penumbra"][z]] = [1.0, 0.85, 0.0]
    rgb[subject.masks["core"][z]] = [0.9, 0.05, 0.05]
    rgb[subject.masks["artery"][z]] = [0.1, 0.4, 1.0]
    rgb[subject.masks["vein"][z]] = [0.0, 0.9, 0.9]
    ax.imshow(np.moveaxis(radio(np.moveaxis(rgb, -1, 0)), 0, -1),
              interpolation="nearest")
    vol = subject.params["volumes_ml"]
    ax.set_title(f"core {vol['core']:.0f} mL (red), penumbra {vol['penumbra']:.0f} mL "
                 "(yellow)\nartery (blue), vein (cyan)", fontsize=10)
    ax = axes[2, 1]
    terr = subject.masks["territories"][z].astype(float)
    ax.imshow(radio(np.where(terr > 0, terr, np.nan)), cmap="tab10", vmin=0.5,
              vmax=10.5, interpolation="nearest")
    ax.set_title("vascular territories", fontsize=10)
    from matplotlib.patches import Patch

    tab10 = colormap("tab10")
    present = set(np.unique(terr[terr > 0]).astype(int).tolist())
    ax.legend(handles=[Patch(color=tab10((label - 0.5) / 10.0), label=name.replace("_", " "))
                       for label, name in TERRITORIES.items() if label in present],
              fontsize=7, loc="lower right", ncol=2, frameon=False)
    ax = axes[2, 2]
    ax.plot(subject.fine_times, subject.aif_fine, "r-", lw=1, label="AIF (true, no PV)")
    ax.plot(subject.fine_times, subject.vof_fine, "b-", lw=1, label="VOF")
    art = subject.masks["artery"]
    if art.any():
        ax.plot(s.times, s.hu[:, art].mean(axis=1) - subject.baseline[art].mean(), "r.",
                ms=3, label="artery voxels (measured)")
    gm = subject.masks["gm"] & ~subject.masks["core"] & ~subject.masks["penumbra"]
    if gm.any():
        ax.plot(s.times, 10 * (s.hu[:, gm].mean(axis=1) - subject.baseline[gm].mean()), "g-",
                lw=1, label="GM x 10")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("enhancement (HU)")
    ax.legend(fontsize=8)
    ax.set_title("curves", fontsize=10)
    for a in axes.flat[:8]:  # the territories' panel is on white
        radiological_axes(a, mark=True, color="black" if a is axes[2, 1] else "white",
                          fontsize=9)
    cfg = subject.params["config"]
    fig.suptitle(f"ctperf phantom seed {cfg['seed']}, slice {z}, {cfg['mas']:g} mAs, motion "
                 f"{subject.params['motion_category']}, template {subject.params['template']}")
    fig.tight_layout()
    return fig
