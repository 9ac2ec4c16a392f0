"""ModelRunner: one entry, execute(StepPlan); the forward reads the context it builds and never
writes it; scoring goes through a one-sequence plan; max_model_len is resolved in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from spillover import LLM
from spillover.engine.batch import StepPlan
from spillover.engine.runner import ModelRunner
from spillover.kernels.context import ForwardContext
from spillover.plan.engine_cache import resolve_max_model_len
from tests.engine.conftest import make_engine


def test_execute_is_the_only_entry() -> None:
    public = {n for n in vars(ModelRunner) if not n.startswith("_")}
    assert public == {"execute"}


def _snapshot(ctx: ForwardContext) -> dict[str, Any]:
    """Every field: the object itself and a copy of its value. The caches' contents change (the
    forward writes K/V and states into them), their identity does not."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ctx):
        v = getattr(ctx, f.name)
        if f.name in ("kv_caches", "state_caches"):
            out[f.name] = (v, {i: (c, *(id(t) for t in vars(c).values())) for i, c in v.items()})
        elif isinstance(v, torch.Tensor):
            out[f.name] = (v, v.clone())
        elif isinstance(v, (list, tuple)):
            out[f.name] = (v, [(x, x.clone()) if isinstance(x, torch.Tensor) else x for x in v])
        else:
            out[f.name] = (v, v)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


@pytest.mark.parametrize("name", ["llama-untied", "qwen3_next"])
def test_forward_leaves_the_context_unchanged(tiny_llm: Callable[[str], LLM], name: str) -> None:
    llm = tiny_llm(name)
    engine = make_engine(llm, max_num_seqs=4, num_kv_blocks=32)
    seen: list[tuple[ForwardContext, dict[str, Any], dict[str, Any]]] = []
    before: dict[str, Any] = {}

    def pre(_mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
        before.clear()
        before.update(_snapshot(args[1]))

    def post(_mod: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        seen.append((args[1], dict(before), _snapshot(args[1])))

    hooks = [llm.model.register_forward_pre_hook(pre), llm.model.register_forward_hook(post)]
    try:
        from spillover import SamplingParams

        for i, n in enumerate((21, 3)):  # a prefill step, then steps mixing prefill and decode
            engine.add_request(f"r{i}", list(range(1, n + 1)),
                               SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    finally:
        for h in hooks:
            h.remove()
    assert seen and any(ctx.is_pure_decode for ctx, _, _ in seen)
    for ctx, b, a in seen:
        assert ctx.rope_cos_sin is not None  # built by the runner, before the forward
        assert (ctx.linear is not None) == bool(llm.config.linear_layers)
        for field in b:
            obj_b, val_b = b[field]
            obj_a, val_a = a[field]
            assert obj_a is obj_b, f"{field} was replaced during the forward"
            assert _same(val_a, val_b), f"{field} was changed during the forward"


@pytest.mark.parametrize("name", ["llama-untied", "qwen3_next"])
def test_scoring_plan_matches_chunked_plans(tiny_llm: Callable[[str], LLM], name: str) -> None:
    llm = tiny_llm(name)
    ids = [(7 * i + 3) % llm.config.vocab_size for i in range(40)]
    whole = llm.forward_logits(ids)
    assert whole.shape == (40, llm.config.vocab_size)
    runner = llm._runner_for(len(ids))
    table = list(range(runner.layout.num_blocks))
    bs = llm.block_size
    parts = [runner.execute(StepPlan.one_sequence(ids[:17], table, bs)).logits]
    parts += [runner.execute(StepPlan.one_sequence(ids[:30], table, bs, start=17,
                                                   logits="none")).logits]
    last = runner.execute(StepPlan.one_sequence(ids, table, bs, start=30, logits="last"))
    assert parts[1].shape[0] == 0 and last.logits.shape[0] == 1 and last.inputs.sample_rows == [0]
    torch.testing.assert_close(parts[0].cpu(), whole[:17], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.logits.cpu(), whole[39:], rtol=1e-4, atol=1e-4)


def test_one_sequence_plan_checks_its_table() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        StepPlan.one_sequence(list(range(33)), [0, 1], 16)
    with pytest.raises(ValueError, match="no tokens"):
        StepPlan.one_sequence([1, 2], [0], 16, start=2)
    plan = StepPlan.one_sequence(list(range(20)), [5, 6, 7, 8], 16, start=4)
    (seq,) = plan.seqs
    assert (seq.start, seq.num_new_tokens, seq.block_table) == (4, 16, [5, 6])
    assert plan.build_inputs().logits_indices == list(range(16))


def test_max_model_len_resolved_once(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("llama-untied")
    cfg = llm.config
    assert resolve_max_model_len(cfg, None) == cfg.max_position
    assert resolve_max_model_len(cfg, 100) == 100
    assert resolve_max_model_len(cfg, 10 * cfg.max_position) == cfg.max_position
    assert llm.max_model_len == resolve_max_model_len(cfg, llm.engine_config.max_model_len)
    engine = make_engine(llm, max_model_len=100)
    assert engine.config.max_model_len == engine.max_model_len == 100
    assert engine.memory_plan.extra["max_len"] == 100
    assert make_engine(llm).config.max_model_len == cfg.max_position
