"""CPU decode path: torch's weight-only int4/int8 matmuls, per expert.

`aten._weight_int4pack_mm_for_cpu` computes w = (q - 8) * scale + zero from an opaque packing of
int32 codes and a [K/G, N, 2] (scale, zero) tensor; our `q * s + m` form maps to zero = m + 8 s.
`aten._weight_int8pack_mm` takes plain int8 [N, K] and per-channel scales [N]. Both are fast for a
handful of rows only (`python bench/quant_gemv.py --cpu`): the dispatcher sends larger batches to
dequant + matmul (`quant_dispatch.CPU_WOQ_MAX_ROWS`).
"""

from __future__ import annotations

import torch

from spillover.kernels.formats import IntWeight as GroupedIntWeight
from spillover.kernels.ref_quant import unpack_int4

INT4_CPU_GROUPS = (32, 64, 128, 256)


def int4_cpu_ok(fmt: GroupedIntWeight) -> str | None:
    """None if the int4 CPU op applies to this weight, else the reason it does not."""
    if fmt.out_features % 16:
        return f"N={fmt.out_features} not a multiple of 16"
    if fmt.group_size not in INT4_CPU_GROUPS:
        return f"group {fmt.group_size} not in {INT4_CPU_GROUPS}"
    return None


def int8_cpu_ok(fmt: GroupedIntWeight) -> str | None:
    if fmt.group_size != fmt.in_features or fmt.mins is not None:
        return "int8 CPU op needs symmetric per-channel scales"
    return None


def _int4_packed(fmt: GroupedIntWeight, e: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (e, dtype)
    if key not in fmt.cpu_cache:
        codes = unpack_int4(fmt.qweight[e]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
        s = fmt.scales[e].float()
        zero = fmt.mins[e].float() + 8 * s if fmt.mins is not None else torch.zeros_like(s)
        sz = torch.stack((s.T, zero.T), dim=-1).to(dtype).contiguous()  # [K/G, N, 2]
        fmt.cpu_cache[key] = (packed, sz)
    return fmt.cpu_cache[key]


def int4_cpu_matmul(fmt: GroupedIntWeight, x: torch.Tensor, e: int) -> torch.Tensor:
    packed, sz = _int4_packed(fmt, e, x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, fmt.group_size, sz)


def int8_cpu_matmul(fmt: GroupedIntWeight, x: torch.Tensor, e: int) -> torch.Tensor:
    scales = fmt.scales[e, :, 0].to(x.dtype)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), fmt.qweight[e], scales)
