"""Decode the pixel data of many DICOM files into one float32 HU array, in parallel.

Threads (:func:`ctperf.parallel.map_chunks`): they share the output array and cost nothing to
start, and file reading and uncompressed copies run in parallel (the JPEG decoders' Python
bindings hold the GIL, so compressed series gain less). The first file that fails raises,
naming the file.

Compressed pixel data is decoded by one plugin, the first available of :data:`_PLUGIN_ORDER`,
never by the next one after a failure: a stream that one decoder finds damaged (a truncated
JPEG-LS file) can decode to garbage in a more lenient one, so a plugin's failure is the file's
error. A bare dataset (no file meta, as old scanners wrote) is decoded with the encoding its
header was read in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctperf.errors import InputError
from ctperf.parallel import map_chunks

__all__ = ["decode_into", "set_transfer_syntax"]

# pydicom's own order for the syntaxes several plugins decode (GDCM is the strictest about
# damaged streams), then the only plugins of the others
_PLUGIN_ORDER = ("gdcm", "pylibjpeg", "pydicom", "pillow", "pyjpegls")


class _NoPluginTraceback(logging.Filter):
    """Drop pydicom's log of a plugin's exception (a raw traceback on the console): the
    failure comes back as an InputError naming the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.funcName == "_decode_frame")


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoPluginTraceback())


def set_transfer_syntax(ds: pydicom.Dataset) -> None:
    """Give a dataset read without a file meta Transfer Syntax UID (a bare dataset) the one
    it was read in: implicit or explicit VR, little or big endian."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _plugin(syntax: UID) -> str:
    """The one plugin to decode ``syntax`` with; "" for native pixel data (no plugin) and
    where none is available (pydicom then says which packages are missing)."""
    if not syntax.is_encapsulated:
        return ""
    try:
        available = get_decoder(syntax).available_plugins
    except NotImplementedError:  # no decoder for it at all: pydicom's error says so
        return ""
    ranked = [p for p in _PLUGIN_ORDER if p in available] + sorted(available)
    return ranked[0] if ranked else ""


#: (7FE0,0010) Pixel Data as little-endian bytes: in a file that pydicom reads without it, the
#: pixel data began but was cut short.
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"

_CUT_SHORT = "End of file reached before delimiter"


@contextlib.contextmanager
def _cut_short_unsaid() -> Iterator[None]:
    """pydicom's warning (and log record) for a file cut short, left out while decoding: the
    file is refused in one line naming it (:func:`_decode_one`)."""
    def keep(record: logging.LogRecord) -> bool:
        return _CUT_SHORT not in record.getMessage()

    logger = logging.getLogger("pydicom")
    logger.addFilter(keep)
    # The warnings filter is process-wide: decodes running at once in several threads share one
    # filter, set by the first to start and removed by the last to end (each with its own
    # catch_warnings would restore another's filter when they cross, leaving it set for good).
    with _QUIET_LOCK:
        if _QUIET["decodes"] == 0:
            quiet = warnings.catch_warnings()
            quiet.__enter__()
            warnings.filterwarnings("ignore", message=_CUT_SHORT)
            _QUIET["context"] = quiet
        _QUIET["decodes"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["decodes"] -= 1
            if _QUIET["decodes"] == 0:
                _QUIET.pop("context").__exit__(None, None, None)
        logger.removeFilter(keep)


_QUIET_LOCK = threading.Lock()
_QUIET: dict[str, Any] = {"decodes": 0}


#: HU given to the pixels a CT image declares padding (PixelPaddingValue): air, as ctperf reads
#: the undeclared padding it finds (:func:`ctperf.masks.as_air`).
PADDING_HU = -1000.0


def _padding_range(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """The stored values a file declares padding (PixelPaddingValue, up to
    PixelPaddingRangeLimit), in the pixels' own signedness, or None. A scanner writes the
    pixels outside its field of view so (-2000 stored, or 63536 read unsigned; 4095 in 12-bit
    data), which rescaled had read as 62,512 HU or as 3,071 HU of bone."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if not isinstance(value, int):
        return None
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    bits = int(ds.get("BitsAllocated") or 16)

    def own(v: int) -> int:  # an SS value written as US (or read so) back to its sign
        return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

    lo = own(value)
    hi = own(limit) if isinstance(limit, int) else lo
    return (min(lo, hi), max(lo, hi))


def _decode_one(path: Path, out: np.ndarray, frames: Sequence[int | None],
                rescale: Sequence[tuple[float, float]], padding_as: float | None = None,
                ) -> str | None:
    """Write one file's HU (stored * slope + intercept, ``rescale`` as the header pass read it)
    into ``out`` (K, Y, X): its image, or the frames ``frames`` of a multi-frame file, one per
    row of ``out``, the pixels it declares padding as ``padding_as`` where given; return what
    is wrong with the file, or None."""
    try:
        ds = pydicom.dcmread(path, force=True)  # the header pass accepted it as DICOM
    except Exception as exc:  # pydicom raises many types for damaged files
        return f"damaged or truncated DICOM file ({exc})"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # a compressed image cut short: pydicom leaves its pixel data out (with a warning)
        cut = _PIXEL_DATA_TAG in path.read_bytes()
        return "damaged or truncated DICOM file (its pixel data ends early)" if cut else \
            "has no pixel data"
    set_transfer_syntax(ds)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    plugin = "" if syntax is None else _plugin(UID(syntax))
    try:
        ds.pixel_array_options(decoding_plugin=plugin)
        pixels = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types
        what = getattr(syntax, "name", "unknown transfer syntax")
        by = f" by {plugin}; damaged or truncated?" if plugin else ""
        reason = " ".join(str(exc).split())  # one line: plugins' messages span several
        reason = reason.removeprefix("Unable to decode as exceptions were raised by all "
                                     "available plugins: ")
        return f"cannot decode pixel data ({what}{by}): {reason}"
    multi = frames[0] is not None
    if multi and pixels.ndim == 2:  # a one-frame file read through its functional groups
        pixels = pixels[None]
    expected = (int(ds.get("NumberOfFrames") or 1), *out.shape[1:]) if multi \
        else out.shape[1:]
    if pixels.shape != expected:
        return f"pixel array is {pixels.shape}, header says {expected}"
    padding = None if padding_as is None else _padding_range(ds)
    for row, (frame, (slope, intercept)) in enumerate(zip(frames, rescale, strict=True)):
        stored = pixels[frame] if multi else pixels
        np.multiply(stored, slope, out=out[row], casting="unsafe")
        out[row] += intercept
        if padding is not None and padding_as is not None:  # outside the field of view
            out[row][(stored >= padding[0]) & (stored <= padding[1])] = padding_as
    if not np.all(np.isfinite(out)):
        return "pixel data contains NaN or Inf values"
    return None


def _decode_files(first: int, stop: int, *, out: np.ndarray,
                  files: Sequence[tuple[Path, list[int]]], frames: Sequence[int | None],
                  rescale: Sequence[tuple[float, float]], padding_as: float | None) -> None:
    """Decode files first:stop into their rows of ``out``; the first failure raises."""
    for i in range(first, stop):
        path, rows = files[i]
        # one image: decoded in place; several frames: decoded together, then scattered
        part = out[rows[0]:rows[0] + 1] if len(rows) == 1 else \
            np.empty((len(rows), *out.shape[1:]), dtype=out.dtype)
        error = _decode_one(path, part, [frames[r] for r in rows], [rescale[r] for r in rows],
                            padding_as)
        if error:
            raise InputError(path, error)
        if len(rows) > 1:
            out[rows] = part


def decode_into(out: np.ndarray, images: Sequence[tuple[Path, int | None]], *,
                rescale: Sequence[tuple[float, float]], workers: int, progress: bool,
                padding_as: float | None = None) -> None:
    """Decode ``images`` into ``out`` (N, Y, X) float32 HU, in ``workers`` threads.

    ``padding_as``: the value given to the pixels a file declares padding (PixelPaddingValue,
    up to PixelPaddingRangeLimit): :data:`PADDING_HU` for CT images; None reads them as stored
    (a map's declared padding may be one of its values, a CBF of 0).

    ``images`` holds each row's file and, for a multi-frame file, its frame (0-based; None for
    a single-frame file); a multi-frame file is read once for all its rows. ``rescale`` holds
    each row's (RescaleSlope, RescaleIntercept), parsed and checked once by the header pass. A
    file that cannot be decoded raises :class:`~ctperf.errors.InputError` naming it; the files
    not yet started are then left undecoded.
    """
    rows: dict[Path, list[int]] = {}
    for row, (path, _) in enumerate(images):
        rows.setdefault(path, []).append(row)
    files = list(rows.items())
    with _cut_short_unsaid():
        map_chunks(partial(_decode_files, out=out, files=files, frames=[f for _, f in images],
                           rescale=rescale, padding_as=padding_as), len(files),
                   chunk=1, workers=max(1, workers), progress=progress, desc="decode DICOM",
                   unit="file")
