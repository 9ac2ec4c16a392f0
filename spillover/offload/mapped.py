"""Mapped misses: a tiered layer whose experts all sit in GPU slots or pinned RAM computes its
misses where they lie, with no host decision.

The RAM stack is held in the GPU kernels' layout, in page-locked memory the GPU addresses
directly (unified virtual addressing), so a decode step's GEMV reads a missed expert's weights
across the host link inside the same kernel launch that reads the hits from the slots: two
passes over the routed rows, one per stack, each skipping (expert id -1) the rows the other
serves. Nothing reads a device value on the host, so the whole step stays in one CUDA graph.
Which experts hold slots is fixed while decoding; the per-expert routing counts kept on the
device give the hit rate (`settle`) and the statistics a later placement can pin from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spillover.offload.experts import grouped_experts
from spillover.offload.residency import LayerResidency

# Routed rows up to which a step computes its misses across the link (every decode batch a CUDA
# graph captures: 128 sequences x top-k); more rows (prefill) stream the layer's RAM experts
# to the device once instead, where each is read once rather than once per row.
MAPPED_MAX_ROWS = 1280


def mappable(fmt: Any, device: torch.device) -> Any:
    """`fmt` (stacked experts in RAM) as a stack `device` reads across the link: in its kernels'
    layout, page-locked. On the CPU (tests) the stack stays as it is: the CPU reads RAM."""
    if device.type != "cuda":
        return fmt
    if not hasattr(fmt, "mapped_to"):
        raise ValueError(f"mapped misses need int4/int8 experts, not {type(fmt).__name__} "
                         "(take --expert-misses auto)")
    return fmt.mapped_to(device)


class MappedMisses:
    """The device tables and counters of one layer's mapped passes."""

    def __init__(self, residency: LayerResidency, host_experts: Sequence[int],
                 device: torch.device) -> None:
        self.residency = residency
        slot_of = residency.slot_table()
        rows = torch.full((residency.num_experts,), -1, dtype=torch.int64)
        for row, e in enumerate(host_experts):
            if slot_of[e] < 0:  # a RAM copy of a slot expert is never read: its slot is
                rows[e] = row
        missing = [e for e in range(residency.num_experts) if slot_of[e] < 0 and rows[e] < 0]
        if missing:
            raise ValueError(f"mapped misses need every expert outside the GPU slots in RAM; "
                             f"{len(missing)} are on disk (raise --cpu-memory, or take "
                             "--expert-misses auto)")
        self.host_row = rows.to(device)
        self.in_slots = torch.tensor([s >= 0 for s in slot_of], dtype=torch.bool)
        self.routed = torch.zeros(residency.num_experts, dtype=torch.int64, device=device)
        self._ones = torch.ones(MAPPED_MAX_ROWS, dtype=torch.int64, device=device)
        self._seen = torch.zeros(residency.num_experts, dtype=torch.int64)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                slot_map: torch.Tensor, slots: tuple[Any, Any] | None,
                host: tuple[Any, Any]) -> torch.Tensor:
        flat = topk_ids.flatten()
        self.routed.index_add_(0, flat, self._ones[: flat.numel()])
        out = grouped_experts(hidden, self.host_row[topk_ids], topk_weights, *host, sparse=True)
        if slots is not None:
            out = out + grouped_experts(hidden, slot_map[topk_ids], topk_weights, *slots,
                                        sparse=True)
        return out

    def append(self, slots: tuple[Any, Any], slot_map: torch.Tensor, w13: Any,
               w2: Any) -> tuple[tuple[Any, Any], torch.Tensor] | None:
        """(slots, slot map) with one more expert (w13, w2) in a slot of its own, as the id past
        the routed ones (a shared expert); None where its formats do not join the slots'."""
        joined = [s.append_experts(w) if hasattr(s, "append_experts") else None
                  for s, w in zip(slots, (w13, w2), strict=True)]
        if joined[0] is None or joined[1] is None:
            return None
        self._add_slot_only_expert()
        return ((joined[0], joined[1]),
                torch.cat([slot_map, slot_map.new_tensor([slots[0].num_experts])]))

    def _add_slot_only_expert(self) -> None:
        """An expert id past the routed ones: no RAM row, and not counted as a routed expert."""
        self.host_row = torch.cat([self.host_row, self.host_row.new_tensor([-1])])
        self.routed = torch.cat([self.routed, self.routed.new_zeros(1)])
        self._seen = torch.cat([self._seen, self._seen.new_zeros(1)])

    def settle(self) -> int:
        """Fold the routing counted on the device since the last call into the residency's
        counters (routed pairs: a hit is a pair a slot served); returns the misses, each one
        expert read across the link. Reads the device: not per step."""
        now = self.routed.to("cpu")[: self.residency.num_experts]
        new, self._seen = now - self._seen[: len(now)], now
        c = self.residency.counters
        hits = int(new[self.in_slots].sum())
        total = int(new.sum())
        c.lookups += total
        c.hits += hits
        c.misses += total - hits
        return total - hits
