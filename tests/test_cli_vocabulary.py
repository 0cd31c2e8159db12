"""One spelling per concept across every ``ctperf`` subcommand.

The parser is built as ``ctperf`` builds it and walked: a concept has one option string (no
synonym beside its canonical form), an option string means the same thing in every command
(type, choices, metavar, action and kind of default) and a help text that shows a default shows
the real one, written as ``%(default)s`` so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from typing import Any

import pytest

from ctperf.cli import build_parser

#: Known synonyms -> the canonical spelling of their concept (docs: the vocabulary table).
SYNONYMS = {
    "--mask": "--brain-mask",
    "--batch": "--batch-size",
    "--interval": "--frame-interval",
    "--threads": "--workers",
    "--jobs": "--workers",
    "--preprocess": "--register",
    "--no-preprocess": "--register",
    "--mode": "--method",
    "--kH": "--kh",
    "--series-uid": "--series",
}

#: A help text's default tag: "[...]" after a space (not an index such as ``x[:t]``).
_TAG = re.compile(r"(?:^|\s)\[([^\]]*)\]")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _walk(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    return {name: _options(sub) for name, sub in _subparsers(parser).items()}


def _default_kind(action: argparse.Action) -> str:
    """None is 'no default' and fits any kind; otherwise the type of the default."""
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        return "none"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "number"
    if isinstance(default, (list, tuple)):
        return "list"
    return type(default).__name__


def _type_name(kind: Any) -> str | None:
    """The argparse type's name; the bound of ``count(least)`` is the command's own range."""
    if kind is None:
        return None
    return re.sub(r">=\d+$", "", getattr(kind, "__name__", repr(kind)))


def _signature(action: argparse.Action) -> dict[str, Any]:
    return {"action": type(action).__name__,
            "type": _type_name(action.type),
            "choices": None if action.choices is None else tuple(action.choices),
            "metavar": action.metavar,
            "nargs": action.nargs}


def vocabulary_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Every breach of the one-spelling rules, as readable lines (empty when clean)."""
    problems: list[str] = []
    uses: dict[str, list[tuple[str, argparse.Action]]] = defaultdict(list)
    for command, actions in _walk(parser).items():
        for action in actions:
            for option in action.option_strings:
                uses[option].append((command, action))
    # (a) a synonym never coexists with its canonical form, anywhere in the CLI
    for synonym, canonical in SYNONYMS.items():
        if synonym in uses and canonical in uses:
            problems.append(f"{synonym} ({', '.join(c for c, _ in uses[synonym])}) is a synonym "
                            f"of {canonical} ({', '.join(c for c, _ in uses[canonical])})")
    # (b) one option string, one meaning: type, choices, metavar, action, nargs, default kind
    for option, where in uses.items():
        if len(where) < 2:
            continue
        first_command, first = where[0]
        for command, action in where[1:]:
            a, b = _signature(first), _signature(action)
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            kinds = {_default_kind(first), _default_kind(action)} - {"none"}
            if len(kinds) > 1:
                diff["default"] = (first.default, action.default)
            if diff:
                problems.append(f"{option} differs between {first_command} and {command}: "
                                + "; ".join(f"{k} {x!r} != {y!r}" for k, (x, y) in diff.items()))
    # (c) a help text that shows a default shows the real one, from %(default)s
    for command, actions in _walk(parser).items():
        for action in actions:
            text = action.help or ""
            flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
            if flag or action.default in (None, argparse.SUPPRESS):
                continue  # no default to show (a flag, or "[one per CPU core]" for None)
            for tag in _TAG.findall(text):
                if not tag.startswith("%(default)s"):
                    problems.append(f"{command} {action.option_strings[0]}: help shows the "
                                    f"default as [{tag}] typed by hand, not from %(default)s "
                                    f"(the default is {action.default!r})")
    return problems


def test_every_concept_has_one_spelling_across_commands():
    problems = vocabulary_problems(build_parser())
    assert not problems, "\n".join(problems)


def test_the_vocabulary_check_catches_each_kind_of_breach():
    # A parser built to break each rule once: the check must name every breach.
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    a, b = sub.add_parser("a"), sub.add_parser("b")
    a.add_argument("--mask")
    b.add_argument("--brain-mask")
    a.add_argument("--workers", type=int, default=None)
    b.add_argument("--workers", type=float, default=None)
    a.add_argument("--rho", type=float, default=1.04, help="density [1.05]")
    b.add_argument("--method", choices=("x", "y"), default="x", help="method [%(default)s]")
    problems = "\n".join(vocabulary_problems(parser))
    assert "--mask (a) is a synonym of --brain-mask (b)" in problems
    assert "--workers differs between a and b: type 'int' != 'float'" in problems
    assert "a --rho: help shows the default as [1.05]" in problems
    assert "--method" not in problems


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_subcommand_help_renders(command, capsys):
    # %(default)s and friends must format: a broken help text fails only when someone asks
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert command in out
    # a description is printed as written (argparse formats only the options' help): a "%%"
    # meant for formatting shows as two signs (predict's "20 %%" had)
    assert "%%" not in out


def test_the_command_reference_page_is_current():
    """docs/cli.md lists every option of every command (22 had been in --help only): it is
    made from the help texts, and must be remade when they change."""
    from pathlib import Path

    from ctperf.cli import command_reference

    page = Path(__file__).parents[1] / "docs" / "cli.md"
    assert page.read_text(encoding="utf-8") == command_reference(), (
        "docs/cli.md is out of date: remake it as its first paragraph says")
    for name, sub in _subparsers(build_parser()).items():
        for action in _options(sub):
            assert f"`{action.option_strings[0]}" in page.read_text(encoding="utf-8"), name
