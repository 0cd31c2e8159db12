"""`bayes` with a uniform prior over residue shapes beside the prior learned from the study
(``learn_shapes=True``), on data without dispersion written by forward models other than
ctperf's phantom (docs/bayes.md, "Residue shapes learned from the study").

1. Kudo-style tiles at 10 HU, true AIF, no filtering (the tile study of ``tests/test_bayes.py``:
   7 x 7 tiles of delay 0-3 s x MTT 3.4-24 s per CBV 1-5 mL/100 g): one residue shape per
   study (box, exponential, linear) and the three shapes together. Tile-mean CBF: Pearson r,
   median absolute relative error and bias; the learned prior's weight on each shape.
2. The skull-less slice of ``tests/test_aif_failsafe.py`` (1 s frames, 10 HU), exponential and
   box residues, with the true AIF and with ctperf's automatic AIF: median CBF error per tissue
   class.

The dispersed phantoms are in ``bench_methods.py --methods bayes bayes-shapes``.

Usage: ``python benchmarks/bench_bayes_shapes.py [--seeds 7 8] [--skull-seeds 2 11]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_bayes as tb
from ctperf.perfusion import run_perfusion
from ctperf.perfusion.bayes import fit_bayes
from test_aif_failsafe import T1, class_errors, skullless_study

STUDIES = {"box": ("box",), "exponential": ("exponential",), "linear": ("linear",),
           "all three": ("box", "exponential", "linear")}


def tiles(seed: int) -> None:
    for label, shapes in STUDIES.items():
        curves, mask, truth, tile = tb._tile_study(inner=8, noise=10.0, seed=seed,
                                                   shapes=shapes)
        ref = tb._tile_means(truth["cbf"], tile)
        row = []
        for learn in (False, True):
            fit = fit_bayes(curves, tb._aif(tb.TIMES), tb.TIMES, rho=tb.RHO, kh=tb.KH,
                            mask=mask, spacing=(5.0, 1.0, 1.0), learn_shapes=learn)
            est = tb._tile_means(fit.cbf, tile)
            rel = est / ref - 1
            row.append(f"{'learned' if learn else 'uniform'} r {np.corrcoef(est, ref)[0, 1]:.3f}"
                       f" |err| {np.median(np.abs(rel)):5.1%} bias {np.median(rel):+6.1%}")
        weights = ", ".join(f"{k} {v:.2f}" for k, v in fit.shape_weights.items())
        print(f"tiles seed {seed} {label:11s}: " + "  |  ".join(row) + f"  [{weights}]",
              flush=True)


def skull(seed: int) -> None:
    for residue in ("exponential", "box"):
        series, truth = skullless_study(np.random.default_rng(seed), times=T1, residue=residue)
        for aif_name, aif in (("true AIF", truth["aif"]), ("automatic AIF", None)):
            row = []
            for learn in (False, True):
                result = run_perfusion(series, method="bayes", aif=aif,
                                       bayes_options={"learn_shapes": learn})
                err = class_errors(result.maps, truth)
                row.append(f"{'learned' if learn else 'uniform'} "
                           + " ".join(f"{k} {e['cbf']:+4.0%}" for k, e in err.items()))
            print(f"skull-less seed {seed} {residue:11s} {aif_name:13s}: " + "  |  ".join(row),
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    p.add_argument("--skull-seeds", type=int, nargs="+", default=[2, 11])
    args = p.parse_args()
    for seed in args.seeds:
        tiles(seed)
    for seed in args.skull_seeds:
        skull(seed)


if __name__ == "__main__":
    main()
