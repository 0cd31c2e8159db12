"""Brain mask: a synthetic head with scalp, skull, brain and ventricles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctperf.errors import ValidationError
from ctperf.masks import brain_mask
from ctperf.types import CTPSeries


def _head(rng: np.random.Generator, noise: float = 3.0):
    """(Z, Y, X) = (4, 96, 96) head at 1 mm in-plane, 5 mm slices; returns volume and truths."""
    _, y, x = np.mgrid[0:4, 0:96, 0:96].astype(float)
    r = np.hypot((y - 48) / 36, (x - 48) / 30)
    brain = r < 1.0
    skull = (r >= 1.0) & (r < 1.15)
    scalp = (r >= 1.15) & (r < 1.28)
    ventricle = np.hypot((y - 48) / 8, (x - 48) / 5) < 1.0
    vol = np.full(r.shape, -1000.0)
    vol[scalp] = 40.0
    vol[skull] = 1200.0
    vol[brain] = 35.0
    vol[ventricle] = 8.0
    vol += noise * rng.standard_normal(vol.shape)
    return vol.astype(np.float32), brain, ventricle


def test_mask_finds_brain_without_skull_and_scalp(rng):
    vol, brain, ventricle = _head(rng)
    mask = brain_mask(vol, spacing=(5.0, 1.0, 1.0))
    # Only the scalp and skull must be gone; smoothing blurs the brain edge with bone and may
    # cost part of the outermost ring of brain voxels (a ring is ~6 % of this brain).
    assert not np.any(mask & ~brain)
    assert mask.sum() > 0.93 * brain.sum()
    assert mask[ventricle].all()  # ventricles are inside unless CSF is excluded


def test_mask_excludes_csf_on_request(rng):
    vol, brain, ventricle = _head(rng)
    mask = brain_mask(vol, spacing=(5.0, 1.0, 1.0), exclude_csf=True)
    # The ventricle's rim is blurred with brain by the 1.5 mm smoothing, so only the part more
    # than 2 voxels inside it must be gone, all of it.
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    inner = ndimage.binary_erosion(ventricle, structure=plane, iterations=2)
    assert inner.any() and not mask[inner].any()
    assert mask.sum() > 0.85 * (brain & ~ventricle).sum()


def test_mask_from_series_uses_temporal_mean_and_spacing(rng):
    vol, brain, _ = _head(rng, noise=0.0)
    hu = np.repeat(vol[None], 5, axis=0) + 8 * rng.standard_normal((5, *vol.shape))
    series = CTPSeries(hu=hu.astype(np.float32), times=np.arange(5.0),
                       affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    mask = brain_mask(series)
    assert mask.dtype == bool and mask.shape == vol.shape
    assert not np.any(mask & ~brain)
    assert mask.sum() > 0.93 * brain.sum()  # same reason as above


def test_mask_rejects_bad_input():
    with pytest.raises(ValidationError, match="shape"):
        brain_mask(np.zeros((4, 4)))
    with pytest.raises(ValidationError, match="NaN"):
        brain_mask(np.full((2, 4, 4), np.nan))
    assert not brain_mask(np.full((2, 8, 8), -1000.0)).any()


def test_near_bone_margin_is_voxels_plus_mm():
    from ctperf.masks import near_bone

    vol = np.zeros((2, 5, 40), dtype=np.float32)
    vol[:, :, :10] = 1200.0  # bone in columns 0-9
    # 0.5 mm voxels: margin 1 voxel + 2 mm = 2.5 mm = 5 columns beyond the bone
    mask = near_bone(vol, spacing=(5.0, 0.5, 0.5))
    assert mask[:, :, :15].all() and not mask[:, :, 15:].any()
    # 2 mm voxels: 2 mm + 2 mm = 4 mm = 2 columns
    mask = near_bone(vol, spacing=(5.0, 2.0, 2.0))
    assert mask[:, :, :12].all() and not mask[:, :, 12:].any()
    assert not near_bone(np.full((1, 4, 4), 40.0)).any()


def test_tissue_csf_midpoint_finds_sulci_the_smoothed_threshold_keeps(rng):
    from ctperf.masks import csf_mask, tissue_csf_midpoint

    vol, brain, ventricle = _head(rng, noise=1.5)  # 1.5 HU: a temporal mean of 89 frames
    sulci = brain & ~ventricle & (np.arange(96)[None, None, :] % 8 == 0)  # 1 mm wide
    vol[sulci] = 8.0 + 1.5 * rng.standard_normal(int(sulci.sum()))
    whole = brain_mask(vol, spacing=(5.0, 1.0, 1.0))
    csf = csf_mask(vol, spacing=(5.0, 1.0, 1.0))
    assert not csf[sulci].any()  # smoothed with their 35 HU neighbours, sulci stay above 15 HU
    cut = tissue_csf_midpoint(vol, whole, csf)
    assert cut == pytest.approx(0.5 * (8.0 + 35.0), abs=1.0)  # the two medians' midpoint
    inside = whole & sulci
    assert (vol[inside] < cut).all() and (vol[whole & brain & ~ventricle & ~sulci] >= cut).all()
    # no CSF the smoothed threshold finds (a slab over the vertex, its thin CSF rim lifted by
    # the smoothing): CSF's nominal level, so that the rim is still left out
    from ctperf.masks import NOMINAL_CSF_HU

    assert tissue_csf_midpoint(vol, whole, np.zeros_like(csf)) == pytest.approx(
        0.5 * (NOMINAL_CSF_HU + 35.0), abs=1.0)
    # nothing to tell apart: tissue as dark as CSF
    assert tissue_csf_midpoint(np.full_like(vol, 12.0), whole, np.zeros_like(csf)) is None


def test_tissue_csf_midpoint_takes_csf_at_most_at_its_threshold(rng):
    from ctperf.masks import csf_mask, tissue_csf_midpoint

    vol, _brain, ventricle = _head(rng, noise=1.5)
    whole = brain_mask(vol, spacing=(5.0, 1.0, 1.0))
    csf = csf_mask(vol, spacing=(5.0, 1.0, 1.0))
    # the ventricle's temporal mean lifted to 22 HU (a filter's bleed of tissue enhancement):
    # read as the CSF's level it would put the cut at 28.5 HU, into white matter (26-30 HU)
    lifted = vol.copy()
    lifted[ventricle] += 14.0
    assert tissue_csf_midpoint(lifted, whole, csf) == pytest.approx(0.5 * (15.0 + 35.0), abs=1.0)


@pytest.mark.parametrize("offset", [-150.0, -80.0, -24.0, -16.0, 0.0, 16.0, 24.0, 60.0])
def test_hu_offset_reads_a_shifted_scale_from_the_brain_and_air(rng, offset):
    from ctperf.masks import hu_offset

    vol, _, _ = _head(rng)
    level, found = hu_offset(vol + offset, spacing=(5.0, 1.0, 1.0))
    # the brain's median is its 35 HU (the ventricle is 3 % of it) plus the offset; 3 HU of
    # noise move a median of ~20,000 voxels by hundredths
    assert level == pytest.approx(35.0 + offset, abs=0.5)
    # a calibrated head is left alone; a shifted one is moved back by what its air reads (at
    # -150 HU the brain, at -115 HU, is found where the air says the scale lies)
    assert found == pytest.approx(offset, abs=0.1)


def test_hu_offset_leaves_a_dark_brain_on_a_calibrated_scale_alone(rng):
    """A brain darker than 18 HU (much CSF: severe atrophy) whose air reads -1000 HU is an
    unusual brain, not a shifted scale: moving it would put its CSF back into the brain."""
    from ctperf.masks import hu_offset

    vol, brain, _ = _head(rng)
    vol[brain] -= 20.0  # 15 HU
    level, found = hu_offset(vol, spacing=(5.0, 1.0, 1.0))
    assert level == pytest.approx(15.0, abs=0.5) and found == 0.0


@pytest.mark.parametrize("brain_hu, air_hu", [(32.0, -990.0), (37.0, -991.0), (40.0, -990.0),
                                               (24.0, -1009.0), (22.0, -1010.0),
                                               (45.0, -1000.0)])
def test_hu_offset_leaves_calibrated_scans_with_air_a_little_off_alone(rng, brain_hu, air_hu):
    """Offsets of +-16 HU keep a 35 HU brain inside 18-50 HU, and had been left in
    place (above: now read from the air, which the brain follows). A calibrated scan's air
    9-10 HU off beside an 80 kV brain at 37-40 HU or a child's at 22-24 HU is no offset: a
    first rule took it for one (a review's study: core -7 % with air at -991 HU instead of
    -1000)."""
    from ctperf.masks import hu_offset

    vol, brain, _ = _head(rng)
    vol[brain] += brain_hu - 35.0
    vol[vol < -500] += air_hu + 1000.0
    level, found = hu_offset(vol, spacing=(5.0, 1.0, 1.0))
    assert level == pytest.approx(brain_hu, abs=0.5) and found == 0.0


def test_hu_offset_without_air_takes_the_nominal_brain_and_ignores_padding(rng):
    from ctperf.masks import NOMINAL_PARENCHYMA_HU, air_level, hu_offset

    vol, _, _ = _head(rng)
    outside = vol < -500
    # padding at -1024 outside a circle, as scanners store it, is not air: still -24 found
    padded = vol - 24.0
    _, y, x = np.mgrid[0:4, 0:96, 0:96]
    padded[np.hypot(y - 48, x - 48) > 44] = -1024.0
    assert air_level(padded) == pytest.approx(-1024.0, abs=0.2)
    assert hu_offset(padded, spacing=(5.0, 1.0, 1.0))[1] == pytest.approx(-24.0, abs=0.1)
    # no air at all (only padding outside the head): the brain's own median decides
    shifted = vol - 24.0
    shifted[outside] = -3024.0
    assert air_level(shifted) is None
    level, found = hu_offset(shifted, spacing=(5.0, 1.0, 1.0))
    assert found == pytest.approx(level - NOMINAL_PARENCHYMA_HU)


def test_hu_offset_without_a_head_in_hu_is_none(rng):
    from ctperf.masks import hu_offset

    assert hu_offset(np.full((2, 32, 32), -1000.0, dtype=np.float32)) == (None, 0.0)
    # enhancement alone (no air, no bone) is no head on a shifted scale: left to be refused
    noise = (3.0 * rng.standard_normal((4, 96, 96))).astype(np.float32)
    assert hu_offset(noise) == (None, 0.0)


def test_hyperdense_mask_finds_blood_but_not_a_calcified_falx_or_bone(rng):
    """On 1.8 mm pixels: a 70 HU region of 13 mL (a haemorrhage) is found; a calcified falx
    (a 3.6 mm band at 250 HU, which the smoothing spread into 6.2 mL of false haemorrhage
    before what is denser than 120 HU was kept out of it), the brain beside the skull and a
    0.6 mL piece at 70 HU are not; blood at 55 HU is not told from grey matter (left
    unflagged, as documented)."""
    from ctperf.masks import hyperdense_mask

    vol, brain, ventricle = _head(rng, noise=1.5)
    sp = (5.0, 1.8, 1.8)
    _, y, x = np.mgrid[0:4, 0:96, 0:96].astype(float)
    blood = brain & (np.hypot(y - 40, x - 62) < 8)
    small = brain & (np.hypot(y - 70, x - 40) < 2.5) & (np.arange(4)[:, None, None] < 2)
    falx = brain & ~ventricle & (np.abs(x - 47.5) < 1) & (np.abs(y - 48) > 10)
    vol[blood], vol[small], vol[falx] = 70.0, 70.0, 250.0
    mask = brain_mask(vol, spacing=sp)
    dense = hyperdense_mask(vol, mask, spacing=sp)
    ml = sp[0] * sp[1] * sp[2] / 1000
    assert blood.sum() * ml > 10.0 and small.sum() * ml < 1.0
    # the region with its rim, where the smoothing mixes it with 35 HU brain (only 60 % of it
    # before the rim was taken, and a 62-70 HU haemorrhage's rim read as 1-3 mL of core),
    # and nothing further than the rim's 3 mm: not the falx, not the small piece
    assert (dense & blood).sum() == blood.sum()
    beside = ndimage.distance_transform_edt(~blood, sampling=(1e6, 1.8, 1.8))
    assert not (dense & (beside > 3.0)).any()
    vol[blood] = 55.0
    assert not hyperdense_mask(vol, mask, spacing=sp).any()


def test_brain_cut_by_the_field_of_view_is_not_taken_for_csf(rng):
    """The field of view cutting the head (padding at -1024 HU straight against the brain,
    the skull elsewhere): the padding averaged into the CSF's smoothing had taken the brain
    within about 3 mm of it for CSF, and its lesions with it (a probe's core 3.6 mL for 8.2).
    Noisy air keeps its part in the smoothing (it cuts the scalp of a whole head)."""
    from ctperf.masks import csf_mask

    vol, brain, _ = _head(rng)
    vol[:, :, 78:] = -1024.0  # the cut, 6 voxels into the brain on one side
    padding = np.zeros(vol.shape, bool)
    padding[:, :, 78:] = True
    edge = brain[:, :, 74:78]  # the brain's last 4 mm before the cut
    assert csf_mask(vol, spacing=(5.0, 1.0, 1.0))[:, :, 74:78][edge].any()  # as before
    csf = csf_mask(vol, spacing=(5.0, 1.0, 1.0), padding=padding)
    assert not csf[:, :, 74:78][edge].any()
    assert csf[:, :, 78:].all()  # the padding is still no brain
    # elsewhere the same mask: the ventricle still CSF, nothing else moved
    plain = csf_mask(vol, spacing=(5.0, 1.0, 1.0))
    assert np.array_equal(csf[:, :, :70], plain[:, :, :70])
