"""Evaluation outputs: Tables 1 and 2 as CSV and ``evaluation.json``; the figures and the
self-contained HTML report are drawn by :mod:`ctperf.reporting.evaluation`."""

from __future__ import annotations

import base64
import csv
import io as _io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError
from ctperf.evaluation.metrics import MAP_METRICS
from ctperf.lesion_options import LesionOptions

__all__ = [
    "TABLE1_COLUMNS",
    "TABLE2_COLUMNS",
    "evaluate_cohorts",
    "json_safe",
    "table1",
    "table2",
]

log = logging.getLogger(__name__)

#: Columns of ``table1.csv`` (one row per estimate, reference and map).
TABLE1_COLUMNS = ("estimate", "reference", "map", "unit", "n_cases", "window_low", "window_high",
                  "minmax_low", "minmax_high",
                  *(f"{m}_{s}" for m in MAP_METRICS for s in ("mean", "sd")), "psnr_n")
#: Columns of ``table2.csv`` (one row per lesion, estimate and reference).
TABLE2_COLUMNS = ("lesion", "estimate", "reference", "n_cases", "dice_n", "dice_mean", "dice_sd",
                  "dice_excluded", "dice_undefined", "volume_estimate_mean_ml",
                  "volume_reference_mean_ml", "mean_abs_diff_ml", "sd_abs_diff_ml", "pearson_r",
                  "pearson_p", "ba_bias_ml", "ba_loa_low_ml", "ba_loa_high_ml", "cr_ml", "icc1k",
                  "icc1k_ci_low", "icc1k_ci_high")

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


def table1(result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Rows of ``table1.csv`` (:data:`TABLE1_COLUMNS`) from :func:`evaluate_readers`' result."""
    rows = []
    for r in result["maps"]:
        s = r["summary"]
        rows.append([r["estimate"], r["reference"], r["map"], r["unit"], s["mae"]["n"],
                     *r["window"], *r["minmax"],
                     *(s[m][k] for m in MAP_METRICS for k in ("mean", "sd")), s["psnr"]["n"]])
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
        ``lesions/`` (see :func:`load_maps_cohort`) where ``ref``'s summary of the same study
        does not give the options its lesions were made with (those are used where it does);
        None segments no lesions at all.

    Returns
    -------
    dict
        The content of ``evaluation.json``.
    """
    from ctperf import io
    from ctperf.evaluation.cohort import (
        comparison_grid,
        evaluate_readers,
        lesion_rule_warnings,
        load_maps_cohort,
        load_rater,
    )
    from ctperf.reporting.evaluation import evaluation_figures, evaluation_page
    from ctperf.versioning import software_version

    # maps without lesions (a U-Net's) are segmented with the rules of REF's lesions, study by
    # study, so that both are defined alike; with lesion_options where REF's are not known
    ref_reader = load_maps_cohort(ref, lesion_options=lesion_options)
    like = None if lesion_options is None else {  # REF's own rules, from its summaries
        s: o for s, o in ref_reader.lesion_options.items() if s not in ref_reader.segmented}
    readers = [load_maps_cohort(p, lesion_options=lesion_options, like=like)
               for p in (pred, *compare)]
    readers.insert(1, ref_reader)
    if truth is not None:
        truth_reader = load_maps_cohort(truth, label="truth")
        if truth_reader.kind != "truth":  # maps of a method are no truth (had been scored so)
            raise InputError(truth, "is not a phantom cohort (sub-*/truth/ and sub-*/masks/ "
                                    "in every subject): compare other maps with --compare")
        readers.append(truth_reader)
    _unique_labels(readers)
    with_maps = [r for r in readers if r.maps]
    studies = sorted(set.intersection(*(set(r.maps) for r in with_maps)))
    if not studies:  # name the first cohort that shares none with those before it
        paths = [Path(p) for p in (pred, ref, *compare)] + ([Path(truth)] if truth else [])
        shared: set[str] | None = None
        for k, reader in enumerate(readers):
            if not reader.maps:
                continue
            if shared is not None and not shared & set(reader.maps):
                before = ", ".join(str(p) for p, r in zip(paths[:k], readers, strict=False)
                                   if r.maps)
                raise InputError(paths[k], f"no study in common with {before}")
            shared = set(reader.maps) if shared is None else shared & set(reader.maps)
        raise InputError(pred, "no study in common to the cohorts")
    excluded = {s: _absence(s, [r for r in with_maps if s not in r.maps])
                for r0 in with_maps for s in r0.maps if s not in studies}
    grids = {s: (g.shape, g.affine, io.kept_qform(g.provenance))
             for s in studies for g in [comparison_grid(readers, s)]}
    readers += [load_rater(p, grids) for p in raters]
    _unique_labels(readers)
    for r in readers[len(with_maps):]:
        for s in [s for s in studies if s not in r.lesions]:
            studies.remove(s)
            excluded[s] = f"no segmentation by {r.label}"
    if not studies:
        raise InputError(raters[0], "the raters segmented none of the studies in common")
    result = evaluate_readers(readers, studies=studies)
    log_path = Path(train_log) if train_log is not None else Path(pred) / "log.csv"
    train_rows = (_read_train_log(log_path) if train_log is not None or log_path.exists()
                  else None)
    doc = {"software_version": software_version(),
           # folder names, not machine paths: the report is made to be shared
           "readers": [{"label": r.label, "kind": r.kind, "path": Path(r.path).name,
                        "software_versions": _versions(r, studies),
                        "unit_conversions": _conversions(r, studies),
                        "lesions_segmented": _segmentation(r, ref_reader, studies,
                                                           lesion_options)}
                       for r in readers],
           "studies": studies, "excluded_studies": excluded,
           "warnings": [f"{r.label}, {w}" for r in readers for w in r.warnings]
           + [f"{r.label}: its maps were made by {len(v)} versions of ctperf ({', '.join(v)})"
              for r in readers if len(v := _versions(r, studies)) > 1]
           + lesion_rule_warnings(readers, studies) + result.pop("table_warnings"), **result,
           "training_log": log_path.name if train_rows is not None else None}
    figures = evaluation_figures(readers, result, studies, train_rows,
                                 max_map_figures=max_map_figures)
    page = evaluation_page(doc, figures)
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


def _recorded(reader: Any, studies: list[str], key: str) -> list[str]:
    """The distinct values (a list's items) that the provenance of a reader's maps of
    ``studies`` records under ``key``, sorted."""
    maps = getattr(reader, "maps", {})
    found: set[str] = set()
    for name in studies:
        value = maps[name].provenance.get(key) if name in maps else None
        found.update(str(v) for v in (value if isinstance(value, list) else [value]) if v)
    return sorted(found)


def _versions(reader: Any, studies: list[str]) -> list[str]:
    """The ctperf versions that made a reader's maps of ``studies`` (none for other
    software's maps or a truth)."""
    return _recorded(reader, studies, "software_version")


def _conversions(reader: Any, studies: list[str]) -> list[str]:
    """The unit conversions applied in reading a reader's maps of ``studies`` (units their
    sidecars declared)."""
    return _recorded(reader, studies, "unit_conversions")


def _segmentation(reader: Any, ref: Any, studies: list[str], given: LesionOptions | None
                  ) -> str | None:
    """What a reader's lesions segmented here (:attr:`Reader.segmented`) were defined by: REF's
    rules where its summary gave them all, the options given elsewhere; None when none was."""
    done = [s for s in studies if s in reader.segmented]
    if not done:
        return None
    count = {why: sum(reader.segmented[s] == why for s in done) for why in ("like", "given",
                                                                             "no cbv")}
    options = "the default options" if given == LesionOptions() else "the options given"
    unknown = ("" if reader is ref else " (the truth gives no lesion rules)"
               if ref.kind == "truth" else f" ({ref.label}'s summary does not give them all)")
    rules = [text for text, n in (
        (f"{ref.label}'s rules on {count['like']}", count["like"]),
        (f"{options} on {count['given']}{unknown}", count["given"]),
        (f"{options} on {count['no cbv']} (no cbv map for {ref.label}'s core by CBV)",
         count["no cbv"])) if n]
    return (f"lesions segmented here from its cbf and tmax maps on {len(done)} "
            f"stud{'y' if len(done) == 1 else 'ies'}, with {' and '.join(rules)}")


def _absence(study: str, lacking: Sequence[Any]) -> str:
    """Why ``study`` is not compared: the readers without its maps, each said as failed (its
    manifest's state) or missing."""
    failed = [f"{r.label} ({r.left_out[study]})" for r in lacking if study in r.left_out]
    missing = [r.label for r in lacking if study not in r.left_out]
    return "; ".join([*([f"not mapped in {', '.join(failed)}"] if failed else []),
                      *([f"missing in {', '.join(missing)}"] if missing else [])])


def _unique_labels(readers: Sequence[Any]) -> None:
    """Readers of the same label (two cohorts of one method) named apart by their folders'
    names, else by their parent folders' (``bsvd (site-a)``, ``bsvd (site-b)``; no part of a
    path further up, which may name the user), else by a number."""
    by_label: dict[str, list[Any]] = {}
    for r in readers:
        by_label.setdefault(r.label, []).append(r)
    for label, same in by_label.items():
        if len(same) < 2:
            continue
        paths = [Path(os.path.abspath(r.path)) for r in same]
        names = next((n for n in ([p.name for p in paths], [p.parent.name for p in paths])
                      if all(n) and len(set(n)) == len(same)), None)
        for k, r in enumerate(same):
            r.label = f"{label} ({names[k]})" if names else f"{label}-{k + 1}"
