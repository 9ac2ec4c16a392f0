"""The engine sizes its caches from the planner's MemoryPlan (one estimator) and reports planned vs
measured memory after warm-up."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.engine import EngineConfig, cache_sizes, memory_plan
from spillover.plan.memory import KV_CACHE, LINEAR_STATE
from tests.engine.conftest import make_engine


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["llama-untied", "qwen3_next"])
def test_caches_allocated_from_the_plan(
    name: str, tiny_llm: Callable[[str], LLM], caplog: pytest.LogCaptureFixture
) -> None:
    llm = tiny_llm(name)
    engine = make_engine(llm, max_num_seqs=4, max_model_len=128)
    plan, cfg = engine.memory_plan, llm.config
    runner = engine.runner
    kv = _bytes([t for c in runner.kv_caches.values() for t in (c.k, c.v)])
    state = _bytes([t for c in runner.state_caches.values() for t in (c.conv, c.ssm)])
    block_bytes = plan.block_size * cfg.kv_bytes_per_token(4)  # float32 caches
    blocks = engine.scheduler.block_manager.num_blocks
    assert runner.layout.num_blocks == plan.num_kv_blocks == blocks
    assert kv == plan.num_kv_blocks * block_bytes == plan.tiers["host"][KV_CACHE]
    # 4 sequences x 128 tokens of 16-token blocks; one full-length sequence always fits
    assert plan.num_kv_blocks == 4 * 128 // 16
    if cfg.linear_layers:
        assert plan.num_state_slots == 4 + 8 + 1 == runner.layout.num_state_slots
        planned = plan.num_state_slots * plan.state_bytes_per_sequence
        assert state == planned == plan.tiers["host"][LINEAR_STATE]
    else:
        assert plan.num_state_slots == 0 and state == 0 and LINEAR_STATE not in plan.tiers["host"]
    assert "gpu" not in {t for t, d in plan.tiers.items() if d}  # the CPU engine has no GPU tier
    sizes = cache_sizes(cfg, engine.config, llm.device, llm.dtype)
    assert sizes == (plan.num_kv_blocks, plan.num_state_slots)

    assert engine.memory_report is None
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=2, temperature=0.0))
    with caplog.at_level(logging.INFO, logger="spillover.engine"):
        while engine.has_unfinished():
            engine.step()
    assert engine.memory_report is not None
    (row,) = engine.memory_report
    assert row.device == "host caches" and row.planned == row.measured == kv + state
    assert "planned vs measured" in caplog.text


def test_budget_and_overrides(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3_next")
    cfg, dev, dt = llm.config, llm.device, llm.dtype
    block = 16 * cfg.kv_bytes_per_token(4)
    full = -(-cfg.max_position // 16) + 1  # one full-length sequence and a block
    # an explicit budget gives budget // block bytes, never fewer than one full-length sequence
    def blocks(config: EngineConfig) -> int:
        return memory_plan(cfg, config, dev, dt).num_kv_blocks

    assert blocks(EngineConfig(kv_cache_memory_bytes=1000 * block)) == 1000
    assert blocks(EngineConfig(kv_cache_memory_bytes=block)) == full
    # the default on the CPU: room for max_num_seqs full sequences, capped at 1 GiB
    assert blocks(EngineConfig(max_num_seqs=2)) == 2 * cfg.max_position // 16
    plan = memory_plan(cfg, EngineConfig(num_kv_blocks=7, num_state_slots=3), dev, dt)
    assert (plan.num_kv_blocks, plan.num_state_slots) == (7, 3)
    assert plan.tiers["host"][KV_CACHE] == 7 * block
    assert plan.tiers["host"][LINEAR_STATE] == 3 * plan.state_bytes_per_sequence
    engine = make_engine(llm, num_kv_blocks=7, num_state_slots=3)
    assert (engine.runner.layout.num_blocks, engine.runner.layout.num_state_slots) == (7, 3)
