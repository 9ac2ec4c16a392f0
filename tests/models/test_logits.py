"""Logit-by-logit comparison with the transformers implementation on tiny random configs
(fp32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from spillover import LLM
from spillover.engine.batch import StepPlan
from tests.models.tiny import CONFIGS, save_hf

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LLM]:
    folder: Path = tmp_path_factory.mktemp(request.param)
    ref = save_hf(request.param, folder)
    ours = LLM(model=str(folder), device="cpu", dtype="float32")
    return ref, ours


def ref_logits(ref: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def run_chunks(llm: LLM, chunks: list[list[int]]) -> torch.Tensor:
    """Feed the chunks one after another on one sequence's cache; logits of every fed token."""
    total = sum(len(c) for c in chunks)
    runner = llm._runner_for(total)
    table = list(range(runner.layout.num_blocks))
    out, seen = [], []
    for c in chunks:
        start, seen = len(seen), seen + c
        out.append(runner.execute(StepPlan.one_sequence(seen, table, llm.block_size,
                                                        start=start)).logits)
    return torch.cat(out)


def ids_for(seed: int, n: int, vocab: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def test_prefill_logits(pair: tuple[Any, LLM]) -> None:
    ref, llm = pair
    ids = ids_for(1, 37)
    diff = (llm.forward_logits(ids) - ref_logits(ref, ids)).abs().max().item()
    assert diff <= TOL, diff


def test_decode_16_steps_with_cache(pair: tuple[Any, LLM]) -> None:
    ref, llm = pair
    ids = ids_for(2, 20 + 16)
    expected = ref_logits(ref, ids)
    got = run_chunks(llm, [ids[:20]] + [[t] for t in ids[20:]])
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("split", [(5, 17), (9, 10, 13)])
def test_chunked_prefill_then_decode(pair: tuple[Any, LLM], split: tuple[int, ...]) -> None:
    ref, llm = pair
    n_prompt = sum(split)
    ids = ids_for(3, n_prompt + 6)
    one_shot = run_chunks(llm, [ids[:n_prompt]] + [[t] for t in ids[n_prompt:]])
    chunks, at = [], 0
    for s in split:
        chunks.append(ids[at : at + s])
        at += s
    chunked = run_chunks(llm, chunks + [[t] for t in ids[n_prompt:]])
    assert (chunked - one_shot).abs().max().item() <= TOL
    assert (chunked - ref_logits(ref, ids)).abs().max().item() <= TOL
