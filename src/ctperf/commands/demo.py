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
    import matplotlib.pyplot as plt
    import numpy as np

    from ctperf import io
    from ctperf.commands.maps import write_outputs
    from ctperf.errors import ValidationError
    from ctperf.evaluation.metrics import dice
    from ctperf.evaluation.plots import comparison_figure
    from ctperf.evaluation.report import html_report, markdown_tables_to_html, png_data_uri
    from ctperf.evaluation.truth import compare_with_truth, truth_table_markdown
    from ctperf.perfusion import LesionOptions, analyse_study, segment_lesions
    from ctperf.phantom import generate_subject, write_subject

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
        with io.atomic_file(tmp / "comparison.png") as png:
            fig.savefig(png, dpi=100, facecolor="black")
        plt.close(fig)
        table = truth_table_markdown(scores) + (
            "\nThe same lesion rule applied to the true maps (what a perfect map would give):\n\n"
            "| lesion | Dice, estimate vs rule on truth | Dice, rule on truth vs phantom "
            "| volume mL (rule on truth) |\n|---|---|---|---|\n" + "".join(
                f"| {name} | {v['dice']:.2f} | {v['dice_rule_vs_phantom']:.2f} "
                f"| {v['rule_volume_ml']:.1f} |\n"
                for name, v in scores["lesions_vs_rule_on_truth"].items()))
        steps_done = ("not preprocessed" if args.no_preprocess else "registered and filtered"
                      if do_register else "filtered, not registered")
        report = (f"# ctperf demo: {args.method} on a digital phantom\n\n"
                  f"Phantom seed {args.seed}, study {' x '.join(map(str, subject.series.shape))} "
                  f"(T, Z, Y, X), simulated motion: {args.motion}, "
                  f"{steps_done}.\n\n"
                  f"{table}\n![maps](maps/overview.png)\n\n![comparison](comparison.png)\n\n"
                  "![phantom](phantom/preview.png)\n")
        with io.atomic_file(tmp / "report.md") as md:
            md.write_text(report)
        intro = (f"Phantom seed {args.seed}, study {' x '.join(map(str, subject.series.shape))} "
                 f"(T, Z, Y, X), simulated motion: {args.motion}, {steps_done}.")
        figures = "".join(
            f'<figure><img src="{png_data_uri((tmp / rel).read_bytes())}" alt="{cap}">'
            f"<figcaption>{cap}</figcaption></figure>\n"
            for rel, cap in (("maps/overview.png", "maps and lesions"),
                             ("comparison.png", f"{args.method} against the true maps"),
                             ("phantom/preview.png", "the phantom study")))
        page = html_report(title=f"ctperf demo: {args.method} on a digital phantom",
                           sections=[("", f'<p class="note">{intro}</p>'),
                                     ("Agreement with the truth", markdown_tables_to_html(table)),
                                     ("Figures", figures)])
        with io.atomic_file(tmp / "report.html") as page_file:
            page_file.write_text(page, encoding="utf-8")
    print(table)
    print(f"wrote {args.out}/report.html (self-contained), report.md, comparison.png, maps/ "
          "and phantom/")
    return 0
