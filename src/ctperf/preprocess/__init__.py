"""Preprocessing as in the paper: rigid motion correction, joint bilateral filtering, brain mask."""

from ctperf.masks import brain_mask, csf_mask, near_bone
from ctperf.preprocess.bilateral import SLAB_BUDGET, bilateral_filter, joint_bilateral
from ctperf.preprocess.pipeline import PreprocessResult, preprocess
from ctperf.preprocess.registration import MotionResult, correct_motion
from ctperf.preprocess.transforms import apply_transforms, frame_displacement

__all__ = [
    "SLAB_BUDGET",
    "MotionResult",
    "PreprocessResult",
    "apply_transforms",
    "bilateral_filter",
    "brain_mask",
    "correct_motion",
    "csf_mask",
    "frame_displacement",
    "joint_bilateral",
    "near_bone",
    "preprocess",
]
