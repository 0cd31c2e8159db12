"""Which code made an output: the release number and a digest of the package's own files.

The release number alone does not change between the commits of one release, so two versions
of ctperf that map differently could write the same ``0.1.0`` into their records, and a
cohort's "one cohort, one version" guard could never fire. :func:`software_version` adds a
digest of every file of the installed package (its code and data), as a PEP 440 local label:
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
    """The first 12 hex digits of a SHA-256 over the files under ``root`` (relative path and
    content; compiled caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
