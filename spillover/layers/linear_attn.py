"""Gated DeltaNet (Qwen3-Next linear attention) over per-sequence state slots.

Shapes for one step of T tokens: Hk key heads, Hv value heads (Hv = r·Hk), dk = dv = head dims.
The checkpoint groups projections by key head; we keep its layout and regroup in forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spillover import kernels
from spillover.config import ModelConfig
from spillover.kernels.context import ForwardContext
from spillover.layers.linear import Linear
from spillover.layers.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.hv // self.hk
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        h = cfg.hidden_size
        self.in_proj_qkvz = Linear(h, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = Linear(h, 2 * self.hv)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.linear_conv_kernel_dim,
                                groups=self.conv_dim, bias=False)
        self.conv1d.weight.requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.hv), requires_grad=False)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        # [T, conv_dim] = q | k | v over all heads; z [T, Hv, dv]; b, a [T, Hv]
        mixed, z, b, a = kernels.gdn_split(self.in_proj_qkvz(x), self.in_proj_ba(x), self.hk,
                                           self.dk, self.r, self.dv)
        cache = ctx.state_caches[self.layer_idx]
        if ctx.is_pure_decode:
            # one token per sequence: conv update, gates and recurrence as one op (fused on CUDA)
            o = kernels.gdn_decode(mixed, self.conv1d.weight.squeeze(1), cache.conv, a, b,
                                   self.A_log, self.dt_bias, cache.ssm, ctx)
        else:
            mixed = kernels.causal_conv1d(mixed, self.conv1d.weight.squeeze(1), cache.conv, ctx)
            q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            q = q.reshape(t, self.hk, self.dk)
            k = k.reshape(t, self.hk, self.dk)
            v = v.reshape(t, self.hv, self.dv)

            beta = b.sigmoid()
            # log decay, fp32, <= 0
            g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
            o = kernels.gated_delta_rule(q, k, v, g, beta, cache.ssm, ctx)  # [T, Hv, dv]
        o = self.norm(o, z)
        return self.out_proj(o.reshape(t, self.value_dim))
