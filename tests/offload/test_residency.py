from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from spillover.offload.residency import (
    POLICIES,
    ExpertStats,
    LayerResidency,
    LFUPolicy,
    LRFUPolicy,
    LRUPolicy,
    NoSlotError,
    ResidencyMap,
    StaticPolicy,
    Tier,
    make_policy,
    simulate,
)


def touch(layer: LayerResidency, *experts: int) -> tuple[dict[int, int], list[int]]:
    """One step of the layer with these experts routed; misses are admitted as the policy says."""
    hits, misses = layer.lookup(list(experts))
    for e in misses:
        if layer.should_admit(e):
            layer.admit(e)
    return hits, misses


def routing_trace(
    steps: int, layers: int, experts: int, k: int, skew: float, seed: int
) -> list[list[list[int]]]:
    """k distinct experts per layer per step, drawn with weight 1/(rank+1)^skew (0: uniform)."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** skew for r in range(experts)]
    trace = []
    for _ in range(steps):
        step = []
        for _ in range(layers):
            ids: list[int] = []
            while len(ids) < k:
                e = rng.choices(range(experts), weights)[0]
                if e not in ids:
                    ids.append(e)
            step.append(ids)
        trace.append(step)
    return trace


# ---- policies -----------------------------------------------------------------------------------
def test_make_policy_names_and_fresh_instances() -> None:
    assert set(POLICIES) == {"lru", "lfu", "lrfu", "static"}
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("LFU"), LFUPolicy)
    assert isinstance(make_policy("lrfu", half_life=8), LRFUPolicy)
    assert isinstance(make_policy("static"), StaticPolicy)
    assert make_policy("lru") is not make_policy("lru")  # policies hold per-layer state
    with pytest.raises(ValueError, match="unknown slot policy 'arc'.*lru, lfu, lrfu, static"):
        make_policy("arc")
    with pytest.raises(ValueError, match="age_every"):
        LFUPolicy(age_every=0)
    with pytest.raises(ValueError, match="half_life"):
        LRFUPolicy(half_life=0)


def test_lru_evicts_least_recently_used_in_order() -> None:
    layer = LayerResidency(8, 3, "lru", initial=[0, 1, 2])
    touch(layer, 0)
    touch(layer, 1)
    # 2 was never used since placement: it goes first
    assert layer.admit(5) == (2, 2)
    touch(layer, 0)  # 0 is now more recent than 1
    touch(layer, 5)
    assert layer.admit(6) == (1, 1)  # 1: last used at tick 2, the oldest
    assert layer.admit(7) == (0, 0)  # then 0 (tick 3), before 5 (tick 4)
    assert layer.admit(3) == (2, 5)
    assert {e: s for e, s in enumerate(layer.slot_table()) if s >= 0} == {6: 1, 7: 0, 3: 2}


def test_lru_initial_order_evicts_coldest_first() -> None:
    # initial is hottest first: with no use yet, the last listed is the first victim
    layer = LayerResidency(6, 3, "lru", initial=[4, 2, 0])
    assert [layer.admit(e)[1] for e in (1, 3, 5)] == [0, 2, 4]


def test_lru_cyclic_trace_never_hits() -> None:
    # the textbook LRU worst case: cycling through one expert more than there are slots
    trace = [[[e % 4]] for e in range(40)]
    assert simulate(trace, 8, 3, "lru", warmup_steps=4).hits == 0
    assert simulate(trace, 8, 3, "static", warmup_steps=4).hit_rate == pytest.approx(0.75)


def test_lfu_counts_and_tie_break_by_recency() -> None:
    p = LFUPolicy(age_every=1000)
    for e, t in [(0, 1), (0, 2), (1, 3), (2, 4), (2, 5)]:
        p.record(e, t)
    for e in (0, 1, 2):
        p.insert(e, 5)
    assert p.victim(6) == 1  # one use against two
    p.record(1, 6)
    assert p.victim(6) == 0  # 0, 1 and 2 tie on two uses: 0 was used least recently
    p.remove(0)
    assert p.victim(6) == 2


def test_lfu_aging_halves_counts_and_lets_old_popularity_fade() -> None:
    p = LFUPolicy(age_every=10)
    for t in range(1, 9):
        p.record(0, t)
    before = p.score(0, 10)
    assert p.score(0, 20) == pytest.approx(before / 2)
    assert p.score(0, 40) == pytest.approx(before / 8)

    def victim(policy: LFUPolicy) -> int | None:
        for t in range(1, 9):  # expert 0: hot early
            policy.record(0, t)
        for t in (95, 97, 99):  # expert 1: a few uses, recently
            policy.record(1, t)
        policy.insert(0, 99)
        policy.insert(1, 99)
        return policy.victim(100)

    assert victim(LFUPolicy(age_every=10)) == 0  # aged: 8 old uses weigh less than 3 new ones
    assert victim(LFUPolicy(age_every=10**6)) == 1  # no aging: plain LFU keeps the old favourite


def test_lfu_refuses_one_off_misses() -> None:
    layer = LayerResidency(8, 2, LFUPolicy(), initial=[0, 1])
    for _ in range(3):
        touch(layer, 0, 1)
    hits, misses = touch(layer, 5)
    assert misses == [5] and not layer.should_admit(5)
    assert layer.tier_of(5) is Tier.DISK and layer.counters.admissions == 0
    for _ in range(3):
        touch(layer, 5)  # as used as the residents now: admitted on the third miss
    assert layer.tier_of(5) is Tier.GPU and layer.counters.admissions == 1


def test_lrfu_decays_by_half_life_and_spans_lru_to_lfu() -> None:
    p = LRFUPolicy(half_life=4)
    p.record(3, 0)
    assert p.score(3, 0) == pytest.approx(1.0)
    assert p.score(3, 4) == pytest.approx(0.5)
    p.record(3, 4)
    assert p.score(3, 4) == pytest.approx(1.5)
    assert p.score(3, 12) == pytest.approx(1.5 / 4)
    assert p.score(7, 12) == 0.0

    def victim(half_life: float) -> int | None:
        policy = LRFUPolicy(half_life=half_life)
        for t in range(1, 6):  # expert 0: five uses, earlier
            policy.record(0, t)
        policy.record(1, 10)  # expert 1: one use, later
        policy.insert(0, 10)
        policy.insert(1, 10)
        return policy.victim(10)

    assert victim(0.5) == 0  # short half-life: recency wins, like LRU
    assert victim(1e6) == 1  # long half-life: frequency wins, like LFU


# ---- one layer ----------------------------------------------------------------------------------
def test_lookup_dedups_counts_uses_and_maps_slots() -> None:
    layer = LayerResidency(8, 2, "lru", host_experts=[4, 5], initial=[3, 6])
    hits, misses = layer.lookup([3, 5, 3, 7, 5, 6])
    assert hits == {3: 0, 6: 1}
    assert misses == [5, 7]  # distinct, first-seen order
    c = layer.counters
    assert (c.lookups, c.hits, c.misses) == (4, 2, 2)
    assert c.uses == [0, 0, 0, 2, 0, 2, 1, 1]
    assert layer.now == 1
    assert [layer.tier_of(e) for e in (3, 4, 5, 7)] == [Tier.GPU, Tier.HOST, Tier.HOST, Tier.DISK]
    with pytest.raises(ValueError, match="outside"):
        layer.lookup([8])
    with pytest.raises(ValueError, match="outside"):
        layer.lookup([-1])


def test_admit_fills_free_slots_lowest_first_then_evicts() -> None:
    layer = LayerResidency(6, 3, "lru", initial=[2])
    assert layer.slot_table() == [-1, -1, 0, -1, -1, -1]
    assert layer.admit(4) == (1, None)
    assert layer.admit(4) == (1, None)  # already resident: nothing changes
    assert layer.admit(0) == (2, None)
    slot, evicted = layer.admit(5)
    assert evicted == 2 and slot == 0 and layer.tier_of(2) is Tier.DISK
    assert layer.counters.admissions == 3 and layer.counters.evictions == 1
    assert layer.evict(4) == 1 and layer.slot_of(4) is None
    assert layer.admit(1) == (1, None)  # the freed slot is reused before evicting anyone
    with pytest.raises(ValueError, match="not in a slot"):
        layer.evict(4)


def test_pinned_experts_are_never_evicted() -> None:
    layer = LayerResidency(16, 3, "lru", initial=[0, 1, 2], pinned=[0, 1])
    for e in range(3, 16):
        touch(layer, e)
        assert layer.slot_of(0) == 0 and layer.slot_of(1) == 1
    assert layer.counters.evictions == 13  # all through the one unpinned slot
    with pytest.raises(ValueError, match="pinned"):
        layer.evict(0)
    layer.pin(15)  # the last slot pinned too: nothing left to evict
    layer.lookup([4])
    assert not layer.should_admit(4)
    with pytest.raises(NoSlotError, match="3 slots, 3 pinned"):
        layer.admit(4)


def test_protected_experts_are_not_victims() -> None:
    layer = LayerResidency(8, 2, "lru", initial=[0, 1])
    layer.lookup([0, 5])  # 1 is the least recently used, but this step still reads it
    assert layer.should_admit(5, protect={1})
    assert layer.admit(5, protect={1}) == (0, 0)
    layer.lookup([1, 5, 6])
    assert not layer.should_admit(6, protect={1, 5})
    with pytest.raises(NoSlotError):
        layer.admit(6, protect={1, 5})
    assert layer.slot_of(1) == 1 and layer.slot_of(5) == 0


def test_an_admission_counts_as_a_use() -> None:
    # a prefetched expert (admitted before any lookup) is not the next victim
    layer = LayerResidency(8, 3, "lru", initial=[0, 1, 2])
    layer.lookup([0, 1, 2])
    layer.lookup([0, 1])
    assert layer.admit(7) == (2, 2)
    # 0, 1 and 7 now share the last tick: the earlier inserted go first (1 was placed as colder)
    assert [layer.admit(e)[1] for e in (6, 5, 4)] == [1, 0, 7]


def test_pin_admits_when_needed() -> None:
    layer = LayerResidency(8, 2, "lrfu", initial=[0, 1], pinned=[5])
    assert layer.slot_of(5) is not None and layer.pinned == {5}
    assert layer.tier_of(5) is Tier.GPU


def test_static_never_changes() -> None:
    layer = LayerResidency(8, 3, "static", host_experts=[3, 4], initial=[0, 1, 2])
    table = layer.slot_table()
    for step in range(50):
        hits, misses = touch(layer, step % 8, (step * 3) % 8)
        assert all(e not in (0, 1, 2) for e in misses)
    assert layer.slot_table() == table
    assert not layer.should_admit(5)
    with pytest.raises(NoSlotError):
        layer.admit(5)
    assert layer.counters.admissions == 0 and layer.counters.evictions == 0


def test_zero_slots_and_bad_arguments() -> None:
    layer = LayerResidency(4, 0, "lru", host_experts=[0, 1])
    hits, misses = layer.lookup([0, 2])
    assert hits == {} and misses == [0, 2] and not layer.should_admit(0)
    with pytest.raises(NoSlotError):
        layer.admit(0)
    with pytest.raises(ValueError, match="num_slots"):
        LayerResidency(4, 5)
    with pytest.raises(ValueError, match="distinct"):
        LayerResidency(4, 2, initial=[1, 1])
    with pytest.raises(ValueError, match="at most 1"):
        LayerResidency(4, 1, initial=[0, 1])
    with pytest.raises(ValueError, match="outside"):
        LayerResidency(4, 1, host_experts=[4])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_counters_add_up(policy: str) -> None:
    trace = routing_trace(steps=60, layers=3, experts=16, k=4, skew=1.0, seed=1)
    rmap = ResidencyMap(3, 16, 5, 4, policy=policy)
    lookups = [0, 0, 0]
    for step in trace:
        for i, (layer, ids) in enumerate(zip(rmap.layers, step, strict=True)):
            batch = ids + ids[:2]  # repeats within a step count as uses, not as lookups
            lookups[i] += len(set(batch))
            touch(layer, *batch)
    for i, layer in enumerate(rmap.layers):
        c = layer.counters
        assert c.lookups == lookups[i]
        assert c.hits + c.misses == c.lookups
        assert sum(c.uses) == 60 * 6
        resident = sum(1 for s in layer.slot_table() if s >= 0)
        assert resident == 5  # every slot stays filled; admissions beyond that evicted someone
        assert c.admissions == c.evictions
        assert sorted(s for s in layer.slot_table() if s >= 0) == [0, 1, 2, 3, 4]
    t = rmap.totals()
    assert t.lookups == sum(lookups) and t.hits + t.misses == t.lookups
    assert t.hits == sum(layer.counters.hits for layer in rmap.layers)
    assert t.hit_rate == pytest.approx(t.hits / t.lookups)
    rmap.reset_counters()
    assert rmap.totals().lookups == 0 and rmap.totals().hit_rate == 0.0


# ---- routing statistics -------------------------------------------------------------------------
def sample_stats() -> ExpertStats:
    stats = ExpertStats(2, 8, model="tiny-moe")
    stats.record(0, [5, 5, 5, 2, 2, 7, 1, 5, 2, 7])
    stats.record(1, [0, 0, 3])
    return stats


def test_stats_record_top_and_ranking() -> None:
    stats = sample_stats()
    assert stats.counts[0] == [0, 1, 3, 0, 0, 4, 0, 2]
    assert stats.top(0, 3) == [5, 2, 7]
    assert stats.ranking(0) == [5, 2, 7, 1, 0, 3, 4, 6]  # ties by expert id
    assert stats.top(1, 2) == [0, 3]
    assert stats.top(1, 0) == []
    with pytest.raises(ValueError, match="2 x 8"):
        ExpertStats(2, 8, counts=[[0] * 8])


def test_stats_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    stats = sample_stats()
    stats.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "spillover-expert-stats" and doc["version"] == 1
    assert (doc["num_layers"], doc["num_experts"]) == (2, 8)
    assert ExpertStats.load(path) == stats
    assert ExpertStats.load(str(path), num_layers=2, num_experts=8) == stats


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "spillover-expert-stats",
        "version": 1,
        "model": "m",
        "num_layers": 2,
        "num_experts": 3,
        "counts": [[1, 2, 3], [0, 0, 1]],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "unreadable"),
        (json.dumps([1, 2]), "not a spillover-expert-stats file"),
        (json.dumps(_doc(format="other")), "not a spillover-expert-stats file"),
        (json.dumps(_doc(version=2)), "schema version 2"),
        (json.dumps(_doc(num_layers=3)), "needs num_layers"),
        (json.dumps(_doc(num_experts=0)), "needs num_layers"),
        (json.dumps(_doc(num_experts="3")), "needs num_layers"),
        (json.dumps(_doc(counts=[[1, 2, 3], [0, 0]])), "needs num_layers"),
        (json.dumps(_doc(counts=[[1, 2, 3], [0, 0, -1]])), "ints >= 0"),
        (json.dumps(_doc(counts=[[1, 2, 3], [0, 0, 1.5]])), "ints >= 0"),
        (json.dumps(_doc(counts=[[1, 2, 3], [0, 0, True]])), "ints >= 0"),
    ],
)
def test_bad_stats_file_names_the_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        ExpertStats.load(path)
    assert str(path) in str(info.value)


def test_stats_file_for_another_model(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_doc()))
    assert ExpertStats.load(path, num_layers=2, num_experts=3).counts[0] == [1, 2, 3]
    for kwargs in ({"num_layers": 4}, {"num_experts": 8}):
        with pytest.raises(ValueError, match=r"made for 2 x 3") as info:
            ExpertStats.load(path, **kwargs)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="unreadable") as info:
        ExpertStats.load(tmp_path / "missing.json")
    assert "missing.json" in str(info.value)


# ---- all layers ---------------------------------------------------------------------------------
def test_initial_placement_from_stats() -> None:
    stats = sample_stats()
    rmap = ResidencyMap(2, 8, 2, 3, stats=stats, policy="lrfu", pin_per_layer=1)
    l0, l1 = rmap.layers
    assert [l0.slot_of(e) for e in (5, 2)] == [0, 1]  # hottest in slot order
    assert l0.host == frozenset({7, 1, 0})  # next hottest (ties by id)
    assert [l0.tier_of(e) for e in range(8)] == [
        Tier.HOST, Tier.HOST, Tier.GPU, Tier.DISK, Tier.DISK, Tier.GPU, Tier.DISK, Tier.HOST
    ]  # fmt: skip
    assert l0.pinned == {5} and l1.pinned == {0}
    assert l1.slot_of(0) == 0 and l1.slot_of(3) == 1 and l1.host == frozenset({1, 2, 4})


def test_initial_placement_without_stats_is_deterministic() -> None:
    rmap = ResidencyMap(3, 10, 4, 3, policy="lfu")
    for layer in rmap.layers:
        assert layer.slot_table() == [0, 1, 2, 3, -1, -1, -1, -1, -1, -1]
        assert layer.host == frozenset({4, 5, 6})
        assert layer.tier_of(9) is Tier.DISK and not layer.pinned
        assert isinstance(layer.policy, LFUPolicy)
    assert rmap.layers[0].policy is not rmap.layers[1].policy


def test_map_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit 8 experts"):
        ResidencyMap(2, 8, 5, 4)
    with pytest.raises(ValueError, match="do not fit"):
        ResidencyMap(2, 8, 2, 0, pin_per_layer=3)
    with pytest.raises(ValueError, match="expert stats are for 2 MoE layers x 8 experts"):
        ResidencyMap(3, 8, 2, 0, stats=sample_stats())


def test_summary_reports_hit_rates() -> None:
    rmap = ResidencyMap(2, 8, 2, 1, policy="lru")
    touch(rmap.layers[0], 0, 1, 2, 3)  # 2 of 4 hit
    touch(rmap.layers[1], 0)  # 1 of 1
    text = rmap.summary()
    assert "[lru]" in text and "2 layers x 8 experts" in text and "2 slots + 1 host" in text
    assert "hit rate 60.0 % (3/5)" in text
    assert "per layer: 0:50 1:100" in text


# ---- simulation ---------------------------------------------------------------------------------
def test_skewed_routing_hits_more_than_uniform() -> None:
    kw = {"steps": 300, "layers": 2, "experts": 32, "k": 4}
    skewed = routing_trace(skew=1.2, seed=2, **kw)
    uniform = routing_trace(skew=0.0, seed=2, **kw)
    rates = {}
    for policy in ("lfu", "static", "lrfu", "lru"):
        hot = simulate(skewed, 32, 8, policy, warmup_steps=50)
        flat = simulate(uniform, 32, 8, policy, warmup_steps=50)
        assert hot.lookups == flat.lookups == 250 * 2 * 4
        assert hot.hits + hot.misses == hot.lookups
        rates[policy] = (hot.hit_rate, flat.hit_rate)
    for policy in ("lfu", "static"):
        hot_rate, flat_rate = rates[policy]
        assert hot_rate > flat_rate + 0.25, (policy, rates)
        assert flat_rate < 0.4  # uniform routing: about slots / experts = 0.25
    # static places the hottest experts once and copies nothing
    assert simulate(skewed, 32, 8, "static").admissions == 0
    assert simulate(skewed, 32, 8, "lru").admissions > 0


def test_static_with_given_stats_uses_them() -> None:
    trace = [[[0, 1]], [[0, 1]], [[2, 3]]]
    good = ExpertStats(1, 8, [[5, 5, 0, 0, 0, 0, 0, 0]])
    bad = ExpertStats(1, 8, [[0, 0, 0, 0, 0, 0, 5, 5]])
    assert simulate(trace, 8, 2, "static", stats=good).hits == 4
    assert simulate(trace, 8, 2, "static", stats=bad).hits == 0
    assert simulate(trace, 8, 2, "static").hits == 4  # oracle: ranks by the trace itself
    with pytest.raises(ValueError, match="warmup_steps"):
        simulate(trace, 8, 2, warmup_steps=3)
