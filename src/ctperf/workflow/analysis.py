"""One study's model-based analysis as the paper did it: register -> filter -> perfusion maps."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.filter_options import filters_by_default
from ctperf.types import CTPSeries

log = logging.getLogger(__name__)

__all__ = ["analyse_study", "preprocessed_before"]


def preprocessed_before(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The record ``ctperf preprocess`` left in a study's meta (``registered``, ``filtered``),
    or {} for a study it did not write."""
    record = meta.get("preprocess")
    return dict(record) if isinstance(record, Mapping) else {}


def analyse_study(series: CTPSeries, *, method: str = "nlr-fast", register: bool = True,
                  filter: bool | None = None, spatial_sigma_mm: float = 3.0,
                  range_sigma_hu: float = 20.0, filter_weights: str = "linear",
                  workers: int | None = None, progress: bool = False,
                  **perfusion_options: Any) -> tuple[Any, Any]:
    """Preprocess a study and compute its perfusion maps.

    Frames are registered to the first (rigid), then filtered with the bilateral filter guided
    by the temporal mean; tissue is fitted on the filtered study while the AIF, VOF and vessel
    voxels are found on the registered, unfiltered one (filtering blurs 2-4 mm vessels into the
    tissue around them, which lowers the AIF peak and the VOF area).

    Parameters
    ----------
    series : CTPSeries
        Raw study, HU (T, Z, Y, X).
    method : str
        Perfusion method of :func:`~ctperf.perfusion.run_perfusion`.
    register : bool
        Rigid motion correction; with both steps off this is :func:`run_perfusion` alone.
    filter : bool, optional
        The bilateral filter; None: :func:`filters_by_default` (on for every method but
        ``bayes``).
    spatial_sigma_mm, range_sigma_hu : float
        The bilateral filter's sigmas in mm and HU (the paper's 3 mm and 20 HU).
    filter_weights : {"linear", "quadratic"}
        The bilateral grid's weights (``filter_weights`` of
        :func:`~ctperf.preprocess.bilateral_filter`).
    workers : int, optional
        Frames registered at once (default: one per CPU core).
    progress : bool
        Progress bars.
    **perfusion_options
        Further keyword arguments of :func:`~ctperf.perfusion.run_perfusion`.

    Returns
    -------
    (PerfusionResult, PreprocessResult or None)
        The maps and, when registration ran, the motion estimate. The maps' provenance says
        whether the study was ``registered`` and ``filtered`` (here, or before by ``ctperf
        preprocess``, whose record in ``series.meta["preprocess"]`` is kept as
        ``preprocessed_before``) and holds the filter's settings.
    """
    from ctperf.perfusion import run_perfusion

    done = preprocessed_before(series.meta)
    motion = None
    if register:
        motion = _register(series, workers=workers, progress=progress)
        series = motion.series
        perfusion_options.setdefault("motion_mm", motion.displacement_mm)
        perfusion_options.setdefault("uncorrected_motion_mm", motion.uncorrected_mm)
    if filter is None:
        filter = filters_by_default(method)
    elif filter and not filters_by_default(method):
        log.warning("%s on a filtered study: its spatial prior pools the neighbours itself, and "
                    "its uncertainty maps and volume SDs leave out what the filter smoothed "
                    "away (too small: docs/bayes.md, \"Filtered studies\")", method)
    before = series.meta.get("bilateral") if done.get("filtered") else None
    if filter:
        if done.get("filtered"):
            log.warning("the study was filtered before (by ctperf preprocess) and is filtered "
                        "again: its noise is smoothed twice and its vessels are searched on it "
                        "filtered once")
        perfusion_options.setdefault("vessel_series", series)  # vessels from the unfiltered study
        series = _filter(series, spatial_sigma_mm=spatial_sigma_mm,
                         range_sigma_hu=range_sigma_hu, filter_weights=filter_weights,
                         progress=progress)
    try:
        result = run_perfusion(series, method=method, progress=progress, **perfusion_options)
    except ValidationError as err:
        left = _uncorrected_frames(motion)
        if left:  # the moved frames, not the bolus or the vessels, are then the likely cause
            raise ValidationError(f"{left}; mapping then failed: {err}") from err
        raise
    provenance = {**result.maps.provenance,
                  "preprocessed": bool(register or filter or done.get("registered")
                                       or done.get("filtered")),
                  "registered": bool(register or done.get("registered")),
                  "filtered": bool(filter or done.get("filtered"))}
    if done:
        provenance["preprocessed_before"] = {k: bool(done.get(k))
                                             for k in ("registered", "filtered")}
    # the filter's settings as the filter records them: this run's, and an earlier run's
    if filter:
        provenance["filter"] = dict(series.meta["bilateral"])
    if isinstance(before, dict):
        provenance["filter_before" if filter else "filter"] = dict(before)
    # the AIF and VOF of a study filtered here are read on it unfiltered; one filtered before
    # holds only its filtered voxels (fewer, more diluted arteries stand out)
    provenance["vessels_searched_on"] = (
        "the study filtered before" if done.get("filtered") else
        "the study unfiltered" if filter else "the study as given")
    return dataclasses.replace(result, maps=result.maps.replace(provenance=provenance)), motion


def _uncorrected_frames(motion: Any) -> str:
    """What registration left uncorrected, in words ('' when nothing)."""
    moved = np.asarray(getattr(motion, "uncorrected_mm", ()), dtype=float)
    frames = np.flatnonzero(moved > 0)
    if frames.size == 0:
        return ""
    return (f"frames {', '.join(str(int(f)) for f in frames)} (from 0) moved by "
            f"{moved[frames].min():.1f}-{moved[frames].max():.1f} mm, beyond what registration "
            "corrects, and were left as they are")


def _register(series: CTPSeries, *, workers: int | None, progress: bool) -> Any:
    """Rigid motion correction of every frame to the first (a PreprocessResult)."""
    from ctperf.preprocess import preprocess

    return preprocess(series, register=True, filter=False, workers=workers, progress=progress)


def _filter(series: CTPSeries, *, spatial_sigma_mm: float, range_sigma_hu: float,
            filter_weights: str, progress: bool) -> CTPSeries:
    """The bilateral filter guided by the temporal mean."""
    from ctperf.preprocess import bilateral_filter

    return bilateral_filter(series, spatial_sigma_mm=spatial_sigma_mm,
                            range_sigma_hu=range_sigma_hu, filter_weights=filter_weights,
                            progress=progress)
