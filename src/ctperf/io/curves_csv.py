"""Time curves in a CSV table: one column of frame times, one of the arterial curve, optionally
one of the venous curve, and one column per tissue curve (regions or voxels), a header row
naming them (``time``, ``aif``, ``vof`` or another name each, see :data:`OTHER_NAMES`),
optionally followed by a row of units (the time's in s, ms or min; or the time
column's unit in its name: ``time (ms)``, ``Time [s]``, ``time_ms``); times may also be clock
times, ``hh:mm:ss.fff`` or ``mm:ss.f`` (as workstations export acquisition times). Comma,
semicolon or tab separated; with semicolons or tabs a decimal comma is read too (``12,5``, as
spreadsheets write numbers in many locales). Lines starting with ``#`` are comments. A column
without a name is left out when it is empty (a separator at the end of every line) or, first in
the table, holds the row numbers (a data frame's index); any other is refused; rows of
separators alone are left out. Text in UTF-8, UTF-16 with a byte-order mark, or else
Windows-1252. A file that cannot be read whole is refused, naming the line and the column.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctperf.errors import InputError
from ctperf.io.atomic import atomic_file
from ctperf.io.integrity import check_frame_times

__all__ = ["MIN_CURVE_SPAN_S", "CurveTable", "read_curves_csv", "write_curves_csv"]

PathLike = str | os.PathLike[str]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveTable:
    """``times`` (T,) s, ``aif`` (T,), ``vof`` (T,) or None, ``tissue`` (T, N) and the tissue
    columns' ``names`` (N,), in the file's units; ``columns`` names the header's columns read
    as ``time``, ``aif`` and ``vof`` (None when there is none)."""

    times: np.ndarray
    aif: np.ndarray
    vof: np.ndarray | None
    tissue: np.ndarray
    names: tuple[str, ...]
    columns: dict[str, str | None]


def _text(path: Path) -> str:
    """The file's text: UTF-8 (with or without a byte-order mark), UTF-16 with its mark (a
    spreadsheet's "Unicode text"), else Windows-1252 (a spreadsheet's "CSV" on Windows)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, expected a CSV file of curves") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError(path, "not a text file: it starts as UTF-16 but does not decode "
                                   "as such (expected a CSV table of curves)") from None
    if b"\x00" in raw:
        raise InputError(path, "not a text file (expected a CSV table of curves)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.info("%s is not UTF-8: read as Windows-1252", path)
        return raw.decode("cp1252", errors="replace")


def _rows(path: Path) -> tuple[list[list[str]], bool]:
    """The table's cells, and whether a decimal comma may be read (the separator is not one).
    Rows of separators alone (a spreadsheet's empty rows) are left out."""
    lines = [line for line in _text(path).splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    declared = re.fullmatch(r"\s*sep=(.)\s*", lines[0]) if lines else None
    if declared:  # Excel's line naming the separator ("sep=;") before the header
        lines = lines[1:]
    if len(lines) < 2:
        raise InputError(path, "expected a header row and one row per frame")
    dialect: Any = None
    if declared:
        if declared.group(1) not in ",;\t":
            raise InputError(path, f"line 1 declares the separator {declared.group(1)!r}: "
                                   "expected a comma, a semicolon or a tab")
        dialect = type("Declared", (csv.excel,), {"delimiter": declared.group(1)})
    # the separator that splits the header and the first rows alike (a header name may hold
    # another separator: "AIF, left (HU)" in a semicolon table); the header alone when they
    # do not agree
    for sample in (lines[:6], lines[:1]) if dialect is None else ():
        try:
            dialect = csv.Sniffer().sniff("\n".join(sample), delimiters=",;\t")
            break
        except csv.Error:
            continue
    if dialect is None:
        raise InputError(path, "cannot tell the column separator of the header row (comma, "
                               "semicolon or tab)")
    rows = [[cell.strip() for cell in row] for row in csv.reader(lines, dialect)]
    return ([rows[0]] + [row for row in rows[1:] if any(row)], dialect.delimiter != ",")


def _column(keys: list[str], name: str) -> int | None:
    """Where the column ``name`` is: its exact name (any case), else the one column named
    ``name`` followed by a unit or a suffix (``time (s)``, ``Time [s]``, ``time_s``,
    ``AIF-HU``); None when absent or when several would match."""
    name = name.lower()
    if name in keys:
        return keys.index(name)
    near = _near(keys, name)
    return near[0] if len(near) == 1 else None


def _near(keys: list[str], name: str) -> list[int]:
    """The columns named ``name`` (lower case) followed by a unit or a suffix."""
    return [i for i, k in enumerate(keys)
            if k.startswith(name) and not k[len(name):len(name) + 1].isalnum()]


#: Other names the time, AIF and VOF columns are read by when their option keeps its default
#: (each also with a unit or suffix after it, as for the default name).
OTHER_NAMES = {
    "time": ("t", "times", "seconds", "sec", "acquisition time", "acquisitiontime",
             "acquisition_time", "frame time", "frame_time", "frametime", "zeit"),
    "aif": ("artery", "arterial", "arterial input", "arterial input function", "arterial_input"),
    "vof": ("vein", "venous", "venous output", "venous output function", "venous_output", "sss",
            "sinus", "superior sagittal sinus"),
}


def _role_column(keys: list[str], name: str, default: str) -> tuple[int, str] | None:
    """Where the column ``name`` is (:func:`_column`) and the name that found it; when ``name``
    is the role's default and no column has it, the one column that the role's
    :data:`OTHER_NAMES` find, with the first that does (None when none or several do)."""
    at = _column(keys, name)
    if at is not None or name.lower() != default:
        return None if at is None else (at, name)
    found = [(i, other) for other in OTHER_NAMES[default]
             if (i := _column(keys, other)) is not None]
    return found[0] if len({i for i, _ in found}) == 1 else None


#: Time units a units row may name, in seconds.
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3,
               "msec": 1e-3, "msecs": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
               "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0}

#: The shortest time course the curves may span, s: a bolus's passage through the brain takes
#: 30 s or more, so a shorter one is another unit read as seconds (a review's 0.1 min steps
#: under "time_mins" had read as a 4.9 s scan and CBF 60 times too high).
MIN_CURVE_SPAN_S = 15.0


def _number(cell: str, decimal_comma: bool) -> float:
    """The cell's value (ValueError when it is not a number); ``decimal_comma``: ``12,5`` is
    12.5 (a cell with one comma and no point)."""
    if decimal_comma and cell.count(",") == 1 and "." not in cell:
        cell = cell.replace(",", ".")
    return float(cell)


_CLOCK = re.compile(r"^(?:(\d{1,2}):)?(\d{1,2}):(\d{1,2}(?:[.,]\d+)?)$")


def _clock_seconds(cell: str) -> float | None:
    """Seconds of a clock time ``hh:mm:ss(.fff)`` or ``mm:ss(.f)`` (a decimal comma too), or
    None when the cell is not one."""
    m = _CLOCK.match(cell.strip())
    if m is None:
        return None
    hours, minutes, seconds = m.groups()
    if int(minutes) > 59 or float(seconds.replace(",", ".")) >= 60:
        return None
    return 3600.0 * int(hours or 0) + 60.0 * int(minutes) + float(seconds.replace(",", "."))


def _say_whole_seconds(p: Path, name: str, cells: Sequence[str], times: np.ndarray) -> None:
    """Warn of clock times written to the whole second whose steps alternate: frames 1.5 s
    apart read as steps of 1 and 2 s, each time off by up to 0.5 s (on a probe's curves bSVD's
    CBF and MTT moved by up to 9 %, its Tmax by 6 %). Steps all alike, a few frames dropped, or
    a protocol of several rates (1 s then 3 s) are left unsaid."""
    if any(re.search(r"[.,]\d", cell) for cell in cells):
        return
    step = np.round(np.diff(times), 6)
    steps, counts = np.unique(step, return_counts=True)
    # two steps 1 s apart, each a quarter of them or more, changing more than twice: frames
    # between whole seconds (a dropped frame or a protocol of several rates is none of that)
    if (steps.size == 2 and steps[1] - steps[0] == 1.0 and counts.min() >= 0.25 * step.size
            and np.count_nonzero(np.diff(step)) > 2):
        log.warning("%s: column %r holds clock times to the whole second, with steps of %s s: "
                    "each frame's time may be off by up to 0.5 s, which moves CBF, MTT and "
                    "Tmax; export the times with fractions of a second, or in seconds",
                    p, name, ", ".join(f"{v:g}" for v in steps[:4]))


def _is_number(cell: str, decimal_comma: bool) -> bool:
    try:
        _number(cell, decimal_comma)
    except ValueError:
        return False
    return True


#: Names of a column of frame numbers (as image viewers and spreadsheets export curves):
#: left out when it counts 0 or 1 upwards, not fitted as a tissue curve.
FRAME_NUMBER_NAMES = ("frame", "frames", "frame number", "frame_number", "frame no", "index",
                      "no", "no.", "nr", "#", "dynamic")


def _counts_rows(cells: list[str], decimal_comma: bool) -> bool:
    """Whether ``cells`` are the numbers 0 or 1 upwards, one per row."""
    if not cells or not all(_is_number(c, decimal_comma) for c in cells):
        return False
    values = np.array([_number(c, decimal_comma) for c in cells])
    return values[0] in (0, 1) and np.array_equal(values, values[0] + np.arange(values.size))


def _unnamed_left_out(path: Path, rows: list[list[str]], decimal_comma: bool,
                      asked: Sequence[str] = ()) -> list[list[str]]:
    """``rows`` without their unnamed columns: empty ones (a separator ending every line), and a
    first column of row numbers (0 or 1 upwards: a data frame's index, such as pandas writes
    with an empty or ``Unnamed: 0`` name); and without a column named as frame numbers
    (:data:`FRAME_NUMBER_NAMES`) that counts them, unless ``asked`` names it (the time column
    given by name). Any other unnamed column is refused."""
    asked = [a.lower() for a in asked]
    drop = []
    for col, name in enumerate(rows[0]):
        cells = [row[col] for row in rows[1:] if col < len(row) and row[col]]
        if name.lower() in FRAME_NUMBER_NAMES and name.lower() not in asked \
                and _counts_rows(cells, decimal_comma):
            log.warning("%s: column %r holds the frame numbers: left out, not a tissue curve",
                        path, name)
            drop.append(col)
            continue
        if name and not name.lower().startswith("unnamed:"):
            continue
        if not cells:
            drop.append(col)
            continue
        if col == 0 and _counts_rows(cells, decimal_comma):
            log.info("%s: the unnamed first column holds the row numbers: left out", path)
            drop.append(col)
            continue
        raise InputError(path, f"column {col + 1} has no name in the header row: name it (the "
                               "time, the AIF, the VOF or a tissue curve) or remove it")
    if not drop:
        return rows
    return [[c for i, c in enumerate(row) if i not in drop] for row in rows]


def _time_unit(path: Path, units: list[str], header: list[str], at: int) -> float:
    """Seconds per unit of the time column, from a units row under the header."""
    if len(units) != len(header):
        raise InputError(path, f"line 2 (units) has {len(units)} values, the header "
                               f"{len(header)}")
    unit = units[at].strip().strip("[]()").strip().lower()
    if unit not in _TIME_UNITS:
        raise InputError(path, f"line 2, column {header[at]!r}: time unit {units[at]!r} is "
                               "not s, ms or min")
    return _TIME_UNITS[unit]


def _named_unit(path: Path, name: str, column: str) -> float | None:
    """Seconds per unit of the time column named ``column`` when its name ends in a unit
    after the time's name (``time (ms)``, ``Time [s]``, ``time_ms``, ``t-min``); None when it
    names none. A bracketed unit that is not a time's is refused."""
    rest = column[len(name):].strip() if column.lower().startswith(name.lower()) else ""
    if not rest:  # the name asked for holds the unit ("--time-column 'Zeit (ms)'")
        end = re.search(r"(?:[(\[][^()\[\]]*[)\]]|[_\-\s]\s*[a-z]+)$", column.lower())
        rest = end.group(0) if end and end.start() > 0 else ""
    bracketed = re.fullmatch(r"[(\[]\s*([^()\[\]]*?)\s*[)\]]", rest)
    if bracketed:
        unit = bracketed.group(1).lower()
        if unit not in _TIME_UNITS:
            raise InputError(path, f"column {column!r}: time unit {bracketed.group(1)!r} is "
                                   "not s, ms or min")
        return _TIME_UNITS[unit]
    suffix = re.fullmatch(r"[_\-\s]\s*([a-z]+)", rest.lower())
    return _TIME_UNITS.get(suffix.group(1)) if suffix else None


def _check_not_tm(path: Path, column: str, times: np.ndarray) -> None:
    """Refuse a time column that holds DICOM TM values (hhmmss.ffffff: read as seconds they
    jump about 40 s at every minute; a review's 1.5 s frames read MTT 2.4 times too long)."""
    steps = np.diff(times)
    if times[0] >= 0 and np.all(times < 240000) and steps.max() > 10 * np.median(steps):
        h, m, sec = times // 10000, (times // 100) % 100, times % 100
        clock = h * 3600 + m * 60 + sec
        d = np.diff(clock)
        if np.all(m < 60) and np.all(sec < 60) and np.all(d > 0) and \
                d.max() <= 3 * np.median(d):
            raise InputError(path, f"column {column!r} holds DICOM TM times (hhmmss.ffffff: "
                                   f"{times[0]:.6f} is {int(h[0]):02d}:{int(m[0]):02d}:"
                                   f"{sec[0]:09.6f}), not seconds: give them as hh:mm:ss or "
                                   "in seconds")


def read_curves_csv(path: PathLike, *, time_column: str = "time", aif_column: str = "aif",
                    vof_column: str = "vof") -> CurveTable:
    """Read a CSV table of curves (see the module's docstring).

    Column names match case-insensitively, and a name followed by a unit or a suffix (``time
    (s)``, ``AIF_HU``) matches when no other column does; with a name left at its default, the
    role's :data:`OTHER_NAMES` are tried too (``artery``, ``vein``, ``SSS``). The time column is
    in seconds unless its name or a units row says ms or min, or clock times (``hh:mm:ss.fff``,
    ``mm:ss.f``; across midnight too), strictly increasing; every other
    column is a curve, ``vof_column`` used when present (a name other than the default must
    be present); at least one tissue column is needed.
    With semicolons or tabs between the columns, numbers may have a decimal comma.
    """
    p = Path(path)
    rows, decimal_comma = _rows(p)
    rows = _unnamed_left_out(p, rows, decimal_comma, (time_column, aif_column, vof_column))
    header = rows[0]
    keys = [h.lower() for h in header]
    if len(set(keys)) < len(keys):
        raise InputError(p, f"repeated column names in the header: {header}")
    where, names = {}, {}
    for role, name in (("time", time_column), ("aif", aif_column)):
        found = _role_column(keys, name, role)
        if found is None:
            several = [header[i] for i in _near(keys, name.lower())]
            if len(several) > 1:
                raise InputError(p, f"several columns could be the {role} ({several}): name "
                                    f"one with --{role}-column, or rename the others")
            raise InputError(p, f"no {name!r} column ({role}); the header holds {header}")
        where[role], names[role] = found
    vof = _role_column(keys, vof_column, "vof")
    if vof is None and vof_column.lower() != "vof":  # asked for by name: not to be fitted
        raise InputError(p, f"no {vof_column!r} column (VOF); the header holds {header}")
    vof_at = None if vof is None else vof[0]
    tissue_at = [i for i in range(len(header))
                 if i not in (where["time"], where["aif"], vof_at)]
    if not tissue_at:
        raise InputError(p, "no tissue column: every column besides time, AIF and VOF is a "
                            "tissue curve")
    if not decimal_comma:
        quoted = next(((line, cell) for line, row in enumerate(rows[1:], start=2)
                       for cell in row if _is_number(cell, True) and "," in cell), None)
        if quoted is not None:
            raise InputError(p, f"line {quoted[0]}: {quoted[1]!r} holds a comma inside a "
                                "comma-separated table: a decimal comma or a thousands "
                                "separator? Save the table with semicolons (decimal comma) or "
                                "with decimal points")
    named = _named_unit(p, names["time"], header[where["time"]])
    scale, first = named or 1.0, 1
    if len(rows) > 2 and not any(_is_number(cell, decimal_comma) for cell in rows[1]):
        scale, first = _time_unit(p, rows[1], header, where["time"]), 2
        if named is not None and named != scale:
            raise InputError(p, f"column {header[where['time']]!r}: its name and line 2 give "
                                "different time units")
    values = np.empty((len(rows) - first, len(header)))
    clock = [False] * (len(rows) - first)
    for line, row in enumerate(rows[first:], start=first + 1):
        if len(row) != len(header):
            raise InputError(p, f"line {line} has {len(row)} values, the header {len(header)}")
        for col, cell in enumerate(row):
            seconds = _clock_seconds(cell) if col == where["time"] else None
            if seconds is not None:
                values[line - first - 1, col] = seconds
                clock[line - first - 1] = True
                continue
            try:
                value = _number(cell, decimal_comma)
            except ValueError:
                raise InputError(p, f"line {line}, column {header[col]!r}: {cell!r} is not a "
                                    "number") from None
            if not math.isfinite(value):
                raise InputError(p, f"line {line}, column {header[col]!r}: {cell!r} is not a "
                                    "finite number")
            values[line - first - 1, col] = value
    times = values[:, where["time"]] * scale
    if any(clock):
        if not all(clock):
            line = clock.index(False) + first + 1
            raise InputError(p, f"line {line}, column {header[where['time']]!r}: the other "
                                "times are clock times (hh:mm:ss), this one is not")
        if scale != 1.0:
            raise InputError(p, f"column {header[where['time']]!r}: clock times (hh:mm:ss) "
                                "cannot have another unit than seconds")
        times = values[:, where["time"]].copy()
        past_midnight = np.concatenate([[False], np.diff(times) < -43200.0])
        times += 86400.0 * np.cumsum(past_midnight)  # a scan across midnight
        _say_whole_seconds(p, header[where["time"]], [r[where["time"]] for r in rows[first:]],
                           times)
    if not np.all(np.diff(times) > 0):
        bad = int(np.argmax(np.diff(times) <= 0)) + first + 2
        raise InputError(p, f"times must increase from row to row (line {bad})")
    if not any(clock) and scale == 1.0:
        _check_not_tm(p, header[where["time"]], times)
    # seconds, spaced as a perfusion acquisition is (milliseconds or minutes are refused)
    check_frame_times(times, p, source=f"column {header[where['time']]!r}",
                      remedy="give the time column in seconds")
    if times[-1] - times[0] < MIN_CURVE_SPAN_S:
        raise InputError(p, f"column {header[where['time']]!r}: the times span "
                            f"{times[-1] - times[0]:g} s, under the {MIN_CURVE_SPAN_S:g} s a "
                            "bolus's passage takes: another unit read as seconds? Name it in "
                            "the column ('time (min)') or in a row of units under the header")
    return CurveTable(times=times, aif=values[:, where["aif"]],
                      vof=None if vof_at is None else values[:, vof_at],
                      tissue=values[:, tissue_at], names=tuple(header[i] for i in tissue_at),
                      columns={"time": header[where["time"]], "aif": header[where["aif"]],
                               "vof": None if vof_at is None else header[vof_at]})


def write_curves_csv(path: PathLike, names: Sequence[str], rows: Sequence[dict[str, float]],
                     *, digits: int = 4,
                     flags: Sequence[Sequence[str]] | None = None) -> None:
    """One row per curve: its name, then the columns of ``rows`` (the same keys in each),
    ``digits`` significant digits, then, when given, its ``flags`` joined by semicolons (empty
    when none); written atomically."""
    columns = list(rows[0]) if rows else []
    marks = [";".join(f) for f in flags] if flags is not None else None
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["curve", *columns, *(["flags"] if marks is not None else [])])
        for i, (name, row) in enumerate(zip(names, rows, strict=True)):
            writer.writerow([name, *(f"{row[c]:.{digits}g}" for c in columns),
                             *([marks[i]] if marks is not None else [])])
