"""Quantize a built model in place, following a per-component policy, and record what was done.

Walks the module tree: every `spillover.layers.linear.Linear` gets a format through `set_format`;
every expert bank (`spillover.offload.bank.is_expert_bank`) gets its stacked `w13` [E, 2I, H] and
`w2` [E, H, I] packed through `install`, which releases the float parameters. Components matched by
`keep` patterns stay in float (router, gates, norms, embeddings, conv, lm_head by default);
`overrides` pick a format per component pattern.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from spillover.layers.linear import Linear
from spillover.offload.bank import is_expert_bank
from spillover.quant import WeightFormat, pack_weight

# Module-name patterns (fnmatch) kept unquantized unless overridden; docs/quantization.md,
# "1. What we load".
DEFAULT_KEEP: tuple[str, ...] = (
    "*mlp.gate", "*shared_expert_gate", "*embed_tokens*", "*lm_head*", "*norm*",
    "*conv1d*", "*in_proj_ba*", "*in_proj_a", "*in_proj_b", "*mtp*",
)


@dataclass(frozen=True)
class QuantPolicy:
    default: str = "int4"  # format for linears and experts: int4 | int8 | fp8_block | bf16
    group_size: int = 128  # int4 group size (128 or 32)
    int8_group_size: int | None = None  # None = per output channel
    symmetric: bool = True
    keep: tuple[str, ...] = DEFAULT_KEEP  # kept in float (a "bf16" entry in the record)
    overrides: dict[str, str] = field(default_factory=dict)  # pattern -> format, checked first
    act_dtype: torch.dtype = torch.bfloat16  # dtype the formats compute in

    def format_for(self, name: str) -> tuple[str, str]:
        """(format, reason) for a module name."""
        for pattern, fmt in self.overrides.items():
            if fnmatch.fnmatch(name, pattern):
                return fmt, f"override {pattern!r}"
        for pattern in self.keep:
            if fnmatch.fnmatch(name, pattern):
                return "keep", f"kept by {pattern!r}"
        return self.default, "policy default"


def pack_with_policy(weight: torch.Tensor, fmt: str, why: str, policy: QuantPolicy
                     ) -> tuple[WeightFormat, str]:
    """`weight` packed into `fmt` as the policy says; (format, reason), the reason
    naming a fallback."""
    group = policy.group_size if fmt == "int4" else policy.int8_group_size
    if group is not None and weight.shape[-1] % group:
        # NOTE: only tiny test models hit this; int8 per channel is the safe lossless-ish fallback.
        fmt, group, why = "int8", None, f"in={weight.shape[-1]} not a multiple of group {group}"
    return pack_weight(weight, fmt, group, policy.symmetric, policy.act_dtype), why


def quantize_model(model: nn.Module, policy: QuantPolicy | None = None) -> dict[str, str]:
    """Replace weights in place; returns {module or param name: "format (reason)"} for every
    Linear and expert tensor visited (kept ones included), so the choice is auditable."""
    policy = policy or QuantPolicy()
    with torch.no_grad():
        return _quantize(model, policy)


def _quantize(model: nn.Module, policy: QuantPolicy) -> dict[str, str]:
    record: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            fmt, why = policy.format_for(name)
            if fmt == "keep" or module.fmt is not None:
                record[name] = f"{module.fmt.name if module.fmt else 'dense'} ({why})"
                continue
            packed, why = pack_with_policy(module.weight.data, fmt, why, policy)
            module.set_format(packed)
            record[name] = f"{packed.name} ({why})"
        elif is_expert_bank(module):
            for attr, done in module.formats().items():
                full = f"{name}.{attr}"
                fmt, why = policy.format_for(full)
                if done is not None:
                    record[full] = f"{done.name} (already quantized)"
                    continue
                if fmt == "keep":
                    record[full] = f"dense ({why})"
                    continue
                packed, why = pack_with_policy(module.get_parameter(attr).data, fmt, why, policy)
                module.install(attr, packed)
                record[full] = f"{packed.name} ({why})"
    return record


def policy_record(model: nn.Module, policy: QuantPolicy, packed: dict[str, str]) -> dict[str, str]:
    """The record `quantize_model` returns, for a model whose formats were installed while loading
    (spillover.weights.quantize_stream): `packed` holds "format (reason)" for what was packed, the
    rest is read off the policy and the model, in the same module order."""
    record: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            slots = [(name, module.fmt)]
        elif is_expert_bank(module):
            slots = [(f"{name}.{attr}", fmt) for attr, fmt in module.formats().items()]
        else:
            continue
        for full, fmt in slots:
            why = policy.format_for(full)[1]
            record[full] = packed.get(full) or f"{fmt.name if fmt is not None else 'dense'} ({why})"
    return record
