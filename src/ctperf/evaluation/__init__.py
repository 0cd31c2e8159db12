"""Evaluation of perfusion maps against a reference: voxel-wise errors, image similarity, lesion
agreement (the statistics of Gava et al. 2023, Tables 1 and 2) and their CSV and JSON outputs.
The figures and the HTML report are drawn by :mod:`ctperf.reporting`."""

from ctperf.evaluation.agreement import (
    BlandAltman,
    DiceSummary,
    bland_altman,
    case_dice,
    coefficient_of_repeatability,
    friedman,
    icc1k,
    summarise_dice,
    volume_agreement,
)
from ctperf.evaluation.cohort import Reader, evaluate_readers, load_maps_cohort, load_rater
from ctperf.evaluation.metrics import (
    UNIT_WINDOWS,
    MapAgreement,
    dataset_range,
    dice,
    map_agreement,
    map_agreement_by_region,
    psnr,
    ssim,
    unit_mse,
)
from ctperf.evaluation.report import evaluate_cohorts

__all__ = [
    "UNIT_WINDOWS",
    "BlandAltman",
    "DiceSummary",
    "MapAgreement",
    "Reader",
    "bland_altman",
    "case_dice",
    "coefficient_of_repeatability",
    "dataset_range",
    "dice",
    "evaluate_cohorts",
    "evaluate_readers",
    "friedman",
    "icc1k",
    "load_maps_cohort",
    "load_rater",
    "map_agreement",
    "map_agreement_by_region",
    "psnr",
    "ssim",
    "summarise_dice",
    "unit_mse",
    "volume_agreement",
]
