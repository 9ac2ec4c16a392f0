"""Triton activations: SwiGLU's SiLU(gate) * up from the merged gate/up projection, and the
sigmoid output gate of Qwen3-Next's attention, each in one kernel.

Same signature and rounding as `spillover.kernels.ref.silu_mul`: SiLU in fp32, rounded to the
activations' dtype before the product (as `F.silu(gate) * up` rounds), the product rounded once.
The grid comes from shapes alone, so a CUDA graph can capture the launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate columns, then up) -> SiLU(gate) * up [..., I] in its dtype."""
    assert gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16), gate_up.dtype
    two_i = gate_up.shape[-1]
    assert two_i % 2 == 0, f"gate/up width {two_i} is odd"
    inter = two_i // 2
    x = gate_up.reshape(-1, two_i)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    if x.shape[0] and inter:
        block = min(BLOCK, triton.next_power_of_2(inter))
        _silu_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=block,
            num_warps=min(4, max(1, block // 256)),
        )
    return out.view(*gate_up.shape[:-1], inter)


@triton.jit
def _sigmoid_mul_kernel(x_ptr, g_ptr, out_ptr, n, stride_xt, stride_xh, stride_gt, stride_gh,
                        H: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=ok, other=0.0)
    g = tl.load(g_ptr + t * stride_gt + h * stride_gh + cols, mask=ok, other=0.0).to(tl.float32)
    # sigmoid rounded to the activations' dtype before the product, as the reference's is
    sig = (1.0 / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + (t * H + h) * n + cols, (x.to(tl.float32) * sig).to(x.dtype), mask=ok)


def sigmoid_mul(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, gate [T, H, D] (strided views allowed, unit last stride) -> x * sigmoid(gate)."""
    t, h, d = x.shape
    assert gate.shape == x.shape and x.stride(-1) == 1 and gate.stride(-1) == 1
    out = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
    if t:
        _sigmoid_mul_kernel[(t, h)](x, gate, out, d, x.stride(0), x.stride(1), gate.stride(0),
                                    gate.stride(1), H=h, BLOCK=triton.next_power_of_2(d),
                                    num_warps=2)
    return out
