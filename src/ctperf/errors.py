"""Exceptions raised by ctperf. The CLI prints any :class:`CTPerfError` as one line and exits 2."""

from __future__ import annotations

from os import PathLike

__all__ = ["AIFRefused", "CTPerfError", "DependencyError", "InputError", "ValidationError"]


class CTPerfError(Exception):
    """Base class of every error ctperf raises on purpose."""


class DependencyError(CTPerfError, ModuleNotFoundError):
    """An optional dependency that the feature asked for needs is not installed."""


class ValidationError(CTPerfError, ValueError):
    """Data that does not satisfy a type's or function's contract."""


class AIFRefused(ValidationError):
    """The automatic AIF selection found no artery, or refused the one it chose (its bolus
    arriving after the brain's, none standing out of the noise): an AIF mask on an artery (a
    reader's, or a phantom's own) can still give the study its maps."""


class InputError(CTPerfError):
    """A file or folder that cannot be used, with the path named in the message."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
