"""Speed and memory of the box-model NLR.

1. Voxels per second of ``nlr`` and ``nlr-fast`` against a per-voxel ``scipy.optimize.minimize``
   Nelder-Mead loop (same objective, same settings), measured side by side on the same curves:
   the vectorised fits with 1 thread and with ``--workers`` threads (chunks fitted in parallel),
   rates from wall-clock time and from process CPU time (the latter is less sensitive to other
   work on a shared machine); then the same fits on torch tensors on a CUDA GPU when torch sees
   one.
2. Wall time and peak resident memory of ``compute_maps`` on a full 512 x 512 x 8 x 89 synthetic
   study, each method in a fresh process.

Usage: ``python benchmarks/bench_perfusion.py [--voxels N] [--loop 200] [--workers 2]
[--chunk 65536] [--skip-gpu] [--skip-full]``.
Timings on a shared machine are noisy; compare the ratios printed in one run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np

RHO, KH = 1.04, 0.733
TIMES = np.arange(89) * 0.5
FINE = 0.02


def aif_fine(t: np.ndarray) -> np.ndarray:
    x = np.clip(t - 6.0, 0, None)
    y = x**3 * np.exp(-x / 1.5)
    return 400.0 * y / y.max()


def curves(n: int, rng: np.random.Generator, noise: float = 8.4):
    """n box-model tissue curves (T, n) simulated on a fine grid, plus the sampled AIF."""
    fine_t = np.arange(0, TIMES[-1] + FINE / 2, FINE)
    ca = aif_fine(fine_t)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (ca[1:] + ca[:-1]) * FINE)])
    cbf = rng.uniform(10, 70, n)
    mtt = rng.uniform(3, 10, n)
    delay = rng.uniform(0, 5, n)
    sample = np.rint(TIMES / FINE).astype(int)
    tf = fine_t[sample][:, None]
    c = RHO / KH * cbf / 6000 * (np.interp(tf - delay, fine_t, cum, left=0)
                                 - np.interp(tf - delay - mtt, fine_t, cum, left=0))
    return c + noise * rng.standard_normal(c.shape), ca[sample]


def _timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def rate_benchmark(n_voxels: int | None, n_loop: int, *, workers: int, chunk: int,
                   gpu: bool) -> None:
    from scipy.optimize import minimize

    from ctperf.perfusion import fit_box_nlr
    from ctperf.perfusion.boxnlr import _sse
    from ctperf.perfusion.curves import ArterialTable, bandlimit, flow_scale

    # Enough voxels that every worker gets two full chunks.
    n_voxels = n_voxels or 2 * workers * chunk
    rng = np.random.default_rng(0)
    tissue, aif = curves(n_voxels, rng)
    load0 = os.getloadavg()[0]
    table = ArterialTable(bandlimit(aif), TIMES)
    scale = flow_scale(RHO, KH)
    smooth = bandlimit(tissue[:, :n_loop])

    def scipy_loop() -> None:
        for i in range(n_loop):
            c = smooth[:, i:i + 1]
            minimize(lambda p, c=c: _sse(p[None], c, table, scale)[0], [60.0, 5.0, 3.5],
                     method="Nelder-Mead", bounds=[(0, 300), (1, 30), (-3, 20)],
                     options={"maxiter": 300, "xatol": 1e-4, "fatol": 1e-4})

    wall, cpu = _timed(scipy_loop)
    ref, ref_cpu = n_loop / wall, n_loop / cpu
    rows = [("scipy loop", 1, ref, ref_cpu)]
    try:  # a true single-thread run: BLAS (the correlation products) held to 1 thread too
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    for mode in ("nlr-fast", "nlr"):
        for w in sorted({1, workers}):
            limit = threadpool_limits(1) if w == 1 and threadpool_limits else nullcontext()
            with limit:
                wall, cpu = _timed(lambda mode=mode, w=w: fit_box_nlr(
                    tissue, aif, TIMES, method=mode, workers=w, chunk=chunk))
            rows.append((mode, w, n_voxels / wall, n_voxels / cpu))
    extra = []
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and gpu and torch.cuda.is_available():
        for mode in ("nlr-fast", "nlr"):
            fit_box_nlr(tissue[:, :64], aif, TIMES, method=mode, device="cuda")  # warm-up
            wall, _ = _timed(lambda mode=mode: fit_box_nlr(
                tissue, aif, TIMES, method=mode, device="cuda"))
            extra.append((f"{mode} torch-cuda", n_voxels, n_voxels / wall, "GPU"))
    load1 = os.getloadavg()[0]
    print(f"voxels/s, 89 frames, noise 8.4 HU: {n_voxels} voxels for the vectorised fits "
          f"(chunks of {chunk}), {n_loop} for the scipy loop; {os.cpu_count()} CPUs, "
          f"1-min load average {load0:.1f} before, {load1:.1f} after")
    blas = "BLAS held to 1 thread" if threadpool_limits else "BLAS threads NOT limited"
    print("  the scipy loop runs on 1 thread. 'x loop': ratio of wall-clock rates; with 1 thread "
          f"({blas}) it is the per-thread speed-up, with more it is the machine's total. "
          "'per CPU-s': voxels per second of process CPU time (all threads together)")
    print(f"  {'fit':24s} {'threads':>7s} {'voxels/s':>10s} {'x loop':>8s} "
          f"{'per CPU-s':>10s} {'x loop (CPU)':>13s}")
    for name, w, r, rc in rows:
        print(f"  {name:24s} {w:7d} {r:10.0f} {r / ref:8.0f} {rc:10.0f} {rc / ref_cpu:13.0f}")
    for name, n, r, threads in extra:
        print(f"  {name:24s} {threads:>7s} {r:10.0f} {r / ref:8.0f}   ({n} voxels)")


def full_study(rng: np.random.Generator):
    """A 512 x 512 x 8 x 89 head: skull, scalp, brain (GM/WM), lesion, arteries and a sinus."""
    from ctperf.types import CTPSeries

    size, n_z = 512, 8
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    r = np.hypot((yy - c) / 190, (xx - c) / 155)
    brain = r < 1.0
    gm = brain & (r > 0.8)
    lesion = brain & (xx < c - 20) & (yy < c)
    artery = np.zeros_like(brain)
    for ay, ax in [(c - 40, c - 60), (c - 40, c + 60), (c + 30, c - 70), (c + 30, c + 70)]:
        artery |= np.hypot(yy - ay, xx - ax) < 6
    sinus = np.hypot(yy - (c + 180), xx - c) < 6
    base = np.full((size, size), -1000.0, np.float32)
    base[(r >= 1.0) & (r < 1.2)] = 40.0
    base[(r >= 1.0) & (r < 1.1)] = 1200.0
    base[brain] = np.where(gm[brain], 38.0, 28.0)
    # 4,000 distinct tissue curves, drawn per voxel; the noise makes every voxel different.
    n_curves = 4000
    tissue, aif = curves(n_curves, rng, noise=0.0)
    pick = rng.integers(0, n_curves // 2, size=(size, size)) + np.where(lesion, n_curves // 2, 0)
    order = np.argsort(tissue.max(axis=0))  # second half of the table: low, late curves
    table = tissue[:, order[::-1]]
    table[:, n_curves // 2:] = 0.4 * np.roll(tissue[:, n_curves // 2:], 8, axis=0)
    vof = np.convolve(aif, np.exp(-np.arange(30) / 6.0) / 6.0 * 0.5)[: TIMES.size]
    hu = np.empty((TIMES.size, n_z, size, size), np.float32)
    for k in range(TIMES.size):
        frame = base + np.where(brain, table[k][pick], 0.0)
        frame[artery] = 45 + 0.6 * aif[k]
        frame[sinus] = 45 + vof[k] * 1.0
        hu[k] = frame[None] + 8.4 * rng.standard_normal((n_z, size, size), dtype=np.float32)
    affine = np.diag([0.45, 0.45, 5.0, 1.0])
    return CTPSeries(hu=hu, times=TIMES, affine=affine)


def full_run(method: str) -> None:
    import resource

    from ctperf.perfusion import compute_maps

    series = full_study(np.random.default_rng(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    t0 = time.perf_counter()
    maps = compute_maps(series, method=method)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"method": method, "wall_s": wall, "peak_rss_gb": peak,
                      "study_rss_gb": before, "brain_voxels": maps.provenance["brain_voxels"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=None,
                    help="voxels for the vectorised fits (default: 2 chunks per thread)")
    ap.add_argument("--loop", type=int, default=200, help="voxels for the scipy loop")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--skip-gpu", action="store_true", help="no torch lines on a CUDA GPU")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--full", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--methods", default="nlr-fast,nlr")
    args = ap.parse_args()
    if args.full:
        full_run(args.full)
        return
    rate_benchmark(args.voxels, args.loop, workers=args.workers, chunk=args.chunk,
                   gpu=not args.skip_gpu)
    if args.skip_full:
        return
    print("full 512 x 512 x 8 x 89 study, compute_maps (fresh process each):")
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--full", method], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"  {method:9s} wall {r['wall_s']:7.1f} s   peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(study alone {r['study_rss_gb']:.2f} GB)   {r['brain_voxels']} brain voxels")


if __name__ == "__main__":
    main()
