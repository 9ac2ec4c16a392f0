"""MemoryPlan: Qwen3-Next's byte numbers (docs/planning.md, "2. The bill"), placement invariants
and the first user's case."""

from __future__ import annotations

import pytest

from spillover.catalog import CONFIGS
from spillover.config import ModelConfig
from spillover.hw.info import GiB, nominal_hardware, with_overrides
from spillover.plan.advice import make_plan
from spillover.plan.formats import BF16, FP8, INT4, INT4_ZP, INT8, WeightScheme, scheme_for
from spillover.plan.inventory import COMPONENTS, inventory_from_config
from spillover.plan.memory import Limits, plan_memory

NEXT = "Qwen/Qwen3-Next-80B-A3B-Instruct"


@pytest.fixture(scope="module")
def nxt() -> tuple[ModelConfig, object]:
    cfg = ModelConfig.from_hf(CONFIGS[NEXT])
    return cfg, inventory_from_config(cfg)


def _total(inv: object, scheme: WeightScheme) -> int:
    return sum(inv.bytes_by_component(scheme).values())  # type: ignore[attr-defined]


def test_weight_bytes_reproduce_spec_table(nxt: tuple[ModelConfig, object]) -> None:
    _, inv = nxt
    gb = lambda s: round(_total(inv, s) / 1e9, 2)  # noqa: E731
    gib = lambda s: round(_total(inv, s) / GiB, 2)  # noqa: E731
    assert (gb(WeightScheme.uniform(BF16)), gib(WeightScheme.uniform(BF16))) == (159.35, 148.41)
    assert (gb(WeightScheme.uniform(FP8)), gib(WeightScheme.uniform(FP8))) == (80.37, 74.85)
    assert (gb(WeightScheme.uniform(INT4)), gib(WeightScheme.uniform(INT4))) == (42.08, 39.19)
    assert (gb(WeightScheme.uniform(INT4_ZP)), gib(WeightScheme.uniform(INT4_ZP))) == (43.32, 40.34)
    assert (gb(WeightScheme(BF16, INT4)), gib(WeightScheme(BF16, INT4))) == (44.59, 41.53)
    # the spec's int8 row leaves out the per-channel scales ("negligible"): 80.35 GB without them
    int8 = _total(inv, WeightScheme.uniform(INT8))
    quantised_params = 79_000_240_128
    tensors = [t for t in inv.tensors if t.quantizable]  # type: ignore[attr-defined]
    rows = sum(t.shape[-2] * (t.shape[0] if len(t.shape) == 3 else 1) for t in tensors)
    assert int8 == quantised_params + 674_151_168 * 2 + 2 * rows
    assert round((int8 - 2 * rows) / 1e9, 2) == 80.35


def test_kv_and_state_of_qwen3_next(nxt: tuple[ModelConfig, object]) -> None:
    cfg, inv = nxt
    plan = plan_memory(NEXT, cfg, inv, scheme_for("int4"), nominal_hardware("h100"),
                       Limits(context=262144))
    assert plan.kv_bytes_per_token == 24_576
    assert plan.state_bytes_per_sequence == 77_266_944  # conv bf16 (3 cols) + fp32 state
    assert plan.tiers["gpu"]["kv_cache"] == 6 * GiB  # 256K tokens
    assert plan.num_kv_blocks == 262144 // 16
    assert plan.params_active_per_token == 3_563_764_480  # with lm_head, without embeddings


def test_first_users_case_golden() -> None:
    """RTX 5090 + 60 GB RAM, 32K context: bf16 does not fit and says why; int4 fits."""
    cfg = ModelConfig.from_hf(CONFIGS[NEXT])
    inv = inventory_from_config(cfg)
    hw = with_overrides(nominal_hardware("rtx5090", "60GB"), disk="1.9TB")
    limits = Limits(context=32768)
    bf16 = make_plan(NEXT, cfg, inv, hw, limits, "bf16")
    assert not bf16.fits and bf16.verdict == "disk"
    why = " ".join(bf16.reasons)
    assert "148.41 GiB" in why and "55.88 GiB RAM" in why and "VRAM" in why
    assert bf16.tier_total("disk") > 60 * GiB
    assert any("--quant" in s for s in bf16.suggestions)
    assert any("GB of RAM" in s for s in bf16.suggestions)

    int4 = make_plan(NEXT, cfg, inv, hw, limits, "int4")
    assert int4.fits and int4.verdict == "gpu+ram"
    assert int4.tier_total("disk") == 0
    assert int4.tier_total("gpu") <= hw.gpus[0].vram_total
    assert 0 < int4.expert_slots_per_layer < 512
    assert int4.expert_slots_per_layer + int4.host_experts_per_layer == 512
    assert int4.max_context >= 32768
    # every weight byte is placed exactly once
    for comp, size in int4.weights_bytes.items():
        assert sum(int4.tiers[t].get(comp, 0) for t in ("gpu", "host", "disk")) == size
    pr = int4.predicted
    assert 20 < pr.decode_tok_s < 500 and pr.prefill_tok_s > 500
    assert {"gpu_mem", "host_mem", "fixed"} <= set(pr.decode_ms_by_link)
    assert pr.decode_tok_s > 20 * bf16.predicted.decode_tok_s  # bf16 reads ~70 GiB from disk

    auto = make_plan(NEXT, cfg, inv, hw, limits, "auto")
    assert auto.fits and auto.scheme.name == "fp8"  # best quality that fits in 31.5 + 50 GiB
    assert "--quant auto chose fp8" in auto.reasons[0]


def test_caches_that_do_not_fit_the_gpu_are_reported() -> None:
    cfg = ModelConfig.from_hf(CONFIGS["meta-llama/Llama-3.1-8B-Instruct"])
    inv = inventory_from_config(cfg)
    hw = nominal_hardware("rtx3060", "32GB")
    plan = make_plan("llama", cfg, inv, hw, Limits(context=131072, seqs=4), "int4")
    assert plan.verdict == "no" and not plan.fits
    assert 0 < plan.max_context < 131072
    assert any("--context" in s for s in plan.suggestions)
    ok = make_plan("llama", cfg, inv, hw, Limits(context=plan.max_context, seqs=4), "int4")
    assert ok.fits
    too_long = make_plan("llama", cfg, inv, hw, Limits(context=plan.max_context + 16, seqs=4),
                         "int4")
    assert not too_long.fits


def test_small_model_fits_on_gpu_and_dense_model_spills_layers() -> None:
    small = ModelConfig.from_hf(CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"])
    p = make_plan("smol", small, inventory_from_config(small), nominal_hardware("rtx4090"),
                  Limits(context=8192))
    assert p.verdict == "gpu" and p.scheme.name == "bf16" and p.tier_total("host") == 0
    big = ModelConfig.from_hf(CONFIGS["meta-llama/Llama-3.1-70B-Instruct"])
    inv = inventory_from_config(big)
    q = make_plan("70b", big, inv, nominal_hardware("rtx4090", "128GB"), Limits(context=8192),
                  "int4")
    assert q.verdict == "gpu+ram" and 0 < q.dense_layers_on_gpu < 80
    # hybrid decode speed is dominated by the bytes the CPU reads (docs/planning.md, "4. Speed")
    assert q.predicted.decode_ms_by_link["host_mem"] > q.predicted.decode_ms_by_link["gpu_mem"]


def test_cpu_only_machine_plans_in_ram() -> None:
    cfg = ModelConfig.from_hf(CONFIGS["Qwen/Qwen3-8B"])
    p = make_plan("q8", cfg, inventory_from_config(cfg), nominal_hardware(None, "32GB"),
                  Limits(context=4096))
    assert p.verdict == "ram" and p.fits and p.tier_total("gpu") == 0
    assert p.tiers["host"]["kv_cache"] == 4096 * cfg.kv_bytes_per_token(2)
    assert p.predicted.decode_tok_s > 0 and p.predicted.prefill_tok_s > 0


def test_more_vram_never_hurts() -> None:
    cfg = ModelConfig.from_hf(CONFIGS["Qwen/Qwen3-30B-A3B"])
    inv = inventory_from_config(cfg)
    prev_slots, prev_speed = -1, 0.0
    for vram in ("8GiB", "12GiB", "16GiB", "24GiB", "48GiB"):
        hw = with_overrides(nominal_hardware("rtx4090", "64GB"), vram=vram)
        p = plan_memory("q", cfg, inv, scheme_for("int4"), hw, Limits(context=16384))
        assert p.expert_slots_per_layer >= prev_slots
        assert p.predicted.decode_tok_s >= prev_speed
        prev_slots, prev_speed = p.expert_slots_per_layer, p.predicted.decode_tok_s
    assert prev_slots == 128 and p.verdict == "gpu"
    assert set(p.weights_bytes) <= set(COMPONENTS)
