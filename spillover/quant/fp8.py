"""FP8 e4m3 block-128 format (Qwen's official FP8 checkpoints), kept as FP8 bytes in memory.

weight float8_e4m3fn [E?, N, K] and float32 block scales [E?, ceil(N/128), ceil(K/128)];
w = fp8 * scale (the checkpoint calls it `weight_scale_inv` but it multiplies).
Decode on CUDA reads the FP8 bytes directly (`fp8_gemv`: codes converted in registers, one scale per
block); elsewhere, and for prefill, the needed weight is dequantized on the fly for a float matmul.
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
        from spillover.quant.dispatch import fp8_matmul

        y = fp8_matmul(self, x.reshape(-1, x.shape[-1]), None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        from spillover.quant.dispatch import fp8_matmul

        return fp8_matmul(self, x, expert_ids)

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.dequantize(expert).to(x.dtype))

    def stacked_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [E, N, K], scale [E, N/B, K/B]) with E = 1 for a dense weight: the kernels' layout."""
        if self.stacked:
            return self.weight, self.scale
        return self.weight.unsqueeze(0), self.scale.unsqueeze(0)

    def to(self, device: torch.device | str) -> Fp8BlockWeight:
        return type(self)(self.weight.to(device), self.scale.to(device), self.block, self.act_dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    def meta(self) -> dict[str, Any]:
        return {"format": self.name, "block": self.block, "stacked": self.stacked}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
        return cls(parts["weight"], parts["scale"], int(meta.get("block", 128)), act_dtype)
