"""Every brain voxel's fit by one method: the box model (NLR), SVD deconvolution or the Bayesian
estimator, on the frames as acquired or on a uniform grid."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.perfusion.bayes import fit_bayes
from ctperf.perfusion.boxnlr import BOX_METHODS, fit_box_nlr, fit_grid
from ctperf.perfusion.curves import TTP_SMOOTH_S, resample, time_to_peak, uniform_grid
from ctperf.perfusion.svd import svd_deconvolve

log = logging.getLogger(__name__)

__all__ = ["SD_MAPS", "check_bayes_options", "fit_voxels", "measured_ttp"]

#: Posterior standard deviations written beside the maps by ``bayes``.
SD_MAPS = ("cbf_sd", "cbv_sd", "mtt_sd", "tmax_sd")

#: fit_bayes's arguments that run_perfusion sets itself
_BAYES_SET = frozenset({"tissue", "aif", "times", "rho", "kh", "mask", "spacing",
                        "baseline_frames", "guide", "vessels", "progress"})


def check_bayes_options(options: dict[str, Any] | None, method: str) -> None:
    if not options:
        return
    if method != "bayes":
        raise ValidationError(f"bayes_options apply to method 'bayes', not {method!r}")
    params = inspect.signature(fit_bayes).parameters
    known = set(params) - _BAYES_SET
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValidationError(f"bayes_options: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
    # of the type of the option's default ("no" for a bool had switched it on)
    for name, value in options.items():
        default = params[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool | np.bool_)
        elif isinstance(default, int | float):  # a float for a count (2048.0) is refused
            kinds = (int, np.integer) if isinstance(default, int) else \
                (int, float, np.integer, np.floating)
            ok = isinstance(value, kinds) and not isinstance(value, bool | np.bool_)
        else:
            continue
        if not ok:
            raise ValidationError(f"bayes_options: {name} must be a {type(default).__name__} "
                                  f"like its default {default!r}, got {value!r}")


def fit_voxels(method: str, tissue: np.ndarray, aif: np.ndarray, t: np.ndarray, *,
               rho: float, kh: float, brain: np.ndarray | None,
               spacing: tuple[float, float, float], device: str | None, progress: bool,
               n_base: int | None, guide: np.ndarray | None = None,
               vessels: np.ndarray | None = None,
               bayes_options: dict[str, Any] | None = None, arrival: int | None = None
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, Any]]:
    """Values (N,) of every brain voxel by map name, the uniform grid the fits saw (None
    when the frames are evenly spaced) and what the provenance should add (``bayes``: its
    options, and the residue shapes' prior weights when it learned them). ``guide`` (Z, Y, X):
    the temporal mean image, for ``bayes``'s amplitude pooling; ``vessels`` (N,): the
    voxels ``bayes`` leaves out of its neighbourhoods' averages. ``brain`` None: curves
    without an image (``bayes`` fits each on its own); ``n_base`` None: no baseline was
    subtracted. ``arrival``: the frame the box and SVD methods' TTP is searched from, default
    the baseline's end (curves given as enhancement have none: the bolus's arrival then).

    Unevenly spaced frames (fast, then slow sampling): the box model and SVD see the curves
    linearly interpolated onto a uniform grid at the finest step, from the first frame. Delay,
    MTT and Tmax are durations after the AIF, so they need no mapping back; TTP is read on the
    grid too (smoothing in seconds needs even spacing) and counts from the first frame, where
    the grid starts. ``bayes`` handles any frame spacing and fits the frames as acquired.
    """
    grid = uniform_grid(t)
    values: dict[str, np.ndarray]
    fitted: dict[str, Any] = {}
    if method not in BOX_METHODS and device not in (None, "auto", "cpu"):
        log.warning("%s runs on the CPU: the device (%s) is for the box-model fits (%s) only",
                    method, device, ", ".join(BOX_METHODS))
    if method == "bayes":
        options = dict(bayes_options or {})
        post = fit_bayes(tissue, aif, t, rho=rho, kh=kh, mask=brain, spacing=spacing,
                         baseline_frames=n_base, guide=guide, vessels=vessels,
                         progress=progress, **options)
        values = {name: getattr(post, name) for name in
                  ("cbf", "cbv", "mtt", "ttp", "tmax", "delay", "residual", *SD_MAPS)}
        values["grid_edge"] = post.edge
        if options:
            fitted["bayes_options"] = options
        if post.shape_weights is not None:
            fitted["residue_shape_weights"] = {k: round(v, 4)
                                               for k, v in post.shape_weights.items()}
        fitted["bayes_delay_range_s"] = [round(v, 3) for v in post.delay_range]
    else:
        fit_t, fit_tissue, fit_aif = t, tissue, aif
        if grid is not None:
            fit_t, fit_tissue, fit_aif = grid, resample(tissue, t, grid), np.interp(grid, t, aif)
        if method in BOX_METHODS:
            fit = fit_box_nlr(fit_tissue, fit_aif, fit_t, method=method, rho=rho, kh=kh,
                              device=device, progress=progress)
            if (box_grid := fit_grid(fit_t)) is not None:
                fitted["box_fit_step_s"] = round(float(box_grid[1] - box_grid[0]), 6)
            values = {"cbf": fit.cbf, "cbv": fit.cbv, "mtt": fit.mtt, "tmax": fit.tmax,
                      "delay": fit.delay, "residual": fit.residual}
        else:
            res = svd_deconvolve(fit_tissue, fit_aif, fit_t, method=method, rho=rho, kh=kh,
                                 progress=progress)
            values = {"cbf": res.cbf, "cbv": res.cbv, "mtt": res.mtt, "tmax": res.tmax,
                      "delay": res.tmax}
        start = (n_base or 0) if arrival is None else arrival
        values["ttp"] = measured_ttp(fit_tissue, fit_t, t[min(start, t.size - 1)])
    return values, grid, fitted


def measured_ttp(tissue: np.ndarray, grid: np.ndarray, arrival_s: float) -> np.ndarray:
    """The curves' own time to peak (s from the first frame; the box and SVD methods' TTP):
    ``tissue`` (T', N) on the evenly spaced ``grid`` (T',), smoothed over time
    (:data:`~ctperf.perfusion.curves.TTP_SMOOTH_S`), searched from the bolus's arrival
    ``arrival_s`` (the baseline's end; the first frame's time for none) on."""
    start = int(np.searchsorted(grid, arrival_s)) if arrival_s > grid[0] else 0
    return time_to_peak(tissue, grid, smooth_s=TTP_SMOOTH_S, start=min(start, grid.size - 1))
