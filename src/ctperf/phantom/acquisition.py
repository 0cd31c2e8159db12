"""Acquisition model: baseline attenuation, scanner blur, correlated noise and rigid head motion.

Noise is Gaussian with standard deviation ``K / sqrt(mAs)`` per pixel (K = 103 HU, 8.4 HU at
150 mAs), spatially correlated by the reconstruction kernel: white noise is filtered with the same
in-plane Gaussian as the signal and rescaled so that the filtered noise has exactly the requested
standard deviation. That figure holds for the scanner's native reconstruction; an image on coarser
pixels, each the mean of the native pixels it covers, has less (:func:`averaged_noise_sigma`).

Motion is rigid, per frame, about the slab centre: frame ``t`` shows the head moved by
``x -> R_t x + s_t`` (:func:`ctperf.phantom.geometry.rigid_matrix` of the frame's three rotations
in degrees and three shifts in mm); slices outside the slab are not simulated, so through-plane
motion repeats the edge slices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ctperf.phantom.geometry import rigid_matrix

__all__ = [
    "MOTION_CLASSES",
    "NOISE_K",
    "acquire",
    "apply_motion",
    "averaged_noise_sigma",
    "baseline_hu",
    "draw_baseline",
    "draw_motion",
    "filtered_std",
    "noise_sigma",
    "psf_sigma_px",
    "smooth_noise",
]

NOISE_K = 103.0
#: Proportions of negligible, mild-moderate and severe motion in stroke CTP (58/24/19 %).
MOTION_CLASSES: dict[str, float] = {"none": 0.58, "mild": 0.24, "severe": 0.19}


def noise_sigma(mas: float, *, k: float = NOISE_K) -> float:
    """Per-pixel noise standard deviation in HU at tube current-time product ``mas``."""
    return float(k / np.sqrt(mas)) if np.isfinite(mas) else 0.0


def averaged_noise_sigma(sigma: float, *, native_pixel_mm: float, pixel_mm: float,
                         psf_fwhm_mm: float) -> float:
    """Noise SD of pixels of ``pixel_mm`` that average a native reconstruction's pixels.

    The native image (pixels of ``native_pixel_mm``) has noise of SD ``sigma`` correlated by the
    scanner's Gaussian blur of ``psf_fwhm_mm``; each coarse pixel is the mean of the native
    pixels it covers (a box of ``pixel_mm``, fractional at its ends). The noise is separable,
    so the SD scales by the 1D factor squared. Pixels no coarser than the native ones keep
    ``sigma``.
    """
    width = pixel_mm / native_pixel_mm
    if width <= 1.0:
        return float(sigma)
    sig_px = psf_sigma_px(psf_fwhm_mm, native_pixel_mm)
    n = int(np.ceil(width))
    box = np.ones(n)
    box[-1] = width - (n - 1)
    box /= box.sum()
    half = int(np.ceil(3.5 * sig_px)) + n + 2
    delta = np.zeros(2 * half + 1)
    delta[half] = 1.0
    kernel = ndi.gaussian_filter1d(delta, sig_px, truncate=3.5) if sig_px > 0.05 else delta
    kernel /= np.sqrt(np.sum(kernel**2))
    variance_1d = float(np.sum(np.convolve(kernel, box) ** 2))
    return float(sigma * variance_1d)


def psf_sigma_px(fwhm_mm: float, pixel_mm: float) -> float:
    """Gaussian sigma in pixels of an in-plane blur of FWHM ``fwhm_mm``."""
    return float(fwhm_mm / (2 * np.sqrt(2 * np.log(2))) / pixel_mm)


def draw_baseline(rng: np.random.Generator) -> dict[str, float]:
    """Unenhanced HU per tissue at 80 kV."""
    return {"gm": float(rng.uniform(35, 40)), "wm": float(rng.uniform(26, 30)),
            "csf": float(rng.uniform(5, 15)), "blood": float(rng.uniform(40, 50)),
            "bone": float(rng.uniform(1200, 1800)), "soft": float(rng.uniform(25, 45)),
            "air": -1000.0}


def baseline_hu(fractions: np.ndarray, hu: dict[str, float], texture: np.ndarray
                ) -> np.ndarray:
    """Unenhanced image from channel fractions (C, ...) in anatomy.CHANNELS order.

    ``texture`` (same shape as one channel, unit variance) adds 1.5 HU of tissue texture and
    8 % of bone density variation (diploe).
    """
    gm, wm, csf, bone, soft, art, vein = fractions
    out = (gm * (hu["gm"] + 1.5 * texture) + wm * (hu["wm"] + 1.5 * texture) + csf * hu["csf"]
           + bone * hu["bone"] * (1 + 0.08 * texture) + soft * hu["soft"]
           + (art + vein) * hu["blood"])
    air = np.clip(1.0 - fractions.sum(axis=0), 0.0, 1.0)
    return (out + air * hu["air"]).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], *, sigma_px: float
                 ) -> np.ndarray:
    """Unit-variance Gaussian noise (float32), correlated in the last two axes by a Gaussian."""
    white = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px < 0.05:
        return white
    sig = (0,) * (len(shape) - 2) + (sigma_px, sigma_px)
    out = ndi.gaussian_filter(white, sig, truncate=3.5)
    return out * np.float32(1.0 / filtered_std(sigma_px))


def filtered_std(sigma_px: float) -> float:
    """Standard deviation of unit white noise after the Gaussian filter of ``sigma_px``."""
    delta = np.zeros((41, 41))
    delta[20, 20] = 1.0
    k = ndi.gaussian_filter(delta, sigma_px, truncate=3.5)
    return float(np.sqrt(np.sum(k**2)))


def draw_motion(rng: np.random.Generator, category: str, times: np.ndarray
                ) -> tuple[str, np.ndarray]:
    """Per-frame rigid motion (T, 6): rotations about x, y, z (deg) then shifts (mm).

    ``category`` is ``"none"``, ``"mild"``, ``"severe"`` or ``"realistic"`` (drawn with the
    :data:`MOTION_CLASSES` proportions). Frame 0 is the reference (zero motion). Motion is mostly
    nodding (rotation about the left-right x axis) and grows towards the end of the study.
    """
    if category == "realistic":
        names = list(MOTION_CLASSES)
        prob = np.array([MOTION_CLASSES[n] for n in names])
        category = str(rng.choice(names, p=prob / prob.sum()))
    n = times.size
    out = np.zeros((n, 6))
    if category == "none" or n < 2:
        return category, out
    if category == "mild":
        rot, shift, jerks = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), 0
    elif category == "severe":
        rot, shift, jerks = rng.uniform(3.0, 7.0), rng.uniform(3.0, 7.0), int(rng.integers(1, 4))
    else:
        raise ValueError(f"motion must be none, mild, severe or realistic, got {category!r}")
    frac = (times - times[0]) / max(times[-1] - times[0], 1e-9)
    weight = frac**1.5  # worse later
    axes_scale = np.array([1.0, 0.3, 0.4, 0.4, 0.6, 1.0])  # nodding: rx, ty, tz dominate
    for c in range(6):
        walk = np.cumsum(rng.standard_normal(n))
        walk = ndi.gaussian_filter1d(walk, max(n / 15, 1.0))
        walk -= walk[0]
        walk /= max(np.max(np.abs(walk)), 1e-9)
        amp = rot if c < 3 else shift
        out[:, c] = amp * axes_scale[c] * walk * weight
    for _ in range(jerks):  # sudden head movements that persist
        start = int(rng.integers(n // 3, n))
        step = rng.normal(0, 1, 6) * np.r_[rot, 0.3 * rot, 0.3 * rot, 0.3 * shift, shift, shift]
        out[start:] += 0.5 * step
    out[0] = 0.0
    return category, out


def apply_motion(volume: np.ndarray, affine: np.ndarray, params: Any, *, order: int = 1
                 ) -> np.ndarray:
    """Resample one frame (Z, Y, X) as seen after the head moved by ``params`` (6,).

    The head point at patient position ``x`` (mm, slab centre at 0) moves to ``R x + s``, so the
    output at ``y`` samples the input at ``R^T (y - s)``.
    """
    p = np.asarray(params, dtype=float)
    move = rigid_matrix(p[:3], p[3:])
    # index (x, y, z) -> mm -> unmoved mm -> index; then to array order (z, y, x)
    m = np.linalg.inv(affine) @ np.linalg.inv(move) @ affine
    perm = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    mz = perm @ m @ perm
    return ndi.affine_transform(volume, mz[:3, :3], offset=mz[:3, 3], order=order,
                                mode="nearest")


def acquire(hu: np.ndarray, *, affine: np.ndarray, motion: np.ndarray, noise_sigma: float,
            psf_px: float, rng: np.random.Generator) -> None:
    """Turn noise-free, still frames into the acquired study, in place.

    Parameters
    ----------
    hu : ndarray, float32, shape (T, Z, Y, X)
        Frames before motion, noise and blur (HU); overwritten.
    affine : ndarray, shape (4, 4)
        Voxel to patient mm.
    motion : ndarray, shape (T, 6)
        Per-frame rigid parameters (:func:`draw_motion`).
    noise_sigma : float
        Standard deviation of the noise after the blur (HU); 0 for none.
    psf_px : float
        Sigma of the in-plane Gaussian blur (pixels); below 0.05 no blur.
    rng : numpy.random.Generator
        Source of the white noise (drawn slice by slice).
    """
    for t in range(1, hu.shape[0]):
        if np.any(np.abs(motion[t]) > 1e-6):
            hu[t] = apply_motion(hu[t], affine, motion[t])
    blur = psf_px > 0.05
    scale = np.float32(noise_sigma / filtered_std(psf_px) if blur else noise_sigma)
    for z in range(hu.shape[1]):
        block = hu[:, z]
        if noise_sigma > 0:
            block += rng.standard_normal(block.shape, dtype=np.float32) * scale
        if blur:
            hu[:, z] = ndi.gaussian_filter(block, (0, psf_px, psf_px), truncate=3.5)
