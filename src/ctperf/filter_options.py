"""The bilateral filter's limits, apart from :mod:`ctperf.preprocess` (which checks them) so that
the CLI can take them without importing SciPy, as :mod:`ctperf.lesion_options` does."""

from __future__ import annotations

from ctperf.errors import ValidationError

__all__ = ["FILTER_WEIGHTS", "MAX_RANGE_SIGMA_HU", "MAX_SPATIAL_SIGMA_MM", "RANGE_SIGMA_HU",
           "SPATIAL_SIGMA_MM", "check_filter_settings", "filters_by_default"]

#: The paper's filter, the command line's defaults: a spatial sigma of 3 mm, a range sigma of
#: 20 HU, and linear bilateral-grid weights.
SPATIAL_SIGMA_MM = 3.0
RANGE_SIGMA_HU = 20.0
FILTER_WEIGHTS = "linear"

#: The widest filter: a spatial sigma of 20 mm (the paper's 3 mm) and a range sigma of 500 HU
#: (its 20 HU), beyond which the filter is a blur of the whole head.
MAX_SPATIAL_SIGMA_MM = 20.0
MAX_RANGE_SIGMA_HU = 500.0


def filters_by_default(method: str) -> bool:
    """Whether the pipeline filters a study for ``method`` unless told: the paper's bilateral
    filter for the box model and the SVD methods; not for ``bayes``, whose spatial prior pools
    neighbouring voxels itself and whose noise model takes each voxel's noise as independent
    of its neighbours', which the filter's averaging breaks (docs/bayes.md, "Filtered
    studies")."""
    return method != "bayes"


def check_filter_settings(filter: bool, *, spatial_sigma_mm: float, range_sigma_hu: float,
                          filter_weights: str, cli: bool = False) -> None:
    """Refuse filter settings other than the defaults while the filter is off: they would be
    ignored in silence. ``cli`` names them as the command line's options, else as keywords."""
    tuned = [name for name, value, default in (
        ("spatial_sigma_mm", spatial_sigma_mm, SPATIAL_SIGMA_MM),
        ("range_sigma_hu", range_sigma_hu, RANGE_SIGMA_HU),
        ("filter_weights", filter_weights, FILTER_WEIGHTS)) if value != default]
    if not tuned or filter:
        return
    if cli:
        tuned = ["--" + n.removesuffix("_mm").removesuffix("_hu").replace("_", "-")
                 for n in tuned]
    one = len(tuned) == 1
    raise ValidationError(f"{', '.join(tuned)} set{'s' if one else ''} the bilateral filter, "
                          f"which is off: {'give --filter' if cli else 'set filter=True'} too, "
                          f"or leave {'it' if one else 'them'} out")
