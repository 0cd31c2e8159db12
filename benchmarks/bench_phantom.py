"""Time and peak memory of the digital phantom.

Runs each case in a fresh Python process (so peak RSS belongs to that case alone) and prints:

1. one full-size subject, 512 x 512 x 8 slices x 89 frames (target < 20 s, < 3 GB), generation
   alone and generation + writing (NIfTI + DICOM);
2. a 20-subject 128 x 128 x 8 x 89 cohort written to disk (NIfTI + DICOM).

Usage: ``python benchmarks/bench_phantom.py [--anatomy procedural|mni|auto] [--quick]``.
Timings on a shared machine are noisy; compare figures from the same run.

``--distributions N`` instead measures what the phantom simulates over seeds 0..N-1 (AIF width,
residue shapes, delays, dispersion, Tmax, lesion volumes, healthy left/right symmetry) on
``--size`` pixel subjects; docs/phantom.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CASE = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
from ctperf.phantom import generate_subject, write_subject
from ctperf.workflow import generate_cohort
from ctperf.phantom.anatomy import load_template

kind, anatomy, size, subjects, write = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5] == "1"
t0 = time.perf_counter()
load_template(anatomy)
t_template = time.perf_counter() - t0
rss_template = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
c0 = resource.getrusage(resource.RUSAGE_SELF)
out = {"template_s": t_template, "rss_after_template_mb": rss_template}


def cpu_since(c0):
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    return c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime


with tempfile.TemporaryDirectory() as tmp:
    if kind == "subject":
        s = generate_subject(seed=1, size=size, anatomy=anatomy, lesion=True)
        out["generate_s"] = time.perf_counter() - t0
        out["generate_cpu_s"] = cpu_since(c0)
        out["rss_after_generate_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if write:
            t1 = time.perf_counter()
            write_subject(s, Path(tmp) / "sub", dicom=True)
            out["write_s"] = time.perf_counter() - t1
    else:
        generate_cohort(Path(tmp) / "cohort", subjects=subjects, seed=1, size=size,
                        anatomy=anatomy, dicom=write)
        out["cohort_s"] = time.perf_counter() - t0
        out["cohort_cpu_s"] = cpu_since(c0)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _run(*args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CASE, *args], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def _fwhm(t, y):
    import numpy as np

    above = np.flatnonzero(y >= y.max() / 2)
    return float(t[above[-1]] - t[above[0]])


def _pct(values, digits=2):
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "n/a"
    q = np.percentile(v, [0, 10, 50, 90, 100])
    return "min {} / p10 {} / median {} / p90 {} / max {}".format(*(f"{x:.{digits}f}" for x in q))


def distributions(n: int, *, size: int, anatomy: str) -> None:
    """Print the phantom's simulated distributions over seeds 0..n-1."""
    from collections import Counter

    import numpy as np

    from ctperf.phantom import draw_parameters, generate_subject
    from ctperf.phantom import hemodynamics as hd

    t = np.arange(0, 90, 0.01)
    first, total, inj = [], [], []
    for seed in range(n):
        a = draw_parameters(seed=seed, size=64, slices=1, frames=12, anatomy=anatomy)["aif"]
        total.append(_fwhm(t, hd.aif_from_params(t, a)))
        first.append(_fwhm(t, hd.aif_from_params(t, {**a, "recirculation": 0.0})))
        inj.append(a["injection_s"])
    print(f"AIF over {n} seeds (s)\n  first-pass FWHM  {_pct(first, 1)}\n"
          f"  FWHM with recirc {_pct(total, 1)}\n  injection        {_pct(inj, 1)}")
    shapes: Counter[str] = Counter()
    rows: dict[str, list[float]] = {k: [] for k in (
        "gm_delay", "wm_delay", "neg_frac", "disp", "tmax_healthy", "lr", "core", "hypo",
        "hypo_old", "false_hypo")}
    lags: dict[str, list[float]] = {k: [] for k in hd.RESIDUES}
    for seed in range(n):
        s = generate_subject(seed=seed, size=size, frames=89, anatomy=anatomy, noise=False)
        kind = s.params["physiology"]["residue"]
        shapes[kind] += 1
        m, tr, ex = s.masks, s.truth, s.extras
        healthy = m["brain"] & (ex["severity"] == 0)
        rows["gm_delay"] += list(tr["delay"][healthy & m["gm"]])
        rows["wm_delay"] += list(tr["delay"][healthy & m["wm"]])
        rows["neg_frac"].append(float((tr["delay"][m["brain"]] < 0).mean()))
        rows["disp"] += list(ex["dispersion"][healthy])
        rows["tmax_healthy"] += list(tr["tmax"][healthy])
        lags[kind] += list((tr["tmax"] - tr["delay"])[m["brain"]])
        terr, gm = m["territories"], healthy & m["gm"]
        right, left = gm & (terr >= 1) & (terr <= 3), gm & (terr >= 4)
        rows["lr"].append(float(tr["cbf"][right].mean() / tr["cbf"][left].mean()))
        vol = s.params["volumes_ml"]
        voxel_ml = tr.voxel_ml
        old = ((tr["delay"] + tr["mtt"] / 2 > 6) & m["brain"]).sum() * voxel_ml
        if s.params["lesion"]:
            rows["core"].append(vol["core"])
            rows["hypo"].append(vol["hypoperfused"])
            rows["hypo_old"].append(float(old))
        else:
            rows["false_hypo"].append(vol["hypoperfused"])
    sub = rows["gm_delay"][:: max(1, len(rows["gm_delay"]) // 200000)]
    print(f"\n{n} subjects {size} x {size} x 8 x 89 ({anatomy} anatomy)")
    print(f"  residue shapes       {dict(shapes)}")
    print(f"  healthy GM delay s   {_pct(sub)}")
    print(f"  healthy WM delay s   {_pct(rows['wm_delay'])}")
    print(f"  brain fraction with negative delay, per subject  {_pct(rows['neg_frac'], 3)}")
    print(f"  healthy dispersion s {_pct(rows['disp'])}")
    print(f"  healthy Tmax s       {_pct(rows['tmax_healthy'])}")
    for kind, v in lags.items():
        print(f"  Tmax - delay, {kind:11s} {_pct(v)}")
    print(f"  healthy GM CBF right / left  {_pct(rows['lr'], 3)}")
    print(f"  lesion subjects: core mL          {_pct(rows['core'], 1)}")
    print(f"  lesion subjects: hypoperfused mL  {_pct(rows['hypo'], 1)}")
    print(f"  (same, Tmax = delay + MTT / 2)     {_pct(rows['hypo_old'], 1)}")
    print(f"  lesion-free subjects: hypoperfused mL {_pct(rows['false_hypo'], 1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy", default="procedural", choices=("procedural", "mni", "auto"))
    parser.add_argument("--quick", action="store_true", help="skip writing; 5-subject cohort")
    parser.add_argument("--distributions", type=int, metavar="N",
                        help="measure the simulated distributions over N seeds instead")
    parser.add_argument("--size", type=int, default=128,
                        help="in-plane pixels of the subjects for --distributions")
    args = parser.parse_args()
    if args.distributions:
        distributions(args.distributions, size=args.size, anatomy=args.anatomy)
        return
    write = "0" if args.quick else "1"
    n_cohort = 5 if args.quick else 20
    print(f"anatomy={args.anatomy}; shared machine: timings are noisy")
    full = _run("subject", args.anatomy, "512", "1", write)
    print(f"\none subject 512 x 512 x 8 x 89 (template load {full['template_s']:.1f} s, "
          f"RSS after it {full['rss_after_template_mb']:.0f} MB)")
    print(f"  generate, wall      {full['generate_s']:7.1f} s   (target < 20 s: "
          f"{full['generate_s'] / 20:.2f} x target)")
    print(f"  generate, CPU       {full['generate_cpu_s']:7.1f} s   (user + system; less "
          "sensitive to other load)")
    print(f"  peak RSS, generate  {full['rss_after_generate_mb'] / 1024:7.2f} GB  (target < 3 GB: "
          f"{full['rss_after_generate_mb'] / 3072:.2f} x target)")
    if "write_s" in full:
        print(f"  write NIfTI + DICOM {full['write_s']:7.1f} s")
        print(f"  peak RSS, all       {full['peak_rss_mb'] / 1024:7.2f} GB")
    with tempfile.TemporaryDirectory():
        cohort = _run("cohort", args.anatomy, "128", str(n_cohort), write)
    print(f"\ncohort of {n_cohort} subjects 128 x 128 x 8 x 89"
          f"{' with NIfTI + DICOM' if write == '1' else ''}")
    print(f"  total, wall         {cohort['cohort_s']:7.1f} s   "
          f"({cohort['cohort_s'] / n_cohort:.2f} s per subject)")
    print(f"  total, CPU          {cohort['cohort_cpu_s']:7.1f} s")
    print(f"  peak RSS            {cohort['peak_rss_mb'] / 1024:7.2f} GB")
    print(f"\nratio full-size / 128 per subject: "
          f"{full['generate_s'] / (cohort['cohort_s'] / n_cohort):.1f} x "
          f"(pixels ratio 16 x)")


if __name__ == "__main__":
    main()
