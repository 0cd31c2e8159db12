"""``ctperf demo [OUT]``: the whole model-based pipeline on a digital phantom with known truth."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctperf.commands import add_filter_options, add_overwrite_option

__all__ = ["ORDER", "register", "run"]

ORDER = 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="end-to-end run on a digital phantom, scored against its true maps",
        description="Simulate a stroke CTP study with known perfusion (digital phantom), "
                    "preprocess it as the paper did (rigid motion correction of every frame to "
                    "the first, bilateral filter guided by the temporal mean), "
                    "compute box-model NLR maps and lesions, and score them against the truth. "
                    "Writes OUT/phantom/ (study, true maps, masks, preview.png), OUT/maps/ (as "
                    "`ctperf maps`), OUT/evaluation.json, OUT/comparison.png, OUT/report.md and "
                    "OUT/report.html (one self-contained file).")
    p.add_argument("out", type=Path, nargs="?", default=Path("ctperf-demo"),
                   help="output folder [ctperf-demo]")
    p.add_argument("--size", type=int, default=256,
                   help="in-plane pixels over a 230 mm field of view [256; scanners give 512]")
    p.add_argument("--slices", type=int, default=8, help="5 mm slices [8]")
    p.add_argument("--frames", type=int, default=89, help="frames 0.5 s apart [89]")
    p.add_argument("--seed", type=int, default=3, help="phantom seed [3]")
    p.add_argument("--motion", choices=("none", "mild", "severe"), default="none",
                   help="simulated head motion [none]")
    p.add_argument("--method", choices=("nlr", "nlr-fast", "ssvd", "bsvd", "osvd", "bayes"),
                   default="nlr-fast", help="perfusion method [nlr-fast]")
    p.add_argument("--no-preprocess", action="store_true",
                   help="skip motion correction and filtering")
    p.add_argument("--no-register", action="store_true",
                   help="skip motion correction (filter only)")
    add_filter_options(p)
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ctperf import io
    from ctperf.commands.maps import write_outputs
    from ctperf.errors import ValidationError
    from ctperf.evaluation.metrics import dice
    from ctperf.evaluation.truth import compare_with_truth
    from ctperf.perfusion import LesionOptions, analyse_study, segment_lesions
    from ctperf.phantom import generate_subject, write_subject
    from ctperf.reporting import (
        comparison_figure,
        demo_tables_markdown,
        save_figure,
        write_demo_report,
    )

    for name, value, least in (("--size", args.size, 32), ("--slices", args.slices, 1),
                               ("--frames", args.frames, 30)):
        if value < least:
            raise ValidationError(f"demo: {name} must be at least {least}, got {value}")
    do_register = not (args.no_register or args.no_preprocess)
    io.check_output(args.out, overwrite=args.overwrite)
    print(f"[1/4] simulating a {args.size} x {args.size} x {args.slices} x {args.frames} "
          f"phantom study (seed {args.seed}, {args.motion} motion)")
    subject = generate_subject(seed=args.seed, size=args.size, slices=args.slices,
                               frames=args.frames, motion=args.motion, lesion=True,
                               progress=True)
    with io.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_subject(subject, tmp / "phantom", dicom=False, preview=True)
        steps = ("maps" if args.no_preprocess else "motion correction, bilateral filter, maps"
                 if do_register else "bilateral filter, maps")
        print(f"[2/4] {steps} ({args.method})")
        result, pre = analyse_study(subject.series, method=args.method,
                                    register=do_register,
                                    filter=not args.no_preprocess,
                                    spatial_sigma_mm=args.spatial_sigma,
                                    range_sigma_hu=args.range_sigma,
                                    filter_weights=args.filter_weights,
                                    lesion_options=LesionOptions(), progress=True)
        if pre is not None:
            print(f"      measured displacement: mean {np.mean(pre.displacement_mm):.2f} mm, "
                  f"max {np.max(pre.max_displacement_mm):.2f} mm")
        print("[3/4] writing maps, lesions and overview")
        write_outputs(result, tmp / "maps", title=f"phantom seed {args.seed}: {args.method}")

        print("[4/4] scoring against the phantom's true maps")
        masks = subject.masks
        true_lesions = {"core": masks["core"], "penumbra": masks["penumbra"],
                        "hypoperfused": masks["core"] | masks["penumbra"]}
        regions = {"brain": masks["brain"], "gm": masks["gm"] & masks["brain"],
                   "wm": masks["wm"] & masks["brain"], "core": masks["core"],
                   "penumbra": masks["penumbra"]}
        scores = compare_with_truth(result.maps, subject.truth, regions=regions,
                                    lesions=result.lesions.masks(), true_lesions=true_lesions)
        # The phantom's core is CBF < 30 % of each voxel's own healthy CBF, which no measurement
        # knows; the same rule as ctperf's (contralateral reference) on the true maps shows how
        # much of the core disagreement is the rule's and how much the maps'.
        rule = segment_lesions(subject.truth, brain=result.brain & masks["brain"],
                               exclude=result.vessels,
                               options=LesionOptions())
        scores["lesions_vs_rule_on_truth"] = {
            name: {"dice": dice(result.lesions.masks()[name], rule.masks()[name]),
                   "dice_rule_vs_phantom": dice(rule.masks()[name], true_lesions[name]),
                   "rule_volume_ml": rule.volumes_ml[name]}
            for name in ("core", "hypoperfused", "penumbra")}
        scores["method"] = args.method
        scores["preprocessed"] = not args.no_preprocess
        scores["registered"] = do_register
        scores["phantom"] = {"seed": args.seed, "shape": list(subject.series.shape),
                             "motion": args.motion}
        io.write_json(scores, tmp / "evaluation.json")
        fig = comparison_figure(result.maps, subject.truth, mask=masks["brain"],
                                outlines={"true core": masks["core"],
                                          "true penumbra": masks["penumbra"]},
                                labels=(args.method, "truth"),
                                title=f"phantom seed {args.seed}: {args.method} vs truth")
        save_figure(fig, tmp / "comparison.png", dpi=100, facecolor="black")
        table = demo_tables_markdown(scores)
        steps_done = ("not preprocessed" if args.no_preprocess else "registered and filtered"
                      if do_register else "filtered, not registered")
        write_demo_report(tmp, method=args.method, seed=args.seed,
                          shape=subject.series.shape, motion=args.motion,
                          preprocessing=steps_done, tables=table)
    print(table)
    print(f"wrote {args.out}/report.html (self-contained), report.md, comparison.png, maps/ "
          "and phantom/")
    return 0
