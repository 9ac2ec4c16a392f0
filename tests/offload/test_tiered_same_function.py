"""Tiered experts compute the resident function: slots (emulated on the CPU), RAM and disk tiers,
every miss path (copied into a slot, computed by the CPU, streamed for a prefill), in batched
decode and chunked prefill, on tiny Qwen3-MoE and Qwen3-Next models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spillover.engine.params import SamplingParams
from spillover.layers.moe import SparseMoE
from spillover.llm import LLM
from spillover.offload.placement import ExpertPlacement, HostEmbedding
from spillover.offload.tiered import TieredExpertBank
from tests.models.tiny import save_hf

MODELS = ("qwen3_moe-norm", "qwen3_next")
PROMPTS = [[3, 17, 29, 41, 5, 9, 77, 12, 60, 8, 33], [100, 4, 4, 91], [7, 2, 55, 13, 88, 21, 34]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp(name)
        save_hf(name, folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def resident(folders: dict[str, Path]) -> dict[str, LLM]:
    return {n: LLM(str(f), device="cpu", dtype="float32", max_num_batched_tokens=8)
            for n, f in folders.items()}


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def _banks(llm: LLM) -> list[TieredExpertBank]:
    return [m for m in llm.model.modules() if isinstance(m, TieredExpertBank)]


PLACEMENTS = {
    # 8 experts a layer: 3 slots, 3 in RAM, 2 on disk; every miss path forced once
    "copy-lru": ExpertPlacement(slots=3, host=3, policy="lru", miss_mode="copy"),
    "cpu-lfu": ExpertPlacement(slots=3, host=3, policy="lfu", miss_mode="cpu"),
    "auto-lrfu": ExpertPlacement(slots=3, host=3, policy="lrfu", miss_mode="auto"),
    "static": ExpertPlacement(slots=2, host=4, policy="static", miss_mode="auto"),
    "stream": ExpertPlacement(slots=3, host=3, policy="lrfu", stream_rows=4),
    "no-slots": ExpertPlacement(slots=0, host=5, miss_mode="cpu"),
    "host-embeddings": ExpertPlacement(slots=4, host=4, host_embeddings=True),
    "stream-copies": ExpertPlacement(slots=3, host=3, policy="lru", stream_rows=4, slot_copies=2),
    "slot-copies": ExpertPlacement(slots=3, host=3, policy="lru", miss_mode="copy", slot_copies=3),
    # misses read from RAM by the device's kernels (no host decision): every expert in a tier
    "mapped": ExpertPlacement(slots=3, host=5, miss_mode="mapped"),
    "mapped-no-slots": ExpertPlacement(slots=0, host=8, miss_mode="mapped"),
    # a prefill streams the RAM experts (slot copies asked for: mapped misses keep none)
    "mapped-stream": ExpertPlacement(slots=3, host=5, miss_mode="mapped", stream_rows=4,
                                     slot_copies=3),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_tiered_equals_resident(name: str, placement: str, folders: dict[str, Path],
                                resident: dict[str, LLM]) -> None:
    ref = resident[name]
    tiered = LLM(str(folders[name]), device="cpu", dtype="float32", max_num_batched_tokens=8,
                 experts=PLACEMENTS[placement])
    banks = _banks(tiered)
    assert banks and len(banks) == sum(1 for _ in ref.model.modules()
                                       if type(_).__name__ == "ResidentExpertBank")
    counts = banks[0].tier_counts()
    p = PLACEMENTS[placement]
    assert [counts[t] for t in counts] == [p.slots, p.host, 8 - p.slots - p.host]

    ids = PROMPTS[0]
    torch.testing.assert_close(tiered.forward_logits(ids), ref.forward_logits(ids),
                               rtol=0, atol=1e-5)
    # batched decode + chunked prefill (8-token budget) through the engine
    assert _greedy(tiered) == _greedy(ref)

    stats = [b.tier_stats for b in banks]
    if placement == "copy-lru":
        assert sum(s.copied_experts for s in stats) > 0
        assert sum(s.disk_experts for s in stats) > 0  # disk experts were read back
    if placement in ("cpu-lfu", "no-slots"):
        assert sum(s.cpu_experts for s in stats) > 0 and sum(s.copied_experts for s in stats) == 0
    if placement in ("stream", "stream-copies"):
        assert sum(s.streamed_experts for s in stats) > 0
    if placement == "host-embeddings":
        assert any(isinstance(m, HostEmbedding) for m in tiered.model.modules())
    if placement == "slot-copies":  # evicted slot experts come back from RAM: disk has the 2
        assert all(len(b.host_row) == 6 for b in banks)
    if placement == "static":
        assert sum(s.copied_experts for s in stats) == 0  # a static placement never moves
    if placement.startswith("mapped"):
        assert not any(b.host_decides for b in banks)  # one CUDA graph for a whole decode step
        # Qwen3-Next's shared expert sits in a slot of its own (a routed row, no launches apart),
        # where there are slots
        moe = [m for m in tiered.model.modules() if isinstance(m, SparseMoE)]
        assert all(m.shared_in_bank == (name == "qwen3_next" and p.slots > 0) for m in moe)
        assert sum(s.copied_experts + s.cpu_experts + s.staged_experts for s in stats) == 0
        assert all(b.stream_prefix == len(b.host_row) == 8 - p.slots for b in banks)
        if placement == "mapped-stream":
            assert sum(s.streamed_experts for s in stats) > 0
        else:
            assert sum(s.steps for s in stats) == 0  # every step mapped
        for b in banks:
            b.settle(wait=True)  # the routing counted on the device, into the counters
        assert sum(b.residency.counters.misses for b in banks) > 0
    hits = sum(b.residency.counters.hits for b in banks)
    misses = sum(b.residency.counters.misses for b in banks)
    assert hits + misses == sum(b.residency.counters.lookups for b in banks) > 0


def test_mapped_misses_refuse_experts_on_disk(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="mapped misses need every expert outside the GPU slots"):
        LLM(str(folders["qwen3_next"]), device="cpu", dtype="float32",
            experts=ExpertPlacement(slots=3, host=3, miss_mode="mapped"))


def test_budget_too_small_for_the_dense_part_fails_at_start(folders: dict[str, Path]) -> None:
    from spillover.offload.budget import MemoryBudgets, plan_experts

    llm = LLM(str(folders["qwen3_moe-norm"]), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="does not fit"):
        plan_experts(llm.config, llm.model, torch.device("cpu"), MemoryBudgets(cpu=1000))


def test_sixteen_concurrent_requests_equal_alone(folders: dict[str, Path]) -> None:
    """Mixed lengths batched through a tiered bank (misses copied, evictions under pressure)
    give each request the tokens it gets alone."""
    llm = LLM(str(folders["qwen3_next"]), device="cpu", dtype="float32", max_num_batched_tokens=16,
              experts=ExpertPlacement(slots=2, host=4, policy="lru", miss_mode="copy"))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 40, (16,), generator=gen)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


@pytest.mark.parametrize("copy_faster", [True, False])
def test_auto_misses_follow_the_measured_speeds(copy_faster: bool, folders: dict[str, Path],
                                                resident: dict[str, LLM]) -> None:
    """In auto mode a miss the policy declines runs on the CPU, unless copies measured faster."""
    llm = LLM(str(folders["qwen3_moe-norm"]), device="cpu", dtype="float32",
              max_num_batched_tokens=8,
              experts=ExpertPlacement(slots=3, host=5, policy="lfu", miss_mode="auto"))
    banks = _banks(llm)
    router = banks[0].router
    assert all(b.router is router for b in banks)  # one router: speeds are the machine's
    fast, slow = 1e-12, 1.0  # seconds per byte; slow enough that real observations cannot flip it
    router.copy_s_per_byte, router.cpu_s_per_byte = (fast, slow) if copy_faster else (slow, fast)
    assert router.copy_is_faster() == copy_faster
    assert _greedy(llm) == _greedy(resident["qwen3_moe-norm"])
    cpu = sum(b.tier_stats.cpu_experts for b in banks)
    copied = sum(b.tier_stats.copied_experts for b in banks)
    if copy_faster:
        assert cpu == 0 and copied > 0
    else:
        assert cpu > 0


def test_streaming_leaves_no_staged_stack_behind(folders: dict[str, Path]) -> None:
    """After each streamed step no layer keeps a prefetched stack (one a layer would add up)."""
    tiered = LLM(str(folders["qwen3_next"]), device="cpu", dtype="float32",
                 max_num_batched_tokens=8,
                 experts=ExpertPlacement(slots=3, host=5, miss_mode="mapped", stream_rows=4))
    tiered.forward_logits(PROMPTS[0])
    banks = _banks(tiered)
    assert sum(b.tier_stats.streamed_experts for b in banks) > 0
    assert all(b._staged is None for b in banks)


@pytest.mark.parametrize("misses", ["copy", "cpu", "mapped"])
def test_int4_experts_over_the_tiers(misses: str, folders: dict[str, Path]) -> None:
    """int4 experts (the CPU's weight-only kernels, GEMV-sized and larger calls) through sparse
    slot and RAM passes give the resident int4 model's logits. (Greedy tokens are not compared:
    the CPU's int4 kernel rounds differently with the rows it gets, which a tiny random model
    turns into argmax flips; the code before sparse passes flipped the same way.)"""
    folder = str(folders["qwen3_next"])
    ref = LLM(folder, device="cpu", dtype="float32", quant="int4", quant_group_size=32,
              max_num_batched_tokens=8)
    host = 5 if misses == "mapped" else 3
    tiered = LLM(folder, device="cpu", dtype="float32", quant="int4", quant_group_size=32,
                 max_num_batched_tokens=8,
                 experts=ExpertPlacement(slots=3, host=host, policy="lru", miss_mode=misses))
    for ids in PROMPTS:
        torch.testing.assert_close(tiered.forward_logits(ids), ref.forward_logits(ids),
                                   rtol=0, atol=1e-4)
