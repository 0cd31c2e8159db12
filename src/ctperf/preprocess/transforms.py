"""Rigid transforms of a study's frames: SimpleITK images and transforms, displacement, resampling.

A frame's transform follows ITK: it maps a point of the first frame (patient mm, in the frame of
the series' affine) to the same anatomy in that frame. Parameters are (rx, ry, rz) in degrees
and (tx, ty, tz) in mm, rotating about a centre in mm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ctperf.errors import ValidationError
from ctperf.types import CTPSeries

__all__ = ["apply_transforms", "frame_displacement", "make_transform", "resample_frame",
           "to_sitk_image"]


def to_sitk_image(volume: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A (Z, Y, X) array as a SimpleITK image with spacing, origin and direction from ``affine``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(a[:3, 3].tolist())
    img.SetDirection((a[:3, :3] / spacing).ravel().tolist())
    return img


def make_transform(parameters: Sequence[float] | np.ndarray,
                   center_mm: Sequence[float] | np.ndarray) -> sitk.Euler3DTransform:
    """Euler3DTransform from (rx, ry, rz) degrees, (tx, ty, tz) mm and a centre in mm."""
    p = np.asarray(parameters, dtype=np.float64)
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(c) for c in center_mm])
    tx.SetParameters([*np.deg2rad(p[:3]).tolist(), *p[3:].tolist()])
    return tx


def frame_displacement(parameters: np.ndarray, center_mm: np.ndarray,
                       points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max displacement |T(x) - x| in mm over points, for each frame.

    Parameters
    ----------
    parameters : ndarray, shape (T, 6)
        Rotations in degrees, shifts in mm.
    center_mm : ndarray, shape (3,)
    points_mm : ndarray, shape (N, 3)
        Points in patient mm (e.g. the brain's voxel centres).

    Returns
    -------
    mean, max : ndarray, float64, shape (T,)
    """
    params = np.atleast_2d(np.asarray(parameters, dtype=np.float64))
    pts = np.asarray(points_mm, dtype=np.float64) - np.asarray(center_mm, dtype=np.float64)
    means = np.zeros(len(params))
    maxes = np.zeros(len(params))
    for i, p in enumerate(params):
        tx = make_transform(p, np.zeros(3))
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        d = pts @ (m - np.eye(3)).T + p[3:]
        norm = np.linalg.norm(d, axis=1)
        means[i], maxes[i] = (norm.mean(), norm.max()) if norm.size else (0.0, 0.0)
    return means, maxes


def resample_frame(moving_img: sitk.Image, tx: sitk.Transform, threads: int) -> np.ndarray:
    """The moving frame on its own grid, read at T(x): linear, nearest beyond the slab."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(threads)
    resampler.SetReferenceImage(moving_img)
    resampler.SetTransform(tx)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(moving_img)).astype(np.float32, copy=False)


def apply_transforms(series: CTPSeries, transforms: Sequence[sitk.Transform | None], *,
                     threads: int | None = None) -> CTPSeries:
    """Bring every frame back onto the first frame's grid with known transforms.

    The resampling :func:`correct_motion` ends with, for transforms found elsewhere: saved
    ones (``MotionResult.transforms``), or a phantom's true motion. Linear interpolation;
    points that left the slab take the nearest slice.

    Parameters
    ----------
    series : CTPSeries
        Study (T, Z, Y, X) in HU.
    transforms : sequence of SimpleITK transforms or None, one per frame
        Each maps a point of the first frame (patient mm, in the frame of the series' affine)
        to the same anatomy in that frame; None leaves the frame as it is.
    threads : int, optional
        Threads of the resampler; default the number of CPU cores.

    Returns
    -------
    CTPSeries
        Same grid, times and metadata, ``meta["motion_corrected"]`` set.
    """
    if len(transforms) != series.n_frames:
        raise ValidationError(f"{len(transforms)} transforms for {series.n_frames} frames")
    threads = int(threads or os.cpu_count() or 1)
    out = series.hu.copy()
    for t, tx in enumerate(transforms):
        if tx is not None:
            out[t] = resample_frame(to_sitk_image(series.hu[t], series.affine), tx, threads)
    meta = dict(series.meta)
    meta["motion_corrected"] = True
    return series.replace(hu=out, meta=meta)
