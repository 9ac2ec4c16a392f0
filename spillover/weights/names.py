"""Per-format tensor-name tables (data): GGUF (llama.cpp) names -> Hugging Face checkpoint names."""

from __future__ import annotations

# Global tensors.
GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-block tensors: "blk.{i}.<key>" -> "model.layers.{i}.<value>".
GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    # stacked experts [E, ...]: loaded whole into the expert bank
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}

# Tensors that checkpoints carry but inference does not use.
IGNORED_PREFIXES = ("mtp.",)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
GGUF_IGNORED = ("rope_freqs.weight",)


def gguf_to_hf(name: str) -> str | None:
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in GGUF_BLOCK:
            return f"model.layers.{idx}.{GGUF_BLOCK[rest]}"
    return None
