"""Triton kernels that close an MoE block: the weighted sum of the routed experts' rows over k,
and the shared expert's sigmoid-gated add.

Same signatures as `spillover.kernels.ref.moe_sum` and `spillover.kernels.ref.shared_combine`:
products and sums in fp32, in k order, rounded once, so every run gives the same bits (a CUDA
graph's replay and the eager pass agree). A program covers one token and one slice of the hidden
size; the grid comes from shapes alone, so a CUDA graph can capture every launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 1024


@triton.jit
def _moe_sum_kernel(y_ptr, w_ptr, out_ptr, h, stride_yt, stride_yk, stride_wt, stride_o,
                    K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < h
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(K):
        w = tl.load(w_ptr + t * stride_wt + i).to(tl.float32)
        y = tl.load(y_ptr + t * stride_yt + i * stride_yk + cols, mask=ok, other=0.0)
        acc += y.to(tl.float32) * w
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _shared_combine_kernel(r_ptr, s_ptr, g_ptr, out_ptr, h, stride_r, stride_s, stride_g,
                           stride_o, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < h
    g = tl.load(g_ptr + t * stride_g).to(tl.float32)
    gate = 1.0 / (1.0 + tl.exp(-g))
    r = tl.load(r_ptr + t * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + t * stride_s + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, (r + gate * s).to(out_ptr.dtype.element_ty), mask=ok)


def _block(h: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(h))


def moe_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [T, k, H], weights [T, k] -> [T, H] in y's dtype."""
    t, k, h = y.shape
    assert weights.shape == (t, k) and y.stride(-1) == 1 and weights.stride(-1) == 1
    out = torch.empty(t, h, dtype=y.dtype, device=y.device)
    if t:
        block = _block(h)
        _moe_sum_kernel[(t, triton.cdiv(h, block))](
            y, weights, out, h, y.stride(0), y.stride(1), weights.stride(0), out.stride(0),
            K=k, BLOCK=block, num_warps=4)
    return out


def shared_combine(routed: torch.Tensor, shared: torch.Tensor,
                   gate_logit: torch.Tensor) -> torch.Tensor:
    """routed, shared [T, H]; gate_logit [T, 1] -> routed + sigmoid(gate_logit) * shared."""
    t, h = routed.shape
    assert shared.shape == (t, h) and gate_logit.shape == (t, 1)
    assert routed.stride(-1) == 1 and shared.stride(-1) == 1
    out = torch.empty_like(routed, memory_format=torch.contiguous_format)
    if t:
        block = _block(h)
        _shared_combine_kernel[(t, triton.cdiv(h, block))](
            routed, shared, gate_logit, out, h, routed.stride(0), shared.stride(0),
            gate_logit.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
