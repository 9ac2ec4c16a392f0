"""Triton RMSNorm family: plain or zero-centred, fused with the residual add before it, and gated
(the Gated DeltaNet output norm).

Same signatures and rounding order as `spillover.kernels.ref` (`rms_norm`, `add_rms_norm`,
`gated_rms_norm`): the statistics and products in fp32, and every intermediate the reference
rounds to a 16-bit dtype rounded here too, so that a fused layer computes what the unfused one
does. One program normalises one row held whole in registers (the row is a hidden size or a head
dimension); the grid comes from shapes alone, so a CUDA graph can capture every launch.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COLS = 65536  # a row stays in one program's registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_cols, eps, offset,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        # the sum is rounded to the activations' dtype before the norm reads it, as the unfused
        # `x + residual` is
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = xf * rstd
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        # zero-centred weights scale in fp32, before the one cast (Qwen3-Next / Gemma order)
        y = normed * (offset + w)
    else:
        # the normalised row is rounded to x's dtype before the weight multiplies it (HF order)
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_rms_norm_kernel(
    x_ptr, z_ptr, w_ptr, out_ptr,
    n_cols, eps,
    stride_x, stride_z, stride_o,
    ROUND_SCALED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    xf = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = normed * w
    if ROUND_SCALED:
        # weight and activations share a dtype: the reference's `w * x̂` is rounded to it
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=0.0).to(tl.float32)
    gate = z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + row * stride_o + cols, (y * gate).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as [rows, n_cols] with unit column stride (a view where the layout allows)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_shape(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for one row of n_cols held in one program."""
    assert 0 < n_cols <= MAX_COLS, f"row of {n_cols} columns"
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(1, block // 512))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dtype in DTYPES and weight.dtype in DTYPES, f"dtypes {x.dtype}, {weight.dtype}"
    assert weight.shape == (x.shape[-1],) and weight.stride(0) == 1, f"weight {weight.shape}"


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          offset: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(x, weight)
    n = x.shape[-1]
    x2 = _rows(x, n)
    # zero-centred: x's dtype; plain: `weight * x̂` promotes as torch does
    out_dtype = x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    r2 = x2 if residual is None else _rows(residual, n)
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
    rows = x2.shape[0]
    if rows:
        block, warps = _launch_shape(n)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, total,
            n, eps, offset,
            x2.stride(0), r2.stride(0), out.stride(0), total.stride(0),
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(offset), BLOCK=block,
            num_warps=warps,
        )
    shape = (*x.shape[:-1], n)
    return out.view(shape), (total.view(shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             offset: float = 0.0) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N]: x's dtype (with `offset`, else torch's promotion of
    x and weight, as the reference)."""
    return _norm(x, None, weight, eps, offset)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x and residual share shape and dtype."""
    normed, total = _norm(x, residual, weight, eps, offset)
    assert total is not None
    return normed, total


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """rms_norm(x) · w · silu(z) over the last dim: x, z [..., N] -> x's dtype."""
    _check(x, weight)
    assert z.shape == x.shape and z.dtype in DTYPES, f"z {tuple(z.shape)} {z.dtype}"
    n = x.shape[-1]
    x2, z2 = _rows(x, n), _rows(z, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _launch_shape(n)
        _gated_rms_norm_kernel[(x2.shape[0],)](
            x2, z2, weight, out,
            n, eps,
            x2.stride(0), z2.stride(0), out.stride(0),
            ROUND_SCALED=torch.promote_types(x.dtype, weight.dtype) == x.dtype, BLOCK=block,
            num_warps=warps,
        )
    return out.view(x.shape)
