"""Weight formats (one class per format, each a `WeightFormat`), importers and model
quantization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from spillover.quant.bf16 import Bf16Weight
from spillover.quant.fp8 import Fp8BlockWeight
from spillover.quant.grouped import GroupedIntWeight
from spillover.quant.int4 import Int4Weight
from spillover.quant.int8 import Int8Weight


@runtime_checkable
class WeightFormat(Protocol):
    """A packed weight, dense [N, K] or experts [E, N, K]: it owns its bytes and its math.

    Every class in FORMATS satisfies it (tests/unit/test_quant_protocol.py). Code outside
    spillover.quant sees a format through these members only, never through its tensors' names.
    """

    name: str  # the key in FORMATS and in a store's meta
    stacked: bool  # experts [E, N, K] (forward_experts) rather than one matrix (forward)
    act_dtype: torch.dtype  # what forward computes in and dequantize returns

    @property
    def num_experts(self) -> int: ...  # E; 1 for a dense weight

    @property
    def out_features(self) -> int: ...  # N

    @property
    def in_features(self) -> int: ...  # K

    @property
    # packed bytes, scales included (plan.formats.FormatSize predicts them)
    def nbytes(self) -> int: ...

    @classmethod
    def pack(cls, weight: torch.Tensor, *args: Any, **kwargs: Any) -> WeightFormat: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...  # dense: x [..., K] -> [..., N]

    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor:
        """Stacked: x [T, K], expert_ids [T] -> [T, N], row t through expert expert_ids[t];
        sparse: rows of expert -1 come out zero (a kernel reads no weight for them)."""
        ...

    def dequantize(self, expert: int | None = None) -> torch.Tensor: ...  # [N, K] or [E, N, K]

    def tensors(self) -> dict[str, torch.Tensor]: ...  # the packed parts a store writes

    def meta(self) -> dict[str, Any]: ...  # what from_tensors needs besides the parts

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> WeightFormat: ...

    @classmethod
    def concat(cls, formats: Sequence[WeightFormat], dim: int) -> WeightFormat | None:
        """The parts joined along `dim` of the [E, N, K] view, a dense part counting as one expert:
        1 = output rows (merged q|k|v, gate|up; stacked as the parts are), 0 = experts (stacked).
        None where the parts cannot share one kernel call (type, groups or dtypes differ, or a
        scale block would span two parts): the caller then keeps the weight in float."""
        ...

    def take_rows(self, rows: torch.Tensor) -> WeightFormat | None:
        """The weight with output rows `rows` (an index into N), scales moving with their row;
        None where one scale covers several rows (then permute the dequantized weight)."""
        ...

    # laid out there
    def to(self, device: torch.device | str, non_blocking: bool = False) -> WeightFormat: ...

    def take_experts(self, experts: Sequence[int]) -> WeightFormat:
        """The stacked weight of `experts`, in that order (a copy; same layout and device)."""
        ...

    def expert_range(self, start: int, stop: int) -> WeightFormat:
        """Experts start..stop-1 as a view (no copy)."""
        ...

    def put_experts_(self, slots: Sequence[int], src: WeightFormat) -> None:
        """Overwrite experts `slots` with `src`'s, in order (same layout and device)."""
        ...


QuantFormat = WeightFormat  # the older name

FORMATS: dict[str, type[WeightFormat]] = {
    "bf16": Bf16Weight, "int4": Int4Weight, "int8": Int8Weight, "fp8_block": Fp8BlockWeight,
}


def pack_weight(weight: torch.Tensor, quant: str, group_size: int | None = None,
                symmetric: bool = True, act_dtype: torch.dtype = torch.bfloat16) -> WeightFormat:
    """Pack a float [N, K] / [E, N, K] weight into `quant` (bf16 | int4 | int8 | fp8_block)."""
    if quant == "int4":
        return Int4Weight.pack(weight, group_size or 128, symmetric, act_dtype=act_dtype)
    if quant == "int8":
        return Int8Weight.pack(weight, group_size, act_dtype=act_dtype)
    if quant == "fp8_block":
        return Fp8BlockWeight.pack(weight, act_dtype=act_dtype)
    if quant == "bf16":
        return Bf16Weight.pack(weight, act_dtype)
    raise ValueError(f"unknown quant format {quant!r}; choose from {sorted(FORMATS)}")


def format_from_tensors(parts: dict[str, torch.Tensor], meta: dict[str, Any],
                        act_dtype: torch.dtype = torch.bfloat16) -> WeightFormat:
    return FORMATS[meta["format"]].from_tensors(parts, meta, act_dtype)


def concat_experts(rows: Sequence[Sequence[WeightFormat]]) -> WeightFormat | None:
    """One stacked [E, N, K] format from each expert's dense parts (rows[e], in row order); None
    as for `WeightFormat.concat`. Integer formats join all rows at once: sorted (expert, row),
    they already are the stack in memory, so no per-expert copy is made."""
    first = rows[0][0]
    if isinstance(first, GroupedIntWeight):
        return first.concat_experts(rows)
    per = [r[0].concat(r, 1) for r in rows]
    joined = [p for p in per if p is not None]
    return joined[0].concat(joined, 0) if len(joined) == len(per) else None


__all__ = ["Bf16Weight", "Fp8BlockWeight", "GroupedIntWeight", "Int4Weight", "Int8Weight",
           "WeightFormat", "QuantFormat", "FORMATS", "pack_weight", "format_from_tensors",
           "concat_experts"]


# ---- the `--quant` vocabulary, shared by every command and every `quant=` argument ---------------
# Each choice names the format the weights end up in (docs/quantization.md):
#   auto          the command decides: loading keeps what the checkpoint has (a float checkpoint
#                 stays float, a pre-quantized one stays packed); `plan` picks the best quality
#                 that fits;
#   bf16          no quantization: float weights, in the model dtype (--dtype);
#   fp8 int8 int4 quantize every float weight matrix to that format;
#   int4-experts  int4 routed experts, int8 everything else (MoE models);
#   native        a GGUF file's own 4/8-bit blocks, kept packed.
QUANT_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp8", "int8", "int4", "int4-experts", "native")
# Older spellings: `None` and convert's "keep" kept the checkpoint's formats; "none" was float.
LEGACY_QUANT: dict[str, str] = {"keep": "auto", "none": "bf16"}


def normalize_quant(value: str | None) -> str:
    """The QUANT_CHOICES spelling of `value` (None and legacy spellings mapped);
    ValueError otherwise."""
    if value is None:
        return "auto"
    name = value.strip().lower()
    name = LEGACY_QUANT.get(name, name)
    if name not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {value!r}")
    return name


__all__ += ["QUANT_CHOICES", "LEGACY_QUANT", "normalize_quant"]
