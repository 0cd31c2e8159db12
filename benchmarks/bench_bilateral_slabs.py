"""Memory of the bilateral filter on a study with many slices: the whole grid at once against
slab by slab (the default), side by side, each in its own process for its peak memory.

    python benchmarks/bench_bilateral_slabs.py [--size 256] [--slices 24] [--frames 89]
    python benchmarks/bench_bilateral_slabs.py --study STUDY

The study is a phantom subject (`ctperf.phantom`, 5 mm slices; 256 px: 0.9 mm pixels, so the
grid is not down-sampled in plane and every slice costs the most), or any study ctperf reads
(`--study`, e.g. a 512 x 512 x 32 phantom written by `ctperf phantom --size 512 --slices 32`).
Both runs must give the same filtered study, voxel for voxel; the script prints the largest
difference, and the memory the slab budget's model expected (`SLAB_BUDGET`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _study(a: argparse.Namespace) -> object:
    if a.study:
        from ctperf.io import read_study

        return read_study(a.study)
    from ctperf.phantom import generate_subject

    return generate_subject(seed=1, size=a.size, slices=a.slices, frames=a.frames).series


def _resident_gb() -> float:
    """The process's resident memory now (Linux), else its peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _run(a: argparse.Namespace, budget: int, out: Path) -> None:
    from ctperf.preprocess import joint_bilateral
    from ctperf.preprocess.bilateral import _Setup

    series = _study(a)
    guide = series.hu.mean(axis=0, dtype=np.float64).astype(np.float32)
    before = _resident_gb()
    setup = _Setup.of(series.spacing, spatial_sigma_mm=3.0, range_sigma_hu=20.0,
                      levels_per_sigma=3.0, levels_per_sigma_outside=2.0, cells_per_sigma=2.2,
                      filter_weights="linear")
    t0 = time.perf_counter()
    hu = joint_bilateral(series.hu, guide, spacing=series.spacing, out=series.hu,
                         slab_budget=budget)
    seconds = time.perf_counter() - t0
    np.save(out.with_suffix(".npy"), hu)
    slabs = setup.slabs(guide.shape, budget)
    out.write_text(json.dumps({
        "seconds": seconds, "slabs": len(slabs),
        "expected_gb": max(setup.grid_bytes((end - first, *guide.shape[1:]))
                           for first, _, _, end in slabs) / 1e9,
        "shape": list(series.hu.shape),
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "before_gb": before, "study_gb": series.hu.nbytes / 1e9}))


def main() -> None:
    from ctperf.preprocess import SLAB_BUDGET

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--frames", type=int, default=89)
    ap.add_argument("--study", help="a study to filter instead of a phantom")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _run(a, int(a.child[0]), Path(a.child[1]))
        return
    source = ["--study", a.study] if a.study else ["--size", str(a.size), "--slices",
                                                   str(a.slices), "--frames", str(a.frames)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, budget in (("whole grid", 2**62), ("slabs (default)", SLAB_BUDGET)):
            out = Path(tmp) / name.split()[0]
            subprocess.run([sys.executable, __file__, *source, "--child", str(budget),
                            str(out)], check=True)
            results[name] = json.loads(out.read_text())
            results[name]["hu"] = np.load(out.with_suffix(".npy"), mmap_mode="r")
        what = a.study if a.study else "phantom study"
        print(f"{what} {' x '.join(map(str, results['whole grid']['shape'][::-1]))} (X Y Z T), "
              "bilateral filter (3 mm, 20 HU, linear weights, 2 threads), in place; "
              f"slab budget {SLAB_BUDGET / 1e9:.1f} GB")
        print(f"{'':18s} {'slabs':>5s} {'time s':>7s} {'peak GB':>8s} {'before GB':>10s} "
              f"{'grid expected GB':>17s}")
        for name, r in results.items():
            print(f"{name:18s} {r['slabs']:5d} {r['seconds']:7.1f} {r['peak_gb']:8.2f} "
                  f"{r['before_gb']:10.2f} {r['expected_gb']:17.2f}")
        whole, slabs = results["whole grid"], results["slabs (default)"]
        diff = float(np.max(np.abs(np.asarray(whole["hu"]) - np.asarray(slabs["hu"]))))
        print(f"largest difference between the two filtered studies: {diff:.3g} HU")
        print(f"ratio slabs/whole: time {slabs['seconds'] / whole['seconds']:.2f}, "
              f"peak memory {slabs['peak_gb'] / whole['peak_gb']:.2f}")
        print("peak: the process's peak (reading the study included); before: resident when "
              "the filter starts (the study and its guide); grid expected: the slab budget's "
              "estimate of the largest slab's grid build")
        del whole, slabs, results


if __name__ == "__main__":
    main()
