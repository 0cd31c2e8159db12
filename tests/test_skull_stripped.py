"""Skull-stripped and padded studies: the head outside the brain's mask replaced by 0 HU, by air
(-1024 HU) or by NaN, or a border of padding around the image, as research pipelines and some
public datasets store them."""

import json

import nibabel as nib
import numpy as np
import pytest

from ctperf import phantom
from ctperf.errors import InputError, ValidationError
from ctperf.io import read_study
from ctperf.io.integrity import check_hu_plausible
from ctperf.perfusion import LesionOptions, run_perfusion


@pytest.fixture(scope="module")
def subject():
    return phantom.generate_subject(seed=1, size=96, slices=2, lesion=True)


def _stripped(subject, fill, *, vessels=True):
    """The study with everything outside the intracranial space (brain, CSF and, with
    ``vessels``, the arteries and sinuses, less bone) set to ``fill`` in every frame."""
    m = subject.masks
    keep = m["brain"] | m["csf"]
    if vessels:
        keep |= m["vessels"] | m["artery"] | m["vein"]
    keep &= subject.series.hu[0] < 300
    hu = subject.series.hu.copy()
    hu[:, ~keep] = fill
    return subject.series.replace(hu=hu)


def _run(series):
    return run_perfusion(series, method="bsvd", lesion_options=LesionOptions())


@pytest.fixture(scope="module")
def whole(subject):
    return _run(subject.series)


@pytest.mark.parametrize("fill", [0.0, -1024.0])
def test_a_skull_stripped_study_is_mapped_as_the_whole_head(subject, whole, fill):
    """Stored on 0 HU, the padding had been taken for soft tissue and its noise of 0 for the
    frames' noise (a 128 px phantom stripped to its brain alone was refused as a bolus begun
    before the first frame); stored on air, the air averaged into the cortex took a ring of
    brain for CSF (15 % of a 128 px phantom's brain, hypoperfused 46 against 55 mL) and the
    whole brain, meeting air, raised ``fov_cut``. Padding is now read as air, air is left out
    of the smoothing where there is no skull, and a study with no skull raises no ``fov_cut``."""
    result = _run(_stripped(subject, fill))
    qc = result.maps.provenance["qc"]
    assert not qc["fov_cut"]["flag"] and qc["fov_cut"]["value"] is None
    # the sinus that measures the partial volume usually goes with the skull: said
    assert qc["no_skull"]["flag"] and not whole.maps.provenance["qc"]["no_skull"]["flag"]
    assert not qc["no_head_outline"]["flag"] and qc["no_head_outline"]["value"] == 0.0
    brain = subject.masks["brain"]
    fitted, fitted_whole = np.isfinite(result.maps["cbf"]), np.isfinite(whole.maps["cbf"])
    # the true brain is fitted as in the whole head: 99.4 % here (the CSF rim that the whole
    # head's fit kept beyond it is what differs)
    assert (fitted & brain).sum() >= 0.98 * (fitted_whole & brain).sum()
    # the CSF cut reads the same levels
    assert result.maps.provenance["csf_cut_hu"] == pytest.approx(
        whole.maps.provenance["csf_cut_hu"], abs=1.0)
    for name in ("core", "hypoperfused"):
        got, ref = result.lesions.volumes_ml[name], whole.lesions.volumes_ml[name]
        # the lesion rule leaves out the searched region's outer rim, which here is the
        # cortex's surface rather than the CSF beyond it: a few per cent smaller (measured
        # 0-4 % on this phantom)
        assert got == pytest.approx(ref, rel=0.10), (name, got, ref)


def test_air_and_zero_padding_give_the_same_maps(subject):
    a, b = _run(_stripped(subject, 0.0)), _run(_stripped(subject, -1024.0))
    np.testing.assert_array_equal(np.isfinite(a.maps["cbf"]), np.isfinite(b.maps["cbf"]))
    assert a.lesions.volumes_ml == b.lesions.volumes_ml


def test_a_brain_stripped_of_its_arteries_is_refused_for_its_lack_of_an_artery(subject):
    """With no artery left there is no AIF to find; the refusal says so, not that the bolus had
    begun before the first frame (the tissue's earliest-peaking noise had been read as
    arteries, the padding's zero noise as the frames' noise)."""
    with pytest.raises(ValidationError, match="no arterial candidates"):
        _run(_stripped(subject, 0.0, vessels=False))


def test_nan_outside_the_mask_is_read_as_air(subject, tmp_path, caplog):
    series = _stripped(subject, -2000.0)
    outside = series.hu[0] == -2000.0
    hu = np.where(outside, np.float32(np.nan), series.hu)
    path = tmp_path / "stripped.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(3, 2, 1, 0), series.affine), path)
    (tmp_path / "stripped.json").write_text(json.dumps({"FrameTimes": series.times.tolist()}))
    with caplog.at_level("WARNING", logger="ctperf"):
        read = read_study(path)
    assert f"{int(outside.sum())} voxels are NaN in every frame" in caplog.text
    assert np.all(read.hu[:, outside] == -1024.0)
    np.testing.assert_array_equal(read.hu[:, ~outside], series.hu[:, ~outside])


def test_nan_holes_inside_the_brain_stay_out_of_its_mask(subject):
    """Voxels NaN in every frame inside the brain (a mask's holes) are read as air; the brain
    mask's hole filling had put them back, and the U-Net gave them CBV 3.3, Tmax 6.2 s (a
    probe). Air enclosed by the brain is now no brain; the rest of the mask is unchanged."""
    from ctperf.io.nifti import MASKED_HU
    from ctperf.masks import brain_mask

    before = brain_mask(subject.series)
    z, y, x = (int(np.median(v)) for v in np.nonzero(before))
    hu = subject.series.hu.copy()
    hole = np.zeros(before.shape, dtype=bool)
    hole[z, y - 2:y + 2, x - 2:x + 2] = True
    assert before[hole].all()
    hu[:, hole] = MASKED_HU
    after = brain_mask(subject.series.replace(hu=hu))
    assert not after[hole].any()
    np.testing.assert_array_equal(after[~hole], before[~hole])


def test_nan_in_some_frames_only_is_refused(tmp_path):
    hu = np.zeros((8, 8, 2, 6), dtype=np.float32)
    hu[2, 3, 1, 4] = np.nan
    path = tmp_path / "damaged.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    (tmp_path / "damaged.json").write_text(json.dumps({"FrameTimes": list(range(6))}))
    with pytest.raises(InputError, match=r"damaged\.nii\.gz.*1 voxels are NaN in some frames"):
        read_study(path)


def _padded(series, width: int, fill: float):
    """The study with ``width`` pixels of ``fill`` added around every image."""
    hu = np.pad(series.hu, ((0, 0), (0, 0), (width, width), (width, width)),
                constant_values=fill)
    affine = series.affine.copy()
    affine[:3, 3] -= width * (affine[:3, 0] + affine[:3, 1])
    return series.replace(hu=hu, affine=affine)


@pytest.mark.parametrize("fill", [0.0, -2048.0])
def test_a_border_of_padding_changes_nothing(subject, whole, fill):
    """A wide border of 0 HU around a head with its skull had been soft tissue joined to the
    scalp, which then entered the brain mask (a probe's 96 px phantom: 961 voxels more, core
    17.9 -> 22.0 mL); one of -2048 HU over most of each image was refused as "not a CT image".
    Still voxels below 15 HU joined to the image's border are padding, read as air."""
    padded = _padded(subject.series, 40, fill)
    check_hu_plausible(padded.hu, lambda t, z: ("padded", f"frame {t}, slice {z}: "))
    result = _run(padded)
    inner = np.isfinite(result.maps["cbf"])[:, 40:-40, 40:-40]
    np.testing.assert_array_equal(inner, np.isfinite(whole.maps["cbf"]))
    assert result.lesions.volumes_ml == pytest.approx(whole.lesions.volumes_ml, abs=1e-9)


def test_the_brain_mask_of_a_series_reads_padding_as_air(subject):
    """`brain_mask(series)`, which bounds the U-Net's maps (`ctperf predict`), had taken a
    0 HU padding for soft tissue: the whole image was "brain"."""
    from ctperf.masks import brain_mask

    series = _stripped(subject, 0.0)
    outside = np.all(series.hu == 0.0, axis=0)
    mask = brain_mask(series)
    assert mask.any() and not (mask & outside).any()


def test_registration_reads_padding_as_air(subject):
    """The registration's brain of the first frame had taken a 0 HU padding for soft tissue
    (a probe's 64 px stripped study: 8,182 of 8,192 voxels)."""
    from ctperf.preprocess.registration import _registration_mask

    series = _stripped(subject, 0.0)
    outside = np.all(series.hu == 0.0, axis=0)
    mask = _registration_mask(series, None)
    assert mask.any() and not (mask & outside).any()


def test_a_stripped_brain_cut_on_every_side_is_no_flat_background(subject):
    """Cropped 6-12 px into the brain on every side, a stripped brain covers 57-100 % of the
    image's edges: those edge voxels enhance, so they are brain, not a tile phantom's flat
    background (``no_head_outline`` had been raised on them by the edges' share alone)."""
    ys, xs = np.nonzero(subject.masks["brain"].any(axis=0))
    for depth in (6, 10):
        cut = _stripped(subject, 0.0)
        box = (slice(None), slice(None), slice(ys.min() + depth, ys.max() + 1 - depth),
               slice(xs.min() + depth, xs.max() + 1 - depth))
        affine = cut.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([xs.min() + depth, ys.min() + depth, 0.0])
        cropped = cut.replace(hu=np.ascontiguousarray(cut.hu[box]), affine=affine)
        outline = _run(cropped).maps.provenance["qc"]["no_head_outline"]
        assert not outline["flag"] and outline["value"] == 0.0, (depth, outline)


def test_the_hu_check_installs_no_warnings_filter(monkeypatch):
    """The readers' HU check silenced numpy's all-NaN warnings with warnings.catch_warnings:
    a process-wide filter that, crossing a DICOM decode's in another thread, stayed installed
    for good (a probe's three threads reading at once: 2-6 of 6 runs). It now computes the
    medians masked, with nothing to silence, on images with and without tissue."""
    import warnings

    def refuse(*args, **kwargs):
        raise AssertionError("a warnings filter was installed")

    hu = np.full((4, 2, 16, 16), 30.0, dtype=np.float32)
    hu[:, 1] = -1000.0  # a slice of air: no tissue median
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(warnings, "catch_warnings", refuse)
        check_hu_plausible(hu, lambda t, z: ("study", f"frame {t}, slice {z}: "))
