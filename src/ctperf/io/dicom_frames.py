"""Multi-frame DICOM images (Enhanced CT and others) as one header per frame.

An Enhanced CT Image object holds many images in one file: what a classic file says at its top
level (position, orientation, pixel spacing, rescale, acquisition time, temporal index) lies in
the Shared Functional Groups (the same for every frame) and the Per-Frame Functional Groups
(one item per frame, overriding the shared ones). :func:`frame_headers` flattens both into one
classic-looking header per frame, so that the rest of the reader (slice grouping, timing,
duplicate and rescale checks) treats a frame as it treats a single-frame file; the decoder
reads each file once and scatters its frames. Some scanners store Enhanced CT one frame per
file (NumberOfFrames 1 or absent): such a file is read through its functional groups too.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from ctperf.errors import InputError
from ctperf.io.dicom_checks import RELATIVE_TIME_TAGS, TIME_TAGS, Header

__all__ = ["frame_count", "frame_headers", "has_functional_groups"]

_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
# per-frame timing (Frame Content macro) -> the classic tag the timing pass reads
_FRAME_TIMES = ("FrameAcquisitionDateTime", "FrameReferenceDateTime")
_CLASSIC_TIMES = tuple(t for t in TIME_TAGS if t not in RELATIVE_TIME_TAGS)


def frame_count(path: Path, ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 when absent); an unreadable or non-positive count is an error."""
    value = ds.get("NumberOfFrames")
    if value is None or str(value).strip() == "":
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(path, f"NumberOfFrames is not a number: {value!r}") from None
    if n < 1:
        raise InputError(path, f"NumberOfFrames must be >= 1, got {n}")
    return n


def has_functional_groups(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` keeps its geometry in functional groups (Enhanced CT and other
    multi-frame objects), also when it holds a single frame."""
    return any(keyword in ds for keyword in _GROUPS)


def _flatten(group: pydicom.Dataset, into: pydicom.Dataset) -> None:
    """Copy the elements of each functional group macro's item (``PlanePositionSequence[0]``
    and so on) to the top level of ``into``."""
    for element in group:
        if element.VR == "SQ" and len(element.value) > 0:
            for inner in element.value[0]:
                if inner.VR != "SQ":
                    into[inner.tag] = inner


def frame_headers(path: Path, ds: pydicom.Dataset, n_frames: int) -> list[Header]:
    """One :class:`Header` per frame of a multi-frame file read without its pixels (also of a
    one-frame file with functional groups, whose per-frame item may then be absent)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and n_frames == 1:  # everything in the shared groups
        per_frame = [pydicom.Dataset()]
    if per_frame is None or len(per_frame) != n_frames:
        have = 0 if per_frame is None else len(per_frame)
        raise InputError(path, f"multi-frame image of {n_frames} frames with {have} "
                               "per-frame functional group items: cannot tell where and when "
                               "each frame was taken")
    base = pydicom.Dataset()
    for element in ds:
        if element.keyword not in _GROUPS and element.keyword != "NumberOfFrames":
            base[element.tag] = element
    headers = []
    for i, item in enumerate(per_frame):
        frame = pydicom.Dataset()
        frame.update(base)
        frame.file_meta = ds.file_meta
        if shared is not None and len(shared) > 0:
            _flatten(shared[0], frame)
        _flatten(item, frame)
        when = next((frame.get(k) for k in _FRAME_TIMES if frame.get(k)), None)
        if when is not None:  # the frame's own time replaces the object's start time
            for keyword in _CLASSIC_TIMES:
                if keyword in frame:
                    del frame[keyword]
            frame.AcquisitionDateTime = when
        headers.append(Header(path, frame, frame=i))
    return headers
