"""Sparse MoE block: softmax router over all experts, top-k, optional renormalisation, an
ExpertBank for the routed experts, and (Qwen3-Next) a shared expert with a sigmoid gate."""

from __future__ import annotations

import torch
from torch import nn

from spillover import kernels
from spillover.config import ModelConfig
from spillover.layers.linear import Linear
from spillover.layers.mlp import GatedMLP
from spillover.offload.bank import ExpertBank, ResidentExpertBank


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] in dtype, ids [T, k]); softmax in fp32 first."""
    return kernels.route_topk(router_logits, top_k, renormalize, dtype)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)  # the router stays dense
        self.experts: ExpertBank = ResidentExpertBank(cfg.num_experts, cfg.hidden_size,
                                                      cfg.moe_intermediate_size)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        return self.combine(x, self.experts(x, ids, weights))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], expert ids [T, k]) of the router."""
        return route(self.gate(x), self.top_k, self.renormalize, x.dtype)

    def combine(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum plus the gated shared expert (Qwen3-Next)."""
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            return kernels.shared_combine(routed, self.shared_expert(x),
                                          self.shared_expert_gate(x))
        return routed
