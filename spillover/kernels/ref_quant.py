"""PyTorch references for the weight-only quantized matmuls (ground truth for every fast path).

Shared signature (the Triton launchers in kernels/triton/quant_*.py take exactly the same):

    quant_matmul_ref(x [T, K], qweight [E, N, K/2 | K], scales [E, N, K/G], mins [E, N, K/G] | None,
                     expert_ids [T] | None, *, bits, group_size) -> y [T, N] in x.dtype

Row t of x is multiplied by expert `expert_ids[t]` (expert 0 for every row when None, i.e. a dense
layer is E = 1). Weight w[n, k] = (q - offset) * scale[n, k // G] (+ mins[n, k // G]) with
offset = 8 for symmetric int4 (no mins) and 0 otherwise; accumulation in float32.
"""

from __future__ import annotations

import torch


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] codes; even k in the low nibble (kept here so the reference
    does not depend on the code it checks)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def code_offset(bits: int, has_mins: bool) -> int:
    return 8 if bits == 4 and not has_mins else 0


def dequant_int_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """[..., N, K/2 | K] codes -> float32 [..., N, K]."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    q = q.float() - code_offset(bits, mins is not None)
    k = q.shape[-1]
    g = q.reshape(*q.shape[:-1], k // group_size, group_size) * scales.float().unsqueeze(-1)
    if mins is not None:
        g = g + mins.float().unsqueeze(-1)
    return g.reshape(q.shape)


def quant_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    assert x.dim() == 2 and qweight.dim() == 3 and scales.dim() == 3
    y = torch.empty(x.shape[0], qweight.shape[1], dtype=torch.float32, device=x.device)
    if expert_ids is None:
        w = dequant_int_ref(qweight[0], scales[0], mins[0] if mins is not None else None,
                            bits=bits, group_size=group_size)
        return (x.float() @ w.T).to(x.dtype)
    for e in torch.unique(expert_ids).tolist():
        rows = (expert_ids == e).nonzero().squeeze(1)
        w = dequant_int_ref(qweight[e], scales[e], mins[e] if mins is not None else None,
                            bits=bits, group_size=group_size)
        y[rows] = x[rows].float() @ w.T
    return y.to(x.dtype)


def fp8_block_shape(block: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of an FP8 scale block: square B x B (Qwen, FP8_BLOCK), or 1 x K
    per channel."""
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def dequant_fp8_block_ref(weight: torch.Tensor, scale: torch.Tensor,
                          block: int | tuple[int, int] = 128) -> torch.Tensor:
    """FP8 e4m3 [..., N, K] with float32 block scales [..., ceil(N/BN), ceil(K/BK)] -> float32."""
    n, k = weight.shape[-2:]
    bn, bk = fp8_block_shape(block)
    s = scale.float().repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return weight.float() * s[..., :n, :k]


def fp8_matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    expert_ids: torch.Tensor | None,
    *,
    block: int | tuple[int, int] = 128,
) -> torch.Tensor:
    """y [T, N] = x [T, K] @ W[expert_ids[t]].T for FP8 block weights [E, N, K] (E = 1: dense)."""
    y = torch.empty(x.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
    ids = expert_ids
    if ids is None:
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero().squeeze(1)
        y[rows] = x[rows].float() @ dequant_fp8_block_ref(weight[e], scale[e], block).T
    return y.to(x.dtype)


def swap_nk(a: torch.Tensor) -> torch.Tensor:
    """[E, A, B] -> contiguous [E, B, A]: between the nk (storage) and kn (GPU) layouts."""
    return a.transpose(1, 2).contiguous()


def kn_to_nk(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [E, K/VALS, N] (the GPU layout) -> codes [E, N, K/2] uint8 | [E, N, K] int8."""
    return swap_nk(words).view(torch.uint8 if bits == 4 else torch.int8)


# The "tiled" kn layout: the words of each 16-channel tile are contiguous, in the order the
# tensor-core GEMV's threads load them (kernels/triton/int4_mma_gemv.py): per tile, per warp of 32
# word rows, per step of 4 word rows, lane 4 g + t takes word row 4 step + t of channels 2 g and 2
# g + 1. Each warp's load is then 256 contiguous bytes, where the plain kn layout gives 64-byte
# pieces 4 N bytes apart (faster to read: python bench/int4_mma_gemv.py; figures in
# docs/kernel_notes.md). The tensor keeps the logical shape [E, K/VALS, N]; word (kw, n) sits at
# `tiled_word_offset(kw, n, K/VALS)` of its expert.
TILE_N = 16
TILE_KW = 32


def tiled_word_offset(kw: torch.Tensor | int, n: torch.Tensor | int,
                      kw_total: int) -> torch.Tensor | int:
    """Offset of word (kw, n) within its expert in the tiled layout; a sum of a kw part
    and an n part."""
    k_part = (kw // TILE_KW) * 512 + ((kw % TILE_KW) // 4) * 64 + (kw % 4) * 2
    n_part = (n // TILE_N) * kw_total * TILE_N + ((n % TILE_N) // 2) * 8 + n % 2
    return k_part + n_part


def tile_words(words: torch.Tensor) -> torch.Tensor:
    """kn words [E, KW, N] -> the same words in the tiled layout (same shape; KW % 32 == 0,
    N % 16 == 0)."""
    e, kw, n = words.shape
    fits = kw % TILE_KW == 0 and n % TILE_N == 0
    assert fits, f"tiled layout needs K/VALS % 32 and N % 16 (got {kw}, {n})"
    # [e, warp, step, t, tile, g, v] -> [e, tile, warp, step, g, t, v]
    t = words.reshape(e, kw // TILE_KW, 8, 4, n // TILE_N, 8, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return t.contiguous().view(e, kw, n)


def untile_words(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_words`."""
    e, kw, n = words.shape
    t = words.contiguous().view(e, n // TILE_N, kw // TILE_KW, 8, 8, 4, 2)
    t = t.permute(0, 2, 3, 5, 1, 4, 6)
    return t.contiguous().view(e, kw, n)


def quant_matmul_kn_ref(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    tiled: bool = False,
) -> torch.Tensor:
    """`quant_matmul_ref` on the kn layout (words [E, K/VALS, N], scales/mins [E, K/G, N]; tiled:
    words in the tiled layout)."""
    if tiled:
        words = untile_words(words)
    return quant_matmul_ref(x, kn_to_nk(words, bits), swap_nk(scales),
                            swap_nk(mins) if mins is not None else None,
                            expert_ids, bits=bits, group_size=group_size)


def dequant_kn_ref(words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                   expert: int, *, bits: int, group_size: int,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert `expert` of the kn layout (words [E, K/VALS, N], scales/mins
    [E, K/G, N]) -> [N, K] out_dtype."""
    sl = slice(expert, expert + 1)
    w = dequant_int_ref(kn_to_nk(words[sl], bits)[0], swap_nk(scales[sl])[0],
                        swap_nk(mins[sl])[0] if mins is not None else None, bits=bits,
                        group_size=group_size)
    return w.to(out_dtype)
