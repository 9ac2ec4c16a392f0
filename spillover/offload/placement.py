"""The placement, decided once: MemoryPlan -> which tier each expert of each MoE layer starts in,
and the swap of every resident bank for a tiered one that honours it.

The loader builds every bank resident on the CPU; `place_experts` then keeps each layer's slot
experts on the compute device, its host experts in (pinned) RAM, and writes the rest to a spill
file that is memory-mapped back on demand (the disk tier). Nothing else decides where an expert
lives: the model and the loader never do.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spillover.offload.bank import ResidentExpertBank
from spillover.offload.mapped import mappable
from spillover.offload.misses import MissRouter
from spillover.offload.residency import ExpertStats, PlanLike, ResidencyMap
from spillover.offload.tiered import TieredExpertBank
from spillover.offload.transfer import Staging

log = logging.getLogger("spillover.offload")


@dataclass(frozen=True)
class ExpertPlacement:
    """Per MoE layer: `slots` experts on the compute device, `host` with a copy in RAM (the rest
    on disk). `policy` manages the slots (`residency.make_policy`), `miss_mode` and `stream_rows`
    route misses (`MissRouter`), `pin` hottest slot experts are never evicted."""

    slots: int
    host: int
    policy: str = "lrfu"
    miss_mode: str = "auto"
    stream_rows: int = 4096
    pin: int = 0
    host_embeddings: bool = False  # the embedding table stays in RAM (the plan put it there)
    slot_copies: int = 0  # slot experts that also keep a RAM copy (evicting them reads no disk)

    @classmethod
    def from_plan(cls, plan: PlanLike, **kwargs: Any) -> ExpertPlacement:
        return cls(slots=plan.expert_slots_per_layer, host=plan.host_experts_per_layer, **kwargs)

    def is_resident(self, num_experts: int) -> bool:
        return self.slots >= num_experts


class SpillSource:
    """The disk tier: experts no tier in RAM holds, in one safetensors file per layer, read back
    through a memory map only when routed (storage layout, like the host tier)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[int, dict[int, int]] = {}
        self.meta: dict[int, tuple[Any, Any, dict[str, Any], dict[str, Any], torch.dtype]] = {}

    def write(self, layer: int, experts: Sequence[int], w13: Any, w2: Any) -> None:
        parts = {f"w13.{k}": t.contiguous() for k, t in w13.tensors().items()}
        parts.update({f"w2.{k}": t.contiguous() for k, t in w2.tensors().items()})
        save_file(parts, str(self.folder / f"layer{layer}.safetensors"))
        self.rows[layer] = {e: i for i, e in enumerate(experts)}
        self.meta[layer] = (type(w13), type(w2), w13.meta(), w2.meta(), w13.act_dtype)

    def load(self, layer: int, experts: Sequence[int]) -> tuple[Any, Any]:
        rows = [self.rows[layer][e] for e in experts]
        t13, t2, m13, m2, act = self.meta[layer]
        parts: dict[str, dict[str, torch.Tensor]] = {"w13": {}, "w2": {}}
        path = self.folder / f"layer{layer}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                which, part = key.split(".", 1)
                sl = f.get_slice(key)
                parts[which][part] = torch.stack([sl[r : r + 1][0] for r in rows])
        _drop_cached(path)
        return (t13.from_tensors(parts["w13"], m13, act_dtype=act),
                t2.from_tensors(parts["w2"], m2, act_dtype=act))


class HostEmbedding(nn.Module):
    """An embedding table held in (pinned) RAM, where the planner puts it when the GPU budget is
    short: each step's rows are gathered on the CPU and copied to the device. The table is a plain
    attribute, so moving the model leaves it in RAM."""

    host_decides = True  # gathers on the host: a CUDA graph of a step starts after it

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self._table = weight.pin_memory() if torch.cuda.is_available() else weight

    @property
    def weight(self) -> torch.Tensor:
        return self._table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self._table)
        return rows.to(input_ids.device, non_blocking=True)


def embeddings_to_host(model: nn.Module) -> int:
    """Keep every untied embedding table of `model` in RAM; returns the bytes moved off the GPU."""
    tied = {id(w) for m in model.modules() if not isinstance(m, nn.Embedding)
            and isinstance(w := getattr(m, "weight", None), torch.Tensor)}
    moved = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding) and id(child.weight) not in tied:
                table = child.weight.data.to("cpu")
                setattr(parent, name, HostEmbedding(table))
                moved += table.numel() * table.element_size()
    return moved


def _drop_cached(path: Path) -> None:
    """Let the kernel drop the file's pages once read: the disk tier must not grow a page cache
    past the RAM budget (the rows just read were copied out)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _pinned(fmt: Any) -> Any:
    """The format with its tensors in page-locked RAM, so copies to the GPU run asynchronously."""
    if not torch.cuda.is_available():
        return fmt
    parts = {k: t.pin_memory() for k, t in fmt.tensors().items()}
    return type(fmt).from_tensors(parts, fmt.meta(), act_dtype=fmt.act_dtype)


def expert_banks(model: nn.Module) -> list[tuple[nn.Module, str, ResidentExpertBank]]:
    """(parent module, attribute, bank) of every resident expert bank, in layer order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, ResidentExpertBank):
                found.append((parent, name, child))
    return found


def place_experts(
    model: nn.Module,
    placement: ExpertPlacement,
    device: torch.device,
    stats: ExpertStats | None = None,
    spill_dir: str | Path | None = None,
) -> ResidencyMap | None:
    """Swap every resident bank of `model` (experts on the CPU, storage layout) for a tiered
    bank that follows `placement`. Returns the residency of all layers (None: no MoE layer)."""
    if placement.host_embeddings:
        embeddings_to_host(model)
    banks = expert_banks(model)
    if not banks:
        return None
    num_experts = banks[0][2].num_experts
    num_layers = len(banks)
    slots = min(placement.slots, num_experts)
    host = min(placement.host, num_experts - slots)
    rmap = ResidencyMap(num_layers, num_experts, slots, host, stats=stats,
                        policy=placement.policy, pin_per_layer=min(placement.pin, slots))
    router = MissRouter(placement.miss_mode, placement.stream_rows)
    spill: SpillSource | None = None
    staging = Staging(device)
    placed: list[TieredExpertBank] = []
    for i in range(len(banks)):
        # Drop the list's hold on each resident bank as it is replaced: RAM peaks at one layer's
        # copies, not at a second copy of every expert.
        parent, name, bank = banks[i]
        banks[i] = (parent, name, None)  # type: ignore[assignment]
        res = rmap.layers[i]
        w13, w2 = bank.stacked()
        table = res.slot_table()
        slot_experts = sorted((s, e) for e, s in enumerate(table) if s >= 0)
        in_slots = [e for _, e in slot_experts]
        # Host rows: the experts outside the slots first (a prefill streams that prefix in one
        # copy), then RAM copies of slot experts, coldest first.
        host_experts = sorted(res.host)
        mapped = router.mode == "mapped"
        # slots move only under a dynamic policy, and never with mapped misses (the device reads
        # its misses where they lie): only then do slot experts need a copy elsewhere
        dynamic = res.policy.dynamic and not mapped
        if placement.slot_copies and dynamic:
            copies = in_slots[::-1][: placement.slot_copies]
            res.host = res.host | frozenset(copies)
            host_experts += copies
        rest = [e for e in range(num_experts) if e not in res.host]
        dev_pair = None
        if in_slots:
            dev_pair = (w13.take_experts(in_slots).to(device), w2.take_experts(in_slots).to(device))
        host_pair = None
        if host_experts:
            keep = (lambda f: mappable(f, device)) if mapped else _pinned
            host_pair = (keep(w13.take_experts(host_experts)),
                         keep(w2.take_experts(host_experts)))
        # Slot experts go to disk too when the policy may evict them: a later miss reads them back.
        to_disk = rest if dynamic else [e for e in rest if e not in in_slots]
        if to_disk:
            if spill is None:
                folder = Path(spill_dir) if spill_dir else Path(tempfile.mkdtemp(prefix="spill-"))
                folder.mkdir(parents=True, exist_ok=True)
                spill = SpillSource(folder)
            spill.write(i, to_disk, w13.take_experts(to_disk), w2.take_experts(to_disk))
        tiered = TieredExpertBank(i, res, dev_pair, host_pair, host_experts, spill, device, router,
                                  staging, stream_prefix=len(host_experts) - placement.slot_copies
                                  if dynamic else len(host_experts), mapped=mapped)
        if placed:
            placed[-1].link_next(tiered)
        placed.append(tiered)
        setattr(parent, name, tiered)
    log.info("experts placed: %d MoE layers x %d experts: %d slots on %s, %d in RAM, %d on disk "
             "per layer (policy %s, misses %s)%s", len(banks), num_experts, slots, device.type,
             host, num_experts - slots - host, placement.policy, placement.miss_mode,
             f"; spill at {spill.folder}" if spill else "")
    return rmap
