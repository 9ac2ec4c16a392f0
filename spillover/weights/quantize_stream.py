"""Quantize at load, one tensor at a time: the float model is never materialised.

`StreamQuantizer(model, policy, device)` wraps a source's (name, tensor, file) iterator. Each float
tensor whose parameter the policy packs (a `Linear` weight or an expert bank's w13 / w2 that the
keep-list spares) is converted to the model dtype on `device`, packed, and handed on as a format
object; `load_weights` merges q|k|v and gate|up rows and stacks per-expert tensors exactly as it
does for a converted store. Everything else (norms, embeddings, router, kept tensors, names the
loader will reject) passes through untouched.

Exactness against `quantize_model` on the float model: int4 / int8 groups run along K within one
output row, so packing a merged projection part by part and concatenating the rows gives the same
codes and scales. FP8 block scales cover 128 x 128 tiles that can span parts (q|k|v and gate|up of
unaligned shapes), so for such formats the parts of one matrix (one expert's, for expert banks) are
gathered in float first and packed together: a buffer of one merged matrix, not of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from spillover.weights.loader import (
    WeightItem,
    WeightLoadError,
    load_weights,
    packable,
    param_target,
    skipped,
)
from spillover.weights.quantize import QuantPolicy, pack_with_policy, policy_record

if TYPE_CHECKING:
    from spillover.config import ModelConfig
    from spillover.models.causal_lm import CausalLM

# Formats whose scales span output rows: parts of one matrix are packed together.
ROW_BLOCKED = frozenset({"fp8_block"})

Index = tuple[slice | int, ...]


@dataclass
class _Gather:
    """Float parts of one matrix (a dense parameter, or one expert of a bank) waiting
    for the rest."""

    buf: torch.Tensor
    seen: list[Index] = field(default_factory=list)
    filled: int = 0


class StreamQuantizer:
    """Wraps a weight iterator; `packed` then holds {module or bank slot: "format (reason)"}."""

    def __init__(self, model: nn.Module, policy: QuantPolicy, device: torch.device,
                 tied_lm_head: bool = False) -> None:
        # Shapes and dtypes only: the model may be (and is meant to be) on meta.
        self.params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.policy, self.device, self.tied_lm_head = policy, device, tied_lm_head
        self.packed: dict[str, str] = {}
        self._gathering: dict[tuple[str, int], _Gather] = {}

    def __call__(self, items: Iterable[tuple[str, Any, str]]) -> Iterator[tuple[str, Any, str]]:
        for name, item, src in items:
            plan = self._plan(name, item)
            if plan is None:
                yield name, item, src
                continue
            pname, index, slot, fmt, why = plan
            # checked on the source, as the float loader does
            if not bool(torch.isfinite(item).all()):
                raise WeightLoadError(f"{src}: tensor {name} contains NaN or Inf values")
            # The dtype the float model would have held: packing sees exactly its values.
            tensor = item.to(device=self.device, dtype=self.params[pname].dtype)
            if fmt in ROW_BLOCKED and not _whole(index):
                done = self._gather(name, src, pname, index, tensor)
                if done is None:
                    continue
                name, tensor = done
            packed, why = pack_with_policy(tensor, fmt, why, self.policy)
            self.packed[slot] = f"{packed.name} ({why})"
            yield name, packed, src

    def _plan(self, name: str, item: Any) -> tuple[str, Index, str, str, str] | None:
        """(parameter, index, policy slot, format, reason) for a tensor to pack;
        None: pass it on."""
        if not isinstance(item, torch.Tensor) or not item.is_floating_point():
            return None
        if skipped(name, self.tied_lm_head):
            return None
        target = param_target(name, self.params, self.modules)
        if target is None or target[0] not in self.params or not packable(target[0], self.modules):
            return None
        pname, index = target
        param = self.params[pname]
        if tuple(item.shape) != tuple(param[index].shape if index else param.shape):
            return None  # the loader names the mismatch
        # quantize_model's names: the Linear module, or the bank's "<bank>.w13" / "<bank>.w2".
        slot = pname.removesuffix(".weight") if pname.endswith(".weight") else pname
        fmt, why = self.policy.format_for(slot)
        return None if fmt == "keep" else (pname, index, slot, fmt, why)

    def _gather(self, name: str, src: str, pname: str, index: Index, tensor: torch.Tensor
                ) -> tuple[str, torch.Tensor] | None:
        """Collect a part; once its matrix is complete, (name the loader maps onto it,
        the matrix)."""
        expert = index[0] if index and isinstance(index[0], int) else -1
        rel = index[1:] if expert >= 0 else index
        param = self.params[pname]
        key = (pname, expert)
        g = self._gathering.get(key)
        if g is None:
            shape = param.shape[1:] if expert >= 0 else param.shape
            g = self._gathering[key] = _Gather(torch.empty(shape, dtype=param.dtype,
                                                           device=self.device))
        if rel in g.seen:
            raise WeightLoadError(f"{src}: tensor {name} loaded twice ({pname})")
        g.seen.append(rel)
        g.buf[rel].copy_(tensor)
        g.filled += tensor.numel()
        if g.filled < g.buf.numel():
            return None
        del self._gathering[key]
        if expert < 0:
            return pname, g.buf  # our own parameter name: the loader fills it whole
        bank, _, attr = pname.rpartition(".")
        return f"{bank}.{expert}.{'gate_up_proj' if attr == 'w13' else 'down_proj'}.weight", g.buf


def _whole(index: Index) -> bool:
    """Whether a part covers a whole matrix: the parameter, or one expert of a bank."""
    return not index or (len(index) == 1 and isinstance(index[0], int))


def load_quantized(items: Iterable[WeightItem], cfg: ModelConfig, device: torch.device,
                   dtype: torch.dtype, policy: QuantPolicy) -> tuple[CausalLM, dict[str, str]]:
    """Build the model on meta and fill it from float items, packing on `device` as they arrive.

    Returns (model, record), the record equal to what `quantize_model` reports for the same policy.
    """
    from spillover.weights.build import move_model
    from spillover.weights.resolve import META, build_model

    model = build_model(cfg, META, dtype)
    stream = StreamQuantizer(model, policy, device, cfg.tie_word_embeddings)
    with torch.no_grad():
        load_weights(model, stream(items), tied_lm_head=cfg.tie_word_embeddings, device=device)
    return move_model(model, device), policy_record(model, policy, stream.packed)
