import numpy as np
import pytest

import ctperf
import ctperf.versioning
from ctperf import CTPSeries, PerfusionMaps, ValidationError


def test_series_validates_and_converts(small_series):
    assert small_series.hu.dtype == np.float32
    assert small_series.times.dtype == np.float64
    assert small_series.shape == (12, 3, 16, 20)
    assert small_series.spacing == pytest.approx((5.0, 0.45, 0.45))
    copy = small_series.replace(meta={"description": "other"})
    assert copy.meta["description"] == "other" and small_series.meta["description"] == "test"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hu": np.zeros((4, 5, 6))}, "must be 4D"),
        ({"times": np.arange(3.0)}, "must have shape"),
        ({"times": np.array([0, 1, 1, 2.0])}, "strictly increasing"),
        ({"hu": np.full((4, 1, 2, 2), np.nan)}, "NaN"),
        ({"affine": np.zeros((4, 4))}, "last row"),
        ({"slice_times": np.zeros((4, 2))}, "slice_times"),
    ],
)
def test_series_rejects_bad_input(kwargs, message):
    args = {"hu": np.zeros((4, 1, 2, 2)), "times": np.arange(4.0)} | kwargs
    with pytest.raises(ValidationError, match=message):
        CTPSeries(**args)


def test_maps_units_and_provenance():
    cbf = np.ones((2, 3, 4))
    maps = PerfusionMaps(maps={"cbf": cbf, "residual": cbf}, provenance={"method": "x"})
    assert maps.units == {"cbf": "mL/100g/min", "residual": "1"}
    assert maps.provenance["software_version"] == ctperf.versioning.software_version()
    assert maps["cbf"].dtype == np.float32
    with pytest.raises(ValidationError, match="share one shape"):
        PerfusionMaps(maps={"cbf": cbf, "cbv": np.ones((2, 3, 5))})
    with pytest.raises(ValidationError, match="Inf"):
        PerfusionMaps(maps={"cbf": np.full((1, 1, 1), np.inf)})
    with pytest.raises(ValidationError, match="float32's range"):  # finite in float64 only
        PerfusionMaps(maps={"cbf": np.full((1, 1, 1), 1e39)})
    with pytest.raises(KeyError, match="no map 'mtt'"):
        maps["mtt"]
