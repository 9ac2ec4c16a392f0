"""The default --max-num-seqs comes from the memory plan (spillover.plan.engine_cache)."""

from __future__ import annotations

from spillover.catalog import CONFIGS, lookup
from spillover.config import ModelConfig
from spillover.hw.info import GiB, with_overrides
from spillover.hw.probe import probe
from spillover.plan.engine_cache import (
    ENGINE_CPU_KV_CAP_BYTES,
    MAX_SEQS_CPU,
    TYPICAL_SEQ_TOKENS,
    default_max_num_seqs,
)
from spillover.plan.memory import state_bytes_per_sequence


def _cfg(name: str) -> ModelConfig:
    key = lookup(name)
    assert key is not None
    return ModelConfig.from_hf(CONFIGS[key])


def test_cpu_demo_serves_32_clients_at_once() -> None:
    cpu = with_overrides(probe(use_cache=False), no_gpu=True)
    n, why = default_max_num_seqs(_cfg("HuggingFaceTB/SmolLM2-135M-Instruct"), cpu, 4)
    # float32 KV of 30 layers x 3 heads x 64: 45 KiB a token, 91 sequences of 256 in 1 GiB
    assert n == MAX_SEQS_CPU >= 32 and "capped at 64" in why


def test_hybrid_model_is_bounded_by_its_state_slots() -> None:
    gpu = with_overrides(probe(use_cache=False), gpu="rtx5090", vram="32GiB")
    cfg = _cfg("Qwen/Qwen3-Next-80B-A3B-Instruct")
    budget = 4 * GiB
    n, why = default_max_num_seqs(cfg, gpu, 2, kv_budget_bytes=budget)
    per_seq = cfg.kv_bytes_per_token(2) * TYPICAL_SEQ_TOKENS + state_bytes_per_sequence(cfg, 2, 4)
    assert n == budget // per_seq and 1 < n < 256  # ~74 MiB of state a sequence dominates
    assert "GiB cache budget" in why


def test_never_below_one() -> None:
    cpu = with_overrides(probe(use_cache=False), no_gpu=True)
    n, _ = default_max_num_seqs(_cfg("Qwen/Qwen3-8B"), cpu, 4, kv_budget_bytes=1 << 20)
    assert n == 1
    assert ENGINE_CPU_KV_CAP_BYTES == 1 << 30  # the budget the CPU default assumes
