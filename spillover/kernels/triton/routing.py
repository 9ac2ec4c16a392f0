"""Triton MoE router: softmax over the experts, top-k and the optional renormalisation in one
kernel.

Same signature as `spillover.kernels.ref.route_topk`. One program routes one token: it holds the
token's E logits (E up to a few hundred) in registers, takes the softmax in fp32, then picks the
k largest probabilities by k rounds of arg-max, each round taking the lowest index among equal
maxima, which is the order torch.topk's sorted output gives. The grid comes from shapes alone, so
a CUDA graph can capture the launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 4096  # a token's logits stay in one program's registers
MAX_TOP_K = 64  # the arg-max rounds are unrolled


@triton.jit
def _route_topk_kernel(
    logits_ptr, w_ptr, ids_ptr,
    n_experts, stride_l, stride_w, stride_i,
    K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
    SHARED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < n_experts
    x = tl.load(logits_ptr + row * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    ex = tl.exp(x - tl.max(x, axis=0))
    p = ex / tl.sum(ex, axis=0)
    # Probabilities are >= 0: padding columns and experts already taken sit below all of them.
    p = tl.where(ok, p, -1.0)
    slot = tl.arange(0, K_P)
    top_w = tl.zeros([K_P], dtype=tl.float32)
    top_i = tl.zeros([K_P], dtype=tl.int32)
    for i in tl.static_range(K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)
        top_w = tl.where(slot == i, best, top_w)
        top_i = tl.where(slot == i, idx, top_i)
        p = tl.where(e == idx, -1.0, p)
    if RENORMALIZE:
        top_w = top_w / tl.sum(tl.where(slot < K, top_w, 0.0), axis=0)
    keep = slot < K
    tl.store(w_ptr + row * stride_w + slot, top_w.to(w_ptr.dtype.element_ty), mask=keep)
    tl.store(ids_ptr + row * stride_i + slot, top_i.to(tl.int64), mask=keep)
    if SHARED:  # the shared expert's gate logit sits after the experts' (id n_experts)
        g = tl.load(logits_ptr + row * stride_l + n_experts).to(tl.float32)
        gate = 1.0 / (1.0 + tl.exp(-g))
        tl.store(w_ptr + row * stride_w + K, gate.to(w_ptr.dtype.element_ty))
        tl.store(ids_ptr + row * stride_i + K, n_experts.to(tl.int64))


def route_topk(logits: torch.Tensor, k: int, renormalize: bool, dtype: torch.dtype,
               shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] in dtype, expert ids [T, k] int64), best first; shared:
    the last column is a shared expert's gate, returned as a (k+1)-th column."""
    assert logits.dim() == 2, f"logits {tuple(logits.shape)}"
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    t, n_experts = logits.shape
    n_experts -= shared
    assert 0 < k <= min(n_experts, MAX_TOP_K) and n_experts <= MAX_EXPERTS, (k, n_experts)
    weights = torch.empty(t, k + shared, dtype=dtype, device=logits.device)
    ids = torch.empty(t, k + shared, dtype=torch.int64, device=logits.device)
    if t:
        block_e = triton.next_power_of_2(n_experts)
        _route_topk_kernel[(t,)](
            logits, weights, ids,
            n_experts, logits.stride(0), weights.stride(0), ids.stride(0),
            K=k, K_P=max(2, triton.next_power_of_2(k)), BLOCK_E=block_e, RENORMALIZE=renormalize,
            SHARED=shared,
            num_warps=min(8, max(1, block_e // 128)),
        )
    return weights, ids
