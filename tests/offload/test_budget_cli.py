"""The memory budgets from the command line place a MoE model's experts over the tiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spillover.cli.main import main
from tests.models.tiny import build_hf


def test_bench_with_a_cpu_budget_runs_tiered(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    build_hf("qwen3_next").config.to_json_file(str(tmp_path / "config.json"))
    out = tmp_path / "bench.json"
    rc = main(["bench", str(tmp_path / "config.json"), "--synthetic", "--device", "cpu",
               "--prompt-lens", "16", "--batches", "1", "--decode-tokens", "2",
               "--cpu-memory", "20MB", "--expert-policy", "lfu", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["tiers"]["lookups"] > 0  # tiered banks served the run
    row = result["decode"][0]
    assert row["tok_s"] > 0
    # the tier counters of a decode row are those of its timed steps alone
    assert row["steps"] == 2 and 0 < row["lookups"] < result["tiers"]["lookups"]


def test_a_budget_too_small_is_refused_with_the_plan(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    build_hf("qwen3_next").config.to_json_file(str(tmp_path / "config.json"))
    rc = main(["bench", str(tmp_path / "config.json"), "--synthetic", "--device", "cpu",
               "--prompt-lens", "16", "--batches", "1", "--decode-tokens", "2",
               "--cpu-memory", "1MB"])
    assert rc == 2
    assert "does not fit the memory budgets" in capsys.readouterr().err
