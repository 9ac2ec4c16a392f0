"""Residency bookkeeping for tiered experts: which experts of each MoE layer sit in GPU slots, in
pinned RAM or only on disk, and which slot a miss takes. No torch, so it is tested on the CPU; the
tiered ExpertBank turns its decisions into copies and slot maps. Time is a per-layer clock that
ticks once per `lookup`, so policies age by steps, and a simulation replays exactly like a run."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from spillover.offload.policies import (  # noqa: F401  (the policies' public home was here)
    POLICIES,
    LFUPolicy,
    LRFUPolicy,
    LRUPolicy,
    SlotPolicy,
    StaticPolicy,
    make_policy,
)


class Tier(StrEnum):
    GPU = "gpu"
    HOST = "host"
    DISK = "disk"


class NoSlotError(RuntimeError):
    """An admission found no free slot and nothing evictable (all pinned, static, or no slots)."""


@dataclass
class LayerCounters:
    """Since the last reset. A lookup is one distinct expert in one `lookup` call, so
    hits + misses == lookups; `uses[e]` counts every routed (token, expert) pair."""

    num_experts: int
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    admissions: int = 0
    evictions: int = 0
    uses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.uses = self.uses or [0] * self.num_experts

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class LayerResidency:
    """Where each expert of one MoE layer lives. `host_experts` have a pinned-RAM copy, all have
    one on disk (an eviction only frees the slot); `initial` (hottest first) fills slots 0.. ."""

    def __init__(self, num_experts: int, num_slots: int, policy: SlotPolicy | str = "lrfu",
                 host_experts: Iterable[int] = (), initial: Sequence[int] = (),
                 pinned: Iterable[int] = ()) -> None:
        if not 0 <= num_slots <= num_experts:
            raise ValueError(f"num_slots must be in [0, {num_experts}], got {num_slots}")
        self.num_experts, self.num_slots = num_experts, num_slots
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.host: frozenset[int] = frozenset(self._check(host_experts))
        self.pinned: set[int] = set()
        self.counters, self.now = LayerCounters(num_experts), 0
        self._slot_of: list[int | None] = [None] * num_experts
        initial = self._check(initial)
        if len(set(initial)) != len(initial) or len(initial) > num_slots:
            raise ValueError(f"initial experts must be distinct and at most {num_slots}")
        self._free = list(range(num_slots - 1, len(initial) - 1, -1))  # pop() gives the lowest
        for slot in reversed(range(len(initial))):  # coldest inserted first: evicted first
            self._place(initial[slot], slot)
        for e in self._check(pinned):
            self.pin(e)

    def _check(self, experts: Iterable[int]) -> list[int]:
        out = list(experts)
        if out and not 0 <= min(out) <= max(out) < self.num_experts:
            raise ValueError(f"expert ids {min(out)}..{max(out)} outside [0, {self.num_experts})")
        return out

    def _place(self, expert: int, slot: int) -> None:
        self._slot_of[expert] = slot
        self.policy.insert(expert, self.now)

    def slot_of(self, expert: int) -> int | None:
        return self._slot_of[self._check([expert])[0]]

    def slot_table(self) -> list[int]:
        """expert -> slot, -1 where not resident: the slot map the GPU kernels read."""
        return [-1 if s is None else s for s in self._slot_of]

    def tier_of(self, expert: int) -> Tier:
        """The fastest tier holding the expert."""
        if self.slot_of(expert) is not None:
            return Tier.GPU
        return Tier.HOST if expert in self.host else Tier.DISK

    def lookup(self, expert_ids: Sequence[int]) -> tuple[dict[int, int], list[int]]:
        """One pass through the layer: (resident expert -> slot, non-resident experts), each
        distinct expert once, in first-seen order. Counts uses and ticks the clock."""
        self.now, c, ids = self.now + 1, self.counters, self._check(expert_ids)
        for e in ids:
            c.uses[e] += 1
        distinct = list(dict.fromkeys(ids))
        for e in distinct:
            self.policy.record(e, self.now)
        hits = {e: s for e in distinct if (s := self._slot_of[e]) is not None}
        misses = [e for e in distinct if e not in hits]
        c.lookups, c.hits = c.lookups + len(distinct), c.hits + len(hits)
        c.misses += len(misses)
        return hits, misses

    def should_admit(self, expert: int, protect: Collection[int] = ()) -> bool:
        """The policy's advice for a miss: copy it into a slot (True) or serve it where it is.
        `protect`: experts the current step still reads from their slots (never victims)."""
        if self.slot_of(expert) is not None or not self.policy.dynamic:
            return False
        if self._free:
            return True
        victim = self.policy.victim(self.now, protect)
        return victim is not None and self.policy.should_admit(expert, victim, self.now)

    def admit(self, expert: int, protect: Collection[int] = ()) -> tuple[int, int | None]:
        """Give `expert` a slot: (slot, evicted expert or None). Takes a free slot first, else
        evicts the policy's victim; raises NoSlotError when nothing can be evicted."""
        slot = self.slot_of(expert)
        if slot is not None:
            return slot, None
        victim = None if self._free else self.policy.victim(self.now, protect)
        if victim is not None:
            self.evict(victim)
        elif not self._free:
            raise NoSlotError(f"no slot for expert {expert}: {self.num_slots} slots, "
                              f"{len(self.pinned)} pinned, policy {self.policy.name}")
        slot = self._free.pop()
        self._place(expert, slot)
        self.counters.admissions += 1
        return slot, victim

    def evict(self, expert: int) -> int:
        """Drop `expert` from its slot (the bank reclaiming it); returns the freed slot."""
        if (slot := self.slot_of(expert)) is None or expert in self.pinned:
            raise ValueError(f"expert {expert} is {'not in a slot' if slot is None else 'pinned'}")
        self.policy.remove(expert)
        self._slot_of[expert] = None
        self._free.append(slot)
        self.counters.evictions += 1
        return slot

    def pin(self, expert: int) -> int:
        """Keep `expert` in a slot for good (admitting it if needed); returns its slot."""
        slot, _ = self.admit(expert)
        self.policy.remove(expert)
        self.pinned.add(expert)
        return slot


STATS_FORMAT, STATS_VERSION = "spillover-expert-stats", 1


@dataclass
class ExpertStats:
    """Routed-token counts per MoE layer (by MoE-layer ordinal) and expert: `spillover profile`
    writes them; `--expert-stats FILE` places and pins the hottest experts from them."""

    num_layers: int
    num_experts: int
    counts: list[list[int]] = field(default_factory=list)
    model: str = ""

    def __post_init__(self) -> None:
        self.counts = self.counts or [[0] * self.num_experts for _ in range(self.num_layers)]
        if [len(row) for row in self.counts] != [self.num_experts] * self.num_layers:
            raise ValueError(f"counts must be {self.num_layers} x {self.num_experts}")

    def record(self, layer: int, expert_ids: Iterable[int]) -> None:
        for e in expert_ids:
            self.counts[layer][e] += 1

    def ranking(self, layer: int) -> list[int]:
        """All experts of the layer, hottest first; ties by expert id (deterministic)."""
        return sorted(range(self.num_experts), key=lambda e: (-self.counts[layer][e], e))

    def top(self, layer: int, n: int) -> list[int]:
        return self.ranking(layer)[: max(n, 0)]

    def save(self, path: str | Path) -> None:
        doc = {"format": STATS_FORMAT, "version": STATS_VERSION, **asdict(self)}
        Path(path).write_text(json.dumps(doc) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None,
             num_experts: int | None = None) -> ExpertStats:
        """Reads a file `save` wrote; given num_layers/num_experts, checks it fits the model."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise ValueError(f"expert stats file {path}: unreadable ({exc})") from exc
        d: Any = doc if isinstance(doc, dict) else {}
        version, layers, experts = d.get("version"), d.get("num_layers"), d.get("num_experts")
        counts = d.get("counts")
        dims = type(layers) is int and type(experts) is int and layers > 0 and experts > 0
        grid = dims and isinstance(counts, list) and len(counts) == layers and all(
            isinstance(r, list) and len(r) == experts and all(type(c) is int and c >= 0 for c in r)
            for r in counts
        )
        checks = [
            (d.get("format") == STATS_FORMAT, f"not a {STATS_FORMAT} file (`spillover profile`)"),
            (version == STATS_VERSION, f"schema version {version!r}, not {STATS_VERSION}"),
            (grid, f"needs num_layers ({layers}) x num_experts ({experts}) counts, all ints >= 0"),
            (num_layers in (None, layers) and num_experts in (None, experts), f"made for "
             f"{layers} x {experts} (MoE layers x experts); model: {num_layers} x {num_experts}"),
        ]
        for ok, why in checks:
            if not ok:
                raise ValueError(f"expert stats file {path}: {why}")
        return cls(layers, experts, counts, str(d.get("model", "")))


class PlanLike(Protocol):
    """What placement reads of plan.memory.MemoryPlan (not imported: the plan pulls in more)."""

    num_experts: int
    expert_slots_per_layer: int
    host_experts_per_layer: int


class ResidencyMap:
    """Every MoE layer's residency. Initial placement: with stats, each layer's hottest experts
    take the GPU slots, the next hottest the host RAM, the rest stay on disk; without, experts
    0..S-1 take the slots and S..S+H-1 the host. The first `pin_per_layer` slotted are pinned."""

    def __init__(self, num_layers: int, num_experts: int, slots_per_layer: int,
                 host_experts_per_layer: int, stats: ExpertStats | None = None,
                 policy: str = "lrfu", pin_per_layer: int = 0, **policy_options: Any) -> None:
        s, h, n = slots_per_layer, host_experts_per_layer, pin_per_layer
        if s < 0 or h < 0 or s + h > num_experts or not 0 <= n <= s:
            raise ValueError(f"{s} slots ({n} pinned) + {h} host do not fit {num_experts} experts")
        shape = (num_layers, num_experts)
        if stats is not None and (stats.num_layers, stats.num_experts) != shape:
            raise ValueError(f"expert stats are for {stats.num_layers} MoE layers x "
                             f"{stats.num_experts} experts, the model has {shape[0]} x {shape[1]}")
        self.policy_name, self.num_experts = policy, num_experts
        self.layers: list[LayerResidency] = []
        for i in range(num_layers):
            order = stats.ranking(i) if stats is not None else list(range(num_experts))
            pol, host = make_policy(policy, **policy_options), order[s : s + h]
            self.layers.append(LayerResidency(num_experts, s, pol, host, order[:s], order[:n]))

    def totals(self) -> LayerCounters:
        """All layers' counters summed (`uses` stays zero: expert ids differ per layer)."""
        t = LayerCounters(self.num_experts)
        for c in (layer.counters for layer in self.layers):
            for k in ("lookups", "hits", "misses", "admissions", "evictions"):
                setattr(t, k, getattr(t, k) + getattr(c, k))
        return t

    def reset_counters(self) -> None:
        for layer in self.layers:
            layer.counters = LayerCounters(self.num_experts)

    def summary(self) -> str:
        """Hit rate overall and per layer (in %), for the engine's log."""
        t, n, first = self.totals(), len(self.layers), self.layers[:1]
        shape = f"{first[0].num_slots} slots + {len(first[0].host)} host" if first else "-"
        per = " ".join(f"{i}:{100 * l.counters.hit_rate:.0f}" for i, l in enumerate(self.layers))
        return (f"residency [{self.policy_name}] {n} layers x {self.num_experts} experts, {shape} "
                f"per layer: hit rate {100 * t.hit_rate:.1f} % ({t.hits}/{t.lookups}), "
                f"{t.admissions} admitted, {t.evictions} evicted; per layer: {per}")


def simulate(trace: Sequence[Sequence[Sequence[int]]], num_experts: int, num_slots: int,
             policy: str = "lrfu", stats: ExpertStats | None = None, warmup_steps: int = 0,
             **policy_options: Any) -> LayerCounters:
    """Replays a routing trace (step -> MoE layer -> expert ids), admitting the misses the policy
    asks for; returns all layers' counters from `warmup_steps` on (`.admissions` are copies). Static
    without `stats` ranks experts by the trace itself: an oracle, the best static placement."""
    if not 0 <= warmup_steps < len(trace):
        raise ValueError(f"warmup_steps must be in [0, {len(trace)}), got {warmup_steps}")
    num_layers = len(trace[0])
    if stats is None and policy == "static":
        stats = ExpertStats(num_layers, num_experts)
        for i, ids in (layer_ids for step in trace for layer_ids in enumerate(step)):
            stats.record(i, ids)
    rmap = ResidencyMap(num_layers, num_experts, num_slots, 0, stats, policy, **policy_options)
    for n, step in enumerate(trace):
        if n == warmup_steps:
            rmap.reset_counters()
        for layer, ids in zip(rmap.layers, step, strict=True):
            for e in layer.lookup(ids)[1]:
                if layer.should_admit(e):
                    layer.admit(e)
    return rmap.totals()
