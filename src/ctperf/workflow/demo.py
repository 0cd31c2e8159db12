"""``ctperf demo``: the whole model-based pipeline on a digital phantom with known truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctperf.filter_options import check_filter_settings, filters_by_default
from ctperf.io.state import holds_output
from ctperf.workflow.analysis import analyse_study
from ctperf.workflow.study import StudyOutcome, write_maps_outputs

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """Options of :func:`run_demo`: the phantom (``size`` px over a 230 mm field of view,
    ``slices`` of 5 mm, ``frames`` 0.5 s apart, ``seed``, simulated ``motion``), the perfusion
    ``method`` and the preprocessing steps (``register``, ``filter`` (None: as
    :func:`~ctperf.filter_options.filters_by_default`) and the filter's ``spatial_sigma_mm``
    in mm, ``range_sigma_hu`` in HU, ``filter_weights``)."""

    size: int = 256
    slices: int = 8
    frames: int = 89
    seed: int = 3
    motion: str = "none"
    method: str = "nlr-fast"
    register: bool = True
    filter: bool | None = None
    spatial_sigma_mm: float = 3.0
    range_sigma_hu: float = 20.0
    filter_weights: str = "linear"
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        check_filter_settings(filters_by_default(self.method) if self.filter is None
                              else self.filter, spatial_sigma_mm=self.spatial_sigma_mm,
                              range_sigma_hu=self.range_sigma_hu,
                              filter_weights=self.filter_weights)


def _steps(o: DemoOptions) -> tuple[str, str]:
    """What runs (for the progress line) and what was done (for the report)."""
    running = ", ".join([*(["motion correction"] if o.register else []),
                         *(["bilateral filter"] if o.filter else []), "maps"])
    done = {(True, True): "registered and filtered", (False, True): "filtered, not registered",
            (True, False): "registered, not filtered",
            (False, False): "not preprocessed"}[(o.register, bool(o.filter))]
    return running, done


def _check_bolus_passes(subject: Any, o: DemoOptions) -> None:
    """Refuse a phantom scan too short for its own arterial bolus, with the frames it needs:
    the maps would refuse it asking for an AIF mask, which the demo cannot give (an AIF that
    has not fallen under :data:`~ctperf.perfusion.qc.PEAK_PASSED` of its peak by the last
    frame was not measured)."""
    import numpy as np

    from ctperf.errors import ValidationError
    from ctperf.perfusion.qc import PEAK_PASSED
    from ctperf.phantom.hemodynamics import aif_from_params

    t = np.arange(0.0, 180.0, 0.05)
    aif = aif_from_params(t, subject.params["aif"])
    peak = int(np.argmax(aif))
    passed = float(t[peak + int(np.flatnonzero(aif[peak:] < PEAK_PASSED * aif[peak])[0])])
    interval = float(subject.series.times[1] - subject.series.times[0])
    if float(subject.series.times[-1] - subject.series.times[0]) < passed:
        need = int(np.ceil(passed / interval)) + 1
        raise ValidationError(
            f"the phantom's arterial bolus (seed {o.seed}) falls under half its peak at "
            f"{passed:.1f} s, after the last of {o.frames} frames: its first pass is not "
            f"measured; give --frames {need} or more")


@holds_output("out")
def run_demo(out: Path, options: DemoOptions, *,
             echo: Callable[[str], None] | None = None) -> StudyOutcome:
    """Simulate a phantom study, analyse it as ``ctperf maps`` does and score it against its
    truth.

    Steps: check ``out`` -> simulate -> (register -> filter ->) maps and lesions -> write the
    maps -> score against the truth -> figures and reports. Everything is written inside one
    :func:`ctperf.io.atomic_dir`: ``phantom/``, ``maps/``, ``evaluation.json``,
    ``comparison.png``, ``report.md`` and ``report.html``.

    Parameters
    ----------
    out : Path
        Output folder, replaced whole when done.
    options : DemoOptions
    echo : callable, optional
        Receives one line per step (the CLI prints them).

    Returns
    -------
    StudyOutcome
        ``message`` holds the agreement tables (Markdown).
    """
    import numpy as np

    from ctperf import io
    from ctperf.lesion_options import LesionOptions
    from ctperf.perfusion.qc import raised_flags
    from ctperf.phantom import generate_subject, write_subject
    from ctperf.reporting import (
        comparison_figure,
        demo_tables_markdown,
        save_figure,
        write_demo_report,
    )

    o = options
    if o.filter is None:
        o = replace(o, filter=filters_by_default(o.method))
    say = echo or (lambda line: None)
    io.check_output(out, overwrite=o.overwrite)
    say(f"[1/4] simulating a {o.size} x {o.size} x {o.slices} x {o.frames} "
        f"phantom study (seed {o.seed}, {'no' if o.motion == 'none' else o.motion} motion)")
    subject = generate_subject(seed=o.seed, size=o.size, slices=o.slices, frames=o.frames,
                               motion=o.motion, lesion=True, progress=o.progress)
    _check_bolus_passes(subject, o)
    running, done = _steps(o)
    with io.atomic_dir(out, overwrite=o.overwrite) as tmp:
        write_subject(subject, tmp / "phantom", dicom=False, preview=True)
        say(f"[2/4] {running} ({o.method})")
        result, motion = analyse_study(
            subject.series, method=o.method, register=o.register, filter=o.filter,
            spatial_sigma_mm=o.spatial_sigma_mm, range_sigma_hu=o.range_sigma_hu,
            filter_weights=o.filter_weights, lesion_options=LesionOptions(),
            progress=o.progress)
        if motion is not None:
            say(f"      measured displacement: mean {np.mean(motion.displacement_mm):.2f} mm, "
                f"max {np.max(motion.max_displacement_mm):.2f} mm")
        say("[3/4] writing maps, lesions and overview")
        write_maps_outputs(result, tmp / "maps", title=f"phantom seed {o.seed}: {o.method}")
        # as ctperf maps says them: a 20 s scan's maps read CBF +256 % with three flags raised
        # that only overview.png showed
        raised = raised_flags(result.maps.provenance["qc"])
        if raised:
            say(f"      QC flags: {', '.join(raised)} (maps/summary.json says why)")
        say("[4/4] scoring against the phantom's true maps")
        scores = _scores(result, subject, o)
        io.write_json(scores, tmp / "evaluation.json")
        masks = subject.masks
        fig = comparison_figure(result.maps, subject.truth, mask=masks["brain"],
                                outlines={"true core": masks["core"],
                                          "true penumbra": masks["penumbra"]},
                                labels=(o.method, "truth"),
                                title=f"phantom seed {o.seed}: {o.method} vs truth")
        save_figure(fig, tmp / "comparison.png", dpi=100, facecolor="black")
        table = demo_tables_markdown(scores)
        write_demo_report(tmp, method=o.method, seed=o.seed, shape=subject.series.shape,
                          motion=o.motion, preprocessing=done, tables=table,
                          qc_flags=raised)
    return StudyOutcome(out=out, message=table, summary={"method": o.method,
                                                         "qc_flags": raised})


def _scores(result: Any, subject: Any, o: DemoOptions) -> dict[str, Any]:
    """Agreement of the maps and lesions with the phantom's truth (``evaluation.json``)."""
    from ctperf.evaluation.metrics import dice
    from ctperf.evaluation.truth import compare_with_truth
    from ctperf.lesion_options import LesionOptions
    from ctperf.perfusion import segment_lesions

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
                           exclude=result.vessels, options=LesionOptions())
    scores["lesions_vs_rule_on_truth"] = {
        name: {"dice": dice(result.lesions.masks()[name], rule.masks()[name]),
               "dice_rule_vs_phantom": dice(rule.masks()[name], true_lesions[name]),
               "rule_volume_ml": rule.volumes_ml[name]}
        for name in ("core", "hypoperfused", "penumbra")}
    scores["method"] = o.method
    scores["preprocessed"] = o.register or o.filter
    scores["registered"] = o.register
    scores["phantom"] = {"seed": o.seed, "shape": list(subject.series.shape),
                         "motion": o.motion}
    return scores
