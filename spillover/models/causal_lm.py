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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

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

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, pending) -> (x, pending): x is the residual stream; pending is the previous
        layer's MLP output, not yet added to it, so that its residual add runs in one kernel
        with this layer's input norm (None before the first layer)."""
        h, x = self.mix(x, pending, ctx)
        return x, self.mlp(h)

    def mix(self, x: torch.Tensor, pending: torch.Tensor | None,
            ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The token mixer (attention or Gated DeltaNet) between two residual adds, each fused
        with the norm after it: (the MLP's normed input, the residual stream)."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_norm(pending, x)
        if self.self_attn is not None:
            mixed = self.self_attn(h, ctx)
        else:
            assert self.linear_attn is not None
            mixed = self.linear_attn(h, ctx)
        return self.post_attention_layernorm.add_norm(mixed, x)


Carry = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Piece:
    """A stretch of the forward pass, from what the previous piece returned to what the next one
    takes. `graph` is False for a piece that must read device values on the host (a tiered
    expert bank deciding on its misses): a CUDA graph is cut there and the piece runs eagerly."""

    run: Callable[[Carry, ForwardContext], Carry]
    graph: bool


def decides_on_host(layer: DecoderLayer) -> bool:
    """Whether the layer's routed experts need the host mid-layer: a bank with experts outside
    its GPU slots, or one that hooks observe (`spillover profile` reads the routing)."""
    moe = layer.mlp
    if not isinstance(moe, SparseMoE):
        return False
    bank = moe.experts
    hooked = isinstance(bank, nn.Module) and bool(bank._forward_pre_hooks or bank._forward_hooks)
    return hooked or bank.host_decides


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
        pending = None
        for layer in self.model.layers:
            x, pending = layer(x, pending, ctx)
        return self._final_norm(x, pending)

    def _final_norm(self, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The last layer's residual add and the final norm."""
        return self.model.norm(x) if pending is None else self.model.norm.add_norm(pending, x)[0]

    def compute_logits(self, hidden: torch.Tensor,
                       ctx: ForwardContext | None = None) -> torch.Tensor:
        """Logits (float32) of the rows named by ctx.logits_indices (all rows if None)."""
        if ctx is not None and ctx.logits_indices is not None:
            hidden = hidden.index_select(0, ctx.logits_indices)
        return self.lm_head(hidden).float()

    def pieces(self) -> list[Piece]:
        """The forward pass and `compute_logits`, cut before each routed-expert call that
        decides on the host. Run in order from `(input_ids,)`, every piece taking what the one
        before returned, they give `(logits,)`: the function `forward` + `compute_logits` is,
        for a decode step that a CUDA graph replays piece by piece."""
        cuts = [i for i, layer in enumerate(self._layers()) if decides_on_host(layer)]
        out: list[Piece] = []
        # An embedding table kept in RAM gathers its rows on the host: looked up eagerly first.
        embed_on_host = bool(getattr(self.model.embed_tokens, "host_decides", False))
        if embed_on_host:
            out.append(Piece(lambda carry, ctx: (self.model.embed_tokens(carry[0]),), graph=False))
        start = -1 if embed_on_host else 0
        for cut in [*cuts, None]:
            out.append(Piece(partial(self._stretch, start, cut), graph=True))
            if cut is not None:
                out.append(Piece(partial(self._routed, cut), graph=False))
                start = cut + 1
        return out

    def _stretch(self, start: int, cut: int | None, carry: Carry,
                 ctx: ForwardContext) -> Carry:
        """Layers start..cut-1, then layer `cut` up to its routing (or, with no cut, the final
        norm and the logits). Starts from the token ids, from their embeddings (start -1), or
        from where layer start-1 was cut."""
        layers = self._layers()
        pending: torch.Tensor | None = None
        if start == 0:
            x = self.model.embed_tokens(carry[0])
        elif start == -1:
            x, start = carry[0], 0
        else:
            x, h, routed = carry
            moe = layers[start - 1].mlp
            assert isinstance(moe, SparseMoE)
            pending = moe.combine(h, routed)
        for layer in layers[start:cut]:
            x, pending = layer(x, pending, ctx)
        if cut is None:
            return (self.compute_logits(self._final_norm(x, pending), ctx),)
        layer = layers[cut]
        h, x = layer.mix(x, pending, ctx)
        assert isinstance(layer.mlp, SparseMoE)
        weights, ids = layer.mlp.route(h)
        return x, h, weights, ids

    def _routed(self, cut: int, carry: Carry, ctx: ForwardContext) -> Carry:
        x, h, weights, ids = carry
        moe = self._layers()[cut].mlp
        assert isinstance(moe, SparseMoE)
        return x, h, moe.experts(h, ids, weights)

    def fuse_shared_experts(self) -> int:
        """Move each MoE layer's shared expert into its resident bank and its gate into the router
        (`SparseMoE.fuse_shared`): fewer launches a step, the same function. Returns the layers
        changed (none of a tiered model's)."""
        return sum(layer.mlp.fuse_shared() for layer in self._layers()
                   if isinstance(layer.mlp, SparseMoE))

    def _layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.model.layers]
