"""Every flag and positional of every `spillover` command says what it does in `--help`."""

from __future__ import annotations

import argparse
from typing import Any

from spillover.cli.main import build_parser


def _parsers(p: argparse.ArgumentParser, name: str = "spillover") -> list[tuple[str, Any]]:
    out = [(name, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, sub in a.choices.items():
                out += _parsers(sub, f"{name} {sub_name}")
    return out


def test_every_action_has_help() -> None:
    missing = []
    parsers = _parsers(build_parser())
    assert len(parsers) > 8  # generate, chat, serve, plan, probe, convert, profile, bench, ...
    for name, p in parsers:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue  # the sub-commands are checked one by one (and their help= below)
            if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS:
                missing.append(f"{name}: {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "arguments without help text:\n" + "\n".join(missing)


def test_every_sub_command_has_help() -> None:
    for name, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                assert set(helps) == set(a.choices), f"{name}: sub-commands without help"
                assert all(h and h.strip() for h in helps.values()), name
