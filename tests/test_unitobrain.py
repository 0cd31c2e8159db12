"""UniToBrain layout: a tiny fake tree, maps paired with input slices by position."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import generate_uid

from ctperf.errors import InputError
from ctperf.io import iter_unitobrain
from ctperf.io.unitobrain import find_unitobrain
from dicom_factory import ct_dataset, write_fake_study


def write_map(folder, values, positions, iop, order, *, slope=0.01, intercept=0.0):
    """One DICOM per map slice, written in ``order`` with names that do not follow position."""
    folder.mkdir(parents=True)
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    for rank, k in enumerate(order):
        ds = ct_dataset(values[k], series_uid=uid, study_uid=study, frame_uid=frame,
                        position=positions[k], iop=iop, spacing=(0.5, 0.45), when=None,
                        temporal_index=1, instance=rank + 1, slope=slope, intercept=intercept,
                        description=folder.name)
        ds.save_as(folder / f"{folder.name}{rank + 1:05d}.dcm", enforce_file_format=True)


def make_patient(root, rng, patient, *, n_slices=4):
    study = write_fake_study(root / f"{patient}_Registered_Filtered_3mm_20HU", rng,
                             n_frames=4, n_slices=n_slices, nested=False)
    maps_root = root / f"{patient}_Registered_Filtered_3mm_20HU_Maps"
    truth = {}
    for folder, name in [("NLR_CBF", "cbf"), ("NLR_CBV", "cbv"), ("NLR_TTP", "ttp"),
                         ("NLR_Delay", "delay")]:
        # maps cover study slices 1..n-1 plus one slice beyond the study, shuffled on disk
        positions = np.vstack([study.positions[1:],
                               study.positions[-1] + (study.positions[1] - study.positions[0])])
        values = np.rint(rng.uniform(0, 80, (len(positions), 8, 10)) * 100) / 100
        write_map(maps_root / folder, values, positions, study.iop,
                  order=rng.permutation(len(positions)))
        expected = np.full((n_slices, 8, 10), np.nan)
        expected[1:] = values[: n_slices - 1]
        truth[name] = expected
    (maps_root / "notes.txt").write_text("processing notes")
    return study, truth


def test_fake_tree_pairs_maps_by_position(tmp_path, rng):
    root = tmp_path / "unitobrain"
    made = {p: make_patient(root, rng, p) for p in ("MOL-002", "MOL-001")}
    cases = list(iter_unitobrain(root))
    assert [c.patient_id for c in cases] == ["MOL-001", "MOL-002"]
    for case in cases:
        study, truth = made[case.patient_id]
        np.testing.assert_array_equal(case.series.hu, study.hu)
        assert sorted(case.reference.names) == ["cbf", "cbv", "delay", "ttp"]
        for name, expected in truth.items():
            # stored at 0.01 steps from values already on that grid: float32 rounding only
            np.testing.assert_allclose(case.reference[name], expected, atol=1e-4)
        np.testing.assert_array_equal(case.reference.affine, case.series.affine)
        assert case.series.meta["patient_id"] == case.patient_id


def test_nested_one_level(tmp_path, rng):
    make_patient(tmp_path / "root" / "batch1", rng, "MOL-007", n_slices=3)
    assert [p for p, _, _ in find_unitobrain(tmp_path / "root")] == ["MOL-007"]


def test_missing_maps_folder(tmp_path, rng):
    write_fake_study(tmp_path / "MOL-003_Registered_Filtered_3mm_20HU", rng, nested=False)
    with pytest.raises(InputError, match="MOL-003_Registered_Filtered_3mm_20HU_Maps: missing"):
        find_unitobrain(tmp_path)


def test_no_patients(tmp_path):
    with pytest.raises(InputError, match="no patients: neither a phantom cohort"):
        find_unitobrain(tmp_path)


def test_maps_at_other_positions_rejected(tmp_path, rng):
    study = write_fake_study(tmp_path / "MOL-004_Registered_Filtered_3mm_20HU", rng,
                             n_slices=2, nested=False)
    far = study.positions + np.array([0.0, 0.0, 100.0])
    write_map(tmp_path / "MOL-004_Registered_Filtered_3mm_20HU_Maps" / "NLR_CBF",
              np.ones((2, 8, 10)), far, study.iop, order=[0, 1])
    with pytest.raises(InputError, match="no cbf slice lies at a study slice position"):
        list(iter_unitobrain(tmp_path))


def test_ttp_and_delay_targets_read_their_own_folders(tmp_path, rng):
    """The ``ttp`` target learns NLR_TTP and the ``delay`` target NLR_Delay, never each other."""
    from ctperf.model import TARGET_MAPS

    _, truth = make_patient(tmp_path, rng, "MOL-005", n_slices=3)
    case = next(iter_unitobrain(tmp_path))
    for target, folder_map in (("ttp", "ttp"), ("delay", "delay")):
        name = TARGET_MAPS[target]
        assert name == folder_map
        # the two folders hold independent random values: equal only if read from the right one
        np.testing.assert_allclose(case.reference[name], truth[folder_map], atol=1e-4)
    assert not np.allclose(np.nan_to_num(case.reference["ttp"]),
                           np.nan_to_num(case.reference["delay"]))


def test_a_patient_without_a_map_is_named(tmp_path, rng, caplog):
    """One patient's missing NLR_TTP: logged when read, and training on ttp names him."""
    import logging
    import shutil

    from ctperf.errors import ValidationError
    from ctperf.model import build_slice_cache

    for patient in ("MOL-001", "MOL-002"):
        make_patient(tmp_path / "utb", rng, patient, n_slices=3)
    shutil.rmtree(tmp_path / "utb" / "MOL-002_Registered_Filtered_3mm_20HU_Maps" / "NLR_TTP")
    with caplog.at_level(logging.WARNING, logger="ctperf.io.unitobrain"):
        cache = build_slice_cache(tmp_path / "utb", tmp_path / "cache", size=16, frames=4)
    missing = [r.getMessage() for r in caplog.records if "folder" in r.getMessage()]
    assert any("no NLR_MTT, NLR_TTP folders; MOL-002" in m for m in missing), missing
    assert any("no NLR_MTT folder; MOL-001" in m for m in missing), missing
    assert cache.target_index("cbf") >= 0
    with pytest.raises(ValidationError, match=r"MOL-002 has no 'ttp' reference map"):
        cache.target_index("ttp")


def test_reference_maps_without_input_are_reported(tmp_path, rng, caplog):
    import logging

    make_patient(tmp_path, rng, "MOL-001", n_slices=2)
    (tmp_path / "MOL-009_Registered_Filtered_3mm_20HU_Maps" / "NLR_CBF").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="ctperf.io.unitobrain"):
        assert [p for p, _, _ in find_unitobrain(tmp_path)] == ["MOL-001"]
    assert any("MOL-009" in r.getMessage() and "without their input" in r.getMessage()
               for r in caplog.records)


def test_patient_folders_spelled_without_the_hyphen_are_read(tmp_path, rng):
    """``MOL002`` and ``MOL_3`` are patients MOL-002 and MOL-003 (sorted by number); the same
    number spelled twice is one patient found twice, not two patients."""
    for patient in ("MOL002", "MOL_3", "MOL-010"):
        make_patient(tmp_path / "a", rng, patient, n_slices=2)
    assert [p for p, _, _ in find_unitobrain(tmp_path / "a")] == ["MOL-002", "MOL-003",
                                                                  "MOL-010"]
    for patient in ("MOL-1", "MOL-001"):
        make_patient(tmp_path / "b", rng, patient, n_slices=2)
    with pytest.raises(InputError, match="patient MOL-001 appears twice"):
        find_unitobrain(tmp_path / "b")


def test_true_maps_are_not_asked_of_the_dataset(tmp_path, rng, capsys):
    """UniToBrain's reference is its own NLR maps: training on it with --reference truth had
    exited 0 with a model recorded as trained on true maps."""
    from ctperf.cli import main

    root = tmp_path / "unitobrain"
    make_patient(root, rng, "MOL-001")
    code = main(["train", str(root), str(tmp_path / "run"), "--reference", "truth",
                 "--epochs", "1"])
    assert code == 2
    assert "has no true maps" in capsys.readouterr().err


def test_the_reference_brain_leaves_out_the_zeros_outside_it():
    """The dataset stores 0 outside the brain, never NaN: the brain the U-Net's maps are kept
    in (and its loss is taken over) is where the reference holds tissue."""
    from ctperf.model.data import reference_brain
    from ctperf.types import PerfusionMaps

    cbv = np.zeros((1, 4, 4), dtype=np.float32)
    cbv[0, 1:3, 1:3] = 3.0
    delay = np.zeros_like(cbv)  # a delay of 0 inside the brain is a value
    delay[0, 0, 0] = np.nan
    maps = PerfusionMaps(maps={"cbv": cbv, "delay": delay}, affine=np.eye(4))
    np.testing.assert_array_equal(reference_brain(maps), cbv > 0)


def test_the_unets_maps_are_kept_in_the_references_tissue(tmp_path):
    """The U-Net's maps of a UniToBrain patient are kept where the dataset's maps hold tissue;
    taken where they were finite, they had covered the air (CBV 5.3 mL/100 g there)."""
    from ctperf import io
    from ctperf.workflow.reproduce_subjects import _reference_masks

    cbv = np.zeros((1, 4, 4), dtype=np.float32)
    cbv[0, 1:3, 1:3] = 3.0
    for name in ("cbv", "cbf"):
        io.write_volume(cbv * 10 if name == "cbf" else cbv, np.eye(4),
                        tmp_path / "ref" / f"{name}.nii.gz")
    brain, vessels = _reference_masks(tmp_path / "ref", (1, 4, 4), np.eye(4))
    np.testing.assert_array_equal(brain, cbv > 0)
    assert not vessels.any()


def test_a_damaged_map_folder_costs_only_its_map(tmp_path, rng, caplog):
    """An empty NLR_TTP folder of one patient had stopped a cohort training CBF: it is left out
    for that patient, with a warning naming it, as a missing folder is."""
    import logging

    from ctperf.errors import ValidationError
    from ctperf.model import build_slice_cache

    for patient in ("MOL-001", "MOL-002"):
        make_patient(tmp_path / "utb", rng, patient, n_slices=3)
    ttp = tmp_path / "utb" / "MOL-002_Registered_Filtered_3mm_20HU_Maps" / "NLR_TTP"
    for f in ttp.iterdir():
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="ctperf.io.unitobrain"):
        cache = build_slice_cache(tmp_path / "utb", tmp_path / "cache", size=16, frames=4)
    said = [r.getMessage() for r in caplog.records if "left out for MOL-002" in r.getMessage()]
    assert said and "NLR_TTP" in said[0] and "no reference for ttp" in said[0]
    assert cache.target_index("cbf") >= 0
    with pytest.raises(ValidationError, match=r"MOL-002 has no 'ttp' reference map"):
        cache.target_index("ttp")
