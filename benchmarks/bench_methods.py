"""Every model-based method side by side: accuracy against the truth, delay sensitivity,
lesions, time per study, on ctperf's phantom and on a reference ctperf did not make.

``bayes-shapes`` is ``bayes`` with the residue shapes' prior learned from the study
(``bayes_options={"learn_shapes": True}``); the OSIPI curves have no positions, so it is not run
on them. ``bayes-plain`` is ``bayes`` with the plain log-normal prior on MTT, without the
Jeffreys factor (``bayes_options={"mtt_jeffreys": False}``). ``bayes-still`` is ``bayes``
whose blocks never depart from their neighbourhood's posterior
(``bayes_options={"departure_prior": 0.0}``).

1. Phantom subjects (``ctperf.phantom``) at 75, 150 and 300 mAs, one residue shape each (box,
   exponential, gamma), 128 x 128 x 4 x 89 by default, lesion present, fully automatic
   (``run_perfusion``: AIF and VOF found by ctperf), unfiltered. Per method and condition, over
   the brain outside vessels: Pearson r, median relative error and bias of CBF, CBV and MTT,
   Pearson r and median error (s) of Tmax and TTP; the
   slope of the relative CBF error against the true delay (%/s); hypoperfused and core volumes
   against the truth's masks (mL, Dice); seconds per study; for methods with uncertainty maps,
   the fraction of voxels whose true value lies within +-2 SD of the map.
2. The OSIPI DSC reference curves (``tests/data/osipi_dsc``; Chakwizira et al. 2022, via the
   OSIPI code collection, Apache-2.0): passes of |error| <= 15 + 10 % of truth (CBF) and
   1 + 10 % (CBV) out of 14 each, with rho = kH = 1 as the reference defines CBF.

Usage: ``python benchmarks/bench_methods.py [--size 128] [--slices 4] [--seed 40]
[--methods nlr nlr-fast bsvd osvd bayes bayes-shapes bayes-plain bayes-still] [--mas 75 150 300]
[--json out.json]``.
Timings on a shared machine are noisy; compare methods within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from ctperf.perfusion import run_perfusion
from ctperf.perfusion.bayes import fit_bayes
from ctperf.perfusion.boxnlr import fit_box_nlr
from ctperf.perfusion.svd import svd_deconvolve
from ctperf.phantom import generate_subject

METHODS = ("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes", "bayes-shapes", "bayes-plain",
           "bayes-still")
#: variants: a method of run_perfusion with options
VARIANTS = {"bayes-shapes": ("bayes", {"bayes_options": {"learn_shapes": True}}),
            "bayes-plain": ("bayes", {"bayes_options": {"mtt_jeffreys": False}}),
            "bayes-still": ("bayes", {"bayes_options": {"departure_prior": 0.0}})}
RESIDUES = ("box", "exponential", "gamma")
OSIPI = Path(__file__).resolve().parent.parent / "tests" / "data" / "osipi_dsc" / "dsc_data.csv"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum() + b.sum())
    return float("nan") if s == 0 else 2.0 * float((a & b).sum()) / s


def score(result, subject) -> dict[str, float]:
    truth = subject.truth
    region = result.brain & ~result.vessels & subject.masks["brain"]
    out: dict[str, float] = {}
    for name in ("cbf", "cbv", "mtt", "tmax", "ttp"):
        timing = name in ("tmax", "ttp")
        est = result.maps[name][region].astype(np.float64)
        ref = truth[name][region].astype(np.float64)
        ok = np.isfinite(est) & np.isfinite(ref) & (True if timing else ref > 0)
        est, ref = est[ok], ref[ok]
        out[f"{name}_r"] = float(np.corrcoef(est, ref)[0, 1])
        if timing:
            out[f"{name}_bias_s"] = float(np.median(est - ref))
        else:
            rel = est / ref - 1.0
            out[f"{name}_medrel"] = float(np.median(np.abs(rel)))
            out[f"{name}_bias"] = float(np.median(rel))
    est = result.maps["cbf"][region].astype(np.float64)
    ref = truth["cbf"][region].astype(np.float64)
    delay = truth["delay"][region].astype(np.float64)
    ok = np.isfinite(est) & (ref > 0)
    out["delay_slope_pct_per_s"] = float(np.polyfit(delay[ok], est[ok] / ref[ok] - 1.0, 1)[0]
                                         * 100)
    for name in ("cbf", "cbv", "mtt", "tmax"):  # uncertainty maps: truth within +-2 SD
        if f"{name}_sd" in result.maps:
            err = np.abs(result.maps[name] - truth[name])[region]
            out[f"{name}_cover"] = float(np.mean(err <= 2 * result.maps[f"{name}_sd"][region]))
    voxel_ml = subject.series.voxel_ml
    true_core = subject.masks["core"]
    true_hypo = true_core | subject.masks["penumbra"]
    les = result.lesions
    out["hypo_ml"] = float(les.hypoperfused.sum() * voxel_ml)
    out["hypo_true_ml"] = float(true_hypo.sum() * voxel_ml)
    out["hypo_dice"] = _dice(les.hypoperfused, true_hypo)
    out["core_ml"] = float(les.core.sum() * voxel_ml)
    out["core_true_ml"] = float(true_core.sum() * voxel_ml)
    out["core_dice"] = _dice(les.core, true_core)
    return out


def phantom_rows(args) -> list[dict]:
    rows = []
    for i, residue in enumerate(RESIDUES):
        for mas in args.mas:
            subject = generate_subject(seed=args.seed + i, size=args.size, slices=args.slices,
                                       residues=(residue,), mas=mas, lesion=True)
            for method in args.methods:
                name, options = VARIANTS.get(method, (method, {}))
                t0 = time.perf_counter()
                result = run_perfusion(subject.series, method=name, **options)
                seconds = time.perf_counter() - t0
                row = {"residue": residue, "mas": mas, "method": method, "seconds": seconds,
                       **score(result, subject)}
                rows.append(row)
                print(f"{residue:11s} {mas:5.0f} {method:9s} {seconds:6.1f} s  "
                      f"CBF r {row['cbf_r']:.2f} |err| {row['cbf_medrel']:.0%} "
                      f"bias {row['cbf_bias']:+.0%}  CBV r {row['cbv_r']:.2f} "
                      f"bias {row['cbv_bias']:+.0%}  MTT r {row['mtt_r']:.2f} "
                      f"bias {row['mtt_bias']:+.0%}  Tmax r {row['tmax_r']:.2f} "
                      f"bias {row['tmax_bias_s']:+.1f} s  TTP r {row['ttp_r']:.2f} "
                      f"bias {row['ttp_bias_s']:+.1f} s  slope "
                      f"{row['delay_slope_pct_per_s']:+.1f} %/s  hypo {row['hypo_ml']:.1f}/"
                      f"{row['hypo_true_ml']:.1f} mL (Dice {row['hypo_dice']:.2f})  core "
                      f"{row['core_ml']:.1f}/{row['core_true_ml']:.1f} mL"
                      + "".join(f"  {k} within 2 SD {row[f'{k}_cover']:.0%}"
                                for k in ("cbf", "cbv", "mtt", "tmax") if f"{k}_cover" in row),
                      flush=True)
    return rows


def osipi_rows(methods) -> list[dict]:
    with OSIPI.open(newline="") as f:
        data = list(csv.DictReader(f))
    tissue = np.stack([np.array(r["C_tis"].split(), dtype=np.float64) for r in data], axis=1)
    aif = np.array(data[0]["C_aif"].split(), dtype=np.float64)
    times = np.arange(tissue.shape[0]) * float(data[0]["tr"])
    cbf = np.array([float(r["cbf"]) for r in data])
    cbv = np.array([float(r["cbv"]) for r in data])
    rows = []
    for method in methods:
        if method == "bayes-shapes":  # learning shapes needs voxel positions
            continue
        if method.startswith("nlr"):
            fit = fit_box_nlr(tissue, aif, times, method=method, rho=1.0, kh=1.0)
        elif method.startswith("bayes"):
            options = VARIANTS[method][1]["bayes_options"] if method in VARIANTS else {}
            fit = fit_bayes(tissue, aif, times, rho=1.0, kh=1.0, spatial=False, **options)
        else:
            fit = svd_deconvolve(tissue, aif, times, method=method, rho=1.0, kh=1.0)
        ok_f = np.abs(fit.cbf - cbf) <= 15 + 0.1 * cbf
        ok_v = np.abs(fit.cbv - cbv) <= 1 + 0.1 * cbv
        row = {"method": method, "cbf_pass": int(ok_f.sum()), "cbv_pass": int(ok_v.sum()),
               "cbf_bias": float(np.median(fit.cbf / cbf - 1)),
               "cbf_at_70": float(fit.cbf[np.argmax(cbf)])}
        rows.append(row)
        print(f"OSIPI {method:9s} CBF {row['cbf_pass']}/14 (median bias "
              f"{row['cbf_bias']:+.0%}, true 70 -> {row['cbf_at_70']:.1f})  CBV "
              f"{row['cbv_pass']}/14", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--seed", type=int, default=40)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--mas", nargs="+", type=float, default=[75.0, 150.0, 300.0])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    result = {"osipi": osipi_rows(args.methods), "phantom": phantom_rows(args)}
    print("\nmedian over the phantom conditions:")
    for method in args.methods:
        rows = [r for r in result["phantom"] if r["method"] == method]
        med = {k: float(np.nanmedian([r[k] for r in rows])) for k in rows[0]
               if isinstance(rows[0][k], float)}
        print(f"  {method:9s} CBF r {med['cbf_r']:.2f} |err| {med['cbf_medrel']:.0%} "
              f"bias {med['cbf_bias']:+.0%}  CBV r {med['cbv_r']:.2f}  MTT r "
              f"{med['mtt_r']:.2f} bias {med['mtt_bias']:+.0%}  Tmax r {med['tmax_r']:.2f} "
              f"bias {med['tmax_bias_s']:+.1f} s  TTP r {med['ttp_r']:.2f} bias "
              f"{med['ttp_bias_s']:+.1f} s  delay slope {med['delay_slope_pct_per_s']:+.1f} "
              f"%/s  hypo Dice {med['hypo_dice']:.2f}  core Dice {med['core_dice']:.2f}  "
              f"{med['seconds']:.1f} s/study")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
