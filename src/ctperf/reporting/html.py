"""Self-contained HTML pages: one file, figures embedded as base64 PNG data URIs, the style sheet
inline (system fonts, print rules) and nothing fetched from a network, so a page opens offline
and prints as it shows."""

from __future__ import annotations

import base64
import html
import io as _io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "figure_data_uri",
    "figure_html",
    "fmt_number",
    "html_report",
    "html_table",
    "markdown_tables_to_html",
    "png_data_uri",
]

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
  figure img { max-height: 17cm; }  /* A4 landscape less margins and caption */
}
"""


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` decimals, ``n/a`` for None and NaN, and a tiny
    nonzero value to two significant figures rather than as 0 (0.0021; below 1e-4 in
    scientific notation)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int | np.integer):
        return str(int(value))
    v = float(value)
    if v != 0 and abs(v) < 0.5 * 10**-digits:  # would print as 0: show its magnitude
        return f"{v:.2g}"
    return f"{v:.{digits}f}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
               text_columns: int = 1) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text, values escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="t">{html.escape(str(v))}</td>' if j < text_columns
            else f"<td>{html.escape(v if isinstance(v, str) else fmt_number(v))}</td>"
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
    """A matplotlib figure as a PNG data URI."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return png_data_uri(buf.getvalue())


def figure_html(uri: str, caption: str) -> str:
    """A ``<figure>`` of an image URI with its caption (escaped)."""
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def html_report(*, title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained HTML page: ``sections`` are (heading, HTML body) pairs, in order."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}" if h else b for h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n"
            f"<body>\n<h1>{html.escape(title)}</h1>\n{body}</body></html>\n")


