"""The user's memory budgets -> the planner's MemoryPlan -> the experts' placement.

`--gpu-memory` bounds what this process holds on the GPU (torch's allocator plus the CUDA
context), `--cpu-memory` the weights it holds in RAM; experts beyond both stay on disk. The
planner is the one estimator: the placement is read off its plan, and a budget too small for the
dense part is refused here, with the plan's reasons, before any expert moves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch
from torch import nn

from spillover.config import ModelConfig
from spillover.hw.info import HardwareInfo, fmt_bytes, with_overrides
from spillover.offload.placement import ExpertPlacement, expert_banks
from spillover.plan.formats import BF16, FP8, INT4, INT4_ZP, INT8, FormatSize, WeightScheme
from spillover.plan.inventory import EMBEDDINGS, ROUTED_EXPERTS
from spillover.plan.memory import (
    ACTIVATIONS,
    KV_CACHE,
    LINEAR_STATE,
    Limits,
    MemoryPlan,
    plan_memory,
)


@dataclass(frozen=True)
class MemoryBudgets:
    gpu: int | None = None  # bytes
    cpu: int | None = None

    @property
    def given(self) -> bool:
        return self.gpu is not None or self.cpu is not None

    @classmethod
    def parse(cls, gpu: str | int | float | None, cpu: str | int | float | None,
              device: torch.device) -> MemoryBudgets:
        """Sizes ("32GiB", "60GB", bytes) or fractions of the device's total ("0.9")."""
        if gpu is None and cpu is None:
            return cls()
        from spillover.hw.sizes import parse_size

        def total_gpu() -> int | None:
            if device.type != "cuda":
                return None
            return torch.cuda.mem_get_info(_cuda_index(device))[1]

        gpu_b = None if gpu is None else parse_size(str(gpu), total_gpu())
        cpu_b = None if cpu is None else parse_size(str(cpu), psutil.virtual_memory().total)
        if gpu_b is not None and device.type != "cuda":
            gpu_b = None  # no GPU tier: the flag has nothing to bound (the CPU runs everything)
        return cls(gpu_b, cpu_b)


def _plan_format(fmt: Any) -> FormatSize:
    """The planner's byte model of a loaded format."""
    if fmt is None:
        return BF16
    name = getattr(fmt, "name", "bf16")
    if name == "int4":
        return INT4 if getattr(fmt, "symmetric", False) else INT4_ZP
    return {"int8": INT8, "fp8_block": FP8}.get(name, BF16)


def loaded_scheme(model: nn.Module) -> WeightScheme:
    """The weight scheme of a loaded model: its experts' format, and its dense linears'."""
    banks = expert_banks(model)
    experts = _plan_format(banks[0][2].formats()["w13"]) if banks else BF16
    dense = next((_plan_format(m.fmt) for m in model.modules()
                  if type(m).__name__ == "Linear" and getattr(m, "fmt", None) is not None), BF16)
    return WeightScheme(dense, experts)


def cap_allocator(device: torch.device, plan: MemoryPlan) -> None:
    """Hold torch's caching allocator to the plan's GPU share of the budget (the budget less
    the CUDA context and margin the plan reserves): past it the allocator frees its cache and
    retries before failing, so fragmentation cannot carry the process over the budget."""
    if device.type != "cuda" or plan.gpu_budget <= 0:
        return
    total = torch.cuda.mem_get_info(_cuda_index(device))[1]
    torch.cuda.set_per_process_memory_fraction(min(plan.gpu_budget / total, 1.0),
                                            _cuda_index(device))


def budget_hardware(hw: HardwareInfo, device: torch.device, budgets: MemoryBudgets) -> HardwareInfo:
    """`hw` as seen within the budgets: the GPU's memory is the budget (or what is free)."""
    if device.type != "cuda":
        hw = with_overrides(hw, no_gpu=True) if hw.gpus else hw
    else:
        free, total = torch.cuda.mem_get_info(_cuda_index(device))
        if not hw.gpus:
            hw = with_overrides(hw, vram=f"{total}B")
        cap = budgets.gpu if budgets.gpu is not None else total
        gpu = replace(hw.gpus[0], vram_total=min(cap, total), vram_free=min(cap, free))
        hw = replace(hw, gpus=(gpu, *hw.gpus[1:]))
    if budgets.cpu is not None:
        hw = replace(hw, ram_total=budgets.cpu, ram_available=None)
    return hw


def plan_experts(
    cfg: ModelConfig,
    model: nn.Module,
    device: torch.device,
    budgets: MemoryBudgets,
    *,
    policy: str = "lrfu",
    miss_mode: str = "auto",
    max_num_seqs: int = 16,
    token_budget: int = 2048,
    context: int | None = None,
    hw: HardwareInfo | None = None,
) -> tuple[MemoryPlan, ExpertPlacement]:
    """The plan for this model within the budgets, and the expert placement read off it."""
    from spillover.hw.probe import probe
    from spillover.plan.inventory import inventory_from_config

    hw = budget_hardware(hw if hw is not None else probe(), device, budgets)
    limits = Limits(
        context=min(context or 4096, cfg.max_position), seqs=max_num_seqs,
        token_budget=token_budget,
        model_dtype_bytes=2 if device.type == "cuda" else 4,
        kv_dtype_bytes=2 if device.type == "cuda" else 4,
        host_reserve_bytes=0 if budgets.cpu is not None else None,
    )
    plan = plan_memory(cfg.model_type, cfg, inventory_from_config(cfg), loaded_scheme(model), hw,
                       limits)
    on_gpu = device.type == "cuda"
    # Only experts may leave the compute device's tier and RAM: the engine runs dense layers
    # where they were loaded.
    # (The embedding table may stay in RAM: `placement.embeddings_to_host` serves its rows.)
    dense_off = [c for t in ("disk",) + (("host",) if on_gpu else ())
                 for c, n in plan.tiers.get(t, {}).items()
                 if n and c not in (ROUTED_EXPERTS, KV_CACHE, LINEAR_STATE, ACTIVATIONS)
                 and not (t == "host" and c == EMBEDDINGS)]
    if plan.verdict == "no" or dense_off:
        gpu = fmt_bytes(plan.gpu_budget) if on_gpu else "none"
        why = "; ".join(plan.reasons) or (
            f"the dense weights ({', '.join(dense_off)}), caches and activations need more than "
            f"the budget ({plan.dense_layers_on_gpu} of {cfg.num_layers} layers fit)")
        hints = "; ".join(plan.suggestions)
        raise ValueError(f"the model does not fit the memory budgets (GPU {gpu}, RAM "
                         f"{fmt_bytes(plan.host_budget)}): {why}"
                         + (f". Try: {hints}" if hints else ""))
    host_embeddings = on_gpu and bool(plan.tiers.get("host", {}).get(EMBEDDINGS))
    slots = plan.expert_slots_per_layer if on_gpu else 0
    host = plan.host_experts_per_layer + (0 if on_gpu else plan.expert_slots_per_layer)
    # RAM the plan leaves free holds copies of slot experts too, so that an eviction never
    # sends a later miss to the disk.
    n_moe = len(expert_banks(model))
    per_expert = plan.weights_bytes.get(ROUTED_EXPERTS, 0) // max(cfg.num_experts * n_moe, 1)
    free = plan.host_budget - sum(plan.tiers.get("host", {}).values())
    copies = min(slots, max(free, 0) // max(per_expert * n_moe, 1))
    return plan, ExpertPlacement(slots=slots, host=host, policy=policy, miss_mode=miss_mode,
                                 host_embeddings=host_embeddings, slot_copies=copies)


def _cuda_index(device: torch.device) -> int:
    """The card's index: torch's memory queries refuse a "cuda" device without one."""
    return device.index if device.index is not None else torch.cuda.current_device()
