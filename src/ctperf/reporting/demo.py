"""The demo's report: ``report.md`` and the self-contained ``report.html`` of ``ctperf demo``."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctperf.reporting.html import figure_html, html_report, markdown_tables_to_html, png_data_uri

__all__ = ["demo_tables_markdown", "write_demo_report"]


def demo_tables_markdown(scores: Mapping[str, Any]) -> str:
    """Markdown tables of the demo's scores against the phantom's truth.

    Parameters
    ----------
    scores : mapping
        :func:`ctperf.evaluation.truth.compare_with_truth`'s result with
        ``lesions_vs_rule_on_truth`` added: per lesion the Dice of the estimate against the
        lesion rule applied to the true maps (``dice``), the rule's Dice against the phantom's
        lesion (``dice_rule_vs_phantom``) and the rule's volume in mL (``rule_volume_ml``).
    """
    from ctperf.evaluation.truth import truth_table_markdown

    return truth_table_markdown(scores) + (
        "\nThe same lesion rule applied to the true maps (what a perfect map would give):\n\n"
        "| lesion | Dice, estimate vs rule on truth | Dice, rule on truth vs phantom "
        "| volume mL (rule on truth) |\n|---|---|---|---|\n" + "".join(
            f"| {name} | {v['dice']:.2f} | {v['dice_rule_vs_phantom']:.2f} "
            f"| {v['rule_volume_ml']:.1f} |\n"
            for name, v in scores["lesions_vs_rule_on_truth"].items()))


def write_demo_report(folder: Path, *, method: str, seed: int, shape: Sequence[int],
                      motion: str, preprocessing: str, tables: str,
                      qc_flags: Sequence[str] = ()) -> None:
    """Write ``folder/report.md`` and ``folder/report.html`` (the figures inline).

    Parameters
    ----------
    folder : Path
        The demo's output, already holding ``maps/overview.png``, ``comparison.png`` and
        ``phantom/preview.png`` (and ``maps/uncertainty.png`` for ``bayes`` and
        ``maps/vessels.png`` for an automatic AIF or VOF, shown too).
    method : str
        Perfusion method.
    seed : int
        Phantom seed.
    shape : sequence of int
        Study shape (T, Z, Y, X).
    motion : str
        Simulated motion category.
    preprocessing : str
        What was done before the maps (e.g. ``"registered and filtered"``).
    tables : str
        Markdown tables of :func:`demo_tables_markdown`.
    qc_flags : sequence of str
        The maps' raised QC flags, named in the introduction.
    """
    from ctperf.io import atomic_file

    title = f"ctperf demo: {method} on a digital phantom"
    intro = (f"Phantom seed {seed}, study {' x '.join(map(str, shape))} (T, Z, Y, X), "
             f"simulated motion: {motion}, {preprocessing}. QC flags raised: "
             + (f"{', '.join(qc_flags)} (maps/summary.json says why)." if qc_flags else "none."))
    optional = (("maps/uncertainty.png", "uncertainty", "posterior standard deviations"),
                ("maps/vessels.png", "vessels", "the voxels of the AIF (red) and the VOF (blue)"))
    present = tuple(f for f in optional if (folder / f[0]).is_file())  # bayes; automatic AIF
    figures = (("maps/overview.png", "maps", "maps and lesions"), *present,
               ("comparison.png", "comparison", f"{method} against the true maps"),
               ("phantom/preview.png", "phantom", "the phantom study"))
    markdown = (f"# {title}\n\n{intro}\n\n{tables}\n"
                + "\n\n".join(f"![{alt}]({rel})" for rel, alt, _ in figures) + "\n")
    with atomic_file(folder / "report.md") as md:
        md.write_text(markdown)
    page = html_report(title=title, sections=[
        ("", f'<p class="note">{html.escape(intro)}</p>'),
        ("Agreement with the truth", markdown_tables_to_html(tables)),
        ("Figures", "".join(figure_html(png_data_uri((folder / rel).read_bytes()), caption)
                            for rel, _, caption in figures))])
    with atomic_file(folder / "report.html") as page_file:
        page_file.write_text(page, encoding="utf-8")
