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


def _decode_one(path: Path, out: np.ndarray, rescale: tuple[float, float]) -> str | None:
    """Write one file's HU (stored * slope + intercept, ``rescale`` as the header pass read it)
    into ``out`` (Y, X); return what is wrong with the file, or None."""
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
    if pixels.shape != out.shape:
        return f"pixel array is {pixels.shape}, header says {out.shape}"
    slope, intercept = rescale
    np.multiply(pixels, slope, out=out, casting="unsafe")
    out += intercept
    if not np.all(np.isfinite(out)):
        return "pixel data contains NaN or Inf values"
    return None


def _decode_files(first: int, stop: int, *, out: np.ndarray, paths: Sequence[Path],
                  rescale: Sequence[tuple[float, float]]) -> None:
    """Decode files first:stop into their rows of ``out``; the first failure raises."""
    for i in range(first, stop):
        error = _decode_one(paths[i], out[i], rescale[i])
        if error:
            raise InputError(paths[i], error)


def decode_into(out: np.ndarray, paths: Sequence[Path], *,
                rescale: Sequence[tuple[float, float]], workers: int, progress: bool) -> None:
    """Decode ``paths`` into ``out`` (N, Y, X) float32 HU, in ``workers`` threads.

    ``rescale`` holds each file's (RescaleSlope, RescaleIntercept), parsed and checked once by
    the header pass. A file that cannot be decoded raises :class:`~ctperf.errors.InputError`
    naming it; the files not yet started are then left undecoded.
    """
    map_chunks(partial(_decode_files, out=out, paths=paths, rescale=rescale), len(paths),
               chunk=1, workers=max(1, workers), progress=progress, desc="decode DICOM",
               unit="file")
