"""`bayes` on single-residue lesion phantoms with the true AIF: noise-free CBF per residue
beside nlr-fast and bsvd, and at 150 mAs the maps' correlation with the truth and how often
the truth lies within +-2 SD of them (docs/bayes.md, "Noise-free phantoms" and the coverage
table).

Phantoms: ``generate_subject(seed, size=128, slices=4, residues=(one,), lesion=True)``, seeds
1-6 with residues box, exponential, gamma, box, exponential, gamma (procedural head, or the MNI
templates with ``--anatomy mni``); maps by
``run_perfusion(series, method, aif=subject.aif)``; voxels: the phantom's brain, ctperf's
brain mask, outside vessels.

Usage: ``python benchmarks/bench_bayes_phantoms.py [--size 128] [--slices 4]
[--seeds 1 2 3 4 5 6] [--anatomy procedural|mni] [--noise-free-only | --noisy-only]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from ctperf.perfusion import run_perfusion
from ctperf.phantom import generate_subject

SHAPES = {1: "box", 2: "exponential", 3: "gamma", 4: "box", 5: "exponential", 6: "gamma"}


def voxels(subject, result) -> np.ndarray:
    return subject.masks["brain"] & result.brain & ~result.vessels


def noise_free(seed: int, args) -> None:
    subject = generate_subject(seed=seed, size=args.size, slices=args.slices,
                               residues=(SHAPES[seed],), lesion=True, noise=False,
                               anatomy=args.anatomy)
    row = []
    for method in ("bayes", "nlr-fast", "bsvd"):
        result = run_perfusion(subject.series, method=method, aif=subject.aif)
        sel = voxels(subject, result)
        with np.errstate(divide="ignore", invalid="ignore"):  # truth 0 outside the brain
            rel = result.maps["cbf"] / subject.truth["cbf"] - 1
        classes = " ".join(f"{c} {np.nanmedian(rel[sel & subject.masks[c]]):+.1%}"
                           for c in ("gm", "wm"))
        row.append(f"{method} {np.nanmedian(rel[sel]):+6.1%} ({classes})")
    print(f"noise-free  seed {seed} ({SHAPES[seed]:11s}) median CBF error: " + ", ".join(row),
          flush=True)


def noisy(seed: int, args) -> None:
    subject = generate_subject(seed=seed, size=args.size, slices=args.slices,
                               residues=(SHAPES[seed],), lesion=True, anatomy=args.anatomy)
    result = run_perfusion(subject.series, method="bayes", aif=subject.aif)
    sel = voxels(subject, result)
    maps, truth = result.maps, subject.truth
    r = {k: np.corrcoef(maps[k][sel], truth[k][sel])[0, 1] for k in ("cbf", "cbv")}
    cover = {k: np.mean(np.abs(maps[k] - truth[k])[sel] <= 2 * maps[k + "_sd"][sel])
             for k in ("cbf", "cbv", "mtt", "tmax")}
    print(f"150 mAs     seed {seed} ({SHAPES[seed]:11s}) r CBF {r['cbf']:.3f} CBV {r['cbv']:.3f}"
          "  within 2 SD: " + ", ".join(f"{k} {v:.1%}" for k, v in cover.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--anatomy", default="procedural", choices=("procedural", "mni"))
    p.add_argument("--seeds", type=int, nargs="+", default=sorted(SHAPES),
                   choices=sorted(SHAPES))
    only = p.add_mutually_exclusive_group()
    only.add_argument("--noise-free-only", action="store_true")
    only.add_argument("--noisy-only", action="store_true")
    args = p.parse_args()
    for seed in args.seeds:
        if not args.noisy_only:
            noise_free(seed, args)
        if not args.noise_free_only:
            noisy(seed, args)


if __name__ == "__main__":
    main()
