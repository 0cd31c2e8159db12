"""Decode the pixel data of many DICOM files into one float32 HU array, in parallel.

Threads by default: they share the output array and cost nothing to start, and file reading
and uncompressed copies run in parallel. The JPEG decoders' Python bindings hold the GIL, so on
many-core machines a process pool (``executor="processes"``) writing into shared memory decodes
compressed series faster. Errors come back as messages and are raised once, naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pydicom

from ctperf.errors import InputError, ValidationError

__all__ = ["decode_into"]


def _decode_one(path: Path, out: np.ndarray, rescale: tuple[float, float]) -> str | None:
    """Write one file's HU (stored * slope + intercept, ``rescale`` as the header pass read it)
    into ``out`` (Y, X); return an error message instead of raising, so that errors cross a
    process pool intact."""
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


def _decode_chunk(shm_name: str, shape: tuple[int, ...],
                  items: list[tuple[int, Path, tuple[float, float]]]
                  ) -> list[tuple[int, str | None]]:
    """Process-pool worker: decode files into the shared (N, Y, X) float32 array."""
    shm = SharedMemory(name=shm_name)
    out = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
    try:
        return [(i, _decode_one(path, out[i], rescale)) for i, path, rescale in items]
    finally:
        del out  # release the buffer before closing the mapping
        shm.close()


def decode_into(out: np.ndarray, paths: Sequence[Path], *,
                rescale: Sequence[tuple[float, float]], workers: int, executor: str,
                progress: bool) -> None:
    """Decode ``paths`` into ``out`` (N, Y, X) float32 HU, serially or with a pool.

    ``rescale`` holds each file's (RescaleSlope, RescaleIntercept), parsed and checked once by
    the header pass.
    """
    from tqdm import tqdm

    if executor not in ("threads", "processes"):
        raise ValidationError(f"executor must be 'threads' or 'processes', got {executor!r}")
    bar = tqdm(total=len(paths), desc="decode DICOM", unit="file", disable=not progress)
    errors: list[tuple[int, str | None]] = []
    if workers <= 1 or len(paths) < 2:
        for i, path in enumerate(paths):
            errors.append((i, _decode_one(path, out[i], rescale[i])))
            bar.update()
            if errors[-1][1]:
                break
    elif executor == "threads":
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, error in enumerate(pool.map(_decode_one, paths, out, rescale)):
                errors.append((i, error))
                bar.update()
    else:
        shm = SharedMemory(create=True, size=max(out.nbytes, 1))
        try:
            shared = np.ndarray(out.shape, dtype=np.float32, buffer=shm.buf)
            n_chunks = min(len(paths), 4 * workers)
            chunks = [[(int(i), paths[i], rescale[i]) for i in idx]
                      for idx in np.array_split(np.arange(len(paths)), n_chunks)]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_decode_chunk, shm.name, out.shape, c) for c in chunks]
                for future in futures:
                    errors.extend(future.result())
                    bar.update(len(errors) - bar.n)
            out[...] = shared
            del shared
        finally:
            shm.close()
            shm.unlink()
    bar.close()
    for i, error in errors:
        if error:
            raise InputError(paths[i], error)
