"""Quality-control figures of preprocessing (``qc.png`` of ``ctperf preprocess``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctperf.reporting.figures import new_subplots, radiological_axes
from ctperf.reporting.windows import BRAIN_WINDOW_HU
from ctperf.types import RadiologicalView, orientation_known

__all__ = ["motion_qc_figure"]


def _displacement_panel(ax: Any, times: np.ndarray, result: Any, left: np.ndarray | None
                        ) -> None:
    """Displacement from frame 0 against time: corrected, and ``left`` (measured but not
    corrected); a study not registered has none measured, and says so."""
    if getattr(result, "registration", True) is None:
        ax.set_axis_off()
        ax.set_title("motion not measured (not registered)")
        return
    ax.plot(times, result.displacement_mm, label="mean over brain")
    ax.plot(times, result.max_displacement_mm, label="max over brain")
    if left is not None:
        moved = left > 0
        ax.plot(times[moved], left[moved], "rx", ms=8, label="measured, NOT corrected (mean)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("displacement from frame 0 (mm)")
    top = max(float(np.max(result.max_displacement_mm)),
              0.0 if left is None else float(left.max()), 1.0)
    # room above the data for the legend, and below 0 to show lines lying on it
    ax.set_ylim(-0.04 * top, 1.5 * top)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("frame-wise displacement (corrected)" if left is None else
                 "displacement: corrected, and measured but not corrected")


def motion_qc_figure(before: Any, after: Any, result: Any) -> Any:
    """Displacement plot and the middle slice of the most displaced frame, before and after.

    Parameters
    ----------
    before, after : CTPSeries
        The study (T, Z, Y, X) in HU as read and as preprocessed; ``before`` may hold only
        the middle slice of ``after`` (T, 1, Y, X), the one shown.
    result : PreprocessResult
        Output of :func:`ctperf.preprocess.preprocess`: ``displacement_mm`` and
        ``max_displacement_mm`` (T,) over the brain, ``mask`` bool (Z, Y, X).

    Returns
    -------
    matplotlib.figure.Figure
        Four panels: displacement against time, then frame 0 and the most displaced frame
        (the last one when none moved) before and after, in the brain window with the brain outline.
    """
    measured = np.asarray(getattr(result, "uncorrected_mm", np.zeros(0)))
    left = measured if measured.size == before.n_frames and measured.any() else None
    # the frame moved most: corrected, or else measured and left uncorrected
    moved_by = result.displacement_mm if left is None else np.maximum(result.displacement_mm,
                                                                        left)
    # a still study: its last frame, not frame 0 twice
    t = int(np.argmax(moved_by)) if np.any(moved_by > 0) else before.n_frames - 1
    z = after.shape[1] // 2
    z_before = z if before.shape[1] == after.shape[1] else 0  # or only that slice, as read
    low, high = BRAIN_WINDOW_HU
    fig, axes = new_subplots(1, 4, figsize=(16, 4), layout="constrained")
    _displacement_panel(axes[0], before.times, result, left)
    # radiological, as the maps' overview: the patient's right on the image's left
    radio = RadiologicalView.of(before.affine)
    panels = [(before.hu[0, z_before], "frame 0"), (before.hu[t, z_before], f"frame {t} before"),
              (after.hu[t, z], f"frame {t} after")]
    for ax, (img, title) in zip(axes[1:], panels, strict=True):
        ax.imshow(radio(img), cmap="gray", vmin=low, vmax=high, origin="upper")
        ax.contour(radio(result.mask[z]), levels=[0.5], colors="r", linewidths=0.5)
        ax.set_title(f"{title}, slice {z} (W {high - low:g} / L {(high + low) / 2:g})")
        ax.axis("off")
        radiological_axes(ax, mark=True, fontsize=9, known=orientation_known(before.meta))
    return fig
