"""Whole-study curve steps outside the fit: smoothing over time, the brief-peak test and the
areas under positive curves, each beside the whole-matrix form it replaced, on the curves of a
full 512 x 512 x 8 slab (about 2 million voxels, 89 frames).

    python benchmarks/bench_curves.py [--voxels 2097152] [--frames 89] [--repeat 3]

Prints the best of ``--repeat`` runs of each form, their ratio and the largest difference between
their results. Run it on an otherwise idle machine: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_dicom_load import timed  # best of n runs, as the other benchmarks time

from ctperf.perfusion.curves import (
    MIN_BOLUS_WIDTH_S,
    brief_peak,
    gaussian_taps,
    gaussian_time,
    positive_area,
)


def whole_frames_gaussian(curves: np.ndarray, sd_frames: float) -> np.ndarray:
    """The earlier form: every tap a pass over whole frames of all the curves."""
    c = np.ascontiguousarray(curves, dtype=np.float32)
    taps = gaussian_taps(sd_frames).astype(np.float32)
    r, n = taps.size // 2, c.shape[0]
    p = np.concatenate([np.repeat(c[:1], r, axis=0), c, np.repeat(c[-1:], r, axis=0)])
    out = np.zeros_like(c)
    for k, w in enumerate(taps):
        out += w * p[k:k + n]
    return out


def whole_matrix_brief(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    rel = curves - curves.min(axis=0)
    above = rel >= 0.5 * rel.max(axis=0)
    return (above * np.gradient(times)[:, None]).sum(axis=0) < MIN_BOLUS_WIDTH_S


def clipped_trapezoid(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    return np.trapezoid(np.clip(curves, 0, None), times, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=512 * 512 * 8)
    parser.add_argument("--frames", type=int, default=89)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.4, 0.6, args.frames))
    curves = rng.normal(0.0, 10.0, (args.frames, args.voxels)).astype(np.float32)
    curves[args.frames // 3:args.frames // 2] += 40.0  # a bolus
    rows = [
        ("smoothing, SD 1 frame", lambda: gaussian_time(curves, 1.0),
         lambda: whole_frames_gaussian(curves, 1.0)),
        ("smoothing, SD 3 frames (TTP)", lambda: gaussian_time(curves, 3.0),
         lambda: whole_frames_gaussian(curves, 3.0)),
        ("brief-peak test", lambda: brief_peak(curves, times),
         lambda: whole_matrix_brief(curves, times)),
        ("area of the positive part", lambda: positive_area(curves, times),
         lambda: clipped_trapezoid(curves, times)),
    ]
    print(f"{args.voxels} curves of {args.frames} frames, best of {args.repeat}")
    print(f"{'step':32s} {'now s':>8s} {'before s':>9s} {'ratio':>6s}  largest difference")
    for name, now, before in rows:
        t_now, a = timed(now, args.repeat)
        t_before, b = timed(before, args.repeat)
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        print(f"{name:32s} {t_now:8.2f} {t_before:9.2f} {t_before / t_now:6.1f}  {diff:.3g}")


if __name__ == "__main__":
    main()
