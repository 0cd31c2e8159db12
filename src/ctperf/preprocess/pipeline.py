"""The paper's preprocessing in one call: motion correction, then joint bilateral filtering."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ctperf.types import CTPSeries

__all__ = ["PreprocessResult", "preprocess"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreprocessResult:
    """Result of :func:`preprocess`.

    Attributes
    ----------
    series : CTPSeries
        Registered and/or filtered study.
    parameters : ndarray, float64, shape (T, 6)
        Rigid parameters per frame (rx, ry, rz deg; tx, ty, tz mm); zeros without registration.
    center_mm : ndarray, shape (3,)
        Centre of rotation in patient mm.
    displacement_mm, max_displacement_mm : ndarray, float64, shape (T,)
        Mean and largest displacement over the brain relative to the first frame (mm), as
        corrected.
    uncorrected_mm : ndarray, float64, shape (T,)
        Mean displacement over the brain of the frames that moved and were not corrected
        (:class:`~ctperf.preprocess.MotionResult`), mm; zeros for the others.
    mask : ndarray of bool, shape (Z, Y, X)
        Brain mask of the preprocessed study.
    registration : dict or None
        Per-frame decisions of the registration and the check metric of each candidate
        (:meth:`~ctperf.preprocess.MotionResult.record`, JSON-ready); None without registration.
    """

    series: CTPSeries
    parameters: np.ndarray
    center_mm: np.ndarray
    displacement_mm: np.ndarray
    max_displacement_mm: np.ndarray
    mask: np.ndarray
    registration: dict | None = None
    uncorrected_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def transforms(self) -> list:
        """SimpleITK Euler3DTransforms, one per frame (see :mod:`.registration`)."""
        from ctperf.preprocess.transforms import make_transform

        return [make_transform(p, self.center_mm) for p in self.parameters]


def preprocess(series: CTPSeries, *, register: bool = True, filter: bool = True,
               spatial_sigma_mm: float = 3.0, range_sigma_hu: float = 20.0,
               filter_weights: str = "linear", workers: int | None = None,
               progress: bool = False) -> PreprocessResult:
    """Register every frame to the first, then filter it with the mean-guided bilateral filter.

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    register : bool
        Run rigid motion correction (:func:`~ctperf.preprocess.correct_motion`).
    filter : bool
        Run the joint bilateral filter (:func:`~ctperf.preprocess.bilateral_filter`), guided by
        the temporal mean of the registered frames.
    spatial_sigma_mm, range_sigma_hu : float
        The filter's sigmas (the paper's 3 mm and 20 HU).
    filter_weights : {"linear", "quadratic"}
        The filter's grid weights (see :func:`~ctperf.preprocess.joint_bilateral`).
    workers : int, optional
        Frames registered at once (default: the number of CPU cores).
    progress : bool
        Show progress bars.

    Returns
    -------
    PreprocessResult
    """
    from ctperf.masks import brain_mask
    from ctperf.preprocess.bilateral import bilateral_filter
    from ctperf.preprocess.registration import correct_motion

    n = series.n_frames
    out = series
    params = np.zeros((n, 6))
    center = np.zeros(3)
    mean_d = np.zeros(n)
    max_d = np.zeros(n)
    uncorrected = np.zeros(n)
    record = None
    if register and n > 1:
        motion = correct_motion(series, workers=workers, progress=progress)
        out, params, center = motion.series, motion.parameters, motion.center_mm
        mean_d, max_d = motion.displacement_mm, motion.max_displacement_mm
        uncorrected = motion.uncorrected_mm
        record = motion.record()
    registered = out is not series
    del series  # a caller that handed the study over frees it now (ctperf preprocess)
    if filter:
        # the registered study is ours: filter it in place (one study less in memory)
        out = bilateral_filter(out, spatial_sigma_mm=spatial_sigma_mm,
                               range_sigma_hu=range_sigma_hu, filter_weights=filter_weights,
                               in_place=registered, progress=progress)
    mask = brain_mask(out)
    log.info("preprocess: %d frames, max mean displacement %.2f mm, brain %d voxels", n,
             float(mean_d.max()), int(mask.sum()))
    return PreprocessResult(series=out, parameters=params, center_mm=center,
                            displacement_mm=mean_d, max_displacement_mm=max_d, mask=mask,
                            registration=record, uncorrected_mm=uncorrected)
