"""The engine's memory plan: the hardware as the planner sees it, the weights as loaded (per
tier), and the MemoryPlan the caches are allocated from."""

from __future__ import annotations

from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING

import torch

from spillover.config import ModelConfig
from spillover.hw.info import HardwareInfo
from spillover.hw.probe import probe
from spillover.offload.bank import is_expert_bank
from spillover.offload.budget import MemoryBudgets, budget_hardware
from spillover.offload.tiered import TieredExpertBank
from spillover.plan.engine_cache import cache_plan_for_engine, engine_limits, resolve_max_model_len
from spillover.plan.inventory import ROUTED_EXPERTS, component_of
from spillover.plan.measure import measured_bytes_by_component
from spillover.plan.memory import MemoryPlan

if TYPE_CHECKING:
    from spillover.engine.engine import EngineConfig


@lru_cache(maxsize=1)
def _probed() -> HardwareInfo:
    return probe()


def device_hardware(device: torch.device) -> HardwareInfo:
    """This process's hardware as the planner sees it, for `device`: on the CPU no GPU tier; on CUDA
    the GPU's total and free memory from torch (weights already loaded are no longer free)."""
    return budget_hardware(_probed(), device, MemoryBudgets())


def loaded_weight_bytes(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """tier -> component -> bytes of the model's weights as loaded: parameters and buffers, the
    packed formats of linears and expert banks, and a tiered bank's slots and RAM experts."""
    out = measured_bytes_by_component(chain(model.named_parameters(), model.named_buffers()))

    def add(tier: str, comp: str, n: int) -> None:
        out.setdefault(tier, {})[comp] = out.get(tier, {}).get(comp, 0) + n

    tier_of = {"cuda": "gpu", "cpu": "host"}
    for name, m in model.named_modules():
        if isinstance(m, TieredExpertBank):
            for tier, n in m.tier_bytes().items():
                add(tier, ROUTED_EXPERTS, n)
            continue
        fmts = list(m.formats().values()) if is_expert_bank(m) else [getattr(m, "fmt", None)]
        # a packed weight sits where its module's (released, 0-element) parameters do
        param = next(m.parameters(recurse=False), None)
        tier = tier_of.get(param.device.type, "gpu") if param is not None else "gpu"
        for fmt in fmts:
            if fmt is not None:
                add(tier, component_of(f"{name}.weight"), fmt.nbytes)
    return out


def memory_plan(
    cfg: ModelConfig,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    model: torch.nn.Module | None = None,
    hw: HardwareInfo | None = None,
) -> MemoryPlan:
    """The MemoryPlan the engine allocates its caches from (the planner is the one estimator):
    KV blocks for max_num_seqs sequences of up to ENGINE_TOKENS_PER_SEQ tokens within
    `kv_cache_memory_bytes` (default: 1 GiB on the CPU, half the free memory on a GPU), state slots
    for every running sequence plus checkpoints; explicit num_kv_blocks / num_state_slots win."""
    # A no-op on an Engine's own config (resolved in Engine.__init__); other callers
    # pass the user's.
    max_len = resolve_max_model_len(cfg, config.max_model_len)
    limits = engine_limits(
        max_num_seqs=config.max_num_seqs,
        max_len=max_len,
        block_size=config.block_size,
        token_budget=config.max_num_batched_tokens,
        dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
        prompt_cache_slots=config.max_prompt_checkpoints + 1,
    )
    return cache_plan_for_engine(
        cfg.model_type,
        cfg,
        hw if hw is not None else device_hardware(device),
        limits,
        max_len=max_len,
        kv_budget_bytes=config.kv_cache_memory_bytes,
        num_kv_blocks=config.num_kv_blocks,
        num_state_slots=config.num_state_slots,
        loaded_weights=loaded_weight_bytes(model) if model is not None else None,
    )


def cache_sizes(cfg: ModelConfig, config: EngineConfig, device: torch.device,
                dtype: torch.dtype) -> tuple[int, int]:
    """(num_kv_blocks, num_state_slots) of the engine's MemoryPlan (see `memory_plan`)."""
    plan = memory_plan(cfg, config, device, dtype)
    return plan.num_kv_blocks, plan.num_state_slots
