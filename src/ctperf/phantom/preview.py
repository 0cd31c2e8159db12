"""PNG montage of a phantom subject (drawn by :func:`ctperf.reporting.phantom_preview_figure`)."""

from __future__ import annotations

import os
from pathlib import Path

from ctperf.phantom.generate import PhantomSubject

__all__ = ["write_preview"]


def write_preview(subject: PhantomSubject, path: str | os.PathLike[str], *,
                  slice_index: int | None = None, dpi: int = 80) -> Path:
    """Write a montage of one slice (the middle one by default) as PNG.

    Panels: baseline frame and the frame of the arterial peak (brain window 0-80 HU), the
    venous-peak frame in a vessel window, true CBF, CBV and Tmax, core (red) and penumbra
    (yellow) over the baseline, and the noise-free AIF and VOF.
    """
    from ctperf.reporting import phantom_preview_figure, save_figure

    save_figure(phantom_preview_figure(subject, slice_index=slice_index), path, dpi=dpi)
    return Path(path)
