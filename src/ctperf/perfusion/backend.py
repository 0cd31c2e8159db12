"""NumPy or PyTorch for the vectorised box fits: the few operations spelt differently.

The fits (:mod:`.nelder_mead`, :mod:`.fastsse`, :mod:`.newton`) are written once against
:class:`ArrayOps`; with a torch device they run on tensors, on a GPU when one is asked for. torch
is imported only then, so ``import ctperf.perfusion`` stays torch-free (the house keeps torch in
``ctperf.model``; the box fits are the one place outside it where a GPU pays).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctperf.errors import ValidationError

__all__ = ["ArrayOps", "resolve_torch_device"]


def resolve_torch_device(device: str | None) -> str | None:
    """The torch device a fit should run on, or None for NumPy.

    None and ``"cpu"`` mean NumPy; ``"auto"`` means ``"cuda"`` when torch is installed and
    sees a GPU, else NumPy; any other value must be a torch device that exists here
    (``"cuda"``, ``"cuda:1"``, ...). torch is imported only for ``"auto"`` and devices.
    """
    if device is None or device == "cpu":
        return None
    if device == "auto":
        from importlib import metadata

        try:  # a CPU-only build never sees a GPU: its import (2-3 s) is spared
            if metadata.version("torch").endswith("+cpu"):
                return None
        except metadata.PackageNotFoundError:
            pass  # (a build without its metadata: asked below)
        try:
            import torch
        except ImportError:
            return None
        return "cuda" if torch.cuda.is_available() else None
    try:
        import torch
    except ImportError as exc:
        raise ValidationError(f"device {device!r} needs PyTorch, which is not installed: "
                              "pip install 'ctperf[model]', or --device cpu") from exc
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValidationError(f"unknown torch device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValidationError(f"device {device!r} asked for, but torch sees "
                              f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


class ArrayOps:
    """The handful of array operations whose spelling differs between NumPy and PyTorch.

    Everything else the fits use (arithmetic, comparisons, slicing, boolean and integer
    indexing, ``floor``, ``clip``, ``minimum``, ``maximum``, ``abs``) is spelt the same in
    both libraries and is reached through ``ops.xp``. All floats are float64: the O(1) SSE
    subtracts large, nearly equal terms (|C|^2 and the cross terms), so float32 would lose
    most of its digits to cancellation.

    Parameters
    ----------
    device : str or None
        None for NumPy; otherwise a torch device ("cpu", "cuda", "cuda:1", ...).
    """

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.float: Any
        self.index: Any
        if device is None:
            self.xp: Any = np
            self.float = np.float64
            self.index = np.intp
        else:
            import torch  # only when a torch device is asked for

            self.xp = torch
            self.float = torch.float64
            self.index = torch.int64
            self._dev = torch.device(device)

    @property
    def is_numpy(self) -> bool:
        return self.device is None

    def asarray(self, x: Any) -> Any:
        """float64 array on this backend's device (C-contiguous)."""
        if self.is_numpy:
            return np.ascontiguousarray(x, dtype=np.float64)
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x, dtype=np.float64)
        return self.xp.as_tensor(x, dtype=self.float, device=self._dev)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x if self.is_numpy else x.detach().cpu().numpy()

    def arange(self, n: int) -> Any:
        if self.is_numpy:
            return np.arange(n)
        return self.xp.arange(n, device=self._dev)

    def full(self, shape: tuple[int, ...] | int, value: float) -> Any:
        if self.is_numpy:
            return np.full(shape, value)
        return self.xp.full(shape if isinstance(shape, tuple) else (shape,), value,
                            dtype=self.float, device=self._dev)

    def zeros_index(self, n: int) -> Any:
        if self.is_numpy:
            return np.zeros(n, dtype=np.intp)
        return self.xp.zeros(n, dtype=self.index, device=self._dev)

    def take(self, table: Any, index: Any) -> Any:
        """``table.ravel()[index]`` for a contiguous table."""
        return table.take(index) if self.is_numpy else self.xp.take(table, index)

    def indices(self, x: np.ndarray) -> Any:
        """A NumPy integer array as an index array of this backend."""
        return x if self.is_numpy else self.xp.as_tensor(x, dtype=self.index, device=self._dev)

    def pick(self, x: Any, j: Any) -> Any:
        """``x[i, j[i]]`` for every row i of a 2-D array."""
        if self.is_numpy:
            return np.take_along_axis(x, j[:, None], axis=1)[:, 0]
        return self.xp.take_along_dim(x, j[:, None], dim=1)[:, 0]

    def to_index(self, x: Any) -> Any:
        """Float array of whole numbers to an index array."""
        return x.astype(np.intp) if self.is_numpy else x.to(self.index)

    def nonzero(self, mask: Any) -> Any:
        """Indices of the true entries of a 1-D mask."""
        return np.flatnonzero(mask) if self.is_numpy else self.xp.nonzero(mask).ravel()

    def select(self, cond: Any, a: float, b: Any) -> Any:
        """``where(cond, a, b)`` with a scalar ``a`` and an array or scalar ``b`` (float64)."""
        if self.is_numpy:
            return np.where(cond, a, b)
        if not isinstance(b, self.xp.Tensor):
            b = self.xp.full(cond.shape, b, dtype=self.float, device=cond.device)
        return self.xp.where(cond, a, b)

    def fill(self, dst: Any, mask: Any, value: float) -> None:
        """``dst[mask] = value`` in place."""
        if self.is_numpy:
            np.putmask(dst, mask, value)
        else:
            dst.masked_fill_(mask, value)

    def put(self, dst: Any, index: Any, src: Any) -> None:
        """``dst.ravel()[index] = src`` in place (contiguous ``dst``)."""
        if self.is_numpy:
            if not dst.flags.c_contiguous:
                raise ValueError("put needs a C-contiguous array")
            dst.reshape(-1)[index] = src
        else:
            dst.view(-1)[index] = src

    def take_cols(self, x: Any, index: Any) -> Any:
        """Columns ``index`` (an index array of any shape) of a 2-D array: shape
        ``(x.shape[0], *index.shape)``."""
        if self.is_numpy:
            return x.take(index, axis=1)
        return x.index_select(1, index.reshape(-1)).reshape(x.shape[0], *index.shape)

    def amax0(self, x: Any) -> Any:
        """Maximum over the first axis."""
        return x.max(axis=0) if self.is_numpy else x.amax(dim=0)

    def put_where(self, dst: Any, mask: Any, src: Any) -> None:
        """``dst[mask] = src[mask]`` in place (mask broadcast against dst)."""
        if self.is_numpy:
            np.copyto(dst, src, where=mask)
        else:
            dst.copy_(self.xp.where(mask, src, dst))

    def argmax(self, x: Any, axis: int) -> Any:
        return x.argmax(axis=axis) if self.is_numpy else x.argmax(dim=axis)

    def tile(self, x: Any, reps: int) -> Any:
        return np.tile(x, reps) if self.is_numpy else x.repeat(reps)

    def concat(self, arrays: list[Any], axis: int) -> Any:
        if self.is_numpy:
            return np.concatenate(arrays, axis=axis)
        return self.xp.cat(arrays, dim=axis)

    def stack(self, arrays: list[Any], axis: int) -> Any:
        return np.stack(arrays, axis=axis) if self.is_numpy else self.xp.stack(arrays, dim=axis)
