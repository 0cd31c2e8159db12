"""Which series of a DICOM folder is the study, and the slice geometry that tells.

A folder may hold one series, an exam (the perfusion scan beside localisers, plain CT, a
bolus-tracking monitor, a derived MIP, reports) or a scan exported as one series per time point.
:func:`choose_series` picks what :func:`ctperf.io.dicom.read_dicom_series` reads: the series
asked for, the only one, the one time course (original, with the most slice positions), or
the set of series that are one scan's time points; it names what it leaves out, and refuses,
listing the series, when the choice cannot be made.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.multival import MultiValue

from ctperf.errors import InputError
from ctperf.io.dicom_checks import TIME_TAGS, Header, numbers, time_of
from ctperf.io.integrity import MIN_STUDY_FRAMES

__all__ = ["POSITION_TOL_MM", "Choice", "along_normal", "choose_series", "group_slices",
           "slice_normal", "time_course_series", "time_point_series", "without_extras"]

log = logging.getLogger("ctperf.io.dicom")  # the reader's log: one voice for reading DICOM

# Images closer than this along the slice normal are one slice: above the rounding jitter of
# positions between frames (hundredths of a mm), below any slice spacing (>= 0.5 mm).
POSITION_TOL_MM = 0.1
_MIN_TIME_POINT_SERIES = 3


def slice_normal(iop: np.ndarray) -> np.ndarray:
    """The slice normal of an ImageOrientationPatient (row and column direction cosines)."""
    return np.cross(iop[:3], iop[3:])


def along_normal(headers: Sequence[Header], normal: np.ndarray) -> np.ndarray:
    """(n,) position of each image along the slice normal ``normal``, mm."""
    return np.array([numbers(h, "ImagePositionPatient", 3) @ normal for h in headers])


def group_slices(headers: Sequence[Header], normal: np.ndarray) -> list[list[Header]]:
    """Files grouped by position along the slice normal, in increasing position."""
    depth = along_normal(headers, normal)
    order = np.argsort(depth, kind="stable")
    breaks = np.flatnonzero(np.diff(depth[order]) > POSITION_TOL_MM) + 1
    return [[headers[i] for i in chunk] for chunk in np.split(order, breaks)]


@dataclass(frozen=True)
class Choice:
    """The series read as the study: one, or several that are one scan's time points."""

    uids: tuple[str, ...]
    headers: list[Header]


def _listing(groups: dict[str, list[Header]], uids: Sequence[str] | None = None, *,
             why: dict[str, str] | None = None) -> str:
    """``uids`` (default: all) as 'UID modality 'description' (n files)', for messages, each
    followed by its reason in ``why`` where it has one."""
    why = why or {}
    return "; ".join(f"{uid} {g[0].get('Modality', '?')} "
                     f"'{g[0].get('SeriesDescription', '')}' ({len(g)} files"
                     + (f": {why[uid]}" if uid in why else "") + ")"
                     for uid, g in groups.items() if uids is None or uid in uids)


def _other_protocols(groups: dict[str, list[Header]], chosen: Sequence[str]) -> dict[str, str]:
    """Of the series on the grid of the ``chosen`` time points, those left out as another
    protocol's, with how it differs (:func:`_protocol_difference`)."""
    grids = {uid: grid for uid, g in groups.items() if (grid := _grid(g)) is not None}
    scan = [grids[uid] for uid in chosen if uid in grids]
    usual = _usual_protocol(scan)
    if usual is None:
        return {}
    return {uid: why for uid, g in grids.items() if uid not in chosen
            and g.same_grid(scan[0]) and (why := _protocol_difference(g, usual))}


def choose_series(root: Path, groups: dict[str, list[Header]], series_uid: str | None, *,
                   time_course: bool = True) -> Choice:
    """The series to read: ``series_uid``'s, the only one, or (``time_course``: a 4D study is
    read) of several the one time course (:func:`_preferred`); else refused, listing them."""
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(root, f"no series {series_uid}; the folder holds: "
                                   f"{_listing(groups)}")
        return Choice((series_uid,), groups[series_uid])
    if len(groups) == 1:
        uid, headers = next(iter(groups.items()))
        return Choice((uid,), headers)
    if not time_course:
        raise InputError(root, f"holds {len(groups)} series; choose one with series_uid "
                               f"(--series UID): {_listing(groups)}")
    # an exam's folder: the perfusion scan beside localisers, plain CT, angiography, reports,
    # a bolus-tracking monitor or a derived MIP; or one series per time point of the scan
    candidates = _candidates(groups)
    chosen = _preferred(groups, candidates)
    if chosen is None:
        raise InputError(root, f"holds {len(groups)} series{_kinds(candidates)}; choose one "
                               f"with series_uid (--series UID): {_listing(groups)}")
    _log_choice(root, groups, chosen, candidates)
    return Choice(chosen, [h for uid in chosen for h in groups[uid]])


def _kinds(candidates: list[tuple[str, ...]]) -> str:
    """What the candidates are, for the message refusing to choose among them."""
    if not candidates:
        return ", none a time course"
    courses = sum(len(c) == 1 for c in candidates)
    kinds = [f"{courses} of them {'a time course' if courses == 1 else 'time courses'}"] \
        if courses else []
    kinds += [f"{len(c)} of them one scan's time points" for c in candidates if len(c) > 1]
    return ", " + " and ".join(kinds)


def _log_choice(root: Path, groups: dict[str, list[Header]], chosen: tuple[str, ...],
                candidates: list[tuple[str, ...]]) -> None:
    """Say which series are read and which are left out."""
    others = [uid for uid in groups if uid not in chosen]
    if len(chosen) > 1:
        log.info("%s: %d series of one scan at different times, read as its time points",
                 root, len(chosen))
        if others:
            log.warning("%s: holds %d series; reading the %d that are one scan's time points, "
                        "leaving out %d: %s; --series UID chooses one", root, len(groups),
                        len(chosen), len(others),
                        _listing(groups, others, why=_other_protocols(groups, chosen)))
        return
    uid = chosen[0]
    if len(candidates) == 1:
        log.warning("%s: holds %d series; reading the one time course, %s (%d files); "
                    "--series UID chooses another", root, len(groups), uid, len(groups[uid]))
        return
    passed = [u for c in candidates if c != chosen for u in c]
    log.warning("%s: holds %d series, %d time courses; reading %s, original (not derived) with "
                "the most slice positions; leaving out the time courses %s; --series UID "
                "chooses another", root, len(groups), len(candidates), _listing(groups, [uid]),
                _listing(groups, passed))


def time_course_series(groups: dict[str, list[Header]]) -> str | None:
    """The UID of the series read as the study when a folder holds several (an exam: the
    perfusion scan beside localisers, plain CT, a bolus-tracking monitor, reports), or None:
    no such series, a choice that cannot be made, or a study read from several series that
    are its time points (:func:`time_point_series`)."""
    if len(groups) < 2:
        return None
    chosen = _preferred(groups, _candidates(groups))
    return chosen[0] if chosen is not None and len(chosen) == 1 else None


def time_point_series(groups: dict[str, list[Header]]) -> list[Header] | None:
    """The images of the series that are read together as one scan's time points (at least
    three series, see :func:`_time_point_sets`), when they are the study the folder holds;
    the folder's other series are then left out. Else None."""
    chosen = _preferred(groups, _candidates(groups)) if len(groups) >= 3 else None
    if chosen is None or len(chosen) < 2:
        return None
    return [h for uid in chosen for h in groups[uid]]


def _candidates(groups: dict[str, list[Header]]) -> list[tuple[str, ...]]:
    """What could be the study: each series acquired at least :data:`MIN_STUDY_FRAMES` times,
    and each set of series that are one scan's time points."""
    courses = [(uid,) for uid, g in groups.items() if _time_points(g) >= MIN_STUDY_FRAMES]
    return courses + _time_point_sets(groups)


def _preferred(groups: dict[str, list[Header]],
               candidates: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The candidate read as the study: the only one; else, when all are of one study, the
    one original (not a derived MIP) with the most slice positions (not a one-slice
    bolus-tracking monitor); None when that leaves none or several."""
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    firsts = [groups[c[0]][0] for c in candidates]
    if len({str(h.get("StudyInstanceUID", "")) for h in firsts}) > 1:
        return None                         # several studies: which is meant cannot be told
    original = [c for c, h in zip(candidates, firsts, strict=True) if not _derived(h)]
    original = original or candidates
    n_slices = [_slice_count([h for uid in c for h in groups[uid]]) for c in original]
    best = [c for c, n in zip(original, n_slices, strict=True) if n == max(n_slices)]
    return best[0] if len(best) == 1 else None


def _image_type(h: Header) -> list[str]:
    """ImageType's values, upper case ([""] without one)."""
    kind = h.get("ImageType")
    values = list(kind) if isinstance(kind, list | tuple | MultiValue) else [kind]
    return [str(v or "").strip().upper() for v in values] or [""]


def _derived(h: Header) -> bool:
    """Whether the image is DERIVED (ImageType's first value): a MIP, a reformat."""
    return _image_type(h)[0] == "DERIVED"


def _localiser(h: Header) -> bool:
    """Whether the image is a localiser (scout): LOCALIZER among ImageType's values."""
    return "LOCALIZER" in _image_type(h)[2:]


def without_extras(root: Path, groups: dict[str, list[Header]]) -> dict[str, list[Header]]:
    """Each series without the images that are not its scan's: localisers (ImageType
    LOCALIZER) beside other images, and derived images (an average, a MIP) beside original
    ones, which scanners and workstations may store under the scan's SeriesInstanceUID; a
    warning names what was left out."""
    kept = {}
    for uid, headers in groups.items():
        out = np.zeros(len(headers), dtype=bool)
        for kind in (_localiser, _derived):
            odd = np.array([kind(h) for h in headers]) & ~out
            if odd.any() and not (odd | out).all():
                out |= odd
        if out.any():
            left = [h for h, o in zip(headers, out, strict=True) if o]
            log.warning("%s: series %s: left out %d localiser or derived image%s beside its "
                        "original images (%s%s)", root, uid, len(left),
                        "s" if len(left) > 1 else "", left[0].path.name,
                        ", ..." if len(left) > 1 else "")
            headers = [h for h, o in zip(headers, out, strict=True) if not o]
        kept[uid] = headers
    return kept


def _slices_of(headers: Sequence[Header]) -> list[list[Header]] | None:
    """The images grouped by slice position, or None when they have no position."""
    try:
        iop = numbers(headers[0], "ImageOrientationPatient", 6)
        return group_slices(headers, slice_normal(iop))
    except InputError:
        return None


def _slice_count(headers: Sequence[Header]) -> int:
    """Slice positions of a series (0 without positions)."""
    slices = _slices_of(headers)
    return 0 if slices is None else len(slices)


def _time_points(headers: Sequence[Header]) -> int:
    """Images per slice position of a series (the fewest over its positions): how many times
    it was acquired; 0 when its images have no position (reports, secondary captures)."""
    slices = _slices_of(headers)
    return 0 if slices is None else min(len(s) for s in slices)


def _acquired(h: Header) -> float | None:
    """The image's time (s) from the first timing tag it holds, or None."""
    return next((t for t in (time_of(h, tag) for tag in TIME_TAGS) if t is not None), None)


@dataclass(frozen=True, eq=False)
class _Grid:
    """Where and when a series with one image per slice was acquired."""

    key: tuple[Any, ...]        # modality, study, frame of reference, rows, columns
    iop: np.ndarray             # (6,)
    spacing: np.ndarray         # (2,) mm
    depth: np.ndarray           # (Z,) ascending slice positions along the normal, mm
    start: float                # s, its first image's time
    protocol: tuple[str, ...]   # :data:`_PROTOCOL_TAGS`' values ("" where absent)

    def same_grid(self, other: _Grid) -> bool:
        return (self.key == other.key and np.allclose(self.iop, other.iop, atol=1e-4)
                and np.allclose(self.spacing, other.spacing, atol=1e-4))


def _grid(headers: Sequence[Header]) -> _Grid | None:
    """The :class:`_Grid` of a series, or None: no position or time, several images per
    slice, unreadable geometry."""
    h = headers[0]
    try:
        iop = numbers(h, "ImageOrientationPatient", 6)
        spacing = numbers(h, "PixelSpacing", 2)
        depth = np.sort(along_normal(headers, slice_normal(iop)))
        times = [t for x in headers for t in (_acquired(x),) if t is not None]
    except InputError:
        return None
    if not times or np.any(np.diff(depth) <= POSITION_TOL_MM):
        return None                                # untimed, or several images per slice
    key = (str(h.get("Modality", "")), str(h.get("StudyInstanceUID", "")),
           str(h.get("FrameOfReferenceUID", "")), h.get("Rows"), h.get("Columns"))
    return _Grid(key, iop, spacing, depth, min(times),
                 tuple(_protocol(h, tag) for tag in _PROTOCOL_TAGS))


#: What one scan's time points share beyond their grid: a plain CT of the same coverage (120
#: kV) is no time point of a perfusion scan (70-100 kV), whose HU (iodine's above all) depend
#: on the kV. A kernel or slice thickness of its own does not tell another scan: a review's
#: time points whose kernel changed part-way had been cut to the usual kernel's.
_PROTOCOL_TAGS = ("KVP",)


def _protocol(h: Header, tag: str) -> str:
    """``tag``'s value as text ("" without one), numbers to 0.1 (80, "80.0" and 80.04 agree)."""
    value = h.get(tag)
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v).strip().upper() for v in value)
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value or "").strip().upper()


def _usual_protocol(grids: Sequence[_Grid]) -> tuple[str, ...] | None:
    """The protocol more than half of ``grids`` holding one share (a series' whole protocol,
    not each tag's most common value, which may be no series' at all), or None: no protocol
    held, or none a majority (which is the scan's cannot be told)."""
    held = [g.protocol for g in grids if any(g.protocol)]
    if not held:
        return None
    usual, count = Counter(held).most_common(1)[0]
    return usual if 2 * count > len(held) else None


def _protocol_difference(grid: _Grid, usual: tuple[str, ...]) -> str:
    """How ``grid``'s protocol differs from ``usual`` ("KVP 120.0, the scan's 80.0"), or ""; a
    tag absent on either side tells nothing (exports and anonymisers drop tags)."""
    return ", ".join(f"{tag} {mine}, the scan's {theirs}" for tag, mine, theirs
                     in zip(_PROTOCOL_TAGS, grid.protocol, usual, strict=True)
                     if mine and theirs and mine != theirs)


def _without_other_scans(members: list[tuple[str, _Grid]]) -> list[tuple[str, _Grid]]:
    """``members`` less the series at another kV than more than half of them
    (:func:`_protocol_difference`): a plain CT of the same coverage before or after the
    perfusion scan, or an image at another kV, whose HU (iodine's above all) are not the
    scan's; the reader then names each, and a time point left out inside the scan is a gap
    it warns of."""
    usual = _usual_protocol([g for _, g in members])
    if usual is None:
        return members
    return [(uid, g) for uid, g in members if not _protocol_difference(g, usual)]


def _within(depth: np.ndarray, positions: np.ndarray) -> bool:
    """Whether every position of ``depth`` is one of ``positions`` (mm, within tolerance)."""
    return bool(np.all(np.min(np.abs(depth[:, None] - positions[None, :]), axis=1)
                       <= POSITION_TOL_MM))


def _time_point_sets(groups: dict[str, list[Header]]) -> list[tuple[str, ...]]:
    """Sets of series that are one scan's time points: at least three, CT of one study and
    frame of reference on one grid (rows, columns, pixel spacing, orientation), one image per
    slice at the slice positions most of them have (or at least half of them: a missing image
    is then named by the frame count check), each series at its own time, less the series of
    another protocol (:func:`_without_other_scans`: a plain CT of the same coverage is no time
    point). Series on a grid or at slice positions of their own, or without positions or times,
    belong to none; a set of which two series start at one time (two reconstructions of the
    time points) is none. Derived series (an average or a MIP over time, maps written back
    beside the scan) are no time points of a scan whose series are original; only derived
    series make sets of their own (a corrected study exported one series per time point)."""
    original = {uid: g for uid, g in groups.items() if not _derived(g[0])}
    derived = {uid: g for uid, g in groups.items() if _derived(g[0])}
    return _sets_on_grids(original) or _sets_on_grids(derived)


def _sets_on_grids(groups: dict[str, list[Header]]) -> list[tuple[str, ...]]:
    """:func:`_time_point_sets` among ``groups``."""
    if len(groups) < _MIN_TIME_POINT_SERIES:
        return []
    scans: list[list[tuple[str, _Grid]]] = []
    for uid, g in groups.items():
        grid = _grid(g)
        if grid is None:
            continue
        scan = next((s for s in scans if s[0][1].same_grid(grid)), None)
        if scan is None:
            scans.append([(uid, grid)])
        else:
            scan.append((uid, grid))
    sets = []
    for scan in scans:
        def sharing(depth: np.ndarray, scan: list[tuple[str, _Grid]] = scan) -> int:
            return sum(g.depth.shape == depth.shape and _within(g.depth, depth) for _, g in scan)

        positions = max((g.depth for _, g in scan), key=sharing)
        # a series at some of the positions is a time point missing images (most of them
        # there), not a one-slice scan (a bolus-tracking monitor) at one of them
        members = _without_other_scans(
            [(uid, g) for uid, g in scan
             if 2 * g.depth.size >= positions.size and _within(g.depth, positions)])
        starts = {g.start for _, g in members}
        if len(members) >= _MIN_TIME_POINT_SERIES and len(starts) == len(members):
            sets.append(tuple(uid for uid, _ in members))
    return sets
