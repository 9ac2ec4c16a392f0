"""compressed-tensors `pack-quantized` int4 (W4A16, W4A16_ASYM) -> Int4Weight, and `int-quantized`
symmetric int8 (W8A8's weights) -> Int8Weight.

weight_packed int32 [N, K/8] packed along K, element i at bits 4i, code = signed q + 8: viewed as
bytes it is already our [N, K/2] layout. weight_scale [N, K/G]. Asymmetric checkpoints add
weight_zero_point (signed, packed along N: int32 [N/8, K/G]); w = (q - zp) * s = code * s + mins
with mins = -(8 + zp) * s (float32, exact). A weight_g_idx (act-order) is refused.
"""

from __future__ import annotations

import torch

from spillover.quant.importers.gptq import ActOrderNotSupported, unpack_int32_rows
from spillover.quant.int4 import Int4Weight
from spillover.quant.int8 import Int8Weight


def import_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    weight_g_idx: torch.Tensor | None = None,
    *,
    num_bits: int = 4,
    act_dtype: torch.dtype = torch.bfloat16,
) -> Int4Weight:
    if num_bits != 4:
        raise NotImplementedError(f"compressed-tensors {num_bits}-bit pack-quantized "
                                  "import: 4-bit only")
    n = weight_packed.shape[0]
    k = weight_packed.shape[1] * 8
    group = k // weight_scale.shape[1]
    if weight_g_idx is not None and not torch.equal(weight_g_idx.long(), torch.arange(k) // group):
        raise ActOrderNotSupported("compressed-tensors weight_g_idx (act-order) is not supported")
    packed = weight_packed.contiguous().view(torch.uint8)  # [N, K/2]
    if weight_zero_point is None:
        return Int4Weight(packed, weight_scale, None, group_size=group, stacked=False,
                          act_dtype=act_dtype)
    codes = unpack_int32_rows(weight_zero_point.T.contiguous())[:, :n]  # [K/G, N], stored as zp + 8
    zp = codes.T.float() - 8
    mins = -(8 + zp) * weight_scale.float()
    return Int4Weight(packed, weight_scale, mins, group_size=group, stacked=False,
                      act_dtype=act_dtype)


def import_int8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    groups: int,
    *,
    act_dtype: torch.dtype = torch.bfloat16,
) -> Int8Weight:
    """int8 weight [N, K] + weight_scale [N, 1] (channel) or [N, K/G] (group), w = q * s: our int8
    layout as is. The activation half of W8A8 (input_scale, dynamic per-token int8) is not used:
    activations stay in float, so the result is the checkpoint's weights at 16-bit
    activation precision."""
    if weight_zero_point is not None and bool(weight_zero_point.ne(0).any()):
        raise ValueError("int8 weight_zero_point is not all 0 (asymmetric int8 is not supported)")
    n, k = weight.shape
    scales = weight_scale.reshape(n, groups)
    return Int8Weight(weight.contiguous(), scales.contiguous(), None, group_size=k // groups,
                      stacked=False, act_dtype=act_dtype)
