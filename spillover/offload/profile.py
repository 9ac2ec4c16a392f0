"""Routing statistics of a real run: which experts each MoE layer picks, for `--expert-stats`
(hot experts placed and pinned first) and for comparing placement policies offline."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from spillover.offload.bank import ResidentExpertBank
from spillover.offload.residency import ExpertStats
from spillover.offload.tiered import TieredExpertBank


def routed_banks(model: nn.Module) -> list[nn.Module]:
    """Every expert bank of the model, resident or tiered, in layer order."""
    return [m for m in model.modules() if isinstance(m, ResidentExpertBank | TieredExpertBank)]


@contextmanager
def record_routing(model: nn.Module, stats: ExpertStats,
                   trace: list[list[list[int]]] | None = None) -> Iterator[ExpertStats]:
    """Count every routed (token, expert) pair per MoE layer into `stats` while the block runs;
    with `trace`, also append each forward's distinct experts per layer (one entry per step,
    the input of `residency.simulate`)."""
    banks = routed_banks(model)
    if len(banks) != stats.num_layers:
        raise ValueError(f"stats for {stats.num_layers} MoE layers, the model has {len(banks)}")

    def hook(layer: int) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            # (a shared expert in the bank is routed as id num_experts: not an expert's)
            ids = [e for e in args[1].flatten().tolist() if e < stats.num_experts]
            stats.record(layer, ids)
            if trace is not None:
                if layer == 0:
                    trace.append([])
                if trace:
                    trace[-1].append(sorted(set(ids)))
        return record

    with pre_hooks(banks, hook):
        yield stats


@contextmanager
def pre_hooks(modules: Sequence[nn.Module], make: Callable[[int], Any]) -> Iterator[None]:
    """`make(i)` as a forward pre-hook of the i-th module while the block runs."""
    handles = [m.register_forward_pre_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
