"""The reduced-data experiment (docs/reduced_data.md): U-Net against the model-based methods
at the standard protocol and at half the dose, half the frames and both, on phantom cohorts
whose truth is known (:func:`ctperf.workflow.reduction.run_reduction`).

Prints the Markdown tables, writes ``OUT/reduction.json``, ``OUT/reduction.md`` and
``OUT/reduction.png``; a rerun into the same OUT reuses what is done.

    OMP_NUM_THREADS=2 python benchmarks/reduced_data.py OUT [--subjects 12] [--epochs N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from ctperf.io import atomic_file
    from ctperf.reporting import reduction_figure, save_figure
    from ctperf.workflow.reduction import (
        CONDITIONS,
        ReductionOptions,
        reduction_table,
        run_reduction,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    p.add_argument("--methods", nargs="+", default=["ssvd", "bsvd", "osvd", "bayes"])
    args = p.parse_args()
    options = ReductionOptions(subjects=args.subjects, size=args.size, slices=args.slices,
                               seed=args.seed, epochs=args.epochs,
                               conditions=tuple(args.conditions), methods=tuple(args.methods))
    t0 = time.perf_counter()
    doc = run_reduction(args.out, options, echo=print)
    text = reduction_table(doc)
    with atomic_file(args.out / "reduction.md") as tmp:
        tmp.write_text(text)
    save_figure(reduction_figure(doc), args.out / "reduction.png", dpi=110)
    print(text)
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
