"""Evaluation outputs: Tables 1 and 2 as CSV, ``evaluation.json``, figures and one HTML report.

The report is a single self-contained file: figures are embedded as base64 PNG data URIs, the
style sheet is inline (system fonts, print rules), and nothing is fetched from a network, so it
opens offline and prints as it shows.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError
from ctperf.lesion_options import LesionOptions

__all__ = [
    "TABLE1_COLUMNS",
    "TABLE2_COLUMNS",
    "evaluate_cohorts",
    "figure_data_uri",
    "html_report",
    "html_table",
    "json_safe",
    "markdown_tables_to_html",
    "png_data_uri",
    "table1",
    "table2",
]

logger = logging.getLogger(__name__)

_METRICS = ("mse_minmax", "mse_window", "psnr", "ssim", "mae", "bias", "rmse", "pearson_r", "ccc")
#: Columns of ``table1.csv`` (one row per estimate, reference and map).
TABLE1_COLUMNS = ("estimate", "reference", "map", "unit", "n_cases", "window_low", "window_high",
                  "minmax_low", "minmax_high",
                  *(f"{m}_{s}" for m in _METRICS for s in ("mean", "sd")))
#: Columns of ``table2.csv`` (one row per lesion, estimate and reference).
TABLE2_COLUMNS = ("lesion", "estimate", "reference", "n_cases", "dice_n", "dice_mean", "dice_sd",
                  "dice_excluded", "dice_undefined", "volume_estimate_mean_ml",
                  "volume_reference_mean_ml", "mean_abs_diff_ml", "sd_abs_diff_ml", "pearson_r",
                  "pearson_p", "ba_bias_ml", "ba_loa_low_ml", "ba_loa_high_ml", "cr_ml", "icc1k",
                  "icc1k_ci_low", "icc1k_ci_high")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #111; background: #fff; }
h1 { font-size: 1.5em; border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6em 0; font-size: .74em; }
th, td { border: 1px solid #bbb; padding: .15em .35em; text-align: right; white-space: nowrap; }
th { background: #eef1f5; text-align: center; white-space: normal; }
td.t { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #444; }
p.note, ul.note { font-size: .88em; color: #333; }
.scroll { overflow-x: auto; }
@page { size: A4 landscape; margin: 10mm; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  .scroll { overflow: visible; }
  table { font-size: 7.5pt; page-break-inside: auto; }
  tr { page-break-inside: avoid; break-inside: avoid; }
  h2 { page-break-after: avoid; break-after: avoid; }
  figure img { max-height: 24cm; }
}
"""


def json_safe(node: Any) -> Any:
    """A copy with NaN and infinite floats as None and NumPy scalars as Python numbers."""
    if isinstance(node, Mapping):
        return {str(k): json_safe(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [json_safe(v) for v in node]
    if isinstance(node, np.generic):
        node = node.item()
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int | np.integer):
        return str(int(value))
    v = float(value)
    if v != 0 and abs(v) < 0.5 * 10**-digits:  # would print as 0: show its magnitude
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _p(value: Any) -> str:
    """A p value: three decimals, or ``<0.001``."""
    text = _fmt(value, 3)
    return "<0.001" if text not in ("n/a",) and float(value) < 0.001 else text


def _pm(stat: Mapping[str, Any], digits: int = 3) -> str:
    mean, sd = stat.get("mean"), stat.get("sd")
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}" if _fmt(sd) != "n/a" else _fmt(mean,
                                                                                       digits)


def table1(result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Rows of ``table1.csv`` (:data:`TABLE1_COLUMNS`) from :func:`evaluate_readers`' result."""
    rows = []
    for r in result["maps"]:
        s = r["summary"]
        rows.append([r["estimate"], r["reference"], r["map"], r["unit"], s["mae"]["n"],
                     *r["window"], *r["minmax"],
                     *(s[m][k] for m in _METRICS for k in ("mean", "sd"))])
    return list(TABLE1_COLUMNS), rows


def table2(result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Rows of ``table2.csv`` (:data:`TABLE2_COLUMNS`) from :func:`evaluate_readers`' result."""
    rows = []
    for r in result["lesions"]:
        d, v = r["dice"], r["volumes"]
        ba, icc = v["bland_altman"], v.get("icc1k") or {}
        rows.append([r["lesion"], r["estimate"], r["reference"], v["n"], d["n"], d["mean"],
                     d["sd"], d["n_excluded"], d["n_undefined"], v["mean_a"], v["mean_b"],
                     v["mean_abs_diff"], v["sd_abs_diff"], v["pearson_r"], v["pearson_p"],
                     ba["bias"], ba["loa_low"], ba["loa_high"], ba["cr"], icc.get("icc"),
                     icc.get("ci_low"), icc.get("ci_high")])
    return list(TABLE2_COLUMNS), rows


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if json_safe(v) is None else v for v in row])
    return buf.getvalue()


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
               text_columns: int = 1) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text, values escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="t">{html.escape(str(v))}</td>' if j < text_columns
            else f"<td>{html.escape(v if isinstance(v, str) else _fmt(v))}</td>"
            for j, v in enumerate(row)) + "</tr>\n"
        for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>\n{body}</table></div>\n'


def markdown_tables_to_html(text: str) -> str:
    """Pipe tables of a Markdown text as HTML tables, other non-empty lines as paragraphs."""
    out: list[str] = []
    block: list[list[str]] = []

    def flush() -> None:
        if block:
            rows = [r for r in block if not all(set(c) <= set("-: ") for c in r)]
            out.append(html_table(rows[0], rows[1:], text_columns=len(rows[0])))
            block.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            out.append(f'<p class="note">{html.escape(line.strip())}</p>\n')
    flush()
    return "".join(out)


def png_data_uri(data: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_data_uri(fig: Any, *, dpi: int = 90) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    return png_data_uri(buf.getvalue())


def _figure_html(uri: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def html_report(*, title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained HTML page: ``sections`` are (heading, HTML body) pairs, in order."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}" if h else b for h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n"
            f"<body>\n<h1>{html.escape(title)}</h1>\n{body}</body></html>\n")


def _table1_html(result: Mapping[str, Any]) -> str:
    header = ["estimate", "reference", "map [unit]", "n", "MSE (paper: min-max)",
              "MSE (ctperf windows)", "PSNR dB", "SSIM", "MAE", "bias", "RMSE", "Pearson r",
              "Lin's CCC"]
    rows = [[r["estimate"], r["reference"], f"{r['map']} [{r['unit']}]", r["summary"]["mae"]["n"],
             *(_pm(r["summary"][m], 4 if m.startswith("mse") else 2 if m in
                   ("psnr", "mae", "bias", "rmse") else 3) for m in _METRICS)]
            for r in result["maps"]]
    return html_table(header, rows, text_columns=3)


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


def _read_train_log(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable training log ({exc})") from None
    if not rows or not {"epoch", "train_loss"} <= set(rows[0]):
        raise InputError(path, "a training log needs epoch and train_loss columns "
                               "(log.csv of ctperf train)")
    return rows


def evaluate_cohorts(pred: str | Path, ref: str | Path, out: str | Path, *,
                     truth: str | Path | None = None, raters: Sequence[str | Path] = (),
                     compare: Sequence[str | Path] = (), train_log: str | Path | None = None,
                     overwrite: bool = False, max_map_figures: int = 6,
                     lesion_options: LesionOptions | None = None) -> dict[str, Any]:
    """Compare a maps cohort with a reference (and truth, raters, more methods); write the report.

    Parameters
    ----------
    pred, ref : path
        Maps cohorts (``<root>/<study>/<map>.nii.gz`` and ``lesions/``); a phantom cohort also
        works as ``ref`` (its truth).
    out : path
        Output folder, replaced whole: ``table1.csv``, ``table2.csv``, ``evaluation.json``,
        ``figures/*.png`` and ``report.html``.
    truth : path, optional
        Phantom cohort whose true maps and masks every method is also compared with.
    raters : sequence of path
        Manual segmentations, one folder per rater (see :func:`load_rater`).
    compare : sequence of path
        Further maps cohorts, compared with ``ref`` and the truth like ``pred``.
    train_log : path, optional
        ``log.csv`` of ``ctperf train``; default ``<pred>/log.csv`` when it exists.
    overwrite : bool
        Replace an existing ``out`` that ctperf did not write.
    max_map_figures : int
        Studies shown as map figures (the first ones, in name order).
    lesion_options : LesionOptions, optional
        Thresholds of :func:`ctperf.perfusion.segment_lesions` for map folders without
        ``lesions/`` (see :func:`load_maps_cohort`).

    Returns
    -------
    dict
        The content of ``evaluation.json``.
    """
    from ctperf import __version__, io
    from ctperf.evaluation.cohort import evaluate_readers, load_maps_cohort, load_rater

    readers = [load_maps_cohort(p, lesion_options=lesion_options) for p in (pred, ref, *compare)]
    if truth is not None:
        readers.append(load_maps_cohort(truth, label="truth"))
    _unique_labels(readers)
    with_maps = [r for r in readers if r.maps]
    studies = sorted(set.intersection(*(set(r.maps) for r in with_maps)))
    if not studies:
        raise InputError(pred, f"no study in common with {ref}"
                               + (f" and {truth}" if truth is not None else ""))
    excluded = {s: "missing in " + ", ".join(r.label for r in with_maps if s not in r.maps)
                for r0 in with_maps for s in r0.maps if s not in studies}
    shapes = {s: readers[1].maps[s].shape for s in studies}
    readers += [load_rater(p, shapes) for p in raters]
    _unique_labels(readers)
    for r in readers[len(with_maps):]:
        for s in [s for s in studies if s not in r.lesions]:
            studies.remove(s)
            excluded[s] = f"no segmentation by {r.label}"
    if not studies:
        raise InputError(raters[0], "the raters segmented none of the studies in common")
    result = evaluate_readers(readers, studies=studies)
    log_path = Path(train_log) if train_log is not None else Path(pred) / "log.csv"
    log = _read_train_log(log_path) if train_log is not None or log_path.exists() else None
    doc = {"software_version": __version__,
           "readers": [{"label": r.label, "kind": r.kind, "path": r.path} for r in readers],
           "studies": studies, "excluded_studies": excluded, **result,
           "training_log": str(log_path) if log is not None else None}
    figures = _figures(readers, result, studies, log, max_map_figures=max_map_figures)
    page = html_report(title=f"ctperf evaluation: {readers[0].label} vs {readers[1].label}",
                       sections=_sections(doc, figures))
    tables = {"table1.csv": table1(result), "table2.csv": table2(result)}
    with io.atomic_dir(out, overwrite=overwrite) as tmp:
        for name, (header, rows) in tables.items():
            (tmp / name).write_text(_csv_text(header, rows))
        if result["friedman"]:
            (tmp / "friedman.csv").write_text(_csv_text(
                ["lesion", "readers", "n", "k", "statistic", "p"],
                [[f["lesion"], " ".join(f["readers"]), f["n"], f["k"], f["statistic"], f["p"]]
                 for f in result["friedman"]]))
        (tmp / "figures").mkdir()
        for name, (uri, _) in figures.items():
            (tmp / "figures" / name).write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        io.write_json(json_safe(doc), tmp / "evaluation.json")
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return json_safe(doc)


def _unique_labels(readers: Sequence[Any]) -> None:
    seen: dict[str, int] = {}
    for r in readers:
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label}-{seen[r.label]}"
        else:
            seen[r.label] = 1


def _figures(readers: Sequence[Any], result: Mapping[str, Any], studies: Sequence[str],
             log: Sequence[Mapping[str, Any]] | None, *,
             max_map_figures: int) -> dict[str, tuple[str, str]]:
    from ctperf.evaluation.plots import (
        bland_altman_figure,
        side_by_side_figure,
        training_curves_figure,
        volume_scatter_figure,
    )

    figs: dict[str, tuple[str, str]] = {}
    with_maps = [r for r in readers if r.maps]
    truth = next((r for r in readers if r.kind == "truth"), None)
    outline_src = truth or readers[1]
    for s in studies[:max_map_figures]:
        region = (truth.brain.get(s) if truth is not None else None)
        if region is None:
            region = next((r.brain[s] for r in with_maps if s in r.brain), None)
        les = outline_src.lesions.get(s, {})
        outlines = {f"{outline_src.label} {n}": les[n] for n in ("core", "hypoperfused")
                    if n in les}
        fig = side_by_side_figure([(r.label, r.maps[s]) for r in with_maps], mask=region,
                                  outlines=outlines, title=f"{s}: maps and differences")
        figs[f"maps_{s}.png"] = (figure_data_uri(fig),
                                 f"{s}: maps of each reader, then differences "
                                 f"{readers[0].label} minus each reference")
    pairs = list(dict.fromkeys((r["estimate"], r["reference"]) for r in result["lesions"]))
    for est, ref in pairs:
        rows = [r for r in result["lesions"] if (r["estimate"], r["reference"]) == (est, ref)]
        tag = f"{est}_vs_{ref}".replace("/", "-")
        figs[f"bland_altman_{tag}.png"] = (
            figure_data_uri(bland_altman_figure(rows, title=f"{est} vs {ref}")),
            f"Bland-Altman plots of lesion volumes, {est} vs {ref} (bias and 95 % limits)")
        figs[f"volumes_{tag}.png"] = (
            figure_data_uri(volume_scatter_figure(rows, title=f"{est} vs {ref}")),
            f"lesion volumes, {est} against {ref}, with the identity line")
    if log is not None:
        figs["training.png"] = (figure_data_uri(training_curves_figure(log)),
                                "training and validation loss per epoch (log.csv)")
    return figs


def _sections(doc: Mapping[str, Any], figures: Mapping[str, tuple[str, str]]) -> list[
        tuple[str, str]]:
    readers = "".join(f"<li>{html.escape(r['label'])} ({r['kind']}): "
                      f"<code>{html.escape(r['path'])}</code></li>" for r in doc["readers"])
    excluded = "".join(f"<li>{html.escape(s)}: {html.escape(why)}</li>"
                       for s, why in doc["excluded_studies"].items())
    intro = (f'<ul class="note">{readers}</ul><p class="note">{len(doc["studies"])} studies: '
             f'{html.escape(", ".join(doc["studies"]))}. Maps compared within the '
             f'{html.escape(doc["region"])}. ctperf {html.escape(str(doc["software_version"]))}.'
             "</p>" + (f'<p class="note">Left out:</p><ul class="note">{excluded}</ul>'
                       if excluded else ""))
    t1_note = ('<p class="note">Mean ± SD over studies of per-study figures. MSE (paper: '
               "min-max): both maps scaled to [0, 1] with the reference data set's minimum and "
               "maximum over whole images, background included, as Gava et al. 2023 normalised "
               "their maps. MSE (ctperf windows): scaled and clipped with ctperf's fixed window "
               "per map (the U-Net's target windows); PSNR and SSIM (Wang 2004, Gaussian "
               "window sigma 1.5 px, per slice) on those maps. MAE, bias (estimate - reference), "
               "RMSE in the map's unit; delay is the box model's arrival delay, ttp the time "
               "to peak from the first frame.</p>")
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
              "n/a when every study's volumes are tied.</p>"))
    sections.append(("Figures", "".join(_figure_html(uri, cap)
                                        for uri, cap in figures.values())))
    sections.append(("Dice and volumes per study", _dice_cases_html(doc)))
    return sections
