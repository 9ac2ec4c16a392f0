"""A `spillover convert` output opens directly as a model: `LLM(model=store)` keeps the
packed weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from spillover import LLM
from spillover.layers.linear import Linear
from spillover.weights.convert import convert
from tests.models.tiny import save_hf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_llm_opens_converted_store(tmp_path: Path, quant: str) -> None:
    src = tmp_path / "src"
    save_hf("qwen3", src)
    store = convert(src, tmp_path / "store", quant=quant, group_size=32, show_progress=False)
    ids = list(range(5, 30))
    dense = LLM(model=str(src), device="cpu", dtype="float32").forward_logits(ids)
    llm = LLM(model=str(store), device="cpu", dtype="float32")
    assert llm.source.kind == "store"
    packed = [m for m in llm.model.modules() if isinstance(m, Linear) and m.fmt is not None]
    assert packed, "store weights were dequantized instead of kept packed"
    # the format asked for, not the policy's default (a converter bug once wrote int4
    # for --quant int8)
    assert {m.fmt.name for m in packed if m.fmt is not None} == {quant}
    assert llm.quant_record["model.layers.0.mlp.down_proj.weight"].startswith(quant)
    got = llm.forward_logits(ids)
    rel = ((got - dense).norm() / dense.norm()).item()
    # same bounds as quantize-at-load on this architecture (tests/unit/test_quant_models.py
    # measures ~0.02 / ~0.2)
    assert rel < (0.05 if quant == "int8" else 0.35), rel
    # greedy choices mostly survive quantization (a wrong layout or orientation would scramble them)
    assert got.argmax(-1).eq(dense.argmax(-1)).float().mean().item() > 0.6


def test_quant_flag_on_store_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_hf("qwen3", src)
    store = convert(src, tmp_path / "store", quant="int8", show_progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(model=str(store), device="cpu", dtype="float32", quant="int4")
