"""Per-request behaviour through the engine: seeds, stop strings, abort, logprobs, n > 1, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.outputs import QueueFullError, TokenEvent
from tests.engine.conftest import GREEDY, make_engine, random_prompts, run_all


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("llama-untied")
    prompts = random_prompts(5, [9, 30, 4, 17, 22, 6, 40, 11], llm.config.vocab_size)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = run_all(make_engine(llm), [prompts[0]], seeded)["r0"]
    others = [SamplingParams(max_tokens=10 + i, temperature=1.2, seed=None if i % 2 else i,
                             ignore_eos=True, presence_penalty=0.5) for i in range(7)]
    mixed = run_all(make_engine(llm, max_num_batched_tokens=32), prompts, [seeded, *others])
    assert mixed["r0"] == alone
    # a different seed gives another text (the seed matters at all)
    other = run_all(make_engine(llm), [prompts[0]], SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=99, ignore_eos=True))["r0"]
    assert other != alone


def test_stop_string_split_across_tokens(demo: LLM) -> None:
    msgs = [{"role": "user", "content": "List the days of the week, comma separated."}]
    ids = demo.apply_chat_template(msgs)
    free = demo.generate([ids], SamplingParams(max_tokens=40, temperature=0.0))[0]
    toks, text = free.token_ids, free.text
    tok = demo.tokenizer
    # A boundary between two tokens that both render at least two characters.
    bounds = [len(tok.decode(toks[:i], skip_special_tokens=True)) for i in range(len(toks) + 1)]
    b = next(bounds[i] for i in range(4, len(toks) - 1)
             if bounds[i] - bounds[i - 1] >= 2 and bounds[i + 1] - bounds[i] >= 2)
    stop = text[b - 2 : b + 2]
    engine = make_engine(demo)
    engine.add_request("s", ids, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))
    events: list[TokenEvent] = []
    while engine.has_unfinished():
        events += engine.step()
    streamed = "".join(e.new_text for e in events)
    assert streamed == text[: text.find(stop)]
    assert stop not in streamed
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop


@pytest.mark.parametrize("name", ["llama-untied", "qwen3_next"])
def test_abort_frees_blocks_and_slots(tiny_llm: Callable[[str], LLM], name: str) -> None:
    llm = tiny_llm(name)
    engine = make_engine(llm, max_num_batched_tokens=32)
    initial = engine.stats()
    prompts = random_prompts(6, [50, 20, 33, 7], llm.config.vocab_size)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", p, params)
    engine.add_request("fork", prompts[0],
                       SamplingParams(max_tokens=100, n=3, temperature=1.0, ignore_eos=True))
    for _ in range(6):
        engine.step()
    busy = engine.stats()
    assert busy.kv_blocks_free < initial.kv_blocks_free
    for rid in ["q0", "q1", "q2", "q3", "fork", "unknown"]:
        engine.abort(rid)
    after = engine.stats()
    assert (after.kv_blocks_free, after.state_slots_free) == (initial.kv_blocks_free,
                                                              initial.state_slots_free)
    assert after.num_running == after.num_waiting == 0
    final = engine.step()
    assert {(e.request_id, e.index) for e in final} == {("q0", 0), ("q1", 0), ("q2", 0), ("q3", 0),
                                                        ("fork", 0), ("fork", 1), ("fork", 2)}
    assert all(e.finished and e.finish_reason == "abort" for e in final)
    assert not engine.has_unfinished()


def test_logprobs_match_forward_logits(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3")
    prompt = random_prompts(7, [21], llm.config.vocab_size)[0]
    out = llm.generate([prompt],
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3,
                                      prompt_logprobs=2))[0]
    c = out.outputs[0]
    lsm = torch.log_softmax(llm.forward_logits(prompt + c.token_ids), dim=-1)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for j, (tokid, d) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        row = lsm[len(prompt) - 1 + j]
        assert d[tokid] == pytest.approx(row[tokid].item(), abs=1e-4)
        top = set(row.topk(3).indices.tolist())
        assert top <= set(d) and len(d) <= 4
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        d = out.prompt_logprobs[i]
        assert d is not None and d[prompt[i]] == pytest.approx(lsm[i - 1, prompt[i]].item(),
                                                               abs=1e-4)
        assert set(lsm[i - 1].topk(2).indices.tolist()) <= set(d)


def test_n_completions(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3_next")
    prompt = random_prompts(8, [19], llm.config.vocab_size)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=7, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    # child i samples with seed + i: the same as a single completion with that seed
    for i, c in enumerate(out.outputs):
        single = SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i, ignore_eos=True)
        assert c.token_ids == llm.generate([prompt], single)[0].token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate([prompt],
                          SamplingParams(max_tokens=6, temperature=0.0, n=2, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logits_processor_constrains_tokens(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("llama-untied")
    prompt = random_prompts(9, [12], llm.config.vocab_size)[0]
    seen: list[int] = []

    def even_only(out_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(len(out_ids))
        logits = logits.clone()
        logits[1::2] = float("-inf")
        return logits

    for temp in (0.0, 1.0):
        out = llm.generate([prompt],
                           SamplingParams(max_tokens=8, temperature=temp, ignore_eos=True, seed=3,
                                          logits_processors=[even_only], logprobs=0))[0]
        assert all(t % 2 == 0 for t in out.token_ids)
        logprobs = out.outputs[0].logprobs
        assert logprobs is not None
        assert all(lp[t] < 0 for t, lp in zip(out.token_ids, logprobs, strict=True))
    assert seen[:8] == list(range(8))
    logits = llm.forward_logits(prompt)[-1]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                   logits_processors=[even_only]))
    assert greedy[0].token_ids[0] == int(logits[0::2].argmax()) * 2


def test_add_request_errors(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("llama-untied")
    # one slot: "a" starts at the next step, "b" is the one waiting request max_queue_len allows
    engine = make_engine(llm, max_queue_len=1, max_num_seqs=1)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("long", [1] * (engine.max_model_len - 5), SamplingParams(max_tokens=10))
    engine.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request("a", [1, 2, 3], GREEDY)
    engine.add_request("b", [1, 2, 3], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2, 3], GREEDY)
    engine.step()  # "a" runs, "b" still waits: still full
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2, 3], GREEDY)
    engine.abort("b")  # room again
    engine.add_request("c", [1, 2, 3], GREEDY)


def test_generate_many_and_stream_chat(demo: LLM) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    streamed = "".join(demo.stream_chat(msgs, params))
    assert streamed == demo.chat(msgs, params)[0].text
    outs = demo.generate(["Hello", "The capital of Italy is", "Hello"], params)
    assert [o.prompt for o in outs] == ["Hello", "The capital of Italy is", "Hello"]
    assert outs[0].token_ids == outs[2].token_ids
    stats = demo.engine.stats()
    assert stats.num_running == 0 and stats.generation_tokens_total > 0
