"""The bilateral filter's limits, apart from :mod:`ctperf.preprocess` (which checks them) so that
the CLI can take them without importing SciPy, as :mod:`ctperf.lesion_options` does."""

from __future__ import annotations

__all__ = ["MAX_RANGE_SIGMA_HU", "MAX_SPATIAL_SIGMA_MM"]

#: The widest filter: a spatial sigma of 20 mm (the paper's 3 mm) and a range sigma of 500 HU
#: (its 20 HU), beyond which the filter is a blur of the whole head.
MAX_SPATIAL_SIGMA_MM = 20.0
MAX_RANGE_SIGMA_HU = 500.0
