"""How well the NLR reference agrees with itself: the same phantom subjects scanned twice.

The neural targets compare the U-Net's maps with NLR maps voxel by voxel. NLR's own maps carry
the scan's noise, and a network that does not reproduce that noise cannot agree with them better
than the maps of a repeat scan do, or than the true maps do. This script simulates each subject
of the neural demo's cohort twice (the same anatomy, physiology and bolus; only the noise seed
differs), filters both as ``ctperf reproduce`` does (no registration: nothing moves), fits
``nlr``, and prints per subject and map the voxel-wise Pearson r over the brain outside vessels:

- repeat: NLR on scan 1 against NLR on scan 2;
- truth: the phantom's true map against NLR on scan 1 (what a perfect, noise-free prediction
  would reach against the reference).

Then the lesions' Dice (``analyse_study``'s default lesion options on both scans): NLR's lesion
on scan 1 against scan 2's (subjects where scan 1 has that lesion), and against the phantom's
true lesion (subjects that have one): how far a lesion Dice aim against NLR can be reached.

Usage: ``python benchmarks/nlr_retest.py [--subjects 8] [--seed 3] [--size 64] [--slices 4]
[--noise-matrix 512]`` (the defaults are ``ctperf demo --neural``'s cohort, its first eight
subjects).
"""

from __future__ import annotations

import argparse

import numpy as np

from ctperf.errors import ValidationError
from ctperf.evaluation.metrics import dice
from ctperf.phantom import draw_parameters, subject_seed
from ctperf.phantom.generate import simulate_subject
from ctperf.workflow import analyse_study

MAPS = ("cbv", "cbf", "ttp", "tmax")
LESIONS = ("hypoperfused", "penumbra", "core")


def nlr_maps(subject):
    """NLR maps of a filtered phantom study; the phantom's artery mask where ctperf finds no
    artery, as ``ctperf reproduce`` does."""
    try:
        result, _ = analyse_study(subject.series, method="nlr", register=False, filter=True)
    except ValidationError:
        result, _ = analyse_study(subject.series, method="nlr", register=False, filter=True,
                                  aif_mask=subject.masks["artery"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--seed", type=int, default=3, help="the cohort's seed")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--noise-matrix", type=int, default=512)
    args = p.parse_args()
    rows = []
    print(f"{'sub':>4s} " + " ".join(f"{m + ' repeat/truth':>18s}" for m in MAPS))
    for index in range(args.subjects):  # subject i of the cohort, as ctperf demo --neural
        params = draw_parameters(seed=subject_seed(args.seed, index), size=args.size,
                                 slices=args.slices, frames=89, motion="none",
                                 noise_matrix=args.noise_matrix)
        scans = [simulate_subject(params),
                 simulate_subject(dict(params, noise_seed=params["noise_seed"] ^ 0x5EED))]
        first, second = (nlr_maps(s) for s in scans)
        brain = (scans[0].masks["brain"] & first.brain & second.brain & ~first.vessels
                 & ~second.vessels)
        row = {}
        for name in MAPS:
            a, b = first.maps[name][brain], second.maps[name][brain]
            truth = scans[0].truth[name][brain]
            ok = np.isfinite(a) & np.isfinite(b)
            row[name] = (float(np.corrcoef(a[ok], b[ok])[0, 1]),
                         float(np.corrcoef(a[ok], truth[ok])[0, 1]))
        true = {"core": scans[0].masks["core"], "penumbra": scans[0].masks["penumbra"]}
        true["hypoperfused"] = true["core"] | true["penumbra"]
        for name in LESIONS:
            a = getattr(first.lesions, name)
            b = getattr(second.lesions, name)
            row[name] = (dice(a, b) if a.any() else np.nan,
                         dice(a, true[name]) if true[name].any() else np.nan)
        rows.append(row)
        print(f"{index + 1:4d} " + " ".join(f"{row[m][0]:11.2f} / {row[m][1]:4.2f}" for m in MAPS),
              flush=True)
    print("mean " + " ".join(f"{np.mean([r[m][0] for r in rows]):11.2f} / "
                             f"{np.mean([r[m][1] for r in rows]):4.2f}" for m in MAPS))
    print("lesion Dice, NLR scan 1 against scan 2 / against the truth (mean over the subjects "
          "with the lesion):")
    for name in LESIONS:
        rep = [r[name][0] for r in rows if np.isfinite(r[name][0])]
        tru = [r[name][1] for r in rows if np.isfinite(r[name][1])]
        print(f"  {name:12s} {np.mean(rep) if rep else np.nan:.2f} (n = {len(rep)}) / "
              f"{np.mean(tru) if tru else np.nan:.2f} (n = {len(tru)})")


if __name__ == "__main__":
    main()
