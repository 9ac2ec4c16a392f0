"""Triton paged-attention decode: one query token per sequence over its paged KV context.

Same signature as `spillover.kernels.ref.paged_attention_decode`. A program handles one part of
the context of one (sequence, KV head) pair and all the query heads of its GQA group, so each K/V
block is read once per group. It walks its blocks of the table one at a time with an online
softmax (fp32 max, sum and accumulator), reading only the blocks the context covers.

Split-K (flash-decoding): with few sequences and KV heads there are far fewer (sequence, head)
pairs than SMs, so each pair's context is cut into `splits` parts, one program each; a second
kernel merges their partial softmax states. The parts are sized from the context length on the
device, so the grid depends only on shapes (a CUDA graph replays it at any context length).
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cl_ptr, m_ptr, l_ptr, acc_ptr,
    scale,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btn,
    SPLITS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx_len = tl.load(cl_ptr + seq)
    n_blocks = tl.cdiv(ctx_len, BLOCK_SIZE)
    per = tl.cdiv(n_blocks, SPLITS)
    first = part * per
    last = tl.minimum(first + per, n_blocks)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM_P)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # [G, D]
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    for b in range(first, last):
        block = tl.load(bt_ptr + seq * stride_btn + b).to(tl.int64)
        pos_ok = b * BLOCK_SIZE + offs < ctx_len
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block * stride_kb + offs[:, None] * stride_ks + kvh * stride_kh
                    + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BS]
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block * stride_vb + offs[:, None] * stride_vs + kvh * stride_vh
                    + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    # partial state of this part: [seq, kvh, part, g] (an empty part keeps m = -inf, l = 0)
    row = ((seq * tl.num_programs(1) + kvh) * SPLITS + part) * GROUP_P + g
    tl.store(m_ptr + row, m)
    tl.store(l_ptr + row, denom)
    tl.store(acc_ptr + row[:, None] * HEAD_DIM_P + d[None, :], acc)


@triton.jit
def _paged_decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr,
    stride_on, stride_oh,
    SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    gi = tl.program_id(2)
    sp = tl.arange(0, SPLITS_P)
    d = tl.arange(0, HEAD_DIM_P)
    sp_ok = sp < SPLITS
    rows = ((seq * tl.num_programs(1) + kvh) * SPLITS + sp) * GROUP_P + gi  # [S]
    m = tl.load(m_ptr + rows, mask=sp_ok, other=float("-inf"))
    denom = tl.load(l_ptr + rows, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(sp_ok & (denom > 0), tl.exp(m - m_max), 0.0)  # [S]
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM_P + d[None, :], mask=sp_ok[:, None],
                  other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    head = kvh * GROUP + gi
    tl.store(o_ptr + seq * stride_on + head * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


MAX_SPLITS = 64


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt,
                     stride_vh, stride_kcs, stride_kch, stride_vcs, stride_vch,
                     D: tl.constexpr, D_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, D_P)
    ok = d < D
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(kc_ptr + slot * stride_kcs + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty),
             mask=ok)
    tl.store(vc_ptr + slot * stride_vcs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty),
             mask=ok)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """K and V rows [T, Hkv, D] (strided views allowed) into their paged slots, one launch
    (`ref.write_kv`)."""
    t, hkv, d = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1
    kc = k_cache.view(-1, hkv, d)
    vc = v_cache.view(-1, hkv, d)
    if t:
        _write_kv_kernel[(t, hkv)](k, v, kc, vc, slot_mapping, k.stride(0), k.stride(1),
                                   v.stride(0), v.stride(1), kc.stride(0), kc.stride(1),
                                   vc.stride(0), vc.stride(1), D=d,
                                   D_P=triton.next_power_of_2(d), num_warps=1)


def default_splits(n: int, hkv: int, device: torch.device) -> int:
    """Parts per (sequence, KV head) so that the programs cover the SMs about twice: one part
    when the batch alone does, at most MAX_SPLITS."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 8)
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(-(-2 * sms // max(n * hkv, 1)))))


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """q [N, Hq, D]; k/v_cache [blocks, block_size, Hkv, D]; block_tables [N, max_blocks] int32;
    context_lens [N] int32 (each >= 1) -> [N, Hq, D] in q's dtype. `splits`: parts per
    (sequence, KV head), default `default_splits`."""
    n, hq, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    assert dk == d and hq % hkv == 0, f"bad shapes q {tuple(q.shape)} cache {tuple(k_cache.shape)}"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and bs & (bs - 1) == 0
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    if n == 0:
        return out
    group = hq // hkv
    splits = default_splits(n, hkv, q.device) if splits is None else splits
    common = dict(GROUP=group, GROUP_P=triton.next_power_of_2(group), BLOCK_SIZE=bs,
                  HEAD_DIM=d, HEAD_DIM_P=triton.next_power_of_2(d))
    gp, dp = common["GROUP_P"], common["HEAD_DIM_P"]
    m = torch.empty(n, hkv, splits, gp, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    acc = torch.empty(n, hkv, splits, gp, dp, dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(n, hkv, splits)](
        q, k_cache, v_cache, tables, lens, m, denom, acc,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0),
        SPLITS=splits, **common,
    )
    _paged_decode_merge_kernel[(n, hkv, group)](
        m, denom, acc, out, out.stride(0), out.stride(1),
        SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits), GROUP=group, GROUP_P=gp,
        HEAD_DIM=d, HEAD_DIM_P=dp,
    )
    return out
