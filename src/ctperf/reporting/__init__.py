"""Figures and reports: the maps overview, the evaluation report, the demo report, QC figures and
the phantom preview, with one table of display windows and map titles (:mod:`.windows`).

matplotlib is imported only when a figure is drawn, so importing this package stays light.
"""

from ctperf.reporting.demo import demo_tables_markdown, write_demo_report
from ctperf.reporting.evaluation import evaluation_figures, evaluation_page
from ctperf.reporting.figures import (
    bland_altman_figure,
    comparison_figure,
    curves_figure,
    reduction_figure,
    save_figure,
    side_by_side_figure,
    training_curves_figure,
    volume_scatter_figure,
)
from ctperf.reporting.html import (
    figure_data_uri,
    figure_html,
    html_report,
    html_table,
    markdown_tables_to_html,
    png_data_uri,
)
from ctperf.reporting.overview import (
    maps_overview,
    radiological_flips,
    vessels_overview,
    volume_text,
)
from ctperf.reporting.phantom import phantom_preview_figure
from ctperf.reporting.qc import motion_qc_figure
from ctperf.reporting.windows import (
    BRAIN_WINDOW_HU,
    DISPLAY_WINDOWS,
    MAP_LABELS,
    VESSEL_WINDOW_HU,
    display_window,
    map_title,
)

__all__ = [
    "BRAIN_WINDOW_HU",
    "DISPLAY_WINDOWS",
    "MAP_LABELS",
    "VESSEL_WINDOW_HU",
    "bland_altman_figure",
    "comparison_figure",
    "curves_figure",
    "demo_tables_markdown",
    "display_window",
    "evaluation_figures",
    "evaluation_page",
    "figure_data_uri",
    "figure_html",
    "html_report",
    "html_table",
    "map_title",
    "maps_overview",
    "markdown_tables_to_html",
    "motion_qc_figure",
    "phantom_preview_figure",
    "png_data_uri",
    "radiological_flips",
    "reduction_figure",
    "save_figure",
    "side_by_side_figure",
    "training_curves_figure",
    "vessels_overview",
    "volume_scatter_figure",
    "volume_text",
    "write_demo_report",
]
