"""Training of the U-Net: masked MSE, Adam, ReduceLROnPlateau, a pretrain -> fine-tune schedule,
exact resume from per-epoch checkpoints, mixed precision on CUDA and DDP under ``torchrun``.

Determinism: the weights are initialised from ``seed``; each epoch's slice order comes from a
:class:`~torch.utils.data.DistributedSampler` seeded by ``seed`` and the global epoch number (also
with one process), and augmentation parameters from a numpy generator seeded the same way. A run
killed after epoch k and resumed from its ``last.pt`` therefore repeats the uninterrupted run's
arithmetic exactly on the same device and thread count.

At the start of each stage (pretraining at a small size, fine-tuning at the full size) the
optimiser and the plateau scheduler are created afresh with the initial learning rate.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ctperf.errors import InputError, ValidationError
from ctperf.model.augment import apply_augmentation, draw_augmentation
from ctperf.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from ctperf.model.data import SliceCache
from ctperf.model.normalise import TARGET_MAPS, TARGET_WINDOWS
from ctperf.model.unet import check_enhancement_quantile

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "evaluate_mse", "masked_mse", "preset",
           "resolve_device", "train"]

log = logging.getLogger(__name__)

#: Columns of ``log.csv``: ``train_loss`` is the training loss named by ``loss_function``
#: (``mse`` or ``l1``, TrainConfig.loss), ``val_loss`` always the MSE.
LOG_COLUMNS = ("epoch", "stage", "train_loss", "loss_function", "val_loss", "lr", "seconds")
# Settings that must match for a resumed run to be the same run.
_RESUME_KEYS = ("reference", "train_patients", "val_patients",
                "targets", "size", "frames", "width", "depth", "kernel_size", "norm", "seed",
                "batch_size", "lr", "masked_loss", "augment", "stages", "baseline_frames",
                "contrast_gain", "schedule", "augment_gain", "augment_degrees", "augment_noise",
                "enhancement_quantile", "cache_version", "loss", "augment_shift",
                "frame_mode", "frame_interval", "hu_mean", "hu_std")
# values of keys that checkpoints written before the key existed implicitly had
_KEY_DEFAULTS: dict[str, Any] = {"baseline_frames": 0, "contrast_gain": 1.0,
                                 "schedule": "plateau", "augment_gain": 0.0,
                                 "augment_degrees": 10.0, "augment_noise": 0.05,
                                 "enhancement_quantile": 0.0, "cache_version": 1, "loss": "mse",
                                 "augment_shift": 0, "frame_mode": "subsample",
                                 "frame_interval": None}
#: Maps measured from the arterial input's arrival: a study shifted in time keeps them, so
#: networks that learn only these train with :attr:`TrainConfig.augment_shift`.
SHIFT_TARGETS = frozenset({"tmax", "delay"})
_SCHEDULES = ("plateau", "cosine")
_LOSSES = ("mse", "l1")
_AMPS = ("auto", "none", "bf16", "fp16")
#: The most resolution levels a network may have: 8 halve a 512 px slice to 4 px (depth 50 had
#: asked for channels of 4 x 2^49 filters).
MAX_DEPTH = 8

@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run: slice caches, architecture, optimiser, schedule,
    augmentation, seed and device. Frozen; derive variants with :func:`dataclasses.replace`
    (``replace(PRESETS["cpu"], epochs=5)``), which validates them again.

    Attributes
    ----------
    targets : tuple of str
        Target names (``cbv``, ``cbf``, ``ttp``, ``delay``, ``mtt``, ``tmax``); several give one
        multi-output model.
    size, frames : int or None
        The slice cache to train on (:func:`ctperf.model.build_slice_cache`): slice size in
        pixels and input frames; None: the studies' own (512 and 89 in the paper). ``train``
        checks that the cache it is given matches them when they are set.
    pretrain_size, pretrain_epochs : int
        Down-sampled slices and epochs to train on them first (128 x 128, 250 in the paper);
        0 epochs: no pretraining.
    epochs : int
        Epochs at the final size (50 in the paper's fine-tuning).
    width, depth, kernel_size, norm
        Architecture (:class:`ctperf.model.UNet`).
    batch_size, lr, betas, plateau_factor, plateau_patience
        Adam and ReduceLROnPlateau settings (paper: 8, 1e-5, (0.9, 0.999)).
    schedule : {"plateau", "cosine"}
        Learning-rate schedule within each stage: ``plateau`` (the paper) multiplies it by
        ``plateau_factor`` when the validation loss stalls; ``cosine`` anneals it from ``lr`` to
        0 over the stage's epochs (better for short runs with a fixed budget).
    masked_loss : bool
        Restrict the loss to the brain mask.
    loss : {"mse", "l1"}
        Training loss on the [0, 1] maps: ``mse`` (the paper) or ``l1``, the mean absolute
        error, whose minimiser is the conditional median: less pulled towards the cohort's mean
        where the input leaves the answer uncertain, and less by the reference's outliers. The
        validation loss that picks the best epoch stays the MSE.
    augment : bool
        Flips, small rotations and input noise (off in the paper).
    augment_degrees, augment_noise : float
        With ``augment``, the largest rotation in degrees and the SD of the noise added to the
        standardised inputs.
    augment_gain : float
        With ``augment``, the enhancement over the baseline (mean of the first
        ``baseline_frames`` frames, or the first frame) is multiplied by ``exp(u)``, ``u``
        uniform in +-``augment_gain``: a different injection with the same perfusion.
    augment_shift : int
        With ``augment``, for a network whose targets are all in :data:`SHIFT_TARGETS` (Tmax,
        delay), each slice's frames are moved by a whole number of frames uniform in
        +-``augment_shift`` (the first or last frame repeated at the edge), as an acquisition
        started earlier or later: the network has to read the timing from the slice's own
        arteries. Other networks train without it (amplitude maps did not gain, TTP counts
        from the first frame; docs/results_unet_phantom.md).
    baseline_frames : int
        0 (the paper): the network sees the standardised frames. ``k > 0``: it sees the mean of
        the first ``k`` input frames and every later frame's enhancement over it
        (:class:`ctperf.model.UNet`), in units of ``contrast_hu`` HU.
    contrast_hu : float
        Enhancement in HU that becomes one input unit when ``baseline_frames > 0``.
    enhancement_quantile : float
        0: off. ``q`` in (0, 1] with ``baseline_frames > 0``: the enhancement is taken relative
        to the slice's ``q``-quantile of mean enhancement (:class:`ctperf.model.UNet`).
    seed : int
        Seeds the weights, the slice order and augmentation (and the folds of
        :func:`ctperf.model.cross_validate`).
    device : str
        ``auto`` (a GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``.
    amp : str
        Autocast: ``auto`` (bf16 or fp16 on CUDA, none on the CPU), ``none``, ``bf16``, ``fp16``.
    """

    targets: tuple[str, ...] = ("cbv",)
    size: int | None = None
    frames: int | None = None
    pretrain_size: int = 128
    pretrain_epochs: int = 0
    epochs: int = 50
    width: int = 64
    depth: int = 5
    kernel_size: int = 2
    norm: str = "none"
    batch_size: int = 8
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    schedule: str = "plateau"
    masked_loss: bool = True
    loss: str = "mse"
    augment: bool = False
    augment_gain: float = 0.0
    augment_degrees: float = 10.0
    augment_noise: float = 0.05
    augment_shift: int = 0
    baseline_frames: int = 0
    contrast_hu: float = 20.0
    enhancement_quantile: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"

    def __post_init__(self) -> None:
        # sequences given as lists are kept as tuples (the config is frozen and hashable)
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "betas", tuple(self.betas))
        if not self.targets:
            raise ValidationError("targets must name at least one map")
        twice = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if twice:
            raise ValidationError(f"targets name {', '.join(twice)} more than once")
        if self.loss not in _LOSSES:
            raise ValidationError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.schedule not in _SCHEDULES:
            raise ValidationError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.amp not in _AMPS:
            raise ValidationError(f"amp must be 'auto', 'none', 'bf16' or 'fp16', got "
                                  f"{self.amp!r}")
        if self.augment_shift < 0:
            raise ValidationError(f"augment_shift must be >= 0 frames, got {self.augment_shift}")
        if not self.contrast_hu > 0:
            raise ValidationError(f"contrast_hu must be > 0 HU, got {self.contrast_hu}")
        check_enhancement_quantile(self.enhancement_quantile, self.baseline_frames)
        if self.epochs < 1 or self.pretrain_epochs < 0 or self.batch_size < 1:
            raise ValidationError(f"epochs must be >= 1, pretrain_epochs >= 0 and batch_size "
                                  f">= 1; got {self.epochs}, {self.pretrain_epochs} and "
                                  f"{self.batch_size}")
        if not self.lr > 0:
            raise ValidationError(f"lr must be > 0, got {self.lr}")
        least = max(3, self.baseline_frames + 3)
        if self.frames is not None and self.frames < least:
            before = (f" (the {self.baseline_frames} frames before the bolus that the inputs "
                      "are taken from, and three of the bolus)" if self.baseline_frames else "")
            raise ValidationError(f"frames must be {least} or more{before}, got {self.frames}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValidationError(f"depth must be 1 to {MAX_DEPTH} resolution levels (the "
                                  f"paper's network has 5), got {self.depth}")
        # each level halves the slice: fewer than two pixels at the bottom trains on nothing
        # (a probe's size 1 had trained to a loss of 0 and a validation loss of NaN, exit 0)
        pretrain = self.pretrain_size if self.pretrain_epochs else None
        for name, size in (("size (--size)", self.size),
                           ("pretrain_size (--pretrain-size)", pretrain or None)):
            if size is not None and size < 2 ** self.depth:
                raise ValidationError(f"{name} must be {2 ** self.depth} pixels or more for a "
                                      f"network of depth {self.depth}, got {size}")


#: Named configurations. ``paper``: the published network and schedule on the studies' own grid
#: and frames (a GPU job). ``cpu``: a narrower network on 64 x 64 slices of 44 frames (every
#: second frame of an 89-frame study: 0-43 s at 1 s) that learns from baseline-subtracted
#: frames on a laptop CPU (docs/results_unet_phantom.md, docs/reproduce.md).
PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(pretrain_size=128, pretrain_epochs=250, epochs=50, width=64, depth=5,
                         kernel_size=2, norm="none", batch_size=8, lr=1e-5,
                         schedule="plateau", plateau_patience=10, masked_loss=True,
                         augment=False, augment_gain=0.0, baseline_frames=0),
    "cpu": TrainConfig(size=64, frames=44, pretrain_size=0, pretrain_epochs=0, epochs=60,
                       width=12, depth=4, kernel_size=2, norm="batch", batch_size=8, lr=3e-3,
                       schedule="cosine", masked_loss=True, augment=True, augment_gain=0.0,
                       augment_degrees=0.0, augment_noise=0.0, augment_shift=5,
                       baseline_frames=4,
                       contrast_hu=20.0, enhancement_quantile=1.0, loss="l1"),
}


def time_shift(config: TrainConfig) -> int:
    """The largest time shift (frames) this configuration trains with: its
    ``augment_shift`` when it augments and every target is in :data:`SHIFT_TARGETS`, else 0."""
    if config.augment and set(config.targets) <= SHIFT_TARGETS:
        return int(config.augment_shift)
    return 0


def preset(name: str) -> TrainConfig:
    """The :data:`PRESETS` configuration called ``name``."""
    if name not in PRESETS:
        raise ValidationError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` leaves behind: the loss history and the checkpoint files."""

    history: list[dict[str, Any]]
    model_path: Path
    best_path: Path
    config: dict[str, Any]


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``; a GPU that torch does not see is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValidationError(f"unknown device {device!r}: expected auto, cpu, cuda or "
                              "cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValidationError(f"device {device!r} asked for but torch sees no CUDA device; "
                                  "use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValidationError(f"device {device!r} asked for but torch sees "
                                  f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return dev


def masked_mse(pred: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None, loss: str = "mse") -> torch.Tensor:
    """Mean squared error (``loss="l1"``: mean absolute error) over mask voxels (all voxels if
    ``mask`` is None), all channels."""
    err = (pred - target).abs() if loss == "l1" else (pred - target) ** 2
    if mask is None:
        return err.mean()
    weight = mask.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise ValidationError(f"amp must be 'auto', 'none', 'bf16' or 'fp16', got {amp!r}")


@torch.no_grad()
def evaluate_mse(model: torch.nn.Module, cache: SliceCache, rows: np.ndarray, *,
                 target_idx: Sequence[int], mean: float, std: float, masked: bool = True,
                 batch_size: int = 8, device: torch.device | str = "cpu",
                 amp_dtype: torch.dtype | None = None) -> float:
    """MSE of the model on cache rows, on [0, 1] maps, pooled over voxels (mask voxels if masked).

    Under DDP each process passes its own rows; sums are reduced over processes.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sse = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(rows), batch_size):
        x, y, m = (torch.from_numpy(a).to(device) for a in cache.batch(
            rows[start:start + batch_size], target_idx=target_idx, mean=mean, std=std))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            pred = model(x)
        weight = m.expand_as(y) if masked else torch.ones_like(y)
        sse += (((pred.float() - y) ** 2) * weight).sum().double()
        count += weight.sum().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sse)
        dist.all_reduce(count)
    model.train(was_training)
    return float(sse / count) if count > 0 else math.nan


def _write_log(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    from ctperf.io import atomic_file

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})  # older runs: no loss_function
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue())


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


@dataclass
class _State:
    """Where a run stands: the optimiser of the current stage and the history so far."""

    opt: torch.optim.Adam
    sched: Any
    history: list[dict[str, Any]]
    stage: int = 0
    done_in_stage: int = 0
    best: float = math.inf


@dataclass(frozen=True)
class _Run:
    """What stays fixed during a run: settings, data split, model and device."""

    config: TrainConfig
    record: dict[str, Any]       # the checkpoints' config (architecture, inputs, settings)
    stages: list[tuple[str, SliceCache, int]]
    train_patients: Sequence[str]
    val_patients: Sequence[str]
    target_idx: list[int]
    mean: float
    std: float
    model: torch.nn.Module
    net: torch.nn.Module         # the model, wrapped for DDP under torchrun
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    rank: int
    world: int


def train(cache: SliceCache, out: str | Path, config: TrainConfig | None = None, *,
          train_patients: Sequence[str], val_patients: Sequence[str] = (),
          pretrain_cache: SliceCache | None = None, resume: bool = False,
          progress: bool = False,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train one U-Net on cached slices; write ``last.pt`` every epoch, ``best.pt``, ``model.pt``
    and ``log.csv`` (:data:`LOG_COLUMNS`) in ``out``.

    Parameters
    ----------
    cache : SliceCache
        Slices at the final size (:func:`ctperf.model.build_slice_cache`).
    out : path
        Output folder.
    config : TrainConfig, optional
        Settings of the run, e.g. ``PRESETS["paper"]`` or ``replace(PRESETS["cpu"], epochs=5)``;
        default ``TrainConfig()``.
    train_patients, val_patients : sequence of str
        Patient ids; their slices never mix.
    pretrain_cache : SliceCache, optional
        Down-sampled slices for ``config.pretrain_epochs`` epochs of pretraining.
    resume : bool
        Continue from ``out/last.pt``.
    progress : bool
        tqdm bars over epochs and batches.
    on_epoch : callable, optional
        Called with each epoch's log row after its checkpoint is written.

    Returns
    -------
    TrainResult
    """
    out = Path(out)
    config = config or TrainConfig()
    _check_patients(train_patients, val_patients)
    timed = sorted(set(config.targets) & SHIFT_TARGETS)
    if config.augment and config.augment_shift and timed and not time_shift(config):
        log.warning("%s learnt without time shifts: they apply only to a network whose every "
                    "target is Tmax or delay (targets %s); train %s on its own for them",
                    " and ".join(timed), ", ".join(config.targets), " and ".join(timed))
    target_idx = [cache.target_index(t) for t in config.targets]
    stages = _stages(cache, pretrain_cache, config)
    mean, std = cache.input_stats(train_patients)
    record = _record(cache, config, stages, mean=mean, std=std,
                     train_patients=train_patients, val_patients=val_patients)
    with _deterministic_cudnn():
        run = _start(config, record, stages, train_patients=train_patients,
                     val_patients=val_patients, target_idx=target_idx, mean=mean, std=std)
        state = _resume_or_start(run, out / "last.pt", resume=resume)
        out.mkdir(parents=True, exist_ok=True)
        for si in range(state.stage, len(stages)):
            _train_stage(run, state, si, out, progress=progress, on_epoch=on_epoch)
        _finish(run, state, out)
    return TrainResult(history=state.history, model_path=out / "model.pt",
                       best_path=out / "best.pt", config=record)


@contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic algorithms while training (the same weights from the same seed
    on a GPU), its settings restored after."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def _check_patients(train_patients: Sequence[str], val_patients: Sequence[str]) -> None:
    if not train_patients:
        raise ValidationError("train needs at least one training patient")
    overlap = set(train_patients) & set(val_patients)
    if overlap:
        raise ValidationError(f"patients in both training and validation: {sorted(overlap)}")
    if not val_patients:
        log.warning("no validation patients: the best epoch (best.pt) is chosen on the "
                    "training loss, which only falls; use model.pt, or train on more patients")


def _stages(cache: SliceCache, pretrain_cache: SliceCache | None,
            config: TrainConfig) -> list[tuple[str, SliceCache, int]]:
    """(name, cache, epochs) of each stage: pretraining (when asked for), then the final size."""
    for name, want, have in (("size", config.size, cache.size),
                             ("frames", config.frames, cache.n_frames)):
        if want is not None and want != have:
            raise ValidationError(f"the config asks for {name} {want}, the cache has {have}; "
                                  "build the cache with the config's settings")
    stages: list[tuple[str, SliceCache, int]] = []
    if config.pretrain_epochs > 0:
        if pretrain_cache is None:
            raise ValidationError("pretrain_epochs > 0 needs a pretrain_cache")
        stages.append(("pretrain", pretrain_cache, int(config.pretrain_epochs)))
    stages.append(("finetune" if stages else "train", cache, int(config.epochs)))
    for _, c, _n in stages:
        if c.n_frames != cache.n_frames:
            raise ValidationError(f"pretraining cache has {c.n_frames} frames, the main cache "
                                  f"{cache.n_frames}")
    return stages


def _median(values: dict[str, float] | None) -> float | None:
    """The training studies' median of a per-patient figure (the time step between input
    frames, s; the pixel the network sees, mm); None: not recorded, a cache from before it
    was."""
    return float(np.median(list(values.values()))) if values else None


def _span(values: dict[str, float] | None, patients: Sequence[str]) -> list[float] | None:
    """[lowest, highest] of a per-patient figure over ``patients`` (the bolus's arrival, s);
    None: not recorded for them."""
    kept = [values[p] for p in patients if values and p in values]
    return [float(min(kept)), float(max(kept))] if kept else None


def _record(cache: SliceCache, config: TrainConfig, stages: list[tuple[str, SliceCache, int]],
            *, mean: float, std: float, train_patients: Sequence[str],
            val_patients: Sequence[str]) -> dict[str, Any]:
    """The config stored in every checkpoint: what prediction needs and what a resume checks."""
    c = config
    return {
        "in_frames": cache.n_frames, "out_channels": len(c.targets), "width": c.width,
        "depth": c.depth, "kernel_size": c.kernel_size, "norm": c.norm,
        "baseline_frames": int(c.baseline_frames),
        "contrast_gain": float(std / c.contrast_hu) if c.baseline_frames else 1.0,
        "enhancement_quantile": float(c.enhancement_quantile),
        "targets": list(c.targets),
        "map_names": [TARGET_MAPS[t] for t in c.targets],
        "windows": {t: list(TARGET_WINDOWS[t]) for t in c.targets},
        "size": cache.size, "frames": cache.n_frames, "frame_mode": cache.meta["frame_mode"],
        "frame_interval": cache.meta["frame_interval"], "hu_window": cache.meta["hu_window"],
        "input_step_s": _median(cache.meta.get("input_steps_s")),
        "pixel_mm": _median(cache.meta.get("pixels_mm")),
        "bolus_arrival_s": _span(cache.meta.get("arrivals_s"), train_patients),
        # read on the network's input frames ("input"), or on each study's own (older caches)
        "bolus_arrival_on": cache.meta.get("arrivals_on", "study"),
        "study_span_s": _span(cache.meta.get("spans_s"), train_patients),
        "hu_mean": mean, "hu_std": std, "reference": cache.meta["reference"],
        "cache_version": int(cache.meta["version"]), "orientation": cache.meta.get("orientation"),
        "seed": c.seed,
        "batch_size": c.batch_size, "lr": c.lr, "schedule": c.schedule,
        "masked_loss": c.masked_loss, "loss": c.loss, "augment": c.augment,
        "augment_gain": float(c.augment_gain), "augment_degrees": float(c.augment_degrees),
        "augment_noise": float(c.augment_noise), "augment_shift": time_shift(c),
        "stages": [[name, s.size, n] for name, s, n in stages],
        "train_patients": list(train_patients), "val_patients": list(val_patients)}


def _start(config: TrainConfig, record: dict[str, Any],
           stages: list[tuple[str, SliceCache, int]], *, train_patients: Sequence[str],
           val_patients: Sequence[str], target_idx: list[int], mean: float,
           std: float) -> _Run:
    """Device (and process group under torchrun), seeded weights, DDP wrapper, grad scaler."""
    dev = resolve_device(config.device)
    rank, world, dev = _setup_distributed(dev)
    amp_dtype = _amp_dtype(config.amp, dev)
    model = build_model(record, seed=config.seed).to(dev)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    return _Run(config=config, record=record, stages=stages, train_patients=train_patients,
                val_patients=val_patients, target_idx=target_idx, mean=mean, std=std,
                model=model, net=net, device=dev, amp_dtype=amp_dtype, scaler=scaler,
                rank=rank, world=world)


def _fresh_optim(run: _Run, n_epochs: int) -> tuple[torch.optim.Adam, Any]:
    """Adam and the learning-rate schedule for a stage of ``n_epochs``, from the initial lr."""
    c = run.config
    opt = torch.optim.Adam(run.model.parameters(), lr=c.lr, betas=c.betas)
    if c.schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_epochs, 1))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=c.plateau_factor, patience=c.plateau_patience)
    return opt, sched


#: Settings computed from the training studies' HU: equal to float rounding when a cache is
#: rebuilt from unchanged studies (its sums added in another order), moved by whole HU when a
#: study changed.
_MEASURED_KEYS = ("hu_mean", "hu_std", "contrast_gain")


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if key in _MEASURED_KEYS and isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-9)
    return bool(old == new)


def _difference(key: str, old: Any, new: Any) -> str:
    """One setting that differs, for the refusal to resume: a patient list by who joined and
    who left it (the split changes with the validation fraction or a held-out list)."""
    if key.endswith("_patients") and isinstance(old, list) and isinstance(new, list):
        moved = [f"{len(ids)} {what}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                 for what, ids in (("added", sorted(set(new) - set(old))),
                                   ("gone", sorted(set(old) - set(new)))) if ids]
        return f"{key} differ ({'; '.join(moved) or 'their order'})"
    if key == "stages" and isinstance(old, list) and isinstance(new, list):
        def epochs(stages: list[Any]) -> str:
            return ", ".join(f"{n} epochs at {size} px" + (" (pretraining)" if name != "train"
                                                          else "")
                             for name, size, n in stages)
        return f"epochs: {epochs(old)} vs {epochs(new)} (a finished run is not extended)"
    if key in _MEASURED_KEYS:
        return (f"{key}={old!r} vs {new!r} (the training studies' HU differ from those the run "
                "began on: a study changed since, or the cache was built from other files)")
    return f"{key}={old!r} vs {new!r}"


def refuse_unresumed(last: Path, *, resume: bool) -> None:
    """Refuse a run's checkpoint ``last`` that exists when it is not to be resumed (its
    folder would mix two runs)."""
    if last.exists() and not resume:
        raise InputError(last.parent, "already holds a training run (last.pt); resume "
                                      "it (--resume; resume=True in Python) or choose another "
                                      "folder")


def _resume_or_start(run: _Run, last: Path, *, resume: bool) -> _State:
    """A fresh state, or the one saved in ``last`` (same settings required) with ``resume``."""
    opt, sched = _fresh_optim(run, run.stages[0][2])
    state = _State(opt=opt, sched=sched, history=[])
    refuse_unresumed(last, resume=resume)
    if not (resume and last.exists()):
        return state
    ckpt = load_checkpoint(last)
    old = {k: ckpt["config"].get(k, _KEY_DEFAULTS.get(k)) for k in _RESUME_KEYS}
    diff = {k: (old[k], run.record[k]) for k in _RESUME_KEYS
            if not _same_setting(k, old[k], run.record[k])}
    if diff:
        raise InputError(last, "cannot resume with different settings (checkpoint, now): "
                               + ", ".join(_difference(k, a, b) for k, (a, b) in diff.items()))
    run.model.load_state_dict(ckpt["model"])
    state.stage, state.done_in_stage = ckpt["stage"], ckpt["epoch_in_stage"]
    state.history, state.best = list(ckpt["history"]), float(ckpt["best_val"])
    if state.done_in_stage < run.stages[state.stage][2]:
        state.opt, state.sched = _fresh_optim(run, run.stages[state.stage][2])
        state.opt.load_state_dict(ckpt["optimizer"])
        state.sched.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    log.info("resuming %s after epoch %d", last.parent, len(state.history))
    return state


def _train_stage(run: _Run, state: _State, si: int, out: Path, *, progress: bool,
                 on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
    """The remaining epochs of stage ``si``: train, validate, step the schedule, checkpoint."""
    from tqdm.auto import tqdm

    name, stage_cache, n_epochs = run.stages[si]
    if si != state.stage:
        state.opt, state.sched = _fresh_optim(run, n_epochs)
        state.stage, state.done_in_stage = si, 0
    if state.done_in_stage >= n_epochs:
        return
    rows = stage_cache.rows(run.train_patients)
    val_rows = (stage_cache.rows(run.val_patients) if run.val_patients
                else np.array([], dtype=int))
    sampler: DistributedSampler[int] = DistributedSampler(
        range(len(rows)), num_replicas=run.world, rank=run.rank,  # type: ignore[arg-type]
        shuffle=True, seed=run.config.seed)
    for ep in tqdm(range(state.done_in_stage, n_epochs), desc=name,
                   disable=not progress or run.rank, initial=state.done_in_stage,
                   total=n_epochs):
        global_epoch = len(state.history) + 1
        t0 = time.perf_counter()
        sampler.set_epoch(global_epoch)
        order = rows[np.fromiter(iter(sampler), dtype=np.int64)]
        train_loss = _train_epoch(run, state, stage_cache, order, global_epoch,
                                  progress=progress)
        val_loss = (evaluate_mse(run.model, stage_cache, val_rows[run.rank::run.world],
                                 target_idx=run.target_idx, mean=run.mean, std=run.std,
                                 masked=run.config.masked_loss,
                                 batch_size=run.config.batch_size, device=run.device,
                                 amp_dtype=run.amp_dtype)
                    if len(val_rows) else math.nan)
        if run.config.schedule == "cosine":
            state.sched.step()
        else:
            state.sched.step(val_loss if not math.isnan(val_loss) else train_loss)
        row = {"epoch": global_epoch, "stage": name, "train_loss": train_loss,
               "loss_function": run.config.loss, "val_loss": val_loss,
               "lr": state.opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        state.history.append(row)
        state.done_in_stage = ep + 1
        _save_epoch(run, state, out, final_stage=si == len(run.stages) - 1)
        log.info("epoch %d (%s): train %.5f val %.5f lr %.2e", global_epoch, name,
                 train_loss, val_loss, row["lr"])
        if on_epoch is not None:
            on_epoch(row)


def _train_epoch(run: _Run, state: _State, stage_cache: SliceCache, order: np.ndarray,
                 global_epoch: int, *, progress: bool) -> float:
    """One pass over the training slices in ``order``; the mean loss (over all processes)."""
    from tqdm.auto import tqdm

    c = run.config
    aug_rng = np.random.default_rng([c.seed, global_epoch])
    run.net.train()
    loss_sum, n_seen = 0.0, 0
    for b in tqdm(range(0, len(order), c.batch_size), desc=f"epoch {global_epoch}",
                  leave=False, disable=not progress or run.rank):
        batch_rows = order[b:b + c.batch_size]
        x, y, m = (torch.from_numpy(a).to(run.device) for a in stage_cache.batch(
            batch_rows, target_idx=run.target_idx, mean=run.mean, std=run.std))
        if c.augment:
            x, y, m = apply_augmentation(
                x, y, m, draw_augmentation(aug_rng, len(x), max_degrees=c.augment_degrees,
                                           noise_sd=c.augment_noise,
                                           max_log_gain=c.augment_gain,
                                           max_shift=time_shift(c)),
                baseline_frames=c.baseline_frames)
        with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32,
                            enabled=run.amp_dtype is not None):
            pred = run.net(x)
        loss = masked_mse(pred.float(), y, m if c.masked_loss else None, c.loss)
        state.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(state.opt)
        run.scaler.update()
        loss_sum += float(loss.detach()) * len(batch_rows)
        n_seen += len(batch_rows)
    if run.world > 1:
        t = torch.tensor([loss_sum, n_seen], dtype=torch.float64, device=run.device)
        dist.all_reduce(t)
        return float(t[0] / t[1])
    return loss_sum / max(n_seen, 1)


def _save_epoch(run: _Run, state: _State, out: Path, *, final_stage: bool) -> None:
    """``last.pt`` (everything a resume needs), ``best.pt`` when the final size's score
    improved, and ``log.csv``; written by process 0 only."""
    row = state.history[-1]
    score = row["val_loss"] if not math.isnan(row["val_loss"]) else row["train_loss"]
    is_best = final_stage and score < state.best  # best of the final size only
    state.best = score if is_best else state.best
    if run.rank != 0:
        return
    if is_best:
        save_checkpoint({"config": run.record, "model": run.model.state_dict(),
                         "history": state.history}, out / "best.pt")
    save_checkpoint({"config": run.record, "model": run.model.state_dict(),
                     "optimizer": state.opt.state_dict(), "scheduler": state.sched.state_dict(),
                     "scaler": run.scaler.state_dict(), "rng": _rng_state(run.device),
                     "stage": state.stage, "epoch_in_stage": state.done_in_stage,
                     "history": state.history, "best_val": state.best}, out / "last.pt")
    _write_log(state.history, out / "log.csv")


def _finish(run: _Run, state: _State, out: Path) -> None:
    """``model.pt`` (the final weights), and ``best.pt`` if no epoch wrote one."""
    if run.rank == 0:
        weights = {"config": run.record, "model": run.model.state_dict(),
                   "history": state.history}
        save_checkpoint(weights, out / "model.pt")
        if not (out / "best.pt").exists():
            save_checkpoint(weights, out / "best.pt")
    if run.world > 1:
        dist.barrier()  # the other processes may read model.pt next
