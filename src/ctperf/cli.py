"""The ``ctperf`` command line: discovers the subcommands in :mod:`ctperf.commands`."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from ctperf import commands
from ctperf.errors import CTPerfError

__all__ = ["build_parser", "command_reference", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other ctperf error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ctperf.versioning import software_version

    parser = _Parser(
        prog="ctperf",
        description="CT perfusion maps for acute ischemic stroke (model-based and U-Net).",
    )
    parser.add_argument("--version", action="version", version=f"ctperf {software_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}")
               for m in pkgutil.iter_modules(commands.__path__)]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 99), m.__name__)):
        module.register(sub)
    return parser


def command_reference() -> str:
    """Every command's description, arguments and options as Markdown (docs/cli.md), from the
    same help texts as ``--help``, defaults filled in."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command reference", "",
             "Every command's arguments and options, from the texts `ctperf COMMAND --help` "
             "prints (this page is made from them: `python -c \"from ctperf.cli import "
             "command_reference; print(command_reference(), end='')\" > docs/cli.md`). What "
             "the commands write, and the units, are in the README and the pages of `docs/`.",
             "", "Before the command: `ctperf -v COMMAND ...` logs progress details; "
             "`ctperf --version` prints the version. Progress bars are drawn when standard "
             "error is a terminal; piped to a file, it holds only the messages.", ""]
    for name, sub in action.choices.items():
        lines += [f"## `ctperf {name}`", "", " ".join((sub.description or "").split()), "",
                  "| argument | meaning |", "|---|---|"]
        for act in sub._actions:
            if act.dest == "help" or act.help == argparse.SUPPRESS:
                continue
            metavar = act.metavar or ("{" + ",".join(map(str, act.choices)) + "}"
                                      if act.choices else act.dest.upper())
            shown = act.dest if not act.option_strings else ", ".join(act.option_strings) + (
                f" {metavar}" if act.nargs != 0 else "")
            text = (act.help or "") % {**vars(act), "prog": sub.prog, "default": act.default}
            cell = " ".join(text.split()).replace("|", "\\|")
            lines.append(f"| `{shown}` | {cell} |")
        lines.append("")
    return "\n".join(lines)


class _Terminated(SystemExit):
    """SIGTERM, raised where the command was, so that its temporaries are removed."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated(128 + signum)


#: Write failures that name no file (a full disk, a file-size or quota limit): the command's
#: output is named instead.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


def _output_arg(args: argparse.Namespace) -> Path | None:
    """The command's output path (its ``out``, ``outdir`` or ``dst``), None without one."""
    return next((Path(getattr(args, n)) for n in ("out", "outdir", "dst")
                 if getattr(args, n, None) is not None), None)


def _output_of(args: argparse.Namespace) -> str:
    out = _output_arg(args)
    return "the output" if out is None else str(out)


@contextmanager
def _lock_output(args: argparse.Namespace) -> Iterator[None]:
    """Hold the command's output for its whole run (:func:`ctperf.io.state.output_lock`): two
    runs into one output had both exited 0, the last one's output replacing the first's."""
    out = _output_arg(args)
    if out is None:
        yield
        return
    from ctperf.io.state import output_lock

    with output_lock(out):
        yield


@contextmanager
def _exit_cleanly_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a batch scheduler) into SystemExit, so that the temporaries of
    outputs being written are removed on the way out, as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: Python's and NumPy's MemoryError, PyTorch's
    allocators (a RuntimeError on the CPU, ``torch.OutOfMemoryError`` on a GPU)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(error, oom):
        return True
    return "can't allocate memory" in str(error)


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 120 characters."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _underlying(exc: OSError) -> OSError:
    """The file system's own error behind ``exc``: a library may re-raise it as a bare OSError
    without its number (pydicom: "With tag (7FE0,0010) got exception: [Errno 28] ...")."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and (cause.errno is not None or cause.filename):
            return cause
        cause = cause.__cause__ or cause.__context__
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ctperf.io.atomic import set_writer

    set_writer(f"ctperf {args.command}")
    try:
        with _exit_cleanly_on_sigterm(), _lock_output(args):
            return int(args.func(args) or 0)
    except CTPerfError as exc:
        print(f"ctperf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of the output went away (``ctperf info STUDY | head``): stop quietly, and
        # keep Python from failing again on flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        cause = _underlying(error)
        if cause.filename is None and cause.errno not in _WRITE_ERRNOS:
            raise
        # A file system refusal (permissions, full disk) is not a bug: one line, like the rest.
        where = (f"{cause.filename}" if cause.filename is not None
                 else f"{_output_of(args)}: could not be written")
        print(f"ctperf {args.command}: error: {where}: {cause.strerror}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        # sizes too large for the machine (a matrix, a network, a filter's reach): one line
        print(f"ctperf {args.command}: error: out of memory ({_first_line(error)}): the "
              "study, matrix or network asked for is too large for this machine; check the "
              "sizes given", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctperf {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated as exc:
        print(f"ctperf {args.command}: terminated", file=sys.stderr)
        return int(exc.code or 143)
    finally:
        set_writer(None)  # main() called from Python: its later outputs are not this command's


if __name__ == "__main__":
    sys.exit(main())
