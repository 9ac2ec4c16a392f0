"""Routing statistics recorded from a real forward place the hottest experts in the slots."""

from __future__ import annotations

from pathlib import Path

import torch

from spillover.llm import LLM
from spillover.offload.placement import ExpertPlacement
from spillover.offload.profile import record_routing, routed_banks
from spillover.offload.residency import ExpertStats
from spillover.offload.tiered import TieredExpertBank
from tests.models.tiny import save_hf


def test_profile_then_place_from_stats(tmp_path: Path) -> None:
    save_hf("qwen3_moe-norm", tmp_path / "m")
    llm = LLM(str(tmp_path / "m"), device="cpu", dtype="float32")
    banks = routed_banks(llm.model)
    stats = ExpertStats(len(banks), llm.config.num_experts)
    trace: list[list[list[int]]] = []
    ids = torch.randint(0, llm.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    with record_routing(llm.model, stats, trace):
        llm.forward_logits(ids.tolist())
    k = llm.config.num_experts_per_tok
    assert [sum(row) for row in stats.counts] == [96 * k] * len(banks)
    assert len(trace) == 1 and len(trace[0]) == len(banks)
    stats.save(tmp_path / "stats.json")
    loaded = ExpertStats.load(tmp_path / "stats.json", len(banks), llm.config.num_experts)
    assert loaded.counts == stats.counts

    tiered = LLM(str(tmp_path / "m"), device="cpu", dtype="float32",
                 experts=ExpertPlacement(slots=3, host=5, policy="static"),
                 expert_stats=str(tmp_path / "stats.json"))
    for i, bank in enumerate(b for b in tiered.model.modules() if isinstance(b, TieredExpertBank)):
        slotted = {e for e, s in enumerate(bank.residency.slot_table()) if s >= 0}
        assert slotted == set(stats.top(i, 3))


def test_prefetch_predictor_accuracy_is_measured(tmp_path: Path) -> None:
    from spillover.bench.prefetch import measure_prefetch

    save_hf("qwen3_moe-norm", tmp_path / "m")
    llm = LLM(str(tmp_path / "m"), device="cpu", dtype="float32")
    ids = torch.randint(0, llm.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with measure_prefetch(llm.model) as acc:
        llm.forward_logits(ids.tolist())
    k = llm.config.num_experts_per_tok
    assert acc.total == [40 * k] * (len(routed_banks(llm.model)) - 1)
    assert all(0 <= h <= t for h, t in zip(acc.hits, acc.total, strict=True))
