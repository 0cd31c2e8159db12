"""``ctperf evaluate``: Tables 1 and 2, figures and the self-contained HTML report."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ctperf import io
from ctperf.cli import main
from ctperf.errors import InputError, ValidationError
from ctperf.evaluation.metrics import map_agreement
from ctperf.types import PerfusionMaps

AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])  # 2 x 2 x 5 mm voxels: 0.02 mL each
SHAPE = (2, 24, 24)
STUDIES = ("s01", "s02", "s03", "s04")


def _truth_maps(rng: np.random.Generator, core: np.ndarray) -> dict[str, np.ndarray]:
    cbf = rng.uniform(30, 70, SHAPE).astype(np.float32)
    cbf[core] = 8.0
    cbv = (cbf / 15).astype(np.float32)
    delay = np.where(core, 6.0, 1.0).astype(np.float32)
    return {"cbf": cbf, "cbv": cbv, "delay": delay, "tmax": delay + 2, "mtt": 60 * cbv / cbf}


def _square(z: int, y0: int, size: int) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[z, y0:y0 + size, 6:6 + size] = True
    return m


def _write_reader(root: Path, study: str, maps: dict[str, np.ndarray], lesions: dict,
                  brain: np.ndarray, method: str) -> None:
    folder = root / study
    out = {k: np.where(brain, v, np.nan).astype(np.float32) for k, v in maps.items()}
    io.write_maps_nifti(PerfusionMaps(maps=out, affine=AFFINE), folder)
    for name, mask in {**lesions, "brain": brain}.items():
        io.write_volume(mask, AFFINE, folder / "lesions" / f"{name}.nii.gz")
    io.write_json({"method": method}, folder / "summary.json")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two methods and two raters on four synthetic studies; s04 has no core in the reference.

    pred = reference + 2 mL/100 g/min on CBF everywhere (so its CBF bias is exactly 2); pred's
    core is the reference core shifted by one row (Dice (2 * 12) / (16 + 16) = 0.75 for a 4 x 4
    square), except s04 where the reference has no core and pred finds none either (both empty).
    """
    tmp_path = tmp_path_factory.mktemp("cohorts")
    rng = np.random.default_rng(7)
    brain = np.zeros(SHAPE, bool)
    brain[:, 2:22, 2:22] = True
    roots = {k: tmp_path / k for k in ("pred", "ref", "rater1", "rater2")}
    for i, study in enumerate(STUDIES):
        ref_core = _square(0, 6, 4) if study != "s04" else np.zeros(SHAPE, bool)
        pred_core = _square(0, 7, 4) if study != "s04" else np.zeros(SHAPE, bool)
        hypo = _square(1, 4, 8 + i) | ref_core
        maps = _truth_maps(rng, ref_core)
        ref_les = {"core": ref_core, "hypoperfused": hypo, "penumbra": hypo & ~ref_core}
        pred_les = {"core": pred_core, "hypoperfused": hypo | pred_core,
                    "penumbra": (hypo | pred_core) & ~pred_core}
        _write_reader(roots["ref"], study, maps, ref_les, brain, "nlr")
        _write_reader(roots["pred"], study, {**maps, "cbf": maps["cbf"] + 2}, pred_les, brain,
                      "unet")
        # rater 1: an ITK-SNAP label image (1 core, 2 penumbra); rater 2: one mask per lesion
        labels = np.where(ref_core, 1, np.where(hypo, 2, 0)).astype(np.uint8)
        io.write_volume(labels, AFFINE, roots["rater1"] / f"{study}.nii.gz")
        io.write_volume(hypo | _square(1, 4 + 8 + i, 1), AFFINE,
                        roots["rater2"] / study / "hypoperfused.nii.gz")
        io.write_volume(ref_core, AFFINE, roots["rater2"] / study / "core.nii.gz")
    with (roots["pred"] / "log.csv").open("w") as f:
        f.write("epoch,stage,train_loss,val_loss,lr,seconds\n"
                "1,pretrain,0.05,0.06,1e-5,1\n2,pretrain,0.03,0.04,1e-5,1\n"
                "1,finetune,0.02,0.03,1e-5,1\n")
    return roots


@pytest.fixture(scope="module")
def evaluated(cohorts: dict[str, Path]) -> Path:
    """``ctperf evaluate`` of the synthetic cohorts, run once for the tests that read it."""
    out = cohorts["pred"].parent / "eval"
    assert main(["evaluate", str(cohorts["pred"]), str(cohorts["ref"]), str(out),
                 "--raters", str(cohorts["rater1"]), "--map-figures", "2"]) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_synthetic_tables_json_and_report(cohorts, evaluated):
    out = evaluated
    for rel in ("table1.csv", "table2.csv", "evaluation.json", "report.html", "friedman.csv",
                "figures/maps_s01.png", "figures/maps_s02.png",
                "figures/bland_altman_unet_vs_nlr.png", "figures/volumes_unet_vs_nlr.png",
                "figures/training.png"):
        assert (out / rel).is_file(), rel
    assert not (out / "figures" / "maps_s03.png").exists()  # --map-figures 2

    t1 = {r["map"]: r for r in _csv(out / "table1.csv") if r["estimate"] == "unet"}
    assert float(t1["cbf"]["bias_mean"]) == pytest.approx(2.0, abs=1e-4)  # float32 maps
    assert float(t1["cbf"]["mae_mean"]) == pytest.approx(2.0, abs=1e-4)
    # CBF window 0-100: a 2 mL/100 g/min offset is 0.02 -> MSE 4e-4 (no value reaches the clip)
    assert float(t1["cbf"]["mse_window_mean"]) == pytest.approx(4e-4, rel=1e-3)
    # paper's normalisation: the reference's dataset-wide min-max over whole images, the NaN
    # background counted as the 0 of the paper's images; the same offset over that range
    lo, hi = float(t1["cbf"]["minmax_low"]), float(t1["cbf"]["minmax_high"])
    assert lo == 0.0 and float(t1["cbf"]["coverage_mean"]) == 1.0
    assert float(t1["cbf"]["mse_minmax_mean"]) == pytest.approx((2 / (hi - lo)) ** 2, rel=1e-3)
    assert float(t1["cbv"]["mse_window_mean"]) == 0 and float(t1["cbv"]["ssim_mean"]) == 1
    assert t1["cbv"]["psnr_mean"] == ""  # infinite PSNR of identical maps is left empty
    # and the count says so where the mean is over fewer studies than the row's
    assert t1["cbv"]["psnr_n"] == "0" and t1["cbf"]["psnr_n"] == t1["cbf"]["n_cases"]

    rows = {(r["lesion"], r["estimate"], r["reference"]): r for r in _csv(out / "table2.csv")}
    core = rows[("core", "unet", "nlr")]
    # s01-s03: Dice 0.75 each; s04 (no reference core, both empty) is left out, not scored
    assert (int(core["dice_n"]), int(core["dice_excluded"]), int(core["dice_undefined"])) == (
        3, 1, 1)
    assert float(core["dice_mean"]) == pytest.approx(0.75)
    assert float(core["volume_estimate_mean_ml"]) == pytest.approx(16 * 0.02 * 3 / 4)
    assert float(core["mean_abs_diff_ml"]) == 0.0  # the shifted core has the same volume
    # the rater's label image holds the reference's lesions exactly
    assert float(rows[("core", "nlr", "rater1")]["dice_mean"]) == 1.0
    assert float(rows[("penumbra", "unet", "rater1")]["dice_n"]) == 4

    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["studies"] == list(STUDIES)
    assert [r["label"] for r in doc["readers"]] == ["unet", "nlr", "rater1"]
    case = next(r for r in doc["lesions"] if (r["lesion"], r["estimate"]) == ("core", "unet"))
    assert case["cases"]["s04"] == {"dice": None, "excluded": "no lesion in the reference",
                                    "undefined": True, "volume_estimate_ml": 0.0,
                                    "volume_reference_ml": 0.0}
    fried = {f["lesion"]: f for f in doc["friedman"]}
    assert fried["hypoperfused"]["k"] == 3 and fried["hypoperfused"]["n"] == 4
    ref_map = io.read_maps(cohorts["ref"] / "s02")
    pred_map = io.read_maps(cohorts["pred"] / "s02")
    direct = map_agreement(pred_map["tmax"], ref_map["tmax"])
    assert doc["maps"][[r["map"] for r in doc["maps"]].index("tmax")]["cases"]["s02"][
        "n_voxels"] == direct.n

    # folder names, not machine paths, in what is made to be shared
    assert [r["path"] for r in doc["readers"]] == [r["path"].rsplit("/", 1)[-1]
                                                   for r in doc["readers"]]
    page = (out / "report.html").read_text()
    assert str(out.parent) not in page and str(out.parent) not in json.dumps(doc)
    # self-contained: every image inline, no link to anything outside the file
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert page.count('src="data:image/png;base64,') == len(list((out / "figures").iterdir()))
    assert "Table 1" in page and "Table 2" in page and "@media print" in page
    assert "<td>n/a (0)</td>" in page  # CBV's PSNR: over none of the studies, and says so


def test_a_rater_storing_the_voxels_another_way_is_turned_and_another_grid_refused(cohorts,
                                                                                   tmp_path):
    """A rater's label image with its rows reversed (affine adjusted: the same voxels in
    space) reads the same lesions as the original; moved 50 mm it is refused, naming the
    study. Before, both were paired voxel by voxel: Dice 0 for the first, 1 for the second."""
    import nibabel as nib

    from ctperf.evaluation.cohort import load_rater

    grids = {s: (SHAPE, AFFINE) for s in STUDIES}
    plain = load_rater(cohorts["rater1"], grids)
    flipped, moved = tmp_path / "flipped", tmp_path / "moved"
    for folder in (flipped, moved):
        folder.mkdir()
    for study in STUDIES:
        img = nib.load(cohorts["rater1"] / f"{study}.nii.gz")
        data = np.asarray(img.dataobj)
        turn = img.affine.copy()
        turn[:3, 3] += turn[:3, 1] * (data.shape[1] - 1)       # rows reversed: y runs back
        turn[:3, 1] *= -1
        nib.save(nib.Nifti1Image(data[:, ::-1].copy(), turn), flipped / f"{study}.nii.gz")
        shift = img.affine.copy()
        shift[2, 3] += 50.0
        nib.save(nib.Nifti1Image(data, shift), moved / f"{study}.nii.gz")
    turned = load_rater(flipped, grids)
    for study in STUDIES:
        for name, mask in plain.lesions[study].items():
            assert np.array_equal(turned.lesions[study][name], mask), (study, name)
    with pytest.raises(InputError, match=r"study s0\d: not on the maps' grid"):
        load_rater(moved, grids)


def test_a_label_the_evaluation_does_not_read_is_refused(cohorts, tmp_path):
    """A penumbra written as label 3 (an ITK-SNAP file's own numbering) had been dropped in
    silence: an empty penumbra and a hypoperfused region of core alone."""
    import nibabel as nib

    from ctperf.evaluation.cohort import load_rater

    relabelled = tmp_path / "rater3"
    relabelled.mkdir()
    for study in STUDIES:
        img = nib.load(cohorts["rater1"] / f"{study}.nii.gz")
        data = np.asarray(img.dataobj).copy()
        data[data == 2] = 3
        nib.save(nib.Nifti1Image(data, img.affine), relabelled / f"{study}.nii.gz")
    grids = {s: (SHAPE, AFFINE) for s in STUDIES}
    with pytest.raises(InputError, match=r"study s0\d: labels \[3\] are neither core \(1\) "
                                         r"nor penumbra \(2\)"):
        load_rater(relabelled, grids)


def test_raters_label_image_and_masks_agree(cohorts):
    from ctperf.evaluation.cohort import evaluate_readers, load_maps_cohort, load_rater

    ref = load_maps_cohort(cohorts["ref"])
    grids = {s: (SHAPE, AFFINE) for s in STUDIES}
    r1, r2 = load_rater(cohorts["rater1"], grids), load_rater(cohorts["rater2"], grids)
    assert sorted(r2.lesions["s01"]) == ["core", "hypoperfused", "penumbra"]  # derived penumbra
    doc = evaluate_readers([ref, r1, r2], studies=STUDIES)
    rows = {(r["lesion"], r["estimate"], r["reference"]): r for r in doc["lesions"]}
    # label image (rater 1) and masks (rater 2) read the same core
    core = rows[("core", "rater1", "rater2")]
    assert core["dice"]["mean"] == 1.0 and core["volumes"]["bland_altman"]["cr"] == 0.0
    hyp = rows[("hypoperfused", "rater1", "rater2")]["volumes"]["bland_altman"]
    # rater 2's hypoperfused region has one voxel (0.02 mL) more than rater 1's in every study
    assert hyp["bias"] == pytest.approx(-0.02, abs=1e-9)
    assert hyp["cr"] == pytest.approx(0.0, abs=1e-9)  # the same offset every time
    assert {f["lesion"]: f["k"] for f in doc["friedman"]} == {"core": 3, "hypoperfused": 3,
                                                               "penumbra": 3}


def test_evaluate_refuses_missing_input_in_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), str(tmp_path / "nope2"),
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_truth_that_is_no_phantom_is_refused(cohorts, tmp_path, capsys):
    """Maps of a method given as --truth had been scored as the truth (labelled truth-2)."""
    assert main(["evaluate", str(cohorts["pred"]), str(cohorts["ref"]), str(tmp_path / "out"),
                 "--truth", str(cohorts["ref"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a phantom cohort" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_cohort_mapped_by_several_methods_is_refused(cohorts, tmp_path, capsys):
    """A rerun with another method on some studies had left a cohort of two methods, scored
    under the first study's method's name with no word."""
    mixed = tmp_path / "mixed"
    shutil.copytree(cohorts["ref"], mixed)
    for study in ("s03", "s04"):
        (mixed / study / "summary.json").write_text(json.dumps({"method": "bsvd"}))
    assert main(["evaluate", str(cohorts["pred"]), str(mixed), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mapped by different methods (nlr: s01, s02; bsvd: s03, s04)" in err[0]
    assert not (tmp_path / "out").exists()


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def render_screenshot(page: Path, png: Path, *, profile: Path) -> np.ndarray:
    """Render ``page`` headless into ``png`` and return it as an (H, W, C) float array."""
    from matplotlib.image import imread

    browser = _browser()
    assert browser is not None
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={png}",
           "--window-size=1280,2000", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return imread(png)


@pytest.mark.skipif(_browser() is None,
                    reason="no chromium (or chromium-browser/google-chrome) binary on PATH; "
                           "apt-get install chromium to render the report headless")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    png = tmp_path / "report.png"  # kept in the test's output folder for a look
    img = render_screenshot(evaluated / "report.html", png, profile=tmp_path / "profile")
    assert img.shape[:2] == (2000, 1280)
    grey = img[..., :3].mean(axis=-1)
    # non-blank: a white page with black text, tables and dark map figures
    assert (grey < 0.5).mean() > 0.02
    assert grey.std() > 0.1


@pytest.mark.slow
def test_evaluate_phantom_bsvd_against_nlr_fast(tmp_path, caplog):
    """4 phantom subjects at 64 px, bsvd against nlr-fast with the truth (about a minute)."""
    cohort = tmp_path / "cohort"
    # 4 slices and 60 frames: with fewer, some subjects have no artery that shows a complete
    # bolus and the automatic AIF refuses them
    assert main(["phantom", str(cohort), "--subjects", "4", "--size", "64", "--slices", "4",
                 "--frames", "60", "--no-dicom", "--lesion-free", "0"]) == 0
    for sub in sorted(p.name for p in cohort.glob("sub-*")):
        for method in ("bsvd", "nlr-fast"):
            assert main(["maps", str(cohort / sub / "study.nii.gz"),
                         str(tmp_path / method / sub), "--method", method,
                         "--device", "cpu"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "bsvd"), str(tmp_path / "nlr-fast"), str(out),
                 "--truth", str(cohort)]) == 0
    # the phantom's other truth files (dispersion, baseline...) are its own, not a stray map
    assert "left out NIfTI files" not in caplog.text
    doc = json.loads((out / "evaluation.json").read_text())
    pairs = {(r["estimate"], r["reference"]) for r in doc["lesions"]}
    assert pairs == {("bsvd", "nlr-fast"), ("bsvd", "truth"), ("nlr-fast", "truth")}
    hyp = next(r for r in doc["lesions"]
               if (r["lesion"], r["estimate"], r["reference"]) == ("hypoperfused", "nlr-fast",
                                                                    "truth"))
    # every phantom subject has an occlusion: 4 scored cases; a broken loader gives 0 or NaN
    assert hyp["dice"]["n"] == 4 and hyp["dice"]["mean"] > 0.3
    assert {f["lesion"] for f in doc["friedman"]} == {"core", "hypoperfused", "penumbra"}
    if _browser() is not None:
        img = render_screenshot(out / "report.html", tmp_path / "report.png",
                                profile=tmp_path / "profile")
        assert (img[..., :3].mean(axis=-1) < 0.5).mean() > 0.02


def test_maps_without_lesions_are_segmented_with_the_maps_rules(cohorts, tmp_path):
    from ctperf.evaluation.cohort import load_maps_cohort
    from ctperf.evaluation.metrics import dice
    from ctperf.lesion_options import LesionOptions

    bare = tmp_path / "bare"
    for study in STUDIES[:2]:  # maps only, as `ctperf predict` writes them
        (bare / study).mkdir(parents=True)
        for f in (cohorts["ref"] / study).glob("*.nii.gz"):
            shutil.copy(f, bare / study / f.name)
    assert load_maps_cohort(bare).lesions == {}  # no options: no lesions invented
    reader = load_maps_cohort(bare, lesion_options=LesionOptions())
    ref = load_maps_cohort(cohorts["ref"])
    for study in STUDIES[:2]:
        # Tmax 8 s in the 4 x 4 core square, 3 s elsewhere: the Tmax > 6 s rule finds the
        # square; the 2 mm median may round its corners (one 2 mm pixel)
        got = reader.lesions[study]["hypoperfused"]
        assert dice(got, ref.lesions[study]["core"]) > 0.7


def test_maps_without_lesions_are_segmented_with_the_references_rules(cohorts, tmp_path):
    """A U-Net's maps (no lesions/) against a REF mapped with --tmax 9: evaluate had segmented
    them with the default 6 s and compared two definitions (a warning, no way to match them).
    They now take REF's rules, study by study, from its summary; the report says which."""
    from ctperf.evaluation.report import evaluate_cohorts
    from ctperf.lesion_options import LesionOptions
    from ctperf.perfusion import segment_lesions

    bare, ref = tmp_path / "bare", tmp_path / "ref"
    shutil.copytree(cohorts["ref"], ref)
    late = LesionOptions(tmax_hypo=9.0)
    for study in STUDIES:
        (bare / study).mkdir(parents=True)
        for f in (ref / study).glob("*.nii.gz"):
            shutil.copy(f, bare / study / f.name)
        if study != "s03":  # s03's summary is another tool's: no thresholds
            maps = io.read_maps(ref / study)
            rules = segment_lesions(maps, brain=np.isfinite(maps["cbf"]), options=late)
            io.write_json({"method": "nlr", "lesions": {"thresholds": rules.thresholds}},
                          ref / study / "summary.json")
    doc = evaluate_cohorts(bare, ref, tmp_path / "out", lesion_options=LesionOptions())
    said = doc["readers"][0]["lesions_segmented"]
    assert said == ("lesions segmented here from its cbf and tmax maps on 4 studies, with "
                    "nlr's rules on 3 and the default options on 1 (nlr's summary does not "
                    "give them all)")
    assert doc["readers"][1]["lesions_segmented"] is None
    assert html.escape(said) in (tmp_path / "out" / "report.html").read_text()
    cases = next(row["cases"] for row in doc["lesions"]
                 if (row["lesion"], row["estimate"]) == ("hypoperfused", "bare"))
    # Tmax is 8 s in a 4 x 4 core square (s04 has none), 3 s elsewhere: nothing above 9 s, the
    # square (0.32 mL) above 6 s
    np.testing.assert_allclose([cases[s]["volume_estimate_ml"] for s in STUDIES],
                               [0.0, 0.0, 0.32, 0.0], atol=1e-9)  # voxel sums in float
    # study by study the rules agree (REF's unknown on s03: nothing to compare there)
    assert not [w for w in doc["warnings"] if "defined differently" in w]


def test_a_references_cbv_core_is_not_asked_of_maps_without_cbv(cohorts, tmp_path):
    """REF's core defined by CBV (--core-cbv) and a PRED without a cbv map: its lesions had
    ended the evaluation in a KeyError; the options given serve instead, said per study.
    Without options (the API's None) nothing is segmented, REF's rules or not."""
    from ctperf.evaluation.cohort import load_maps_cohort
    from ctperf.evaluation.report import evaluate_cohorts
    from ctperf.lesion_options import LesionOptions
    from ctperf.perfusion import segment_lesions

    bare, ref = tmp_path / "bare", tmp_path / "ref"
    shutil.copytree(cohorts["ref"], ref)
    by_cbv = LesionOptions(core_cbv=1.0)
    for study in STUDIES:
        (bare / study).mkdir(parents=True)
        for name in ("cbf", "tmax"):
            shutil.copy(ref / study / f"{name}.nii.gz", bare / study)
        maps = io.read_maps(ref / study)
        rules = segment_lesions(maps, brain=np.isfinite(maps["cbf"]), options=by_cbv).thresholds
        io.write_json({"method": "nlr", "lesions": {"thresholds": rules}},
                      ref / study / "summary.json")
    doc = evaluate_cohorts(bare, ref, tmp_path / "out", lesion_options=LesionOptions())
    assert doc["readers"][0]["lesions_segmented"].endswith(
        "with the default options on 4 (no cbv map for nlr's core by CBV)")
    assert "bare, s01: the reference's core is defined by CBV and these maps have no cbv: " \
           "segmented with the options given instead" in doc["warnings"]
    like = load_maps_cohort(ref).lesion_options
    assert like["s01"] == by_cbv
    assert load_maps_cohort(bare, like=like).lesions == {}
    out = evaluate_cohorts(bare, ref, tmp_path / "none", lesion_options=None)
    assert out["readers"][0]["lesions_segmented"] is None


def test_further_methods_are_compared_with_the_reference(cohorts):
    from ctperf.evaluation.cohort import evaluate_readers, load_maps_cohort

    pred, ref = load_maps_cohort(cohorts["pred"]), load_maps_cohort(cohorts["ref"])
    other = load_maps_cohort(cohorts["pred"], label="unet-b")
    doc = evaluate_readers([pred, ref, other], studies=STUDIES)
    assert {(r["estimate"], r["reference"]) for r in doc["maps"]} == {("unet", "nlr"),
                                                                      ("unet-b", "nlr")}
    # three methods: a Friedman test per lesion (pred and its copy tie in every study)
    assert [f["k"] for f in doc["friedman"]] == [3, 3, 3]


def test_cohorts_named_apart_by_what_file_names_drop_keep_their_figures(cohorts, tmp_path):
    """Labels `unet (a b)` and `unet (a_b)` gave one figure file name: the second pair's
    Bland-Altman and volume figures replaced the first's, with no word (a review)."""
    for name in ("a b", "a_b"):
        shutil.copytree(cohorts["pred"], tmp_path / name)
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "a b"), str(cohorts["ref"]), str(out),
                 "--compare", str(tmp_path / "a_b"), "--map-figures", "0"]) == 0
    figures = sorted(p.name for p in (out / "figures").glob("bland_altman_*.png"))
    assert figures == ["bland_altman_unet_a_b_vs_nlr-2.png", "bland_altman_unet_a_b_vs_nlr.png"]
    page = (out / "report.html").read_text()
    for label in ("unet (a b)", "unet (a_b)"):
        assert f"Bland-Altman plots of lesion volumes, {label} vs nlr" in page


def test_figure_file_names_from_long_or_spaced_labels():
    """Two cohorts in folders of 125 characters made a figure name the file system refused,
    and the whole evaluation was lost (a review); a study named with a space gave a file name
    with one. Names are cut, ended by a digest of the whole, and spelt with _ only."""
    from ctperf.reporting.evaluation import MAX_NAME_PART, _file_part, _unused

    a, b = (f"bsvd ({c * 125})_vs_nlr" for c in "LM")
    assert len(_file_part(a)) == MAX_NAME_PART and _file_part(a) != _file_part(b)
    assert _file_part("sub 0000") == "sub_0000"
    # studies (or labels) apart only by what the name drops keep their own figures
    assert _unused({"maps_sub_0000.png": None}, "maps", "sub 0000") == "maps_sub_0000-2.png"


def _leaves(doc, at=""):
    """(path, value) of every leaf of a nested dict/list, in a fixed order."""
    if isinstance(doc, dict):
        return [x for k in sorted(doc) for x in _leaves(doc[k], f"{at}/{k}")]
    if isinstance(doc, list):
        return [x for i, v in enumerate(doc) for x in _leaves(v, f"{at}/{i}")]
    return [(at, doc)]


def _same_tables(a: dict, b: dict, rel: float, *, rounded: bool = True) -> None:
    """Tables 1 and 2 equal but for float rounding. With ``rounded`` (values scaled and back):
    MTT is 4 s everywhere and delay and Tmax are constant in s04 (no core), where r, CCC,
    SSIM, PSNR and the min-max scaling are undefined or, after rounding, anything; those maps
    are then compared by their errors and voxel counts."""
    for part in ("maps", "lesions"):
        x, y = _leaves(a[part]), _leaves(b[part])
        assert [k for k, _ in x] == [k for k, _ in y]
        constant = {str(i) for i, row in enumerate(b[part])
                    if rounded and row.get("map") in ("delay", "tmax", "mtt")}
        for (k, u), (_, v) in zip(x, y, strict=True):
            if rounded and "psnr" in k:
                continue      # identical maps: inf (a NaN mean), or 150+ dB after rounding
            if k.split("/")[1] in constant and not any(
                    m in k for m in ("/mae", "/bias", "/rmse", "/n_voxels", "/map", "/unit")):
                continue
            if isinstance(u, float) and isinstance(v, float):
                assert u == pytest.approx(v, rel=rel, abs=1e-6, nan_ok=True), k
            else:
                assert u == v, k


def test_a_cohort_stored_another_way_up_is_compared_voxel_for_voxel(cohorts, tmp_path):
    """The prediction cohort written with its rows reversed and its columns and rows swapped
    (the affines say so, as another tool's NIfTI may) gives the same Tables 1 and 2 as the
    original; one on another grid (moved by half a voxel) is refused, naming the study."""
    from ctperf.evaluation.cohort import evaluate_readers, load_maps_cohort

    def rewrite(dest: Path, turn, affine: np.ndarray) -> None:
        for study in STUDIES:
            src = cohorts["pred"] / study
            maps = io.read_maps(src)
            io.write_maps_nifti(maps.replace(maps={n: turn(maps[n]) for n in maps.names},
                                             affine=affine), dest / study)
            for f in sorted((src / "lesions").glob("*.nii.gz")):
                vol, _ = io.read_volume(f)
                io.write_volume(turn(vol) != 0, affine, dest / study / "lesions" / f.name)
            shutil.copy(src / "summary.json", dest / study / "summary.json")

    reversed_rows = AFFINE.copy()
    reversed_rows[:3, 3] += reversed_rows[:3, 1] * (SHAPE[1] - 1)
    reversed_rows[:3, 1] *= -1
    swapped = reversed_rows[:, [1, 0, 2, 3]]
    rewrite(tmp_path / "flipped", lambda a: np.swapaxes(a[:, ::-1], 1, 2).copy(), swapped)
    moved = AFFINE.copy()
    moved[0, 3] += 1.0
    rewrite(tmp_path / "moved", lambda a: a, moved)

    ref = load_maps_cohort(cohorts["ref"])
    base = evaluate_readers([load_maps_cohort(cohorts["pred"]), ref], studies=STUDIES)
    turned = evaluate_readers([load_maps_cohort(tmp_path / "flipped"),
                               load_maps_cohort(cohorts["ref"])], studies=STUDIES)
    # the same voxels summed in another order: equal to float rounding
    _same_tables(turned, base, rel=1e-6, rounded=False)
    with pytest.raises(ValidationError, match="study s01: the maps of unet and nlr are not on"):
        evaluate_readers([load_maps_cohort(tmp_path / "moved"), ref], studies=STUDIES)


def test_evaluation_imports_neither_torch_nor_matplotlib():
    import sys

    code = ("import sys, ctperf.evaluation; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_cohort_written_by_other_software_gives_the_same_tables(cohorts, tmp_path, caplog):
    """The prediction cohort as another tool writes it: CBF.nii in mL/100g/s, MTT and Tmax in
    ms (declared in sidecars), -1 outside the brain, the lesions as core and penumbra only
    and stored with their rows reversed; then without any orientation in the headers (MATLAB's
    save_nii). Both give the original's tables; a probability map as a mask is refused, and a
    CBF in mL/100g/s without a sidecar is reported."""
    import nibabel as nib

    from ctperf.evaluation.cohort import evaluate_readers, load_maps_cohort

    names = {"cbf": ("CBF.nii", "mL/100g/s", 1 / 60), "cbv": ("cbv.nii.gz", None, 1.0),
             "mtt": ("MTT.nii", "ms", 1000.0), "tmax": ("Tmax.nii", "ms", 1000.0),
             "delay": ("Delay.nii.gz", "s", 1.0)}
    reversed_rows = AFFINE.copy()
    reversed_rows[:3, 3] += reversed_rows[:3, 1] * (SHAPE[1] - 1)
    reversed_rows[:3, 1] *= -1

    def save(vol: np.ndarray, affine: np.ndarray, path: Path, oriented: bool) -> None:
        img = nib.Nifti1Image(np.asarray(vol, np.float32).transpose(2, 1, 0), affine)
        if not oriented:
            img.set_sform(None, code=0)
            img.set_qform(None, code=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)

    def foreign(dest: Path, oriented: bool) -> Path:
        for study in STUDIES:
            maps = io.read_maps(cohorts["pred"] / study)
            for name, (fname, unit, factor) in names.items():
                save(np.nan_to_num(maps[name] * factor, nan=-1.0), AFFINE,
                     dest / study / fname, oriented)
                if unit:  # the key as ctperf writes it, and as BIDS capitalises it
                    key = "Units" if unit == "ms" else "units"
                    io.write_json({key: unit}, dest / study / (fname.split(".")[0] + ".json"))
            for lesion in ("core", "penumbra"):
                vol, _ = io.read_volume(cohorts["pred"] / study / "lesions" / f"{lesion}.nii.gz")
                flip = oriented   # oriented: rows reversed, as the affine says
                save(vol[:, ::-1] if flip else vol, reversed_rows if flip else AFFINE,
                     dest / study / "lesions" / f"{lesion}.nii.gz", oriented)
        return dest

    base = evaluate_readers([load_maps_cohort(cohorts["pred"]), load_maps_cohort(cohorts["ref"])],
                            studies=STUDIES)
    for oriented in (True, False):
        cohort = load_maps_cohort(foreign(tmp_path / f"foreign{oriented}", oriented),
                                  label="unet")
        got = evaluate_readers([cohort, load_maps_cohort(cohorts["ref"])], studies=STUDIES)
        # float32 maps divided and multiplied back by 60 or 1000: equal to 1e-5
        _same_tables(got, base, rel=1e-5)
        # another tool's maps were credited to the ctperf reading them
        from ctperf.evaluation.report import _conversions, _versions
        assert _versions(cohort, STUDIES) == [] and _versions(
            load_maps_cohort(cohorts["ref"]), STUDIES) != []
        # the conversions the sidecars asked for are recorded (they had been logged at INFO)
        assert _conversions(cohort, STUDIES) == [
            "cbf converted from mL/100g/s to mL/100g/min (x 60)",
            "mtt converted from ms to s (x 0.001)", "tmax converted from ms to s (x 0.001)"]
    blurred = tmp_path / "foreignTrue" / "s01" / "lesions" / "core.nii.gz"
    save(np.full(SHAPE, 0.3), AFFINE, blurred, True)
    with pytest.raises(InputError, match="not a mask: values between whole numbers"):
        load_maps_cohort(tmp_path / "foreignTrue")
    (tmp_path / "foreignTrue" / "s02" / "CBF.json").unlink()
    blurred.unlink()
    with caplog.at_level("WARNING", logger="ctperf"):
        load_maps_cohort(tmp_path / "foreignTrue")
    assert "cbf has a median of" in caplog.text and "another unit" in caplog.text


def test_another_tools_background_is_no_value_but_a_zero_inside_the_brain_is(tmp_path):
    """Another tool writes 0 outside the brain where ctperf writes NaN: that background, which
    reaches the image's edge, is no value; a CBF of 0 enclosed by the brain (a core voxel)
    stays a measurement."""
    from ctperf.evaluation.cohort import _background_as_nan
    from ctperf.types import PerfusionMaps

    cbf = np.zeros((2, 20, 20), dtype=np.float32)
    cbf[:, 4:16, 4:16] = 40.0
    cbf[:, 9:11, 9:11] = 0.0                                  # an enclosed core of 0
    maps = PerfusionMaps(maps={"cbf": cbf}, affine=np.eye(4), units={"cbf": "mL/100g/min"})
    out = _background_as_nan(maps, tmp_path)["cbf"]
    assert np.isnan(out[:, :4]).all() and np.isnan(out[:, :, 16:]).all()
    assert (out[:, 9:11, 9:11] == 0).all()
    assert np.count_nonzero(np.isfinite(out)) == 2 * 12 * 12


def test_pockets_where_every_map_holds_the_background_are_no_value(tmp_path):
    """Another tool's 0 in every map inside the head (where ctperf writes NaN: left-out CSF)
    had entered the lesions as CBF 0 and Tmax 0 (a probe's core 0.39 against 0.45 mL); a CBF
    of 0 where Tmax is set stays a measurement."""
    from ctperf.evaluation.cohort import _background_as_nan
    from ctperf.types import PerfusionMaps

    cbf = np.zeros((2, 20, 20), dtype=np.float32)
    cbf[:, 4:16, 4:16] = 40.0
    tmax = np.where(cbf > 0, np.float32(2.0), np.float32(0.0))
    cbf[:, 6:8, 6:8] = tmax[:, 6:8, 6:8] = 0.0                   # a pocket: 0 in both
    cbf[:, 11:13, 11:13] = 0.0                                   # a core: CBF 0, Tmax 9 s
    tmax[:, 11:13, 11:13] = 9.0
    maps = PerfusionMaps(maps={"cbf": cbf, "tmax": tmax}, affine=np.eye(4))
    out = _background_as_nan(maps, tmp_path)
    for name in ("cbf", "tmax"):
        assert np.isnan(out[name][:, 6:8, 6:8]).all()
        assert np.isfinite(out[name][:, 11:13, 11:13]).all()
    assert (out["cbf"][:, 11:13, 11:13] == 0).all()


def test_a_core_written_as_zero_flow_stays_a_measurement(tmp_path):
    """Another tool's core of CBF, CBV and MTT 0 ("no flow measured", Tmax 11 s) at the brain's
    surface, joined through a scalp of 0 to the image's edge: each map's own background had
    taken it for no value (the tool scored CBF r 1.000, core Dice 0.21; a review). The
    background is where every map holds it: the core stays 0, the air is no value. Without a
    time map the two cannot be told apart (docs/evaluation.md)."""
    from ctperf.evaluation.cohort import _background_as_nan
    from ctperf.types import PerfusionMaps

    shape = (2, 24, 24)
    head = np.zeros(shape, dtype=bool)
    head[:, 3:21, 3:21] = True
    maps = {"cbf": np.where(head, 40.0, 0.0), "cbv": np.where(head, 4.0, 0.0),
            "mtt": np.where(head, 6.0, 0.0), "tmax": np.where(head, 2.0, 0.0)}
    core = np.zeros(shape, dtype=bool)
    core[:, 3:7, 8:14] = True                     # at the brain's edge, next to the air
    for name in ("cbf", "cbv", "mtt"):
        maps[name][core] = 0.0
    maps["tmax"][core] = 11.0
    out = _background_as_nan(PerfusionMaps(maps={k: v.astype(np.float32)
                                                 for k, v in maps.items()},
                                           affine=np.eye(4)), tmp_path)
    for name in ("cbf", "cbv", "mtt"):
        assert (out[name][core] == 0).all()
        assert np.isnan(out[name][~head]).all()
    assert (out["tmax"][core] == 11).all()


def test_display_images_and_capped_maps_from_another_tool_are_named(tmp_path):
    """A colour NIfTI had been refused as an unreadable file; unscaled 8-bit grey levels (a
    screenshot) had passed as a CBF of median 150-250; a CBF capped at 100 had been compared
    with no word (bias -17, r 0.37 against the same maps uncapped; a probe)."""
    import nibabel as nib

    from ctperf.io import read_maps

    rng = np.random.default_rng(0)
    cbf = np.full((2, 20, 20), np.nan, dtype=np.float32)
    cbf[:, 4:16, 4:16] = rng.uniform(10.0, 140.0, (2, 12, 12))
    for name, values in (("rgb", None), ("grey", None), ("capped", np.minimum(cbf, 100.0)),
                         ("plain", cbf)):
        (tmp_path / name).mkdir()
        if name == "rgb":
            rgb = np.zeros((20, 20, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
            img = nib.Nifti1Image(rgb, np.eye(4))
        elif name == "grey":
            grey = np.nan_to_num(cbf / 140.0 * 255.0).round().clip(0, 255).astype(np.uint8)
            grey[0, 0, 0] = 255
            img = nib.Nifti1Image(grey.transpose(2, 1, 0), np.eye(4))
        else:
            img = nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4))
        nib.save(img, tmp_path / name / "cbf.nii.gz")
    with pytest.raises(InputError, match=r"colour pixels \(R, G, B\): a picture"):
        read_maps(tmp_path / "rgb")
    with pytest.raises(InputError, match=r"8-bit values up to 255 .* a display image"):
        read_maps(tmp_path / "grey")
    (doubt,) = read_maps(tmp_path / "capped").provenance["unit_warnings"]
    assert "of its voxels hold its largest value, 100: capped" in doubt
    assert "unit_warnings" not in read_maps(tmp_path / "plain").provenance
    # ctperf's own maps copied without their sidecars (the box model's MTT on its 30 s bound
    # had been called capped): known by their folder's summary
    (tmp_path / "capped" / "summary.json").write_text('{"software_version": "0.1.0"}')
    assert "unit_warnings" not in read_maps(tmp_path / "capped").provenance


def test_a_tmax_in_whole_milliseconds_reads_as_the_same_seconds(tmp_path):
    """6000 ms times a float32 0.001 had read 6.0000005 s, over the 6 s threshold (a review's
    hypoperfused volumes 31.21 against 31.06 mL for the same maps in s)."""
    import nibabel as nib

    from ctperf.io import read_maps

    tmax = np.full((2, 8, 8), 6000.0, dtype=np.float32)
    tmax[:, :4] = 6500.0
    nib.save(nib.Nifti1Image(tmax.transpose(2, 1, 0), np.eye(4)), tmp_path / "tmax.nii.gz")
    (tmp_path / "tmax.json").write_text('{"units": "ms"}')
    read = read_maps(tmp_path)["tmax"]
    assert set(np.unique(read).tolist()) == {6.0, 6.5}


def test_maps_in_another_unit_are_reported_and_a_background_is_not_taken_for_one(tmp_path):
    """Tmax written in ms without a sidecar saying so: the reading's warning is kept in the
    maps' provenance (the evaluation's report lists it). A -1 background around a Tmax in s
    is not read as the map's values (no warning)."""
    import nibabel as nib

    from ctperf.io import read_maps

    tmax = np.full((2, 20, 20), -1.0, dtype=np.float32)
    tmax[:, 4:16, 4:16] = np.linspace(0.5, 8.0, 144).reshape(12, 12)
    for name, values in (("s", tmax), ("ms", np.where(tmax > 0, 1000 * tmax, -1.0))):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4)),
                 tmp_path / name / "tmax.nii.gz")
    assert "unit_warnings" not in read_maps(tmp_path / "s").provenance
    (doubt,) = read_maps(tmp_path / "ms").provenance["unit_warnings"]
    assert doubt.startswith("tmax has a median of 4250") and "another unit" in doubt


def test_a_lesion_missing_in_some_studies_is_said_not_dropped_silently():
    """A lesion mask one reader lacks in some studies cannot enter Table 2; the report's
    warnings say which, rather than the row vanishing without a word."""
    from ctperf.evaluation.cohort import Reader, evaluate_readers
    from ctperf.types import PerfusionMaps

    cbf = np.linspace(10.0, 70.0, 128, dtype=np.float32).reshape(2, 8, 8)
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 2:5, 2:5] = True
    studies = ["a", "b", "c"]
    readers = []
    for label in ("est", "ref"):
        r = Reader(label=label, kind="method", path=label)
        for s in studies:
            r.maps[s] = PerfusionMaps(maps={"cbf": cbf}, affine=np.eye(4),
                                      units={"cbf": "mL/100g/min"})
            r.lesions[s] = {"core": mask, "hypoperfused": mask}
        readers.append(r)
    del readers[0].lesions["b"]["hypoperfused"]
    out = evaluate_readers(readers, studies=studies)
    assert [row["lesion"] for row in out["lesions"]] == ["core"]
    icc, said = sorted(out["table_warnings"])  # ("T" sorts before "h")
    assert said == "hypoperfused, est vs ref: left out of Table 2 (est has none in b)"
    assert icc.startswith("Table 2's ICC is left empty: every volume is the same")


def test_a_reader_without_values_where_the_reference_has_them_is_said():
    """A reader's NaN where it is wrong had halved its MSE and MAE in silence (NaN voxels are
    left out of the comparison): the share of the reference's values it covers is a column
    of Table 1, and under 95 % a warning."""
    from ctperf.evaluation.cohort import Reader, evaluate_readers
    from ctperf.types import PerfusionMaps

    rng = np.random.default_rng(4)
    ref = rng.uniform(10.0, 70.0, (2, 8, 8)).astype(np.float32)
    est = (ref + rng.normal(0.0, 10.0, ref.shape)).astype(np.float32)
    worst = np.abs(est - ref) > np.quantile(np.abs(est - ref), 0.7)
    holed = np.where(worst, np.nan, est)
    studies = ["a", "b"]
    readers = []
    for label, cbf in (("est", holed), ("ref", ref)):
        r = Reader(label=label, kind="method", path=label)
        for s in studies:
            r.maps[s] = PerfusionMaps(maps={"cbf": cbf}, affine=np.eye(4),
                                      units={"cbf": "mL/100g/min"})
        readers.append(r)
    out = evaluate_readers(readers, studies=studies)
    (row,) = out["maps"]
    assert row["summary"]["coverage"]["mean"] == pytest.approx(1 - worst.mean())
    (said,) = out["table_warnings"]
    assert said.startswith("cbf, est vs ref: est has a value in under 95% of the region where "
                           "ref has one in 2 of 2 studies: a (69.53%), b (69.53%)")
    assert "compares the rest" in said


def test_one_study_without_values_is_named_though_the_mean_coverage_passes():
    """The coverage was checked on its mean over studies: one study of 22 without a value
    passed at 95.0 % and left Table 1 unsaid. Each study is checked; the estimate's own brain
    mask no longer chooses the region (an empty one had dropped the study unsaid as well)."""
    from ctperf.evaluation.cohort import Reader, evaluate_readers
    from ctperf.types import PerfusionMaps

    rng = np.random.default_rng(5)
    studies = [f"s{i:02d}" for i in range(22)]
    brain = np.ones((1, 6, 6), dtype=bool)
    readers = []
    for label in ("est", "ref"):
        r = Reader(label=label, kind="method", path=label)
        for s in studies:
            cbf = rng.uniform(10.0, 70.0, brain.shape).astype(np.float32)
            if label == "est" and s == "s21":
                cbf[:] = np.nan
            r.maps[s] = PerfusionMaps(maps={"cbf": cbf}, affine=np.eye(4),
                                      units={"cbf": "mL/100g/min"})
            r.brain[s] = ~brain if label == "est" and s == "s20" else brain
        readers.append(r)
    out = evaluate_readers(readers, studies=studies)
    assert out["region"] == "brain mask of ref"
    (row,) = out["maps"]
    assert row["summary"]["coverage"]["mean"] == pytest.approx(21 / 22)  # s20 compared in full
    (said,) = out["table_warnings"]
    assert "in 1 of 22 studies: s21 (no values)" in said
    # the reference's mask empty in one study: the next reader's is taken there, and the
    # source named (an empty mask had dropped the study, the warning blaming the estimate)
    readers[1].brain["s05"] = np.zeros_like(brain)
    out = evaluate_readers(readers, studies=studies)
    assert out["region"] == "brain mask of ref (s00, s01, s02 ...); brain mask of est (s05)"
    assert out["maps"][0]["cases"]["s05"]["n_voxels"] == brain.sum()


def test_an_icc_left_empty_for_want_of_pingouin_is_said(cohorts, tmp_path, monkeypatch, caplog):
    """Without the [stats] extra the ICC column was empty with no word but a note in
    evaluation.json, which named pandas; the report's warnings and the log now say what to
    install."""
    import sys

    monkeypatch.setitem(sys.modules, "pingouin", None)  # import pingouin raises ImportError
    out = tmp_path / "eval"
    with caplog.at_level("WARNING", logger="ctperf"):
        assert main(["evaluate", str(cohorts["pred"]), str(cohorts["ref"]), str(out)]) == 0
    said = json.loads((out / "evaluation.json").read_text())["warnings"]
    icc = [w for w in said if "ICC" in w]
    assert len(icc) == 1 and "pingouin is not installed" in icc[0] \
        and "pip install 'ctperf[stats]'" in icc[0]
    assert "Table 2's ICC is left empty" in caplog.text


def test_a_compared_cohort_sharing_no_study_is_the_one_named(cohorts, tmp_path, capsys):
    """``--compare`` with a cohort of other studies: the error names that cohort, not the two
    that share every study."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(cohorts["pred"] / STUDIES[0], other / "x01")
    assert main(["evaluate", str(cohorts["pred"]), str(cohorts["ref"]), str(tmp_path / "e"),
                 "--compare", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{other}: no study in common with {cohorts['pred']}" in err[0]


def test_an_svd_readers_delay_is_not_compared_with_an_arrival_delay():
    """The SVD methods' delay map is their Tmax: scored against the box model's arrival delay
    it had read as a +4 s bias with no word. Its delay row is left out and said; Tmax stays."""
    from ctperf.evaluation.cohort import Reader, evaluate_readers
    from ctperf.types import PerfusionMaps

    delay = np.linspace(0.0, 4.0, 128, dtype=np.float32).reshape(2, 8, 8)
    studies = ["a", "b"]
    readers = []
    for label, method in (("bsvd", "bsvd"), ("nlr-fast", "nlr-fast"), ("nlr", "nlr")):
        r = Reader(label=label, kind="method", path=label)
        for s in studies:
            r.maps[s] = PerfusionMaps(maps={"delay": delay, "tmax": delay + 2.0},
                                      affine=np.eye(4), units={"delay": "s", "tmax": "s"},
                                      provenance={"method": method})
        readers.append(r)
    out = evaluate_readers(readers, studies=studies)
    rows = {(r["estimate"], r["map"]) for r in out["maps"]}
    assert rows == {("bsvd", "tmax"), ("nlr", "tmax"), ("nlr", "delay")}
    assert out["table_warnings"] == [
        "delay, bsvd vs nlr-fast: left out of Table 1 (bsvd's delay map is its Tmax, not an "
        "arrival delay: compare tmax)"]


def test_an_svd_readers_delay_is_not_drawn_in_the_map_figures(monkeypatch):
    """The map figures had drawn bsvd's delay (its Tmax) beside the box model's arrival delay,
    with difference panels of +2 to +3 s, although Table 1 leaves that comparison out."""
    import ctperf.reporting.figures as figures
    from ctperf.evaluation.cohort import Reader
    from ctperf.reporting.evaluation import evaluation_figures
    from ctperf.types import PerfusionMaps

    drawn = []
    real = figures.side_by_side_figure

    def spy(readings, **kw):
        drawn.append(tuple(kw["names"]))
        return real(readings, **kw)

    monkeypatch.setattr(figures, "side_by_side_figure", spy)
    cube = np.linspace(0.0, 4.0, 128, dtype=np.float32).reshape(2, 8, 8)

    def reader(label, method):
        r = Reader(label=label, kind="method", path=label)
        r.maps["a"] = PerfusionMaps(maps={n: cube + k for k, n in enumerate(
            ("cbv", "cbf", "delay", "tmax"))}, affine=np.eye(4), provenance={"method": method})
        return r

    result = {"lesions": []}
    svd = evaluation_figures([reader("bsvd", "bsvd"), reader("nlr-fast", "nlr-fast")], result,
                             ["a"], None, max_map_figures=1)
    box = evaluation_figures([reader("nlr", "nlr"), reader("nlr-fast", "nlr-fast")], result,
                             ["a"], None, max_map_figures=1)
    assert drawn == [("cbv", "cbf", "tmax"), ("cbv", "cbf", "delay", "tmax")]
    assert "no delay: bsvd's delay map is its Tmax" in svd["maps_a.png"][1]
    assert "delay" not in box["maps_a.png"][1]


def test_the_versions_that_made_each_readers_maps_are_recorded(cohorts, tmp_path):
    """Maps of one cohort made by two versions of ctperf (a cohort partly mapped before an
    upgrade) were scored with no word: evaluation.json lists each reader's versions and
    warns of a reader made by several."""
    from ctperf.versioning import software_version

    mixed = tmp_path / "mixed"
    shutil.copytree(cohorts["ref"], mixed)
    for sidecar in (mixed / "s01").glob("*.json"):
        doc = json.loads(sidecar.read_text())
        if "software_version" in doc:
            sidecar.write_text(json.dumps({**doc, "software_version": "0.1.0"}))
    out = tmp_path / "out"
    assert main(["evaluate", str(cohorts["pred"]), str(mixed), str(out)]) == 0
    doc = json.loads((out / "evaluation.json").read_text())
    versions = {r["label"]: r["software_versions"] for r in doc["readers"]}
    assert versions["unet"] == [software_version()]
    assert versions["nlr"] == sorted(["0.1.0", software_version()])
    assert any("made by 2 versions of ctperf" in w for w in doc["warnings"])
