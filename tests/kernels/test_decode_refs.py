"""The batched decode references of the linear-attention ops (what `ref.gdn_decode` composes, and
a CUDA graph captures) compute what the per-sequence references compute, fresh sequences and
reused state slots included."""

from __future__ import annotations

import pytest
import torch

from spillover.kernels import ref
from spillover.kernels.context import ForwardContext, build_linear_meta

N, C, K, SLOTS = 5, 12, 4, 8
HK, HV, DK, DV = 2, 4, 8, 6


def decode_ctx(fresh: list[bool], slots: list[int]) -> ForwardContext:
    context = [1 if f else 7 + i for i, f in enumerate(fresh)]
    return ForwardContext(positions=torch.tensor(context) - 1, query_lens=[1] * len(fresh),
                          context_lens=context, state_slots=slots,
                          linear=build_linear_meta([1] * len(fresh), context, slots,
                                                   torch.device("cpu")))


@pytest.mark.parametrize("fresh", [[False] * N, [True, False, True, False, False]])
def test_causal_conv1d_decode_matches_per_sequence(fresh: list[bool]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=gen)
    w = torch.randn(C, K, generator=gen)
    state = torch.randn(SLOTS, C, K - 1, generator=gen)
    ctx = decode_ctx(fresh, [6, 1, 3, 0, 5])
    want_state = state.clone()
    want = ref.causal_conv1d(x, w, want_state, ctx)
    got_state = state.clone()
    slots, fresh_t, _ = ctx.linear_meta(x.device)
    got = ref.causal_conv1d_decode(x, w, got_state, slots, fresh_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)


@pytest.mark.parametrize("fresh", [[False] * N, [False, True, False, False, True]])
def test_gated_delta_rule_decode_matches_per_sequence(fresh: list[bool]) -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(N, HK, DK, generator=gen)
    k = torch.randn(N, HK, DK, generator=gen)
    v = torch.randn(N, HV, DV, generator=gen)
    g = -torch.rand(N, HV, generator=gen)
    beta = torch.rand(N, HV, generator=gen)
    state = torch.randn(SLOTS, HV, DK, DV, generator=gen)
    ctx = decode_ctx(fresh, [2, 7, 4, 1, 0])
    want_state = state.clone()
    want = ref.gated_delta_rule(q, k, v, g, beta, want_state, ctx)
    got_state = state.clone()
    slots, fresh_t, _ = ctx.linear_meta(q.device)
    got = ref.gated_delta_rule_decode(q, k, v, g, beta, got_state, slots, fresh_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)
    untouched = [s for s in range(SLOTS) if s not in (2, 7, 4, 1, 0)]
    assert torch.equal(got_state[untouched], state[untouched])
