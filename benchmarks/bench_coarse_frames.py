"""Box fits on coarse frames: one subject filmed every 0.5, 1 and 2 s, side by side.

For each phantom seed, the same subject (same physiology, anatomy and lesion) is simulated at
0.5 s frames (89) and at 1 s (45) and 2 s (23) frames over the same 44 s, and mapped with
``nlr-fast`` through ``analyse_study`` (bilateral filter, no registration). Printed per run:
the median CBF and CBV error over the brain outside vessels (% of the truth), the median Tmax
error (s), grey matter's median CBF over the truth's, the hypoperfused volume against the
true one, and the seconds the maps took. The box fits work on a grid of at most 0.5 s
(``ctperf.perfusion.boxnlr.fit_grid``), so a study's figures should hardly depend on its frame
interval noise-free (``--mas 100000``); with noise the coarser studies hold fewer samples.

Usage: ``python benchmarks/bench_coarse_frames.py [--seeds 1 3 14] [--size 96] [--slices 4]
[--mas 150] [--method nlr-fast]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ctperf.lesion_options import LesionOptions
from ctperf.phantom import generate_subject
from ctperf.workflow import analyse_study

PROTOCOLS = ((0.5, 89), (1.0, 45), (2.0, 23))


def measure(seed: int, interval: float, frames: int, *, size: int, slices: int, mas: float,
            method: str) -> dict:
    subject = generate_subject(seed=seed, size=size, slices=slices, frames=frames,
                               frame_interval=interval, mas=mas)
    start = time.perf_counter()
    result, _ = analyse_study(subject.series, method=method, register=False,
                              lesion_options=LesionOptions())
    seconds = time.perf_counter() - start
    truth, maps = subject.truth, result.maps
    region = result.brain & ~result.vessels & np.isfinite(maps["cbf"])
    gm = region & subject.masks["gm"] & ~subject.masks["core"] & ~subject.masks["penumbra"]
    row = {"seed": seed, "interval": interval, "seconds": seconds,
           "residue": subject.params["physiology"].get("residue")}
    for name in ("cbf", "cbv"):
        rel = (maps[name][region] - truth[name][region]) / np.maximum(truth[name][region], 1e-3)
        row[f"{name}_bias_pct"] = 100 * float(np.median(rel))
    row["tmax_bias_s"] = float(np.median(maps["tmax"][region] - truth["tmax"][region]))
    row["gm_cbf_ratio"] = float(np.median(maps["cbf"][gm]) / np.median(truth["cbf"][gm]))
    row["hypoperfused_ml"] = result.lesions.volumes_ml["hypoperfused"]
    row["true_hypoperfused_ml"] = float(((truth["tmax"] > 6) & result.brain & ~result.vessels)
                                        .sum() * maps.voxel_ml)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 14])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--mas", type=float, default=150.0)
    parser.add_argument("--method", default="nlr-fast")
    args = parser.parse_args()
    print(f"{args.method}, {args.size} px, {args.slices} slices, {args.mas:g} mAs")
    print("seed residue     frames  CBF bias  CBV bias  Tmax bias  GM CBF/true  "
          "hypoperfused (true)   time")
    for seed in args.seeds:
        for interval, frames in PROTOCOLS:
            r = measure(seed, interval, frames, size=args.size, slices=args.slices,
                        mas=args.mas, method=args.method)
            print(f"{seed:4d} {r['residue']:<11} {interval:4.1f} s  {r['cbf_bias_pct']:+7.1f} %"
                  f" {r['cbv_bias_pct']:+7.1f} %  {r['tmax_bias_s']:+7.2f} s  "
                  f"{r['gm_cbf_ratio']:10.3f}  {r['hypoperfused_ml']:7.1f} "
                  f"({r['true_hypoperfused_ml']:5.1f}) mL  {r['seconds']:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
