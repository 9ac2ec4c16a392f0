"""TieredExpertBank: one MoE layer's experts over three tiers, behind the ExpertBank protocol.

- GPU slots: `num_slots` experts stacked in one format on the compute device, in the kernels'
  layout; hits run through `grouped_experts` with expert ids mapped to slots by a device table
  (a miss maps to slot 0 with weight 0, so the hit pass has static shapes and no sync).
- Host RAM: experts with a (pinned) copy in RAM, stacked in one format in the storage layout;
  a miss there is computed by the CPU or copied into a slot.
- Disk: the rest, read from the store when routed (`ExpertSource`).

The bank asks the host once per layer which experts were routed (the one sync of a tiered
layer; a layer whose experts all sit in slots never needs it: see `all_resident`, nor one
whose misses are mapped: `spillover.offload.mapped`). Which miss
goes where is `MissRouter`'s decision; which expert keeps a slot is the residency policy's.
The function computed equals the resident bank's: tests hold the two equal, tier by tier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from spillover.offload.experts import grouped_experts
from spillover.offload.mapped import MAPPED_MAX_ROWS, MappedMisses
from spillover.offload.misses import MissRouter
from spillover.offload.residency import LayerResidency, NoSlotError, Tier
from spillover.offload.streaming import LayerStreaming
from spillover.offload.transfer import Staging, TierStats

log = logging.getLogger("spillover.offload")


class ExpertSource(Protocol):
    """Experts read from the store on disk: (w13, w2) stacked formats of `experts`, in order."""

    def load(self, layer: int, experts: Sequence[int]) -> tuple[Any, Any]: ...


class TieredExpertBank(LayerStreaming, nn.Module):
    def __init__(
        self,
        layer: int,
        residency: LayerResidency,
        slots: tuple[Any, Any] | None,
        host: tuple[Any, Any] | None,
        host_experts: Sequence[int],
        source: ExpertSource | None,
        device: torch.device,
        router: MissRouter | None = None,
        staging: Staging | None = None,
        stream_prefix: int | None = None,
        mapped: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = residency.num_experts
        self.residency = residency
        self.slots = slots  # (w13, w2) with residency.num_slots experts on `device`
        self.host = host  # (w13, w2) of `host_experts`, in (pinned) RAM, storage layout
        self.host_row = {e: i for i, e in enumerate(host_experts)}
        self.host_map = self._index(host_experts)  # expert -> host row, -1 elsewhere (on the CPU)
        # Host rows 0..stream_prefix-1 (the experts outside the slots at placement) are what a
        # prefill stages in one copy; later rows hold RAM copies of slot experts.
        self.stream_prefix = len(host_experts) if stream_prefix is None else stream_prefix
        if not 0 <= self.stream_prefix <= len(host_experts):
            raise ValueError(f"stream prefix {self.stream_prefix} outside the {len(host_experts)} "
                             "host rows")
        self.source = source
        self.device = device
        self.router = router or MissRouter()
        self.staging = staging or Staging(device)
        # The next MoE layer (prefetch target), kept out of the module tree.
        self._next: list[TieredExpertBank] = []
        self._staged: tuple[Any, Any, torch.cuda.Event | None] | None = None
        # Host-to-device copies timed on the copy stream (start, end, bytes), folded into
        # tier_stats by `settle` once they have run: a host clock would time only the launch.
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self.tier_stats = TierStats()
        stack = slots or host
        self._expert_bytes = (sum(f.nbytes for f in stack) // max(stack[0].num_experts, 1)
                              if stack is not None else 0)
        table = torch.tensor(residency.slot_table(), dtype=torch.int64)
        self.slot_map: torch.Tensor
        self.register_buffer("slot_map", table.to(device), persistent=False)
        # RAM experts read across the link by the decode kernels (`host` in their layout, pinned)
        self.mapped = MappedMisses(residency, host_experts, device) if mapped else None

    def settle(self, wait: bool = False) -> None:
        """Fold finished timed copies into tier_stats (copy_s is GPU time, copy_bytes their bytes);
        wait=True first waits for all of them (benchmarks, before reading the stats), and folds
        the mapped passes' routing counts into the residency counters."""
        if wait and self.mapped is not None:
            self.tier_stats.mapped_bytes += self.mapped.settle() * self._expert_bytes
        keep = []
        for start, end, nbytes in self._timed:
            if wait:
                end.synchronize()
            if end.query():
                seconds = start.elapsed_time(end) / 1e3
                self.tier_stats.copy_s += seconds
                self.tier_stats.copy_bytes += nbytes
                self.router.observe_copy(seconds, nbytes)
            else:
                keep.append((start, end, nbytes))
        self._timed = keep

    def _index(self, experts: Sequence[int], rows: Sequence[int] | None = None) -> torch.Tensor:
        """A CPU table expert -> row of a stack holding `experts` (rows 0.. unless given), -1 for
        every other expert and for the id past them: how routed ids become indices into a
        subset's stack."""
        table = torch.full((self.num_experts + 1,), -1, dtype=torch.int64)
        if experts:
            table[torch.tensor(list(experts), dtype=torch.int64)] = (
                torch.arange(len(experts)) if rows is None
                else torch.tensor(list(rows), dtype=torch.int64))
        return table

    def append_expert(self, w13: Any, w2: Any) -> bool:
        """One more expert after the routed ones (a shared expert: id num_experts), held in a slot
        of its own; only for mapped misses, where no step looks an id up on the host."""
        joined = (None if self.mapped is None or self.slots is None
                  else self.mapped.append(self.slots, self.slot_map, w13, w2))
        if joined is None:
            return False
        self.slots, self.slot_map = joined
        return True

    @property
    def all_resident(self) -> bool:
        """Every expert has a slot: the layer needs no host decision (a CUDA graph keeps it)."""
        return self.residency.num_slots == self.num_experts

    # the ExpertBank protocol's: whether a step must read the routing on the host
    host_decides = property(lambda self: not self.all_resident and self.mapped is None)

    # ---- the ExpertBank protocol --------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if self.all_resident:
            assert self.slots is not None
            return grouped_experts(hidden, self.slot_map[topk_ids], topk_weights, *self.slots)
        if (self.mapped is not None
                and topk_ids.numel() <= min(MAPPED_MAX_ROWS, self.router.stream_rows)):
            assert self.host is not None
            return self.mapped.forward(hidden, topk_ids, topk_weights, self.slot_map, self.slots,
                                       self.host)
        self.tier_stats.steps += 1
        if self._timed:
            self.settle()
        streaming = topk_ids.numel() > self.router.stream_rows or self.mapped is not None
        if streaming and self._next:
            self._next[0].prefetch()  # its copy overlaps this layer's compute
        ids_host = topk_ids.to("cpu")  # the tiered layer's one sync: misses are the host's call
        # (an id past the experts is a shared expert held in a slot: never looked up)
        hits, misses = self.residency.lookup(
            [e for e in ids_host.flatten().tolist() if e < self.num_experts])
        on_cpu: list[int] = []
        staged: list[int] = []
        if misses and not streaming:
            on_cpu = self._admit(misses, set(hits))
            if on_cpu and self.router.mode == "auto" and self.router.copy_is_faster():
                staged, on_cpu = on_cpu, []  # no slot for them this step: copied, not cached
        # The rows the CPU computes leave before the device's queue grows (the copy would wait).
        cpu_in = self._cpu_inputs(hidden, ids_host, topk_weights, on_cpu) if on_cpu else None
        out = self._slot_pass(hidden, topk_ids, topk_weights) if self.slots else None
        if misses and streaming:
            part = self._stream_pass(hidden, topk_ids, topk_weights, misses)
            out = part if out is None else out + part
        if streaming:
            self.release_staged()
        if staged:
            part = self._copy_pass(hidden, topk_ids, topk_weights, staged)
            out = part if out is None else out + part
        if cpu_in is not None:
            part = self._cpu_pass(hidden, on_cpu, *cpu_in)
            out = part if out is None else out + part
        return out if out is not None else torch.zeros_like(hidden)

    # ---- hits --------------------------------------------------------------------------------
    def _slot_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
        assert self.slots is not None  # misses map to slot -1: rows no slot kernel reads
        return grouped_experts(hidden, self.slot_map[topk_ids], topk_weights, *self.slots,
                               sparse=True)

    # ---- misses ------------------------------------------------------------------------------
    def _admit(self, misses: list[int], protect: set[int]) -> list[int]:
        """Copy the misses the router and policy admit into slots; returns those left for the
        CPU. Experts this step reads from slots (`protect`, growing as misses are admitted) are
        never evicted. A disk expert that is not admitted is read into RAM for this step only."""
        if not misses:
            return []
        mode = self.router.mode
        admitted: list[tuple[int, int]] = []
        left: list[int] = []
        for e in misses:
            want = mode == "copy" or (mode == "auto" and (
                self.residency.should_admit(e, protect) or self.router.copy_is_faster()))
            if want and self.slots is not None and self.residency.num_slots:
                try:
                    slot, _ = self.residency.admit(e, protect)
                except NoSlotError:
                    left.append(e)
                    continue
                protect.add(e)
                admitted.append((e, slot))
            else:
                left.append(e)
        if admitted:
            self._fill_slots(admitted)
        return left

    def _gather_host(self, experts: Sequence[int]) -> tuple[Any, Any]:
        """(w13, w2) of `experts` in RAM: host rows, plus a read from disk for the others."""
        in_ram = [e for e in experts if e in self.host_row]
        on_disk = [e for e in experts if e not in self.host_row]
        if not on_disk:
            assert self.host is not None
            rows = [self.host_row[e] for e in experts]
            return self.host[0].take_experts(rows), self.host[1].take_experts(rows)
        disk13, disk2 = self._read_disk(on_disk)
        if not in_ram:
            return disk13, disk2
        # Join RAM rows and disk rows in the order asked: take from a concatenated index space.
        assert self.host is not None
        ram13 = self.host[0].take_experts([self.host_row[e] for e in in_ram])
        ram2 = self.host[1].take_experts([self.host_row[e] for e in in_ram])
        pos = {e: i for i, e in enumerate(in_ram)}
        pos.update({e: len(in_ram) + i for i, e in enumerate(on_disk)})
        order = [pos[e] for e in experts]
        both13 = type(ram13).concat([ram13, disk13], dim=0)
        both2 = type(ram2).concat([ram2, disk2], dim=0)
        return both13.take_experts(order), both2.take_experts(order)

    def _fill_slots(self, admitted: list[tuple[int, int]]) -> None:
        """Copy admitted experts into their slots on the copy stream: an expert with a RAM row
        goes straight from its pinned row (one asynchronous copy per part), the others (disk)
        are gathered first."""
        assert self.slots is not None
        pieces: list[tuple[list[int], Any, Any]] = []
        in_ram = [(e, s) for e, s in admitted if e in self.host_row]
        elsewhere = [(e, s) for e, s in admitted if e not in self.host_row]
        if in_ram:
            assert self.host is not None
            for e, s in in_ram:
                r = self.host_row[e]
                pieces.append(([s], self.host[0].expert_range(r, r + 1),
                               self.host[1].expert_range(r, r + 1)))
        if elsewhere:
            w13, w2 = self._gather_host([e for e, _ in elsewhere])
            pieces.append(([s for _, s in elsewhere], w13, w2))
        nbytes = sum(w13.nbytes + w2.nbytes for _, w13, w2 in pieces)
        stream = self.staging.stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for slots, w13, w2 in pieces:
                    self.slots[0].put_experts_(slots, w13.to(self.device, non_blocking=True))
                    self.slots[1].put_experts_(slots, w2.to(self.device, non_blocking=True))
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._timed.append((start, end, nbytes))
        else:  # the CPU as the compute device: slots in RAM (tests, machines without a GPU)
            t0 = time.perf_counter()
            for slots, w13, w2 in pieces:
                self.slots[0].put_experts_(slots, w13.to(self.device))
                self.slots[1].put_experts_(slots, w2.to(self.device))
            seconds = time.perf_counter() - t0
            self.tier_stats.copy_s += seconds
            self.tier_stats.copy_bytes += nbytes
            self.router.observe_copy(seconds, nbytes)
        self.tier_stats.copied_experts += len(admitted)
        table = torch.tensor(self.residency.slot_table(), dtype=torch.int64)
        self.slot_map.copy_(table, non_blocking=False)

    def _cpu_inputs(self, hidden: torch.Tensor, ids_host: torch.Tensor,
                    topk_weights: torch.Tensor, experts: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, their hidden states, local ids, weights) on the host for the CPU's experts."""
        mapped = self._index(experts)[ids_host]
        rows = (mapped >= 0).any(dim=1).nonzero().squeeze(1)
        dev_rows = rows.to(hidden.device)
        h = hidden[dev_rows].to("cpu")
        w = topk_weights[dev_rows].to("cpu")
        return rows, h, mapped[rows], w

    def _cpu_pass(self, hidden: torch.Tensor, experts: list[int], rows: torch.Tensor,
                  h: torch.Tensor, mapped: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The rows routed to `experts`, computed by the CPU: RAM experts straight from the host
        stack (whose CPU kernels keep their packing between steps), disk experts read for this
        step. The partial sum goes back to the device once."""
        t0 = time.perf_counter()
        ids = torch.tensor(experts, dtype=torch.int64)[mapped.clamp(min=0)]
        part = torch.zeros_like(h)
        in_ram = self.host_map[ids]
        ram = (mapped >= 0) & (in_ram >= 0)
        if bool(ram.any()):
            assert self.host is not None
            part += grouped_experts(h, in_ram.clamp(min=0), torch.where(ram, w, 0.0), *self.host)
        disk = (mapped >= 0) & (in_ram < 0)
        if bool(disk.any()):
            on_disk = sorted({int(e) for e in ids[disk].tolist()})
            d13, d2 = self._read_disk(on_disk)
            local = self._index(on_disk)[ids]
            part += grouped_experts(h, local.clamp(min=0), torch.where(disk, w, 0.0), d13, d2)
        out = torch.zeros_like(hidden)
        out[rows.to(hidden.device)] = part.to(hidden.device, non_blocking=True)
        seconds = time.perf_counter() - t0
        self.tier_stats.cpu_s += seconds
        self.tier_stats.cpu_experts += len(experts)
        self.router.observe_cpu(seconds, self._expert_bytes * len(experts))
        return out

    def _read_disk(self, experts: list[int]) -> tuple[Any, Any]:
        if self.source is None:
            raise RuntimeError(f"MoE layer {self.layer}: experts {experts} are on no tier "
                               "(no store to read them from)")
        t0 = time.perf_counter()
        pair = self.source.load(self.layer, experts)
        self.tier_stats.disk_s += time.perf_counter() - t0
        self.tier_stats.disk_experts += len(experts)
        return pair

    def _copy_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """`experts` gathered (RAM rows, disk reads), copied to the device for this step only
        (no slot taken) and run there."""
        w13, w2 = self._gather_host(experts)
        t0 = time.perf_counter()
        d13, d2 = w13.to(self.device), w2.to(self.device)  # pageable: returns when copied
        self.tier_stats.disk_copy_s += time.perf_counter() - t0
        self.tier_stats.staged_experts += len(experts)
        return self._local_pass(hidden, topk_ids, topk_weights, experts, d13, d2,
                                list(range(len(experts))))

    def _local_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    experts: list[int], w13: Any, w2: Any, rows: list[int]) -> torch.Tensor:
        """The rows routed to `experts`, which sit at `rows` of the device stacks (w13, w2)."""
        mapped = self._index(experts, rows).to(hidden.device, non_blocking=True)[topk_ids]
        return grouped_experts(hidden, mapped, topk_weights, w13, w2, sparse=True)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of this layer's experts held per tier ("gpu" slots, "host" RAM), as allocated."""
        out = {"gpu": 0, "host": 0}
        if self.slots is not None:
            tier = "gpu" if self.device.type == "cuda" else "host"
            out[tier] += sum(f.nbytes for f in self.slots)
        if self.host is not None:
            out["host"] += sum(f.nbytes for f in self.host)
        return out

    def tier_counts(self) -> dict[Tier, int]:
        counts = dict.fromkeys(Tier, 0)
        for e in range(self.num_experts):
            counts[self.residency.tier_of(e)] += 1
        return counts
