"""Evaluation of readers with gaps: a map missing in some studies, a reference map that is
constant, and maps identical but for float rounding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ctperf.evaluation.cohort import Reader, evaluate_readers
from ctperf.evaluation.metrics import psnr
from ctperf.types import PerfusionMaps

STUDIES = ["a", "b", "c"]


def _readers(delay_ref: float | None = None, drop: tuple[str, str] | None = None) -> list[Reader]:
    rng = np.random.default_rng(0)
    readers = []
    for label in ("est", "ref"):
        r = Reader(label=label, kind="method", path=label)
        for s in STUDIES:
            cbf = rng.uniform(10.0, 70.0, (2, 8, 8)).astype(np.float32)
            delay = rng.uniform(0.0, 6.0, (2, 8, 8)).astype(np.float32)
            if label == "ref" and delay_ref is not None:
                delay = np.full_like(delay, delay_ref)  # a tool that estimates no delay
            maps = {"cbf": cbf, "delay": delay}
            if drop == (label, s):
                del maps["delay"]
            units = {"cbf": "mL/100g/min", "delay": "s"}
            r.maps[s] = PerfusionMaps(maps=maps, affine=np.eye(4),
                                      units={k: units[k] for k in maps})
        readers.append(r)
    return readers


def test_a_constant_reference_map_leaves_its_paper_mse_empty_and_the_rest():
    """A reference delay of 0 everywhere has no min-max range: it had stopped the whole
    evaluation with an error naming neither the reader nor the map."""
    out = evaluate_readers(_readers(delay_ref=0.0), studies=STUDIES)
    rows = {row["map"]: row for row in out["maps"]}
    assert set(rows) == {"cbf", "delay"}
    assert np.isnan(rows["delay"]["summary"]["mse_minmax"]["mean"])
    assert np.isfinite(rows["delay"]["summary"]["mae"]["mean"])
    assert np.isfinite(rows["cbf"]["summary"]["mse_minmax"]["mean"])
    (said,) = out["table_warnings"]
    assert said.startswith("delay of ref: constant") and "left empty" in said


def test_a_map_missing_in_some_studies_is_said_in_the_report():
    out = evaluate_readers(_readers(drop=("est", "b")), studies=STUDIES)
    assert [row["map"] for row in out["maps"]] == ["cbf"]
    assert out["table_warnings"] == ["delay, est vs ref: left out of Table 1 (missing in b)"]


def test_maps_identical_to_rounding_have_no_finite_psnr():
    assert psnr(0.0) == psnr(6e-16) == float("inf")  # float32 unit conversions: 2e-17-6e-16
    assert psnr(1e-4) == 40.0


def test_a_maps_cohort_of_core_and_hypoperfused_gets_its_penumbra(tmp_path):
    """RAPID-style outputs give core and hypoperfused masks: the penumbra is the hypoperfused
    tissue outside the core, as it is for raters."""
    from ctperf import io
    from ctperf.evaluation.cohort import load_maps_cohort

    core = np.zeros((2, 8, 8), dtype=bool)
    core[:, 2:4, 2:4] = True
    hypo = core.copy()
    hypo[:, 2:6, 2:6] = True
    for s in STUDIES:
        folder = tmp_path / "rapid" / s
        io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), folder / "cbf.nii.gz")
        for name, mask in (("core", core), ("hypoperfused", hypo)):
            io.write_volume(mask, np.eye(4), folder / "lesions" / f"{name}.nii.gz")
    reader = load_maps_cohort(tmp_path / "rapid")
    np.testing.assert_array_equal(reader.lesions["a"]["penumbra"], hypo & ~core)


def test_readers_lesions_defined_differently_are_said(tmp_path):
    """Two readers' hypoperfused masks made at Tmax > 12 s and > 6 s (their summaries say so):
    evaluate had compared them as one lesion (5.1 against 92.5 mL, no warning). Said now, per
    lesion; the same definitions are not; a reader whose lesions are segmented by evaluate
    carries the definition it used."""
    import json

    from ctperf import io
    from ctperf.evaluation.cohort import lesion_rule_warnings, load_maps_cohort
    from ctperf.lesion_options import LesionOptions

    def write(root, tmax, smooth=2.0):
        mask = np.zeros((2, 8, 8), dtype=bool)
        mask[:, 2:5, 2:5] = True
        for s in STUDIES:
            folder = tmp_path / root / s
            io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), folder / "cbf.nii.gz")
            io.write_volume(mask, np.eye(4), folder / "lesions" / "hypoperfused.nii.gz")
            (folder / "summary.json").write_text(json.dumps({"method": "bsvd", "lesions": {
                "thresholds": {"core": {"label": "rCBF < 0.3 (contralateral reference)"},
                               "hypoperfused": {"label": f"Tmax > {tmax:.1f} s"},
                               "smooth_mm": smooth, "min_component_ml": 0.1}}}))

    write("late", 12.0)
    write("usual", 6.0)
    write("again", 6.0)
    write("raw", 6.0, smooth=0.0)
    late, usual, again, raw = (load_maps_cohort(tmp_path / n, label=n)
                               for n in ("late", "usual", "again", "raw"))
    said = lesion_rule_warnings([late, usual], list(STUDIES))
    assert said == ["hypoperfused lesion defined differently by the readers (Tmax > 12.0 s: "
                    "late; Tmax > 6.0 s: usual): their volumes and Dice compare different "
                    "definitions"]
    assert lesion_rule_warnings([usual, again], list(STUDIES)) == []
    # the same thresholds, another clean-up (a probe's maps without the median: unsaid)
    assert lesion_rule_warnings([raw, usual], list(STUDIES)) == [
        "lesions cleaned up differently by the readers (median 0 mm, pieces under 0.1 mL "
        "dropped: raw; median 2 mm, pieces under 0.1 mL dropped: usual): their volumes and "
        "Dice compare different definitions"]

    # other constants: CBF and CBV scale with them (a kH of 0.5 against 0.733 had read as a
    # CBF bias of -26 mL/100 g/min between two runs of one method)
    for root, kh in (("kh_a", 0.5), ("kh_b", 0.733)):
        write(root, 6.0)
        for s in STUDIES:
            path = tmp_path / root / s / "summary.json"
            doc = json.loads(path.read_text())
            path.write_text(json.dumps({**doc, "constants": {"rho_g_per_ml": 1.04, "kh": kh}}))
    kh_a, kh_b = (load_maps_cohort(tmp_path / n, label=n) for n in ("kh_a", "kh_b"))
    assert lesion_rule_warnings([kh_a, kh_b], list(STUDIES)) == [
        "maps made with other constants by the readers (rho 1.04, kH 0.5: kh_a; rho 1.04, kH "
        "0.733: kh_b): their CBF and CBV differ by the constants' ratio as well as by the "
        "methods"]
    assert lesion_rule_warnings([kh_b, usual], list(STUDIES)) == []  # one without: unsaid

    tmax = np.full((2, 8, 8), 2.0, np.float32)  # maps only: evaluate segments them
    for s in STUDIES:
        folder = tmp_path / "net" / s
        io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), folder / "cbf.nii.gz")
        io.write_volume(tmax, np.eye(4), folder / "tmax.nii.gz")
    net = load_maps_cohort(tmp_path / "net", label="net",
                           lesion_options=LesionOptions(tmax_hypo=8.0))
    assert net.rules["a"]["hypoperfused"] == "Tmax > 8.0 s"
    assert "Tmax > 8.0 s: net" in lesion_rule_warnings([net, usual], list(STUDIES))[0]


def test_rules_that_change_between_studies_alike_are_no_difference():
    """A REF whose core is CBV < 2 on one study and rCBF < 0.3 on another, and a PRED
    segmented alike, study by study: pooled over studies their rules had read as differing
    between the readers; they differ only where a study's rules do."""
    from ctperf.evaluation.cohort import lesion_rule_warnings

    by_cbv, by_rcbf = "CBV < 2.0 mL/100g", "rCBF < 0.3 (contralateral reference)"
    ref, pred, other = (Reader(label=n, kind="method", path=n) for n in ("ref", "pred", "other"))
    ref.rules = {"a": {"core": by_cbv}, "b": {"core": by_rcbf}}
    pred.rules = {"a": {"core": by_cbv}, "b": {"core": by_rcbf}}
    other.rules = {"a": {"core": by_rcbf}, "b": {"core": by_rcbf}}
    assert lesion_rule_warnings([pred, ref], ["a", "b"]) == []
    assert lesion_rule_warnings([other, ref], ["a", "b"]) == [
        f"core lesion defined differently by the readers in a ({by_rcbf}: other; {by_cbv}: "
        "ref): "
        "their volumes and Dice compare different definitions"]


def test_studies_a_cohort_run_did_not_finish_are_left_out(tmp_path):
    """A maps cohort whose manifest records a study as failed (a rerun on a damaged input
    keeps the folder of the earlier run): left out with a warning (it had been scored as if
    current). Without a manifest, or one of another format, every folder counts."""
    import json

    from ctperf import io
    from ctperf.evaluation.cohort import load_maps_cohort

    root = tmp_path / "maps"
    for s in STUDIES:
        io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), root / s / "cbf.nii.gz")
    assert sorted(load_maps_cohort(root).maps) == STUDIES
    (root / "manifest.json").write_text(json.dumps({
        "format": "ctperf-cohort-manifest", "version": 1,
        "studies": {"a": {"state": "done"}, "b": {"state": "failed"}, "c": {"state": "done"}}}))
    reader = load_maps_cohort(root)
    assert sorted(reader.maps) == ["a", "c"]
    assert reader.warnings == ["b: left out: the cohort's manifest says 'failed' (maps of an "
                               "earlier run, or none)"]
    assert reader.left_out == {"b": "its manifest says 'failed'"}
    shutil.rmtree(root / "b")  # a study that failed on its first run has no folder: said too
    assert load_maps_cohort(root).warnings == reader.warnings
    io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), root / "b" / "cbf.nii.gz")
    (root / "manifest.json").write_text(json.dumps({"format": "other", "studies": {}}))
    assert sorted(load_maps_cohort(root).maps) == STUDIES


def test_maps_without_orientation_are_said_in_the_tables_warnings():
    """Maps saved with no sform or qform (MATLAB's save_nii) are compared voxel for voxel: the
    warning had gone to the log only, never to the report, where a mirrored reader's Dice 0
    then stood unexplained."""
    readers = _readers()
    for s in STUDIES:
        maps = readers[0].maps[s]
        readers[0].maps[s] = maps.replace(affine=np.diag([2.0, 2.0, 5.0, 1.0]), provenance={
            **maps.provenance, "orientation_unknown": True})
    out = evaluate_readers(readers, studies=STUDIES)
    (said,) = out["table_warnings"]  # one line for the reader, naming its studies
    assert said.startswith("the maps of est carry no orientation") and "a, b, c" in said


def test_files_a_reader_leaves_out_are_said_in_its_warnings(tmp_path):
    """Another tool's DT.nii.gz and lesions/Hypoperfusion.nii were skipped with a line on
    stderr only: Table 1 lost its delay row and Table 2 its lesion, the report said nothing."""
    from ctperf import io
    from ctperf.evaluation.cohort import load_maps_cohort

    for s in STUDIES:
        folder = tmp_path / "other" / s
        for name in ("cbf", "DT"):
            io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4),
                            folder / f"{name}.nii.gz")
        io.write_volume(np.ones((2, 8, 8), bool), np.eye(4),
                        folder / "lesions" / "Hypoperfusion.nii")
        io.write_volume(np.ones((2, 8, 8), bool), np.eye(4), folder / "lesions" / "vessels.nii.gz")
    reader = load_maps_cohort(tmp_path / "other")
    assert sorted(reader.maps["a"].names) == ["cbf"]
    said = [w for w in reader.warnings if w.startswith("a: ")]
    assert len(said) == 2, reader.warnings
    assert "DT.nii.gz" in said[0] and "not named as a map" in said[0]
    assert "Hypoperfusion.nii" in said[1] and "vessels" not in said[1]  # ctperf's own: unread


def test_a_reader_at_ten_times_the_others_scale_is_said():
    """A CBF stored x 10 without a sidecar reads 200-220 at low flow, inside the plausible
    window of one map's median: Table 1 had read a bias of +250 and r 1.000 without a word.
    Medians 5 or more times apart are said; a reader 0.5x the other (a box model on dispersed
    tissue) is not."""
    readers = _readers()
    for factor, said in ((10.0, True), (0.5, False), (0.1, True)):
        scaled = _readers()
        for s in STUDIES:
            maps = readers[1].maps[s]
            scaled[0].maps[s] = maps.replace(maps={**maps.maps, "cbf": maps["cbf"] * factor})
        out = evaluate_readers(scaled, studies=STUDIES)
        hits = [w for w in out["table_warnings"] if w.startswith("cbf, est vs ref: est's median")]
        assert bool(hits) is said, (factor, out["table_warnings"])
        if said:
            assert f"is {factor:.3g} times ref's" in hits[0]


def test_timing_maps_medians_far_apart_are_no_scale_mismatch():
    """Healthy tissue's Tmax sits near 0 s: two valid methods read medians of 0.24 and 1.64 s
    (a review's), which the ratio test had called another unit."""
    readers = _readers()
    for s in STUDIES:
        for r, value in ((readers[0], 0.24), (readers[1], 1.64)):
            maps = r.maps[s]
            r.maps[s] = maps.replace(maps={**maps.maps, "delay": np.full_like(maps["delay"], value)
                                           + 0.01 * maps["delay"]})
    out = evaluate_readers(readers, studies=STUDIES)
    assert not [w for w in out["table_warnings"] if "median" in w]


def test_cbf_per_100_ml_of_tissue_is_converted_as_cbv_per_100_ml_is():
    from ctperf.io.maps import to_map_unit

    got = to_map_unit("cbf", np.array([52.0], np.float32), "mL/100mL/min", "cbf.nii")
    np.testing.assert_allclose(got, [50.0], rtol=1e-6)  # 52 / 1.04
    got = to_map_unit("cbf", np.array([1.04], np.float32), "mL/100mL/sec", "cbf.nii")
    np.testing.assert_allclose(got, [60.0], rtol=1e-6)
    got = to_map_unit("cbv", np.array([4.16], np.float32), "mL/100mL", "cbv.nii")
    np.testing.assert_allclose(got, [4.0], rtol=1e-6)


def test_a_study_left_out_is_said_failed_or_missing_and_like_readers_named_apart(tmp_path):
    """`ctperf evaluate`'s excluded studies: a study whose run failed in one cohort had been
    said "missing in" it; two cohorts of one method had become "bsvd" and "bsvd-2", which
    does not say which is which: they are named by their folders' paths."""
    from ctperf.evaluation.cohort import Reader
    from ctperf.evaluation.report import _absence, _unique_labels

    failed = Reader(label="bsvd", kind="method", path=str(tmp_path / "site-a" / "bsvd"),
                    left_out={"b": "its manifest says 'failed'"})
    other = Reader(label="bsvd", kind="method", path=str(tmp_path / "site-b" / "bsvd"))
    net = Reader(label="net", kind="method", path=str(tmp_path / "net"))
    _unique_labels([failed, other, net])
    assert [r.label for r in (failed, other, net)] == ["bsvd (site-a)", "bsvd (site-b)", "net"]
    assert _absence("b", [failed, other]) == ("not mapped in bsvd (site-a) (its manifest says "
                                              "'failed'); missing in bsvd (site-b)")
    same = [Reader(label="x", kind="method", path=str(tmp_path / "x")) for _ in range(2)]
    _unique_labels(same)  # one folder given twice: only a number tells them apart
    assert [r.label for r in same] == ["x-1", "x-2"]
    far = [Reader(label="x", kind="method", path=str(tmp_path / user / "runs" / "x"))
           for user in ("alice", "bob")]
    _unique_labels(far)  # no part of a path further up than the parent (it may name the user)
    assert [r.label for r in far] == ["x-1", "x-2"]
    mine = [Reader(label="bsvd", kind="method", path=str(tmp_path / n)) for n in ("a", "b")]
    _unique_labels(mine)  # cohorts named by their folders, where those differ
    assert [r.label for r in mine] == ["bsvd (a)", "bsvd (b)"]


def test_the_maps_qc_flags_are_said_with_the_tables(tmp_path):
    """A study whose maps raised no_vof (CBF read 78.8 for 58.8 in a probe's cohort) had been
    averaged into the tables with no word of its flag."""
    import json

    from ctperf import io
    from ctperf.evaluation.cohort import load_maps_cohort

    for s in STUDIES:
        folder = tmp_path / "est" / s
        io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), folder / "cbf.nii.gz")
        qc = {"no_vof": {"flag": s != "b", "value": 0.0}, "truncation": {"flag": False}}
        (folder / "summary.json").write_text(json.dumps({"method": "bsvd", "qc": qc}))
    est = load_maps_cohort(tmp_path / "est", label="est")
    assert est.qc_flags == {"a": ["no_vof"], "c": ["no_vof"]}
    ref = _readers()[1]
    out = evaluate_readers([est, ref], studies=STUDIES)
    assert ("QC flags of est (its summary.json says why; docs/qc.md): no_vof in 2 of 3 "
            "studies (a, c); the tables include those studies") in out["table_warnings"]


def test_a_clean_up_that_is_no_number_is_not_compared():
    """A summary whose smooth_mm was null (hand-edited, another tool's) had stopped evaluate
    with a traceback."""
    from ctperf.evaluation.cohort import _rule_labels

    rules = {"hypoperfused": {"label": "Tmax > 6.0 s"}, "smooth_mm": None,
             "min_component_ml": 0.1}
    assert _rule_labels(rules) == {"hypoperfused": "Tmax > 6.0 s"}
    assert _rule_labels({**rules, "smooth_mm": 2})["clean-up"] == (
        "median 2 mm, pieces under 0.1 mL dropped")


def test_unoriented_reference_takes_the_oriented_readers_voxel_size():
    """A reference saved without orientation (MATLAB's save_nii: 1 mm voxels) had lent its
    guessed geometry to the oriented reader too: its lesion volumes read 64 times too small,
    or not, by the order of the arguments. The oriented reader's voxels give the volumes."""
    for unknown in (0, 1):
        readers = _readers()
        for s in STUDIES:
            for i, r in enumerate(readers):
                maps = r.maps[s]
                r.maps[s] = maps.replace(
                    affine=np.eye(4) if i == unknown else np.diag([2.0, 2.0, 5.0, 1.0]),
                    provenance={**maps.provenance, "orientation_unknown": i == unknown})
                r.lesions[s] = {"core": maps["cbf"] < 20.0}
        out = evaluate_readers(readers, studies=STUDIES)
        assert out["voxel_ml"] == pytest.approx({s: 0.02 for s in STUDIES})  # 2 x 2 x 5 mm
        core = next(row for row in out["lesions"] if row["lesion"] == "core")
        n = np.count_nonzero(readers[1].lesions["a"]["core"])
        assert core["cases"]["a"]["volume_reference_ml"] == pytest.approx(n * 0.02)


def test_masks_without_orientation_are_said_in_the_readers_warnings(tmp_path):
    """Lesion masks with no sform or qform are taken voxel for voxel: the warning had gone to
    the log only, and Dice of transposed masks stood in the report unexplained."""
    import nibabel as nib

    from ctperf import io
    from ctperf.evaluation.cohort import load_maps_cohort

    folder = tmp_path / "other" / "a"
    io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), folder / "cbf.nii.gz")
    img = nib.Nifti1Image(np.ones((8, 8, 2), np.uint8), None)
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    (folder / "lesions").mkdir()
    nib.save(img, folder / "lesions" / "core.nii.gz")
    reader = load_maps_cohort(tmp_path / "other")
    assert reader.lesions["a"]["core"].all()
    (said,) = reader.warnings
    assert said.startswith("a: core.nii.gz: no orientation") and "voxel for voxel" in said


def test_two_files_of_one_map_are_refused(tmp_path):
    """cbf.nii.gz beside a CBF.nii (another tool's, x 10): one had been taken in silence."""
    from ctperf import io
    from ctperf.errors import InputError

    for name in ("cbf.nii.gz", "CBF.nii"):
        io.write_volume(np.full((2, 8, 8), 30.0, np.float32), np.eye(4), tmp_path / name)
    with pytest.raises(InputError, match=r"CBF\.nii and cbf\.nii\.gz could each be the cbf map"):
        io.map_file(tmp_path, "cbf")


def test_dice_refuses_what_is_not_a_mask():
    """A probability map (0.01 counted as a whole voxel) or a label image (2 counted as
    lesion) had given a Dice; the command line refuses both, the function now too."""
    from ctperf.errors import ValidationError
    from ctperf.evaluation.metrics import dice

    prob = np.linspace(0.0, 1.0, 10)
    with pytest.raises(ValidationError, match="first mask: not a mask: values between whole"):
        dice(prob, prob > 0.5)
    with pytest.raises(ValidationError, match="second mask: not a mask: several labels"):
        dice(np.array([1, 0, 0]), np.array([1, 2, 0]))
    with pytest.raises(ValidationError, match="holds NaN"):
        dice(np.array([1.0, np.nan, 0.0]), np.array([1, 0, 0]))
    assert dice(np.array([1, 1, 0]), np.array([True, False, False])) == 2 / 3
    assert dice(np.array([255, 255, 0], np.uint8), np.array([1, 0, 0])) == 2 / 3  # 8-bit
    scaled = np.array([1.00000006, 0.0, 0.0], np.float32)  # a uint8 mask scaled by 1/255
    assert scaled[0] != 1.0 and dice(scaled, np.array([1, 0, 0])) == 1.0
    residue = np.array([1.0, 1e-9, -1e-8])  # a resampled mask's zeros
    assert dice(residue, np.array([1, 0, 0])) == 1.0


def test_oriented_readers_are_aligned_with_each_other_beside_an_unoriented_reference():
    """With REF unoriented, every reader had been taken voxel for voxel on REF's grid, so a
    prediction stored mirrored (rows reversed, its affine saying so) was compared mirrored
    with the truth (a review: CBF r 0.03 for 0.64). The oriented readers are turned onto one
    oriented grid, the truth's first, and only REF is taken voxel for voxel."""
    rng = np.random.default_rng(1)
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 2.0 * 7  # x reversed: the same voxels, rows reversed
    readers = [Reader(label=n, kind=k, path=n) for n, k in
               (("est", "method"), ("ref", "method"), ("truth", "truth"))]
    for s in STUDIES:
        cbf = rng.uniform(10.0, 70.0, (2, 8, 8)).astype(np.float32)
        for r, a, values, unknown in ((readers[0], flipped, cbf[:, :, ::-1], False),
                                      (readers[1], np.eye(4), cbf, True),
                                      (readers[2], affine, cbf, False)):
            r.maps[s] = PerfusionMaps(maps={"cbf": np.ascontiguousarray(values)}, affine=a,
                                      units={"cbf": "mL/100g/min"},
                                      provenance={"orientation_unknown": unknown})
    out = evaluate_readers(readers, studies=STUDIES)
    for row in out["maps"]:
        assert all(c["mae"] == pytest.approx(0.0) for c in row["cases"].values()), row["estimate"]
    assert out["voxel_ml"] == pytest.approx({s: 0.02 for s in STUDIES})
    # the oriented readers disagree on the voxels' order: which one REF was taken in is said
    (said,) = [w for w in out["table_warnings"] if "different orders" in w]
    assert "in the order of truth's" in said
