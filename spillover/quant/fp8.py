"""FP8 e4m3 block format (Qwen's FP8 checkpoints, compressed-tensors FP8), kept as FP8 bytes.

weight float8_e4m3fn [E?, N, K] and float32 block scales [E?, ceil(N/BN), ceil(K/BK)]: 128 x 128
blocks (Qwen, compressed-tensors FP8_BLOCK), or 1 x K (one scale per output row: compressed-tensors
FP8_DYNAMIC); w = fp8 * scale (the checkpoint calls it `weight_scale_inv` but it multiplies).
Decode on CUDA reads the FP8 bytes directly (`kernels/triton/fp8_gemv.py`: codes converted in
registers, one scale per block); elsewhere, and for prefill, the needed weight is dequantized on
the fly for a float matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from spillover.kernels.ref_quant import dequant_fp8_block_ref, fp8_block_shape
from spillover.quant.bf16 import WeightShape
from spillover.quant.packing import CHUNK_ELEMS

FP8_MAX = 448.0


class Fp8BlockWeight(WeightShape):
    name = "fp8_block"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 block: int | tuple[int, int] = 128,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        assert weight.dtype == torch.float8_e4m3fn
        self.block_n, self.block = fp8_block_shape(block)  # rows and columns (K) per scale
        n, k = weight.shape[-2:]
        blocks = (-(-n // self.block_n), -(-k // self.block))
        if tuple(scale.shape[-2:]) != blocks:
            raise ValueError(f"FP8 scales {list(scale.shape)} do not match weight "
                             f"{list(weight.shape)} in blocks of {self.block_n}x{self.block} "
                             f"({list(blocks)} expected)")
        self.weight, self.scale = weight, scale.float()
        self.stacked = weight.dim() == 3
        self.act_dtype = act_dtype

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.block_n, self.block

    @property
    def nbytes(self) -> int:
        """One byte per weight plus a float32 scale per block."""
        return self.weight.numel() + self.scale.numel() * self.scale.element_size()

    @classmethod
    def pack(cls, weight: torch.Tensor, block: int = 128,
             act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
        """Quantize a float [.., N, K] with one scale per block x block tile (absmax / 448).

        Works on bands of whole row blocks through one zero-padded float32 scratch, so temporaries
        stay a few MB whatever the weight's size (same values as quantizing the padded
        tensor at once).
        """
        n, k = weight.shape[-2:]
        lead = weight.shape[:-2]
        w3 = weight.detach().reshape(-1, n, k)
        nrb, nkb = -(-n // block), -(-k // block)
        q = torch.empty(w3.shape, dtype=torch.float8_e4m3fn, device=w3.device)
        scale = torch.empty(w3.shape[0], nrb, nkb, device=w3.device)
        band = max(1, CHUNK_ELEMS // max(1, nkb * block * block)) * block
        scratch = torch.empty(min(band, nrb * block), nkb * block, device=w3.device)
        for e in range(w3.shape[0]):
            for r0 in range(0, n, band):
                r = min(band, n - r0)
                rb = -(-r // block)
                x = scratch[:rb * block]
                x[:r, :k].copy_(w3[e, r0:r0 + r])
                x[r:].zero_()  # the padding of the last row block and columns must read as 0
                x[:r, k:].zero_()
                tiles = x.view(rb, block, nkb, block)
                # times a reciprocal, not / 448: CUDA divides by a scalar as a multiply by its
                # reciprocal, so a true division here made GPU-packed scales differ by an ulp
                s = tiles.abs().amax(dim=(1, 3)) * (1.0 / FP8_MAX)
                s = torch.where(s == 0, torch.ones_like(s), s)
                tiles.div_(s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
                q[e, r0:r0 + r].copy_(x[:r, :k])
                scale[e, r0 // block:r0 // block + rb] = s
        return cls(q.reshape(*lead, n, k), scale.reshape(*lead, nrb, nkb), block, act_dtype)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        w, s = self.weight, self.scale
        if expert is not None:
            w, s = w[expert], s[expert]
        return dequant_fp8_block_ref(w, s, self.block_shape).to(self.act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spillover.kernels.quant_dispatch import fp8_matmul

        y = fp8_matmul(self, x.reshape(-1, x.shape[-1]), None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor:
        from spillover.kernels.quant_dispatch import fp8_matmul, zero_dead_rows

        if sparse:
            return zero_dead_rows(expert_ids, lambda ids: fp8_matmul(self, x, ids))
        return fp8_matmul(self, x, expert_ids)

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.dequantize(expert).to(x.dtype))

    def stacked_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [E, N, K], scale [E, N/B, K/B]) with E = 1 for a dense weight: the
        kernels' layout."""
        if self.stacked:
            return self.weight, self.scale
        return self.weight.unsqueeze(0), self.scale.unsqueeze(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Fp8BlockWeight:
        nb = non_blocking
        return type(self)(self.weight.to(device, non_blocking=nb),
                          self.scale.to(device, non_blocking=nb),
                          self.block_shape, self.act_dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "scale": self.scale}

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"format": self.name, "block": self.block, "stacked": self.stacked}
        if self.block_n != self.block:  # square blocks keep the original meta
            meta["block_n"] = self.block_n
        return meta

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
        block = int(meta.get("block", 128))
        return cls(parts["weight"], parts["scale"], (int(meta.get("block_n", block)), block),
                   act_dtype)

    # ---- expert subsets (tiered banks: GPU slots, host rows, staging) ---------------------------
    def take_experts(self, experts: Sequence[int]) -> Fp8BlockWeight:
        """The stacked weight of `experts` (in that order), same layout and device: a copy."""
        idx = torch.as_tensor(list(experts), dtype=torch.int64, device=self.weight.device)
        return type(self)(self.weight[idx], self.scale[idx], self.block_shape, self.act_dtype)

    def expert_range(self, start: int, stop: int) -> Fp8BlockWeight:
        """Experts start..stop-1 as a view (no copy: pinned RAM stays pinned)."""
        return type(self)(self.weight[start:stop], self.scale[start:stop], self.block_shape,
                          self.act_dtype)

    def put_experts_(self, slots: Sequence[int], src: Any) -> None:
        """Overwrite experts `slots` with `src`'s experts in order (same layout and device)."""
        idx = torch.as_tensor(list(slots), dtype=torch.int64, device=self.weight.device)
        for dst, part in zip((self.weight, self.scale), (src.weight, src.scale), strict=True):
            if dst is not None and part is not None:
                dst[idx] = part

    @classmethod
    def concat(cls, formats: Sequence[Any], dim: int) -> Fp8BlockWeight | None:
        """Rows (dim 1) or experts (dim 0) of the [E, N, K] view joined (see `WeightFormat.concat`).
        Rows join only where no scale block would span two parts: every part but the last a whole
        number of blocks of rows."""
        first = formats[0]
        key = (type(first), first.block_shape, first.act_dtype)
        if any((type(f), f.block_shape, f.act_dtype) != key for f in formats):
            return None
        if dim == 1:
            if any(f.stacked != first.stacked for f in formats):
                return None
            if any(f.out_features % first.block_n for f in formats[:-1]):
                return None
            if len(formats) == 1:
                return first
            w, s = (torch.cat(ts, -2)
                    for ts in zip(*(f.stacked_views() for f in formats), strict=True))
            return type(first)(w if first.stacked else w[0], s if first.stacked else s[0],
                               first.block_shape, first.act_dtype)
        if dim != 0:
            raise ValueError(f"concat along rows (1) or experts (0), not {dim}")
        if len(formats) == 1 and first.stacked:
            return first
        w, s = (torch.cat(ts) for ts in zip(*(f.stacked_views() for f in formats), strict=True))
        return type(first)(w, s, first.block_shape, first.act_dtype)

    def take_rows(self, rows: torch.Tensor) -> Fp8BlockWeight | None:
        if self.block_n != 1:  # a scale covers block_n rows
            return None
        return type(self)(self.weight[..., rows, :], self.scale[..., rows, :], self.block_shape,
                          self.act_dtype)
