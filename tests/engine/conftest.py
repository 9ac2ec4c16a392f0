"""Shared fixtures: tiny random checkpoints (tests/models/tiny.py) and the demo
model, built once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.engine import Engine, EngineConfig
from tests.models.tiny import save_hf


@pytest.fixture(autouse=True, scope="module")
def engine_one_thread(one_thread: None) -> None:
    """Every engine test runs tiny models: one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            save_hf(name, folder)
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_folder: Callable[[str], Path]) -> Callable[[str], LLM]:
    loaded: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        if name not in loaded:
            loaded[name] = LLM(model=str(tiny_folder(name)), device="cpu", dtype="float32")
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def demo() -> LLM:
    return LLM(device="cpu", dtype="float32")


def make_engine(llm: LLM, **kw: object) -> Engine:
    """A fresh engine over the LLM's model (own caches, own counters)."""
    return llm.make_engine(EngineConfig(**kw))  # type: ignore[arg-type]


def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            prefix: str = "r") -> dict[str, list[list[int]]]:
    """Adds every prompt, steps until done; request id -> token ids per completion index."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    out: dict[str, list[list[int]]] = {}
    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"{prefix}{i}", p, sp)
        out[f"{prefix}{i}"] = [[] for _ in range(sp.n)]
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id][ev.index].extend(ev.new_token_ids)
    return out


def random_prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
MIXED_LENGTHS = [3, 40, 7, 25, 1, 64, 12, 33, 5, 18, 50, 9, 2, 28, 15, 70]
