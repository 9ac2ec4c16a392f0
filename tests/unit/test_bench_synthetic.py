"""`spillover bench --synthetic`: random models built in their final format, and the bench that
drives them through the engine (CPU, tiny configs of tests/models/tiny.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from spillover.bench.run import run_bench, tier_rates, tier_snapshot
from spillover.bench.synthetic import (
    build_synthetic,
    load_synthetic_config,
    random_format,
    routing_concentration,
    with_layers,
)
from spillover.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from spillover.llm import LLM
from spillover.offload.bank import ResidentExpertBank
from spillover.offload.residency import LayerResidency
from spillover.offload.tiered import TieredExpertBank
from spillover.weights.build import load_policy
from tests.models.tiny import BASE, CONFIGS

MOE, NEXT, SPARSE = "qwen3_moe-norm", "qwen3_next", "qwen3_moe-nonorm-sparse"


def hf_dict(name: str) -> dict[str, Any]:
    cls_name, over = CONFIGS[name]
    return getattr(transformers, cls_name)(**{**BASE, **over}).to_dict()


def tiny(name: str) -> ModelConfig:
    return ModelConfig.from_hf(hf_dict(name))


@pytest.mark.parametrize("name", [MOE, NEXT])
@pytest.mark.parametrize("quant,group", [("int4", 32), ("int4", 128), ("bf16", 128)])
def test_forward_gives_finite_logits(name: str, quant: str, group: int) -> None:
    cfg = tiny(name)
    record: dict[str, str] = {}
    model = build_synthetic(cfg, "cpu", torch.float32, quant, group, record=record)
    llm = LLM.from_model(model, cfg, "cpu", "float32")
    logits = llm.forward_logits(list(range(1, 30)))
    assert logits.shape == (29, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=0).mean() > 1e-3  # positions differ: activations are not degenerate
    assert not any(p.is_meta for p in model.parameters())
    experts = record["model.layers.0.mlp.experts.w13"]
    if quant == "bf16":
        assert experts.startswith("dense") and all(v.startswith("dense") for v in record.values())
    else:  # K = 64 takes group 32; group 128 falls back to int8 per channel, as the loader does
        assert experts.startswith("int4" if group == 32 else "int8")
        for bank in model.modules():
            if isinstance(bank, ResidentExpertBank):
                assert (
                    sum(p.numel() for p in bank.parameters()) == 0
                )  # no float copy of the experts
    # the loader's policy: router, norms, embeddings and lm_head stay float
    assert record["model.layers.0.mlp.gate"].startswith("dense")
    assert record["lm_head"].startswith("dense")


def test_formats_dequantize_to_small_centred_weights() -> None:
    policy = load_policy("int4", 32, torch.float32)
    gen = torch.Generator().manual_seed(0)

    def fill(t: torch.Tensor) -> None:
        t.view(-1).view(torch.uint8).random_(0, 256, generator=gen)

    for fmt in ("int4", "int8", "fp8_block"):
        packed, _ = random_format((4, 256, 512), fmt, "test", policy, torch.float32, fill, gen)
        assert packed.stacked
        w = packed.dequantize().float()
        assert w.shape == (4, 256, 512)
        assert abs(w.mean().item()) < 2e-3, fmt
        assert 0.015 < w.std().item() < 0.025, fmt


def test_layers_keep_the_pattern() -> None:
    cfg = tiny(NEXT)  # 8 layers, full attention every 4th
    assert with_layers(cfg, 4).layer_types == cfg.layer_types[:4]
    assert with_layers(cfg, 6).layer_types == cfg.layer_types[:6]
    two = with_layers(cfg, 2)
    assert two.num_layers == 2 and two.layer_types == (
        LINEAR_ATTENTION,
        FULL_ATTENTION,
    )  # both kinds kept
    sparse = tiny(SPARSE)  # MoE on every 2nd layer
    assert with_layers(sparse, 2).moe_layers == sparse.moe_layers[:2]
    model = build_synthetic(cfg, "cpu", torch.float32, "int4", 32, num_layers=4)
    assert len(model.model.layers) == 4 and model.config.layer_types == cfg.layer_types[:4]


def test_routing_skew_concentrates_routing() -> None:
    cfg = tiny(MOE)
    shares = [
        routing_concentration(
            build_synthetic(cfg, "cpu", torch.float32, "int4", 32, routing_skew=s),
            tokens=2048,
            top_fraction=0.25,
        )
        for s in (0.0, 1.5)
    ]
    assert shares[0] is not None and shares[1] is not None
    assert shares[1] > shares[0] + 0.05
    assert (
        routing_concentration(build_synthetic(tiny("llama-untied"), "cpu", torch.float32, "bf16"))
        is None
    )


def test_config_from_file_and_catalog(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_dict(NEXT)))
    assert load_synthetic_config(path) == tiny(NEXT)
    assert load_synthetic_config(tmp_path) == tiny(NEXT)
    big = load_synthetic_config("Qwen/Qwen3-Next-80B-A3B-Instruct")
    assert big.num_experts == 512 and big.is_hybrid


def test_run_bench_reports_every_field() -> None:
    cfg = tiny(MOE)
    llm = LLM.from_model(
        build_synthetic(cfg, "cpu", torch.float32, "int4", 32), cfg, "cpu", "float32"
    )
    result = run_bench(
        llm,
        prompt_lens=[8, 40],
        decode_batches=[1, 3],
        decode_tokens=3,
        decode_prompt_len=12,
        warmup_steps=1,
    )
    assert [p["prompt_len"] for p in result["prefill"]] == [8, 40]
    assert all(p["tok_s"] > 0 and p["ttft_s"] > 0 for p in result["prefill"])
    assert [d["batch"] for d in result["decode"]] == [1, 3]
    assert all(d["tok_s"] > 0 and d["tokens"] == d["batch"] * 3 for d in result["decode"])
    assert result["memory"]["rss_bytes"] > 0 and result["memory"]["rss_peak_bytes"] > 0
    assert result["tiers"] == {}  # resident banks count nothing
    json.dumps(result)
    assert not llm.engine.has_unfinished()


def _tiered(layer: int) -> TieredExpertBank:
    return TieredExpertBank(layer, LayerResidency(8, 0), None, None, [], None, torch.device("cpu"))


def test_tier_counters_sum_over_layers() -> None:
    model = nn.Sequential(_tiered(0), _tiered(1))
    before = tier_snapshot(model)
    for layer, (hits, misses) in zip(model, [(3, 1), (5, 3)], strict=True):
        layer.residency.counters.hits += hits
        layer.residency.counters.misses += misses
        layer.tier_stats.copy_bytes += 2_000_000_000
        layer.tier_stats.copy_s += 0.5
    rates = tier_rates(before, tier_snapshot(model))
    assert rates["hits"] == 8 and rates["misses"] == 4
    assert rates["slot_hit_rate"] == pytest.approx(8 / 12)
    assert rates["copy_gb_s"] == pytest.approx(4.0)


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spillover.cli.main import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(hf_dict(NEXT)))
    out = tmp_path / "out.json"
    rc = main(
        [
            "bench",
            str(config),
            "--synthetic",
            "--layers",
            "2",
            "--prompt-lens",
            "16",
            "--batches",
            "1,2",
            "--decode-tokens",
            "4",
            "--json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["synthetic"] and result["quant"] == "int4" and result["config"]["num_layers"] == 2
    assert result["prefill"][0]["prompt_len"] == 16 and result["prefill"][0]["tok_s"] > 0
    assert [d["batch"] for d in result["decode"]] == [1, 2] and all(
        d["tok_s"] > 0 for d in result["decode"]
    )
    assert "decode" in capsys.readouterr().out
