"""Checks that a study read from disk is whole and plausible, before and after its pixels load.

A study is read whole or refused: every check raises :class:`ctperf.errors.InputError` naming the
file (or the folder) and what is wrong. The readers call them in this order: frame count and frame
timing from the headers, memory for the pixels, then the HU of every (frame, slice) image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ctperf.errors import InputError, ValidationError

__all__ = [
    "ENHANCING_BASELINE_MAX_HU",
    "FRAME_STEP_RANGE_S",
    "HU_RANGE",
    "MAX_FRAME_GAP_S",
    "MIN_STUDY_FRAMES",
    "available_memory",
    "check_frame_count",
    "check_frame_times",
    "check_hu_plausible",
    "check_memory",
    "fit_times",
    "frame_spacing_problem",
]

PathLike = str | os.PathLike[str]

#: Fewest frames a reader accepts: fewer hold no time course (a baseline and one more frame at
#: most). Perfusion maps need more (:data:`ctperf.perfusion.maps.MIN_FRAMES`).
MIN_STUDY_FRAMES = 3
#: Plausible median time between CT perfusion frames, in seconds (protocols sample every
#: 0.5-3 s; a step far outside is a unit error, e.g. milliseconds read as seconds).
FRAME_STEP_RANGE_S = (0.1, 10.0)
#: Longest plausible single gap between two frames, in seconds (late, sparse sampling included).
MAX_FRAME_GAP_S = 60.0
#: Range of CT numbers (HU) in which the median of any image must lie: air is -1000, dense bone
#: and the extended CT scale's metal stay below 3100 at the voxel median.
HU_RANGE = (-1100.0, 3100.0)
#: Values at or below this are padding, not air (-1000 HU, whose noise stays above -1300):
#: left out of an image's median unless the image holds nothing else.
_PADDING_HU = -1500.0
# Tissue (voxels above -500 HU) of one slice changes little over a perfusion scan: contrast
# adds tens of HU to the tissue median, motion a little more. A frame whose tissue median moved
# further than this from its slice's median over frames was scaled differently.
_TISSUE_HU = -500.0
_TISSUE_JUMP_HU = 500.0
#: Highest plausible pre-contrast level of the voxels that enhance most, HU: contrast enters
#: blood (40-60 HU) and the tissue it perfuses (20-50 HU). Stored values not rescaled to HU
#: (HU + 1024, air at 0) put it near 1070.
ENHANCING_BASELINE_MAX_HU = 400.0
# The voxels that enhance most: this share of the sampled voxels, when they rise by at least
# _ENHANCEMENT_MIN_HU (a bolus, not noise).
_ENHANCING_SHARE = 0.005
_ENHANCEMENT_MIN_HU = 50.0
#: A study with at least this share of its samples at air's level (-1100 to -500 HU) was
#: rescaled (stored HU + 1024 puts air near 24): its most enhancing voxels are not weighed,
#: since a skull that moves over the edge voxels raises them by hundreds of HU from bone's
#: level (a review's head tilted by 2-4 degrees through 5 mm slices read 428-513 HU there).
_AIR_SHARE = 0.01
# Voxels denser than this before the bolus are bone or metal, never blood or brain, whatever
# the rescale (stored without the intercept, blood sits near 1070): left out of the check of
# the enhancing voxels' level (metal streaks that flicker from frame to frame had been taken
# for the most enhancing voxels, and the study refused as unscaled).
_DENSE_HU = 1500.0
# A head CT holds bone far above this; values that stop below it, with a plateau at their
# highest value across the frames, were clipped (a display window applied on export).
_CLIPPED_BELOW_HU = 1000.0
_CLIPPED_SHARE = 0.02  # of the values at the plateau (clipped phantoms: 6.9-8.2 %; bone)
_CLIPPED_TAIL = 0.005  # of the values within 200 HU under it
_SAMPLES_PER_IMAGE = 4096
# A frame's median pixel lies about the noise's size from its slice's median over the scan
# (4-8 HU on phantoms at 75-300 mAs, severe motion included: at most 1.5 times its slice's
# typical frame); contrast moves most pixels by a few HU. An image further than both of these
# from them holds other pixels: a damaged one (a truncated JPEG stream: 56-465 HU).
_UNLIKE_HU = 30.0
_UNLIKE_FACTOR = 5.0


def check_frame_count(n_frames: int, path: PathLike) -> None:
    """Refuse a study with fewer than :data:`MIN_STUDY_FRAMES` frames."""
    if n_frames < MIN_STUDY_FRAMES:
        raise InputError(path, f"{n_frames} frame{'s' if n_frames != 1 else ''}: a CT perfusion "
                               f"study is a time course of at least {MIN_STUDY_FRAMES} frames "
                               "(perfusion maps need 10 or more)")


def check_frame_times(times: np.ndarray, path: PathLike, *, source: str,
                      remedy: str = "fix the file's time unit or give the spacing with "
                                    "--frame-interval SECONDS") -> np.ndarray:
    """Check frame times (s) of a study: finite, strictly increasing, plausibly spaced.

    Non-uniform spacing is allowed (e.g. 0.5 s steps during the bolus, then 3 s steps); the
    median step must lie in :data:`FRAME_STEP_RANGE_S` and no gap exceed
    :data:`MAX_FRAME_GAP_S`.

    Parameters
    ----------
    times : array_like, shape (T,)
        Frame times in seconds.
    path : path
        The file the times came from, named in errors.
    source : str
        Where the times came from (``"pixdim[4]"``, ``"FrameTimes"``, a DICOM tag), for messages.
    remedy : str
        What the message of implausibly spaced frames asks the user to do.

    Returns
    -------
    ndarray, float64, shape (T,)
    """
    t = np.asarray(times, dtype=np.float64)
    if source == "frame_interval":             # the user's own number: nothing to fix in the file
        remedy = "give --frame-interval in seconds"
    if t.ndim != 1:
        raise InputError(path, f"{source}: frame times must be one list, got shape {t.shape}")
    check_frame_count(t.size, path)
    if not np.all(np.isfinite(t)):
        raise InputError(path, f"{source}: frame times contain NaN or Inf")
    steps = np.diff(t)
    if np.any(steps <= 0):
        bad = int(np.flatnonzero(steps <= 0)[0])
        raise InputError(path, f"{source}: frame times must be strictly increasing; frame "
                               f"{bad + 1} ({t[bad + 1]:g} s) is not after frame {bad} "
                               f"({t[bad]:g} s)")
    problem = frame_spacing_problem(t)
    if problem is not None:
        raise InputError(path, f"{source}: {problem}"
                               + (f"; {remedy}" if problem.startswith("frames are") else ""))
    return t


def fit_times(times: object) -> np.ndarray:
    """Frame times (s) given to a fit, as float64 (T,), or ValidationError: 1-D, finite,
    strictly increasing, and not spaced too far apart or with gaps too long for CT perfusion
    (:func:`frame_spacing_problem`). Times in milliseconds had run the Bayesian fit for
    minutes on gigabytes, and the box and SVD fits had returned CBF a thousand times low. A
    grid finer than a scan's frames (a simulation's, or the fits' own resampling of uneven
    frames) is no unit error and is accepted."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or t.size < 2:
        raise ValidationError(f"times must be 1-D with at least 2 frames, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValidationError("times contain NaN or Inf")
    steps = np.diff(t)
    if np.any(steps <= 0):
        bad = int(np.flatnonzero(steps <= 0)[0])
        raise ValidationError(f"times must be strictly increasing; frame {bad + 1} "
                              f"({t[bad + 1]:g} s) is not after frame {bad} ({t[bad]:g} s)")
    problem = frame_spacing_problem(t)
    if problem is not None and float(np.median(steps)) >= FRAME_STEP_RANGE_S[0]:
        raise ValidationError(f"times: {problem}; give them in seconds")
    return t


def frame_spacing_problem(times: np.ndarray) -> str | None:
    """What makes increasing frame times (s) implausible for CT perfusion, or None: a median
    step outside :data:`FRAME_STEP_RANGE_S` (a unit error: milliseconds or minutes given as
    seconds) or a gap over :data:`MAX_FRAME_GAP_S`."""
    steps = np.diff(np.asarray(times, dtype=np.float64))
    median = float(np.median(steps))
    lo, hi = FRAME_STEP_RANGE_S
    if not lo <= median <= hi:
        small = [what for what, factor in (("seconds stored as milliseconds", 1000.0),
                                           ("minutes read as seconds", 60.0))
                 if median < lo and lo <= median * factor <= hi]
        hint = (" (milliseconds read as seconds?)" if median > hi and median / 1000 >= lo
                else f" ({' or '.join(small)}?)" if small else "")
        return f"frames are {median:g} s apart{hint}, outside the {lo:g}-{hi:g} s of CT perfusion"
    if steps.max() > MAX_FRAME_GAP_S:
        bad = int(np.argmax(steps))
        return (f"a gap of {steps[bad]:g} s between frames {bad} and {bad + 1}, longer than the "
                f"{MAX_FRAME_GAP_S:g} s a perfusion time course allows")
    return None


def available_memory() -> int | None:
    """Bytes of memory this process may still allocate, or None when unknown.

    The smaller of the system's available memory (``MemAvailable`` of ``/proc/meminfo``) and
    the room left under a cgroup v2 memory limit.
    """
    known: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            known.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def check_memory(nbytes: int, path: PathLike, *, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when the machine cannot hold them."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise InputError(path, f"{what} need {nbytes / 2**30:.1f} GiB of memory, "
                               f"{available / 2**30:.1f} GiB are available; check the header's "
                               "dimensions, or read the study on a larger machine")


def _median_where(values: np.ndarray, keep: np.ndarray, *, axis: int) -> np.ndarray:
    """The median of ``values`` where ``keep`` along ``axis``; NaN where nothing is kept."""
    kept = np.ma.masked_array(values, mask=~keep)
    return np.ma.median(kept, axis=axis).astype(np.float64).filled(np.nan)


def check_hu_plausible(hu: np.ndarray, path_of: Callable[[int, int], tuple[PathLike, str]]
                       ) -> None:
    """Refuse images whose values are not CT numbers, or not scaled like the rest of the study.

    Each (frame, slice) image, on a regular sample of its pixels, must have its median within
    :data:`HU_RANGE` (padding at or below -1500 HU left out, unless it is all the image holds)
    and its tissue (voxels above -500 HU) median at most the range's top; and
    the tissue median of a frame must stay near that of the same slice in the other frames
    (a wrong RescaleSlope or RescaleIntercept in one file moves it far), and an image may not
    be blank where the slice's other frames hold tissue, nor unlike them pixel by pixel (a
    damaged compressed image decodes to a plausible range but to other pixels: its median
    pixel lies more than :data:`_UNLIKE_HU` and :data:`_UNLIKE_FACTOR` times the other frames'
    from the slice's median over time). In a study without air at its level
    (:data:`_AIR_SHARE`), the voxels that enhance most must start at most
    :data:`ENHANCING_BASELINE_MAX_HU` (blood and brain): values stored without their rescale
    intercept (HU + 1024) put them near 1070.

    Parameters
    ----------
    hu : ndarray, shape (T, Z, Y, X)
        The study in HU.
    path_of : callable
        ``path_of(t, z)`` -> (path, where) naming the file of an image and, when the file holds
        several images, which one (e.g. ``"frame 3, slice 2: "``; else ``""``).
    """
    n_t, n_z, n_y, n_x = hu.shape
    step = max(1, int(np.ceil(np.sqrt(n_y * n_x / _SAMPLES_PER_IMAGE))))
    sample = hu[:, :, ::step, ::step].reshape(n_t, n_z, -1)
    # padding below air (-2048, -3024 outside the field of view) may fill most of an image that
    # was padded or cropped: the median of the rest, unless that is all there is; an image
    # without tissue has no tissue median (NaN). Masked medians: no warning to silence (a
    # warnings filter is process-wide, and crossing another thread's would outlive both)
    median = _median_where(sample, sample > _PADDING_HU, axis=2)
    median = np.where(np.isnan(median), np.median(sample, axis=2), median)
    tissue = _median_where(sample, sample > _TISSUE_HU, axis=2)
    reference = (_median_where(tissue, np.isfinite(tissue), axis=0) if n_t >= 3
                 else np.full(n_z, np.nan))
    lo, hi = HU_RANGE
    problems = [
        (median < lo) | (median > hi),
        tissue > hi,
        np.abs(tissue - reference[None, :]) > _TISSUE_JUMP_HU,
        np.isnan(tissue) & np.isfinite(reference)[None, :],
    ]
    bad = np.argwhere(np.logical_or.reduce(problems))
    if bad.size == 0:
        _check_slices_present(sample, path_of)
        _check_images_alike(sample, path_of)
        _check_beyond_ct(sample, path_of(0, 0)[0])
        _check_clipped(sample, path_of(0, 0)[0])
        _check_enhancing_baseline(sample, path_of(0, 0)[0])
        return
    t, z = (int(v) for v in bad[0])
    path, where = path_of(t, z)
    if problems[0][t, z]:
        what = (f"median {median[t, z]:.4g} HU is outside the {lo:g}..{hi:g} HU of CT "
                "images")
    elif problems[1][t, z]:
        what = f"tissue values have a median of {tissue[t, z]:.4g} HU, above {hi:g} HU"
    elif problems[3][t, z]:
        what = (f"no tissue (nothing above {_TISSUE_HU:g} HU), while this slice's other frames "
                f"have a tissue median of {reference[z]:.4g} HU: a blank image")
    else:
        what = (f"tissue median {tissue[t, z]:.4g} HU, while this slice's other frames have "
                f"{reference[z]:.4g} HU")
    more = f" ({len(bad)} images in all)" if len(bad) > 1 else ""
    raise InputError(path, f"{where}implausible CT numbers: {what}{more}; a wrong rescale "
                           "(RescaleSlope/RescaleIntercept, scl_slope) or not a CT image")


def _check_slices_present(sample: np.ndarray,
                          path_of: Callable[[int, int], tuple[PathLike, str]]) -> None:
    """Refuse a slice blanked in every frame between slices that are not (``sample`` (T, Z,
    N)): one value in every pixel and frame (a slice filled with 0, say), or no tissue in any
    frame (air, or a mask's fill). A head has no gap; each of such a slice's images is like its
    slice's other frames, so the image checks pass it, and the brain beyond it was lost from
    the maps. A blank slice at either end (beyond the head, or above a stripped brain) is
    left."""
    flat = np.asarray(sample.max(axis=(0, 2)) == sample.min(axis=(0, 2)))
    tissue = np.asarray((sample > _TISSUE_HU).any(axis=(0, 2)))
    blank = flat | ~tissue
    for z in np.flatnonzero(blank):
        if not ((~blank[:z]).any() and (~blank[z + 1:]).any()):
            continue
        path, _ = path_of(0, int(z))
        what = (f"holds one value ({float(sample[0, z, 0]):.4g}) in every pixel of every frame"
                if tissue[z] else
                f"holds no tissue (nothing above {_TISSUE_HU:g} HU) in any frame")
        raise InputError(path, f"slice {z} {what}, between slices that hold images: a missing "
                               "or blanked slice (a head has no gap)")


def _check_images_alike(sample: np.ndarray,
                        path_of: Callable[[int, int], tuple[PathLike, str]]) -> None:
    """Refuse an image unlike its slice's other frames (see :func:`check_hu_plausible`)."""
    if sample.shape[0] < 3:
        return
    over_time = np.median(sample, axis=0)
    apart = np.median(np.abs(sample - over_time[None]), axis=2)         # (T, Z)
    typical = np.median(apart, axis=0)
    bad = np.argwhere((apart > _UNLIKE_HU) & (apart > _UNLIKE_FACTOR * typical[None]))
    if bad.size == 0:
        return
    t, z = (int(v) for v in bad[0])
    path, where = path_of(t, z)
    more = f" ({len(bad)} images in all)" if len(bad) > 1 else ""
    raise InputError(path, f"{where}unlike this slice's other frames: its pixels lie a median "
                           f"{apart[t, z]:.4g} HU from the slice's values over the scan, the "
                           f"other frames' {typical[z]:.3g} HU{more}; a damaged image (corrupt "
                           "or truncated pixel data)?")


#: Most of a study's values above the CT scale's top (:data:`HU_RANGE`) are no CT numbers:
#: metal, the only thing that dense in a head, fills far less than this share of it.
_BEYOND_CT_SHARE = 0.02


def _check_beyond_ct(sample: np.ndarray, path: PathLike) -> None:
    """Refuse a study whose values lie above the CT scale's top in :data:`_BEYOND_CT_SHARE` of
    the samples or more: stored values read without their rescale (such as (HU + 1000) x 10,
    tissue then at about 10,000), which a study with much air (stored near 0) had passed."""
    share = float((sample > HU_RANGE[1]).mean())
    if share >= _BEYOND_CT_SHARE:
        raise InputError(path, f"implausible CT numbers: {share:.0%} of the values lie above "
                               f"{HU_RANGE[1]:g} HU, which only metal reaches in a head; stored "
                               "values read without their rescale (RescaleSlope/"
                               "RescaleIntercept, scl_slope/scl_inter)?")


def _check_clipped(sample: np.ndarray, path: PathLike) -> None:
    """Refuse values clipped below bone's level: a plateau at the study's highest value, in
    :data:`_CLIPPED_SHARE` of the samples or more and in half the frames or more (bone in
    every frame), values running up into it, and nothing above :data:`_CLIPPED_BELOW_HU`.
    The AIF and the VOF are then cut together, the partial-volume scaling sees nothing to
    correct, and CBF came out up to 5.8 times too high with no flag. A skull-stripped study
    has no such plateau."""
    top = float(sample.max())
    if top >= _CLIPPED_BELOW_HU:
        return
    at_top = sample == top
    share, frames = float(at_top.mean()), float(at_top.any(axis=(1, 2)).mean())
    # the values run up into the plateau (vessels, bone's edges), as an image cut at a level
    # does; a noise-free test image of constant tissue does not
    below = float(((sample < top) & (sample > top - 200.0)).mean())
    if share >= _CLIPPED_SHARE and frames >= 0.5 and below >= _CLIPPED_TAIL:
        raise InputError(path, f"implausible CT numbers: {share:.1%} of the values sit at the "
                               f"study's highest, {top:.4g} HU, in {frames:.0%} of the frames, "
                               "and nothing is denser: values clipped (a display window "
                               "applied on export, or too few bits)? A head CT holds bone "
                               f"far above {_CLIPPED_BELOW_HU:g} HU; export the full range")


def _check_enhancing_baseline(sample: np.ndarray, path: PathLike) -> None:
    """Refuse a study whose enhancing voxels start far above blood's HU (see
    :func:`check_hu_plausible`); ``sample`` (T, Z, N)."""
    if sample.shape[0] < 3:
        return
    if float(((sample > HU_RANGE[0]) & (sample < _TISSUE_HU)).mean()) >= _AIR_SHARE:
        return
    base = np.median(sample[:3], axis=0).ravel()
    peak = sample.max(axis=0).ravel()
    # neither dense before the bolus nor beyond the CT scale at any time (air stored as HU +
    # 1024 in an unsigned type wraps from 0 to 65535: a "rise" of 65,000 from 0)
    rise = np.where((base > _DENSE_HU) | (peak > HU_RANGE[1]), -np.inf, peak - base)
    k = max(20, int(rise.size * _ENHANCING_SHARE))
    if k >= rise.size:
        return
    top = np.argpartition(rise, -k)[-k:]
    if np.median(rise[top]) < _ENHANCEMENT_MIN_HU:
        return                                     # no bolus to tell blood by
    level = float(np.median(base[top]))
    if level > ENHANCING_BASELINE_MAX_HU:
        raise InputError(path, f"implausible CT numbers: the voxels that enhance start at "
                               f"{level:.4g} HU before the bolus (blood and brain are 20-60 HU); "
                               "stored values without their rescale intercept (HU + 1024: "
                               "RescaleIntercept, scl_inter)?")
