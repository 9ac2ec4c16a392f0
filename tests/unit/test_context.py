"""ForwardContext: frozen, and its per-step linear-attention metadata is right."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spillover.kernels.context import ForwardContext, build_linear_meta

CPU = torch.device("cpu")


def _ctx(**kw: object) -> ForwardContext:
    return ForwardContext(positions=torch.zeros(9, dtype=torch.long), query_lens=[4, 1, 4],
                          context_lens=[4, 8, 6], state_slots=[3, 0, 5], **kw)  # type: ignore[arg-type]


def test_linear_meta_values() -> None:
    slots, fresh, cu = build_linear_meta([4, 1, 4], [4, 8, 6], [3, 0, 5], CPU)
    assert slots.tolist() == [3, 0, 5]
    assert fresh.tolist() == [True, False, False]  # cached lens 0, 7, 2
    assert cu.tolist() == [0, 4, 5, 9]


def test_linear_meta_is_the_runners_when_built() -> None:
    meta = build_linear_meta([4, 1, 4], [4, 8, 6], [3, 0, 5], CPU)
    ctx = _ctx(linear=meta)
    assert ctx.linear_meta(CPU) is meta  # every layer reuses the step's tensors
    # A context built by hand (kernel tests) still answers, without storing anything on itself.
    bare = _ctx()
    assert [t.tolist() for t in bare.linear_meta(CPU)] == [t.tolist() for t in meta]
    assert bare.linear is None


def test_context_is_frozen() -> None:
    ctx = _ctx()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.rope_cos_sin = (torch.zeros(1), torch.zeros(1))  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.linear = build_linear_meta([1], [1], [0], CPU)  # type: ignore[misc]
