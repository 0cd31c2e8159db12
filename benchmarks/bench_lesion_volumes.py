"""Lesion volumes through the automatic pipeline, against the phantom's truth.

Lesion subjects: true hypoperfused volume (true Tmax > 6 s inside the mapped brain outside
vessels; also with the threshold at 5.75 and 6.25 s, how sensitive the truth is) beside
each method's hypoperfused volume at Tmax thresholds of 6 to 8 s, the same region and the
lesion clean-up of ``ctperf maps`` (``LesionOptions()``), and the core: its volume, the volume
the same rule gives on the true maps, the share of that found, and the ``core_unseen`` QC
flag's value. Lesion-free subjects: core volume
and the right/left median CBF ratio about the estimated mid-sagittal plane (the healthy
criteria: no core of 1 mL or more, ratio within 0.9-1.1).

The studies are filtered as in the paper (bilateral filter, no registration: the phantoms are
still; ``bayes`` not filtered, as ``analyse_study`` does by default: its spatial prior takes the
filter's place), the AIF and VOF found automatically.

Usage: ``python benchmarks/bench_lesion_volumes.py [--size 128] [--slices 4]
[--lesion-seeds 1 2 3 4 14 15] [--healthy-seeds 1 2 3 4 5 6] [--methods nlr-fast bsvd]
[--noise-matrix 512] [--anatomy procedural|mni] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from ctperf.lesion_options import LesionOptions
from ctperf.perfusion import midsagittal_plane, segment_lesions
from ctperf.phantom import generate_subject
from ctperf.workflow import analyse_study

THRESHOLDS = (6.0, 6.5, 7.0, 7.5, 8.0)


def measure(seed: int, *, lesion: bool, method: str, size: int, slices: int,
            noise_matrix: int | None = None, anatomy: str = "procedural") -> dict:
    subject = generate_subject(seed=seed, size=size, slices=slices, lesion=lesion,
                               noise_matrix=noise_matrix, anatomy=anatomy)
    start = time.perf_counter()
    result, _ = analyse_study(subject.series, method=method, register=False,
                              lesion_options=LesionOptions())
    seconds = time.perf_counter() - start
    voxel_ml = result.maps.voxel_ml
    region = result.brain & ~result.vessels
    rule_core = segment_lesions(subject.truth, brain=result.brain & subject.masks["brain"],
                                exclude=result.vessels, options=LesionOptions()).core
    row = {"seed": seed, "method": method,
           "residue": subject.params["physiology"].get("residue"),
           "seconds": round(seconds, 1),
           "true_hypoperfused_ml": round(float(((subject.truth["tmax"] > 6) & region).sum())
                                         * voxel_ml, 1),
           # how far the truth itself moves when its threshold moves by a quarter second:
           # the Tmax accuracy a 10 % volume agreement asks for
           **{f"true_hypoperfused_ml_tmax>{t:g}": round(float(
               ((subject.truth["tmax"] > t) & region).sum()) * voxel_ml, 1) for t in (5.75, 6.25)},
           "core_ml": round(result.lesions.volumes_ml["core"], 2),
           # the core the same rule finds on the true maps (the phantom's own core, CBF under
           # 30 % of each voxel's healthy CBF, is no rule a measurement can apply), the share
           # of it the maps call core, and the ``core_unseen`` flag's value
           "rule_core_ml": round(float(rule_core.sum()) * voxel_ml, 2),
           "core_found_share": (round(float((result.lesions.core & rule_core).sum())
                                      / int(rule_core.sum()), 3) if rule_core.any() else None),
           "core_unseen": result.maps.provenance["qc"]["core_unseen"]["value"]}
    for threshold in THRESHOLDS:
        options = dataclasses.replace(LesionOptions(), tmax_hypo=threshold)
        lesions = segment_lesions(result.maps, brain=result.brain, exclude=result.vessels,
                                  options=options)
        row[f"hypoperfused_ml_tmax>{threshold:g}"] = round(lesions.volumes_ml["hypoperfused"], 1)
    side = midsagittal_plane(result.brain).distance(result.brain.shape)
    cbf = result.maps["cbf"]
    ok = region & np.isfinite(cbf)
    row["cbf_right_left"] = round(float(np.median(cbf[ok & (side > 1)])
                                        / np.median(cbf[ok & (side < -1)])), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--lesion-seeds", type=int, nargs="*", default=[1, 2, 3, 4, 14, 15])
    parser.add_argument("--healthy-seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--methods", nargs="+", default=["nlr-fast", "bsvd"])
    parser.add_argument("--noise-matrix", type=int, default=None,
                        help="the noise of this reconstruction averaged into the pixels "
                             "(docs/phantom.md); default the phantom's own grid")
    parser.add_argument("--anatomy", default="procedural", choices=("procedural", "mni"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for lesion, seeds in ((True, args.lesion_seeds), (False, args.healthy_seeds)):
        for seed in seeds:
            for method in args.methods:
                row = {"lesion": lesion, **measure(seed, lesion=lesion, method=method,
                                                   size=args.size, slices=args.slices,
                                                   noise_matrix=args.noise_matrix,
                                                   anatomy=args.anatomy)}
                rows.append(row)
                if lesion:
                    true = row["true_hypoperfused_ml"]
                    vols = "  ".join(
                        f">{t:g}s {row[f'hypoperfused_ml_tmax>{t:g}']:6.1f} "
                        f"({100 * (row[f'hypoperfused_ml_tmax>{t:g}'] / true - 1):+4.0f}%)"
                        for t in THRESHOLDS)
                    share = row["core_found_share"]
                    found = "n/a" if share is None else f"{share:.0%}"
                    near = "/".join(f"{row[f'true_hypoperfused_ml_tmax>{t:g}']:.1f}"
                                    for t in (5.75, 6.25))
                    print(f"lesion seed {seed:3d} {row['residue']:<11} {method:<9} "
                          f"true {true:6.1f} mL (at 5.75/6.25 s {near})  {vols}  core "
                          f"{row['core_ml']:.1f} mL, the rule on the truth "
                          f"{row['rule_core_ml']:.1f} (found {found}, core_unseen "
                          f"{row['core_unseen']})",
                          flush=True)
                else:
                    print(f"healthy seed {seed:3d} {row['residue']:<11} {method:<9} core "
                          f"{row['core_ml']:.2f} mL  CBF right/left {row['cbf_right_left']:.3f}"
                          f"  core_unseen {row['core_unseen']}",
                          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
