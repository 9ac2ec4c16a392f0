"""The decoder-only causal LM behind every supported architecture.

The five architectures differ only in facts `ModelConfig` carries:
  llama      attention + SwiGLU MLP, optionally tied embeddings
  qwen2      + q/k/v bias
  qwen3      + per-head q/k RMSNorm
  qwen3_moe  + sparse MoE MLP on the layers `moe_layers` marks
  qwen3_next + Gated DeltaNet on 3 of every 4 layers, gated attention with partial RoPE,
               zero-centred (1+w) norms, MoE with a shared expert on every layer
"""

from __future__ import annotations

import torch
from torch import nn

from spillover.config import FULL_ATTENTION, ModelConfig
from spillover.kernels.context import ForwardContext
from spillover.layers.attention import Attention
from spillover.layers.linear import Linear
from spillover.layers.linear_attn import GatedDeltaNet
from spillover.layers.mlp import GatedMLP
from spillover.layers.moe import SparseMoE
from spillover.layers.norm import RMSNorm
from spillover.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int) -> None:
        super().__init__()
        self.is_attention = cfg.layer_types[idx] == FULL_ATTENTION
        self.self_attn: Attention | None = Attention(cfg, idx) if self.is_attention else None
        self.linear_attn: GatedDeltaNet | None = (
            None if self.is_attention else GatedDeltaNet(cfg, idx))
        self.mlp: GatedMLP | SparseMoE = (
            SparseMoE(cfg) if cfg.moe_layers[idx]
            else GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.self_attn is not None:
            x = x + self.self_attn(h, ctx)
        else:
            assert self.linear_attn is not None
            x = x + self.linear_attn(h, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_dim, cfg.rope)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]

    def rope_cos_sin(
        self, positions: torch.Tensor, max_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary cos/sin rows [T, 1, rotary_dim] for `positions` in the activations' dtype, or
        None without attention layers: the runner puts them in the ForwardContext it builds."""
        if not self.config.attention_layers:
            return None
        return self.rotary.cos_sin(positions, max_pos, self.model.embed_tokens.weight.dtype)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] (flat varlen batch) -> final hidden states [T, H]. Reads `ctx` only."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor,
                       ctx: ForwardContext | None = None) -> torch.Tensor:
        """Logits (float32) of the rows named by ctx.logits_indices (all rows if None)."""
        if ctx is not None and ctx.logits_indices is not None:
            hidden = hidden.index_select(0, ctx.logits_indices)
        return self.lm_head(hidden).float()
