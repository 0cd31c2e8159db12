"""Header values and completeness of a DICOM series, checked before any pixel is decoded.

Numbers are parsed once, here, with errors naming the file; a series must hold each (frame,
slice) image exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ctperf.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["RELATIVE_TIME_TAGS", "TIME_TAGS", "Header", "check_copies", "check_duplicates",
           "check_frame_counts", "check_temporal_positions", "number", "numbers",
           "optional_number", "relative_name", "rescale_of", "rescales", "same_image",
           "states_fraction", "time_of", "trim_unfinished_pass"]

_EPOCH = dt.datetime(1970, 1, 1)

# The timing tags, in the order the reader tries them: clock times first, then the times in ms
# from the start of the acquisition (FrameReferenceTime, TriggerTime) as a last resort.
TIME_TAGS = ("AcquisitionDateTime", "AcquisitionTime", "ContentTime", "FrameReferenceTime",
             "TriggerTime")
RELATIVE_TIME_TAGS = ("FrameReferenceTime", "TriggerTime")

# Tags that together tell two images of one slice apart; files equal in all are copies.
_IDENTITY_TAGS = (*TIME_TAGS, "TemporalPositionIndex", "TemporalPositionIdentifier",
                  "AcquisitionNumber", "InstanceNumber")


@dataclass(frozen=True)
class Header:
    """What the header pass keeps of one image: a file, or one frame of a multi-frame file
    (``frame``, 0-based; its ``ds`` then holds that frame's flattened functional groups)."""

    path: Path
    ds: pydicom.Dataset
    frame: int | None = None

    def get(self, keyword: str, default: Any = None) -> Any:
        try:
            value = self.ds.get(keyword, default)
        except Exception as exc:  # pydicom raises several types for malformed elements
            raise InputError(self.path, f"unreadable {keyword} ({exc})") from None
        return default if value is None or value == "" else value


def _parse_time(text: str) -> float | None:
    """DICOM TM (HHMMSS.frac, or the old HH:MM:SS) -> seconds of the day."""
    text = str(text).strip().replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        hours, minutes = int(text[:2]), int(text[2:4] or 0)
        seconds = float(text[4:] or 0)
    except ValueError:
        return None
    if not (hours < 24 and minutes < 60 and 0 <= seconds < 61):
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds


def _parse_date(text: str) -> float:
    """DICOM DA (YYYYMMDD) -> seconds since 1970, 0 when absent."""
    try:
        return (dt.datetime.strptime(str(text).strip()[:8], "%Y%m%d") - _EPOCH).total_seconds()
    except ValueError:
        return 0.0


def time_of(h: Header, tag: str) -> float | None:
    """Seconds of one timing tag of :data:`TIME_TAGS` (since 1970 when a date is known: the
    tag's own, else the series' or the study's; from the start of the acquisition for
    :data:`RELATIVE_TIME_TAGS`), or None when absent or not a time."""
    value = h.get(tag)
    if value is None:
        return None
    if tag in RELATIVE_TIME_TAGS:  # DS, milliseconds
        try:
            ms = float(str(value).strip())
        except ValueError:
            return None
        return ms / 1000.0 if np.isfinite(ms) else None
    if tag == "AcquisitionDateTime":
        text = str(value).strip()
        for sign in "+-":  # drop a UTC offset suffix
            if sign in text[8:]:
                text = text[: 8 + text[8:].index(sign)]
        if len(text) < 8:
            return None
        seconds = _parse_time(text[8:]) if len(text) > 8 else 0.0
        return None if seconds is None else _parse_date(text[:8]) + seconds
    seconds = _parse_time(value)
    if seconds is None:
        return None
    date_tag = "AcquisitionDate" if tag == "AcquisitionTime" else "ContentDate"
    return _parse_date(h.get(date_tag) or h.get("SeriesDate") or h.get("StudyDate") or "") \
        + seconds


def states_fraction(h: Header, tag: str) -> bool:
    """Whether a clock tag's text gives fractions of a second (``HHMMSS.ffffff``): its whole
    seconds are then readings to that precision, not a clock truncated to the second."""
    value = h.get(tag)
    if value is None or tag in RELATIVE_TIME_TAGS:
        return False
    text = str(value).strip()
    return "." in (text[8:] if tag == "AcquisitionDateTime" else text)


def numbers(h: Header, keyword: str, count: int) -> np.ndarray:
    """A required numeric tag with ``count`` values, as float64; InputError names the file."""
    value = h.get(keyword)
    if value is None:
        raise InputError(h.path, f"has no {keyword}")
    items = list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) \
        else [value]
    try:
        arr = np.array([float(str(v).strip()) for v in items], dtype=np.float64)
    except ValueError:
        raise InputError(h.path, f"{keyword} is not numeric: {str(value)[:40]!r}") from None
    if arr.size != count:
        raise InputError(h.path, f"{keyword} has {arr.size} values, expected {count}")
    if not np.all(np.isfinite(arr)):
        raise InputError(h.path, f"{keyword} is NaN or Inf: {str(value)[:40]!r}")
    return arr


def number(h: Header, keyword: str, default: float | None = None) -> float:
    """A numeric tag with one value; ``default`` when absent (else InputError)."""
    if default is not None and h.get(keyword) is None:
        return default
    return float(numbers(h, keyword, 1)[0])


def optional_number(h: Header, keyword: str) -> float | None:
    """A descriptive numeric tag (kVp, mAs): None when absent or unreadable."""
    try:
        return number(h, keyword) if h.get(keyword) is not None else None
    except InputError:
        return None


def rescale_of(h: Header) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), defaults 1 and 0; a zero slope is an error."""
    slope = number(h, "RescaleSlope", 1.0)
    intercept = number(h, "RescaleIntercept", 0.0)
    if slope == 0:
        raise InputError(h.path, "RescaleSlope is 0: every pixel would be the intercept")
    return slope, intercept


def rescales(headers: Sequence[Header]) -> list[tuple[float, float]]:
    """(RescaleSlope, RescaleIntercept) of every file. Files of one series may be scaled
    differently (derived images often are, slice by slice): each is read with its own."""
    rescale = [rescale_of(h) for h in headers]
    for k, (tag, default) in enumerate((("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))):
        held = [h.get(tag) not in (None, "") for h in headers]
        other = next((i for i, (r, has) in enumerate(zip(rescale, held, strict=True))
                      if has and r[k] != default), None)
        if other is not None and not all(held):  # had been called a damaged image
            raise InputError(headers[held.index(False)].path,
                             f"no {tag}, while the series' other images hold one "
                             f"({rescale[other][k]:g} in {headers[other].path.name}): its "
                             f"values would be read as {tag} {default:g}; export it again, "
                             "or restore the tag")
    if len(set(rescale)) > 1:
        log.info("%s: %d different rescales (slope, intercept) in one series, each file read "
                 "with its own", headers[0].path.parent, len(set(rescale)))
    return rescale


def relative_name(root: Path, path: Path) -> str:
    """``path`` as named under the study folder ``root`` (its file name where it is not)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _refuse_duplicates(root: Path, found: list[tuple[Header, Header, str]]) -> None:
    """Refuse the duplicates ``found`` (copy, original, how they are one image): the first pair
    named, the rest counted."""
    if not found:
        return
    copy, original, how = found[0]
    files = len({c.path for c, _, _ in found})  # a multi-frame file's frames are one file
    advice = ("remove one of the two" if files == 1 else
              f"{files} files in all duplicate others (the folder holds the export "
              "twice?); remove one of each pair")
    raise InputError(copy.path, f"duplicate of {relative_name(root, original.path)} ({how}); "
                                f"{advice}")


def check_copies(root: Path, groups: dict[str, list[Header]]) -> None:
    """Refuse two files of the folder holding one SOPInstanceUID (the frames of a multi-frame
    file share its UID, each counted with its frame): an export copied into the folder again.
    Checked over the whole folder before a series is chosen (a scan exported one series per
    time point and copied had been refused as series that are no time course, and one copied
    file had dropped its time point with a warning only), but not in a localiser, nor in a
    series of one image unless the folder holds three or more such series (a one-slice scan
    exported one series per time point): a copied single image of another scan is read from
    by no study."""
    def images(g: list[Header]) -> int:
        return len({(str(h.get("SOPInstanceUID", "")), h.frame) for h in g})

    singles = sum(images(g) == 1 for g in groups.values())

    def kept(g: list[Header]) -> bool:
        kind = str(g[0].get("ImageType", "")).upper()
        return "LOCALIZER" not in kind and (images(g) > 1 or singles >= 3)

    seen: dict[str, Header] = {}
    found = []
    searched = (h for g in groups.values() if kept(g) for h in g)
    for h in sorted(searched, key=lambda h: str(h.path)):
        sop = str(h.get("SOPInstanceUID", "")) or None
        if sop is None:
            continue
        uid = sop if h.frame is None else f"{sop} frame {h.frame}"
        if uid in seen:
            found.append((h, seen[uid], f"same SOPInstanceUID {sop}"))
        else:
            seen[uid] = h
    _refuse_duplicates(root, found)


def check_duplicates(root: Path, slices: Sequence[Sequence[Header]]) -> None:
    """Refuse two files of one slice holding one image under two SOPInstanceUIDs: the same
    timing and index tags (:func:`check_copies` refuses those with one UID)."""
    found = []
    for s in slices:
        seen: dict[tuple[Any, ...], Header] = {}
        for h in sorted(s, key=lambda h: str(h.path)):
            key = tuple(str(h.get(tag, "")) for tag in _IDENTITY_TAGS)
            if any(key) and key in seen:
                found.append((h, seen[key], "same slice position, acquisition time and index"))
            seen.setdefault(key, h)
    _refuse_duplicates(root, found)


#: Slices whose frames are imaged this far apart in time (s) or more lie at different table
#: positions of a shuttle scan.
SHUTTLE_OFFSET_S = 0.1


def _times(s: Sequence[Header], *, varying: bool) -> tuple[np.ndarray, str] | None:
    """Times (s) of one slice's files from the first of :data:`TIME_TAGS` they all hold (and,
    ``varying``, that is not one time for all of them), with the tag; or None."""
    for tag in TIME_TAGS:
        times = [time_of(h, tag) for h in s]
        if all(t is not None for t in times):
            table = np.asarray(times, dtype=float)
            if not varying or np.ptp(table) > 0:
                return table, tag
    return None


def _frame_keys(s: Sequence[Header]) -> tuple[np.ndarray, str] | None:
    """Per-file frame key of one slice: TemporalPositionIndex, else AcquisitionTime-like s."""
    index = [h.get("TemporalPositionIndex") for h in s]
    if all(v is not None for v in index):
        try:
            return np.array([float(v) for v in index]), "TemporalPositionIndex"
        except (TypeError, ValueError):
            pass
    return _times(s, varying=False)


def same_image(a: Header, b: Header) -> bool:
    """Whether two single-image files hold the same pixels (a copy exported again under another
    SOPInstanceUID and InstanceNumber: CT noise makes two acquisitions differ)."""
    if a.frame is not None or b.frame is not None:
        return False
    try:
        return bool(pydicom.dcmread(a.path).PixelData == pydicom.dcmread(b.path).PixelData)
    except Exception:  # unreadable pixels are said where the images are decoded
        return False


def _copies_in(s: Sequence[Header]) -> tuple[Header, Header] | None:
    """Two files of one slice position with one frame key (:func:`_frame_keys`) and the same
    pixels, or None."""
    keys = _frame_keys(s)
    if keys is None:
        return None
    values, _ = keys
    for value in np.unique(values):
        same = [h for h, v in zip(s, values, strict=True) if v == value]
        for i, a in enumerate(same):
            for b in same[i + 1:]:
                if same_image(a, b):
                    return a, b
    return None


def trim_unfinished_pass(root: Path, slices: Sequence[Sequence[Header]]
                         ) -> tuple[list[list[Header]], int]:
    """A shuttle scan that ends on one table position leaves its slices one frame more than the
    others': their last frame is left out, with a warning, when each such slice's other frames
    pair with the shorter slices' frames one for one (by TemporalPositionIndex, or at times
    one offset apart to within half a frame), its extra frame comes after all of theirs, and
    its frames were imaged at other times than theirs (:data:`SHUTTLE_OFFSET_S`) within the
    same pass (less than three quarters of a frame's period apart).
    Anything else (a frame missing inside the scan) is left to :func:`check_frame_counts`.
    Returns the slices and the number of passes left out (0 or 1)."""
    counts = [len(s) for s in slices]
    n = min(counts)
    out = [list(s) for s in slices]
    if max(counts) != n + 1 or n < 2:
        return out, 0
    keys = [_frame_keys(s) for s in slices]
    if any(k is None for k in keys) or len({k[1] for k in keys if k is not None}) > 1:
        return out, 0
    table = [np.sort(k[0]) for k in keys if k is not None]
    short = [t for t, c in zip(table, counts, strict=True) if c == n]
    longer = [t for t, c in zip(table, counts, strict=True) if c > n]
    tag = keys[0][1] if keys[0] is not None else ""
    if tag == "TemporalPositionIndex":
        paired = all(np.array_equal(t, short[0]) for t in short) and all(
            np.array_equal(t[:n], short[0]) for t in longer)
    else:
        steps = np.diff(short[0])
        half = 0.5 * float(np.median(steps)) if steps.size else 0.0
        paired = half > 0 and all(np.ptp(t[:n] - short[0]) <= half for t in (*short, *longer))
    if not paired or min(t[-1] for t in longer) <= max(t[-1] for t in short):
        return out, 0
    # and at another table position: imaged at other times than the shorter slices (slices
    # imaged together, whose one lacks its last frame, lost a file)
    found = [_times(s, varying=True) for s in slices]
    if any(c is None for c in found):
        return out, 0
    clocks = [np.sort(c[0]) for c in found if c is not None]
    first_short = next(c[:n] for c, k in zip(clocks, counts, strict=True) if k == n)
    apart = [abs(float(np.median(c[:n] - first_short)))
             for c, k in zip(clocks, counts, strict=True) if k > n]
    # within one pass of the table, not a frame apart (slices that lost their first frame pair
    # the others' frames with their own next ones)
    pass_s = float(np.median(np.diff(first_short)))
    if min(apart) < SHUTTLE_OFFSET_S or max(apart) > 0.75 * pass_s:
        return out, 0
    dropped = []
    for z, (s, k) in enumerate(zip(out, keys, strict=True)):
        if len(s) > n and k is not None:
            last = int(np.argmax(k[0]))
            dropped.append((z, s.pop(last)))
    where = ", ".join(str(z) for z, _ in dropped)
    log.warning("%s: slices %s of %d hold %d frames, the others %d (a shuttle scan that ended "
                "on their table position?): their last frame (%s) is left out, so that every "
                "slice has %d", root, where, len(slices), n + 1, n,
                ", ".join(h.path.name for _, h in dropped[:3])
                + (" ..." if len(dropped) > 3 else ""), n)
    return out, 1


def check_frame_counts(root: Path, slices: Sequence[Sequence[Header]],
                       positions_mm: np.ndarray) -> None:
    """Every slice position must hold the same frames; say which (frame, slice) is missing,
    or which two files of a slice holding more are one image."""
    counts = [len(s) for s in slices]
    full = max(counts)
    if min(counts) == full:
        return
    for s in (s for s, c in zip(slices, counts, strict=True) if c == full):
        if (pair := _copies_in(s)) is not None:
            raise InputError(pair[1].path, f"the same image as {pair[0].path.name} (another "
                                           "SOPInstanceUID: a copy exported again?); its slice "
                                           f"holds {full} images, the others {min(counts)}; "
                                           "remove one of the two")
    usual = max(set(counts), key=counts.count)
    if (usual < full and full % usual == 0 and set(counts) == {usual, full}
            and counts.count(usual) > counts.count(full)):
        twice = [i for i, c in enumerate(counts) if c == full]
        raise InputError(root, f"slices {', '.join(map(str, twice))} of {len(slices)} hold "
                               f"{full // usual} times as many images as the others (counts "
                               f"per slice {counts}): positions imaged in more than one pass "
                               "(overlapping table positions?); export one image per slice "
                               "and frame")
    ref = counts.index(full)
    z = next(i for i, c in enumerate(counts) if c < full)
    where = (f"slice {z} of {len(slices)} (at {positions_mm[z]:.2f} mm along the slice "
             f"normal)")
    keys_ref, keys_z = _frame_keys(slices[ref]), _frame_keys(slices[z])
    if keys_ref is not None and keys_z is not None and keys_ref[1] == keys_z[1]:
        a, b = np.sort(keys_ref[0]), np.sort(keys_z[0])
        if keys_ref[1] == "TemporalPositionIndex":
            t = next(i for i, v in enumerate(a) if not np.any(b == v))
            what = f"TemporalPositionIndex {a[t]:g}"
        else:
            # times of one frame differ between slices by less than half a frame step: the
            # frame whose nearest partner is farthest away is the one missing
            t = int(np.argmax(np.min(np.abs(a[:, None] - b[None, :]), axis=1)))
            what = f"{keys_ref[1]} {a[t] - a[0]:.3f} s after the first frame"
        raise InputError(root, f"{where} has no file for frame {t} of {full} ({what}): "
                               f"{counts[z]} frames there, {full} at other slices (counts per "
                               f"slice {counts})")
    raise InputError(root, f"{where} has {counts[z]} files, other slices have {full} (counts "
                           f"per slice {counts}); a frame is missing there")


def check_temporal_positions(root: Path, slices: Sequence[Sequence[Header]], *,
                             passes_left_out: int = 0, evenly: bool = True) -> bool:
    """Judge a study missing whole time points (every slice's image of them), which
    :func:`check_frame_counts` cannot see: TemporalPositionIndex values with a hole (or
    TemporalPositionIdentifier values, when they count in ones), or fewer time points than
    NumberOfTemporalPositions (less ``passes_left_out``, the last passes of some slices
    :func:`trim_unfinished_pass` left out). Refused where the frames are spaced ``evenly`` (by
    --frame-interval: frames so read had been spaced evenly across the hole); with their own
    times they are read with the gap, and warned of (a frame left out for motion is no
    error). Time points missing before the first or after the last index present misplace no
    frame: only said. Images without these tags, or whose index does not tell the frames of a
    slice apart, are judged by the declared count alone. Returns whether a missing time point
    was said."""
    n_frames = len(slices[0])
    declared = {optional_number(h, "NumberOfTemporalPositions") for s in slices for h in s}
    n_declared = int(declared.pop() or 0) if len(declared) == 1 else 0
    n_declared = max(0, n_declared - passes_left_out)

    def said(text: str) -> bool:
        if evenly:
            raise InputError(root, f"{text}, and --frame-interval would space the frames "
                                   "evenly across it: restore them (or, where the files hold "
                                   "their own times, leave --frame-interval out)")
        log.warning("%s: %s; read with the gap the frames' times show", root, text)
        return True

    for tag in ("TemporalPositionIndex", "TemporalPositionIdentifier"):
        index = [[optional_number(h, tag) for h in s] for s in slices]
        if any(v is None for s in index for v in s) or any(len(set(s)) < len(s) for s in index):
            continue
        present = sorted({int(v) for s in index for v in s if v is not None})
        if tag != "TemporalPositionIndex" and np.median(np.diff(present)) != 1:
            break  # numbered otherwise than in ones: its holes say nothing
        lo, hi = present[0], present[-1]
        missing = sorted(set(range(lo, hi + 1)) - set(present))
        counted = f", NumberOfTemporalPositions {n_declared}" if n_declared else ""
        if missing:
            shown = ", ".join(str(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
            return said(f"time point missing: no image has {tag} {shown} (indices {lo} to "
                        f"{hi}{counted}, {len(present)} present): its files were not exported "
                        "or were deleted")
        if n_declared > len(present):
            log.warning("%s: %d time points, %s %d to %d, but NumberOfTemporalPositions says "
                        "%d: time points before the first or after the last were not exported "
                        "(or the scan ended early)", root, len(present), tag, lo, hi,
                        n_declared)
            return True
        return False
    if n_declared > n_frames:
        return said(f"{n_frames} time points, but NumberOfTemporalPositions says {n_declared}: "
                    f"{n_declared - n_frames} missing (not exported or deleted)")
    return False
