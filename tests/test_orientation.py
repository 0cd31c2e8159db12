"""Orientation as the study's header gives it: kept in the maps written (no orientation stays
none, a template space stays that space), and slices that are not axial refused rather than
mapped with a midline and a contralateral reference in the wrong plane."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ctperf import io
from ctperf.cli import main
from ctperf.errors import ValidationError
from ctperf.perfusion import run_perfusion
from test_aif_failsafe import T1, skullless_study


def _codes(path) -> tuple[int, int]:
    header = nib.load(str(path)).header
    return int(header["sform_code"]), int(header["qform_code"])


@pytest.mark.parametrize("code", [0, 2])
def test_maps_keep_the_space_of_the_study(tmp_path, code, capsys):
    """A study whose header sets no orientation (codes 0, as MATLAB's save_nii writes) gives
    maps and masks without one, so that `ctperf evaluate` compares them voxel for voxel instead
    of turning them by a guessed orientation (which had read a core Dice of 0 against the same
    maps); an aligned space (2) stays 2."""
    series, _ = skullless_study(np.random.default_rng(2), times=T1, noise=10.0)
    series = series.replace(meta={**series.meta, "nifti_xform_code": code})
    study = io.write_series_nifti(series, tmp_path / "study.nii.gz")
    assert _codes(study) == (code, code)
    assert io.read_study(study).meta["nifti_xform_code"] == code
    assert main(["maps", str(study), str(tmp_path / "maps"), "--method", "bsvd"]) == 0
    for path in (tmp_path / "maps" / "cbf.nii.gz", tmp_path / "maps" / "lesions" / "core.nii.gz"):
        assert _codes(path) == (code, code), path
    maps = io.read_maps(tmp_path / "maps")
    assert bool(maps.provenance.get("orientation_unknown")) is (code == 0)


def _turned(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn = {"z": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "x": [[1, 0, 0], [0, c, -s], [0, s, c]]}
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(turn[axis]) @ np.diag([0.5, 0.5, 5.0])
    return affine


def test_maps_keep_a_qform_that_disagrees_with_the_sform(tmp_path, caplog):
    """A study whose qform mirrors its sform left to right: its maps, masks and preprocessed
    study keep both as the study has them, so that a viewer reading the qform (ITK's, and so
    Slicer's and ITK-SNAP's) shows them where it shows the study (written with the sform as
    the qform too, such viewers had shown the lesions in the other hemisphere)."""
    series, _ = skullless_study(np.random.default_rng(2), times=T1, noise=10.0)
    study = io.write_series_nifti(series, tmp_path / "study.nii.gz")
    img = nib.load(str(study))
    mirrored = img.affine.copy()
    mirrored[:3, 0] *= -1
    mirrored[:3, 3] -= mirrored[:3, 0] * (img.shape[0] - 1)  # the same box, x reversed
    img.set_qform(mirrored, code=1)
    img.set_sform(img.affine, code=2)
    nib.save(img, str(study))
    assert main(["maps", str(study), str(tmp_path / "maps"), "--method", "bsvd"]) == 0
    assert "sform and qform disagree" in caplog.text
    assert main(["preprocess", str(study), str(tmp_path / "pre"), "--no-register"]) == 0
    for path in (tmp_path / "maps" / "cbf.nii.gz", tmp_path / "maps" / "lesions" / "core.nii.gz",
                 tmp_path / "pre" / "study.nii.gz"):
        header = nib.load(str(path)).header
        np.testing.assert_allclose(header.get_qform(), mirrored, atol=1e-4, err_msg=str(path))
        np.testing.assert_allclose(header.get_sform(), img.affine, atol=1e-4,
                                   err_msg=str(path))
        assert _codes(path) == (2, 1), path
    # a mask drawn in a viewer that placed the maps by that qform is saved on it: read voxel
    # for voxel (it had been turned left to right onto the sform's grid), for the maps' own
    # masks too
    drawn = np.zeros(img.shape[2::-1], dtype=np.uint8)  # (Z, Y, X)
    drawn[:, 5:9, 2:6] = 1  # off the midline: a mirror would move it
    saved = nib.Nifti1Image(drawn.transpose(2, 1, 0), mirrored)
    saved.set_qform(mirrored, code=1)
    saved.set_sform(mirrored, code=1)
    nib.save(saved, str(tmp_path / "drawn.nii.gz"))
    series_back = io.read_study(study)
    maps = io.read_maps(tmp_path / "maps")
    for record in (series_back.meta, maps.provenance):
        read = io.read_mask(tmp_path / "drawn.nii.gz", shape=drawn.shape,
                            affine=series_back.affine, qform=io.kept_qform(record))
        np.testing.assert_array_equal(read, drawn.astype(bool))
    # where the sform is in scanner space ITK places the study by it: the qform is no grid a
    # mask was drawn on, and a mask on it is the sform's voxels in another order, turned
    assert io.kept_qform({**series_back.meta, "nifti_xform_code": 1}) is None
    # the header decides: repaired (qform = sform), the sidecar's record of the old qform is
    # not written back
    img.set_qform(img.affine, code=2)
    nib.save(img, str(study))
    assert "nifti_qform" not in io.read_study(study).meta


def test_which_slices_are_axial():
    from ctperf.types import non_axial_slices

    assert non_axial_slices(np.diag([-0.5, -0.5, 5.0, 1.0])) is None
    assert non_axial_slices(_turned("z", 30.0)) is None  # a head turned 30 degrees
    assert non_axial_slices(_turned("x", 30.0)) is None  # a gantry tilted 30 degrees
    sagittal = np.eye(4)[:, [1, 2, 0, 3]] * [0.5, 0.5, 5.0, 1.0]  # slices along left-right
    assert "sagittal slices" in non_axial_slices(sagittal)
    coronal = np.eye(4)[:, [0, 2, 1, 3]] * [0.5, 0.5, 5.0, 1.0]
    assert "coronal slices" in non_axial_slices(coronal)


def test_sagittal_slices_are_refused(tmp_path, capsys):
    """Stored with its slices along left-right, the mirror of the contralateral reference had
    sent each hemisphere onto itself (exit 0): refused by the maps, with the file named."""
    series, _ = skullless_study(np.random.default_rng(2), times=T1, noise=10.0)
    sagittal = series.replace(affine=series.affine[:, [1, 2, 0, 3]])
    with pytest.raises(ValidationError, match="sagittal slices"):
        run_perfusion(sagittal, method="bsvd")
    study = io.write_series_nifti(sagittal, tmp_path / "study.nii.gz")
    assert main(["maps", str(study), str(tmp_path / "maps")]) == 2
    err = capsys.readouterr().err
    assert "study.nii.gz" in err and "sagittal slices" in err and "Traceback" not in err
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("reverse_rows", [False, True])
@pytest.mark.parametrize("reverse_cols", [False, True])
def test_figures_show_a_slice_the_same_way_whatever_its_storage(reverse_rows, reverse_cols):
    """A slice stored with rows and columns swapped (columns running front-back), and either
    reversed, is shown as the same radiological picture with the same pixel aspect (before,
    only flips were applied: the swapped slice was shown transposed, its "R" at the patient's
    front)."""
    from ctperf.types import RadiologicalView

    img = np.arange(6 * 9, dtype=float).reshape(6, 9)  # 6 rows of 0.8 mm, 9 columns of 0.5 mm
    lps = np.diag([-0.5, -0.8, 5.0, 1.0])  # as DICOM stores axial slices: shown as stored
    plain = RadiologicalView.of(lps)
    np.testing.assert_array_equal(plain(img), img)
    stored, affine = img.T, lps[:, [1, 0, 2, 3]]  # rows and columns swapped
    if reverse_rows:
        stored, affine = stored[::-1], affine @ _reversal(1, stored.shape[0])
    if reverse_cols:
        stored, affine = stored[:, ::-1], affine @ _reversal(0, stored.shape[1])
    view = RadiologicalView.of(affine)
    np.testing.assert_array_equal(view(stored), img)
    assert view.aspect(*np.linalg.norm(affine[:3, [1, 0]], axis=0)) == plain.aspect(0.8, 0.5)


def _reversal(axis: int, n: int) -> np.ndarray:
    """Index map i -> n - 1 - i along voxel ``axis`` (0: x, columns; 1: y, rows)."""
    m = np.eye(4)
    m[axis, axis], m[axis, 3] = -1.0, n - 1.0
    return m
