"""AWQ "GEMM" 4-bit (AutoAWQ / llm-awq) -> Int4Weight.

qweight int32 [K, N/8] and qzeros int32 [K/G, N/8] are packed along N with the interleave
(0, 2, 4, 6, 1, 3, 5, 7): nibble slot i of word j holds column 8j + ORDER[i]. scales fp16 [K/G, N].
w = s * (q - z), so the codes are unpacked, un-interleaved, transposed and repacked along K; the
zero points become mins = -z * s (float32, exact). Lossless.
"""

from __future__ import annotations

import torch

from spillover.quant.importers.gptq import unpack_int32_rows
from spillover.quant.int4 import Int4Weight
from spillover.quant.packing import pack_int4

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SLOT_OF_COLUMN = tuple(ORDER.index(m) for m in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 codes [R, N] in column order."""
    slots = unpack_int32_rows(packed).reshape(packed.shape[0], -1, 8)
    return slots[:, :, list(SLOT_OF_COLUMN)].reshape(packed.shape[0], -1)


def import_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
               act_dtype: torch.dtype = torch.bfloat16) -> Int4Weight:
    k = qweight.shape[0]
    group = k // scales.shape[0]
    codes = unpack_awq(qweight).T.contiguous()  # [N, K]
    zeros = unpack_awq(qzeros).T.float()  # [N, K/G]
    s = scales.T.contiguous()
    return Int4Weight(pack_int4(codes), s, -(zeros * s.float()), group_size=group, stacked=False,
                      act_dtype=act_dtype)
