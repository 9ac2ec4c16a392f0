"""KV bytes per token and state bytes per sequence equal what is really allocated, for every
architecture: transformers' own cache after a forward pass, and the engine's cache layout built
from the MemoryPlan's numbers. Weight bytes per component equal the tensors of the real model."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from spillover.config import ModelConfig
from spillover.hw.info import nominal_hardware
from spillover.plan.formats import scheme_for
from spillover.plan.inventory import inventory_from_config
from spillover.plan.measure import allocate_from_plan, compare_peaks, measured_bytes_by_component
from spillover.plan.memory import Limits, MemoryPlan, plan_memory

_BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TINY: dict[str, dict[str, Any]] = {
    "llama": {**_BASE, "head_dim": 24, "tie_word_embeddings": True},
    "qwen2": {**_BASE, "num_key_value_heads": 1},
    "qwen3": {**_BASE, "head_dim": 32},
    "qwen3_moe": {
        **_BASE,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,
    },
    "qwen3_next": {
        **_BASE,
        "num_hidden_layers": 8,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "full_attention_interval": 4,
        "partial_rotary_factor": 0.25,
    },
}
B, T = 2, 7


def _hf_model(arch: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, **TINY[arch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()


def _plan(arch: str, context: int, seqs: int, block: int = 4) -> MemoryPlan:
    cfg = ModelConfig.from_hf({"model_type": arch, **TINY[arch]})
    return plan_memory(
        arch,
        cfg,
        inventory_from_config(cfg),
        scheme_for("bf16"),
        nominal_hardware("rtx4090"),
        Limits(context=context, seqs=seqs, block_size=block),
    )


@pytest.fixture(scope="module", params=list(TINY))
def arch_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, Any]:
    arch = str(request.param)
    model = _hf_model(arch)
    ids = torch.randint(0, 96, (B, T))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = model(ids, use_cache=True).past_key_values
    return arch, model, cache


def test_kv_bytes_per_token_equal_transformers_cache(
    arch_model: tuple[str, torch.nn.Module, Any],
) -> None:
    arch, _, cache = arch_model
    plan = _plan(arch, T, B)
    kv = 0
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            assert keys.shape[0] == B and keys.shape[2] == T
            kv += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    assert kv == plan.kv_bytes_per_token * B * T


def test_state_bytes_per_sequence_equal_transformers_state(
    arch_model: tuple[str, torch.nn.Module, Any],
) -> None:
    arch, _, cache = arch_model
    plan = _plan(arch, T, B)
    state = 0
    for i, layer in enumerate(cache.layers):
        if type(layer).__name__ != "LinearAttentionLayer":
            continue
        conv, rec = cache.get_conv_state(i), cache.get_recurrent_state(i)
        assert rec.dtype == torch.float32 and conv.dtype == torch.bfloat16
        k = conv.shape[-1]  # transformers keeps all K columns; the engine keeps the K-1 it needs
        state += conv[0].numel() * (k - 1) // k * conv.element_size()
        state += rec[0].numel() * rec.element_size()
    assert state == plan.state_bytes_per_sequence
    assert (state > 0) == (arch == "qwen3_next")


@pytest.mark.parametrize("arch", list(TINY))
def test_engine_cache_layout_allocates_exactly_the_plan(arch: str) -> None:
    plan = _plan(arch, context=37, seqs=3, block=8)
    assert plan.num_kv_blocks == 3 * 5  # ceil(37 / 8) blocks per sequence
    kv, states = allocate_from_plan(plan, device="meta")
    got = measured_bytes_by_component([], kv, states)["gpu"]
    assert got.get("kv_cache", 0) == plan.tiers["gpu"].get("kv_cache", 0)
    assert got.get("kv_cache", 0) == plan.num_kv_blocks * plan.block_size * plan.kv_bytes_per_token
    assert got.get("linear_state", 0) == plan.num_state_slots * plan.state_bytes_per_sequence
    for c in kv.values():
        assert c.k.shape == (15, 8, TINY[arch]["num_key_value_heads"], plan.config.head_dim)
    for s in states.values():
        assert s.ssm.dtype == torch.float32 and s.conv.dtype == torch.bfloat16


def test_weight_bytes_per_component_equal_the_real_model(
    arch_model: tuple[str, torch.nn.Module, Any],
) -> None:
    arch, model, _ = arch_model
    plan = _plan(arch, T, B)
    measured = measured_bytes_by_component(model.named_parameters())["host"]  # a CPU model
    assert measured == plan.weights_bytes
    assert sum(p.numel() for p in model.parameters()) == plan.params_total


def test_compare_peaks_reports_ratio() -> None:
    plan = _plan("qwen3", 64, 1)
    (row,) = compare_peaks(plan, {"gpu": plan.gpu_torch_bytes * 105 // 100})
    assert row.planned == plan.gpu_torch_bytes and 1.04 < row.ratio < 1.06
    assert "+5.0 %" in row.line()
