"""Checkpoint files: plain dicts of tensors, numbers, strings and lists, loadable with
``torch.load(weights_only=True)``, tagged with a format version that is checked on load."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ctperf.errors import InputError
from ctperf.model.unet import UNet

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "build_model", "load_checkpoint",
           "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ctperf-unet"
CHECKPOINT_VERSION = 1
_MODEL_KEYS = ("in_frames", "out_channels", "width", "depth", "kernel_size", "norm")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` (with format tags added) atomically with :func:`torch.save`."""
    from ctperf import __version__
    from ctperf.io import atomic_file

    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "software_version": __version__, **state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, *, frames: int | None = None,
                    size: int | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format and input shape.

    Parameters
    ----------
    path : path
        A ``.pt`` file written by :func:`save_checkpoint`.
    frames, size : int, optional
        Expected input frames t and slice size; a different checkpoint raises
        :class:`ctperf.errors.InputError`.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise InputError(p, f"not a loadable ctperf checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(p, f"not a ctperf U-Net checkpoint (expected format "
                            f"{CHECKPOINT_FORMAT!r})")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise InputError(p, f"checkpoint format version {ckpt.get('format_version')} (written by "
                            f"ctperf {ckpt.get('software_version')}), this ctperf reads version "
                            f"{CHECKPOINT_VERSION}; retrain with this version")
    config = ckpt["config"]
    if frames is not None and config["frames"] != frames:
        raise InputError(p, f"the model takes {config['frames']} frames, {frames} were asked for")
    if size is not None and config["size"] != size:
        raise InputError(p, f"the model was trained on {config['size']} x {config['size']} "
                            f"slices, the input is {size} x {size}; resample the study or "
                            f"train at this size")
    return ckpt


def build_model(config: Mapping[str, Any]) -> UNet:
    """A :class:`UNet` with the architecture recorded in a checkpoint's ``config``."""
    return UNet(config["in_frames"], **{k: config[k] for k in _MODEL_KEYS[1:]})
