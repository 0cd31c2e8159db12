"""NIfTI reading and writing: 4D studies with a JSON timing sidecar, perfusion maps and masks.

On disk a study is (X, Y, Z, T) as NIfTI stores it; in memory it is (T, Z, Y, X). The NIfTI affine
maps the (X, Y, Z) data indices to mm, which is the affine convention of :mod:`ctperf.types`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from ctperf.errors import InputError, ValidationError
from ctperf.io.atomic import atomic_file
from ctperf.io.integrity import (
    check_frame_count,
    check_frame_times,
    check_hu_plausible,
    check_memory,
)
from ctperf.io.privacy import public_meta
from ctperf.types import CTPSeries, PerfusionMaps

__all__ = [
    "file_qform",
    "has_orientation",
    "is_nifti",
    "kept_qform",
    "nifti_space",
    "place_on_grid",
    "read_mask",
    "read_nifti_series",
    "read_on_grid",
    "read_volume",
    "reorient",
    "reorientation",
    "sidecar_path",
    "study_space",
    "unsheared_grid",
    "write_json",
    "write_maps_nifti",
    "write_series_nifti",
    "write_volume",
]

log = logging.getLogger(__name__)

_TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_SPACE_UNIT_MM = {"meter": 1000.0, "micron": 1e-3}

PathLike = str | os.PathLike[str]


def is_nifti(path: PathLike) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names."""
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def sidecar_path(path: PathLike) -> Path:
    """``study.nii.gz`` -> ``study.json`` (same stem, same folder)."""
    p = Path(path)
    stem = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
    return p.with_name(stem + ".json")


def write_json(obj: Any, path: PathLike) -> None:
    """Write JSON atomically; numpy scalars and arrays become plain numbers and lists."""

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot write {type(o).__name__} to JSON")

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default, allow_nan=True) + "\n")


def _open(path: PathLike) -> Any:
    """The image with its header read (pixels not yet): a NIfTI-1 or NIfTI-2 file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    try:
        img: Any = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(p, f"not a readable NIfTI file ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(p, f"not a readable NIfTI file (a {type(img).__name__})")
    return img


def _pixels(path: PathLike, img: Any, *, allow_nan: bool = False) -> np.ndarray:
    """All pixels as float32, after a full read that checks the whole file.

    nibabel reads only the bytes it needs, so a gzip stream with a bad CRC or a missing end
    would load silently: a ``.gz`` file is decompressed whole (which checks the CRC and length)
    and its image parsed from those bytes.
    """
    p = Path(path)
    shape = tuple(int(n) for n in img.header.get_data_shape())
    n_vox = int(np.prod(shape, dtype=np.int64))
    stored = np.dtype(img.header.get_data_dtype())
    if stored.fields is not None:  # RGB24, RGBA32: a picture's colours, not one value a voxel
        raise InputError(p, f"holds colour pixels ({', '.join(stored.names or ())}): a "
                            "picture (a screenshot or colour-coded map), not measured values")
    itemsize = stored.itemsize
    compressed = p.name.lower().endswith(".gz")
    check_memory(n_vox * (8 + itemsize * (2 if compressed else 1)), p,
                 what=f"the image's {n_vox} voxels {shape}")
    try:
        if compressed:
            with gzip.open(p, "rb") as f:
                raw = f.read()
            img = type(img).from_bytes(raw)
            del raw
        else:
            offset = getattr(img.dataobj, "offset", None) or img.header.get_data_offset()
            needed = int(offset) + n_vox * itemsize
            if p.stat().st_size < needed:
                raise InputError(p, f"truncated: {p.stat().st_size} bytes, the header "
                                    f"describes {needed}")
        data = np.asarray(img.dataobj, dtype=np.float32)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(p, f"damaged or truncated compressed file ({exc})") from None
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(p, f"not a readable NIfTI file ({exc})") from None
    if not np.all(np.isfinite(data) | (allow_nan & np.isnan(data))):
        raise InputError(p, f"contains {int(np.sum(~np.isfinite(data)))} NaN or Inf values")
    return data


def _affine(p: Path, img: Any, *, study: bool = False) -> np.ndarray:
    """The image's voxel -> RAS affine in mm: the header's spatial unit (metres, microns)
    converted; a missing or disagreeing orientation logged, as nibabel resolves it (sform, then
    qform, then a guess from the voxel sizes)."""
    header = img.header
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    unit = header.get_xyzt_units()[0]
    if unit in _SPACE_UNIT_MM:
        affine[:3] *= _SPACE_UNIT_MM[unit]
        log.info("%s: spatial unit %s, converted to mm", p, unit)
    elif unit not in ("mm", "unknown"):
        raise InputError(p, f"the header's spatial unit is {unit!r}, not a length")
    codes = (int(header.get("sform_code", 0)), int(header.get("qform_code", 0)))
    if codes[0] == 0:  # without an sform the voxel size is pixdim's
        zooms = _stored_zooms(p, img)
        if not np.all(np.abs(zooms) > 0):
            raise InputError(p, f"the header's voxel size (pixdim[1:4]) is {zooms.tolist()} mm "
                                "and it has no sform: a size of 0 is unknown (volumes in mL "
                                "would be wrong); fix the header")
    if codes == (0, 0):
        log.warning("%s: neither sform nor qform is set; orientation guessed from the voxel "
                    "sizes (check left and right)", p)
    elif _own_qform(img) is not None:  # a study's is news; each map of a set has it again
        log.log(logging.WARNING if study else logging.INFO,
                "%s: sform and qform disagree; the sform is used (ITK-based viewers may place "
                "the image by its qform; NIfTI that ctperf writes from it keeps both)", p)
    return affine


def _own_qform(img: Any) -> dict[str, Any] | None:
    """A qform that disagrees with the image's sform (both set), as ``{"affine": 4 x 4 list in
    mm, "code": int}``, for written NIfTI to keep (:func:`nifti_space`); None where the two agree
    or the qform is the unsheared grid ctperf writes beside a tilted gantry's sform."""
    header = img.header
    if min(int(header.get("sform_code", 0)), int(header.get("qform_code", 0))) <= 0:
        return None
    sform, qform = header.get_sform(), header.get_qform()
    if np.allclose(sform, qform, atol=1e-3) \
            or np.allclose(qform, unsheared_grid(sform, img.shape[:3]), atol=1e-3):
        return None
    qform = np.asarray(qform, dtype=np.float64)
    qform[:3] *= _SPACE_UNIT_MM.get(header.get_xyzt_units()[0], 1.0)
    return {"affine": qform.tolist(), "code": int(header["qform_code"])}


def _stored_zooms(p: Path, img: Any) -> np.ndarray:
    """pixdim[1:4] as the file stores them (nibabel sets a 0 to 1 when it loads a header)."""
    try:
        with ImageOpener(str(p)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
    except Exception:  # read once already: only a race could fail it here
        raw = img.header
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def has_orientation(path: PathLike) -> bool:
    """Whether a NIfTI file's header sets an sform or a qform (else its affine is a guess)."""
    return xform_code(_open(path).header) != 0


def xform_code(header: Any) -> int:
    """The NIfTI space a header's affine is in: its sform's code, else its qform's (1 scanner,
    2 aligned, 3 Talairach, 4 MNI, 5 template); 0 when neither is set and the orientation
    is a guess. Maps written from a study keep its code (:func:`write_volume`)."""
    sform = int(header.get("sform_code", 0))
    return sform if sform > 0 else int(header.get("qform_code", 0))


def _load(path: PathLike, *, allow_nan: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
    img = _open(path)
    data = _pixels(path, img, allow_nan=allow_nan)
    return data, _affine(Path(path), img), img.header


def _numbers(value: Any, side: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A sidecar entry as a float64 array of ``shape``, or InputError saying what it holds."""
    def numeric(v: Any) -> bool:
        if isinstance(v, list):
            return all(numeric(x) for x in v)
        return isinstance(v, int | float) and not isinstance(v, bool)

    unit = "seconds" if key != "SliceTimes" else "seconds, one list per frame"
    if not isinstance(value, list) or not numeric(value):
        raise InputError(side, f"{key} must be a list of numbers ({unit}), got "
                               f"{json.dumps(value)[:60]}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except ValueError:  # ragged lists
        raise InputError(side, f"{key} must be a list of numbers ({unit}) of shape "
                               f"{shape}, got lists of different lengths") from None
    if arr.shape != shape:
        what = (f"has shape {arr.shape}, expected (frames, slices) = {shape}"
                if key == "SliceTimes" else
                f"has {arr.size} entries, the image has {shape[0]} slices"
                if key == "SliceTiming" else
                f"has {arr.size} entries, the image has {shape[0]} frames")
        raise InputError(side, f"{key} {what}")
    if not np.all(np.isfinite(arr)):
        raise InputError(side, f"{key} contains NaN or Inf")
    return arr


def _read_sidecar(side: Path, n_frames: int, n_slices: int, *, timing: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None,
                             dict[str, Any], str]:
    """(frame times, SliceTimes, BIDS SliceTiming offsets, meta, the frame times' key) of a
    study's JSON sidecar, each checked; without ``timing`` (a frame interval given instead)
    its times are neither read nor checked."""
    try:
        info = json.loads(side.read_text(encoding="utf-8-sig"))  # a byte-order mark too
    except OSError as exc:
        raise InputError(side, f"cannot read the sidecar ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(side, f"sidecar is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise InputError(side, "sidecar must be a JSON object such as {\"FrameTimes\": [...]}, "
                               f"got a {type(info).__name__}")
    meta = info.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(side, f"sidecar's meta must be a JSON object, got "
                               f"{type(meta).__name__}")
    if not timing:
        return None, None, None, dict(meta), "FrameTimes"
    # BIDS (PET) writes the frames' start times as FrameTimesStart
    key = "FrameTimes" if info.get("FrameTimes") is not None else "FrameTimesStart"
    times = (_numbers(info[key], side, key, (n_frames,))
             if info.get(key) is not None else None)
    if times is None and info.get("RepetitionTime") is not None:
        # BIDS' time between volumes (s), as dcm2niix and the ISLES 2024 sidecars give it
        key = "RepetitionTime"
        step = info[key]
        if not isinstance(step, int | float) or isinstance(step, bool) or not step > 0:
            raise InputError(side, f"RepetitionTime must be a number of seconds > 0, got "
                                   f"{json.dumps(step)[:60]}")
        times = float(step) * np.arange(n_frames, dtype=np.float64)
    slice_times = (_numbers(info["SliceTimes"], side, "SliceTimes", (n_frames, n_slices))
                   if info.get("SliceTimes") is not None else None)
    offsets = None
    if slice_times is None and info.get("SliceTiming") is not None:
        # BIDS (dcm2niix): each slice's time within its frame, along the slice axis
        direction = str(info.get("SliceEncodingDirection", "k"))
        if direction != "k":
            log.warning("%s: SliceTiming along %r (not the third axis, k) is not applied: the "
                        "slices are taken at their frame's time", side, direction)
        else:
            offsets = _numbers(info["SliceTiming"], side, "SliceTiming", (n_slices,))
    return times, slice_times, offsets, dict(meta), key


def _pixdim_step(header: Any) -> tuple[str, float, float | None]:
    """The header's time unit, pixdim[4] and the frame spacing it gives in s (an unknown unit
    taken as s; None when the unit is not a time)."""
    unit = header.get_xyzt_units()[1]
    pixdim = float(header["pixdim"][4])
    if unit not in _TIME_UNIT_SECONDS and unit != "unknown":
        return unit, pixdim, None
    return unit, pixdim, pixdim * _TIME_UNIT_SECONDS.get(unit, 1.0)


def _pixdim_times(p: Path, header: Any, n_frames: int) -> tuple[np.ndarray, str]:
    """Frame times from pixdim[4] in the header's time unit (unknown is taken as s)."""
    unit, pixdim, step = _pixdim_step(header)
    if step is None:
        raise InputError(p, f"the header's 4th axis unit is {unit!r}, not a time; give the "
                            "frame spacing with --frame-interval SECONDS or a JSON sidecar "
                            "with FrameTimes")
    if unit == "unknown" and pixdim == 1.0:
        raise InputError(p, "no frame timing: pixdim[4] is 1 with no time unit, the default "
                            "many writers leave, not a measured frame spacing; give the "
                            "frame spacing with --frame-interval SECONDS or a JSON sidecar "
                            "with FrameTimes")
    if unit == "unknown" and step > 0:
        log.warning("%s: pixdim[4] %g has no time unit; taken as seconds between frames "
                    "(--frame-interval SECONDS if not)", p, pixdim)
    elif unit == "sec" and pixdim == 1.0:
        log.warning("%s: pixdim[4] is 1 %s, which writers such as ITK also leave when the "
                    "frame spacing was never set; taken as the frame spacing (give "
                    "--frame-interval SECONDS or a JSON sidecar with FrameTimes if not)",
                    p, unit)
    if not step > 0:
        sidecar = ("its JSON sidecar has no FrameTimes or RepetitionTime"
                   if sidecar_path(p).exists() else "there is no JSON sidecar with FrameTimes")
        raise InputError(p, f"no frame timing: pixdim[4] is {pixdim:g} and {sidecar}; give "
                            "the frame spacing with --frame-interval SECONDS")
    source = f"pixdim[4] ({unit if unit != 'unknown' else 'unknown unit, taken as s'})"
    return np.arange(n_frames, dtype=np.float64) * step, source


def _replaced_times_warning(p: Path, header: Any, side: Path, frame_interval: float,
                            n_frames: int, n_slices: int) -> None:
    """Warn when ``frame_interval`` replaces frame times the file holds (its sidecar's, else a
    pixdim[4] the reader would take: in a time unit, or none and not 1) that step otherwise:
    the DICOM reader says so too, and a cohort's script passing it for every study had read
    each NIfTI's 0.5 s frames as 1 s (CBF halved) in silence."""
    own, key = None, "pixdim[4]"
    with contextlib.suppress(InputError):
        if side.exists():
            own, _, _, _, key = _read_sidecar(side, n_frames, n_slices)
        unit, pixdim, step = _pixdim_step(header)
        # a pixdim[4] the reader would take: not 1 with no unit (writers leave it so)
        if own is None and step is not None and step > 0 and (unit, pixdim) != ("unknown", 1.0):
            own = np.arange(n_frames, dtype=np.float64) * step
    if own is None or own.size < 2:
        return
    steps = np.diff(own)
    if np.max(np.abs(steps - frame_interval)) > 0.01 * frame_interval:
        log.warning("%s: frame_interval %g s replaces the file's own frame times (%s: steps "
                    "of %g-%g s); leave --frame-interval out to read them", p, frame_interval,
                    key, float(steps.min()), float(steps.max()))


def _check_slice_timing(offsets: np.ndarray, times: np.ndarray, side: Path) -> None:
    """Refuse BIDS SliceTiming offsets that do not lie within a frame: each at least 0 and
    under the shortest step between frames (BIDS: under RepetitionTime). Milliseconds had put a
    study's frames 375 s late, and offsets of whole frames had doubled its hypoperfused
    volume, exit 0."""
    step = float(np.diff(times).min()) if times.size > 1 else np.inf
    if float(offsets.min()) >= 0.0 and float(offsets.max()) < step:
        return
    top = float(offsets.max())
    hint = ("; milliseconds? BIDS gives seconds"
            if float(offsets.min()) >= 0.0 and 10.0 * step < top < 1000.0 * step else "")
    raise InputError(side, f"SliceTiming runs from {float(offsets.min()):.4g} to "
                           f"{float(offsets.max()):.4g} s, outside a frame (0 to the {step:.4g} s "
                           f"between frames){hint}")


def _compare_pixdim(p: Path, header: Any, times: np.ndarray, key: str) -> None:
    """Warn when the header's frame spacing (pixdim[4], if given) lies outside the sidecar's
    steps by more than 10 %: one of them is wrong, and the sidecar is the one used. A bare 1
    without a unit is the default writers leave when they set none (refused as a spacing
    without a sidecar): nothing to compare."""
    unit, pixdim, step = _pixdim_step(header)
    if step is None or not step > 0 or len(times) < 2 or (pixdim == 1.0 and unit == "unknown"):
        return
    steps = np.diff(times)
    if 0.9 * steps.min() <= step <= 1.1 * steps.max():
        return
    lo, hi = float(steps.min()), float(steps.max())
    span = f"{lo:.4g} s" if np.isclose(lo, hi, rtol=1e-3) else f"{lo:.4g}-{hi:.4g} s"
    log.warning("%s: pixdim[4] gives %.4g s between frames, the sidecar's %s %s; the sidecar's "
                "times are used (give --frame-interval if they are wrong)", p, step, key, span)


def read_nifti_series(path: PathLike, *, frame_interval: float | None = None) -> CTPSeries:
    """Read a 4D NIfTI (X, Y, Z, T) study.

    Frame times are ``frame_interval`` s apart when it is given (the header's and sidecar's
    timing are then not used: files whose ``pixdim[4]`` is 0 or wrong); else they come from
    the JSON sidecar's ``FrameTimes`` (seconds; BIDS' ``FrameTimesStart`` too, or BIDS'
    ``RepetitionTime`` as the step) when present, else from ``pixdim[4]`` in the
    header's time unit (s, ms or us; unknown is taken as s). A sidecar's ``SliceTimes``
    (T x Z, not with ``frame_interval``) and ``meta`` are kept. Header, sidecar and timing are
    checked before the pixels are read; the whole file is read (a compressed file's CRC checked) and
    every image's values checked to be CT numbers. Voxels NaN in every frame (a mask applied
    outside the brain) are read as air, -1024 HU.

    Raises
    ------
    ctperf.errors.InputError
        Naming the file: not 4D, fewer than three frames, damaged, implausible timing or
        values, a malformed sidecar, or more voxels than memory holds.
    """
    p = Path(path)
    img = _open(p)
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) != 4:
        single = [n for n, axis in ((4, 3), (5, 4)) if len(shape) == 5 and shape[axis] == 1]
        remedy = (f"; remove its singleton {single[0]}th axis to make it (X, Y, Z, T)"
                  if single else "")
        raise InputError(p, f"a CTP study must be 4D (X, Y, Z, T), this file is {len(shape)}D "
                            f"with shape {shape}{remedy}")
    n_frames, n_slices = shape[3], shape[2]
    check_frame_count(n_frames, p)
    if n_frames < 10 <= max(shape[:3]):
        log.warning("%s: only %d frames along the 4th axis, %d along the first; ctperf reads "
                    "(X, Y, Z, T): is the time axis stored elsewhere?", p, n_frames, shape[0])
    side = sidecar_path(p)
    meta: dict[str, Any] = {}
    times = slice_times = offsets = None
    key = "FrameTimes"
    if side.exists():
        times, slice_times, offsets, meta, key = _read_sidecar(
            side, n_frames, n_slices, timing=frame_interval is None)
    if frame_interval is not None:
        if not frame_interval > 0:
            raise InputError(p, f"frame_interval must be > 0 s, got {frame_interval}")
        times, slice_times = frame_interval * np.arange(n_frames, dtype=np.float64), None
        source, where = f"frame_interval {frame_interval:g} s", p
        check_frame_times(times, p, source="frame_interval")
        _replaced_times_warning(p, header, side, frame_interval, n_frames, n_slices)
    elif times is not None:
        source, where = f"sidecar {key}", side
        check_frame_times(times, side, source=key)
        _compare_pixdim(p, header, times, key)
    else:
        times, source = _pixdim_times(p, header, n_frames)
        where = p
        check_frame_times(times, p, source="pixdim[4]")
    if slice_times is not None and frame_interval is None:
        # ctperf writes both; one edited without the other had been read silently, the
        # slices' times winning
        apart = np.abs(slice_times.mean(axis=1) - times)
        if apart.max() > 1e-3:
            k = int(np.argmax(apart))
            raise InputError(side, f"the frame times ({source.removeprefix('sidecar ')}) and "
                                   f"SliceTimes disagree: frame {k} at {times[k]:g} s, its "
                                   f"slices' mean at {slice_times[k].mean():g} s (one edited "
                                   "without the other?); change both, or remove SliceTimes")
    if offsets is not None:
        _check_slice_timing(offsets, times, side)
        slice_times = times[:, None] + offsets[None, :]
        # a frame's time is its slices' mean, as the DICOM reader and CTPSeries take it (the
        # frame's start had put a converted copy's frames 0.375 s apart from the original's,
        # and its slices were moved onto the frames by that much more)
        times = slice_times.mean(axis=1)
        source += " and SliceTiming"
    meta["timing_source"] = source
    meta["nifti_xform_code"] = xform_code(header)
    meta.pop("nifti_qform", None)  # the header read decides, not a sidecar's record of another
    if (qform := _own_qform(img)) is not None:
        meta["nifti_qform"] = qform
    data = _masked_as_air(p, _pixels(p, img, allow_nan=True))
    hu = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    del data
    check_hu_plausible(hu, lambda t, z: (p, f"frame {t}, slice {z}: "))
    try:
        return CTPSeries(hu=hu, times=times, affine=_affine(p, img, study=True),
                         slice_times=slice_times, meta=meta)
    except ValidationError as exc:
        geometry = "affine" in str(exc)            # the image's header, not the sidecar
        raise InputError(p if geometry else where if slice_times is None else side,
                         str(exc)) from None


#: The value given to a study's voxels that are NaN in every frame (:func:`_masked_as_air`).
MASKED_HU = -1024.0


def _masked_as_air(p: Path, data: np.ndarray) -> np.ndarray:
    """A 4D study (X, Y, Z, T) with its voxels that are NaN in every frame (what a mask left
    out: a skull-stripped study stored with NaN outside the brain) set to :data:`MASKED_HU`,
    air, with a warning; a voxel NaN in some frames only is damage, refused."""
    nan = np.isnan(data)
    if not nan.any():
        return data
    masked = nan.all(axis=3)
    if masked.all():
        raise InputError(p, "every voxel is NaN: no image")
    partial = int(np.count_nonzero(nan.any(axis=3) & ~masked))
    if partial:
        raise InputError(p, f"{partial} voxels are NaN in some frames and not in others: "
                            "damaged values")
    data[masked] = MASKED_HU
    log.warning("%s: %d voxels are NaN in every frame (a mask applied outside the head or "
                "brain, or holes cut in it): read as air (%g HU), which no brain mask holds",
                p, int(masked.sum()), MASKED_HU)
    return data


def write_series_nifti(series: CTPSeries, path: PathLike, *, dtype: str = "float32") -> Path:
    """Write a study as 4D NIfTI plus a JSON sidecar (FrameTimes, SliceTimes, meta; and BIDS'
    FrameTimesStart, each frame's first slice's time, for other tools).

    The sidecar's meta carries no patient identity (:func:`ctperf.io.privacy.public_meta`):
    scanner, kVp, mAs and timing stay; names, IDs, dates, institution, UIDs and absolute paths
    do not.

    ``dtype="int16"`` rounds HU to integers, as scanners store them (4x smaller files).
    """
    p = Path(path)
    data = series.hu.transpose(3, 2, 1, 0)
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
    img = _image(data, series.affine, "CT perfusion study, HU", **nifti_space(series.meta))
    zooms = [*img.header.get_zooms()[:3], series.frame_interval]
    img.header.set_zooms(zooms)
    side: dict[str, Any] = {"FrameTimes": series.times, "meta": public_meta(series.meta)}
    # BIDS' keys too, for other tools: the header holds one step only (the median)
    side["FrameTimesStart"] = series.times
    if series.slice_times is not None:
        side["SliceTimes"] = series.slice_times
        side["FrameTimesStart"] = series.slice_times.min(axis=1)
    with atomic_file(p) as tmp:
        nib.save(img, str(tmp))
        # the sidecar whole before the image takes its name (a full disk had left the image
        # alone, read then with its header's even frame steps)
        write_json(side, sidecar_path(p))
    return p


def _image(data: np.ndarray, affine: np.ndarray, description: str, *,
           code: int = 1, qform: Mapping[str, Any] | None = None) -> nib.Nifti1Image:
    """A NIfTI image in mm and s whose sform holds ``affine``, and its qform too where a qform
    can, so that tools reading only one agree, both with the space ``code`` (:func:`xform_code`;
    1, scanner, for DICOM studies and phantoms); ``description`` in the header's descrip. With
    code 0 (a study whose header set no orientation) both stay unset, as in the study, so that
    no tool takes the guessed orientation for a known one. A tilted gantry's sheared grid,
    which a qform cannot hold, gets :func:`unsheared_grid` as its qform: tools that need
    orthogonal axes (ITK, and so ITK-SNAP and Slicer) open the file on that grid, while the
    sform, which the others read, keeps the tilt. ``qform``: a study's own qform that disagreed
    with its sform (:func:`nifti_space`), written as it was, so that each viewer shows the
    outputs where it shows the study."""
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    if qform is not None:
        img.set_qform(np.asarray(qform["affine"], dtype=np.float64), code=int(qform["code"]))
    else:
        img.set_qform(affine, code=code)
        if not np.allclose(img.get_qform(), affine, atol=1e-4):
            img.set_qform(unsheared_grid(affine, data.shape[:3]), code=code)
    img.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return img


def unsheared_grid(affine: np.ndarray, shape_xyz: Iterable[int]) -> np.ndarray:
    """The grid without shear nearest a tilted gantry's sheared ``affine``: the in-plane axes and
    pixel spacing as they are, the slices stacked along the planes' normal at the spacing
    measured along it, and the volume's centre where the sheared grid has it. Its voxels lie
    within half the slab's shear of their true place (2.7 mm for 4 slices of 5 mm at 20
    degrees); a nearest rotation about the first voxel (nibabel's qform) had tilted the planes by
    about half the gantry angle, tens of mm off at the far slices. ``shape_xyz``: the array's
    shape in NIfTI order (x, y, z)."""
    a = np.asarray(affine, dtype=np.float64)
    cols = a[:3, :3]
    normal = np.cross(cols[:, 0], cols[:, 1])
    normal /= np.linalg.norm(normal)
    grid = np.eye(4)
    grid[:3, :3] = np.column_stack([cols[:, 0], cols[:, 1], normal * float(cols[:, 2] @ normal)])
    centre = (np.asarray(list(shape_xyz)[:3], dtype=np.float64) - 1) / 2
    grid[:3, 3] = cols @ centre + a[:3, 3] - grid[:3, :3] @ centre
    return grid


def write_volume(volume: np.ndarray, affine: np.ndarray, path: PathLike,
                 *, sidecar: Mapping[str, Any] | None = None, code: int = 1,
                 qform: Mapping[str, Any] | None = None, description: str | None = None
                 ) -> Path:
    """Write one (Z, Y, X) volume (map or mask) as 3D NIfTI; booleans are stored as uint8.
    ``code``: the NIfTI space of ``affine`` (the study's, :func:`xform_code`); ``qform``: the
    study's own qform where it disagreed with its sform (:func:`nifti_space` gives both);
    ``description``: the header's descrip (79 characters; default the sidecar's map and
    units)."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValidationError(f"volume must be 3D (Z, Y, X), got shape {vol.shape}")
    if vol.dtype == bool:
        vol = vol.astype(np.uint8)
    what = "" if sidecar is None else f"{sidecar.get('map', '')} {sidecar.get('units', '')}"
    img = _image(vol.transpose(2, 1, 0), affine, description or what.strip(), code=code,
                 qform=qform)
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))
        if sidecar is not None:  # whole before the image takes its name
            write_json(dict(sidecar), sidecar_path(path))
    return Path(path)


def read_volume(path: PathLike, *, allow_nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as ((Z, Y, X) float32 array, affine); maps may hold NaN (no fit)."""
    p = Path(path)
    data, affine, _ = _load(p, allow_nan=allow_nan)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(p, f"expected a 3D volume, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine


#: How to turn a (Z, Y, X) array onto another grid: the axes' new order and which (new) axes
#: to reverse (:func:`reorientation`).
Turn = tuple[tuple[int, int, int], tuple[bool, bool, bool]]


def reorientation(affine: np.ndarray, shape: tuple[int, int, int], target: np.ndarray, *,
                  atol_mm: float = 1e-3,
                  target_shape: tuple[int, ...] | None = None) -> Turn | None:
    """How to put a (Z, Y, X) grid with ``affine`` onto the grid of ``target``, when both hold
    the same voxels stored in another order (axes swapped or reversed, as another tool's NIfTI
    may store them): for :func:`reorient`; None when they do not (another position, spacing or
    rotation, or, when ``target_shape`` is given, another extent)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

    a, t = np.asarray(affine, dtype=np.float64), np.asarray(target, dtype=np.float64)
    ornt = ornt_transform(io_orientation(a), io_orientation(t))  # on the (x, y, z) axes
    if not np.allclose(a @ inv_ornt_aff(ornt, tuple(shape)[::-1]), t, atol=atol_mm):
        return None
    # (x, y, z) axis i goes to axis ornt[i, 0], reversed when ornt[i, 1] < 0; in (Z, Y, X)
    # order, axis k is (x, y, z) axis 2 - k
    order, flips = [0, 0, 0], [False, False, False]
    for i, (dest, sign) in enumerate(ornt):
        order[2 - int(dest)] = 2 - i
        flips[2 - int(dest)] = bool(sign < 0)
    if target_shape is not None and tuple(shape[k] for k in order) != tuple(target_shape):
        return None
    return (order[0], order[1], order[2]), (flips[0], flips[1], flips[2])


def reorient(arr: np.ndarray, how: Turn) -> np.ndarray:
    """``arr`` (Z, Y, X) on the grid :func:`reorientation` found, a new contiguous array."""
    order, flips = how
    out = np.transpose(arr, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return np.ascontiguousarray(out)


def read_on_grid(path: PathLike, *, shape: tuple[int, ...], affine: np.ndarray,
                 atol_mm: float = 1e-3, qform: np.ndarray | None = None,
                 notes: list[str] | None = None) -> np.ndarray:
    """Read a 3D volume onto the grid ``shape``/``affine``: as stored, or turned onto it when
    it holds the same voxels in another order (axes swapped or reversed, as another tool may
    write it); another grid (position, spacing, rotation or extent) is refused. A file without
    orientation (as MATLAB's save_nii writes) of the same shape is taken as stored, and so is
    one on ``qform``, the study's own qform that disagreed with its sform (:func:`kept_qform`):
    a tool placing the study by it (ITK's, where the sform is not in scanner space) saves a
    mask drawn on it there. Those two are warned of, and the warnings also appended to
    ``notes`` (each led by the file's name) when it is given, for a report."""
    return place_on_grid(path, shape=shape, affine=affine, atol_mm=atol_mm, qform=qform,
                         notes=notes)[0]


def place_on_grid(path: PathLike, *, shape: tuple[int, ...], affine: np.ndarray,
                  atol_mm: float = 1e-3, qform: np.ndarray | None = None,
                  notes: list[str] | None = None) -> tuple[np.ndarray, str]:
    """:func:`read_on_grid`, and how the file was placed: ``"as stored"``, ``"qform"``,
    ``"unoriented"`` (no sform or qform: taken voxel for voxel), ``"unsheared"`` or
    ``"turned"`` (its voxels stored in another order)."""
    vol, own = read_volume(path)

    def warn(text: str) -> None:
        log.warning("%s: %s", path, text)
        if notes is not None:
            notes.append(f"{Path(path).name}: {text}")

    if vol.shape == tuple(shape) and np.allclose(own, affine, atol=atol_mm):
        return vol, "as stored"
    if vol.shape == tuple(shape) and qform is not None and np.allclose(own, qform, atol=atol_mm):
        warn("on the study's own qform, where ITK-based tools place the study (its sform is "
             "not in scanner space): taken voxel for voxel, as drawn there; a mask drawn on "
             "the sform's geometry and saved turned onto the qform's axes would read "
             "mirrored: check it")
        return vol, "qform"
    if vol.shape == tuple(shape) and not has_orientation(path):
        warn("no orientation (neither sform nor qform); taken voxel for voxel on the grid of "
             "the same shape it is compared with, which pairs the wrong voxels if it is "
             "stored mirrored")
        return vol, "unoriented"
    if vol.shape == tuple(shape) and np.allclose(own, unsheared_grid(affine, shape[::-1]),
                                                 atol=atol_mm):
        log.info("%s: on the unsheared grid of the tilted study (the qform ctperf writes, which "
                 "ITK tools use); taken voxel for voxel", path)
        return vol, "unsheared"
    how = reorientation(own, vol.shape, affine, atol_mm=atol_mm, target_shape=tuple(shape))
    if how is None:
        axes = (" the same spacing and first voxel, other axes (a rotation or a gantry tilt);"
                if _where(own) == _where(affine) else "")
        raise InputError(path, f"grid {vol.shape} (Z, Y, X), {_where(own)}, differs from the "
                               f"study's {tuple(shape)}, {_where(affine)} (another position, "
                               f"spacing, rotation or extent;{axes} a file without orientation "
                               "is read as 1 mm voxels at 0); resample it onto the study first")
    return reorient(vol, how), "turned"


def _where(affine: np.ndarray) -> str:
    """Voxel size (x, y, z) and first voxel's position (RAS) of an affine, for messages."""
    size = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    fmt = ", ".join
    return (f"voxels {fmt(f'{v:.3g}' for v in size)} mm with the first at "
            f"({fmt(f'{v:.4g}' for v in np.asarray(affine)[:3, 3])}) mm")


def read_mask(path: PathLike, *, shape: tuple[int, int, int], affine: np.ndarray,
              atol_mm: float = 1e-3, qform: np.ndarray | None = None) -> np.ndarray:
    """Read a 3D mask (nonzero = inside) on the grid ``shape``/``affine``
    (:func:`read_on_grid`)."""
    try:
        vol = read_on_grid(path, shape=shape, affine=affine, atol_mm=atol_mm, qform=qform)
    except InputError as exc:
        raise InputError(path, f"mask {exc.problem}") from None
    mask = vol != 0
    if not mask.any():
        raise InputError(path, "mask is empty")
    return mask


def nifti_space(record: Mapping[str, Any]) -> dict[str, Any]:
    """The NIfTI space written images keep, from a study's meta or its maps' provenance:
    ``{"code": ..., "qform": ...}`` for :func:`write_volume`. The code is the study's
    (``nifti_xform_code``; 1, scanner, when the study was not a NIfTI file); the qform is the
    study's own where it disagreed with its sform (``nifti_qform``), else None."""
    qform = record.get("nifti_qform")
    return {"code": int(record.get("nifti_xform_code", 1)),
            "qform": qform if isinstance(qform, Mapping) else None}


def file_qform(path: PathLike) -> dict[str, Any] | None:
    """The qform of a NIfTI file that disagrees with its sform (``{"affine", "code"}``), as
    :func:`read_nifti_series` records it for a study; None where the two agree."""
    return _own_qform(_open(Path(path)))


def kept_qform(record: Mapping[str, Any]) -> np.ndarray | None:
    """The study's own qform (4 x 4, mm) that disagreed with its sform, from its meta or its
    maps' provenance (:func:`nifti_space`), where ITK places the study by it: its sform is not
    in scanner space (code 1; ITK takes such an sform). None otherwise."""
    space = nifti_space(record)
    if space["qform"] is None or space["code"] == 1:
        return None
    return np.asarray(space["qform"]["affine"], dtype=np.float64)


def study_space(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a study's meta that :func:`nifti_space` reads, for its maps' provenance."""
    return {k: meta[k] for k in ("nifti_xform_code", "nifti_qform") if k in meta}


def write_maps_nifti(maps: PerfusionMaps, folder: PathLike,
                     *, names: Iterable[str] | None = None) -> list[Path]:
    """Write each map as ``<folder>/<name>.nii.gz`` with a sidecar of units and provenance."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names if names is not None else maps.names:
        sidecar = {"map": name, "units": maps.units[name], **public_meta(maps.provenance)}
        written.append(write_volume(maps[name], maps.affine, out / f"{name}.nii.gz",
                                    sidecar=sidecar, **nifti_space(maps.provenance)))
    return written
