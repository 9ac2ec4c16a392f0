"""Catalog configs: parameter counts equal transformers' own count of the meta-device model."""

from __future__ import annotations

import warnings

import pytest
import torch

from spillover.catalog import CONFIGS, UnknownModelError, get_config, lookup
from spillover.config import ModelConfig
from spillover.plan.inventory import inventory_from_config

# Parameter counts published on each model's hub page (safetensors "Model size"); they check that
# the catalog values are the released configs, independently of transformers.
PUBLISHED = {
    "Qwen/Qwen3-Next-80B-A3B-Instruct": 79_674_391_296,
    "Qwen/Qwen3-235B-A22B": 235_093_634_560,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
    "Qwen/Qwen3-32B": 32_762_123_264,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen2.5-72B-Instruct": 72_706_203_648,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}


def _transformers_count(raw: dict[str, object]) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(raw)
    model_type = str(d.pop("model_type"))
    cfg = AutoConfig.for_model(model_type, **d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one Parameter


@pytest.mark.parametrize("key", [k for k in CONFIGS if "Thinking" not in k])
def test_param_count_matches_transformers_meta_model(key: str) -> None:
    raw = CONFIGS[key]
    ours = inventory_from_config(ModelConfig.from_hf(raw)).total_params
    assert ours == _transformers_count(raw)
    if key in PUBLISHED:
        assert ours == PUBLISHED[key]


def test_qwen3_next_component_counts_match_spec() -> None:
    inv = inventory_from_config(ModelConfig.from_hf(CONFIGS["Qwen/Qwen3-Next-80B-A3B-Instruct"]))
    p = inv.params_by_component()
    assert inv.total_params == 79_674_391_296
    assert p["routed_experts"] == 77_309_411_328
    assert p["attention"] == 12 * 27_263_488
    assert p["linear_attention"] == 36 * 33_718_464
    assert p["shared_experts"] == 150_994_944
    assert p["router"] == 50_331_648 + 98_304  # routers + shared-expert gates
    assert p["norms"] == 198_656
    assert p["embeddings"] == p["lm_head"] == 311_164_928


def test_lookup_by_loose_names() -> None:
    assert lookup("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert lookup("qwen3-8b") == "Qwen/Qwen3-8B"
    assert lookup("Qwen3-Next-80B-A3B-Thinking") == "Qwen/Qwen3-Next-80B-A3B-Thinking"
    assert lookup("qwen3-next-80b") == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    assert lookup("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B-Instruct"
    assert lookup("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lookup("qwen2.5") is None  # four sizes: ambiguous
    assert lookup("mistral-7b") is None


def test_get_config_returns_a_copy_and_explains_unknown_names() -> None:
    key, cfg = get_config("qwen3-30b-a3b")
    cfg["num_experts"] = 1
    assert CONFIGS[key]["num_experts"] == 128
    with pytest.raises(UnknownModelError, match="not in the built-in catalog"):
        get_config("Qwen/Qwen9-1T")
