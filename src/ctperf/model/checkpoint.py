"""Checkpoint files: plain dicts of tensors, numbers, strings and lists, loadable with
``torch.load(weights_only=True)``, tagged with a format version that is checked on load."""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ctperf.errors import InputError
from ctperf.model.unet import UNet

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "build_model", "check_checkpoint",
           "load_checkpoint", "save_checkpoint", "weights_digest"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ctperf-unet"
CHECKPOINT_VERSION = 1
_MODEL_KEYS = ("in_frames", "out_channels", "width", "depth", "kernel_size", "norm")
# what prediction reads from a checkpoint's config besides the architecture
_CONFIG_KEYS = (*_MODEL_KEYS, "size", "frames", "frame_mode", "frame_interval", "hu_window",
                "hu_mean", "hu_std", "targets", "map_names", "windows", "reference")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` (with format tags added) atomically with :func:`torch.save`."""
    from ctperf.io import atomic_file
    from ctperf.versioning import software_version

    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "software_version": software_version(),
               # floating-point sums, so the weights, depend on it (a run repeats bit for bit
               # at one thread count)
               "torch_threads": torch.get_num_threads(), **state}
    if isinstance(state.get("model"), dict):
        payload["model_sha256"] = weights_digest(state["model"])
    with atomic_file(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer: "unexpected pos" on a full disk
            raise InputError(path, f"could not be written ({str(exc).splitlines()[0]}): a "
                                   "full disk?") from None
    return Path(path)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes, in name order: stored by
    :func:`save_checkpoint` and compared on loading, so that bytes damaged inside the tensors,
    which torch loads without complaint, are refused rather than predicted from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _refusal(exc: Exception) -> str:
    """Why torch refused a file, without torch's advice to load it unsafely."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds Python objects beyond tensors and plain data (it refers to "
                f"{found.group(1)}); ctperf never loads those, since unpickling them can run "
                "code from the file: use a checkpoint written by ctperf train")
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        # torch's message advises loading unsafely: keep only what it found
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = found.group(1).strip() if found else "unreadable pickle data"
        return f"not a loadable ctperf checkpoint ({reason})"
    first = text.splitlines()[0] if text else ""
    return f"not a loadable ctperf checkpoint ({type(exc).__name__}: {first})"


def check_checkpoint(ckpt: Any, source: str | Path) -> None:
    """Check a loaded checkpoint's format, config and weights; InputError names ``source``.

    The weights must match, name for name and shape for shape, the U-Net that the config
    describes (built on the meta device, so nothing is allocated).
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(source, f"not a ctperf U-Net checkpoint (expected format "
                                 f"{CHECKPOINT_FORMAT!r})")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise InputError(source, f"checkpoint format version {ckpt.get('format_version')} "
                                 f"(written by ctperf {ckpt.get('software_version')}), this "
                                 f"ctperf reads version {CHECKPOINT_VERSION}; retrain with this "
                                 "version")
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise InputError(source, "checkpoint has no config (the model's architecture and "
                                 "input settings); it was not written by ctperf train")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise InputError(source, f"checkpoint config lacks {', '.join(missing)}")
    for key in ("in_frames", "out_channels", "width", "depth", "kernel_size", "size", "frames"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(source, f"checkpoint config {key} must be a positive integer, got "
                                     f"{value!r}")
    _check_outputs(config, source)
    weights = ckpt.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                 for v in weights.values()):
        raise InputError(source, "checkpoint has no model weights (a dict of tensors)")
    stored = ckpt.get("model_sha256")  # checkpoints written before it have none
    if stored is not None and stored != weights_digest(weights):
        raise InputError(source, "the weights' bytes differ from the digest stored when the "
                                 "checkpoint was written: the file is damaged; use another "
                                 "copy, or train again")
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        raise InputError(source, "weights hold NaN or infinite values (a training that "
                                 "diverged, or a damaged file)")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    except Exception as exc:  # a config no U-Net can be built from
        raise InputError(source, f"checkpoint config describes no valid U-Net ({exc})") from None
    have = {k: tuple(v.shape) for k, v in weights.items()}
    absent, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if absent or extra:
        raise InputError(source, f"weights do not match the U-Net of its config: missing "
                                 f"{absent[:3]}, unexpected {extra[:3]}")
    wrong = [k for k in expected if expected[k] != have[k]]
    if wrong:
        k = wrong[0]
        raise InputError(source, f"weights do not match the U-Net of its config: {k} has shape "
                                 f"{list(have[k])}, the architecture needs {list(expected[k])} "
                                 f"({len(wrong)} tensors differ)")


def _check_outputs(config: dict[str, Any], source: str | Path) -> None:
    """The config's ``targets`` and ``map_names``: one of each per output channel, the names
    those of ctperf's maps (they name the files written: a name holding a path had written
    outside the output folder)."""
    from ctperf.types import MAP_NAMES

    targets, names = config["targets"], config["map_names"]
    if not (isinstance(targets, list | tuple) and isinstance(names, list | tuple)
            and len(targets) == len(names) == config["out_channels"]):
        raise InputError(source, f"checkpoint config needs one target and one map name per "
                                 f"output channel ({config['out_channels']}), got targets "
                                 f"{targets!r} and map_names {names!r}")
    strange = [n for n in names if n not in MAP_NAMES]
    if strange:
        raise InputError(source, f"checkpoint config map_names {strange!r} are not maps "
                                 f"ctperf writes ({', '.join(MAP_NAMES)})")


def load_checkpoint(path: str | Path, *, frames: int | None = None,
                    size: int | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format, config, weights
    and input shape.

    Parameters
    ----------
    path : path
        A ``.pt`` file written by :func:`save_checkpoint`.
    frames, size : int, optional
        Expected input frames t and slice size; a different checkpoint raises
        :class:`ctperf.errors.InputError`.

    Raises
    ------
    ctperf.errors.InputError
        Naming the file: not a ctperf checkpoint, pickled objects beyond tensors (never
        loaded), missing config, or weights that do not fit the architecture.
    """
    p = Path(path)
    if p.is_dir():
        inside = [n for n in ("model.pt", "best.pt", "last.pt") if (p / n).is_file()]
        hint = f" (it holds {', '.join(inside)}: give {p / inside[0]})" if inside else ""
        raise InputError(p, f"is a folder, not a checkpoint file{hint}")
    if not p.is_file():
        raise InputError(p, "no such checkpoint file")
    try:
        with warnings.catch_warnings():  # the refusal below says it in one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or damaged files
        raise InputError(p, _refusal(exc)) from None
    check_checkpoint(ckpt, p)
    config = ckpt["config"]
    if frames is not None and config["frames"] != frames:
        raise InputError(p, f"the model takes {config['frames']} frames, {frames} were asked for")
    if size is not None and config["size"] != size:
        raise InputError(p, f"the model was trained on {config['size']} x {config['size']} "
                            f"slices, the input is {size} x {size}; resample the study or "
                            f"train at this size")
    return ckpt


def build_model(config: Mapping[str, Any], *, seed: int | None = None) -> UNet:
    """A :class:`UNet` with the architecture recorded in a checkpoint's ``config``, on the CPU;
    its initial weights drawn from ``seed`` (None: from a copy of the current random state).
    The caller's random state is left as it was (a library call that trains or predicts does
    not reseed the program it runs in)."""
    optional = {k: config[k] for k in ("baseline_frames", "contrast_gain", "enhancement_quantile")
                if k in config}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(int(seed))
        return UNet(config["in_frames"], **{k: config[k] for k in _MODEL_KEYS[1:]}, **optional)
