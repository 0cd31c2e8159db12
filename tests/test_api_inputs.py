"""The Python API under the arrays users pass: masks of numbers, NaN, times in the wrong
unit, read-only studies. Each case had failed deep in numpy, run for minutes, or returned a
wrong number silently."""

from __future__ import annotations

import numpy as np
import pytest

from ctperf.errors import ValidationError
from ctperf.evaluation import ssim
from ctperf.perfusion import fit_box_nlr, fit_curves, segment_lesions, svd_deconvolve
from ctperf.perfusion.bayes import fit_bayes
from ctperf.preprocess import bilateral_filter
from ctperf.types import CTPSeries, PerfusionMaps
from test_bayes import KH, RHO, TIMES, _aif, tissue

FITS = {
    "bayes": lambda y, a, t: fit_bayes(y, a, t, rho=RHO, kh=KH, spatial=False),
    "nlr-fast": lambda y, a, t: fit_box_nlr(y, a, t, method="nlr-fast", rho=RHO, kh=KH),
    "bsvd": lambda y, a, t: svd_deconvolve(y, a, t, method="bsvd", rho=RHO, kh=KH),
}


@pytest.fixture(scope="module")
def curves():
    y = np.stack([tissue("exponential", cbf, 4.0, 1.0) for cbf in (20.0, 40.0, 60.0)], axis=1)
    return y, _aif(TIMES)


@pytest.mark.parametrize("name", sorted(FITS))
def test_times_in_the_wrong_unit_or_order_are_refused(curves, name):
    """Times in milliseconds: bayes had run for minutes on gigabytes, the box and SVD fits
    returned CBF a thousand times low; decreasing times had read "the AIF has no positive
    area"."""
    y, aif = curves
    with pytest.raises(ValidationError, match=r"milliseconds read as seconds\?"):
        FITS[name](y, aif, TIMES * 1000.0)
    backwards = TIMES.copy()
    backwards[5], backwards[6] = backwards[6], backwards[5]
    with pytest.raises(ValidationError, match="times must be strictly increasing; frame 6"):
        FITS[name](y, aif, backwards)


@pytest.mark.parametrize("name", sorted(FITS))
def test_nan_in_the_aif_is_named(curves, name):
    """NaN in the AIF had ended bayes in an IndexError from numpy."""
    y, aif = curves
    bad = aif.copy()
    bad[20] = np.nan
    with pytest.raises(ValidationError, match=r"aif contains NaN or Inf \(frames \[20\]\)"):
        FITS[name](y, bad, TIMES)


def test_bayes_gives_no_values_for_a_curve_with_nan(curves, caplog):
    """A tissue curve with a NaN gets NaN, as the box and SVD fits give it, and the others
    their values: bayes had read it as 0 HU there (CBF 43 % low for a NaN on the peak),
    silently."""
    y, aif = curves
    want = fit_bayes(y, aif, TIMES, rho=RHO, kh=KH, spatial=False, noise_sd=1.0)
    holed = y.copy()
    holed[int(np.argmax(y[:, 1])), 1] = np.nan
    got = fit_bayes(holed, aif, TIMES, rho=RHO, kh=KH, spatial=False, noise_sd=1.0)
    assert np.isnan(got.cbf[1]) and np.isnan(got.cbv_sd[1]) and np.isnan(got.residual[1])
    np.testing.assert_array_equal(got.cbf[[0, 2]], want.cbf[[0, 2]])
    assert "1 of 3 tissue curves hold NaN or Inf" in caplog.text
    box = fit_box_nlr(holed, aif, TIMES, method="nlr-fast", rho=RHO, kh=KH)
    assert np.isnan(box.cbf[1])


def test_lesion_masks_of_numbers_and_wrong_shapes(rng):
    """segment_lesions takes a 0/1 brain or exclude mask of numbers as the bool one (uint8
    had raised numpy's UFuncTypeError, float "ufunc 'invert' not supported"); an exclude
    mask of (Y, X) had been applied to every slice silently: refused."""
    shape = (2, 24, 24)
    tmax = np.where(np.arange(24) < 8, 9.0, 2.0)[None, None, :] * np.ones(shape)
    cbf = 40.0 + rng.normal(0, 1, shape)
    maps = PerfusionMaps(maps={"cbf": cbf, "tmax": tmax}, affine=np.diag([2.0, 2.0, 5.0, 1.0]))
    brain = np.zeros(shape, bool)
    brain[:, 2:22, 2:22] = True
    want = segment_lesions(maps, brain=brain)
    for dtype in (np.uint8, np.float32):
        got = segment_lesions(maps, brain=brain.astype(dtype),
                              exclude=np.zeros(shape, dtype=dtype))
        np.testing.assert_array_equal(got.hypoperfused, want.hypoperfused)
    with pytest.raises(ValidationError, match=r"exclude mask shape \(24, 24\) differs"):
        segment_lesions(maps, brain=brain, exclude=np.zeros((24, 24), bool))
    with pytest.raises(ValidationError, match=r"mask shape \(24, 24\) differs from map"):
        ssim(cbf, cbf, mask=brain[0])


def test_read_only_study_filtered_in_place_is_refused(rng):
    """in_place=True on a read-only study (a memmap opened "r") had raised numpy's
    "assignment destination is read-only"; a copy is filtered as before."""
    hu = rng.normal(30.0, 5.0, (12, 2, 16, 16)).astype(np.float32)
    hu.flags.writeable = False
    series = CTPSeries(hu=hu, times=np.arange(12.0), affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    with pytest.raises(ValidationError, match="in_place=True needs a writeable study"):
        bilateral_filter(series, in_place=True, workers=1)
    assert bilateral_filter(series, workers=1).hu.shape == hu.shape


def test_nan_in_a_study_built_in_python_says_how_to_make_it_air():
    hu = np.full((12, 1, 4, 4), 30.0, np.float32)
    hu[:, :, 0, 0] = np.nan
    with pytest.raises(ValidationError, match=r"\(12 of 192\).*nan_to_num\(hu, nan=-1024"):
        CTPSeries(hu=hu, times=np.arange(12.0))


def test_a_grid_finer_than_a_scan_is_no_unit_error(curves):
    """The fits take a simulation's fine grid (0.05 s), and the grid they resample uneven
    frames onto: the time check had refused a study with one frame 0.05 s after another as
    "minutes read as seconds?" (its resampling grid, 0.075 s apart)."""
    y, aif = curves
    fine = np.arange(0.0, TIMES[-1] + 1e-9, 0.05)
    y_fine = np.stack([np.interp(fine, TIMES, c) for c in y.T], axis=1)
    for name in ("nlr-fast", "bsvd"):
        coarse, dense = (FITS[name](yy, np.interp(tt, TIMES, aif), tt).cbf
                         for yy, tt in ((y, TIMES), (y_fine, fine)))
        # the same curves, linearly interpolated: the fits agree within a few percent
        np.testing.assert_allclose(dense, coarse, rtol=0.05)


def test_bayes_with_inf_and_the_spatial_prior(curves):
    """+Inf in one curve, with the spatial prior on: that voxel gets NaN and the fit ends
    (nan_to_num had made it 3.4e38 and the posterior ended in an IndexError)."""
    y, aif = curves
    many = np.repeat(y, 6, axis=1)[:, :16]
    many[30, 5] = np.inf
    mask = np.ones((1, 4, 4), dtype=bool)
    fit = fit_bayes(many, aif, TIMES, rho=RHO, kh=KH, mask=mask, spacing=(5.0, 2.0, 2.0))
    assert np.isnan(fit.cbf[5])
    assert np.isfinite(np.delete(fit.cbf, 5)).all()


@pytest.mark.parametrize("dtype", [np.complex64, bool, "U4"])
def test_a_study_of_other_than_real_numbers_is_refused(dtype):
    """Complex values had lost their imaginary part with only numpy's warning, booleans and
    numeric strings had been cast without a word."""
    hu = np.zeros((5, 1, 2, 2)).astype(dtype)
    with pytest.raises(ValidationError, match="hu must hold real numbers"):
        CTPSeries(hu=hu, times=np.arange(5.0), affine=np.eye(4))
    CTPSeries(hu=np.zeros((5, 1, 2, 2), np.int16), times=np.arange(5.0), affine=np.eye(4))
    # numbers held as objects are numbers; a complex one among them is not
    ints = np.zeros((5, 1, 2, 2), dtype=object)
    CTPSeries(hu=ints + 30, times=np.arange(5.0), affine=np.eye(4))
    from decimal import Decimal
    from fractions import Fraction

    for real in (Decimal("30.5"), Fraction(61, 2)):  # pydicom's DSdecimal, SQL numerics
        held = np.full((5, 1, 2, 2), real, dtype=object)
        assert CTPSeries(hu=held, times=np.arange(5.0), affine=np.eye(4)).hu[0, 0, 0, 0] == 30.5
    mixed = [np.full((5, 1, 2, 2), Decimal("30.5"), dtype=object) for _ in range(3)]
    mixed[0][0, 0, 0, 0], mixed[1][0, 0, 0, 0], mixed[2][0, 0, 0, 0] = True, "40", b"40"
    for held in mixed:  # a bool, text or bytes beside Decimals: no number
        with pytest.raises(ValidationError, match="hu must hold real numbers"):
            CTPSeries(hu=held, times=np.arange(5.0), affine=np.eye(4))
    for odd in (1j, None, True, "40", 10**400):  # bools and text as objects too
        held = np.full((5, 1, 2, 2), odd, dtype=object)
        with pytest.raises(ValidationError, match="hu must hold real numbers"):
            CTPSeries(hu=held, times=np.arange(5.0), affine=np.eye(4))


def test_a_masked_study_is_refused_and_an_unmasked_one_read():
    """np.asarray drops a masked array's mask: its hidden values (a reader's fill, garbage) had
    been read as CT numbers without a word."""
    hu = np.ma.masked_array(np.full((5, 1, 2, 2), 30.0), mask=False)
    hu[:, 0, 0, 0] = np.ma.masked
    with pytest.raises(ValidationError, match=r"masked array with 5 masked values.*filled"):
        CTPSeries(hu=hu, times=np.arange(5.0))
    whole = np.ma.masked_array(np.full((5, 1, 2, 2), 30.0), mask=False)
    assert CTPSeries(hu=whole, times=np.arange(5.0)).hu.dtype == np.float32
    times = np.ma.masked_array(np.arange(5.0), mask=[0, 0, 1, 0, 0])
    with pytest.raises(ValidationError, match="times is a masked array with 1 masked value"):
        CTPSeries(hu=whole, times=times)
    stamps = np.ma.masked_array(np.zeros((5, 1)), mask=False)
    stamps[2, 0] = np.ma.masked
    with pytest.raises(ValidationError, match="slice_times is a masked array with 1 masked"):
        CTPSeries(hu=whole, times=np.arange(5.0), slice_times=stamps)
    # a map's masked voxel has no value: NaN, as ctperf writes it
    cbf = np.ma.masked_array(np.full((1, 2, 2), 40.0), mask=[[[0, 1], [0, 0]]])
    cbf.data[0, 0, 1] = -50000.0
    got = PerfusionMaps(maps={"cbf": cbf}, affine=np.eye(4))["cbf"]
    assert np.isnan(got[0, 0, 1]) and np.all(got[~np.isnan(got)] == 40.0)


def test_masked_curves_are_refused(curves):
    """fit_curves had read a masked tissue sample's hidden 1e4 (CBF 22302 for that curve)."""
    tissue, aif = curves
    t = TIMES
    hidden = np.ma.masked_array(tissue, mask=False)
    hidden[10, 0] = np.ma.masked
    with pytest.raises(ValidationError, match="tissue is a masked array with 1 masked value"):
        fit_curves(hidden, aif, t)
    fine = fit_curves(np.ma.masked_array(tissue, mask=False), aif, t)
    np.testing.assert_array_equal(fine.cbf, fit_curves(tissue, aif, t).cbf)


def test_a_masked_aif_or_reference_is_refused(curves):
    """A masked AIF given to the maps or a masked normal-CBF reference had its hidden values
    read (a reference hiding 1e6: core 99.8 mL for 39.8)."""
    from ctperf.perfusion.curves import finite_aif

    _, aif = curves
    hidden = np.ma.masked_array(aif, mask=False)
    hidden[5] = np.ma.masked
    with pytest.raises(ValidationError, match="aif is a masked array with 1 masked value"):
        finite_aif(hidden, TIMES)
    maps = PerfusionMaps(maps={"cbf": np.full((1, 4, 4), 30.0), "tmax": np.full((1, 4, 4), 2.0)},
                         affine=np.eye(4))
    normal = np.ma.masked_array(np.full((1, 4, 4), 40.0), mask=False)
    normal[0, 0, 0] = np.ma.masked
    with pytest.raises(ValidationError, match="reference is a masked array"):
        segment_lesions(maps, reference=normal)
