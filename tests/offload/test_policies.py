"""The slot policies' heap finds the victim the definition names: the evictable resident with the
lowest score now, then the oldest use, then the first inserted (checked against scoring every
resident, over random traces with re-insertions, protected experts and LFU aging)."""

from __future__ import annotations

import random

import pytest

from spillover.offload.policies import LFUPolicy, LRFUPolicy, LRUPolicy, SlotPolicy


def brute_victim(p: SlotPolicy, now: int, protect: set[int]) -> int | None:
    order = list(p._resident)  # insertion order
    cands = [e for e in order if e not in protect]
    if not cands:
        return None
    return min(cands, key=lambda e: (p.score(e, now), p._last.get(e, -1), order.index(e)))


@pytest.mark.parametrize("make", [LRUPolicy, lambda: LFUPolicy(age_every=7),
                                  lambda: LRFUPolicy(half_life=5.0)])
@pytest.mark.parametrize("seed", range(4))
def test_heap_victim_equals_scoring_every_resident(make, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    p: SlotPolicy = make()
    resident: set[int] = set()
    for now in range(1, 400):
        for e in rng.sample(range(40), rng.randint(1, 6)):
            p.record(e, now)
        if rng.random() < 0.5:
            e = rng.randrange(40)
            p.insert(e, now)
            resident.add(e)
        if resident and rng.random() < 0.2:
            e = rng.choice(sorted(resident))
            p.remove(e)
            resident.discard(e)
        protect = set(rng.sample(sorted(resident), min(len(resident), rng.randint(0, 3))))
        want = brute_victim(p, now, protect)
        assert p.victim(now, protect) == want
        if want is not None and rng.random() < 0.5:  # evict it, as an admission would
            p.remove(want)
            resident.discard(want)


def test_heap_stays_bounded() -> None:
    p = LRUPolicy()
    for e in range(10):
        p.insert(e, 0)
    for now in range(1, 5000):
        p.record(now % 10, now)
    assert len(p._heap) <= 4 * 10 + 64
