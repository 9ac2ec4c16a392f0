"""Cache sizes for the engine, from the planner: one estimator for the plan and the allocation.

`cache_plan_for_engine` runs `plan_memory` for the engine's limits and cuts the KV blocks to its
budget; the engine allocates exactly `num_kv_blocks` and `num_state_slots` from the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from spillover.config import ModelConfig
from spillover.hw.info import HardwareInfo
from spillover.plan.memory import (
    ACTIVATIONS,
    KV_CACHE,
    LINEAR_STATE,
    RUNTIME,
    STAGING,
    Limits,
    MemoryPlan,
    MiB,
    _ceil_div,
    plan_memory,
    state_bytes_per_sequence,
)
from spillover.plan.speed import Prediction, Traffic, predict

# Default KV budget when the engine is given none: room for max_num_seqs sequences of this many
# tokens, bounded on the CPU (RAM is shared with everything else) and by a share of free GPU memory.
ENGINE_TOKENS_PER_SEQ = 4096
ENGINE_CPU_KV_CAP_BYTES = 1024 * MiB
ENGINE_GPU_FREE_FRACTION = 0.5
_CACHE_ENTRIES = (KV_CACHE, LINEAR_STATE, ACTIVATIONS, STAGING, RUNTIME)
# The default --max-num-seqs, as vLLM does it: the cache pool is sized from memory, and the batch
# may hold as many sequences as the pool holds at a typical length (a chat turn: prompt + answer).
# Longer sequences share the same pool: when it runs out the scheduler preempts the newest.
TYPICAL_SEQ_TOKENS = 256
# Caps: vLLM's default for its API server on most GPUs; on the CPU a step's cost grows with the
# batch, and 64 served 32 clients of the CPU demo with a TTFT p50 of 1.7 s where 16 gave 9.4 s
# (`python bench/serve_load.py`).
MAX_SEQS_GPU = 256
MAX_SEQS_CPU = 64


def resolve_max_model_len(cfg: ModelConfig, requested: int | None) -> int:
    """The longest sequence (prompt + output) the engine serves: `requested`, never above the
    model's `max_position`; the model's own limit when None or 0. The one place this is decided:
    the engine resolves it once, sizes its caches and scheduler with the result, and everyone
    else reads `Engine.max_model_len` (which the scheduler may cut further to the cache)."""
    return min(requested or cfg.max_position, cfg.max_position)


def engine_limits(
    *,
    max_num_seqs: int,
    max_len: int,
    block_size: int,
    token_budget: int,
    dtype_bytes: int,
    prompt_cache_slots: int,
    tokens_per_seq: int = ENGINE_TOKENS_PER_SEQ,
) -> Limits:
    """The engine's limits as planner Limits: caches in the model dtype, ssm state in fp32."""
    return Limits(
        context=max(min(max_len, tokens_per_seq), 1),
        seqs=max_num_seqs,
        token_budget=token_budget,
        block_size=block_size,
        kv_dtype_bytes=dtype_bytes,
        model_dtype_bytes=dtype_bytes,
        ssm_state_dtype_bytes=4,
        prompt_cache_slots=prompt_cache_slots,
    )


def cache_plan_for_engine(
    model: str,
    cfg: ModelConfig,
    hw: HardwareInfo,
    limits: Limits,
    *,
    max_len: int,
    kv_budget_bytes: int | None = None,
    num_kv_blocks: int | None = None,
    num_state_slots: int | None = None,
    loaded_weights: Mapping[str, Mapping[str, int]] | None = None,
    cpu_kv_cap_bytes: int = ENGINE_CPU_KV_CAP_BYTES,
    gpu_free_fraction: float = ENGINE_GPU_FREE_FRACTION,
) -> MemoryPlan:
    """The MemoryPlan the engine allocates from: plan_memory for `limits`, with the KV blocks cut to
    the engine's budget and the weights replaced by what is already loaded
    (tier -> component -> bytes).

    KV blocks: `num_kv_blocks` if given; else `kv_budget_bytes // block bytes` if given; else room
    for limits.seqs x limits.context tokens within `cpu_kv_cap_bytes` (no GPU in `hw`) or
    `gpu_free_fraction` of the GPU's free memory less the state slots. Never fewer than one
    sequence of `max_len` tokens plus a block. State slots: `num_state_slots`, else the plan's.
    Caches sit in the GPU tier when `hw` has a GPU, else in host RAM.
    """
    from spillover.plan.formats import scheme_for
    from spillover.plan.inventory import inventory_from_config

    plan = plan_memory(model, cfg, inventory_from_config(cfg), scheme_for("bf16"), hw, limits)
    bs = limits.block_size
    per_block = max(plan.kv_bytes_per_token, 1) * bs
    slots = plan.num_state_slots if num_state_slots is None else num_state_slots
    state = slots * plan.state_bytes_per_sequence
    wanted = limits.seqs * _ceil_div(limits.context, bs)
    budget = kv_budget_bytes
    if num_kv_blocks is not None:
        blocks = num_kv_blocks
    else:
        if budget is not None:
            blocks = budget // per_block
        else:
            gpu = hw.gpu
            if gpu is not None:
                free = gpu.vram_free if gpu.vram_free is not None else gpu.vram_total
                budget = int(free * gpu_free_fraction) - state
            else:
                budget = cpu_kv_cap_bytes
            blocks = min(wanted, budget // per_block)
        # at least one full-length sequence, so that a long prompt is never refused for size alone
        blocks = max(blocks, _ceil_div(max_len, bs) + 1)
    tiers = {t: dict(d) for t, d in plan.tiers.items()}
    weights = dict(plan.weights_bytes)
    if loaded_weights is not None:
        for d in tiers.values():
            for k in [k for k in d if k not in _CACHE_ENTRIES]:
                del d[k]
            # the engine keeps every weight where it was loaded: nothing streams
            d.pop(STAGING, None)
        weights = {}
        for tier, comps in loaded_weights.items():
            for comp, n in comps.items():
                tiers.setdefault(tier, {})[comp] = tiers.get(tier, {}).get(comp, 0) + n
                weights[comp] = weights.get(comp, 0) + n
    cache_tier = "gpu" if hw.gpu is not None else "host"
    tiers[cache_tier][KV_CACHE] = blocks * bs * plan.kv_bytes_per_token
    tiers[cache_tier][LINEAR_STATE] = state
    tiers = {t: {k: v for k, v in d.items() if v} for t, d in tiers.items()}
    predicted = plan.predicted
    if loaded_weights is not None:  # decode of what is loaded, where it is
        dec = predict_loaded_decode(cfg, hw, loaded_weights, limits.context, limits.kv_dtype_bytes)
        predicted = replace(predicted, decode_tok_s=dec.decode_tok_s,
                            decode_ms_by_link=dec.decode_ms_by_link)
    return replace(
        plan,
        predicted=predicted,
        tiers=tiers,
        weights_bytes=weights,
        staging_bytes=plan.staging_bytes if loaded_weights is None else 0,
        num_kv_blocks=blocks,
        num_state_slots=slots,
        extra={**plan.extra, "kv_budget_bytes": budget, "kv_blocks_wanted": wanted,
               "max_len": max_len},
    )


def default_max_num_seqs(cfg: ModelConfig, hw: HardwareInfo, dtype_bytes: int,
                         kv_budget_bytes: int | None = None) -> tuple[int, str]:
    """(max_num_seqs, why) when none is given: the sequences of TYPICAL_SEQ_TOKENS whose KV and
    state fit the engine's default cache budget (`kv_budget_bytes`, else 1 GiB on the CPU or half
    the GPU's free memory, as cache_plan_for_engine sizes it), between 1 and the device's cap."""
    from spillover.hw.info import fmt_bytes

    gpu = hw.gpu
    cap = MAX_SEQS_GPU if gpu is not None else MAX_SEQS_CPU
    budget = kv_budget_bytes
    if budget is None:
        if gpu is not None:
            free = gpu.vram_free if gpu.vram_free is not None else gpu.vram_total
            budget = int(free * ENGINE_GPU_FREE_FRACTION)
        else:
            budget = ENGINE_CPU_KV_CAP_BYTES
    per_seq = (cfg.kv_bytes_per_token(dtype_bytes) * TYPICAL_SEQ_TOKENS
               + state_bytes_per_sequence(cfg, dtype_bytes, 4))
    fit = budget // max(per_seq, 1)
    n = max(1, min(cap, fit))
    why = (f"{fit} sequences of {TYPICAL_SEQ_TOKENS} tokens fit the {fmt_bytes(budget)} cache "
           f"budget at {fmt_bytes(per_seq)} each" + (f", capped at {cap}" if fit > cap else ""))
    return n, why


def predict_loaded_decode(cfg: ModelConfig, hw: HardwareInfo,
                          weights: Mapping[str, Mapping[str, int]], context: int,
                          kv_dtype_bytes: int) -> Prediction:
    """Decode speed of the weights as loaded (tier -> component -> bytes, as
    spillover.engine.memory.loaded_weight_bytes measures them) at `context` tokens: each weight is
    read once per token where it sits (routed experts: the top-k share of them; the embedding
    table only as a tied lm_head), plus the KV cache up to `context` and one state read and
    write, by plan.speed.predict's links."""
    from spillover.plan.inventory import EMBEDDINGS, ROUTED_EXPERTS

    touched = cfg.num_experts_per_tok / cfg.num_experts if cfg.num_experts else 1.0

    def read(tier: str) -> float:
        total = 0.0
        for comp, n in weights.get(tier, {}).items():
            if comp == EMBEDDINGS and not cfg.tie_word_embeddings:
                continue  # one row per token
            total += n * (touched if comp == ROUTED_EXPERTS else 1.0)
        return total

    caches = (cfg.kv_bytes_per_token(kv_dtype_bytes) * context
              + 2 * state_bytes_per_sequence(cfg, kv_dtype_bytes, 4))
    gpu = hw.gpu is not None
    traffic = Traffic(gpu_bytes=read("gpu") + (caches if gpu else 0),
                      host_bytes=read("host") + (0 if gpu else caches), disk_bytes=read("disk"),
                      host_stream_bytes_per_chunk=0.0, disk_bytes_per_chunk=0.0,
                      flops_per_token=0.0, num_layers=cfg.num_layers)
    return predict(traffic, hw, 1)
