"""Full (softmax) attention with a paged KV cache.

Covers Llama (plain), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm) and Qwen3-Next gated
attention (q_proj also yields a per-head output gate; zero-centred q/k norms; partial RoPE).
"""

from __future__ import annotations

import torch
from torch import nn

from spillover import kernels
from spillover.config import ModelConfig
from spillover.kernels.context import ForwardContext
from spillover.layers.linear import Linear
from spillover.layers.norm import RMSNorm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.gated = cfg.attn_output_gate
        q_out = self.n_heads * self.head_dim * (2 if self.gated else 1)
        kv_out = self.n_kv * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias,
                               shards=[q_out, kv_out, kv_out])
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size)
        norm_args = (self.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
        self.q_norm = RMSNorm(*norm_args) if cfg.qk_norm else None
        self.k_norm = RMSNorm(*norm_args) if cfg.qk_norm else None
        self.eps, self.norm_offset = cfg.rms_norm_eps, cfg.norm_offset
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q_out, kv_out, _ = self.qkv_proj.shards
        q, k, v = self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        gate = None
        if self.gated:
            # per head: [query(head_dim) | gate(head_dim)], interleaved head by head
            qg = q.view(t, self.n_heads, 2 * self.head_dim)
            q, gate = qg[..., : self.head_dim], qg[..., self.head_dim :]
        q = q.view(t, self.n_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.n_kv, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.n_kv, self.head_dim)
        assert ctx.rope_cos_sin is not None
        q_w = self.q_norm.weight if self.q_norm is not None else None
        k_w = self.k_norm.weight if self.k_norm is not None else None
        q, k = kernels.qk_norm_rope(q, k, q_w, k_w, self.eps, self.norm_offset,
                                    *ctx.rope_cos_sin)
        o = kernels.paged_attention(q, k, v, ctx.kv_caches[self.layer_idx], ctx, self.scale)
        if gate is not None:
            o = kernels.sigmoid_mul(o, gate)
        o = o.reshape(t, self.n_heads * self.head_dim)
        return self.o_proj(o)
