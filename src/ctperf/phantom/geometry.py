"""Geometry of a phantom subject: scanner grid, head pose, smooth warp and smooth random fields.

Patient coordinates are RAS mm with the slab centre at the origin; the image's columns run from the
patient's right to left and rows from anterior to posterior (radiological display), so the affine
is ``diag(-dx, -dy, dz)`` plus an offset. Template coordinates are MNI-like mm (see
:mod:`ctperf.phantom.anatomy`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "cosine_field",
    "draw_field",
    "draw_pose",
    "patient_to_template",
    "rigid_matrix",
    "scanner_affine",
    "symmetric_field",
    "voxel_centres",
]


def scanner_affine(*, size: int, slices: int, fov_mm: float, thickness_mm: float) -> np.ndarray:
    """Voxel ``(x, y, z, 1)`` -> RAS mm for a ``slices`` x ``size`` x ``size`` slab centred at 0."""
    d = fov_mm / size
    affine = np.diag([-d, -d, thickness_mm, 1.0])
    affine[:3, 3] = [d * (size - 1) / 2, d * (size - 1) / 2, -thickness_mm * (slices - 1) / 2]
    return affine


def voxel_centres(affine: np.ndarray, *, size: int, z: float) -> np.ndarray:
    """Patient mm of the voxels of slice index ``z`` (may be fractional), shape (Y, X, 3)."""
    j, i = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                       indexing="ij")
    idx = np.stack([i, j, np.full_like(i, z), np.ones_like(i)], axis=-1)
    return (idx @ affine.T)[..., :3]


def rigid_matrix(rotations_deg: Any, shifts_mm: Any) -> np.ndarray:
    """4x4 rigid transform: rotation about x, then y, then z (extrinsic, degrees), then shift."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", np.asarray(rotations_deg, dtype=float),
                                      degrees=True).as_matrix()
    out[:3, 3] = np.asarray(shifts_mm, dtype=float)
    return out


def draw_field(rng: np.random.Generator, *, n: int = 8, wavelength_mm: float = 40.0
               ) -> dict[str, Any]:
    """Parameters of a smooth random field (sum of ``n`` plane cosines, unit variance)."""
    k = rng.standard_normal((n, 3))
    k *= (2 * np.pi / wavelength_mm) / np.linalg.norm(k, axis=1, keepdims=True)
    k *= rng.uniform(0.7, 1.3, (n, 1))
    return {"k": k.round(6).tolist(), "phase": rng.uniform(0, 2 * np.pi, n).round(6).tolist()}


def cosine_field(points: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Evaluate a :func:`draw_field` field at points (..., 3) mm; float32, shape (...)."""
    k = np.asarray(spec["k"], dtype=np.float32)
    phase = np.asarray(spec["phase"], dtype=np.float32)
    pts = points.astype(np.float32, copy=False)
    out = np.zeros(points.shape[:-1], dtype=np.float32)
    for kk, ph in zip(k, phase, strict=True):
        out += np.cos(pts @ kk + ph)
    return out * np.float32(np.sqrt(2.0 / len(phase)))


def symmetric_field(points: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """The mean of a :func:`draw_field` field and its mirror image across the midline.

    Smooth and equal at template points ``(x, y, z)`` and ``(-x, y, z)``; float32, shape (...).
    Its variance is 1 on the midline and about 0.5 far from it.
    """
    mirrored = points * np.array([-1.0, 1.0, 1.0], dtype=points.dtype)
    return np.float32(0.5) * (cosine_field(points, spec) + cosine_field(mirrored, spec))


def draw_pose(rng: np.random.Generator, *, level: float | None = None) -> dict[str, Any]:
    """Head pose in the scanner, slab level (template z of the slab centre) and a smooth warp."""
    return {
        "rotations_deg": [float(rng.uniform(-12, 12)), float(rng.uniform(-5, 5)),
                          float(rng.uniform(-8, 8))],  # pitch (nodding), roll, yaw
        "shift_mm": [float(rng.uniform(-6, 6)), float(rng.uniform(-8, 8)), 0.0],
        "scale": float(rng.uniform(0.92, 1.08)),
        "level_mm": float(rng.uniform(10, 26)) if level is None else float(level),
        "warp_mm": float(rng.uniform(1.5, 4.0)),
        "warp": [draw_field(rng, n=6, wavelength_mm=90.0) for _ in range(3)],
    }


def patient_to_template(points: np.ndarray, pose: dict[str, Any]) -> np.ndarray:
    """Template (MNI-like) mm of patient points (..., 3): inverse pose, then the smooth warp."""
    m = rigid_matrix(pose["rotations_deg"], pose["shift_mm"])
    q0 = np.array([0.0, -17.0, pose["level_mm"]])
    local = (points - m[:3, 3]) @ m[:3, :3] / pose["scale"]  # R^T (p - s) / scale
    q = local + q0
    amp = pose["warp_mm"]
    warp = np.stack([cosine_field(q, spec) for spec in pose["warp"]], axis=-1)
    return q + amp * warp
