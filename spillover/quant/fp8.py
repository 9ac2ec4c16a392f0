"""FP8 e4m3 block-128 format (Qwen's official FP8 checkpoints), kept as FP8 bytes in memory.

weight float8_e4m3fn [E?, N, K] and float32 block scales [E?, ceil(N/128), ceil(K/128)];
w = fp8 * scale (the checkpoint calls it `weight_scale_inv` but it multiplies).
forward dequantizes the needed weight on the fly and runs a float matmul: exact on every device;
a fused FP8 kernel (sm_89+) is future work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from spillover.kernels.ref_quant import dequant_fp8_block_ref

FP8_MAX = 448.0


class Fp8BlockWeight:
    name = "fp8_block"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block: int = 128,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        assert weight.dtype == torch.float8_e4m3fn
        self.weight, self.scale, self.block = weight, scale.float(), block
        self.stacked = weight.dim() == 3
        self.act_dtype = act_dtype

    @classmethod
    def pack(cls, weight: torch.Tensor, block: int = 128,
             act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
        """Quantize a float [.., N, K] with one scale per block x block tile (absmax / 448)."""
        n, k = weight.shape[-2:]
        pn, pk = -n % block, -k % block
        w = F.pad(weight.float(), (0, pk, 0, pn))
        tiles = w.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [.., N/B, B, K/B, B]
        scale = tiles.abs().amax(dim=(-3, -1)) / FP8_MAX
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        s_full = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)
        q = (w / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q[..., :n, :k].contiguous(), scale, block, act_dtype)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        w, s = (self.weight, self.scale) if expert is None else (self.weight[expert], self.scale[expert])
        return dequant_fp8_block_ref(w, s, self.block).to(self.act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.weight.shape[-2], dtype=x.dtype, device=x.device)
        for e in torch.unique(expert_ids).tolist():
            rows = (expert_ids == e).nonzero().squeeze(1)
            y[rows] = F.linear(x[rows], self.dequantize(e).to(x.dtype))
        return y

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.dequantize(expert).to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    def meta(self) -> dict[str, Any]:
        return {"format": self.name, "block": self.block, "stacked": self.stacked}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
        return cls(parts["weight"], parts["scale"], int(meta.get("block", 128)), act_dtype)
