"""Triton Gated DeltaNet decode: one new token per sequence, conv update to output in two launches.

Same signature as `spillover.kernels.ref.gdn_decode`, which composes the unfused steps (depthwise
causal conv + SiLU over the state slot, the gates, L2 norms, the gated delta rule over the fp32
recurrent state). The layer's unfused decode is about 25 small kernels and three passes over the
recurrent state; this is two kernels and one pass:

1. `_conv_kernel`, one program per (sequence, channel block): shifts the channels' conv state
   (slot row, zeros for a fresh sequence), writes it back and stores the SiLU of the conv into
   `act` [N, conv_dim]. It is a launch of its own because the q and k channels of a key head feed
   the r = Hv/Hk value heads of its group: fused into the recurrent kernel, one program could
   overwrite a conv state row that another program of the group has yet to read.
2. `_recurrent_kernel`, one program per (sequence, value head, dv block): L2 norms of its key
   head's q and k (recomputed per program: dk values, cheaper than a third launch), the gates from
   a, b, A_log, dt_bias, then the decay, delta-rule update and output on its [dk, BLOCK_V] tile of
   the state, read and written in place in the sequence's slot. The dv split gives a batch-1 step
   Hv * dv / BLOCK_V programs rather than Hv, to spread the state's bytes over the SMs.

Rounding follows the reference: conv state and conv output in the model dtype, beta rounded to
b's dtype after the sigmoid (the layer computes it in the model dtype), everything else fp32.
Padding rows of a CUDA-graph batch share one scratch slot; their programs may race on it, which
only changes that scratch slot and the padding rows' outputs, which nothing reads.
No host reads and a grid fixed by the shapes, so a CUDA graph captures both launches.
This module imports triton at the top: import it only through spillover.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, cs_ptr, act_ptr, slots_ptr, fresh_ptr,
    C,
    stride_xn, stride_wc, stride_css, stride_csc, stride_an,
    KW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    slot = tl.load(slots_ptr + n).to(tl.int64)
    cached = tl.load(fresh_ptr + n) == 0
    x = tl.load(x_ptr + n * stride_xn + c, mask=ok, other=0.0)
    row = cs_ptr + slot * stride_css + c * stride_csc
    acc = tl.zeros([BLOCK_C], tl.float32)
    for j in tl.static_range(KW - 1):
        # a fresh sequence starts from zeros whatever its slot held (NaN included). A select, not
        # a load mask: the interpreter rejects a mask combined with a loaded scalar.
        prev = tl.where(cached, tl.load(row + j, mask=ok, other=0.0), 0.0).to(x.dtype)
        acc += prev.to(tl.float32) * tl.load(w_ptr + c * stride_wc + j, mask=ok,
                                             other=0.0).to(tl.float32)
        if j > 0:
            tl.store(row + (j - 1), prev.to(cs_ptr.dtype.element_ty), mask=ok)
    acc += x.to(tl.float32) * tl.load(w_ptr + c * stride_wc + (KW - 1), mask=ok,
                                      other=0.0).to(tl.float32)
    tl.store(row + (KW - 2), x.to(cs_ptr.dtype.element_ty), mask=ok)
    y = acc / (1.0 + tl.exp(-acc))  # SiLU
    tl.store(act_ptr + n * stride_an + c, y.to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _recurrent_kernel(
    act_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, slots_ptr, fresh_ptr, o_ptr,
    scale,
    stride_an, stride_a, stride_b, stride_ss, stride_sh, stride_sk, stride_on, stride_oh,
    R: tl.constexpr, KEY_DIM: tl.constexpr, DK: tl.constexpr, DK_P: tl.constexpr,
    DV: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // R  # value head h reads the q and k of key head h // R (GQA-style grouping)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    cached = tl.load(fresh_ptr + n) == 0
    kk = tl.arange(0, DK_P)
    vv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = kk < DK
    v_ok = vv < DV

    row = act_ptr + n * stride_an  # [q (Hk·dk) | k (Hk·dk) | v (Hv·dv)]
    q = tl.load(row + kh * DK + kk, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(row + KEY_DIM + kh * DK + kk, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(row + 2 * KEY_DIM + h * DV + vv, mask=v_ok, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k) + 1e-6)

    b = tl.load(b_ptr + n * stride_b + h).to(tl.float32)
    beta = tl.sigmoid(b).to(b_ptr.dtype.element_ty).to(tl.float32)
    dt = tl.load(a_ptr + n * stride_a + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    softplus = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus  # log decay, <= 0

    tile = k_ok[:, None] & v_ok[None, :]
    s_ptrs = s_ptr + slot * stride_ss + h * stride_sh + kk[:, None] * stride_sk + vv[None, :]
    s = tl.load(s_ptrs, mask=tile, other=0.0).to(tl.float32)  # [DK_P, BLOCK_V]
    s = tl.where(cached, s, 0.0)  # fresh: zeros
    s = s * tl.exp(g)
    delta = (v - tl.sum(s * k[:, None], axis=0)) * beta
    s = s + k[:, None] * delta[None, :]
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=tile)
    tl.store(o_ptr + n * stride_on + h * stride_oh + vv, o.to(o_ptr.dtype.element_ty), mask=v_ok)


def gdn_decode(
    mixed: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    block_v: int | None = None,
) -> torch.Tensor:
    """mixed [N, conv_dim] (q|k|v before the conv); conv_weight [conv_dim, K]; conv_state
    [slots, conv_dim, K-1] and ssm_state [slots, Hv, dk, dv] updated in place at rows `slots` [N]
    (distinct, except padding rows sharing a scratch slot); fresh [N] bool; a, b [N, Hv];
    A_log, dt_bias [Hv] -> o [N, Hv, dv] in mixed's dtype. `block_v` (a power of two) overrides
    the dv split (benchmarks)."""
    n, conv_dim = mixed.shape
    _, hv, dk, dv = ssm_state.shape
    key_dim = (conv_dim - hv * dv) // 2
    kw = conv_weight.shape[1]
    assert key_dim > 0 and key_dim % dk == 0 and hv % (key_dim // dk) == 0, (
        f"bad shapes mixed {tuple(mixed.shape)} ssm_state {tuple(ssm_state.shape)}")
    assert kw >= 2 and conv_state.shape[1:] == (conv_dim, kw - 1)
    assert a.shape == b.shape == (n, hv) and slots.shape == fresh.shape == (n,)
    for t in (mixed, conv_weight, conv_state, ssm_state, a, b):
        assert t.stride(-1) == 1, "innermost dims must be contiguous"
    assert A_log.is_contiguous() and dt_bias.is_contiguous()
    assert fresh.dtype == torch.bool
    act = torch.empty_like(mixed, memory_format=torch.contiguous_format)
    o = torch.empty(n, hv, dv, dtype=mixed.dtype, device=mixed.device)
    if n == 0:
        return o
    fresh8 = fresh.view(torch.uint8)  # a view: triton loads it as bytes, no conversion kernel
    block_c = min(triton.next_power_of_2(conv_dim), 256)
    _conv_kernel[(n, triton.cdiv(conv_dim, block_c))](
        mixed, conv_weight, conv_state, act, slots, fresh8,
        conv_dim,
        mixed.stride(0), conv_weight.stride(0), conv_state.stride(0), conv_state.stride(1),
        act.stride(0),
        KW=kw, BLOCK_C=block_c,
    )
    bv = block_v or min(triton.next_power_of_2(dv), 32)
    _recurrent_kernel[(n, hv, triton.cdiv(dv, bv))](
        act, a, b, A_log, dt_bias, ssm_state, slots, fresh8, o,
        dk**-0.5,
        act.stride(0), a.stride(0), b.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), o.stride(0), o.stride(1),
        R=hv // (key_dim // dk), KEY_DIM=key_dim, DK=dk, DK_P=triton.next_power_of_2(dk),
        DV=dv, BLOCK_V=bv,
    )
    return o
