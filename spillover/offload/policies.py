"""Slot policies of the tiered experts: which resident expert gives its slot to a miss. No torch.

A victim is the evictable resident with the lowest score, then the oldest last use, then the
first inserted. Scores decay with time, but each policy's score keeps its order between experts
as time passes (LRU: the tick of the last use; LFU: counts halved together; LRFU: a common decay
factor), so each policy gives a time-invariant `rank` with the same order, and a heap keyed by it
finds the victim in O(log n) instead of scoring every slot at every miss (the host's cost in a
tiered decode step grows with the slots otherwise). Entries go stale when an expert is used again
or leaves; stale ones are skipped when popped and the heap is rebuilt when they pile up.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection
from typing import Any

Entry = tuple[float, int, int, int, int]  # (rank, last use, insertion, version, expert)


class SlotPolicy:
    """LRU: the score is the tick of the last use. A miss is admitted when it scores at least as
    high as the victim, so one-off experts do not flush hot ones. Pinned experts are never
    inserted, so never evicted."""

    name = "?"
    dynamic = True  # False: slots never change after the initial placement

    def __init__(self) -> None:
        self._resident: dict[int, int] = {}  # evictable expert -> its insertion number
        self._last: dict[int, int] = {}  # expert -> tick of its last use
        self._version: dict[int, int] = {}
        self._heap: list[Entry] = []
        self._inserted = 0

    def score(self, expert: int, now: int) -> float:
        return self._last.get(expert, -1)

    def rank(self, expert: int) -> float:
        """Orders experts as `score(., now)` does, at every `now`."""
        return self._last.get(expert, -1)

    def record(self, expert: int, now: int) -> None:
        """One use of `expert` at tick `now`, resident or not (frequency must see misses too)."""
        self._last[expert] = now
        self._touch(expert)

    def insert(self, expert: int, now: int) -> None:
        if self.dynamic:  # static: nothing is ever evictable; taking a slot counts as a use
            if expert not in self._resident:
                self._resident[expert], self._inserted = self._inserted, self._inserted + 1
            self._last[expert] = max(self._last.get(expert, -1), now)
            self._touch(expert)

    def remove(self, expert: int) -> None:
        self._resident.pop(expert, None)

    def victim(self, now: int, protect: Collection[int] = ()) -> int | None:
        """Lowest score, then oldest use, then first inserted; never one of `protect` (experts
        the current step still reads from their slots)."""
        skipped: list[Entry] = []
        found = None
        while self._heap:
            entry = self._heap[0]
            expert = entry[4]
            if self._resident.get(expert) != entry[2] or self._version[expert] != entry[3]:
                heapq.heappop(self._heap)  # stale: used again since, or left its slot
            elif expert in protect:
                skipped.append(heapq.heappop(self._heap))
            else:
                found = expert
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def should_admit(self, expert: int, victim: int, now: int) -> bool:
        return self.score(expert, now) >= self.score(victim, now)

    def _touch(self, expert: int) -> None:
        """A resident's rank may have changed: push its new entry (the old one goes stale)."""
        if expert not in self._resident:
            return
        version = self._version.get(expert, 0) + 1
        self._version[expert] = version
        heapq.heappush(self._heap, (self.rank(expert), self._last.get(expert, -1),
                                    self._resident[expert], version, expert))
        if len(self._heap) > 4 * len(self._resident) + 64:
            self._heap = [e for e in self._heap
                          if self._resident.get(e[4]) == e[2] and self._version[e[4]] == e[3]]
            heapq.heapify(self._heap)


class LRUPolicy(SlotPolicy):
    """Least recently used goes first (every miss is admitted: it was just used)."""

    name = "lru"


class LFUPolicy(SlotPolicy):
    """Least frequently used, with aging: every `age_every` ticks all counts halve, so experts
    hot for an earlier prompt stop holding slots when traffic moves on (plain LFU never lets go)."""

    name = "lfu"

    def __init__(self, age_every: int = 256) -> None:
        super().__init__()
        if age_every < 1:
            raise ValueError(f"LFU age_every must be >= 1 tick, got {age_every}")
        self.age_every, self._aged_at, self._halvings = age_every, 0, 0
        self._count: dict[int, float] = {}

    def score(self, expert: int, now: int) -> float:
        halvings = (now - self._aged_at) // self.age_every
        if halvings > 0:
            self._aged_at += halvings * self.age_every
            self._halvings += halvings
            self._count = {e: c * 0.5**halvings for e, c in self._count.items()}
        return self._count.get(expert, 0.0)

    def rank(self, expert: int) -> float:
        # the count before every halving so far: halvings scale all counts alike
        c = self._count.get(expert, 0.0)
        return math.log2(c) + self._halvings if c > 0 else -math.inf

    def record(self, expert: int, now: int) -> None:
        self._count[expert] = self.score(expert, now) + 1.0
        super().record(expert, now)


class LRFUPolicy(SlotPolicy):
    """LRFU (Lee et al., IEEE Trans. Computers 2001): score = sum over past uses of 2^(-age /
    half_life). The default because MoE routing has both a lasting popularity skew (frequency) and
    drift with the prompt's topic (recency), and LRFU spans the two with one knob: a short half-life
    acts like LRU, a long one like LFU. O(1) per use (new = 1 + decayed old)."""

    name = "lrfu"

    def __init__(self, half_life: float = 64.0) -> None:
        super().__init__()
        if not half_life > 0:
            raise ValueError(f"LRFU half_life must be > 0 ticks, got {half_life}")
        self.half_life = float(half_life)
        self._crf: dict[int, tuple[float, int]] = {}  # expert -> (score, tick it was computed at)

    def score(self, expert: int, now: int) -> float:
        c, t = self._crf.get(expert, (0.0, now))
        return c * 2.0 ** ((t - now) / self.half_life)

    def rank(self, expert: int) -> float:
        # log2 of the score at tick 0: every score decays by the same factor
        c, t = self._crf.get(expert, (0.0, 0))
        return math.log2(c) + t / self.half_life if c > 0 else -math.inf

    def record(self, expert: int, now: int) -> None:
        self._crf[expert] = (1.0 + self.score(expert, now), now)
        super().record(expert, now)


class StaticPolicy(SlotPolicy):
    """Slots are filled once (hottest experts from routing statistics, else 0..S-1) and never
    change; misses are served where the expert lives (CPU compute or streaming)."""

    name, dynamic = "static", False


POLICIES = {p.name: p for p in (LRUPolicy, LFUPolicy, LRFUPolicy, StaticPolicy)}


def make_policy(name: str, **options: Any) -> SlotPolicy:
    """A fresh policy by name, one per layer (policies hold per-layer state)."""
    cls = POLICIES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown slot policy {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(**options)
