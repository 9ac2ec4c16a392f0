"""Qwen3-Next's shared expert moved into the resident bank (and its gate into the router) computes
what the separate shared expert does; where the shapes differ, nothing moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spillover import LLM
from spillover.layers.moe import SparseMoE
from spillover.models.causal_lm import CausalLM
from tests.models.tiny import save_hf


def _moe(llm: LLM) -> list[SparseMoE]:
    return [m for m in llm.model.modules() if isinstance(m, SparseMoE)]


def test_shared_expert_in_the_bank_keeps_the_logits(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf("qwen3_next", tmp_path)
    fused = LLM(str(tmp_path), device="cpu", dtype="float32")
    blocks = _moe(fused)
    assert blocks and all(b.shared_in_bank and b.shared_expert is None for b in blocks)
    assert all(b.gate.out_features == b.experts.num_experts + 1 for b in blocks)
    with monkeypatch.context() as patch:
        patch.setattr(CausalLM, "fuse_shared_experts", lambda self: 0)
        apart = LLM(str(tmp_path), device="cpu", dtype="float32")
    assert all(not b.shared_in_bank and b.shared_expert is not None for b in _moe(apart))
    ids = [5, 17, 3, 99, 42, 8]
    torch.testing.assert_close(fused.forward_logits(ids), apart.forward_logits(ids),
                               rtol=1e-5, atol=1e-5)


def test_shared_expert_of_another_size_stays_apart(tmp_path: Path) -> None:
    save_hf("qwen3_next-dense-layer", tmp_path)  # shared expert 24 wide, routed 16
    llm = LLM(str(tmp_path), device="cpu", dtype="float32")
    assert all(not b.shared_in_bank and b.shared_expert is not None for b in _moe(llm))
