"""Time and peak memory of the digital phantom.

Runs each case in a fresh Python process (so peak RSS belongs to that case alone) and prints:

1. one full-size subject, 512 x 512 x 8 slices x 89 frames (target < 20 s, < 3 GB), generation
   alone and generation + writing (NIfTI + DICOM);
2. a 20-subject 128 x 128 x 8 x 89 cohort written to disk (NIfTI + DICOM).

Usage: ``python benchmarks/bench_phantom.py [--anatomy auto|procedural|mni] [--quick]``.
Timings on a shared machine are noisy; compare figures from the same run.
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
from ctperf.phantom import generate_cohort, generate_subject, write_subject
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy", default="auto", choices=("auto", "procedural", "mni"))
    parser.add_argument("--quick", action="store_true", help="skip writing; 5-subject cohort")
    args = parser.parse_args()
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
