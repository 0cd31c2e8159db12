"""Evaluation of perfusion maps against a reference: voxel-wise errors and lesion agreement."""

from ctperf.evaluation.metrics import MapAgreement, dice, map_agreement, map_agreement_by_region

__all__ = ["MapAgreement", "dice", "map_agreement", "map_agreement_by_region"]
