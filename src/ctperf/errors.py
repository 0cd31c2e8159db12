"""Exceptions raised by ctperf. The CLI prints any :class:`CTPerfError` as one line and exits 2."""

from __future__ import annotations

from os import PathLike

__all__ = ["CTPerfError", "DependencyError", "InputError", "ValidationError"]


class CTPerfError(Exception):
    """Base class of every error ctperf raises on purpose."""


class DependencyError(CTPerfError, ModuleNotFoundError):
    """An optional dependency that the feature asked for needs is not installed."""


class ValidationError(CTPerfError, ValueError):
    """Data that does not satisfy a type's or function's contract."""


class InputError(CTPerfError):
    """A file or folder that cannot be used, with the path named in the message."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
