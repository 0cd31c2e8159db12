"""Slice cache and target normalisation of ctperf.model, on a tiny synthetic cohort.

:func:`make_cohort` (also used by the other test_model_* files) writes subjects in the phantom
layout whose maps are a known smooth function of the curves: the enhancement is a gamma variate
scaled by CBV and shifted by the delay, so a network can learn CBV from the curve's height and the
delay from its timing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ctperf.errors import InputError, ValidationError
from ctperf.io import write_maps_nifti, write_series_nifti, write_volume
from ctperf.model import (
    TARGET_MAPS,
    build_slice_cache,
    from_unit,
    normalise_input,
    open_slice_cache,
    to_unit,
)
from ctperf.types import CTPSeries, PerfusionMaps


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    f = np.zeros(shape)
    for _ in range(3):
        a, b, c, phase = rng.uniform(0.5, 2.5, 4)
        f += np.sin(np.pi * (a * x + b * y + 0.3 * c * z) + 3 * phase)
    return (f - f.min()) / (np.ptp(f) + 1e-9)  # in [0, 1]


def make_cohort(folder: Path, *, subjects: int = 4, seed: int = 0, size: int = 32, slices: int = 2,
                frames: int = 16, noise_hu: float = 1.0) -> Path:
    """Write ``subjects`` phantom-layout subjects (study, truth maps, brain mask) to ``folder``."""
    rng = np.random.default_rng(seed)
    times = np.arange(frames, dtype=np.float64) * (32.0 / frames)
    shape = (slices, size, size)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.42 * size) ** 2
    brain = np.broadcast_to(disc, shape).copy()
    # stored as DICOM stores axial slices (and as the phantom is): the first row anterior, the
    # first column the patient's right, so the slice cache holds the slices as written
    affine = np.diag([-1.0, -1.0, 5.0, 1.0])
    for s in range(subjects):
        cbv = np.where(brain, 1.0 + 5.0 * _smooth_field(rng, shape), 0.0)
        delay = np.where(brain, 6.0 * _smooth_field(rng, shape), 0.0)
        mtt = np.where(brain, 3.0 + 6.0 * _smooth_field(rng, shape), 0.0)
        cbf = np.where(brain, 60.0 * cbv / np.maximum(mtt, 1e-6), 0.0)
        tt = np.clip(times[:, None, None, None] - 4.0 - delay[None], 0.0, None)
        gamma = (tt / 3.0) ** 3 * np.exp(-tt / 1.5) / ((3 * 1.5 / 3.0) ** 3 * np.exp(-3.0))
        hu = 30.0 * brain + 8.0 * cbv * gamma + noise_hu * rng.standard_normal((frames, *shape))
        series = CTPSeries(hu=hu.astype(np.float32), times=times, affine=affine)
        sub = folder / f"sub-{s:04d}"
        write_series_nifti(series, sub / "study.nii.gz")
        maps = PerfusionMaps(maps={"cbf": cbf, "cbv": cbv, "mtt": mtt, "delay": delay,
                                   "tmax": delay + mtt / 2, "ttp": delay + 4.0},
                             affine=affine, provenance={"method": "synthetic"})
        write_maps_nifti(maps, sub / "truth")
        write_volume(brain, affine, sub / "masks" / "brain.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"), subjects=3)


def test_cache_shapes_dtypes_and_index(cohort: Path, tmp_path: Path):
    cache = build_slice_cache(cohort, tmp_path, size=32, frames=8, reference="truth")
    assert cache.inputs.shape == (6, 8, 32, 32) and cache.inputs.dtype == np.float16
    assert cache.targets.shape == (6, len(TARGET_MAPS), 32, 32)
    assert cache.targets.dtype == np.float16 and cache.masks.dtype == np.uint8
    assert cache.patient_ids == ["sub-0000", "sub-0001", "sub-0002"]
    assert list(cache.rows(["sub-0001"])) == [2, 3]
    assert list(cache.z) == [0, 1] * 3
    assert not cache.inputs.flags.writeable  # opened as a read-only memory map


@pytest.mark.parametrize("size", [None, 32])
def test_cache_progress_counts_every_patient(cohort: Path, tmp_path: Path, capsys, size):
    """The bar counts the three patients whether the size is given or taken from the first
    patient, who is then read alone before the others (it had been left out of the bar)."""
    build_slice_cache(cohort, tmp_path, size=size, frames=8, progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("slice cache: 100%") and " 3/3 " in last


def test_cache_is_reused_not_rebuilt(cohort: Path, tmp_path: Path):
    first = build_slice_cache(cohort, tmp_path, size=32, frames=8)
    stamp = (first.path / "inputs.npy").stat().st_mtime_ns
    again = build_slice_cache(cohort, tmp_path, size=32, frames=8)
    assert again.path == first.path
    assert (again.path / "inputs.npy").stat().st_mtime_ns == stamp
    other = build_slice_cache(cohort, tmp_path, size=16, frames=8)
    assert other.path != first.path and other.size == 16
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_a_cache_is_not_reused_once_a_study_changed(tmp_path: Path):
    """A cache is named by its cohort and settings and by the state of the cohort's files: a
    study replaced since (here sub-0001 by sub-0000's) gets a new cache built from it, where a
    shared cache had been reused with the old slices."""
    import shutil

    cohort = make_cohort(tmp_path / "c", subjects=2, size=8, frames=12)
    first = build_slice_cache(cohort, tmp_path / "cache", size=8, frames=6)
    for name in ("study.nii.gz", "study.json"):
        shutil.copy(cohort / "sub-0000" / name, cohort / "sub-0001" / name)
    again = build_slice_cache(cohort, tmp_path / "cache", size=8, frames=6)
    assert again.path != first.path
    a, b = again.rows(["sub-0000"]), again.rows(["sub-0001"])
    np.testing.assert_array_equal(again.inputs[b], again.inputs[a])
    assert not np.array_equal(first.inputs[first.rows(["sub-0001"])], again.inputs[b])


def test_cache_holds_the_frames_and_maps_it_was_built_from(cohort: Path, tmp_path: Path):
    from ctperf.io import read_maps, read_nifti_series

    cache = build_slice_cache(cohort, tmp_path, size=32, frames=5)
    series = read_nifti_series(cohort / "sub-0002" / "study.nii.gz")
    idx = np.arange(0, 16, 16 // 5)[:5]  # the authors' subsampling, written out independently
    row = cache.rows(["sub-0002"])[1]
    # float16 keeps 11 significant bits: 0.05 HU covers rounding of values up to ~100 HU
    np.testing.assert_allclose(cache.inputs[row], series.hu[idx, 1], atol=0.05)
    truth = read_maps(cohort / "sub-0002" / "truth")
    unit = cache.targets[row, cache.target_index("delay")].astype(np.float32)
    # float16 in [0, 1] is exact to 2**-11 ~ 5e-4 of the 15 s window: 0.01 s
    np.testing.assert_allclose(from_unit(unit, "delay"), truth["delay"][1], atol=0.01)
    mask = cache.masks[row].astype(bool)
    assert 0.4 < mask.mean() < 0.7  # the disc of radius 0.42 covers pi * 0.42**2 = 55 %


def test_patients_read_in_parallel_give_the_same_cache(tmp_path: Path):
    import json

    cohort = make_cohort(tmp_path / "cohort", subjects=5, seed=4)
    one = build_slice_cache(cohort, tmp_path / "one", workers=1)
    three = build_slice_cache(cohort, tmp_path / "three", workers=3)
    for name in ("inputs", "targets", "masks"):
        np.testing.assert_array_equal(getattr(one, name), getattr(three, name))
    index = [json.loads((c.path / "index.json").read_text()) for c in (one, three)]
    assert index[0] == index[1]  # rows in the cohort's order, the same sums and ranges
    assert index[0]["rows_patient"][::2] == [f"sub-{i:04d}" for i in range(5)]
    # a patient failing in a worker stops the build with its error, and leaves no cache
    (cohort / "sub-0003" / "truth" / "mtt.nii.gz").unlink()
    with pytest.raises(InputError, match=r"sub-0003.*missing true maps: mtt"):
        build_slice_cache(cohort, tmp_path / "broken", workers=3)
    assert not any((tmp_path / "broken").glob("*/index.json"))


def test_downsampled_cache_averages_areas(cohort: Path, tmp_path: Path):
    full = build_slice_cache(cohort, tmp_path, size=32, frames=4)
    half = build_slice_cache(cohort, tmp_path, size=16, frames=4)
    block = full.inputs[0].astype(np.float32).reshape(4, 16, 2, 16, 2).mean(axis=(2, 4))
    # float16 rounding of both caches (~0.03 HU at 40 HU) and of the 2 x 2 mean
    np.testing.assert_allclose(half.inputs[0], block, atol=0.1)


def test_input_stats_match_numpy(cohort: Path, tmp_path: Path):
    cache = build_slice_cache(cohort, tmp_path, size=32, frames=8)
    rows = cache.rows(["sub-0000", "sub-0002"])
    data = cache.inputs[rows].astype(np.float64)
    mean, std = cache.input_stats(["sub-0000", "sub-0002"])
    # the stored sums are taken before float16 rounding (< 0.03 HU per value)
    assert mean == pytest.approx(data.mean(), abs=0.01)
    assert std == pytest.approx(data.std(), abs=0.01)


@pytest.mark.parametrize("target", sorted(TARGET_MAPS))
def test_normalisation_round_trips_to_physical_units(target: str, rng: np.random.Generator):
    from ctperf.model import TARGET_WINDOWS

    lo, hi = TARGET_WINDOWS[target]
    values = rng.uniform(lo, hi, 1000).astype(np.float32)
    unit = to_unit(values, target)
    assert unit.min() >= 0 and unit.max() <= 1
    # float32 arithmetic on values up to 100: a few ulp
    np.testing.assert_allclose(from_unit(unit, target), values, rtol=1e-5, atol=1e-4)
    outside = to_unit(np.array([lo - 5, hi + 5]), target)
    assert list(outside) == [0.0, 1.0]


def test_unknown_target_and_bad_window_are_clear_errors():
    with pytest.raises(ValidationError, match="no window for target 'rcbf'"):
        to_unit(np.zeros(3), "rcbf")
    with pytest.raises(ValidationError, match="high > low"):
        to_unit(np.zeros(3), "cbv", windows={"cbv": (5, 5)})
    with pytest.raises(ValidationError, match="standard deviation"):
        normalise_input(np.zeros(3), window=(0, 1), mean=0, std=0)


def test_missing_cohort_and_damaged_cache_are_input_errors(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        build_slice_cache(tmp_path / "nope", tmp_path / "cache", size=8, frames=2)
    (tmp_path / "bad").mkdir()
    with pytest.raises(InputError, match="not a slice cache"):
        open_slice_cache(tmp_path / "bad")
    # a finished cache whose inputs were cut short later: one line, not numpy's traceback
    cohort = make_cohort(tmp_path / "c", subjects=1, size=8, frames=4)
    cache = build_slice_cache(cohort, tmp_path / "cache", size=8, frames=2)
    inputs = cache.path / "inputs.npy"
    for kept in (200, 0):  # cut short, or emptied
        inputs.write_bytes(inputs.read_bytes()[:kept])
        with pytest.raises(InputError, match=r"damaged slice cache .*delete the folder"):
            open_slice_cache(cache.path)


def test_unitobrain_layout_goes_through_the_io_reader(monkeypatch, tmp_path: Path,
                                                      rng: np.random.Generator):
    # no phantom subjects in the folder: the cohort is read with ctperf.io.unitobrain's reader,
    # and the loss mask is where the reference has tissue (CBV > 0) and every map is finite
    from types import SimpleNamespace

    import ctperf.io.unitobrain

    def fake_find(root):
        return [(pid, Path(root) / pid, Path(root) / f"{pid}_Maps")
                for pid in ("MOL-001", "MOL-002")]

    def fake_read(pid, folder, maps_folder):
        hu = rng.normal(40, 5, (10, 2, 16, 16)).astype(np.float32)
        # stored as DICOM stores axial slices: the cache keeps them as they are
        radiological = np.diag([-1.0, -1.0, 1.0, 1.0])
        series = CTPSeries(hu=hu, times=np.arange(10) * 0.5, affine=radiological)
        cbv = np.full((2, 16, 16), 3.0, dtype=np.float32)
        cbv[:, :4] = 0.0  # outside the brain
        delay = np.zeros_like(cbv)
        delay[1, 8, 8] = np.nan
        maps = PerfusionMaps(maps={"cbv": cbv, "cbf": cbv * 10, "delay": delay},
                             affine=radiological)
        return SimpleNamespace(patient_id=pid, series=series, reference=maps)

    monkeypatch.setattr(ctperf.io.unitobrain, "find_unitobrain", fake_find)
    monkeypatch.setattr(ctperf.io.unitobrain, "read_unitobrain_case", fake_read)
    (tmp_path / "utb").mkdir()
    cache = build_slice_cache(tmp_path / "utb", tmp_path / "cache", size=16, frames=5)
    assert cache.patient_ids == ["MOL-001", "MOL-002"]
    assert cache.meta["targets"] == ["cbv", "cbf", "delay"]  # no ttp, mtt or tmax maps
    mask = cache.masks[cache.rows(["MOL-001"])].astype(bool)
    assert mask.sum() == 2 * 12 * 16 - 1
    assert not mask[:, :4].any() and not mask[1, 8, 8]
    with pytest.raises(ValidationError, match="'mtt' is not in the cache"):
        cache.target_index("mtt")


def test_cache_turns_every_study_the_same_way_up(tmp_path: Path):
    """A cohort whose files run the rows to the front and the columns to the patient's right
    (a NIfTI writer's choice; the affine says so) gives the same slice cache, inputs, targets
    and masks, as the same cohort stored as DICOM stores it."""
    from ctperf.io import (
        read_maps,
        read_mask,
        read_nifti_series,
        write_maps_nifti,
        write_series_nifti,
        write_volume,
    )

    cohort = make_cohort(tmp_path / "dicom_way", subjects=2, size=16, frames=10)
    other = tmp_path / "other_way"
    for sub in sorted(cohort.glob("sub-*")):
        series = read_nifti_series(sub / "study.nii.gz")
        affine = series.affine.copy()
        for col, n in ((0, series.shape[3]), (1, series.shape[2])):
            affine[:3, 3] += affine[:3, col] * (n - 1)
            affine[:3, col] *= -1
        flip = (slice(None), slice(None, None, -1), slice(None, None, -1))
        write_series_nifti(series.replace(hu=series.hu[(slice(None), *flip)].copy(),
                                          affine=affine), other / sub.name / "study.nii.gz")
        truth = read_maps(sub / "truth")
        write_maps_nifti(truth.replace(maps={k: truth[k][flip].copy() for k in truth.names},
                                       affine=affine), other / sub.name / "truth")
        brain = read_mask(sub / "masks" / "brain.nii.gz", shape=series.shape[1:],
                          affine=series.affine)
        write_volume(brain[flip].copy(), affine, other / sub.name / "masks" / "brain.nii.gz")
    a = build_slice_cache(cohort, tmp_path / "cache", size=16, frames=5)
    b = build_slice_cache(other, tmp_path / "cache", size=16, frames=5)
    assert a.meta["orientation"] == b.meta["orientation"] == "radiological"
    for name in ("inputs", "targets", "masks"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))


def test_nlr_references_are_written_to_the_output_not_the_cohort(monkeypatch, tmp_path: Path):
    import ctperf.perfusion
    from ctperf.io import read_maps
    from ctperf.workflow import nlr_references

    cohort = make_cohort(tmp_path / "c", subjects=2, size=8, frames=12)
    before = sorted(p.relative_to(cohort) for p in cohort.rglob("*"))
    calls = []

    def fake_run(series, *, method, brain_mask=None, **kw):
        calls.append(method)
        maps = read_maps(cohort / f"sub-000{len(calls) - 1}" / "truth")
        return SimpleNamespace(maps=maps.replace(maps={k: v * 0.5 for k, v in maps.maps.items()}),
                               vessels=np.zeros(maps["cbv"].shape, dtype=bool))

    monkeypatch.setattr(ctperf.perfusion, "run_perfusion", fake_run)
    refs = nlr_references(cohort, tmp_path / "refs")
    assert calls == ["nlr", "nlr"]
    assert (refs / "sub-0001" / "cbv.nii.gz").exists()
    assert sorted(p.relative_to(cohort) for p in cohort.rglob("*")) == before  # input untouched
    cache = build_slice_cache(cohort, tmp_path / "cache", size=8, frames=4, reference="nlr",
                              references=refs)
    truth = read_maps(cohort / "sub-0001" / "truth")
    row = cache.rows(["sub-0001"])[0]
    unit = cache.targets[row, cache.target_index("cbv")].astype(np.float32)
    # the halved maps were used; float16 of [0, 1] values: 5e-4 of the 10 mL/100g window
    np.testing.assert_allclose(from_unit(unit, "cbv"), 0.5 * truth["cbv"][0], atol=0.01)
    nlr_references(cohort, tmp_path / "refs")
    assert len(calls) == 2  # a rerun finds the references written: nothing recomputed
    # a study replaced since: its references are computed again, the other's not
    import os

    study = cohort / "sub-0000" / "study.nii.gz"
    later = (refs / "sub-0000" / "cbv.nii.gz").stat().st_mtime_ns + 10**9
    os.utime(study, ns=(later, later))
    calls.clear()
    nlr_references(cohort, tmp_path / "refs")
    assert calls == ["nlr"]
    # replaced by a copy keeping an older time (cp -p, rsync -a): computed again too (the
    # references of the study before had been kept, paired with the new study's inputs)
    import shutil

    shutil.copy2(cohort / "sub-0001" / "study.nii.gz", study)
    earlier = (refs / "sub-0000" / "cbv.nii.gz").stat().st_mtime_ns - 10**10
    os.utime(study, ns=(earlier, earlier))
    calls.clear()
    nlr_references(cohort, tmp_path / "refs")
    assert calls == ["nlr"]
    # replaced while its references were being fitted: they are of the study before, and
    # computed again on the next run (the record is taken before the study is read)
    def replaced_meanwhile(series, **kw):
        study.write_bytes((cohort / "sub-0001" / "study.nii.gz").read_bytes() + b"")
        os.utime(study, ns=(earlier - 10**9, earlier - 10**9))
        return fake_run(series, **kw)

    monkeypatch.setattr(ctperf.perfusion, "run_perfusion", replaced_meanwhile)
    os.utime(study, ns=(earlier + 10**9, earlier + 10**9))  # stale now: computed again
    calls.clear()
    nlr_references(cohort, tmp_path / "refs")
    monkeypatch.setattr(ctperf.perfusion, "run_perfusion", fake_run)
    calls.clear()
    nlr_references(cohort, tmp_path / "refs")
    assert calls == ["nlr"]
    # the vessels of the reference run are left out of the loss mask: their CBV is the
    # vessel's own, tens of times tissue's
    vessels = np.zeros(truth["cbv"].shape, dtype=bool)
    vessels[:, 3:5, 3:5] = True
    write_volume(vessels, truth.affine, refs / "sub-0001" / "lesions" / "vessels.nii.gz")
    masked = build_slice_cache(cohort, tmp_path / "cache-v", size=8, frames=4, reference="nlr",
                               references=refs)
    assert cache.masks[row, 3:5, 3:5].all() and not masked.masks[row, 3:5, 3:5].any()
    assert np.array_equal(masked.masks[row] | vessels[0], cache.masks[row])
    other = masked.rows(["sub-0000"])[0]  # no vessel mask: the brain mask as before
    assert np.array_equal(masked.masks[other], cache.masks[other])
    # the slice cache only reads: without references it names what is missing
    with pytest.raises(InputError, match="missing NLR reference maps"):
        build_slice_cache(cohort, tmp_path / "cache2", size=8, frames=4, reference="nlr")
    with pytest.raises(InputError, match="inside"):
        nlr_references(cohort, cohort / "refs")  # never into the input cohort


def test_failing_nlr_reference_names_the_subject(monkeypatch, tmp_path: Path):
    import ctperf.perfusion
    from ctperf.workflow import nlr_references

    cohort = make_cohort(tmp_path / "c", subjects=1, size=8, frames=12)

    def failing(series, **kw):
        raise ValidationError("no arterial candidates")

    monkeypatch.setattr(ctperf.perfusion, "run_perfusion", failing)
    with pytest.raises(InputError, match="sub-0000: the NLR reference could not be computed"):
        nlr_references(cohort, tmp_path / "refs")
    assert not (tmp_path / "refs" / "sub-0000").exists()
    with pytest.raises(ValidationError, match="reference must be one of"):
        build_slice_cache(cohort, tmp_path / "cache", size=8, frames=4, reference="svd")


def test_truth_of_preprocessed_copies_is_read_from_their_phantom_cohort(tmp_path: Path):
    import shutil

    from ctperf.io import read_maps, read_mask

    cohort = make_cohort(tmp_path / "c", subjects=2, size=8, frames=12)
    copies = tmp_path / "preprocessed"  # studies only, as `ctperf preprocess` writes them
    for sub in sorted(cohort.glob("sub-*")):
        (copies / sub.name).mkdir(parents=True)
        shutil.copy2(sub / "study.nii.gz", copies / sub.name / "study.nii.gz")
    with pytest.raises(InputError, match="missing true maps"):
        build_slice_cache(copies, tmp_path / "cache0", size=8, frames=4, reference="truth")
    cache = build_slice_cache(copies, tmp_path / "cache", size=8, frames=4, reference="truth",
                              references=cohort)
    truth = read_maps(cohort / "sub-0001" / "truth")
    brain = read_mask(cohort / "sub-0001" / "masks" / "brain.nii.gz", shape=truth.shape,
                      affine=truth.affine)
    row = cache.rows(["sub-0001"])[0]
    unit = cache.targets[row, cache.target_index("cbv")].astype(np.float32)
    # float16 of [0, 1] values: 5e-4 of the 10 mL/100g window
    np.testing.assert_allclose(from_unit(unit, "cbv"), truth["cbv"][0], atol=0.01)
    # the loss mask is the cohort's brain, not the whole image
    np.testing.assert_array_equal(cache.masks[row].astype(bool), brain[0])


def test_patients_sampled_at_different_spacings_are_warned_of(tmp_path: Path, caplog):
    """One study sampled twice as densely (every 2 s against 4 s after taking 8 of 16
    frames): a frame index then means two different times to one network, which the log says
    (with the way out)."""
    import logging

    from ctperf.io import read_nifti_series

    cohort = make_cohort(tmp_path / "c", subjects=2, size=16, frames=16)
    study = cohort / "sub-0001" / "study.nii.gz"
    series = read_nifti_series(study)
    write_series_nifti(series.replace(times=series.times / 2), study)
    with caplog.at_level(logging.WARNING, logger="ctperf.model.data"):
        build_slice_cache(cohort, tmp_path / "cache", size=16, frames=8, reference="truth")
    said = [r.getMessage() for r in caplog.records if "apart" in r.getMessage()]
    assert said and "2.00 to 4.00 s apart" in said[0] and "--frame-mode resample" in said[0]


def test_nlr_references_of_a_phantom_cohort_are_fitted_as_ctperf_maps_fits(tmp_path: Path):
    """What ``ctperf phantom`` writes can be trained on with NLR references: fitted inside the
    phantom's brain mask (which holds no artery and no sinus) the AIF was not found, or not
    corrected for partial volume (CBV twice the truth)."""
    from ctperf.cli import main
    from ctperf.io import read_maps, read_mask
    from ctperf.workflow import nlr_references

    cohort = tmp_path / "cohort"
    assert main(["phantom", str(cohort), "--subjects", "1", "--size", "64", "--slices", "4",
                 "--seed", "5"]) == 0
    refs = nlr_references(cohort, tmp_path / "refs")
    sub = cohort / "sub-0000"
    maps, truth = read_maps(refs / "sub-0000"), read_maps(sub / "truth")
    brain = read_mask(sub / "masks" / "brain.nii.gz", shape=truth["cbv"].shape,
                      affine=truth.affine) & np.isfinite(maps["cbv"])
    ratio = np.median(maps["cbv"][brain]) / np.median(truth["cbv"][brain])
    # the box fit on this unfiltered 64 px study reads CBV 1.11 times the truth (noise and
    # partial volume); without the VOF's correction it read about 2 (2.15 on a 128 px one)
    assert 0.85 < ratio < 1.25, ratio
    assert (refs / "sub-0000" / "lesions" / "vessels.nii.gz").exists()


def test_a_subject_without_its_brain_mask_is_not_trained_on_the_air(tmp_path, caplog):
    """A phantom subject whose masks/brain.nii.gz is gone had its loss taken over the whole
    slice (air as a target of 0), in silence: the reference maps' tissue stands in, said in
    the log. A missing true map is named among those needed."""
    import logging

    from ctperf.model.data import iter_cohort

    cohort = make_cohort(tmp_path / "c", subjects=2, size=16, frames=12)
    (cohort / "sub-0001" / "masks" / "brain.nii.gz").unlink()
    with caplog.at_level(logging.WARNING, logger="ctperf.model.data"):
        masks = {pid: mask for pid, _, _, mask in iter_cohort(cohort)}
    np.testing.assert_array_equal(masks["sub-0001"], masks["sub-0000"])  # the same disc
    assert masks["sub-0001"].mean() < 0.6
    assert "sub-0001: no brain mask" in caplog.text
    (cohort / "sub-0000" / "truth" / "cbv.nii.gz").unlink()
    with pytest.raises(InputError, match=r"missing true maps: cbv \(of cbf, cbv, mtt, delay\)"):
        list(iter_cohort(cohort))


def test_a_cache_built_meanwhile_by_another_run_is_used(tmp_path: Path, monkeypatch):
    """`ctperf train` and `ctperf cv` started together on one --cache both built the cache; the
    one finishing second stopped (exit 2) on the first's, "the output of `ctperf train`". It
    uses it now."""
    import ctperf.model.data as data
    from ctperf.io import atomic

    cohort = make_cohort(tmp_path / "c", subjects=2, size=8, frames=4)
    real = data._assemble

    def other_run_first(tmp, parts, **kw):  # the other run finishes while this one assembles
        monkeypatch.setattr(data, "_assemble", real)
        atomic.set_writer("ctperf train")
        try:
            build_slice_cache(cohort, tmp_path / "cache", size=8, frames=2)
        finally:
            atomic.set_writer("ctperf cv")
        return real(tmp, parts, **kw)

    monkeypatch.setattr(data, "_assemble", other_run_first)
    atomic.set_writer("ctperf cv")
    try:
        cache = build_slice_cache(cohort, tmp_path / "cache", size=8, frames=2)
    finally:
        atomic.set_writer(None)
    assert cache.inputs.shape[0] == 4 and len(list((tmp_path / "cache").iterdir())) == 1
