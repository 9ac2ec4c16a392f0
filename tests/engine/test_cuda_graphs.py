"""The CUDA-graph decode path on the CPU: `emulate_graphs` runs it eagerly (padding to a bucket,
one packed input buffer, the context derived from it, scratch KV block and state slot for padding
rows, the forward cut into pieces where a tiered bank decides on the host). It must compute what
the eager engine computes; the GPU check (scripts/gpu_check.py) compares real replays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.batch import FlatInputs
from spillover.engine.cuda_graphs import DecodeGraphs, HostValuesUnread, buckets
from spillover.engine.engine import Engine, EngineConfig
from spillover.offload.placement import ExpertPlacement
from tests.engine.conftest import random_prompts, run_all

MODELS = ("llama-untied", "qwen3_moe-norm", "qwen3_next")


def test_buckets_cover_every_batch_up_to_the_largest() -> None:
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]


def test_host_lists_refuse_to_be_read() -> None:
    lens = HostValuesUnread([0] * 3)
    assert len(lens) == 3
    with pytest.raises(RuntimeError, match="host list"):
        list(lens)
    with pytest.raises(RuntimeError, match="host list"):
        lens[0]


def _graphs(engine_llm: LLM, **kw: Any) -> tuple[DecodeGraphs, Engine]:
    engine = engine_llm.make_engine(EngineConfig(emulate_graphs=True, **kw))
    assert engine.runner.graphs is not None
    return engine.runner.graphs, engine


@pytest.mark.parametrize("name", MODELS)
def test_emulated_graph_decode_equals_eager(name: str, tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm(name)
    vocab = llm.config.vocab_size
    # 5 sequences of different lengths finishing at different steps: batches 5 (bucket 8, three
    # padding rows), 4, 3 ... 1; a one-token prompt makes a fresh sequence inside a decode step.
    prompts = random_prompts(3, [9, 1, 23, 4, 14], vocab)
    params = [SamplingParams(max_tokens=t, temperature=0.0, ignore_eos=True, logprobs=2)
              for t in (6, 9, 3, 12, 7)]
    eager = llm.make_engine(EngineConfig(max_num_seqs=8, enable_prefix_caching=False))
    graphs, engine = _graphs(llm, max_num_seqs=8, enable_prefix_caching=False)
    want = run_all(eager, prompts, params)
    got = run_all(engine, prompts, params)
    assert got == want
    assert graphs.steps > 0 and graphs.padded_rows > 0
    assert [p.graph for p in graphs.pieces] == [True]  # resident experts: one graph


@pytest.mark.parametrize("host_embeddings", [False, True])
def test_emulated_graph_pieces_around_a_tiered_bank(host_embeddings: bool,
                                                    tiny_folder: Callable[[str], Path]) -> None:
    folder = str(tiny_folder("qwen3_next"))
    resident = LLM(folder, device="cpu", dtype="float32")
    tiered = LLM(folder, device="cpu", dtype="float32",
                 experts=ExpertPlacement(slots=3, host=3, policy="lru", miss_mode="copy",
                                         host_embeddings=host_embeddings))
    prompts = random_prompts(5, [6, 17, 2], resident.config.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = run_all(resident.make_engine(EngineConfig()), prompts, params)
    graphs, engine = _graphs(tiered)
    assert run_all(engine, prompts, params) == want
    moe_layers = sum(1 for f in tiered.config.moe_layers if f)
    # a graph piece before each tiered bank's call, one eager piece for it, one graph to the end
    # (an embedding table in RAM is looked up eagerly before the first graph)
    assert [p.graph for p in graphs.pieces] == (
        [False] * host_embeddings + [True, False] * moe_layers + [True])
    assert graphs.steps > 0


def test_mapped_misses_keep_a_step_in_one_graph(tiny_folder: Callable[[str], Path]) -> None:
    folder = str(tiny_folder("qwen3_next"))
    resident = LLM(folder, device="cpu", dtype="float32")
    mapped = LLM(folder, device="cpu", dtype="float32",
                 experts=ExpertPlacement(slots=3, host=5, miss_mode="mapped"))
    prompts = random_prompts(6, [6, 17, 2], resident.config.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = run_all(resident.make_engine(EngineConfig()), prompts, params)
    graphs, engine = _graphs(mapped)
    assert run_all(engine, prompts, params) == want
    assert [p.graph for p in graphs.pieces] == [True]
    assert graphs.steps > 0


def test_padding_rows_leave_every_sequence_cache_alone(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3_next")
    graphs, engine = _graphs(llm, max_num_seqs=4)
    runner = engine.runner
    scratch_block, scratch_slot = runner.layout.num_blocks, runner.layout.num_state_slots
    kv_before = {i: c.k[:scratch_block].clone() for i, c in runner.kv_caches.items()}
    ssm_before = {i: c.ssm[:scratch_slot].clone() for i, c in runner.state_caches.items()}
    inp = _one_decode_inputs(engine)
    graphs.run(inp)  # batch 1 in bucket 1: no padding; then forced into a bucket of 4
    graphs.buckets = [4]
    graphs.run(inp)
    assert graphs.padded_rows == 3
    # only the one real sequence's block and slot changed
    for i, c in runner.kv_caches.items():
        changed = (c.k[:scratch_block] != kv_before[i]).flatten(1).any(1).nonzero().flatten()
        assert changed.tolist() == [inp.block_tables[0][-1]]
    for i, c in runner.state_caches.items():
        changed = (c.ssm[:scratch_slot] != ssm_before[i]).flatten(1).any(1).nonzero().flatten()
        assert changed.tolist() == [inp.state_slots[0]]


def _one_decode_inputs(engine: Engine) -> FlatInputs:
    """A scheduled decode step of one sequence, whose prompt went through the engine first."""
    engine.add_request("a", [5, 9, 2, 7], SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()
    inp = engine.scheduler.schedule().build_inputs(kv_indices=False)
    assert inp.query_lens == [1]
    return inp


def test_graph_logits_match_eager_logits(tiny_llm: Callable[[str], LLM]) -> None:
    llm = tiny_llm("qwen3_next")
    graphs, engine = _graphs(llm, max_num_seqs=4)
    inp = _one_decode_inputs(engine)
    runner = engine.runner
    saved = ({i: (c.k.clone(), c.v.clone()) for i, c in runner.kv_caches.items()},
             {i: (c.conv.clone(), c.ssm.clone()) for i, c in runner.state_caches.items()})
    graphs.buckets = [4]
    got = graphs.run(inp)
    for i, (k, v) in saved[0].items():
        runner.kv_caches[i].k.copy_(k)
        runner.kv_caches[i].v.copy_(v)
    for i, (conv, ssm) in saved[1].items():
        runner.state_caches[i].conv.copy_(conv)
        runner.state_caches[i].ssm.copy_(ssm)
    ids, ctx = runner._build_context(inp)
    want = runner.model.compute_logits(runner.model(ids, ctx), ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_serve_passes_enforce_eager_to_its_engine() -> None:
    from spillover.cli.main import build_parser
    from spillover.cli.serve import make_loader

    argv = ["serve", "--device", "cpu", "--max-num-seqs", "2", "--enforce-eager"]
    engine = make_loader(build_parser().parse_args(argv))()
    assert engine.config.enforce_eager is True and engine.runner.graphs is None
