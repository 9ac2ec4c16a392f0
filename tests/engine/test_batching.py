"""Batch invariance, prefix caching, hybrid prompt reuse and preemption under a tiny cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spillover import LLM, SamplingParams
from tests.engine.conftest import GREEDY, MIXED_LENGTHS, make_engine, random_prompts, run_all


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_moe-norm", "llama-untied"])
def test_batch_invariance_tiny(tiny_llm: Callable[[str], LLM], name: str) -> None:
    llm = tiny_llm(name)
    prompts = random_prompts(1, MIXED_LENGTHS, llm.config.vocab_size)
    # A small token budget forces chunked prefills riding along with other requests' decodes.
    together = run_all(make_engine(llm, max_num_seqs=16, max_num_batched_tokens=48), prompts,
                       GREEDY)
    alone_engine = make_engine(llm, max_num_seqs=1, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        alone = run_all(alone_engine, [p], GREEDY, prefix=f"a{i}-")
        assert together[f"r{i}"] == alone[f"a{i}-0"], f"prompt {i} ({len(p)} tokens)"


def test_batch_invariance_demo(demo: LLM) -> None:
    texts = ["What is the capital of France?", "Count: one, two,", "def fibonacci(n):",
             "The sea is", "Write a haiku about autumn leaves falling softly on the ground.",
             "Hi", "1, 1, 2, 3, 5, 8,", "Translate to French: good night", "Once upon a time",
             "SELECT * FROM", "The meaning of life", "import numpy as np",
             "Q: Why is the sky blue?\nA:", "Roses are red,", "Paris is", "Dear Sir,"]
    prompts = [demo.tokenizer(t).input_ids for t in texts]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = make_engine(demo, max_num_seqs=16, num_kv_blocks=64)
    together = run_all(engine, prompts, params)
    for i, p in enumerate(prompts):
        alone = run_all(engine, [p], params, prefix=f"a{i}-")
        assert together[f"r{i}"] == alone[f"a{i}-0"], texts[i]


def test_prefix_cache_computes_only_new_tokens(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3")
    shared, a, b = random_prompts(2, [96, 9, 13], llm.config.vocab_size)
    engine = make_engine(llm, block_size=16)
    first = run_all(engine, [shared + a], GREEDY, prefix="first")
    before = engine.stats()
    second = run_all(engine, [shared + b], GREEDY, prefix="second")
    after = engine.stats()
    assert after.computed_prompt_tokens_total - before.computed_prompt_tokens_total == len(b)
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == len(shared)
    fresh = make_engine(llm, enable_prefix_caching=False)
    assert second["second0"] == run_all(fresh, [shared + b], GREEDY)["r0"]
    assert first["first0"] == run_all(fresh, [shared + a], GREEDY, prefix="x")["x0"]


def test_hybrid_two_turn_chat_reuses_the_first_turn(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3_next")
    turn1, user2 = random_prompts(3, [37, 11], llm.config.vocab_size)
    engine = make_engine(llm)
    out1 = run_all(engine, [turn1], GREEDY, prefix="t1-")["t1-0"][0]
    turn2 = turn1 + out1 + user2
    before = engine.stats()
    engine.add_request("t2", turn2, GREEDY)
    got: list[int] = []
    cached = -1
    while engine.has_unfinished():
        for ev in engine.step():
            got += ev.new_token_ids
            cached = ev.num_cached_tokens
    after = engine.stats()
    # The checkpoint holds every computed token: turn 1's prompt and all its output but the last.
    reused = len(turn1) + len(out1) - 1
    assert cached == reused
    computed = after.computed_prompt_tokens_total - before.computed_prompt_tokens_total
    assert computed == len(turn2) - reused
    assert got == run_all(make_engine(llm, enable_prefix_caching=False), [turn2], GREEDY)["r0"][0]


@pytest.mark.parametrize("name", ["llama-untied", "qwen3_next"])
def test_tiny_cache_preempts_and_still_matches(tiny_llm: Callable[[str], LLM], name: str) -> None:
    llm = tiny_llm(name)
    lengths = [(7 * i) % 40 + 3 for i in range(32)]
    prompts = random_prompts(4, lengths, llm.config.vocab_size)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = run_all(make_engine(llm, max_num_seqs=32, enable_prefix_caching=False), prompts,
                        params)
    # 20 blocks of 8 tokens: room for a handful of the 32 sequences at a time.
    small = make_engine(llm, max_num_seqs=32, block_size=8, num_kv_blocks=20, num_state_slots=40,
                        max_num_batched_tokens=64)
    got = run_all(small, prompts, params)
    assert got == reference
    stats = small.stats()
    assert stats.num_preemptions > 0
    assert stats.num_running == stats.num_waiting == 0
