"""Activation / workspace peak of one forward pass over the token budget.

This is the one term a config cannot make exact (docs/planning.md, "2. The bill"): it is an upper
estimate of the tensors alive at once inside the widest layer, scaled by the tokens per step, plus
the sampler's logits. The GPU benchmark (bench/plan_vs_measured.py) measures it.
"""

from __future__ import annotations

from spillover.config import ModelConfig

FP32 = 4


def per_token_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes alive per token in the widest layer (mixer + MLP never peak at the same time)."""
    a = dtype_bytes
    h = cfg.hidden_size
    # residual stream, normed input and the fp32 norm temporaries
    hidden = h * (2 * a + 2 * FP32)
    mixers = [0]
    if cfg.attention_layers:
        q = cfg.num_heads * cfg.head_dim * (2 if cfg.attn_output_gate else 1)
        kv = 2 * cfg.num_kv_heads * cfg.head_dim
        # projections, rotated copies, attention output (flash-style kernels keep scores per tile)
        mixers.append((q + kv) * a * 2 + cfg.num_heads * cfg.head_dim * (a + FP32))
    if cfg.linear_layers:
        nv_dv = cfg.linear_num_value_heads * cfg.linear_value_head_dim
        proj = cfg.linear_conv_dim + nv_dv + 2 * cfg.linear_num_value_heads
        # projections in the model dtype; conv output, gated-delta chunk inputs and output in fp32
        mixers.append(proj * a + (cfg.linear_conv_dim + 3 * nv_dv) * FP32)
    ffn = [0]
    if not cfg.moe_layers or not all(cfg.moe_layers):
        ffn.append(3 * cfg.intermediate_size * a)
    if cfg.is_moe:
        k = cfg.num_experts_per_tok
        # gathered in, gate/up/act, out
        routed = k * (h * a + 3 * cfg.moe_intermediate_size * a + h * FP32)
        router = cfg.num_experts * FP32 * 2 + k * 12  # logits, softmax, top-k ids/weights
        shared = 3 * cfg.shared_expert_intermediate_size * a
        ffn.append(routed + router + shared)
    return hidden + max(mixers) + max(ffn)


def activation_bytes(cfg: ModelConfig, token_budget: int, seqs: int, dtype_bytes: int = 2) -> int:
    """Peak workspace of one step: token_budget tokens in flight, logits for `seqs` rows."""
    logits = max(seqs, 1) * cfg.vocab_size * (FP32 * 2 + dtype_bytes)  # logits, probs, lm_head out
    return token_budget * per_token_bytes(cfg, dtype_bytes) + logits
