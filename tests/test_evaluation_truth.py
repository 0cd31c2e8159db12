import numpy as np
import pytest

from ctperf import PerfusionMaps
from ctperf.evaluation.truth import compare_with_truth, truth_table_markdown


def test_compare_with_truth_regions_and_lesions(rng):
    shape = (2, 10, 10)
    affine = np.diag([0.5, 0.5, 4.0, 1.0])  # 1 uL voxels: 1000 voxels per mL
    true_cbf = rng.uniform(20, 70, shape)
    truth = PerfusionMaps(maps={"cbf": true_cbf, "cbv": true_cbf / 15}, affine=affine)
    est = PerfusionMaps(maps={"cbf": true_cbf + 5, "tmax": np.zeros(shape)}, affine=affine)
    left = np.zeros(shape, bool)
    left[:, :, :5] = True
    true_core = left.copy()
    est_core = np.zeros(shape, bool)
    est_core[:, :, :4] = True
    out = compare_with_truth(est, truth, regions={"brain": np.ones(shape, bool), "left": left},
                             lesions={"core": est_core}, true_lesions={"core": true_core})
    assert set(out["maps"]) == {"cbf"}  # cbv has no estimate, tmax no truth
    assert out["maps"]["cbf"]["left"]["n"] == 100
    assert out["maps"]["cbf"]["brain"]["bias"] == pytest.approx(5)
    core = out["lesions"]["core"]
    assert core["dice"] == pytest.approx(2 * 80 / (80 + 100))
    assert core["volume_ml"] == pytest.approx(0.080)
    assert core["volume_error_ml"] == pytest.approx(-0.020)
    table = truth_table_markdown(out)
    assert "| cbf | mL/100g/min |" in table and "| core | 0.89 |" in table


@pytest.mark.parametrize("method, scored", [("bsvd", False), ("nlr-fast", True)])
def test_an_svd_methods_delay_is_not_scored_as_an_arrival_delay(method, scored):
    """ctperf demo --method bsvd had scored bSVD's delay map (its Tmax) against the true
    arrival delay (a probe's MAE 3.46 s, bias +3.46 s), which ctperf evaluate leaves out."""
    shape = (1, 4, 4)
    truth = PerfusionMaps(maps={"delay": np.ones(shape), "tmax": np.full(shape, 3.0)},
                          affine=np.eye(4))
    est = PerfusionMaps(maps={"delay": np.full(shape, 3.0), "tmax": np.full(shape, 3.0)},
                        affine=np.eye(4), provenance={"method": method})
    out = compare_with_truth(est, truth, regions={"brain": np.ones(shape, bool)})
    assert ("delay" in out["maps"]) is scored and "tmax" in out["maps"]
    assert ("delay left out: bsvd's delay map is its Tmax" in truth_table_markdown(out)) \
        is not scored
