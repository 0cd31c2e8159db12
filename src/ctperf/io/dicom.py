"""Read a CT perfusion study from a folder of DICOM files.

:func:`read_dicom_series` reads like its steps: find files -> read headers (no pixels) -> choose
the series -> check geometry -> group slices by position along the slice normal -> check that
every (frame, slice) image is there once and scaled like the rest -> order frames in time and
check the timing -> decode pixels in parallel -> check the HU. A study is read whole or refused:
a folder or file that cannot be read is an error, never skipped. Files may have any names and
lie in any sub-folder; a multi-frame file (Enhanced CT) counts as one image per frame
(:mod:`ctperf.io.dicom_frames`), and a study exported as one series per time point (the same
slices of one scan, each series at its own time) is read as one study. Of an exam's several
series the time course is read, the other series (localisers, reports, a derived MIP, a
bolus-tracking monitor) left out and named in the log (:mod:`ctperf.io.dicom_series`).
Frames are timed by the first timing tag that increases within each slice. JPEG Lossless and
other compressed transfer syntaxes are decoded by pydicom's plugins (GDCM, pylibjpeg;
:mod:`ctperf.io.dicom_decode`). The returned affine maps voxel indices to RAS+ mm (DICOM's
LPS with the first two axes flipped), like the NIfTI reader's.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from ctperf.errors import InputError, ValidationError
from ctperf.io.dicom_checks import (
    RELATIVE_TIME_TAGS,
    TIME_TAGS,
    Header,
    check_copies,
    check_duplicates,
    check_frame_counts,
    check_temporal_positions,
    number,
    numbers,
    optional_number,
    relative_name,
    rescales,
    same_image,
    states_fraction,
    time_of,
    trim_unfinished_pass,
)
from ctperf.io.dicom_decode import PADDING_HU, decode_into, set_transfer_syntax
from ctperf.io.dicom_frames import frame_count, frame_headers, has_functional_groups
from ctperf.io.dicom_series import (
    POSITION_TOL_MM,
    along_normal,
    choose_series,
    group_slices,
    slice_normal,
    time_course_series,
    time_point_series,
    without_extras,
)
from ctperf.io.dicom_write import FILTER_SETTINGS, PATIENT_STUDY_TAGS
from ctperf.io.integrity import (
    FRAME_STEP_RANGE_S,
    MAX_FRAME_GAP_S,
    check_frame_count,
    check_frame_times,
    check_hu_plausible,
    check_memory,
)
from ctperf.io.privacy import deidentification_record
from ctperf.parallel import usable_cores
from ctperf.types import CTPSeries

__all__ = ["NoDicomError", "is_archive", "read_dicom_headers", "read_dicom_series",
           "read_dicom_volume", "time_course_series", "time_point_series"]

log = logging.getLogger(__name__)


class NoDicomError(InputError):
    """A folder that holds no DICOM image at all (it may hold a study in another format)."""


PathLike = str | os.PathLike[str]

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INDEX_TAGS = ("TemporalPositionIndex", "TemporalPositionIdentifier", "AcquisitionNumber",
               "InstanceNumber")
_EPOCH = dt.datetime(1970, 1, 1)


def _find_files(root: Path) -> list[Path]:
    """Every file under ``root``; a folder that cannot be listed or a broken link is an error
    (a study is read whole or refused, never silently without some of its frames)."""
    if not root.exists():
        raise InputError(root, "no such folder")
    if not root.is_dir():
        raise InputError(root, "expected a folder of DICOM files, got a file")

    def refuse(exc: OSError) -> None:
        raise InputError(exc.filename or root, f"cannot read folder "
                                               f"({exc.strerror or exc}): its files would "
                                               "be missing from the study") from None

    files = []
    for folder, _, names in os.walk(root, onerror=refuse):
        for name in names:
            path = Path(folder) / name
            if name.startswith("."):
                continue
            try:
                if path.is_symlink() and not path.exists():
                    raise InputError(path, "broken link: the file it points to does not exist")
                if path.is_file():
                    files.append(path)
            except OSError as exc:  # a folder that can be listed but not entered
                raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    return sorted(files)


#: The groups a bare dataset (no preamble) opens with: 0000 (ACR-NEMA's command group), 0002
#: (file meta) or 0008 (identification), little- or big-endian.
_BARE_START_GROUPS = frozenset((b"\x00\x00", b"\x02\x00", b"\x08\x00", b"\x00\x02",
                                b"\x00\x08"))


def _bare_dataset_start(path: Path) -> bool:
    """Whether a file without a preamble opens as a bare dataset could: parsing other bytes
    by force only makes pydicom print warnings about a file that is no DICOM."""
    try:
        with open(path, "rb") as f:
            return f.read(2) in _BARE_START_GROUPS
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None


def _read_header(path: Path) -> list[Header] | None:
    """Headers without pixels, one per image (per frame of a multi-frame file); None for a
    non-DICOM file; InputError for a damaged one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except OSError as exc:  # permissions, I/O errors: the file exists but cannot be read
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    except InvalidDicomError:
        # no 128-byte preamble: old files may still be a bare dataset; text and others are not
        if not _bare_dataset_start(path):
            return None
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # anything that fails to parse without a preamble is not DICOM
            return None
        if not all(k in ds for k in ("SOPClassUID", "SeriesInstanceUID", "Rows")):
            return None
        set_transfer_syntax(ds)  # a bare dataset: no file meta to say how it is encoded
    except Exception as exc:  # pydicom raises many types for truncated or damaged files
        raise InputError(path, f"damaged or truncated DICOM file ({type(exc).__name__}: "
                               f"{exc})") from None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        sop = ds.get("file_meta", {}).get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        if sop is not None and "Image Storage" in getattr(sop, "name", ""):
            missing = [k for k in ("SeriesInstanceUID", "Rows") if k not in ds]
            raise InputError(path, f"truncated or incomplete image file: no {', '.join(missing)}")
        return None  # DICOMDIR, structured reports and other non-image objects
    n_frames = frame_count(path, ds)
    if n_frames > 1 or has_functional_groups(ds):  # Enhanced CT, also one frame per file
        return frame_headers(path, ds, n_frames)
    return [Header(path, ds)]


#: Endings of archives a study may come in (a PACS or web export); ctperf does not open them.
_ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z",
             ".rar")


def is_archive(path: Path) -> bool:
    """Whether ``path`` is named as an archive (.zip, .tar.gz, .7z, ...)."""
    return path.name.lower().endswith(_ARCHIVES)


def read_dicom_headers(folder: PathLike) -> dict[str, list[Any]]:
    """Headers (without pixel data) of every image, by SeriesInstanceUID: one per file, one per
    frame of a multi-frame file."""
    root = Path(folder)
    groups: dict[str, list[Any]] = defaultdict(list)
    skipped = []
    for path in _find_files(root):
        headers = _read_header(path)
        if headers is None:
            skipped.append(path)
        else:
            groups[str(headers[0].ds.SeriesInstanceUID)].extend(headers)
    if not groups:
        archives = [p.name for p in skipped if is_archive(p)]
        raise NoDicomError(root, f"no DICOM image files found ({len(skipped)} other files"
                                 + (f"; {archives[0]} is an archive: extract it first)"
                                    if archives else ")"))
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("%s: skipped %d non-DICOM or non-image files: %s%s", root, len(skipped),
                    names, more)
    check_copies(root, groups)
    return dict(groups)


def _check_same(headers: Sequence[Header], keyword: str, *, count: int | None = None,
                atol: float = 0.0) -> Any:
    """The value of ``keyword``, equal (within ``atol`` for ``count`` numbers) in all files."""
    if count is not None:
        first_values = numbers(headers[0], keyword, count)
        for h in headers[1:]:
            values = numbers(h, keyword, count)
            if not np.allclose(values, first_values, atol=atol, rtol=0):
                raise InputError(h.path, f"inconsistent {keyword}: {values.tolist()} here, "
                                         f"{first_values.tolist()} in {headers[0].path.name}")
        return first_values
    first = headers[0].get(keyword)
    if first is None:
        raise InputError(headers[0].path, f"has no {keyword}")
    for h in headers[1:]:
        value = h.get(keyword)
        if value != first:
            raise InputError(h.path, f"inconsistent {keyword}: {value} here, {first} in "
                                     f"{headers[0].path.name}")
    return first


def _by_time(root: Path, tag: str, values: list[list[float]],
             slices: list[list[Header]]) -> tuple[list[list[Header]], np.ndarray]:
    """Frames of each slice ordered by ``tag``'s ``values`` and (T, Z) times; InputError when
    the times are one for all frames or repeat within a slice."""
    flat = np.array([v for s in values for v in s], dtype=float)
    if tag not in RELATIVE_TIME_TAGS and np.ptp(flat) > 43200:
        # a scan of minutes spanning > 12 h crossed midnight undated
        log.info("%s: %s crosses midnight without a date change; unwrapped", root, tag)
        values = [[v + 86400.0 if v - flat.min() < 43200 else v for v in s] for s in values]
    ordered = [sorted(zip(v, s, strict=True), key=lambda p: p[0])
               for v, s in zip(values, slices, strict=True)]
    times = np.array([[t for t, _ in o] for o in ordered]).T
    if np.all(np.ptp(times, axis=0) == 0):
        raise InputError(root, f"{tag} is identical for all {times.shape[0]} frames; give the "
                               "frame spacing with frame_interval (--frame-interval SECONDS)")
    steps = np.diff(times, axis=0)
    if np.any(steps <= 0):
        t, z = np.argwhere(steps <= 0)[0]
        a, b = ordered[z][t][1], ordered[z][t + 1][1]
        if same_image(a, b):
            raise InputError(b.path, f"the same image as {a.path.name} (same {tag}, another "
                                     "SOPInstanceUID: a copy exported again?); remove one of "
                                     "the two")
        raise InputError(b.path, f"non-monotonic frame times: same {tag} as {a.path.name} in "
                                 "the same slice; give frame_interval (--frame-interval "
                                 "SECONDS) to order by index instead, evenly spaced")
    return [[h for _, h in o] for o in ordered], times


def _agree(coarse: np.ndarray, fine: np.ndarray, *, relative: bool) -> bool:
    """Whether a (T, Z) table of whole seconds is a finer table truncated or rounded: the same
    clock readings, not another event's (ContentTime is often the reconstruction's). A
    ``relative`` table (ms from the start) agrees when it is the clock less one start time:
    the two differ by one amount, to the second."""
    if relative:
        return bool(np.ptp(coarse - fine) < 1.0 + 1e-6)
    return bool(np.all(np.floor(fine) == coarse) or np.all(np.round(fine) == coarse))


def _acquisition_over_content(root: Path, slices: list[list[Header]],
                              chosen: tuple[list[list[Header]], np.ndarray, str],
                              ) -> tuple[list[list[Header]], np.ndarray, str]:
    """ContentTime is when an image's pixels were made: often the reconstruction's clock,
    which can tick at its own pace (a console writing one image every 0.1 s). Where every image
    also holds a time from the start of the acquisition (FrameReferenceTime, TriggerTime) that
    orders each slice's frames as ContentTime does, but over a span of time more than 10 %
    longer or shorter (ContentTime not ticking at the acquisition's pace), the acquisition's
    time is read, with a warning. A relative tag that orders the frames otherwise (restarting
    with each acquisition of a two-part protocol; an ECG trigger's delay) or spans the same
    time (a reconstruction's delay; the start of each pass of a sweep whose images ContentTime
    times one by one) leaves ContentTime read."""
    frames, times, _ = chosen
    for tag in RELATIVE_TIME_TAGS:
        found = [[time_of(h, tag) for h in s] for s in frames]
        if any(v is None for s in found for v in s):
            continue
        relative = np.array(found, dtype=float).T        # (T, Z), in ContentTime's order
        if np.any(np.diff(relative, axis=0) <= 0):       # another order, or repeated values
            continue
        span, tag_span = np.ptp(times, axis=0), np.ptp(relative, axis=0)
        ratio = float(np.median(span / tag_span))
        if abs(ratio - 1.0) <= 0.1:
            return chosen
        log.warning("%s: ContentTime (when the images were made) spans %.3g s of frames, %s "
                    "(the time from the acquisition's start) %.3g s: ContentTime does not tick "
                    "at the acquisition's pace, frame times from %s", root,
                    float(np.median(span)), tag, float(np.median(tag_span)), tag)
        return frames, relative, tag
    return chosen


def _whole_seconds_warning(root: Path, tag: str, times: np.ndarray) -> None:
    """Warn when whole-second times step unevenly by one second (0, 1, 3, 4, ...): frames a
    fraction of a second apart, each read up to a second off."""
    steps = np.diff(times, axis=0)
    # by 1 s more or less in turn: one step longer (a frame missing) or a change of rate
    # (1 s, then 2 s) are read right as they are
    first = np.reshape(steps, (len(steps), -1))[:, 0]
    if np.ptp(steps) == 1.0 and np.count_nonzero(np.diff(first)) > 2:
        log.warning("%s: frame times from %s are whole seconds, %g or %g s apart: frames "
                    "evenly spaced at a fraction of a second are each read up to 1 s off; "
                    "give their spacing with --frame-interval SECONDS (frame_interval=)",
                    root, tag, steps.min(), steps.max())


def _missing_time_point_warning(root: Path, times: np.ndarray, *, evenly: bool = False) -> None:
    """Warn when even frames hold one gap of a whole number of steps inside the scan (a time
    point missing from every slice, which no index tag tells: the series is read, with that
    gap; or, ``evenly`` spaced by frame_interval, across it); a slower start or end, or two
    gaps, is a protocol's change of rate."""
    steps = np.diff(times)
    if steps.size < 4:
        return
    step = float(np.median(steps))
    usual = np.abs(steps - step) <= 0.1 * step
    multiple = np.round(steps / step)
    gaps = np.flatnonzero(~usual & (multiple >= 2) & (np.abs(steps - multiple * step)
                                                       <= 0.1 * step))
    # one gap, inside the scan: two, or one at either end, is a protocol's change of rate
    if gaps.size == 1 and usual.sum() + 1 == steps.size and 0 < gaps[0] < steps.size - 1:
        g = int(gaps[0])
        log.warning("%s: frames every %.3g s but %.3g s apart at %.1f-%.1f s: a time point "
                    "missing from every slice? (%s)", root, step, steps[g], times[g],
                    times[g + 1],
                    "frame_interval spaces the frames evenly across it: leave --frame-interval "
                    "out to read the files' own times" if evenly else "read with the gap")


def _order_frames(root: Path, slices: list[list[Header]],
                  frame_interval: float | None) -> tuple[list[list[Header]], np.ndarray, str]:
    """Frames of each slice in time order, (T, Z) times in s (since 1970, or from the start
    of the acquisition for a relative tag; NaN when ordered by index) and the source.

    The source is the first of :data:`TIME_TAGS` that every image holds and that increases
    strictly within each slice: a tag that is the series' start time in every image, or
    whole seconds for half-second frames, is passed over for the next, and one in whole
    seconds gives way to a later one that counts the same times more finely (a clock to its
    whole seconds, a relative time to one start time), with a warning when none does and the
    seconds step unevenly; ContentTime gives way to a relative time that it does not follow
    (:func:`_acquisition_over_content`). A tag that only some images hold is not passed over
    in silence: the tag read instead must agree with it where both are, and an order of time
    that TemporalPositionIndex contradicts is an error (a clock that jumped). Without a tag,
    or where one of these checks fails, frames are ordered by index when ``frame_interval`` is
    given, else an error is raised."""
    passed: list[InputError] = []
    found_first: tuple[list[list[Header]], np.ndarray, str] | None = None
    values: dict[str, list[list[float | None]]] = {}
    partial: str | None = None                  # the first tag that only some images hold
    chosen: tuple[list[list[Header]], np.ndarray, str] | None = None
    for tag in TIME_TAGS:
        found = values[tag] = [[time_of(h, tag) for h in s] for s in slices]
        if any(v is None for s in found for v in s):
            if partial is None and any(v is not None for s in found for v in s):
                partial = tag
            continue
        try:
            frames, times = _by_time(root, tag, [[v or 0.0 for v in s] for s in found], slices)
        except InputError as exc:
            passed.append(exc)
            continue
        # whole seconds that the tags' text does not state finer (a two-rate protocol's 1 and
        # 2 s steps written to the microsecond are exact, not a clock cut to the second)
        # (a time from the start in ms is exact to the ms: 1000 is no clock cut to the second)
        whole = tag not in RELATIVE_TIME_TAGS and bool(np.all(np.mod(times, 1.0) == 0)) \
            and not all(states_fraction(h, tag) for s in slices for h in s)
        if found_first is None and whole:
            found_first = frames, times, tag    # whole seconds: a finer tag may follow
            continue
        if found_first is not None and whole:
            continue                            # no finer
        if found_first is not None and not _agree(found_first[1], times,
                                                  relative=tag in RELATIVE_TIME_TAGS):
            break
        _say_passed_over(root, tag, passed)
        if found_first is not None:
            log.info("%s: frame times from %s, finer than %s's whole seconds", root, tag,
                     found_first[2])
        chosen = frames, times, tag
        if tag == "ContentTime":
            chosen = _acquisition_over_content(root, slices, chosen)
            if chosen[2] != tag:  # the checks below read the tag's values too
                values[chosen[2]] = [[time_of(h, chosen[2]) for h in s] for s in slices]
        break
    if chosen is None and found_first is not None:
        _say_passed_over(root, found_first[2], passed)
        if frame_interval is None:
            _whole_seconds_warning(root, found_first[2], found_first[1])
        chosen = found_first
    if frame_interval is not None:
        _frame_interval_warning(root, frame_interval, values)
    problem = None
    if chosen is not None:
        problem = _partial_tag_problem(root, slices, values, partial, chosen[2]) \
            or _index_order_problem(chosen[0], chosen[2])
        if problem is None:
            return chosen
    elif partial is not None:
        missing, n_have = _lacking(slices, values[partial])
        problem = InputError(missing.path, f"has no {partial}, which {n_have} of the series' "
                                           f"{sum(map(len, slices))} images carry, and no "
                                           "other time tag orders the frames")
    if frame_interval is None:
        if problem is not None:
            raise InputError(problem.path, f"{problem.problem}; restore the files' times, or "
                                           "give frame_interval (--frame-interval SECONDS) "
                                           "to order the frames by index, evenly spaced")
        if passed:
            raise passed[0]
    elif problem is not None:
        log.warning("%s: %s; frames ordered by index, as frame_interval is given",
                    problem.path, problem.problem)
    for tag in _INDEX_TAGS:
        keys = [[h.get(tag) for h in s] for s in slices]
        if any(k is None for s in keys for k in s) or any(len(set(s)) < len(s) for s in keys):
            continue
        if frame_interval is None:
            raise InputError(root, f"no acquisition times ({', '.join(TIME_TAGS)}); give the "
                                   "frame spacing with frame_interval (--frame-interval "
                                   "SECONDS)")
        order = [[number(h, tag) for h in s] for s in slices]
        _uneven_numbers_warning(root, order, tag)
        frames = [[h for _, h in sorted(zip(k, s, strict=True), key=lambda p: p[0])]
                  for k, s in zip(order, slices, strict=True)]
        return frames, np.full((len(frames[0]), len(frames)), np.nan), tag
    raise InputError(root, "cannot order frames: no acquisition times and no unique "
                           "TemporalPositionIndex or InstanceNumber within each slice")


def _check_gap(root: Path, frames: list[list[Header]], times: np.ndarray, source: str) -> None:
    """Refuse a gap between frames longer than a perfusion time course allows
    (:data:`~ctperf.io.integrity.MAX_FRAME_GAP_S`), naming the files on both sides and their
    series: an image of another scan (a plain CT, a test bolus) read as a frame."""
    steps = np.diff(times)
    if not steps.size or steps.max() <= MAX_FRAME_GAP_S or \
            np.median(steps) > FRAME_STEP_RANGE_S[1]:     # all far apart: a unit, said after
        return
    b = int(np.argmax(steps))
    side = [frames[0][b], frames[0][b + 1]]
    named = [f"frame {b + i} ({relative_name(root, h.path)}, series {h.get('SeriesNumber', '?')} "
             f"'{h.get('SeriesDescription', '')}')" for i, h in enumerate(side)]
    lone = " (another scan's image? move its files out of the folder)" \
        if b in (0, steps.size - 1) else ""
    raise InputError(root, f"{source}: a gap of {steps[b]:g} s between {named[0]} and "
                           f"{named[1]}, longer than the {MAX_FRAME_GAP_S:g} s a perfusion "
                           f"time course allows{lone}")


def _uneven_numbers_warning(root: Path, order: list[list[float]], tag: str) -> None:
    """A warning when the numbers frames are ordered by step unevenly within a slice (one step
    half as large again as the usual one, e.g. 1, 2, 4, 5: a frame missing, which
    frame_interval then reads as no time at all). A hole in TemporalPositionIndex or
    TemporalPositionIdentifier is refused before (``check_temporal_positions``); acquisition
    and instance numbers may skip legitimately (a scout, a numbering shared with other
    series), so they are only warned of."""
    steps = np.concatenate([np.diff(np.sort(np.asarray(k, dtype=np.float64))) for k in order])
    usual = float(np.median(steps))
    if usual > 0 and float(steps.max()) > 1.5 * usual:
        log.warning("%s: frames ordered by %s, which steps by %g within a slice but by %g "
                    "once: a frame may be missing there, and with --frame-interval the frames "
                    "after it are read a frame early; check that every frame was exported",
                    root, tag, usual, float(steps.max()))


def _partial_tag_problem(root: Path, slices: list[list[Header]],
                         values: dict[str, list[list[float | None]]], partial: str | None,
                         tag: str) -> InputError | None:
    """An error when ``partial``, a time tag before ``tag`` that only some images hold,
    disagrees with ``tag`` in the images holding both: within a slice, the two must differ by
    one amount (a reconstruction's constant delay; a frame's one ContentTime for slices swept
    at their own AcquisitionTimes) to a tenth of a frame (0.1 s at least, and a second more
    for a tag in whole seconds); more is another clock. None when they agree (a warning says
    which tag was read) or there is no such tag."""
    if partial is None or TIME_TAGS.index(partial) > TIME_TAGS.index(tag):
        return None
    spread, steps = 0.0, []
    have_all: list[float] = []
    for s_partial, s_tag in zip(values[partial], values[tag], strict=True):
        read = np.asarray(s_tag, dtype=float)
        steps.append(np.diff(np.sort(read)))
        have = np.array([x is not None for x in s_partial])
        if have.sum() > 1:
            offset = read[have] - np.asarray([x for x in s_partial if x is not None], float)
            offset = (offset - offset[0] + 43200.0) % 86400.0 - 43200.0   # past midnight
            spread = max(spread, float(np.ptp(offset)))
        have_all.extend(x for x in s_partial if x is not None)
    step = np.concatenate(steps)
    frame_step = float(np.median(step[step > 0])) if np.any(step > 0) else 1.0
    whole = bool(np.all(np.mod(have_all, 1.0) == 0))
    tolerance = max(0.1, 0.1 * frame_step) + (1.0 if whole else 0.0)
    n_images = sum(map(len, slices))
    missing, n_have = _lacking(slices, values[partial])
    if spread > tolerance:
        return InputError(missing.path, f"has no {partial}, which {n_have} of the series' "
                                        f"{n_images} images carry; {tag}, the next time tag, "
                                        f"is another clock (within a slice it differs from "
                                        f"{partial} by amounts {spread:.3g} s apart)")
    log.warning("%s: %d of %d images have no %s (first: %s); frame times from %s, which "
                "differs from it by one amount within each slice (to %.3g s)", root,
                n_images - n_have, n_images, partial, missing.path.name, tag, spread)
    return None


def _lacking(slices: list[list[Header]],
             found: list[list[float | None]]) -> tuple[Header, int]:
    """The first image a time tag's ``found`` values leave without one, and how many hold
    one."""
    missing = next(h for s, v in zip(slices, found, strict=True)
                   for h, x in zip(s, v, strict=True) if x is None)
    return missing, sum(x is not None for v in found for x in v)


def _index_order_problem(frames: list[list[Header]], tag: str) -> InputError | None:
    """An error when TemporalPositionIndex (or TemporalPositionIdentifier), held by every image
    and distinct within each slice, does not increase along the frames ordered by ``tag``:
    a clock that jumped, which would read a frame at another time."""
    for index in ("TemporalPositionIndex", "TemporalPositionIdentifier"):
        keys = [[optional_number(h, index) for h in s] for s in frames]
        if any(k is None for s in keys for k in s) or any(len(set(s)) < len(s) for s in keys):
            continue
        for s, k in zip(frames, keys, strict=True):
            back = np.flatnonzero(np.diff(np.asarray(k, dtype=float)) < 0)
            if back.size:
                a, b = s[back[0]], s[back[0] + 1]
                return InputError(a.path, f"{tag} puts it ({index} {k[back[0]]:g}) before "
                                          f"{b.path.name} ({index} {k[back[0] + 1]:g}): the "
                                          f"order of {tag} contradicts {index} (a clock "
                                          "that jumped?)")
        return None
    return None


def _frame_interval_warning(root: Path, frame_interval: float,
                            values: dict[str, list[list[float | None]]]) -> None:
    """Warn when ``frame_interval`` spaces the frames evenly but the files' own times (the
    first time tag every image holds that is not one time for all) step unevenly, or by
    another amount: the times given replace them, and a two-rate protocol's slower frames
    would be read too early."""
    for tag, found in values.items():
        if any(v is None for s in found for v in s):
            continue
        table = [np.sort(np.asarray(s, dtype=float)) for s in found]
        span = float(np.median([s[-1] - s[0] for s in table]))
        steps = np.concatenate([np.diff(s) for s in table])
        steps = steps[steps > 0]
        if not steps.size:
            continue                            # one time for all frames: the next tag
        # a clock cut to whole seconds steps by n and n + 1 s: uneven only beyond that
        cut = bool(np.all(np.mod(steps, 1.0) == 0) and np.ptp(steps) <= 1.0)
        uneven = steps.max() > 1.5 * steps.min() and not cut
        longer = abs(span - (len(table[0]) - 1) * frame_interval) > max(1.0, 0.05 * span)
        if uneven or longer:
            log.warning("%s: frames spaced evenly every %g s (frame_interval), but %s steps by "
                        "%.3g-%.3g s: the files' own times are not used", root, frame_interval,
                        tag, steps.min(), steps.max())
        return


def _say_passed_over(root: Path, tag: str, passed: list[InputError]) -> None:
    """Log the time tags passed over before ``tag``, each with its problem's first clause."""
    if passed:
        log.info("%s: frame times from %s (passed over: %s)", root, tag,
                 "; ".join(exc.problem.split(";")[0] for exc in passed))


def _depths(slices: Sequence[Sequence[Header]]) -> np.ndarray:
    """(Z,) position of each slice along the slice normal, mm."""
    iop = numbers(slices[0][0], "ImageOrientationPatient", 6)
    return along_normal([s[0] for s in slices], slice_normal(iop))


#: How far ImageOrientationPatient's direction cosines may stray from unit length and from
#: perpendicular (their dot product): decimal strings of 6 digits stray by about 1e-6, of 2
#: digits by up to about 7e-3 (a 10 degree tilt written 0.98, -0.17: length 0.9946).
ORIENTATION_TOL = 1e-2


def _check_orientation(path: Path, iop: np.ndarray) -> None:
    """Refuse direction cosines that are not two perpendicular unit vectors: their lengths scale
    every pixel (and volume), and skewed axes put the slices' geometry nowhere a scanner has."""
    lengths = np.linalg.norm(iop.reshape(2, 3), axis=1)
    if np.any(np.abs(lengths - 1.0) > ORIENTATION_TOL):
        raise InputError(path, f"ImageOrientationPatient's direction cosines have lengths "
                               f"{np.round(lengths, 4).tolist()}, not 1")
    cosine = float(iop[:3] @ iop[3:]) / float(np.prod(lengths))
    if abs(cosine) > ORIENTATION_TOL:
        angle = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
        raise InputError(path, f"ImageOrientationPatient's rows and columns are {angle:.1f} "
                               "degrees apart, not perpendicular")


def _geometry(root: Path, headers: Sequence[Header], *, modality: str | None,
              study: bool = True) -> tuple[list[list[Header]], np.ndarray, tuple[int, int]]:
    """Check one grid; files grouped by slice (ascending along the normal), RAS affine, (Y, X).

    A study of one slice needs its thickness (every volume in mL hangs on it); a 3D series read
    beside a study (``study=False``: a dataset's map, placed by its slice positions) takes 1 mm.
    """
    modalities = {str(h.get("Modality", "")) for h in headers}
    if len(modalities) > 1:
        raise InputError(root, f"mixed modalities in one series: {sorted(modalities)}")
    if modality is not None and modalities != {modality}:
        raise InputError(headers[0].path, f"modality is {modalities.pop() or 'missing'}, "
                                          f"expected {modality}")
    rows, cols = int(_check_same(headers, "Rows")), int(_check_same(headers, "Columns"))
    iop = _check_same(headers, "ImageOrientationPatient", count=6, atol=1e-4)
    _check_orientation(headers[0].path, iop)
    spacing = _check_same(headers, "PixelSpacing", count=2, atol=1e-4)
    if not np.all(spacing > 0):
        raise InputError(headers[0].path, f"PixelSpacing must be > 0 mm, got {spacing.tolist()}")
    normal = slice_normal(iop)
    slices = group_slices(headers, normal)
    positions = np.array([numbers(s[0], "ImagePositionPatient", 3) for s in slices])
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.ptp(gaps) > max(POSITION_TOL_MM, 0.01 * np.median(gaps)):
            bad = int(np.argmax(np.abs(gaps - np.median(gaps)))) + 1
            counts = [len(s) for s in slices]
            stray = ""
            if min(counts) < max(counts):   # the odd position is the one with fewer images
                bad = int(np.argmin(counts))
                stray = (f"; {counts[bad]} image(s) at {positions[bad] @ normal:.2f} mm, "
                         f"{max(counts)} at the others: a stray image of another scan?")
            raise InputError(slices[bad][0].path,
                             f"inconsistent slice spacing: gaps {np.round(gaps, 3).tolist()} mm"
                             + stray)
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        given = [abs(v) for v in (optional_number(headers[0], "SpacingBetweenSlices"),
                                  optional_number(headers[0], "SliceThickness")) if v]
        if not given and study:
            raise InputError(headers[0].path, "one slice and no SliceThickness or "
                                              "SpacingBetweenSlices: its thickness, and with it "
                                              "every volume in mL, is unknown")
        slice_step = normal * (given[0] if given else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return slices, _RAS_FROM_LPS @ lps, (rows, cols)


def _values(value: Any) -> list[str] | None:
    """A multi-valued text tag as a list of str (None when absent)."""
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, list | tuple | MultiValue) \
        else [str(value)]


def _mas(h: Header) -> float | None:
    """An image's tube current-time product: Exposure, else XRayTubeCurrent x ExposureTime."""
    mas = optional_number(h, "Exposure")
    if mas is None:
        current, exposure = (optional_number(h, k) for k in ("XRayTubeCurrent", "ExposureTime"))
        if current and exposure:
            mas = current * exposure / 1000.0
    return mas


def _median_mas(headers: Sequence[Header]) -> float | None:
    """The frames' median mAs (a first, high-dose mask volume is not the study's dose)."""
    values = [v for v in map(_mas, headers) if v is not None]
    return float(np.median(values)) if values else None


def _ctperf_preprocess(first: Header) -> tuple[dict[str, bool], dict[str, Any] | None] | None:
    """The steps ``ctperf preprocess`` applied to a series it wrote as DICOM (its contributing
    equipment item), as a NIfTI sidecar's ``preprocess`` record holds them, and the bilateral
    filter's settings (its ``bilateral`` record, None when not given); None otherwise."""
    for item in first.get("ContributingEquipmentSequence") or ():
        if str(item.get("Manufacturer", "")) == "ctperf":
            what = str(item.get("ContributionDescription", ""))
            steps, _, given = what.partition(f"; {FILTER_SETTINGS}")
            settings = dict(pair.partition("=")[::2] for pair in given.split(", ")
                            if "=" in pair)
            return ({step: step in steps for step in ("registered", "filtered")},
                    {k: _number_or_text(v) for k, v in settings.items()} or None)
    return None


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _meta(headers: Sequence[Header], source: str, start: float | None,
          n_files: int) -> dict[str, Any]:
    first = headers[0]
    manufacturer = " ".join(str(first.get(k, "")) for k in ("Manufacturer",
                                                             "ManufacturerModelName")).strip()
    mas = _median_mas(headers)
    current, exposure = (optional_number(first, k) for k in ("XRayTubeCurrent", "ExposureTime"))
    meta: dict[str, Any] = {
        "series_uid": str(first.ds.SeriesInstanceUID),
        "description": str(first.get("SeriesDescription", "")),
        "scanner": manufacturer or None,
        "kvp": optional_number(first, "KVP"),
        "mas": float(mas) if mas is not None else None,
        "timing_source": source,
        "series_number": (int(optional_number(first, "SeriesNumber") or 0) or None),
        "slice_thickness_mm": optional_number(first, "SliceThickness"),
        "image_type": _values(first.get("ImageType")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")) or None,
        "transfer_syntax": str(getattr(first.ds.file_meta.get("TransferSyntaxUID"), "name",
                                       "unknown")),
        "n_files": n_files,
        "dicom": {k: str(first.get(k)) for k in PATIENT_STUDY_TAGS if first.get(k) is not None},
    }
    # how a source de-identified before was (its tool, whether it kept the original UIDs)
    record = deidentification_record(first)
    if record is not None:
        meta["deidentification"] = record
    done = _ctperf_preprocess(first)
    if done is not None:
        meta["preprocess"] = done[0]
        if done[1] is not None:
            meta["bilateral"] = done[1]
    if exposure is not None:
        meta["exposure_time_ms"] = exposure
    if current is not None:
        meta["tube_current_ma"] = current
    if start is not None and start >= 86400.0:  # a time of day without any date is no start
        when = _EPOCH + dt.timedelta(seconds=start)
        meta["acquisition_start"] = when.strftime("%Y%m%d%H%M%S.%f")
    return meta


def read_dicom_series(folder: PathLike, *, series_uid: str | None = None,
                      frame_interval: float | None = None, workers: int | None = None,
                      progress: bool = False,
                      headers_by_series: dict[str, list[Any]] | None = None) -> CTPSeries:
    """Read a CT perfusion study from a folder of DICOM files (searched recursively).

    Parameters
    ----------
    folder : path
        Folder holding the study's files, in any order, names and sub-folders. Readable
        non-DICOM files are skipped with a logged warning; unreadable files or folders, and
        broken links, are errors.
    series_uid : str, optional
        SeriesInstanceUID to read when the folder holds several series. Without it, the
        series that are one scan's time points (one series per time point, as some scanners
        export a perfusion scan) are read as one study, or else the one series acquired
        several times; of several such series of one study, the original (not derived) one
        with the most slice positions, when that leaves one. The other series are left out,
        named in a logged warning; when the choice cannot be made, an error lists them.
    frame_interval : float, optional
        Seconds between frames. Required when no timing tag (AcquisitionDateTime,
        AcquisitionTime, ContentTime, then FrameReferenceTime and TriggerTime in ms) increases
        within each slice (frames are then ordered by TemporalPositionIndex, else
        InstanceNumber, as also when a time tag only some images hold disagrees with the one
        read instead, or TemporalPositionIndex contradicts the order of time); when given, it
        replaces the times from the files, with a warning when they step otherwise.
    workers : int, optional
        Decoder threads (default: the number of CPUs, at most 8). The JPEG decoders (pylibjpeg,
        GDCM) hold the GIL, so with compressed files threads mostly overlap file reads.
    progress : bool
        Show a progress bar while decoding.
    headers_by_series : dict, optional
        The folder's headers as :func:`read_dicom_headers` returned them, when already read.

    Returns
    -------
    CTPSeries
        ``hu`` (T, Z, Y, X) float32 HU (stored * RescaleSlope + RescaleIntercept); slices ascend
        along the slice normal; ``times`` (T,) s from the first acquisition; ``slice_times``
        (T, Z) when slices carry their own times; ``meta`` with series_uid, description,
        scanner, kvp, mas, timing_source, acquisition_start (not for relative times),
        time_point_series (the number of series read as time points) and ``dicom``
        (patient/study tags).

    Raises
    ------
    ctperf.errors.InputError
        Naming the file or folder: unreadable or damaged files, duplicate or missing (frame,
        slice) images, a time point missing from every slice where ``frame_interval`` spaces
        the frames (a hole in TemporalPositionIndex or TemporalPositionIdentifier, or fewer
        than NumberOfTemporalPositions; with the files' own times it is read with the gap and
        warned of), numeric tags that are not numbers, fewer
        than three frames, implausible frame timing (a time tag only some images hold that
        the tag read instead disagrees with, an order of time that TemporalPositionIndex
        contradicts), images whose values are not CT numbers
        (an image unlike its slice's other frames among them), or more pixels than memory
        holds. Each file is rescaled with its own RescaleSlope/Intercept.
    """
    root = Path(folder)
    groups = read_dicom_headers(root) if headers_by_series is None else headers_by_series
    choice = choose_series(root, without_extras(root, groups), series_uid)
    headers = choice.headers
    slices, affine, (rows, cols) = _geometry(root, headers, modality="CT")
    check_duplicates(root, slices)
    slices, left_out = trim_unfinished_pass(root, slices)
    check_frame_counts(root, slices, _depths(slices))
    if len(slices[0]) < 2:
        raise InputError(root, f"one frame per slice ({len(slices)} slices): a 3D volume, a "
                               "perfusion study needs several frames (4D)")
    check_frame_count(len(slices[0]), root)
    rescale = dict(zip(((h.path, h.frame) for h in headers), rescales(headers),
                       strict=True))
    said = check_temporal_positions(root, slices, passes_left_out=left_out,
                                    evenly=frame_interval is not None)
    frames, abs_times, source = _order_frames(root, slices, frame_interval)
    n_t, n_z = len(frames[0]), len(frames)
    start = float(np.nanmin(abs_times)) if np.isfinite(abs_times).any() else None
    slice_times = None
    if frame_interval is not None:
        if not frame_interval > 0:
            raise ValidationError(f"frame_interval must be > 0 s, got {frame_interval}")
        source_tag = "frame_interval"
        times = np.arange(n_t) * float(frame_interval)
        if start is not None and not said:  # the files' own times show a gap it spaces over
            _missing_time_point_warning(root, np.nanmean(abs_times - start, axis=1),
                                        evenly=True)
        source = f"frame_interval {frame_interval:g} s (frames ordered by {source})"
    else:
        source_tag = source
        # to the microsecond, the resolution of DICOM's times: seconds since 1970 carry about
        # 1e-7 s of rounding, and the same study read from NIfTI must time its frames alike
        rel = np.round(abs_times - start, 6)
        times = rel.mean(axis=1)
        if np.max(np.ptp(rel, axis=1)) > 1e-3:
            slice_times = rel
    if frame_interval is None:
        _check_gap(root, frames, times, source_tag)
    check_frame_times(times, root, source=source_tag)
    if frame_interval is None and not said:
        _missing_time_point_warning(root, times)
    check_memory(n_t * n_z * rows * cols * 4, root,
                 what=f"the study's {n_t} frames x {n_z} slices of {rows} x {cols} pixels")
    flat = np.empty((n_t * n_z, rows, cols), dtype=np.float32)
    images = [(frames[z][t].path, frames[z][t].frame) for t in range(n_t) for z in range(n_z)]
    decode_into(flat, images, rescale=[rescale[i] for i in images],
                workers=workers or min(usable_cores(), 8), progress=progress,
                padding_as=PADDING_HU)
    hu = flat.reshape(n_t, n_z, rows, cols)

    def image_of(t: int, z: int) -> tuple[Path, str]:
        frame = frames[z][t].frame
        return frames[z][t].path, "" if frame is None else f"frame {frame + 1} of the file: "

    check_hu_plausible(hu, image_of)
    clock = None if source in RELATIVE_TIME_TAGS else start  # ms from the start: no clock
    meta = _meta(headers, source, clock, len({path for path, _ in images}))
    if len(choice.uids) > 1:
        meta["time_point_series"] = len(choice.uids)
    try:
        return CTPSeries(hu=hu, times=times, affine=affine,
                         slice_times=slice_times, meta=meta)
    except ValidationError as exc:
        raise InputError(root, str(exc)) from None


def read_dicom_volume(folder: PathLike, *, series_uid: str | None = None,
                      workers: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a 3D DICOM series (one file per slice, e.g. a perfusion map).

    Returns
    -------
    volume : ndarray, float32, shape (Z, Y, X)
        stored * RescaleSlope + RescaleIntercept, slices ascending along the slice normal.
    affine : ndarray, shape (4, 4)
        Voxel -> RAS mm.
    meta : dict
        series_uid, description, ``dicom`` tags, ``slice_positions`` (Z,) mm along the normal
        and the files in slice order.
    """
    root = Path(folder)
    headers = choose_series(root, read_dicom_headers(root), series_uid,
                             time_course=False).headers
    slices, affine, (rows, cols) = _geometry(root, headers, modality=None, study=False)
    for s in slices:
        if len(s) > 1:
            raise InputError(s[1].path, f"{len(s)} files at one slice position "
                                        f"(with {s[0].path.name}); expected a 3D series")
    check_memory(len(slices) * rows * cols * 4, root, what=f"{len(slices)} slices")
    volume = np.empty((len(slices), rows, cols), dtype=np.float32)
    images = [(s[0].path, s[0].frame) for s in slices]
    decode_into(volume, images, rescale=rescales([s[0] for s in slices]),
                workers=workers or min(usable_cores(), 8), progress=False)
    files = list(dict.fromkeys(path for path, _ in images))
    meta = _meta(headers, "", None, len(files))
    meta["slice_positions"] = _depths(slices)
    meta["files"] = files
    return volume, affine, meta
