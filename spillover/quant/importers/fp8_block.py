"""Qwen / DeepSeek FP8 (`weight` e4m3 + `weight_scale_inv` [N/128, K/128]) -> Fp8BlockWeight.

Kept as FP8 bytes (lossless); despite its name the scale multiplies. The compressed-tensors
`float-quantized` FP8_BLOCK layout (`weight_scale`) is the same tensor pair, and FP8_DYNAMIC is the
same with one scale per row (block (1, K), scales [N, 1]).
"""

from __future__ import annotations

import torch

from spillover.kernels.ref_quant import fp8_block_shape
from spillover.quant.fp8 import Fp8BlockWeight


def import_fp8_block(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block: int | tuple[int, int] = 128, *,
                     act_dtype: torch.dtype = torch.bfloat16) -> Fp8BlockWeight:
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn weight, got {weight.dtype}")
    n, k = weight.shape[-2:]
    bn, bk = fp8_block_shape(block)
    expected = (-(-n // bn), -(-k // bk))
    if tuple(weight_scale_inv.shape[-2:]) != expected:
        raise ValueError(f"scale shape {tuple(weight_scale_inv.shape)} does not match "
                         f"blocks {expected}")
    return Fp8BlockWeight(weight, weight_scale_inv.float(), block, act_dtype)
