"""`spillover chat`: the REPL's commands, with a fake LLM (no model load)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from spillover.cli import main as cli_main


class FakeLLM:
    def __init__(self) -> None:
        self.histories: list[list[dict[str, str]]] = []

    def stream_chat(self, history: list[dict[str, str]], params: Any) -> Iterator[str]:
        self.histories.append([dict(m) for m in history])
        yield "ok"


def test_reset_is_acknowledged_and_clears_history(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    llm = FakeLLM()
    monkeypatch.setattr(cli_main, "_load", lambda args: llm)
    lines = iter(["hello", "/reset", "again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = cli_main.build_parser().parse_args(["chat", "--system", "be brief"])
    assert cli_main.cmd_chat(args) == 0
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out
    # the second turn sees only the system prompt and its own message, not the first turn
    assert llm.histories[1] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "again"}]
