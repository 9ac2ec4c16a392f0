"""Scheduler tests against a fake runner that really goes through the KV slots and state slots.

The fake model reads its context back from a simulated paged KV store (through `kv_indices`) and
a simulated recurrent state (a slot holding the tuple of tokens it has seen), so a block shared
when it should have been copied, a wrong prefix hit or a stale state slot changes the generated
tokens and the comparison with a plain reference loop fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from spillover.engine.batch import StepPlan
from spillover.engine.params import SamplingParams
from spillover.engine.request import Request, RequestStatus
from spillover.engine.scheduler import RequestDelta, Scheduler, SchedulerConfig

VOCAB = 50
EOS = 0


def fake_next(tokens: list[int], index: int = 0) -> int:
    """Deterministic 'model': the next token from the whole context (and the completion index,
    so that children of an n > 1 request diverge). Never returns EOS unless asked to."""
    h = len(tokens) * 7 + index * 13
    for i, t in enumerate(tokens[-5:]):
        h = h * 31 + t * (i + 3)
    return 1 + h % (VOCAB - 1)


def reference(req: Request) -> list[int]:
    tokens = list(req.prompt_token_ids)
    out: list[int] = []
    for _ in range(req.sampling_params.max_tokens):
        tok = fake_next(tokens, req.index)
        out.append(tok)
        tokens.append(tok)
    return out


class FakeRunner:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.bs = cfg.block_size
        self.kv: list[tuple[int, int] | None] = [None] * (cfg.num_blocks * cfg.block_size)
        self.state: list[tuple[int, ...] | None] = [None] * max(cfg.num_state_slots, 1)
        self.hybrid = cfg.hybrid

    def run(self, plan: StepPlan) -> dict[str, int]:
        bs = self.bs
        for c in plan.block_copies:
            self.kv[c.dst * bs : (c.dst + 1) * bs] = self.kv[c.src * bs : (c.src + 1) * bs]
        for s in plan.slot_copies:
            self.state[s.dst] = self.state[s.src]
        inp = plan.build_inputs()
        assert len(inp.token_ids) == len(inp.positions) == len(inp.slot_mapping) == plan.num_tokens
        for slot, pos, tok in zip(inp.slot_mapping, inp.positions, inp.token_ids, strict=True):
            self.kv[slot] = (pos, tok)
        sampled: dict[str, int] = {}
        row = 0
        for i, seq in enumerate(plan.seqs):
            context = [self.kv[s] for s in inp.kv_indices[i]]
            positions = [c[0] if c else None for c in context]
            assert positions == list(range(seq.context_len)), "KV positions"
            tokens = [c[1] for c in context if c is not None]
            if self.hybrid:
                slot = inp.state_slots[i]
                seen = () if seq.start == 0 else self.state[slot]
                assert seen is not None and len(seen) == seq.start, "state slot out of step"
                self.state[slot] = seen + tuple(inp.token_ids[row : row + seq.num_new_tokens])
                assert list(self.state[slot] or ()) == tokens, "state and KV disagree"
            if seq.sample:
                sampled[seq.request_id] = fake_next(tokens, seq.request.index)
            row += seq.num_new_tokens
        return sampled


def run_to_completion(
    sched: Scheduler,
    runner: FakeRunner,
    max_steps: int = 10_000,
    check: Callable[[StepPlan], None] | None = None,
) -> tuple[dict[str, list[int]], list[StepPlan], list[RequestDelta]]:
    outputs: dict[str, list[int]] = {}
    plans, deltas = [], []
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < max_steps, "no progress"
        plan = sched.schedule()
        plans.append(plan)
        if check is not None:
            check(plan)
        for d in sched.update(plan, runner.run(plan)):
            outputs.setdefault(d.request_id, []).extend(d.new_token_ids)
            deltas.append(d)
    return outputs, plans, deltas


def make(rid: str, prompt: list[int], max_tokens: int = 8, **kw: object) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw))  # type: ignore[arg-type]


def test_chunked_prefill_respects_budgets_and_mixes_decodes() -> None:
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=32, max_num_seqs=2)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    reqs = [make("a", list(range(1, 101))), make("b", [3] * 50), make("c", [5] * 10)]
    for r in reqs:
        sched.add_request(r)

    def check(plan: StepPlan) -> None:
        assert plan.num_tokens <= 32 and len(plan.seqs) <= 2
        for seq in plan.seqs:
            assert seq.sample == (seq.end == seq.request.num_tokens)
            assert seq.start == seq.request.num_computed_tokens

    outputs, plans, _ = run_to_completion(sched, runner, check=check)
    assert any(len({s.num_new_tokens == 1 for s in p.seqs}) == 2 for p in plans), "no mixed step"
    assert max(p.num_tokens for p in plans) == 32
    for r in reqs:
        assert outputs[r.request_id] == reference(r)
        assert r.finish_reason == "length"


def test_preemption_with_tiny_cache_loses_nothing() -> None:
    cfg = SchedulerConfig(num_blocks=24, block_size=4, max_num_batched_tokens=64, max_num_seqs=16)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    rng = random.Random(0)
    reqs = [
        make(f"r{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randrange(5, 21))],
             rng.randrange(10, 31))
        for i in range(32)
    ]
    for r in reqs:
        sched.add_request(r)
    outputs, plans, _ = run_to_completion(sched, runner)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert outputs[r.request_id] == reference(r), r.request_id
    assert sched.block_manager.num_free_blocks == cfg.num_blocks
    assert all(p.num_tokens <= 64 for p in plans)


def test_preemption_hybrid_state_slots() -> None:
    cfg = SchedulerConfig(
        num_blocks=20, block_size=4, max_num_batched_tokens=48, max_num_seqs=8, hybrid=True,
        num_state_slots=6
    )
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    rng = random.Random(1)
    reqs = [
        make(f"h{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 16))],
             rng.randrange(5, 20))
        for i in range(32)
    ]
    for r in reqs:
        sched.add_request(r)
    outputs, plans, _ = run_to_completion(sched, runner)
    assert sched.num_preemptions > 0
    assert max(len(p.seqs) for p in plans) <= 6  # one state slot per running request
    for r in reqs:
        assert outputs[r.request_id] == reference(r)
    assert sched.state_slots.num_free == 6 and sched.block_manager.num_free_blocks == 20


def test_prefix_cache_hits_shared_system_prompt() -> None:
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=256)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    system = list(range(1, 33))  # 8 full blocks
    first = make("first", system + [40, 41], max_tokens=3)
    sched.add_request(first)
    run_to_completion(sched, runner)
    assert first.num_cached_tokens == 0
    second = make("second", system + [42, 43, 44], max_tokens=3)
    same = make("same", system, max_tokens=3)  # whole prompt cached: the last block is recomputed
    sched.add_request(second)
    sched.add_request(same)
    outputs, _, _ = run_to_completion(sched, runner)
    assert second.num_cached_tokens == 32
    assert same.num_cached_tokens == 28
    assert outputs["second"] == reference(second) and outputs["same"] == reference(same)
    stats = sched.block_manager.stats
    assert stats.hits == 60 and stats.queries == 34 + 35 + 32


def test_abort_returns_blocks_and_slots() -> None:
    cfg = SchedulerConfig(
        num_blocks=32,
        block_size=4,
        max_num_batched_tokens=16,
        hybrid=True,
        num_state_slots=4,
        max_prompt_checkpoints=2,
    )
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    for i in range(6):
        sched.add_request(make(f"x{i}", [i + 1] * 10, max_tokens=20))
    sched.add_request(make("fam", [7] * 9, max_tokens=20, n=3))
    for _ in range(4):
        plan = sched.schedule()
        sched.update(plan, runner.run(plan))
    plan = sched.schedule()
    assert plan.seqs
    aborted = sched.abort("x0") + sched.abort("fam") + sched.abort("nope")
    assert aborted and all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    sched.update(plan, runner.run(plan))  # results for aborted requests are dropped
    for rid in [f"x{i}" for i in range(1, 6)]:
        sched.abort(rid)
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 32 and sched.state_slots.num_free == 4
    assert len(sched.prompt_cache) == 0


def test_n_children_share_prompt_and_diverge() -> None:
    for hybrid in (False, True):
        cfg = SchedulerConfig(
            num_blocks=64, block_size=4, max_num_batched_tokens=64, hybrid=hybrid, num_state_slots=8
        )
        sched, runner = Scheduler(cfg), FakeRunner(cfg)
        parent = make("p", list(range(1, 11)), max_tokens=6, n=3)  # 10 tokens: parent computes 9
        sched.add_request(parent)
        outputs, plans, deltas = run_to_completion(sched, runner)
        assert plans[0].seqs[0].num_new_tokens == 9 and not plans[0].seqs[0].sample
        assert len(plans[1].block_copies) == 2  # 9 % 4 != 0: the partial block is copied per child
        assert len(plans[1].slot_copies) == (2 if hybrid else 0)
        assert [s.num_new_tokens for s in plans[1].seqs] == [1, 1, 1]
        for i in range(3):
            child = parent.fork(i)
            assert outputs[f"p#{i}"] == reference(child)
        assert {d.parent_id for d in deltas} == {"p"} and {d.index for d in deltas} == {0, 1, 2}
        assert len({tuple(v) for v in outputs.values()}) == 3
        assert sched.block_manager.num_free_blocks == 64


def test_hybrid_prompt_reuse_next_turn() -> None:
    cfg = SchedulerConfig(
        num_blocks=64,
        block_size=4,
        max_num_batched_tokens=64,
        hybrid=True,
        num_state_slots=4,
        max_prompt_checkpoints=2,
    )
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    turn1 = make("t1", list(range(1, 12)), max_tokens=5)
    sched.add_request(turn1)
    out1 = run_to_completion(sched, runner)[0]["t1"]
    assert len(sched.prompt_cache) == 1
    # The checkpoint covers prompt + output[:-1] (the last sampled token was never computed).
    turn2 = make("t2", turn1.prompt_token_ids + out1 + [30, 31, 32], max_tokens=5)
    sched.add_request(turn2)
    plans = []
    out2: list[int] = []
    while sched.has_unfinished():
        plan = sched.schedule()
        plans.append(plan)
        out2 += [t for d in sched.update(plan, runner.run(plan)) for t in d.new_token_ids]
    assert turn2.num_cached_tokens == 11 + 5 - 1
    assert plans[0].slot_copies and plans[0].seqs[0].start == 15
    assert out2 == reference(turn2)
    # LRU under the budget of 2 checkpoints
    for i in range(3):
        sched.add_request(make(f"o{i}", [40 + i] * 5, max_tokens=2))
        run_to_completion(sched, runner)
    assert len(sched.prompt_cache) == 2 and sched.prompt_cache.stats.evicted >= 2
    assert sched.state_slots.num_free == 2


class CharTokenizer:
    """Token id -> a text piece; several pieces are multi-character so stop strings straddle."""

    pieces = ["<eos>", "a", "b", "c", " ", "ST", "OP", "x", "yz", "\n"]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for t in range(len(self.pieces) - 1, 0, -1):
                if text.startswith(self.pieces[t], i):
                    out.append(t)
                    i += len(self.pieces[t])
                    break
        return out


def scripted(sched: Scheduler, script: dict[str, list[int]]) -> dict[str, list[RequestDelta]]:
    """Drives the scheduler, sampling the scripted tokens in order (no model involved)."""
    got: dict[str, list[RequestDelta]] = {}
    while sched.has_unfinished():
        plan = sched.schedule()
        sampled = {s.request_id: script[s.request_id][s.request.num_output_tokens]
                   for s in plan.sample_seqs}
        for d in sched.update(plan, sampled):
            got.setdefault(d.request_id, []).append(d)
    return got


def test_stop_rules() -> None:
    tok = CharTokenizer()
    cfg = SchedulerConfig(num_blocks=64, block_size=4, eos_token_ids=(0,))
    sched = Scheduler(cfg, detokenize=tok.decode)
    p = [1, 2]
    cases = {
        "eos": (SamplingParams(max_tokens=10), [1, 2, 0, 1], "ab", "stop", None),
        "ignore_eos": (SamplingParams(max_tokens=3, ignore_eos=True), [1, 0, 2], "a<eos>b",
                       "length", None),
        "min_tokens": (SamplingParams(max_tokens=10, min_tokens=2), [0, 3, 0], "<eos>c", "stop",
                       None),
        "stop_id": (SamplingParams(max_tokens=10, stop_token_ids=[7]), [1, 7, 2], "a", "stop", 7),
        "stop_str": (SamplingParams(max_tokens=10, stop=["STOP"]), [1, 5, 6, 1], "a", "stop",
                     "STOP"),
        "split": (SamplingParams(max_tokens=10, stop=["xy"]), [1, 7, 8, 2], "a", "stop", "xy"),
        "length": (SamplingParams(max_tokens=2, stop=["zz"]), [1, 2, 3], "ab", "length", None),
    }
    for rid, (sp, _, _, _, _) in cases.items():
        sched.add_request(Request(rid, p, sp))
    got = scripted(sched, {rid: c[1] for rid, c in cases.items()})
    for rid, (_, script, text, reason, stop_reason) in cases.items():
        deltas = got[rid]
        assert "".join(d.new_text for d in deltas) == text, rid
        assert deltas[-1].finished and deltas[-1].finish_reason == reason, rid
        assert deltas[-1].stop_reason == stop_reason, rid
        assert [t for d in deltas for t in d.new_token_ids] == script[: len(deltas)], rid
        assert not any(d.finished for d in deltas[:-1])


def test_streaming_holds_back_stop_prefix() -> None:
    tok = CharTokenizer()
    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4), detokenize=tok.decode)
    sched.add_request(Request("s", [1], SamplingParams(max_tokens=10, stop=["STOPx"])))
    deltas = scripted(sched, {"s": [1, 5, 6, 2, 5, 6, 7]})["s"]
    # "aSTOPb" then "STOP" + "x": nothing of the final "STOP" may have been streamed.
    assert "".join(d.new_text for d in deltas) == "aSTOPb"
    assert all("STOPb" not in d.new_text or d.finished for d in deltas)
    assert deltas[-1].stop_reason == "STOPx"


def test_rejects_what_can_never_run_and_stops_at_cache_limit() -> None:
    cfg = SchedulerConfig(num_blocks=4, block_size=4)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    with pytest.raises(ValueError):
        sched.add_request(make("big", [1] * 17))
    with pytest.raises(ValueError):
        sched.add_request(Request("s", [1], SamplingParams(stop=["x"])))  # no detokenizer
    lone = make("lone", [1] * 10, max_tokens=100)
    sched.add_request(lone)
    run_to_completion(sched, runner)
    assert lone.finish_reason == "length" and lone.num_tokens == 16


def test_prompt_logprob_positions_cover_the_prompt_once() -> None:
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    warm = make("warm", list(range(1, 21)), max_tokens=1)
    sched.add_request(warm)
    run_to_completion(sched, runner)
    lp = make("lp", list(range(1, 21)), max_tokens=2, prompt_logprobs=1)
    sched.add_request(lp)
    positions: list[int] = []
    rows: list[int] = []
    preempted = False
    while sched.has_unfinished():
        plan = sched.schedule()
        inp = plan.build_inputs()
        for i, lo, hi in inp.prompt_logprob_spans:
            positions += plan.seqs[i].prompt_logprob_positions
            rows += inp.logits_indices[lo:hi]
        sched.update(plan, runner.run(plan))
        if not preempted and lp.num_computed_tokens == 8:
            sched._preempt(lp)  # recomputation must not score the same positions again
            preempted = True
    assert lp.num_cached_tokens == 0  # prompt logprobs need every position: no prefix hit
    assert positions == list(range(19))  # position i scores prompt token i + 1
    assert len(rows) == 19
