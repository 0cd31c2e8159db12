"""ctperf: CT perfusion maps for acute ischemic stroke.

Model-based maps (box-model NLR, SVD family), the U-Net of Gava et al. 2023
(doi:10.3389/fninf.2023.852105), a digital phantom with known truth and evaluation of lesion
agreement.
"""

from ctperf.errors import CTPerfError, InputError, ValidationError
from ctperf.types import MAP_NAMES, MAP_UNITS, CTPSeries, PerfusionMaps

__version__ = "0.1.0"

__all__ = [
    "MAP_NAMES",
    "MAP_UNITS",
    "CTPSeries",
    "CTPerfError",
    "InputError",
    "PerfusionMaps",
    "ValidationError",
    "__version__",
]
