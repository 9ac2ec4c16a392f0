"""GPTQ 4-bit (AutoGPTQ / GPTQModel / AutoRound `auto_gptq` packing) -> Int4Weight, no float trip.

qweight int32 [K/8, N] packed along K (code of k at bits 4*(k % 8)); its transpose viewed as bytes
is exactly our [N, K/2] low-nibble-first layout. qzeros int32 [K/G, N/8] packed along N, scales
fp16 [K/G, N]. w = s * (q - z) with z = stored + 1 in checkpoint format v1 ("gptq"), z = stored in
v2. All zeros 8 -> symmetric; otherwise mins = -z * s (exact in float32). Act-order (a g_idx that
is not k // G) is refused: it would need the input channels permuted at run time.
"""

from __future__ import annotations

import torch

from spillover.quant.int4 import Int4Weight


class ActOrderNotSupported(NotImplementedError):
    pass


def unpack_int32_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per word along the last dim -> uint8 [R, 8C], low bits first."""
    b = packed.contiguous().view(torch.uint8)  # little-endian: byte j holds nibbles 2j, 2j+1
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(packed.shape[0], -1)


def import_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    checkpoint_format: str = "gptq",
    act_dtype: torch.dtype = torch.bfloat16,
) -> Int4Weight:
    if bits != 4:
        raise NotImplementedError(f"GPTQ {bits}-bit import is not implemented (4-bit only)")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    n_groups = scales.shape[0]
    group = k // n_groups
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
        raise ActOrderNotSupported(
            "GPTQ checkpoint uses act-order (desc_act=True); re-quantize without act-order or use "
            "the float checkpoint with --quant int4"
        )
    packed = qweight.T.contiguous().view(torch.uint8)  # [N, K/2]
    zeros = unpack_int32_rows(qzeros)[:, :n].to(torch.int16)  # [K/G, N]
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & 15  # the packer stored (z - 1) & 15, so z = 0 wrapped to 15
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
    s = scales.T.contiguous()  # [N, K/G]
    if bool((zeros == 8).all()):
        return Int4Weight(packed, s, None, group_size=group, stacked=False, act_dtype=act_dtype)
    mins = -(zeros.T.float() * s.float())
    return Int4Weight(packed, s, mins, group_size=group, stacked=False, act_dtype=act_dtype)
