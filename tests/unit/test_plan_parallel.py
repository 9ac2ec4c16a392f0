"""plan/parallel.py: a one-GPU plan's bill divided the way tensor- and pipeline-parallel engines
shard a model (catalog configs, no weights)."""

from __future__ import annotations

import pytest

from spillover.catalog import CONFIGS
from spillover.config import ModelConfig
from spillover.hw.info import nominal_hardware
from spillover.plan.formats import scheme_for
from spillover.plan.inventory import EMBEDDINGS, LM_HEAD, NORMS, ROUTER, inventory_from_config
from spillover.plan.memory import Limits, MemoryPlan, plan_memory
from spillover.plan.parallel import (
    expert_parallel_helps,
    plan_parallel,
    shard_bill,
    smallest_parallel,
    tp_allowed,
)

NEXT = "Qwen/Qwen3-Next-80B-A3B-Instruct"


def plan_of(model: str, quant: str = "bf16", gpu: str = "h100", **limits: int) -> MemoryPlan:
    cfg = ModelConfig.from_hf(CONFIGS[model])
    return plan_memory(model, cfg, inventory_from_config(cfg), scheme_for(quant),
                       nominal_hardware(gpu, "256GB"), Limits(**limits))


def test_tp_must_divide_every_head_count() -> None:
    cfg = ModelConfig.from_hf(CONFIGS[NEXT])  # 16 heads, 2 KV heads, 16 / 32 linear heads
    assert [t for t in range(1, 17) if tp_allowed(cfg, t)] == [1, 2, 4, 8, 16]
    llama = ModelConfig.from_hf(CONFIGS["meta-llama/Llama-3.1-8B-Instruct"])  # 32 heads, 8 KV
    assert tp_allowed(llama, 8) and not tp_allowed(llama, 3) and not tp_allowed(llama, 64)


def test_the_shards_add_up_to_the_model_plus_what_is_replicated() -> None:
    plan = plan_of(NEXT)
    w = plan.weights_bytes
    replicated = w.get(ROUTER, 0) + w.get(NORMS, 0)
    for tp in (1, 2, 4, 8):
        b = shard_bill(plan, tp)
        # every rank holds its 1/tp of the sharded weights and all of the replicated ones
        assert tp * b.weights >= plan.weights_total + (tp - 1) * replicated
        assert tp * b.weights <= plan.weights_total + (tp - 1) * replicated + 4 * tp
    assert shard_bill(plan, 1).weights == plan.weights_total
    # across two stages the embedding and the LM head sit on different GPUs
    assert shard_bill(plan, 1, 2).weights < plan.weights_total // 2 + max(w[EMBEDDINGS],
                                                                         w[LM_HEAD]) + replicated


def test_kv_heads_are_replicated_once_tp_exceeds_them() -> None:
    plan = plan_of(NEXT)  # 2 KV heads
    kv = plan.kv_bytes_per_token
    assert [shard_bill(plan, t).kv_bytes_per_token for t in (1, 2, 4, 8)] == [kv, kv // 2,
                                                                            kv // 2, kv // 2]
    # linear-attention state has 16 / 32 heads: it keeps dividing
    assert shard_bill(plan, 8).state_bytes_per_sequence * 8 >= plan.state_bytes_per_sequence


def test_pipeline_stages_split_the_layers() -> None:
    plan = plan_of(NEXT)
    one, two = shard_bill(plan, 4, 1), shard_bill(plan, 4, 2)
    assert two.weights < one.weights and two.kv_bytes_per_token == one.kv_bytes_per_token // 2


def test_smallest_tp_that_fits_and_the_replicas_on_the_rest() -> None:
    hw = nominal_hardware("h100", "256GB")
    bf16 = smallest_parallel(plan_of(NEXT), hw, 8)
    fp8 = smallest_parallel(plan_of(NEXT, "fp8"), hw, 8)
    assert bf16 is not None and (bf16.tp, bf16.dp) == (4, 2)
    assert fp8 is not None and (fp8.tp, fp8.dp) == (2, 4)
    assert smallest_parallel(plan_of(NEXT), hw, 2) is None  # 74 GB of bf16 per GPU does not fit


@pytest.mark.parametrize("context, fits", [(32768, True), (10**9, True)])
def test_context_beyond_the_model_maximum_is_capped(context: int, fits: bool) -> None:
    plan = plan_of(NEXT, context=context)
    p = plan_parallel(plan, nominal_hardware("h100", "256GB"), 4)
    assert p.fits == fits and p.max_context == plan.config.max_position


def test_a_context_the_kv_room_cannot_hold_does_not_fit() -> None:
    model = "meta-llama/Llama-3.1-70B-Instruct"  # 320 KiB of KV a token, 35 GB a GPU at TP4
    hw = nominal_hardware("l40s", "256GB")
    p = plan_parallel(plan_of(model, gpu="l40s", context=131072), hw, 4)
    assert not p.fits and 0 < p.max_context < 131072 and p.reasons
    assert plan_parallel(plan_of(model, gpu="l40s", context=p.max_context), hw, 4).fits


def test_expert_parallel_only_where_tp_would_slice_experts_thin() -> None:
    nxt = ModelConfig.from_hf(CONFIGS[NEXT])  # 512-wide experts
    assert not expert_parallel_helps(nxt, 1) and expert_parallel_helps(nxt, 2)
    dense = ModelConfig.from_hf(CONFIGS["Qwen/Qwen3-32B"])
    assert not expert_parallel_helps(dense, 8)


def test_more_gpus_decode_faster_until_all_reduces_dominate() -> None:
    hw = nominal_hardware("h100", "256GB")
    plan = plan_of(NEXT, "fp8")
    speeds = [plan_parallel(plan, hw, t).decode_tok_s for t in (2, 4)]
    assert all(s > 0 for s in speeds)
    assert plan_parallel(plan_of(NEXT, "fp8", context=262144), hw, 4).decode_tok_s < speeds[1]
