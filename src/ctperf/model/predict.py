"""Inference: a trained U-Net checkpoint + a CTP series -> perfusion maps in physical units.

The series goes through the same frame selection, HU window and standardisation as the training
slices (all stored in the checkpoint); the [0, 1] outputs are mapped back with the checkpoint's
target windows. Each target's map is named as in :data:`ctperf.model.TARGET_MAPS`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import ValidationError
from ctperf.io.nifti import study_space
from ctperf.masks import first_frame_as_air, hu_offset, offset_said_once
from ctperf.model.data import ORIENTATION, input_arrival_s
from ctperf.model.normalise import from_unit, normalise_input
from ctperf.model.unet import input_step, input_times, select_frames, subsample_indices
from ctperf.perfusion import onset
from ctperf.types import (
    CTPSeries,
    PerfusionMaps,
    non_axial_slices,
    orient,
    radiological_flips,
)

__all__ = ["predict_maps"]

log = logging.getLogger(__name__)


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if arr.shape[-2:] == shape:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    mode = "area" if shape[0] <= arr.shape[-2] and shape[1] <= arr.shape[-1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=shape, mode=mode, **kw).numpy()


#: A study whose input frames are spaced more than this fraction away from the training
#: studies' is resampled to their spacing.
STEP_TOLERANCE = 0.1


def _frame_selection(times: np.ndarray, cfg: dict[str, Any]
                     ) -> tuple[str, float | None, str | None]:
    """How the study's frames become the network's input: the checkpoint's own way, or, when
    the network takes every n-th frame (the authors' subsampling) and this study's frames are
    not spaced as the training studies' were (their median or any one step off by more than
    :data:`STEP_TOLERANCE`), resampled onto the training studies' spacing
    (the network reads the bolus's timing from the frame index). Returns (mode, interval,
    note); a study too short for the frames the network takes is refused."""
    mode, interval = cfg["frame_mode"], cfg.get("frame_interval")
    trained = cfg.get("input_step_s")
    n_frames = int(cfg["frames"])
    t = np.asarray(times, dtype=np.float64)
    if mode == "resample" and interval:  # onto its own grid: the span is all that can fail
        # refused below 90 % of the window, or of the shortest training study's span where
        # the checkpoint records it (short studies are trained on, their last frame repeated);
        # one that does not (trained before) may have learned from studies half as long
        spans = cfg.get("study_span_s")
        if spans is None:
            shortest = 0.5 * (n_frames - 1) * float(interval)
            what: str | None = "half of it (its training studies' spans not recorded)"
        else:
            shortest, what = float(spans[0]), None
        short = _short_span(t, n_frames, float(interval), trained=shortest, what=what)
        if short:
            log.warning("%s", short)
        return mode, interval, short
    if mode != "subsample" or not trained:
        return mode, interval, None
    # the steps between the frames the network would take (every one within the tolerance:
    # their median is too)
    steps = np.diff(t[subsample_indices(t.size, n_frames)]) if t.size >= n_frames else None
    if steps is not None and steps.size and float(
            np.max(np.abs(steps / trained - 1.0))) <= STEP_TOLERANCE:
        return mode, interval, None
    short = _short_span(t, n_frames, float(trained))
    if steps is None or not steps.size:
        what = f"{t.size} frames, fewer than the {n_frames} it takes"
    elif float(steps.max() - steps.min()) > STEP_TOLERANCE * trained:
        what = f"frames {float(steps.min()):.2f}-{float(steps.max()):.2f} s apart"
    else:
        what = f"frames {float(np.median(steps)):.2f} s apart"
    note = (f"the network takes every n-th frame, {trained:.2f} s apart in its training "
            f"studies; this study gives {what}, so it was resampled to {trained:.2f} s")
    if short:
        note += f"; {short}"
    log.warning("%s", note)
    return "resample", float(trained), note


def _short_span(t: np.ndarray, n_frames: int, step: float, *,
                trained: float = np.inf, what: str | None = None) -> str | None:
    """Refuses a study spanning under 90 % of the ``n_frames`` frames ``step`` s apart that
    the network takes, or of its ``trained`` studies' shortest span when that is shorter;
    short of the network's frames, says how much its last frame stands for (a network that
    resamples had predicted a study a third as long, its last frame repeated, exit 0 and no
    word); None when it spans them."""
    need, have = (n_frames - 1) * step, float(t[-1] - t[0])
    floor = min(need, trained)
    if have < 0.9 * floor:
        shortest = (f", {what or 'its shortest training study'} {floor:.0f} s"
                    if floor < need else "")
        raise ValidationError(
            f"the network takes {n_frames} frames {step:.2f} s apart ({need:.0f} s{shortest}); "
            f"this study spans {have:.0f} s")
    if have < need:
        return (f"it spans {have:.1f} of the {need:.1f} s the network takes, so its last "
                f"frame stands for the last {need - have:.1f} s")
    return None


#: A study whose bolus arrives further than this (s), or than the time shifts the network was
#: trained with when they are wider, outside its training studies' arrivals is said to: the
#: network reads timing from the frame index, so its Tmax moves by about the time a scan began
#: early or late (docs/reproduce.md).
ARRIVAL_TOLERANCE_S = 1.0


def _arrival(cfg: dict[str, Any], seen: float | None) -> str | None:
    """A warning (logged and returned) when the study's bolus arrives ``seen`` s after its
    first frame, outside the training studies' arrivals (``bolus_arrival_s`` of the
    checkpoint): the network reads the bolus's timing from the frame index, so a scan begun
    earlier or later than those it learned from shifts its Tmax and delay (docs/reproduce.md).
    None when inside, when no bolus was found, or the checkpoint does not say."""
    span = cfg.get("bolus_arrival_s")
    if not span or seen is None:
        return None
    slack = max(ARRIVAL_TOLERANCE_S,
                int(cfg.get("augment_shift") or 0) * float(cfg.get("input_step_s") or 0.0))
    low, high = float(span[0]), float(span[1])
    if low - slack <= seen <= high + slack:
        return None
    note = (f"the bolus arrives {seen:.1f} s after this study's first frame, and {low:.1f}-"
            f"{high:.1f} s after it in the network's training studies, more than {slack:.1f} s "
            "outside them (the margin, or the time shifts it trained with when wider): it reads "
            "the bolus's timing from the frame index, so its "
            "maps, Tmax and delay most, are unreliable (leave out early frames of a scan "
            "begun earlier, or train on studies like it)")
    log.warning("%s", note)
    return note


def _study_start(series: CTPSeries) -> Any:
    """The study's pre-bolus reading (:func:`ctperf.perfusion.onset.study_start`), read once
    for its motion and its arrival; None when no bolus is found (the scan-start check says
    why)."""
    from ctperf.perfusion.onset import study_start

    try:
        return study_start(series.hu, series.hu, series.times, spacing=series.spacing,
                           brain_mask=None)
    except ValidationError:
        return None


def _motion(series: CTPSeries, start: Any) -> str | None:
    """A warning (logged and returned) when the skull's edges move between frames by more than
    ``ctperf maps``'s ``motion_unregistered`` flag allows: the network reads each voxel's curve
    as one tissue's, and a moving head mixes tissues (a probe's severely moved subject: CBV 45 %
    low, Tmax 2.5 s high, 17.6 % of a healthy brain over 6 s, said nowhere). None when still,
    without enough bone to tell, or without a bolus (``start`` None, :func:`_study_start`)."""
    from ctperf.perfusion.inputs import pre_bolus_noise_sd
    from ctperf.perfusion.qc import MAX_SKULL_SHIFT_PX, skull_shift_px

    if start is None:
        return None
    n_t = series.n_frames
    sample = np.flatnonzero(start.region.fitted.ravel())[::7]
    noise = pre_bolus_noise_sd(series.hu.reshape(n_t, -1)[:, sample], start.n_base)
    shift = skull_shift_px(series.hu, n_base=start.n_base, noise_sd=noise or 0.0,
                           offset=start.offset)
    if shift is None or shift <= MAX_SKULL_SHIFT_PX:
        return None
    note = (f"the skull's edges move by {shift:.1f} pixel between frames (more than "
            f"{MAX_SKULL_SHIFT_PX:g}): the head moved, so voxels' curves mix tissues and the "
            "network's maps are unreliable; register the study first (ctperf preprocess "
            "--register, as the training studies were if they were)")
    log.warning("%s", note)
    return note


#: A study whose pixel, as the network sees it, differs from the training studies' by more
#: than this fraction is said to be at another scale.
PIXEL_TOLERANCE = 0.2


def _pixel_scale(series: CTPSeries, cfg: dict[str, Any]) -> str | None:
    """A warning (logged and returned) when the study's pixel, resized to the network's input
    size, is not the training studies' along its rows or its columns (another field of view or
    matrix, or a non-square one stretched): the network learned vessels and tissue at one
    scale; None when it is, or the checkpoint does not say."""
    trained = cfg.get("pixel_mm")
    if not trained:
        return None
    size = int(cfg["size"])
    _, dy, dx = series.spacing
    _, _, ny, nx = series.shape
    seen = np.array([ny * dy, nx * dx]) / size  # mm per input pixel, down and across
    if np.all(np.abs(seen / trained - 1.0) <= PIXEL_TOLERANCE):
        return None
    scale = trained / seen
    if abs(scale[0] / scale[1] - 1.0) <= 0.01:
        what = f"{seen[0]:.2f} mm", f"{scale[0]:.2f} times their trained size"
    else:
        what = (f"{seen[0]:.2f} x {seen[1]:.2f} mm (down x across)",
                f"{scale[0]:.2f} x {scale[1]:.2f} times their trained size, stretched")
    note = (f"the network learned {trained:.2f} mm pixels; this study's field of view gives "
            f"{what[0]} at its {size} px input: structures are {what[1]}, so its maps are "
            "unreliable (crop or pad the study to the training field of view, or train at "
            "this scale)")
    log.warning("%s", note)
    return note


def predict_maps(series: CTPSeries, checkpoint: str | Path | dict[str, Any], *,
                 device: str = "auto", batch_size: int = 4, resize: bool = False,
                 brain_mask: np.ndarray | None = None, progress: bool = False,
                 bolus_arrival_s: float | None = None) -> PerfusionMaps:
    """Predict perfusion maps for every slice of a series.

    Parameters
    ----------
    series : CTPSeries
        Study, (T, Z, Y, X) HU; preprocessed as the training data were.
    checkpoint : path or dict
        A checkpoint from :func:`ctperf.model.train` (``model.pt``, ``best.pt`` or ``last.pt``),
        or one already loaded with :func:`ctperf.model.load_checkpoint`.
    device : str
        ``auto`` (a GPU when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``.
    batch_size : int
        Slices per forward pass.
    resize : bool
        Resample slices whose size differs from the training size to it and the maps back
        (off: a size mismatch is an error, because the net learned one pixel scale).
    brain_mask : ndarray of bool, shape (Z, Y, X), optional
        Voxels outside are set to 0; without it the maps cover the whole image, air included
        (``ctperf predict`` passes the study's automatic brain mask).
    progress : bool
        Progress bar over slice batches.
    bolus_arrival_s : float, optional
        The bolus's arrival in the study, s after its first frame, when the caller has read it
        on the study's own frames (:func:`ctperf.perfusion.onset.check_scan_start` returns it),
        for the warning on a scan begun unlike the training studies. Used only with a
        checkpoint whose training arrivals were read so (trained on caches of before the
        arrivals were read on the network's input frames, which are read here).

    Returns
    -------
    PerfusionMaps
        One float32 (Z, Y, X) map per target, named as in :data:`ctperf.model.TARGET_MAPS`
        (cbf mL/100 g/min, cbv mL/100 g, delay/mtt/tmax s).
    """
    with offset_said_once():  # the study's HU offset read four times, said once
        return _predict(series, checkpoint, device=device, batch_size=batch_size,
                        resize=resize, brain_mask=brain_mask, progress=progress,
                        bolus_arrival_s=bolus_arrival_s)


def _predict(series: CTPSeries, checkpoint: str | Path | dict[str, Any], *, device: str,
             batch_size: int, resize: bool, brain_mask: np.ndarray | None, progress: bool,
             bolus_arrival_s: float | None) -> PerfusionMaps:
    import torch
    from tqdm.auto import tqdm

    from ctperf.model.checkpoint import build_model, check_checkpoint, load_checkpoint
    from ctperf.model.train import resolve_device

    if isinstance(checkpoint, dict):
        check_checkpoint(checkpoint, "checkpoint")
        ckpt = checkpoint
    else:
        ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    problem = non_axial_slices(series.affine)
    if problem is not None:
        raise ValidationError(problem)
    _, z, ny, nx = series.shape
    size = int(cfg["size"])
    if (ny, nx) != (size, size) and not resize:
        raise ValidationError(
            f"the model was trained on {size} x {size} slices, the study has {ny} x {nx}; "
            "resample with --resize (resize=True in Python), or train at this size")
    if brain_mask is not None and np.shape(brain_mask) != (z, ny, nx):
        raise ValidationError(f"brain mask shape {np.shape(brain_mask)} differs from the "
                              f"study's {(z, ny, nx)}")
    pixel_note = _pixel_scale(series, cfg)
    start = _study_start(series)
    motion_note = _motion(series, start)
    mode, interval, note = _frame_selection(series.times, cfg)
    frames = select_frames(series.hu, series.times, n_frames=int(cfg["frames"]), mode=mode,
                           frame_interval=interval)
    t_in = input_times(series.times, n_frames=int(cfg["frames"]), mode=mode,
                       frame_interval=interval)
    own = None if start is None else onset.bolus_arrival_s(series, start)
    # read as the training studies' arrivals were: on the network's input frames (the study's
    # own when it takes them all), or (older checkpoints) on each study's own
    if cfg.get("bolus_arrival_on") == "input":
        same = t_in.shape == series.times.shape and np.array_equal(t_in, series.times)
        arrival_note = _arrival(cfg, own if same else input_arrival_s(series, frames, t_in))
    else:
        arrival_note = _arrival(cfg, bolus_arrival_s if bolus_arrival_s is not None else own)
    # turned as the training slices were (checkpoints from before this have no orientation)
    flips = (radiological_flips(series.affine) if cfg.get("orientation") == ORIENTATION
             else (False, False))
    frames = orient(frames, flips)
    # the network learned calibrated HU: a study whose scale is offset is moved back
    _, offset = hu_offset(first_frame_as_air(series.hu), spacing=series.spacing)
    if offset:
        frames = frames - np.float32(offset)
    x = normalise_input(_resize(frames, (size, size)), window=cfg["hu_window"],
                        mean=cfg["hu_mean"], std=cfg["hu_std"]).transpose(1, 0, 2, 3)
    dev = resolve_device(device)
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    outputs = []
    with torch.no_grad():
        for start in tqdm(range(0, z, batch_size), desc="predict", disable=not progress):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(dev)
            outputs.append(model(xb).float().cpu().numpy())
    unit = orient(_resize(np.concatenate(outputs, axis=0), (ny, nx)), flips)  # (Z, C, Y, X)
    if not np.all(np.isfinite(unit)):
        raise ValidationError("the network's output holds NaN or infinite values: its weights "
                              "or its input normalisation (hu_mean, hu_std) are broken; use "
                              "another checkpoint")
    maps = {}
    for c, (target, name) in enumerate(zip(cfg["targets"], cfg["map_names"], strict=True)):
        values = from_unit(np.clip(unit[:, c], 0.0, 1.0), target, windows=cfg["windows"])
        if brain_mask is not None:
            values = np.where(brain_mask, values, 0.0).astype(np.float32)
        maps[name] = values
    provenance = {"method": "unet", "targets": list(cfg["targets"]),
                  "windows": cfg["windows"], "trained_reference": cfg["reference"],
                  "frames": cfg["frames"], "frame_mode": mode,
                  "input_step_s": input_step(series.times, n_frames=int(cfg["frames"]),
                                             mode=mode, frame_interval=interval),
                  "input_note": note, "pixel_note": pixel_note, "arrival_note": arrival_note,
                  "motion_note": motion_note,
                  "size": size, "resized": (ny, nx) != (size, size),
                  "flipped_rows_columns": list(flips), "hu_offset": offset,
                  "model_software_version": ckpt.get("software_version"),
                  "model_sha256": ckpt.get("model_sha256"), "training_seed": cfg.get("seed"),
                  "training_patients": len(cfg.get("train_patients") or ()) or None,
                  **study_space(series.meta)}
    if not isinstance(checkpoint, dict):
        provenance["checkpoint"] = Path(checkpoint).name
    log.info("predicted %s for %d slices", ", ".join(maps), z)
    return PerfusionMaps(maps=maps, affine=series.affine, provenance=provenance)
