"""Preprocessing as in the paper: rigid motion correction, joint bilateral filtering, brain mask."""

from ctperf.preprocess.registration import MotionResult, correct_motion, frame_displacement

__all__ = ["MotionResult", "correct_motion", "frame_displacement"]
