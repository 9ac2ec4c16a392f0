"""Tiny random Hugging Face models of every architecture, saved as checkpoints for our loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

BASE: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (config class, overrides); several per architecture to cover each flag
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-tied-mha": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-rope-llama3": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe-norm": ("Qwen3MoeConfig",
                       dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                            norm_topk_prob=True, head_dim=16)),
    "qwen3_moe-nonorm-sparse": ("Qwen3MoeConfig", dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
        norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3], head_dim=16)),
    "qwen3_next": ("Qwen3NextConfig", dict(
        num_hidden_layers=8, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], full_attention_interval=4,
        rope_theta=1e7, partial_rotary_factor=0.25, tie_word_embeddings=False)),
    "qwen3_next-dense-layer": ("Qwen3NextConfig", dict(
        num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=3, num_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=False, mlp_only_layers=[1], full_attention_interval=2,
        rope_theta=1e6, partial_rotary_factor=0.5, tie_word_embeddings=False)),
}


NORMS_1P = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "model.norm.weight")


def build_hf(name: str, seed: int = 0) -> Any:
    cls_name, over = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**{**BASE, **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    zero_centred = cfg.model_type == "qwen3_next"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and zero_centred and pname.endswith(NORMS_1P):
                # applied as (1 + w): random around 0 so that swapping w and 1 + w fails the test
                p.uniform_(-0.5, 0.5)
            elif p.ndim == 1:
                # Fresh init sets every norm to 1 (or 0 for zero-centred ones),
                # hiding w vs 1+w bugs.
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf(name: str, folder: Path, seed: int = 0) -> Any:
    model = build_hf(name, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model
