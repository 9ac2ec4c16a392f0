"""Gated DeltaNet decode, fused: the Triton kernel (TRITON_INTERPRET=1 on the CPU) against
`ref.gdn_decode`, and `ref.gdn_decode` against the per-sequence references it stands for
(`ref.causal_conv1d`, the gates, `ref.gated_delta_rule`)."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spillover import kernels  # noqa: E402
from spillover.kernels import ref  # noqa: E402
from spillover.kernels.context import ForwardContext, build_linear_meta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS, KW = 9, 4
FRESH = [False, True, False, False, True]
SLOT_IDS = [6, 1, 8, 0, 3]  # out of order; 2, 4, 5, 7 are never touched


def inputs(hk: int, hv: int, dk: int, dv: int, dtype: torch.dtype,
           seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n, conv_dim = len(FRESH), 2 * hk * dk + hv * dv

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "mixed": rand(n, conv_dim).to(dtype),
        "conv_weight": (rand(conv_dim, KW) * 0.5).to(dtype),
        "conv_state": rand(SLOTS, conv_dim, KW - 1).to(dtype),
        "a": rand(n, hv).to(dtype),
        "b": rand(n, hv).to(dtype),
        "A_log": (rand(hv) * 0.5).to(dtype),
        "dt_bias": rand(hv).to(dtype),
        "ssm_state": rand(SLOTS, hv, dk, dv) * 0.3,
        "slots": torch.tensor(SLOT_IDS),
        "fresh": torch.tensor(FRESH),
    }


def run(fn: object, args: dict[str, torch.Tensor], device: str) -> tuple[torch.Tensor, ...]:
    """fn on copies of args on `device` -> (o, conv_state, ssm_state) on the CPU."""
    moved = {k: v.clone().to(device) for k, v in args.items()}
    o = fn(**moved)  # type: ignore[operator]
    return o.cpu(), moved["conv_state"].cpu(), moved["ssm_state"].cpu()


@pytest.mark.parametrize(("hk", "hv", "dk", "dv"),
                         [(2, 2, 8, 16), (2, 4, 16, 16), (1, 2, 16, 8), (3, 6, 12, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference(hk: int, hv: int, dk: int, dv: int,
                                         dtype: torch.dtype) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from spillover.kernels.triton.gdn_decode import gdn_decode

    args = inputs(hk, hv, dk, dv, dtype, seed=hk * 100 + dv)
    want_o, want_conv, want_ssm = run(ref.gdn_decode, args, "cpu")
    got_o, got_conv, got_ssm = run(gdn_decode, args, DEVICE)
    assert got_o.dtype == dtype and got_o.shape == (len(FRESH), hv, dv)
    # the conv state holds inputs moved along: exact in any dtype
    assert torch.equal(got_conv, want_conv)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_o.float(), want_o.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_ssm, want_ssm, rtol=tol, atol=tol)
    untouched = [s for s in range(SLOTS) if s not in SLOT_IDS]
    assert torch.equal(got_ssm[untouched], args["ssm_state"][untouched])
    assert torch.equal(got_conv[untouched], args["conv_state"][untouched])


def test_triton_kernel_dv_blocks_and_real_head_dims() -> None:
    """Several dv blocks a head (block_v below dv) and the 80B model's head dims (dk = dv = 128)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from spillover.kernels.triton.gdn_decode import gdn_decode

    args = inputs(1, 2, 128, 128, torch.float32, seed=7)
    want = run(ref.gdn_decode, args, "cpu")
    for block_v in (16, None):
        got = run(partial(gdn_decode, block_v=block_v), args, DEVICE)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def decode_ctx(fresh: list[bool], slots: list[int]) -> ForwardContext:
    context = [1 if f else 7 + i for i, f in enumerate(fresh)]
    return ForwardContext(positions=torch.tensor(context) - 1, query_lens=[1] * len(fresh),
                          context_lens=context, state_slots=slots,
                          linear=build_linear_meta([1] * len(fresh), context, slots,
                                                   torch.device("cpu")))


@pytest.mark.parametrize(("hk", "hv"), [(2, 2), (2, 4)])
def test_reference_matches_per_sequence_steps(hk: int, hv: int) -> None:
    """ref.gdn_decode is the layer's unfused step: per-sequence conv, gates, delta rule."""
    dk, dv = 8, 16
    args = inputs(hk, hv, dk, dv, torch.float32, seed=3)
    ctx = decode_ctx(FRESH, SLOT_IDS)
    conv_state, ssm_state = args["conv_state"].clone(), args["ssm_state"].clone()
    n, key_dim = len(FRESH), hk * dk
    act = ref.causal_conv1d(args["mixed"], args["conv_weight"], conv_state, ctx)
    q, k, v = act.split([key_dim, key_dim, hv * dv], dim=-1)
    beta = args["b"].sigmoid()
    g = -args["A_log"].float().exp() * F.softplus(args["a"].float() + args["dt_bias"])
    want = ref.gated_delta_rule(q.reshape(n, hk, dk), k.reshape(n, hk, dk),
                                v.reshape(n, hv, dv), g, beta, ssm_state, ctx)

    got_o, got_conv, got_ssm = _dispatch(args, ctx)
    torch.testing.assert_close(got_o, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_conv, conv_state, rtol=0, atol=0)
    torch.testing.assert_close(got_ssm, ssm_state, rtol=1e-5, atol=1e-5)


def _dispatch(args: dict[str, torch.Tensor], ctx: ForwardContext) -> tuple[torch.Tensor, ...]:
    """kernels.gdn_decode (CPU tensors: the reference) with the context's slot tensors."""
    moved = {k: v.clone() for k, v in args.items() if k not in ("slots", "fresh")}
    o = kernels.gdn_decode(**moved, ctx=ctx)
    return o, moved["conv_state"], moved["ssm_state"]


def test_dispatch_picks_triton_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "has_triton", lambda: True)
    assert kernels._pick_fused(True, torch.bfloat16)[0] == "triton"
    assert kernels._pick_fused(True, torch.float32)[0] == "triton"
    assert kernels._pick_fused(False, torch.bfloat16)[0] == "torch"
    assert kernels._pick_fused(True, torch.float64)[0] == "torch"
    monkeypatch.setenv("SPILLOVER_KERNELS", "ref")
    assert kernels._pick_fused(True, torch.bfloat16) == ("torch", kernels.FORCED)
