"""``ctperf.reporting``: the one table of display windows, map titles and the maps overview."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctperf.perfusion import run_perfusion
from ctperf.reporting import (
    DISPLAY_WINDOWS,
    display_window,
    html_table,
    map_title,
    maps_overview,
    markdown_tables_to_html,
    radiological_flips,
    volume_text,
)
from ctperf.types import MAP_UNITS
from test_perfusion_pipeline import synthetic_study


def test_reporting_imports_no_matplotlib():
    # Figures import matplotlib when drawn: importing the package (as `ctperf --help` and
    # ctperf.evaluation do) stays light.
    code = "import sys, ctperf.reporting; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_figures_leave_the_callers_matplotlib_session_alone(tmp_path):
    # In a notebook or a Qt session ctperf's figures switched the backend to Agg (plt.show
    # then showed nothing) and stayed open in pyplot (20 overviews: 20 figures, +96 MiB).
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_perfusion_pipeline import synthetic_study
from ctperf.perfusion import run_perfusion
from ctperf.reporting import comparison_figure, maps_overview, save_figure
series, _ = synthetic_study(np.random.default_rng(7), noise=5.0)
result = run_perfusion(series, method="bsvd")
fig = maps_overview(result)
save_figure(fig, {str(tmp_path / "o.png")!r}, dpi=50)
save_figure(comparison_figure(result.maps, result.maps), {str(tmp_path / "c.png")!r}, dpi=50)
print(matplotlib.get_backend(), plt.get_fignums(), type(fig).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["svg", "[]", "Figure"]
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_display_windows_fixed_and_study_relative():
    assert display_window("cbf") == (0.0, 80.0)
    assert display_window("tmax", np.array([100.0])) == DISPLAY_WINDOWS["tmax"]  # values unused
    # TTP has no fixed window: the 2nd to 98th percentile of the values shown, NaN ignored
    values = np.concatenate([np.arange(101, dtype=float), [np.nan]])
    assert display_window("ttp", values) == pytest.approx((2.0, 98.0), abs=1e-12)  # exact
    assert display_window("cbf_sd", values) == pytest.approx((2.0, 98.0), abs=1e-12)
    with pytest.raises(ValueError, match="ttp"):
        display_window("ttp")


def test_map_titles_carry_the_units_of_the_types():
    assert map_title("cbf") == "CBF mL/100g/min"
    assert map_title("tmax") == "Tmax s"
    for name, unit in MAP_UNITS.items():
        assert map_title(name).endswith(f" {unit}")
    assert map_title("cbf", unit="mL/min/100g") == "CBF mL/min/100g"
    assert map_title("other") == "other"
    assert map_title("cbf_sd") == "CBF SD mL/100g/min"      # uncertainty maps: the map's unit


def test_radiological_flips():
    # RAS: columns running to the patient's right and rows running anterior would show the
    # patient's right on the viewer's right and anterior at the bottom: both flipped
    assert radiological_flips(np.diag([0.5, 0.5, 5.0, 1.0])) == (True, True)
    # columns running to the patient's left and rows running posterior (DICOM's usual order):
    # already radiological
    assert radiological_flips(np.diag([-0.5, -0.5, 5.0, 1.0])) == (False, False)
    # a transposed slice (columns along y): neither rule applies
    swapped = np.array([[0, 0.5, 0, 0], [0.5, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 1.0]])
    assert radiological_flips(swapped) == (False, False)


def test_volume_text_with_and_without_sd():
    lesions = {"volumes_ml": {"core": 12.34, "hypoperfused": 40.0}}
    assert volume_text(lesions, "core") == "12.3 mL"
    lesions["volumes_sd_ml"] = {"core": 1.44}
    assert volume_text(lesions, "core") == "12.3 +- 1.4 mL"
    assert volume_text(lesions, "hypoperfused") == "40.0 mL"


def test_html_tables_escape_and_format():
    page = html_table(["a", "b"], [["<x>", 0.00021], ["y", float("nan")], ["z", 0.00004]])
    assert "&lt;x&gt;" in page and "<x>" not in page
    # would print as 0.000: two significant figures, in a table of fixed decimals
    assert "<td>0.00021</td>" in page and "<td>4e-05</td>" in page
    assert "<td>n/a</td>" in page
    converted = markdown_tables_to_html("intro\n\n| m | v |\n|---|---|\n| cbf | 1.5 |\n")
    assert '<p class="note">intro</p>' in converted
    assert '<td class="t">cbf</td><td class="t">1.5</td>' in converted


@pytest.fixture(scope="module")
def overview():
    series, _ = synthetic_study(np.random.default_rng(7), noise=5.0)
    result = run_perfusion(series, method="bsvd")
    return result, maps_overview(result, title="overview")


def test_overview_windows_and_titles_from_the_table(overview):
    result, fig = overview
    maps = result.maps
    columns = {}
    for ax in fig.axes:
        if ax.images and ax.get_title():
            columns[ax.get_title()] = ax.images[0].get_clim()
    names = [n for n in ("cbf", "cbv", "mtt", "tmax", "ttp") if n in maps]
    assert set(columns) == {map_title(n) for n in names}
    for name in names:
        shown = columns[map_title(name)]
        if DISPLAY_WINDOWS[name] is not None:
            assert shown == DISPLAY_WINDOWS[name]
        else:  # the study's own range over brain tissue outside vessels
            vals = maps[name][result.brain & ~result.vessels]
            expected = np.nanpercentile(vals, [2, 98])
            np.testing.assert_allclose(shown, expected, rtol=1e-6)  # float32 clim round-off


def test_overview_states_the_lesion_thresholds(overview):
    result, fig = overview
    text = "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)
    th = result.maps.provenance["lesions"]["thresholds"]
    assert f"Tmax > {th['hypoperfused']['tmax_above_s']} s" in text
    assert th["core"]["label"] in text
    assert f"Tmax>{th['tmax10']['tmax_above_s']:g} s" in text


def test_overview_names_the_aif_as_it_was_used(overview):
    """The legend said "partial-volume corrected" when no VOF had corrected anything, over a
    measured curve it hid; it now names the curve that was used."""
    import dataclasses

    result, fig = overview
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in
              ax.get_legend().get_texts()]
    corrected = result.maps.provenance["partial_volume"]["corrected"]
    assert ("AIF (partial-volume corrected)" in labels) is corrected
    prov = {**result.maps.provenance,
            "partial_volume": {**result.maps.provenance["partial_volume"], "corrected": False}}
    plain = maps_overview(dataclasses.replace(result, maps=result.maps.replace(provenance=prov)))
    labels = [t.get_text() for ax in plain.axes if ax.get_legend() for t in
              ax.get_legend().get_texts()]
    assert "AIF (not corrected)" in labels and "AIF measured" not in labels


def test_vessels_figure_marks_the_chosen_voxels_where_they_are(overview):
    """docs/methods.md tells the reader to check the AIF's voxels on a figure, which no output
    of ctperf maps drew (a probe mapped summary.json's voxels by script). One voxel given a
    value no other holds shows the brightest pixel exactly under its marker, through the
    radiological turn and the crop; curves or masks given leave nothing to draw."""
    import dataclasses

    from ctperf.reporting import vessels_overview

    result, _ = overview
    assert "voxels_zyx" in result.maps.provenance["aif"]  # chosen automatically here
    fig = vessels_overview(result, title="t")
    marked = sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections)
    chosen = len(result.maps.provenance["aif"]["voxels_zyx"]) + len(
        result.maps.provenance.get("vof", {}).get("voxels_zyx", []))
    assert marked <= chosen and marked >= 1  # the slices holding most of them, four at most
    z, y, x = (int(v) for v in np.argwhere(result.brain)[len(np.argwhere(result.brain)) // 3])
    cbv = result.maps["cbv"].copy()
    cbv[z, y, x] = 10.0 * np.nanmax(cbv)
    prov = {**result.maps.provenance, "aif": {"source": "automatic", "voxels_zyx": [[z, y, x]]},
            "vof": {"source": "none"}}
    one = dataclasses.replace(result, maps=result.maps.replace(
        maps={**result.maps.maps, "cbv": cbv}, provenance=prov))
    (ax,) = vessels_overview(one).axes
    assert ax.get_title() == f"slice {z}: AIF 1"
    (cx, cy), = ax.collections[0].get_offsets()
    shown = np.ma.filled(ax.images[0].get_array(), -1.0)
    assert np.unravel_index(np.argmax(shown), shown.shape) == (cy, cx)
    given = {**prov, "aif": {"source": "mask"}}
    assert vessels_overview(dataclasses.replace(
        result, maps=result.maps.replace(provenance=given))) is None
    # a VOF found and rejected (it scaled nothing) is drawn apart: a review found it circled
    # in blue as "VOF" beside no_vof; the U-Net's maps say whose voxels they show
    rejected = {**prov, "vof": {"source": "automatic", "used": False, "voxels_zyx": [[z, y, x]]},
                "aif": {"source": "mask"}, "curves_from": "reference NLR run"}
    fig = vessels_overview(dataclasses.replace(result, maps=result.maps.replace(
        provenance=rejected)))
    assert fig.axes[0].get_title() == f"slice {z}: VOF (rejected) 1"
    assert "reference NLR run" in fig._suptitle.get_text()


@pytest.mark.parametrize("record", [{"nifti_xform_code": 0}, {"orientation_unknown": True}])
def test_figures_do_not_mark_a_side_they_do_not_know(overview, record):
    """A NIfTI study (or maps) without sform and qform: its "R" marked a guessed side, and a
    probe's x-reversed copy showed the lesion opposite it; the figures now say the side is
    unknown (the study's maps, or maps read for ``ctperf evaluate``)."""
    import dataclasses

    from ctperf.reporting.figures import comparison_figure, side_by_side_figure

    result, fig = overview

    def marks(figure):
        return [t.get_text() for ax in figure.axes for t in ax.texts
                if t.get_text() in ("R", "L/R unknown")]

    assert set(marks(fig)) == {"R"}
    unknown = result.maps.replace(provenance={**result.maps.provenance, **record})
    assert set(marks(maps_overview(dataclasses.replace(result, maps=unknown)))) == {
        "L/R unknown"}
    assert set(marks(comparison_figure(unknown, unknown))) == {"L/R unknown"}
    assert set(marks(side_by_side_figure([("a", unknown), ("b", unknown)]))) == {"L/R unknown"}
    assert set(marks(side_by_side_figure([("a", result.maps), ("b", result.maps)]))) == {"R"}


@pytest.mark.parametrize("kept", [("cbf",), ("cbv", "tmax")])
def test_overview_of_one_or_two_maps(overview, kept):
    # a network trained on one or two targets gives maps of only those: the overview still has
    # its curves and its text beside them
    import dataclasses

    result, _ = overview
    maps = result.maps
    few = maps.replace(maps={n: maps[n] for n in kept},
                       units={n: u for n, u in maps.units.items() if n in kept})
    fig = maps_overview(dataclasses.replace(result, maps=few))
    titles = {ax.get_title() for ax in fig.axes if ax.images and ax.get_title()}
    assert titles == {map_title(n) for n in kept}
    assert any(ax.lines for ax in fig.axes)  # the AIF/VOF panel
    assert any("hypoperfused" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_the_motion_qc_figure_is_radiological_whatever_the_stored_order(small_series):
    """qc.png drew slices as stored: the same head stored with x reversed showed mirrored.
    Both orders now show the same image, the patient's right on the left, marked "R"."""
    from types import SimpleNamespace

    from ctperf.reporting.qc import motion_qc_figure

    n_t, shape = small_series.n_frames, small_series.shape[1:]
    mask = np.zeros(shape, dtype=bool)
    mask[:, 4:12, 3:9] = True  # off-centre, so a mirror shows
    result = SimpleNamespace(displacement_mm=np.linspace(0, 1, n_t),
                             max_displacement_mm=np.linspace(0, 2, n_t), mask=mask)
    reversed_x = small_series.affine.copy()
    reversed_x[:3, 3] += reversed_x[:3, 0] * (shape[2] - 1)
    reversed_x[:3, 0] *= -1
    stored_reversed = small_series.replace(hu=small_series.hu[..., ::-1].copy(),
                                           affine=reversed_x)
    flipped = SimpleNamespace(**{**vars(result), "mask": mask[..., ::-1]})
    images = []
    for series, res in ((small_series, result), (stored_reversed, flipped)):
        fig = motion_qc_figure(series, series, res)
        images.append([np.asarray(ax.images[0].get_array()) for ax in fig.axes[1:4]])
        assert all(any(t.get_text() == "R" for t in ax.texts) for ax in fig.axes[1:4])
    for a, b in zip(*images, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_motion_qc_figure_of_a_still_study_shows_two_frames(small_series):
    """A study that did not move showed frame 0 twice, and its displacement lines lay on the
    x axis, out of sight: it now shows the last frame, and the axis starts below 0."""
    from types import SimpleNamespace

    from ctperf.reporting.qc import motion_qc_figure

    n_t, shape = small_series.n_frames, small_series.shape[1:]
    still = SimpleNamespace(displacement_mm=np.zeros(n_t), max_displacement_mm=np.zeros(n_t),
                            mask=np.ones(shape, dtype=bool))
    fig = motion_qc_figure(small_series, small_series, still)
    titles = [ax.get_title() for ax in fig.axes[1:4]]
    assert titles[0].startswith("frame 0,") and titles[1].startswith(f"frame {n_t - 1} before")
    assert fig.axes[0].get_ylim()[0] < 0.0


def test_colour_bars_point_where_the_map_passes_the_window():
    """A fixed window (CBF 0-80) hid a map reaching 300, and a negative Tmax, as values at its
    edge; the colour bar now ends in a point on each side the shown values pass."""
    from ctperf.reporting.windows import colorbar_extend

    assert colorbar_extend(np.array([1.0, 79.0, np.nan]), (0.0, 80.0)) == "neither"
    assert colorbar_extend(np.array([1.0, 300.0]), (0.0, 80.0)) == "max"
    assert colorbar_extend(np.array([-2.75, 26.0]), (0.0, 14.0)) == "both"
    assert colorbar_extend(np.array([-1.0, 5.0]), (0.0, 14.0)) == "min"
    assert colorbar_extend(np.array([np.nan]), (0.0, 14.0)) == "neither"


def test_overview_names_every_raised_flag_inside_the_figure(overview):
    """Each raised flag's reason was printed in full: five of them ran off the figure's
    bottom, hiding noisy_voxelwise, the flag that says the lesion volumes are unreliable. The
    names of all flags now stand inside the figure, the reasons left to summary.json."""
    import dataclasses

    result, _ = overview
    for kept in (("cbf", "cbv", "mtt", "tmax", "ttp"), ("cbf",)):
        qc = {k: {**v, "flag": True} for k, v in result.maps.provenance["qc"].items()}
        maps = result.maps.replace(maps={n: result.maps[n] for n in kept},
                                   units={n: result.maps.units[n] for n in kept},
                                   provenance={**result.maps.provenance, "qc": qc})
        fig = maps_overview(dataclasses.replace(result, maps=maps))
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        texts = [t for ax in fig.axes for t in ax.texts if "QC:" in t.get_text()]
        assert len(texts) == 1
        shown = texts[0].get_text()
        for name in qc:
            assert f"! {name}" in shown.replace("\n", " "), name
        box = texts[0].get_window_extent(renderer)
        assert box.y0 >= 0 and box.x1 <= fig.bbox.x1 + 1, (kept, box, fig.bbox)


def test_overview_shows_the_slices_that_hold_the_lesion():
    """Of 8 slices, the four with the most lesion, then the largest brain: the largest brain
    alone had shown slices 0-3 of a study whose lesion lay in slices 4-5 (half its core)."""
    from ctperf.reporting.overview import _shown_slices

    brain = np.zeros((8, 20, 20), dtype=bool)
    for z in range(8):
        brain[z, : 20 - z, :] = True          # the brain's area shrinks upwards
    lesion = np.zeros_like(brain)
    lesion[4:6, 2:8, 2:8] = True
    assert _shown_slices(brain, lesion) == [0, 1, 4, 5]
    assert _shown_slices(brain, np.zeros_like(brain)) == [0, 1, 2, 3]
    assert _shown_slices(brain[:2], lesion[:2]) == [0, 1]


def test_print_rules_fit_a_figure_on_one_page():
    """The report "prints as shown": a probe's printout split every figure over two pages, whose
    images could be 24 cm tall on an A4 landscape page of 19 cm inside its margins."""
    import re

    from ctperf.reporting.html import _CSS

    page = re.search(r"@page \{ size: A4 landscape; margin: (\d+)mm; \}", _CSS)
    tallest = re.search(r"figure img \{ max-height: (\d+)cm; \}", _CSS)
    assert page and tallest
    assert float(tallest.group(1)) * 10 + 10 <= 210 - 2 * int(page.group(1))  # 1 cm: caption


def test_phantom_preview_names_the_territories():
    from ctperf.phantom import generate_subject
    from ctperf.reporting.phantom import phantom_preview_figure

    fig = phantom_preview_figure(generate_subject(seed=1, size=48, slices=2))
    names = {t.get_text() for ax in fig.axes if ax.get_legend() for t in
             ax.get_legend().get_texts()}
    assert {"MCA R", "MCA L"} <= names
