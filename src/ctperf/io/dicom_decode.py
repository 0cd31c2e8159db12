"""Decode the pixel data of many DICOM files into one float32 HU array, in parallel.

Threads (:func:`ctperf.parallel.map_chunks`): they share the output array and cost nothing to
start, and file reading and uncompressed copies run in parallel (the JPEG decoders' Python
bindings hold the GIL, so compressed series gain less). The first file that fails raises,
naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pydicom

from ctperf.errors import InputError
from ctperf.parallel import map_chunks

__all__ = ["decode_into"]


def _decode_one(path: Path, out: np.ndarray, frames: Sequence[int | None],
                rescale: Sequence[tuple[float, float]]) -> str | None:
    """Write one file's HU (stored * slope + intercept, ``rescale`` as the header pass read it)
    into ``out`` (K, Y, X): its image, or the frames ``frames`` of a multi-frame file, one per
    row of ``out``; return what is wrong with the file, or None."""
    try:
        ds = pydicom.dcmread(path, force=True)  # the header pass accepted it as DICOM
    except Exception as exc:  # pydicom raises many types for damaged files
        return f"damaged or truncated DICOM file ({exc})"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "has no pixel data"
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        return f"cannot decode pixel data ({getattr(syntax, 'name', syntax)}): {exc}"
    multi = frames[0] is not None
    expected = (int(ds.get("NumberOfFrames", 1)), *out.shape[1:]) if multi else out.shape[1:]
    if pixels.shape != expected:
        return f"pixel array is {pixels.shape}, header says {expected}"
    for row, (frame, (slope, intercept)) in enumerate(zip(frames, rescale, strict=True)):
        np.multiply(pixels[frame] if multi else pixels, slope, out=out[row], casting="unsafe")
        out[row] += intercept
    if not np.all(np.isfinite(out)):
        return "pixel data contains NaN or Inf values"
    return None


def _decode_files(first: int, stop: int, *, out: np.ndarray,
                  files: Sequence[tuple[Path, list[int]]], frames: Sequence[int | None],
                  rescale: Sequence[tuple[float, float]]) -> None:
    """Decode files first:stop into their rows of ``out``; the first failure raises."""
    for i in range(first, stop):
        path, rows = files[i]
        # one image: decoded in place; several frames: decoded together, then scattered
        part = out[rows[0]:rows[0] + 1] if len(rows) == 1 else \
            np.empty((len(rows), *out.shape[1:]), dtype=out.dtype)
        error = _decode_one(path, part, [frames[r] for r in rows], [rescale[r] for r in rows])
        if error:
            raise InputError(path, error)
        if len(rows) > 1:
            out[rows] = part


def decode_into(out: np.ndarray, images: Sequence[tuple[Path, int | None]], *,
                rescale: Sequence[tuple[float, float]], workers: int, progress: bool) -> None:
    """Decode ``images`` into ``out`` (N, Y, X) float32 HU, in ``workers`` threads.

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
    map_chunks(partial(_decode_files, out=out, files=files, frames=[f for _, f in images],
                       rescale=rescale), len(files),
               chunk=1, workers=max(1, workers), progress=progress, desc="decode DICOM",
               unit="file")
