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
from spillover.quant import WeightFormat
from spillover.quant.bf16 import Bf16Weight


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
        self.shared_in_bank = False  # `fuse_shared` moved the shared expert into the bank
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        return self.combine(x, self.experts(x, ids, weights))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], expert ids [T, k]) of the router: softmax in fp32, top-k; with the
        shared expert in the bank, a (k+1)-th column: its sigmoid gate and its id."""
        return kernels.route_topk(self.gate(x), self.top_k, self.renormalize, x.dtype,
                                  shared=self.shared_in_bank)

    def combine(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum plus the gated shared expert (Qwen3-Next), unless the bank
        computed it as one of the routed rows."""
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            return kernels.shared_combine(routed, self.shared_expert(x),
                                          self.shared_expert_gate(x))
        return routed

    def fuse_shared(self) -> bool:
        """Move the shared expert into a resident bank as its last expert, and its gate into the
        router as its last row: the router's one matmul gives both, and the shared expert runs in
        the routed experts' launches (its sigmoid gate as its routing weight). The same function;
        False (nothing changed) where the formats do not join, or the bank is tiered and decides
        on the host."""
        shared, gate = self.shared_expert, self.shared_expert_gate
        append = getattr(self.experts, "append_expert", None)  # resident or mapped-tiered banks
        if (shared is None or gate is None or append is None
                or self.gate.fmt is not None or gate.fmt is not None
                or self.gate.bias is not None or gate.bias is not None
                or gate.weight.dtype != self.gate.weight.dtype):
            return False
        if not append(_as_format(shared.gate_up_proj), _as_format(shared.down_proj)):
            return False
        self.gate.weight = nn.Parameter(torch.cat([self.gate.weight, gate.weight]),
                                        requires_grad=False)
        self.gate.out_features += 1
        self.gate.shards = [self.gate.out_features]
        self.shared_expert = self.shared_expert_gate = None
        self.shared_in_bank = True
        return True


def _as_format(linear: Linear) -> WeightFormat:
    return linear.fmt if linear.fmt is not None else Bf16Weight(linear.weight.data)
