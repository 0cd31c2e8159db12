"""Model-based CT perfusion: box-model NLR (the paper's ground truth), SVD deconvolution, a
Bayesian estimator with uncertainty, automatic AIF/VOF, lesion volumes and QC flags. NumPy and
SciPy only (no torch)."""

from ctperf.lesion_options import THRESHOLDS_ONLY, LesionOptions
from ctperf.perfusion.aif import (
    VesselCurve,
    VofCheck,
    assess_vof,
    correct_partial_volume,
    curve_features,
    curve_noise_sd,
    select_aif,
    select_vof,
    tissue_peak_time,
)
from ctperf.perfusion.bayes import BayesFit, fit_bayes
from ctperf.perfusion.boxnlr import DEFAULT_BOUNDS, BoxFit, fit_box_nlr
from ctperf.perfusion.curvefit import (
    CURVE_FLAGS,
    CURVE_PARAMETERS,
    CurveFit,
    curve_flags,
    fit_curves,
)
from ctperf.perfusion.curves import (
    ArterialTable,
    bandlimit,
    bolus_arrival_frame,
    box_model,
    check_bolus_present,
    check_bolus_start,
    flow_scale,
    on_frame_times,
    resample,
    time_to_peak,
    to_enhancement,
    uniform_grid,
)
from ctperf.perfusion.lesions import (
    LesionResult,
    MidPlane,
    left_right_angle,
    midsagittal_plane,
    normal_cbf_reference,
    segment_lesions,
)
from ctperf.perfusion.maps import METHODS, SD_MAPS, PerfusionResult, compute_maps, run_perfusion
from ctperf.perfusion.qc import qc_flags
from ctperf.perfusion.svd import SVDResult, svd_deconvolve

__all__ = [
    "CURVE_FLAGS",
    "CURVE_PARAMETERS",
    "DEFAULT_BOUNDS",
    "METHODS",
    "SD_MAPS",
    "THRESHOLDS_ONLY",
    "ArterialTable",
    "BayesFit",
    "BoxFit",
    "CurveFit",
    "LesionOptions",
    "LesionResult",
    "MidPlane",
    "PerfusionResult",
    "SVDResult",
    "VesselCurve",
    "VofCheck",
    "assess_vof",
    "bandlimit",
    "bolus_arrival_frame",
    "box_model",
    "check_bolus_present",
    "check_bolus_start",
    "compute_maps",
    "correct_partial_volume",
    "curve_features",
    "curve_flags",
    "curve_noise_sd",
    "fit_bayes",
    "fit_box_nlr",
    "fit_curves",
    "flow_scale",
    "left_right_angle",
    "midsagittal_plane",
    "normal_cbf_reference",
    "on_frame_times",
    "qc_flags",
    "resample",
    "run_perfusion",
    "segment_lesions",
    "select_aif",
    "select_vof",
    "svd_deconvolve",
    "time_to_peak",
    "tissue_peak_time",
    "to_enhancement",
    "uniform_grid",
]
