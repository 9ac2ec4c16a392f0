"""The one kernel dispatch point, and the public entry of `spillover.kernels`.

Every kernel choice is made here or in `quant_dispatch.py` (the quantized matmuls, re-exported
below): each op resolves its implementation once per shape class from the tensor's device and
dtype, what is importable and the `SPILLOVER_KERNELS` override, logs it once with its reason
(`select.choose`), and otherwise forwards to it. `SPILLOVER_KERNELS=ref` sends every op to its
torch reference (`ref.py`, `ref_quant.py`); `cpu` and `triton` force a quantized-matmul family
(tests); any other value raises. `chosen()` lists what ran so far.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spillover.kernels import ref
from spillover.kernels.context import AttentionCache, ForwardContext
from spillover.kernels.quant_dispatch import (
    choose_fp8_kernel,
    choose_kernel,
    expert_rows_sorted,
    fp8_matmul,
    gpu_layout,
    quant_matmul,
)
from spillover.kernels.select import (
    choices,
    choose,
    chosen,
    force_ref,
    has_fla,
    has_triton,
    kernels_mode,
    reset,
    resolve,
    triton_interpreted,
)

__all__ = [
    "AttentionCache", "ForwardContext",
    "rms_norm", "paged_attention", "causal_conv1d", "gated_delta_rule", "gdn_decode",
    "quant_matmul", "fp8_matmul", "choose_kernel", "choose_fp8_kernel", "gpu_layout",
    "kernels_mode", "force_ref", "choose", "resolve", "chosen", "choices", "reset",
    "has_triton", "has_fla", "triton_interpreted",
    "add_rms_norm", "gated_rms_norm", "route_topk", "silu_mul", "moe_sum", "shared_combine",
    "gdn_split", "expert_rows_sorted", "qk_norm_rope", "sigmoid_mul",
]

FORCED = "forced by SPILLOVER_KERNELS=ref"


def _pick_fused(cuda: bool, dtype: torch.dtype) -> tuple[str, str]:
    """The fused ops (norms, router, SwiGLU, the glue kernels, the Gated DeltaNet decode step):
    Triton on CUDA, else torch."""
    if force_ref():
        return "torch", FORCED
    if cuda and has_triton() and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "triton", "CUDA tensors, triton importable: one kernel instead of several"
    why = ("triton not importable" if cuda and not has_triton() else
           f"{dtype} inputs" if cuda else "CPU tensors")
    return "torch", f"torch ops ({why})"


def _fused(op: str, x: torch.Tensor) -> str:
    shape_class = f"{x.device.type} {str(x.dtype).removeprefix('torch.')}"
    return resolve(op, shape_class, lambda: _pick_fused(x.is_cuda, x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             offset: float = 0.0) -> torch.Tensor:
    if _fused("rms_norm", x) == "triton":
        from spillover.kernels.triton import norms

        return norms.rms_norm(x, weight, eps, offset)
    return ref.rms_norm(x, weight, eps, offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if _fused("add_rms_norm", x) == "triton":
        from spillover.kernels.triton import norms

        return norms.add_rms_norm(x, residual, weight, eps, offset)
    return ref.add_rms_norm(x, residual, weight, eps, offset)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """rms_norm(x) · w · silu(z) (the Gated DeltaNet output norm)."""
    if _fused("gated_rms_norm", x) == "triton":
        from spillover.kernels.triton import norms

        return norms.gated_rms_norm(x, z, weight, eps)
    return ref.gated_rms_norm(x, z, weight, eps)


def route_topk(logits: torch.Tensor, k: int, renormalize: bool, dtype: torch.dtype,
               shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE router: logits [T, E] -> (weights [T, k] in dtype, expert ids [T, k] int64); shared:
    the last column is a shared expert's gate logit (`ref.route_topk`)."""
    if _fused("route_topk", logits) == "triton":
        from spillover.kernels.triton import routing

        return routing.route_topk(logits, k, renormalize, dtype, shared)
    return ref.route_topk(logits, k, renormalize, dtype, shared)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> SiLU(gate) * up [..., I]."""
    if _fused("silu_mul", gate_up) == "triton":
        from spillover.kernels.triton import activation

        return activation.silu_mul(gate_up)
    return ref.silu_mul(gate_up)


def moe_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Routed experts' rows y [T, k, H] weighted by weights [T, k], summed over k -> [T, H]."""
    if _fused("moe_sum", y) == "triton":
        from spillover.kernels.triton import moe_combine

        return moe_combine.moe_sum(y, weights)
    return ref.moe_sum(y, weights)


def shared_combine(routed: torch.Tensor, shared: torch.Tensor,
                   gate_logit: torch.Tensor) -> torch.Tensor:
    """routed + sigmoid(gate_logit) * shared (the shared expert's gated add)."""
    if _fused("shared_combine", routed) == "triton":
        from spillover.kernels.triton import moe_combine

        return moe_combine.shared_combine(routed, shared, gate_logit)
    return ref.shared_combine(routed, shared, gate_logit)


def gdn_split(qkvz: torch.Tensor, ba: torch.Tensor, hk: int, dk: int, r: int,
              dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's per-key-head projections regrouped: (q|k|v, z, b, a) (`ref.gdn_split`)."""
    if _fused("gdn_split", qkvz) == "triton":
        from spillover.kernels.triton import gdn_split as split

        return split.gdn_split(qkvz, ba, hk, dk, r, dv)
    return ref.gdn_split(qkvz, ba, hk, dk, r, dv)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps: float, offset: float, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's per-head q/k RMSNorm (weights None: none) and rotary embedding."""
    if _fused("qk_norm_rope", q) == "triton":
        from spillover.kernels.triton import rope

        return rope.qk_norm_rope(q, k, q_weight, k_weight, eps, offset, cos, sin)
    return ref.qk_norm_rope(q, k, q_weight, k_weight, eps, offset, cos, sin)


def sigmoid_mul(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(gate) over [T, H, D] (attention's output gate)."""
    if _fused("sigmoid_mul", x) == "triton":
        from spillover.kernels.triton import activation

        return activation.sigmoid_mul(x, gate)
    return ref.sigmoid_mul(x, gate)


def _pick_attention(cuda: bool, decode_ready: bool) -> tuple[str, str]:
    if force_ref():
        return "torch-sdpa", FORCED
    if cuda and decode_ready and has_triton():
        return "triton-decode", "pure-decode step on CUDA, triton importable"
    if not decode_ready:
        return "torch-sdpa", "per-sequence SDPA over gathered blocks (not a pure-decode step)"
    why = "triton not importable" if cuda else "CPU tensors"
    return "torch-sdpa", f"padded SDPA over gathered blocks (pure decode; {why})"


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: AttentionCache, ctx: ForwardContext,
    scale: float,
) -> torch.Tensor:
    decode_ready = (ctx.is_pure_decode and ctx.block_tables is not None
                    and ctx.context_lens_tensor is not None)
    shape_class = f"{q.device.type} {'decode' if decode_ready else 'mixed'}"
    impl = resolve("paged_attention", shape_class, lambda: _pick_attention(q.is_cuda, decode_ready))
    if impl == "triton-decode":
        from spillover.kernels.triton.paged_attention import paged_attention_decode, write_kv

        assert ctx.slot_mapping is not None and ctx.block_tables is not None
        assert ctx.context_lens_tensor is not None
        write_kv(cache.k, cache.v, k, v, ctx.slot_mapping)
        return paged_attention_decode(q, cache.k, cache.v, ctx.block_tables,
                                      ctx.context_lens_tensor, scale)
    return ref.paged_attention(q, k, v, cache, ctx, scale)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, ctx: ForwardContext
) -> torch.Tensor:
    # (decode steps take gdn_decode, conv included)
    resolve("causal_conv1d", x.device.type,
            lambda: ("torch", FORCED if force_ref() else "depthwise conv1d per sequence"))
    return ref.causal_conv1d(x, weight, conv_state, ctx)


def _pick_gated_delta_rule(cuda: bool, dtype: torch.dtype) -> tuple[str, str]:
    # fla's chunked form multiplies in TF32 for float32 inputs (an error that
    # `python scripts/gpu_check.py` shows on tiny random Qwen3-Next): float32 keeps the reference.
    if force_ref():
        return "torch-recurrent", FORCED
    if cuda and has_fla() and dtype != torch.float32:
        return "fla", "flash-linear-attention importable on CUDA, 16-bit inputs"
    why = ("float32 inputs: fla would use TF32" if cuda and has_fla() else
           "fla not importable" if cuda else "CPU tensors")
    return "torch-recurrent", why


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    shape_class = f"{q.device.type} {str(q.dtype).removeprefix('torch.')}"
    impl = resolve("gated_delta_rule", shape_class,
                   lambda: _pick_gated_delta_rule(q.is_cuda, q.dtype))
    if impl == "fla":
        return _fla_gated_delta_rule(q, k, v, g, beta, ssm_state, ctx)
    return ref.gated_delta_rule(q, k, v, g, beta, ssm_state, ctx)


def gdn_decode(
    mixed: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,  # noqa: N803 (the checkpoint's name)
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    """A pure-decode Gated DeltaNet step from its conv input to its output (`ref.gdn_decode`),
    with the step's state slots and fresh mask (capturable by a CUDA graph)."""
    assert ctx.is_pure_decode, "gdn_decode takes one token per sequence"
    slots, fresh, _ = ctx.linear_meta(mixed.device)
    fn = ref.gdn_decode  # the conv, gates and recurrence as separate batched torch ops
    if _fused("gdn_decode", mixed) == "triton":
        from spillover.kernels.triton.gdn_decode import gdn_decode as fn
    return fn(mixed, conv_weight, conv_state, a, b, A_log, dt_bias, ssm_state, slots, fresh)


def _fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    slots, fresh, cu_seqlens = ctx.linear_meta(q.device)
    init = ssm_state.index_select(0, slots)
    init = torch.where(fresh[:, None, None, None], torch.zeros_like(init), init)
    fn: Callable[..., Any] = (fused_recurrent_gated_delta_rule if ctx.is_pure_decode
                              else chunk_gated_delta_rule)
    o, final = fn(
        q=q.unsqueeze(0),
        k=k.unsqueeze(0),
        v=v.unsqueeze(0),
        g=g.float().unsqueeze(0),
        beta=beta.unsqueeze(0),
        initial_state=init,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu_seqlens,
    )
    ssm_state.index_copy_(0, slots, final.to(ssm_state.dtype))
    return o[0]
