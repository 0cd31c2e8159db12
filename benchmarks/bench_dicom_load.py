"""Loading a CT perfusion DICOM study: uncompressed vs JPEG Lossless, serial vs parallel decoding.

Writes a synthetic study of 89 frames x 8 slices of 512 x 512 (712 files, the size of a GE
perfusion acquisition) twice into a temporary folder, uncompressed and JPEG Lossless (Process 14
SV1), then times :func:`ctperf.io.read_dicom_series` with one decoder and with a thread pool,
side by side in one run. Usage::

    python benchmarks/bench_dicom_load.py [--frames 89] [--slices 8] [--size 512] [--repeat 2]

Timings depend on the disk cache (every load after the first reads from memory) and on whatever
else runs on the machine: read them as ratios measured together, not as absolutes.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from ctperf.io import read_dicom_headers, read_dicom_series, write_series_dicom
from ctperf.types import CTPSeries


def synthetic_study(frames: int, slices: int, size: int, seed: int = 0) -> CTPSeries:
    """A head-like study: air, a skull ring, brain at ~35 HU, 8 HU noise, a passing bolus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot((yy - size / 2) / (0.42 * size), (xx - size / 2) / (0.36 * size))
    base = np.where(r < 0.92, 35.0, np.where(r < 1.0, 1200.0, -1000.0)).astype(np.float32)
    times = np.arange(frames, dtype=np.float64)
    bolus = 40.0 * np.exp(-0.5 * ((times - 20.0) / 5.0) ** 2)
    hu = np.empty((frames, slices, size, size), dtype=np.float32)
    for t in range(frames):
        noise = rng.normal(0.0, 8.0, (slices, size, size)).astype(np.float32)
        hu[t] = base + noise + np.float32(bolus[t]) * (r < 0.92)
    affine = np.diag([0.45, 0.45, 5.0, 1.0])
    return CTPSeries(hu=hu, times=times, affine=affine,
                     meta={"description": "benchmark", "kvp": 80, "mas": 150})


def timed(fn, repeat: int) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=89)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="best of N loads [2]")
    parser.add_argument("--workers", type=int, default=None, help="parallel decoders [CPUs]")
    args = parser.parse_args()

    import os
    workers = args.workers or min(os.cpu_count() or 1, 8)
    series = synthetic_study(args.frames, args.slices, args.size)
    n_files = args.frames * args.slices
    print(f"study {args.frames} frames x {args.slices} slices of {args.size}^2 = {n_files} files; "
          f"{workers} workers on {os.cpu_count()} CPUs; best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for compress in (False, True):
            label = "JPEG Lossless" if compress else "uncompressed"
            folder = Path(tmp) / ("jpeg" if compress else "raw")
            start = time.perf_counter()
            write_series_dicom(series, folder, compress=compress)
            written = time.perf_counter() - start
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            print(f"{label:14s} written in {written:6.2f} s, {mb:7.1f} MB on disk")
            header_s, _ = timed(lambda f=folder: read_dicom_headers(f), args.repeat)
            modes = [("serial", {"workers": 1}), ("threads", {"workers": workers})]
            for mode, kw in modes:
                seconds, loaded = timed(lambda f=folder, k=kw: read_dicom_series(f, **k),
                                        args.repeat)
                assert np.array_equal(loaded.hu, np.rint(series.hu)), "values changed"
                rows.append((label, mode, seconds, header_s))
        serial = {label: s for label, mode, s, _ in rows if mode == "serial"}
        print(f"\n{'storage':14s} {'decoding':10s} {'load s':>8s} {'files/s':>9s} "
              f"{'vs serial':>9s} {'headers s':>9s}")
        for label, mode, seconds, header_s in rows:
            print(f"{label:14s} {mode:10s} {seconds:8.2f} {n_files / seconds:9.0f} "
                  f"{serial[label] / seconds:8.2f}x {header_s:9.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nin-memory study: {series.hu.nbytes / 1e6:.0f} MB float32; peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
