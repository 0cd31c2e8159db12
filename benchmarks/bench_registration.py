"""Motion correction accuracy on phantom studies with a contrast bolus, against the true motion.

    python benchmarks/bench_registration.py [--frames 89] [--workers 2] [--cases none:256:3 ...]

For each phantom (motion class, matrix size, seed; 8 slices of 5 mm, 89 frames of 0.5 s with an
MCA lesion) it prints the registration time, the mean target registration error (TRE) over the
brain, averaged over frames and for the worst frame, the true mean displacement before correction,
the largest displacement of a brain voxel that the registration reports and how many frames kept
a transform; then the time to read one moved frame plainly and with the first frame's bone.
Cases ``tiles1:SIZE:SEED`` and ``tiles8:SIZE:SEED`` are the tests' still tile phantom without a
head (1 or 8 slices, 8 frames, 12 HU noise). Issue targets: a still study
moves by less than 0.3 mm; mean TRE < 0.5 mm with motion. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ctperf.phantom import generate_subject
from ctperf.preprocess import correct_motion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_registration import phantom_tre, tile_study  # the tests' TRE and tiles: one definition

#: Matrix sizes at which one frame's resampling is timed plainly and with the first frame's bone.
RESAMPLE_SIZES = (256, 512)

CASES = ("none:128:3", "none:256:3", "mild:128:3", "severe:128:3", "severe:128:5",
         "tiles1:64:1", "tiles8:64:1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=89)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES),
                    help="motion:size:seed, motion in none, mild, severe, tiles1, tiles8")
    args = ap.parse_args()
    print(f"{'case':16s} {'time s':>7s} {'TRE mean':>9s} {'TRE worst':>10s} "
          f"{'moved (true)':>13s} {'reported max':>13s} {'kept':>6s}")
    for case in args.cases:
        motion, size, seed = case.split(":")
        if motion.startswith("tiles"):
            series = tile_study(np.random.default_rng(int(seed)), slices=int(motion[5:]),
                                size=int(size))
            subject = None
        else:
            subject = generate_subject(seed=int(seed), size=int(size), slices=8,
                                       frames=args.frames, motion=motion, lesion=True)
            series = subject.series
        t0 = time.perf_counter()
        result = correct_motion(series, workers=args.workers)
        elapsed = time.perf_counter() - t0
        tre = before = np.zeros(1)
        if subject is not None:
            tre, before = phantom_tre(subject, result.parameters, result.center_mm)
        kept = sum(d in ("in-plane", "rigid") for d in result.decision)
        print(f"{case:16s} {elapsed:7.1f} {tre.mean():9.2f} {tre.max():10.2f} "
              f"{before.max():13.2f} {result.max_displacement_mm.max():13.2f} "
              f"{kept:3d}/{series.n_frames - 1}", flush=True)
    print("mm throughout; kept: frames that kept a fitted transform; note: timings on a "
          "shared machine are noisy")
    resample_cost(args.workers)


def resample_cost(workers: int, repeats: int = 5) -> None:
    """Time one moved frame read plainly (linear) and as a correction reads it (the first
    frame's bone; cubic B-spline, linear near bone and air), best of ``repeats``."""
    from ctperf.preprocess.transforms import (
        make_transform,
        resample_frame,
        static_bone,
        to_sitk_image,
    )

    print(f"\n{'frame (8 slices)':18s} {'plain ms':>9s} {'read ms':>8s} {'ratio':>6s} "
          f"{'first frame bone ms':>20s}")
    for size in RESAMPLE_SIZES:
        subject = generate_subject(seed=3, size=size, slices=8, frames=4, motion="none")
        series = subject.series
        t0 = time.perf_counter()
        bone = static_bone(series.hu[0], series.affine)
        once = time.perf_counter() - t0
        img = to_sitk_image(series.hu[2], series.affine)
        tx = make_transform([1.0, 0.5, 3.0, 2.0, -1.5, 1.0], np.zeros(3))
        cost = []
        for b in (None, bone):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                resample_frame(img, tx, workers, bone=b)
                runs.append(time.perf_counter() - t0)
            cost.append(min(runs) * 1000)
        print(f"{size} px{'':12s} {cost[0]:9.1f} {cost[1]:8.1f} {cost[1] / cost[0]:6.1f} "
              f"{once * 1000:20.1f}")


if __name__ == "__main__":
    main()
