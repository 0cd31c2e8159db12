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
from collections.abc import Callable, Mapping, Sequence
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

__all__ = ["PRESETS", "TrainResult", "evaluate_mse", "masked_mse", "preset_train_options",
           "resolve_device", "train"]

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "stage", "train_loss", "val_loss", "lr", "seconds")
# Settings that must match for a resumed run to be the same run.
_RESUME_KEYS = ("targets", "size", "frames", "width", "depth", "kernel_size", "norm", "seed",
                "batch_size", "lr", "masked_loss", "augment", "stages", "baseline_frames",
                "contrast_gain", "schedule", "augment_gain", "augment_degrees", "augment_noise")
# values of keys that checkpoints written before the key existed implicitly had
_KEY_DEFAULTS: dict[str, Any] = {"baseline_frames": 0, "contrast_gain": 1.0,
                                 "schedule": "plateau", "augment_gain": 0.0,
                                 "augment_degrees": 10.0, "augment_noise": 0.05}
_SCHEDULES = ("plateau", "cosine")

#: Named settings. Keys are :func:`train` options, plus the slice cache's ``size`` and ``frames``
#: and the pretraining cache's ``pretrain_size`` (:func:`preset_train_options` drops those three).
#: ``paper``: the published network and schedule (a GPU job). ``cpu``: a narrower network that
#: learns from baseline-subtracted frames in minutes on a laptop CPU (docs/results_unet_phantom.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"size": 512, "frames": 89, "pretrain_size": 128, "pretrain_epochs": 250,
              "epochs": 50, "width": 64, "depth": 5, "kernel_size": 2, "norm": "none",
              "batch_size": 8, "lr": 1e-5, "schedule": "plateau", "plateau_patience": 10,
              "masked_loss": True, "augment": False, "augment_gain": 0.0, "baseline_frames": 0},
    "cpu": {"size": 64, "frames": 30, "pretrain_size": 0, "pretrain_epochs": 0,
            "epochs": 25, "width": 12, "depth": 4, "kernel_size": 2, "norm": "batch",
            "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "masked_loss": True,
            "augment": True, "augment_gain": 0.5, "augment_degrees": 0.0, "augment_noise": 0.0,
            "baseline_frames": 4, "contrast_hu": 20.0},
}


def preset_train_options(name: str) -> dict[str, Any]:
    """The :func:`train` keyword arguments of a preset (without the cache's size and frames)."""
    if name not in PRESETS:
        raise ValidationError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items()
            if k not in ("size", "frames", "pretrain_size")}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` leaves behind: the loss history and the checkpoint files."""

    history: list[dict[str, Any]]
    model_path: Path
    best_path: Path
    config: dict[str, Any]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' asked for but torch sees no CUDA device; use 'cpu'")
    return torch.device(device)


def masked_mse(pred: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over mask voxels (all voxels if ``mask`` is None), all channels."""
    err = (pred - target) ** 2
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
        writer.writerow({k: row[k] for k in LOG_COLUMNS})
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


def train(cache: SliceCache, out: str | Path, *, train_patients: Sequence[str],
          val_patients: Sequence[str] = (), targets: Sequence[str] = ("cbv",),
          epochs: int = 50, pretrain_cache: SliceCache | None = None, pretrain_epochs: int = 0,
          width: int = 64, depth: int = 5, kernel_size: int = 2, norm: str = "none",
          batch_size: int = 8, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
          plateau_factor: float = 0.5, plateau_patience: int = 10, schedule: str = "plateau",
          masked_loss: bool = True,
          augment: bool = False, augment_gain: float = 0.0, augment_degrees: float = 10.0,
          augment_noise: float = 0.05, baseline_frames: int = 0,
          contrast_hu: float = 20.0,
          seed: int = 0, device: str = "auto", amp: str = "auto",
          resume: bool = False, progress: bool = False,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train one U-Net on cached slices; write ``last.pt`` every epoch, ``best.pt``, ``model.pt``
    and ``log.csv`` (epoch, stage, train_loss, val_loss, lr, seconds) in ``out``.

    Parameters
    ----------
    cache : SliceCache
        Slices at the final size (:func:`ctperf.model.build_slice_cache`).
    out : path
        Output folder.
    train_patients, val_patients : sequence of str
        Patient ids; their slices never mix.
    targets : sequence of str
        Target names (``cbv``, ``cbf``, ``ttp``, ``delay``, ``mtt``, ``tmax``); several give one
        multi-output model.
    epochs : int
        Epochs at the final size (50 in the paper's fine-tuning).
    pretrain_cache, pretrain_epochs
        Down-sampled slices and epochs to train on them first (128 x 128, 250 in the paper).
    width, depth, kernel_size, norm
        Architecture (:class:`ctperf.model.UNet`).
    batch_size, lr, betas, plateau_factor, plateau_patience
        Adam and ReduceLROnPlateau settings (paper: 8, 1e-5, (0.9, 0.999)).
    schedule : {"plateau", "cosine"}
        Learning-rate schedule within each stage: ``plateau`` (the paper) halves it (by
        ``plateau_factor``) when the validation loss stalls; ``cosine`` anneals it from ``lr`` to
        0 over the stage's epochs (better for short runs with a fixed budget).
    masked_loss : bool
        Restrict the MSE to the brain mask.
    augment : bool
        Flips, small rotations and input noise (off in the paper).
    augment_degrees, augment_noise : float
        With ``augment``, the largest rotation in degrees and the SD of the noise added to the
        standardised inputs.
    augment_gain : float
        With ``augment``, the enhancement over the baseline (mean of the first
        ``baseline_frames`` frames, or the first frame) is multiplied by ``exp(u)``, ``u`` uniform
        in +-``augment_gain``: a different injection with the same perfusion.
    baseline_frames : int
        0 (the paper): the network sees the standardised frames. ``k > 0``: it sees the mean of
        the first ``k`` input frames and every later frame's enhancement over it
        (:class:`ctperf.model.UNet`), in units of ``contrast_hu`` HU.
    contrast_hu : float
        Enhancement in HU that becomes one input unit when ``baseline_frames > 0``.
    seed : int
        Seeds the weights, the slice order and augmentation.
    device, amp : str
        ``auto``/``cpu``/``cuda``; autocast ``auto`` (bf16 or fp16 on CUDA, none on CPU), ``none``,
        ``bf16``, ``fp16``.
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
    from tqdm.auto import tqdm

    out = Path(out)
    if not train_patients:
        raise ValidationError("train needs at least one training patient")
    overlap = set(train_patients) & set(val_patients)
    if overlap:
        raise ValidationError(f"patients in both training and validation: {sorted(overlap)}")
    target_idx = [cache.target_index(t) for t in targets]
    stages = [("pretrain", pretrain_cache, int(pretrain_epochs))] if pretrain_epochs > 0 else []
    if pretrain_epochs > 0 and pretrain_cache is None:
        raise ValidationError("pretrain_epochs > 0 needs a pretrain_cache")
    stages.append(("finetune" if stages else "train", cache, int(epochs)))
    for _, c, _n in stages:
        if c is not None and c.n_frames != cache.n_frames:
            raise ValidationError(f"pretraining cache has {c.n_frames} frames, the main cache "
                                  f"{cache.n_frames}")
    mean, std = cache.input_stats(train_patients)
    if schedule not in _SCHEDULES:
        raise ValidationError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if not contrast_hu > 0:
        raise ValidationError(f"contrast_hu must be > 0 HU, got {contrast_hu}")
    config: dict[str, Any] = {
        "in_frames": cache.n_frames, "out_channels": len(targets), "width": width, "depth": depth,
        "kernel_size": kernel_size, "norm": norm, "baseline_frames": int(baseline_frames),
        "contrast_gain": float(std / contrast_hu) if baseline_frames else 1.0,
        "targets": list(targets),
        "map_names": [TARGET_MAPS[t] for t in targets],
        "windows": {t: list(TARGET_WINDOWS[t]) for t in targets},
        "size": cache.size, "frames": cache.n_frames, "frame_mode": cache.meta["frame_mode"],
        "frame_interval": cache.meta["frame_interval"], "hu_window": cache.meta["hu_window"],
        "hu_mean": mean, "hu_std": std, "reference": cache.meta["reference"], "seed": seed,
        "batch_size": batch_size, "lr": lr, "schedule": schedule, "masked_loss": masked_loss,
        "augment": augment, "augment_gain": float(augment_gain),
        "augment_degrees": float(augment_degrees), "augment_noise": float(augment_noise),
        "stages": [[name, c.size if c is not None else 0, n] for name, c, n in stages],
        "train_patients": list(train_patients), "val_patients": list(val_patients)}

    dev = resolve_device(device)
    rank, world, dev = _setup_distributed(dev)
    amp_dtype = _amp_dtype(amp, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.manual_seed(seed)
    model = build_model(config).to(dev)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)

    def fresh_optim(n_epochs: int) -> tuple[torch.optim.Adam, Any]:
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
        if schedule == "cosine":
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_epochs, 1))
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=plateau_factor, patience=plateau_patience)
        return opt, sched

    opt, sched = fresh_optim(stages[0][2])
    history: list[dict[str, Any]] = []
    stage_i, done_in_stage, best = 0, 0, math.inf
    last = out / "last.pt"
    if last.exists() and not resume:
        raise InputError(out, "already holds a training run (last.pt); pass resume=True "
                              "(--resume) to continue it or choose another folder")
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        old = {k: ckpt["config"].get(k, _KEY_DEFAULTS.get(k)) for k in _RESUME_KEYS}
        diff = {k: (old[k], config[k]) for k in _RESUME_KEYS if old[k] != config[k]}
        if diff:
            raise InputError(last, "cannot resume with different settings (checkpoint, now): "
                                   + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
        model.load_state_dict(ckpt["model"])
        stage_i, done_in_stage = ckpt["stage"], ckpt["epoch_in_stage"]
        history, best = list(ckpt["history"]), float(ckpt["best_val"])
        if done_in_stage < stages[stage_i][2]:
            opt, sched = fresh_optim(stages[stage_i][2])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and dev.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        logger.info("resuming %s after epoch %d", out, len(history))
    out.mkdir(parents=True, exist_ok=True)

    for si in range(stage_i, len(stages)):
        name, stage_cache, n_epochs = stages[si]
        assert stage_cache is not None
        if si != stage_i:
            opt, sched = fresh_optim(n_epochs)
            done_in_stage = 0
        if done_in_stage >= n_epochs:
            continue
        rows = stage_cache.rows(train_patients)
        val_rows = stage_cache.rows(val_patients) if val_patients else np.array([], dtype=int)
        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(rows)), num_replicas=world, rank=rank,  # type: ignore[arg-type]
            shuffle=True, seed=seed)
        val_mine = val_rows[rank::world]
        for ep in tqdm(range(done_in_stage, n_epochs), desc=name, disable=not progress or rank,
                       initial=done_in_stage, total=n_epochs):
            global_epoch = len(history) + 1
            t0 = time.perf_counter()
            sampler.set_epoch(global_epoch)
            order = rows[np.fromiter(iter(sampler), dtype=np.int64)]
            aug_rng = np.random.default_rng([seed, global_epoch])
            net.train()
            loss_sum, n_seen = 0.0, 0
            for b in tqdm(range(0, len(order), batch_size), desc=f"epoch {global_epoch}",
                          leave=False, disable=not progress or rank):
                batch_rows = order[b:b + batch_size]
                x, y, m = (torch.from_numpy(a).to(dev) for a in stage_cache.batch(
                    batch_rows, target_idx=target_idx, mean=mean, std=std))
                if augment:
                    x, y, m = apply_augmentation(
                        x, y, m, draw_augmentation(aug_rng, len(x), max_degrees=augment_degrees,
                                                   noise_sd=augment_noise,
                                                   max_log_gain=augment_gain),
                        baseline_frames=baseline_frames)
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    pred = net(x)
                loss = masked_mse(pred.float(), y, m if masked_loss else None)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                loss_sum += float(loss.detach()) * len(batch_rows)
                n_seen += len(batch_rows)
            train_loss = loss_sum / max(n_seen, 1)
            if world > 1:
                t = torch.tensor([loss_sum, n_seen], dtype=torch.float64, device=dev)
                dist.all_reduce(t)
                train_loss = float(t[0] / t[1])
            val_loss = (evaluate_mse(model, stage_cache, val_mine, target_idx=target_idx,
                                     mean=mean, std=std, masked=masked_loss,
                                     batch_size=batch_size, device=dev, amp_dtype=amp_dtype)
                        if len(val_rows) else math.nan)
            if schedule == "cosine":
                sched.step()
            else:
                sched.step(val_loss if not math.isnan(val_loss) else train_loss)
            row = {"epoch": global_epoch, "stage": name, "train_loss": train_loss,
                   "val_loss": val_loss, "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            score = val_loss if not math.isnan(val_loss) else train_loss
            is_best = si == len(stages) - 1 and score < best  # best of the final size only
            best = score if is_best else best
            if rank == 0:
                if is_best:
                    save_checkpoint({"config": config, "model": model.state_dict(),
                                     "history": history}, out / "best.pt")
                save_checkpoint({"config": config, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "scaler": scaler.state_dict(), "rng": _rng_state(dev),
                                 "stage": si, "epoch_in_stage": ep + 1, "history": history,
                                 "best_val": best}, last)
                _write_log(history, out / "log.csv")
            logger.info("epoch %d (%s): train %.5f val %.5f lr %.2e", global_epoch, name,
                        train_loss, val_loss, row["lr"])
            if on_epoch is not None:
                on_epoch(row)
    if rank == 0:
        save_checkpoint({"config": config, "model": model.state_dict(), "history": history},
                        out / "model.pt")
        if not (out / "best.pt").exists():
            save_checkpoint({"config": config, "model": model.state_dict(),
                             "history": history}, out / "best.pt")
    if world > 1:
        dist.barrier()  # the other processes may read model.pt next
    return TrainResult(history=history, model_path=out / "model.pt", best_path=out / "best.pt",
                       config=config)
