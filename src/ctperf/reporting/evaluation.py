"""The evaluation report's pages and figures: Tables 1 and 2 as HTML, the map, Bland-Altman,
volume and training figures, and the sections of ``report.html`` of ``ctperf evaluate``."""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ctperf.evaluation.cohort import comparison_regions
from ctperf.evaluation.metrics import MAP_METRICS
from ctperf.reporting.html import figure_data_uri, figure_html, html_table
from ctperf.reporting.html import fmt_number as _fmt

__all__ = ["evaluation_figures", "evaluation_page"]



def _p(value: Any) -> str:
    """A p value: three decimals, or ``<0.001``."""
    text = _fmt(value, 3)
    return "<0.001" if text not in ("n/a",) and float(value) < 0.001 else text


def _pm(stat: Mapping[str, Any], digits: int = 3) -> str:
    mean, sd = stat.get("mean"), stat.get("sd")
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}" if _fmt(sd) != "n/a" else _fmt(mean,
                                                                                       digits)


def _table1_html(result: Mapping[str, Any]) -> str:
    header = ["estimate", "reference", "map [unit]", "n", "MSE (paper: min-max)",
              "MSE (ctperf windows)", "PSNR dB", "SSIM", "MAE", "bias", "RMSE", "Pearson r",
              "Lin's CCC", "coverage"]
    rows = [[r["estimate"], r["reference"], f"{r['map']} [{r['unit']}]", r["summary"]["mae"]["n"],
             *(_pm(r["summary"][m], 4 if m.startswith("mse") else 2 if m in
                   ("psnr", "mae", "bias", "rmse") else 3) + _fewer(r["summary"], m)
               for m in MAP_METRICS)]
            for r in result["maps"]]
    return html_table(header, rows, text_columns=3)


def _fewer(summary: Mapping[str, Any], metric: str) -> str:
    """`` (n)`` after a metric taken over fewer studies than the row's n (no PSNR where two maps
    are identical), else nothing."""
    n = summary[metric].get("n")
    return f" ({n})" if n is not None and n != summary["mae"]["n"] else ""


def _table2_html(result: Mapping[str, Any]) -> str:
    header = ["lesion", "estimate", "reference", "n", "Dice (n)", "excluded / undefined",
              "volume est. mL", "volume ref. mL", "|ΔV| mL", "Pearson r (p)",
              "BA bias [95 % LoA] mL", "CR mL", "ICC(1,k) [95 % CI]"]
    rows = []
    for r in result["lesions"]:
        d, v = r["dice"], r["volumes"]
        ba, icc = v["bland_altman"], v.get("icc1k") or {}
        rows.append([
            r["lesion"], r["estimate"], r["reference"], v["n"],
            f"{_pm(d, 2)} ({d['n']})", f"{d['n_excluded']} / {d['n_undefined']}",
            _fmt(v["mean_a"], 1), _fmt(v["mean_b"], 1), _pm({"mean": v["mean_abs_diff"],
                                                              "sd": v["sd_abs_diff"]}, 1),
            f"{_fmt(v['pearson_r'], 2)} ({_p(v['pearson_p'])})",
            f"{_fmt(ba['bias'], 1)} [{_fmt(ba['loa_low'], 1)}, {_fmt(ba['loa_high'], 1)}]",
            _fmt(ba["cr"], 1),
            f"{_fmt(icc.get('icc'), 2)} [{_fmt(icc.get('ci_low'), 2)}, "
            f"{_fmt(icc.get('ci_high'), 2)}]"])
    return html_table(header, rows, text_columns=3)


def _dice_cases_html(result: Mapping[str, Any]) -> str:
    rows = []
    for r in result["lesions"]:
        for study, c in r["cases"].items():
            status = c["excluded"] or ("undefined" if c["undefined"] else "")
            rows.append([r["lesion"], r["estimate"], r["reference"], study,
                         "undefined" if c["dice"] is None else c["dice"],
                         c["volume_estimate_ml"], c["volume_reference_ml"], status])
    return html_table(["lesion", "estimate", "reference", "study", "Dice", "volume est. mL",
                       "volume ref. mL", "left out of the Dice mean"], rows, text_columns=4)


def _studies(n: int) -> str:
    return f"{n} stud{'y' if n == 1 else 'ies'}"


#: Longest name part a figure file takes from labels (folder names can be long).
MAX_NAME_PART = 80


def _file_part(text: str) -> str:
    """``text`` as part of a file name: anything but letters, digits, ``.``, ``-`` and ``_``
    as one ``_``; longer than :data:`MAX_NAME_PART`, cut and ended with a digest of the whole
    (two folder names of 125 characters had made a name the file system refused, and the
    evaluation was lost)."""
    part = re.sub(r"_+", "_", re.sub(r"[^\w.-]", "_", text)).strip("_")
    if len(part) > MAX_NAME_PART:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        part = f"{part[:MAX_NAME_PART - 11]}-{digest}"
    return part


def _unused(figs: Mapping[str, Any], kind: str, text: str) -> str:
    """``<kind>_<text>.png`` (:func:`_file_part`), numbered ``-2``, ``-3``... where ``figs``
    holds that name already: names that differ only in what a file name drops (``a b``,
    ``a_b``) had replaced each other's figures."""
    base = f"{kind}_{_file_part(text)}"
    name, k = f"{base}.png", 1
    while name in figs:
        k += 1
        name = f"{base}-{k}.png"
    return name


def evaluation_figures(readers: Sequence[Any], result: Mapping[str, Any], studies: Sequence[str],
             log: Sequence[Mapping[str, Any]] | None, *,
             max_map_figures: int) -> dict[str, tuple[str, str]]:
    """The evaluation's figures as PNG data URIs with their captions, by file name.

    Parameters
    ----------
    readers : sequence of Reader
        :func:`ctperf.evaluation.load_maps_cohort` and :func:`~ctperf.evaluation.load_rater`
        readers, the estimate first, then its reference; a ``truth`` reader outlines the lesions.
    result : mapping
        :func:`ctperf.evaluation.evaluate_readers`' result (its ``lesions`` rows).
    studies : sequence of str
        Studies evaluated, in order.
    log : sequence of mapping, optional
        Training log rows (``log.csv`` of ``ctperf train``) for the training curves.
    max_map_figures : int
        Studies shown as map figures (the first ones).

    Returns
    -------
    dict
        ``maps_<study>.png``, ``bland_altman_<estimate>_vs_<reference>.png``,
        ``volumes_<estimate>_vs_<reference>.png`` and ``training.png`` to (data URI, caption).
    """
    from ctperf.reporting.figures import (
        bland_altman_figure,
        side_by_side_figure,
        training_curves_figure,
        volume_scatter_figure,
    )

    figs: dict[str, tuple[str, str]] = {}
    with_maps = [r for r in readers if r.maps]
    truth = next((r for r in readers if r.kind == "truth"), None)
    outline_src = truth or readers[1]
    # An SVD method's delay map is its Tmax: its delay panels would compare it with an arrival
    # delay, as Table 1 does not
    svd = [r.label for r in with_maps if r.delay_is_tmax]
    names = ("cbv", "cbf", "tmax") if svd else ("cbv", "cbf", "delay", "tmax")
    unshown = f" (no delay: {', '.join(svd)}'s delay map is its Tmax)" if svd else ""
    _, regions = comparison_regions(readers, studies)
    for s in studies[:max_map_figures]:
        region = regions[s]
        les = outline_src.lesions.get(s, {})
        outlines = {f"{outline_src.label} {n}": les[n] for n in ("core", "hypoperfused")
                    if n in les}
        fig = side_by_side_figure([(r.label, r.maps[s]) for r in with_maps], names=names,
                                  mask=region,
                                  outlines=outlines, title=f"{s}: maps and differences")
        figs[_unused(figs, "maps", s)] = (figure_data_uri(fig),
                                 f"{s}: maps of each reader, then differences "
                                 f"{readers[0].label} minus each reference{unshown}")
    pairs = list(dict.fromkeys((r["estimate"], r["reference"]) for r in result["lesions"]))
    for est, ref in pairs:
        rows = [r for r in result["lesions"] if (r["estimate"], r["reference"]) == (est, ref)]
        figs[_unused(figs, "bland_altman", f"{est}_vs_{ref}")] = (
            figure_data_uri(bland_altman_figure(rows, title=f"{est} vs {ref}")),
            f"Bland-Altman plots of lesion volumes, {est} vs {ref} (bias and 95 % limits)")
        figs[_unused(figs, "volumes", f"{est}_vs_{ref}")] = (
            figure_data_uri(volume_scatter_figure(rows, title=f"{est} vs {ref}")),
            f"lesion volumes, {est} against {ref}, with the identity line")
    if log is not None:
        figs["training.png"] = (figure_data_uri(training_curves_figure(log)),
                                "training and validation loss per epoch (log.csv)")
    return figs


def evaluation_page(doc: Mapping[str, Any], figures: Mapping[str, tuple[str, str]]) -> str:
    """``report.html`` of ``ctperf evaluate``: one self-contained page.

    Parameters
    ----------
    doc : mapping
        The content of ``evaluation.json`` (readers, studies, excluded studies, region, software
        version, and :func:`ctperf.evaluation.evaluate_readers`' result).
    figures : mapping
        :func:`evaluation_figures`' result.
    """
    from ctperf.reporting.html import html_report

    readers = doc["readers"]
    return html_report(title=f"ctperf evaluation: {readers[0]['label']} vs {readers[1]['label']}",
                       sections=_sections(doc, figures))


def _sections(doc: Mapping[str, Any], figures: Mapping[str, tuple[str, str]]) -> list[
        tuple[str, str]]:
    readers = "".join(f"<li>{html.escape(r['label'])} ({r['kind']}): "
                      f"<code>{html.escape(r['path'])}</code>"
                      + "".join(f"; {html.escape(n)}" for n in r.get("unit_conversions", []))
                      + (f"; {html.escape(r['lesions_segmented'])}"
                         if r.get("lesions_segmented") else "")
                      + "</li>" for r in doc["readers"])
    excluded = "".join(f"<li>{html.escape(s)}: {html.escape(why)}</li>"
                       for s, why in doc["excluded_studies"].items())
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in doc.get("warnings", []))
    intro = (f'<ul class="note">{readers}</ul><p class="note">{_studies(len(doc["studies"]))}: '
             f'{html.escape(", ".join(doc["studies"]))}. Maps compared within the '
             f'{html.escape(doc["region"])}. ctperf {html.escape(str(doc["software_version"]))}.'
             "</p>" + (f'<p class="note">Left out:</p><ul class="note">{excluded}</ul>'
                       if excluded else "") + (f'<p class="note">Warnings:</p><ul class="note">'
                                               f"{warnings}</ul>" if warnings else ""))
    t1_note = ('<p class="note">Mean ± SD over studies of per-study figures. MSE (paper: '
               "min-max): both maps scaled to [0, 1] with the reference data set's minimum and "
               "maximum over whole images, background included (a voxel without a value as "
               "0), as Gava et al. 2023 normalised their maps. MSE (ctperf windows): scaled "
               "and clipped with ctperf's fixed window per map (the U-Net's target windows); "
               "PSNR and SSIM (Wang 2004, Gaussian window sigma 1.5 px, per slice) on those "
               "maps. MAE, bias (estimate - reference), RMSE in the map's unit; delay is the "
               "arrival delay of the tissue's arterial input (ctperf's box model and bayes "
               "fit it; another tool's delay map is read as its own definition), ttp the "
               "time to peak from the first frame. "
               "Coverage: the share of the reference's values in the region at which the "
               "estimate has a value too; every other figure is over those voxels.</p>")
    t2_note = ('<p class="note">Dice: mean ± SD over studies with a lesion in the reference '
               "(studies without one are left out, as in the paper; both masks empty = "
               "undefined, never 0 or 1). |ΔV|: mean ± SD of absolute volume differences. "
               "BA: Bland-Altman bias and 95 % limits of agreement (estimate - reference); "
               "CR: coefficient of repeatability 1.96 SD of the differences; ICC(1,k) from "
               "pingouin with its 95 % confidence interval.</p>")
    sections = [("", intro), ("Table 1: map agreement", _table1_html(doc) + t1_note),
                ("Table 2: lesion agreement", _table2_html(doc) + t2_note)]
    if doc["friedman"]:
        sections.append(("Friedman tests of lesion volumes", html_table(
            ["lesion", "readers", "n", "chi-square", "p"],
            [[f["lesion"], ", ".join(f["readers"]), f["n"], f["statistic"], _p(f["p"])]
             for f in doc["friedman"]], text_columns=2)
            + '<p class="note">On the lesion volumes of every reader that segmented the lesion; '
              "n/a when every study's volumes are tied. p from the chi-square approximation "
              "(scipy), which is rough under about 10 studies; no p value in this report is "
              "corrected for multiple comparisons.</p>"))
    sections.append(("Figures", "".join(figure_html(uri, cap)
                                        for uri, cap in figures.values())))
    sections.append(("Dice and volumes per study", _dice_cases_html(doc)))
    return sections
