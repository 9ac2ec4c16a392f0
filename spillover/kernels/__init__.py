"""The one kernel dispatch point.

Each op picks an implementation from the tensor's device and what is importable, logs the choice
and the reason once, and otherwise forwards to it. References live in `ref.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from spillover.kernels import ref
from spillover.kernels.context import AttentionCache, ForwardContext

log = logging.getLogger("spillover.kernels")
_logged: set[tuple[str, str]] = set()


def _force_ref() -> bool:
    """SPILLOVER_KERNELS=ref forces the torch references everywhere (debugging, A/B checks)."""
    return os.environ.get("SPILLOVER_KERNELS", "") == "ref"


def _choose(op: str, impl: str, reason: str) -> None:
    if (op, impl) not in _logged:
        _logged.add((op, impl))
        log.info("kernel %s -> %s (%s)", op, impl, reason)


def has_fla() -> bool:
    return importlib.util.find_spec("fla") is not None


def chosen() -> list[tuple[str, str]]:
    """Which implementation each op has used so far (for tests and reports)."""
    return sorted(_logged)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    _choose("rms_norm", "torch", "reference is fused enough by torch for now")
    return ref.rms_norm(x, weight, eps, offset)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton runs under its CPU interpreter (TRITON_INTERPRET=1: tests): no inline asm there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: AttentionCache, ctx: ForwardContext, scale: float
) -> torch.Tensor:
    decode_ready = ctx.is_pure_decode and ctx.block_tables is not None and ctx.context_lens_tensor is not None
    if q.is_cuda and decode_ready and not _force_ref() and has_triton():
        from spillover.kernels.triton.paged_attention import paged_attention_decode

        assert ctx.slot_mapping is not None and ctx.block_tables is not None
        assert ctx.context_lens_tensor is not None
        _choose("paged_attention", "triton-decode", "pure-decode step on CUDA, triton importable")
        ref.write_kv(cache, k, v, ctx.slot_mapping)
        return paged_attention_decode(q, cache.k, cache.v, ctx.block_tables, ctx.context_lens_tensor, scale)
    reason = "forced by SPILLOVER_KERNELS=ref" if _force_ref() else (
        "padded SDPA over gathered blocks (pure decode)" if decode_ready else "per-sequence SDPA over gathered blocks"
    )
    _choose("paged_attention", "torch-sdpa", reason)
    return ref.paged_attention(q, k, v, cache, ctx, scale)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, ctx: ForwardContext
) -> torch.Tensor:
    _choose("causal_conv1d", "torch", "depthwise conv1d per sequence")
    return ref.causal_conv1d(x, weight, conv_state, ctx)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    # fla's chunked form multiplies in TF32 for float32 inputs (rel ~6e-3 on tiny random Qwen3-Next,
    # measured by scripts/gpu_check.py): float32 models keep full precision on the reference instead.
    if q.is_cuda and not _force_ref() and has_fla() and q.dtype != torch.float32:
        _choose("gated_delta_rule", "fla", "flash-linear-attention importable on CUDA, 16-bit inputs")
        return _fla_gated_delta_rule(q, k, v, g, beta, ssm_state, ctx)
    reason = "forced by SPILLOVER_KERNELS=ref" if _force_ref() else (
        "float32 inputs: fla would use TF32" if q.is_cuda and has_fla() else (
            "fla not importable" if q.is_cuda else "CPU tensors")
    )
    _choose("gated_delta_rule", "torch-recurrent", reason)
    return ref.gated_delta_rule(q, k, v, g, beta, ssm_state, ctx)


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
    fn: Callable[..., Any] = fused_recurrent_gated_delta_rule if ctx.is_pure_decode else chunk_gated_delta_rule
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
