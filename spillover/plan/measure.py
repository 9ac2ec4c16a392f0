"""The engine side of the plan: allocate caches from it, and compare what was allocated with it.

`allocate_cache_tensors` builds exactly the cache tensors a MemoryPlan budgets (the engine's
layout: paged K/V per full-attention layer, conv + ssm state slots per linear layer), so the
engine has no second estimator. `measured_bytes_by_component` classifies real tensors the same
way the plan does, for the planned-vs-measured log after warm-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from spillover.config import ModelConfig
from spillover.hw.info import fmt_bytes
from spillover.kernels.context import AttentionCache, LinearStateCache
from spillover.plan.inventory import component_of
from spillover.plan.memory import KV_CACHE, LINEAR_STATE, RUNTIME, MemoryPlan

_TIER_OF_DEVICE = {"cuda": "gpu", "cpu": "host", "meta": "gpu"}


def allocate_cache_tensors(
    cfg: ModelConfig,
    num_kv_blocks: int,
    block_size: int,
    num_state_slots: int,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "meta",
    ssm_dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, AttentionCache], dict[int, LinearStateCache]]:
    """KV caches of the full-attention layers and state slots of the linear ones, by layer index."""
    kv: dict[int, AttentionCache] = {}
    for i in cfg.attention_layers:
        shape = (num_kv_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        kv[i] = AttentionCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device)
        )
    states: dict[int, LinearStateCache] = {}
    for i in cfg.linear_layers:
        conv = (num_state_slots, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1)
        ssm = (
            num_state_slots,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
        )
        states[i] = LinearStateCache(
            torch.zeros(conv, dtype=dtype, device=device),
            torch.zeros(ssm, dtype=ssm_dtype, device=device)
        )
    return kv, states


def allocate_from_plan(
    plan: MemoryPlan, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "meta"
) -> tuple[dict[int, AttentionCache], dict[int, LinearStateCache]]:
    return allocate_cache_tensors(
        plan.config, plan.num_kv_blocks, plan.block_size, plan.num_state_slots, dtype=dtype,
        device=device
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tier(t: torch.Tensor) -> str:
    return _TIER_OF_DEVICE.get(t.device.type, t.device.type)


def measured_bytes_by_component(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    kv_caches: Mapping[int, AttentionCache] | None = None,
    state_caches: Mapping[int, LinearStateCache] | None = None,
) -> dict[str, dict[str, int]]:
    """tier -> component -> bytes of what was really allocated (shared tensors counted once).

    `named_tensors` is e.g. `chain(model.named_parameters(), model.named_buffers())` plus any
    packed quantised tensors; names follow HF checkpoints or our module names.
    """
    out: dict[str, dict[str, int]] = {}
    seen: set[tuple[int, int]] = set()

    def add(tier: str, comp: str, t: torch.Tensor) -> None:
        # storage identity, so that tied weights and views are not counted twice
        if t.device.type == "meta":
            key = (id(t), 0)
        else:
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen:
            return
        seen.add(key)
        bucket = out.setdefault(tier, {})
        bucket[comp] = bucket.get(comp, 0) + _nbytes(t)

    for name, t in named_tensors:
        if t.numel():
            add(_tier(t), component_of(name), t)
    for c in (kv_caches or {}).values():
        add(_tier(c.k), KV_CACHE, c.k)
        add(_tier(c.v), KV_CACHE, c.v)
    for s in (state_caches or {}).values():
        add(_tier(s.conv), LINEAR_STATE, s.conv)
        add(_tier(s.ssm), LINEAR_STATE, s.ssm)
    return out


@dataclass(frozen=True)
class PeakComparison:
    device: str
    planned: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.measured / self.planned if self.planned else float("inf")

    def line(self) -> str:
        return (
            f"{self.device}: planned {fmt_bytes(self.planned)}, measured "
            f"{fmt_bytes(self.measured)} ({(self.ratio - 1) * 100:+.1f} %)"
        )


def compare_peaks(plan: MemoryPlan, measured_peak: Mapping[str, int]) -> list[PeakComparison]:
    """Planned vs measured peak per device.

    `measured_peak` like {"gpu": torch.cuda.max_memory_allocated()}.

    The GPU figure excludes the runtime entry (CUDA context is not in torch's allocator stats).
    """
    rows = []
    for tier, measured in measured_peak.items():
        planned = (
            plan.gpu_torch_bytes
            if tier == "gpu"
            else sum(v for k, v in plan.tiers.get(tier, {}).items() if k != RUNTIME)
        )
        rows.append(PeakComparison(tier, planned, int(measured)))
    return rows
