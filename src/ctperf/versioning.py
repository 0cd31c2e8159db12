"""Which code made an output: the release number and a digest of the package's own files.

The release number alone does not change between the commits of one release, so two versions
of ctperf that map differently could write the same ``0.1.0`` into their records, and a
cohort's "one cohort, one version" guard could never fire. :func:`software_version` adds a
digest of the installed package's modules, as a PEP 440 local label:
``0.1.0+src.<12 hex digits>``. Any change to the code changes it; the same code installed
anywhere (editable, wheel, another machine) gives the same one.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["software_version", "source_digest"]


@functools.cache
def software_version() -> str:
    """``<release>+src.<digest>``: the release number and :func:`source_digest` of the
    installed package."""
    from ctperf import __version__

    return f"{__version__}+src.{source_digest(Path(__file__).resolve().parent)}"


def source_digest(root: Path) -> str:
    """The first 12 hex digits of a SHA-256 over the files a wheel of the package ships under
    ``root`` (``*.py`` and ``py.typed``: relative path and content, line endings as LF), so
    that an editor's backup, a cache folder or a checkout's line endings do not count, and
    the same code gives one digest installed editable or from a wheel."""
    digest = hashlib.sha256()
    files = [p for p in Path(root).rglob("*") if p.is_file() and _shipped(p.relative_to(root))]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
        except OSError:
            digest.update(b"unreadable\0")   # a module that cannot be read fails at import
    return digest.hexdigest()[:12]


def _shipped(rel: Path) -> bool:
    """Whether a package file goes into the wheel: a module or ``py.typed``, outside hidden
    folders and caches."""
    if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
        return False
    return rel.suffix == ".py" or rel.name == "py.typed"
