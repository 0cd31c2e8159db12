"""Shared fixtures: a seeded random generator and small synthetic studies."""

from __future__ import annotations

import numpy as np
import pytest

from ctperf.types import CTPSeries


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20231)


@pytest.fixture
def small_series(rng: np.random.Generator) -> CTPSeries:
    """A 12-frame, 3 x 16 x 20 study with 0.45 x 0.45 x 5 mm voxels, non-uniform times."""
    t, z, y, x = 12, 3, 16, 20
    hu = (30 + 5 * rng.standard_normal((t, z, y, x))).astype(np.float32)
    times = np.cumsum(np.r_[0.0, np.full(t - 1, 0.5) + 0.1 * (np.arange(t - 1) % 2)])
    affine = np.diag([0.45, 0.45, 5.0, 1.0])
    affine[:3, 3] = [-4.5, -3.6, 10.0]
    return CTPSeries(hu=hu, times=times, affine=affine,
                     meta={"series_uid": "1.2.3", "description": "test", "kvp": 80, "mas": 150})
