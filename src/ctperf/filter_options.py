"""The bilateral filter's limits, apart from :mod:`ctperf.preprocess` (which checks them) so that
the CLI can take them without importing SciPy, as :mod:`ctperf.lesion_options` does."""

from __future__ import annotations

__all__ = ["FILTER_WEIGHTS", "MAX_RANGE_SIGMA_HU", "MAX_SPATIAL_SIGMA_MM", "RANGE_SIGMA_HU",
           "SPATIAL_SIGMA_MM"]

#: The paper's filter, the command line's defaults: a spatial sigma of 3 mm, a range sigma of
#: 20 HU, and linear bilateral-grid weights.
SPATIAL_SIGMA_MM = 3.0
RANGE_SIGMA_HU = 20.0
FILTER_WEIGHTS = "linear"

#: The widest filter: a spatial sigma of 20 mm (the paper's 3 mm) and a range sigma of 500 HU
#: (its 20 HU), beyond which the filter is a blur of the whole head.
MAX_SPATIAL_SIGMA_MM = 20.0
MAX_RANGE_SIGMA_HU = 500.0
