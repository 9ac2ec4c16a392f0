"""Shared body of the integer weight-only formats (int4, int8): storage, dequant, forward.

A weight is either dense [N, K] or a stack of experts [E, N, K]; both are stored with a leading
expert axis (E = 1 for dense) so that every kernel sees one layout:
  qweight [E, N, K/2] uint8 (int4) | [E, N, K] int8, scales [E, N, K/G], mins [E, N, K/G] | None.
On CUDA the same codes are held transposed as int32 words ("kn" layout, see `to_layout`), for int4
experts that take the tensor-core GEMV in that kernel's load order ("tiled",
`ref_quant.tile_words`). The matmul itself is chosen by
`spillover.kernels.quant_dispatch.quant_matmul` (Triton on CUDA, torch's weight-only CPU ops for
small batches on the CPU, otherwise the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch

from spillover.kernels.ref_quant import dequant_int_ref, kn_to_nk, swap_nk, tile_words, untile_words

LAYOUTS = ("nk", "kn", "tiled")


class GroupedIntWeight:
    name: str = "int"
    bits: ClassVar[int] = 0

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        *,
        group_size: int,
        stacked: bool,
        act_dtype: torch.dtype = torch.bfloat16,
        layout: str = "nk",
    ) -> None:
        if qweight.dim() == 2:
            qweight, scales = qweight.unsqueeze(0), scales.unsqueeze(0)
            mins = mins.unsqueeze(0) if mins is not None else None
        assert qweight.dim() == 3, "expected [E, N, K'] codes"
        assert scales.dim() == 3, "expected [E, N, K/G] scales"
        assert stacked or qweight.shape[0] == 1
        self.qweight = qweight
        self.scales = scales
        self.mins = mins
        self.group_size = group_size
        self.stacked = stacked
        self.act_dtype = act_dtype
        assert layout in LAYOUTS, layout
        self.layout = layout
        self.num_experts = qweight.shape[0]
        # words [E, K/VALS, N] int32 (kn or tiled), scales [E, K/G, N]: the GPU layouts
        if layout != "nk":
            self.out_features, self.in_features = qweight.shape[2], scales.shape[1] * group_size
            assert qweight.dtype == torch.int32
            assert qweight.shape[1] * (32 // self.bits) == self.in_features
        else:
            self.out_features, self.in_features = qweight.shape[1], scales.shape[2] * group_size
            k = qweight.shape[2] * (8 // self.bits)
            assert k == self.in_features, "codes and scales disagree on K"
        # NOTE: torch's CPU weight-only ops need their own opaque packing; built lazily per expert.
        self.cpu_cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @classmethod
    def pack(cls, weight: torch.Tensor, *args: Any, **kwargs: Any) -> Self:
        """RTN-quantize a float weight: each width packs its own way (Int4Weight, Int8Weight)."""
        raise NotImplementedError(f"{cls.__name__} has no packer: use Int4Weight or Int8Weight")

    # ---- the WeightFormat protocol ------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] for a dense weight."""
        assert not self.stacked, "stacked experts: use forward_experts"
        from spillover.kernels.quant_dispatch import quant_matmul

        y = quant_matmul(self, x.reshape(-1, self.in_features), None)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """[N, K] (dense, or one expert) or [E, N, K] (all experts) in act_dtype."""
        if self.layout != "nk":
            return self.to_layout("nk").dequantize(expert)
        sl = slice(None) if expert is None and self.stacked else (expert or 0)
        mins = self.mins[sl] if self.mins is not None else None
        w = dequant_int_ref(self.qweight[sl], self.scales[sl], mins, bits=self.bits,
                            group_size=self.group_size)
        return w.to(self.act_dtype)

    # ---- stacked experts ------------------------------------------------------------------------
    def forward_experts(self, x: torch.Tensor, expert_ids: torch.Tensor,
                        sparse: bool = False) -> torch.Tensor:
        """Grouped form: x [T, K], expert_ids [T] -> y [T, N] with y[t] = x[t] @ W[expert_ids[t]].T.

        The MoE bank flattens (token, slot) pairs into rows; one call covers every routed expert.
        """
        from spillover.kernels.quant_dispatch import quant_matmul

        return quant_matmul(self, x, expert_ids, sparse)

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x [T, K] routed to one expert -> [T, N]."""
        ids = torch.full((x.shape[0],), expert, dtype=torch.int32, device=x.device)
        return self.forward_experts(x, ids)

    # ---- storage ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors, keyed by part name (what the store writes); dense
        drops the E axis."""
        if self.layout != "nk":
            return self.to_layout("nk").tensors()
        sq = (lambda t: t) if self.stacked else (lambda t: t[0])
        out = {"qweight": sq(self.qweight), "scales": sq(self.scales)}
        if self.mins is not None:
            out["mins"] = sq(self.mins)
        return out

    def meta(self) -> dict[str, Any]:
        return {"format": self.name, "group_size": self.group_size, "symmetric": self.symmetric,
                "stacked": self.stacked}

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     act_dtype: torch.dtype = torch.bfloat16) -> Self:
        return cls(parts["qweight"], parts["scales"], parts.get("mins"),
                   group_size=int(meta["group_size"]),
                   stacked=bool(meta["stacked"]), act_dtype=act_dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Self:
        """Move; on CUDA the codes are re-laid out "kn" or "tiled" (what the Triton kernels read,
        chosen by `dispatch.gpu_layout`), on the CPU "nk". non_blocking: from pinned RAM, on the
        current stream."""
        from spillover.kernels.quant_dispatch import gpu_layout

        nb = non_blocking
        mins = self.mins.to(device, non_blocking=nb) if self.mins is not None else None
        moved = type(self)(self.qweight.to(device, non_blocking=nb),
                           self.scales.to(device, non_blocking=nb),
                           mins, group_size=self.group_size,
                           stacked=self.stacked, act_dtype=self.act_dtype, layout=self.layout)
        dev = torch.device(device)
        return moved.to_layout(gpu_layout(self, dev) if dev.type == "cuda" and self.kn_ok else "nk")

    # ---- joining and reordering (storage layout: rows are axis 1, experts axis 0) ---------------
    def _join_key(self) -> tuple[Any, ...]:
        """What parts must share to be joined into one weight: one kernel call reads them all."""
        mins = None if self.mins is None else self.mins.dtype
        return (type(self), self.group_size, self.qweight.dtype, self.scales.dtype, mins,
                self.act_dtype)

    @classmethod
    def concat(cls, formats: Sequence[Any], dim: int) -> Self | None:
        """Rows (dim 1) or experts (dim 0) joined (see `WeightFormat.concat`). Parts laid out
        for the GPU ("kn", "tiled") go back to the storage layout first: `to` lays out the
        whole again."""
        if dim not in (0, 1):
            raise ValueError(f"concat along rows (1) or experts (0), not {dim}")
        if any(type(f) is not cls for f in formats):
            return None
        parts: list[Self] = [f.to_layout("nk") for f in formats]
        first = parts[0]
        if any(f._join_key() != first._join_key() for f in parts):
            return None
        stacked = first.stacked or dim == 0
        if dim == 1 and any(f.stacked != first.stacked for f in parts):
            return None
        if len(parts) == 1:
            return first if stacked == first.stacked else first._relaid(
                first.qweight, first.scales, first.mins, "nk", stacked)
        mins = None
        if first.mins is not None:
            mins = torch.cat([f.mins for f in parts if f.mins is not None], dim)
        return cls(torch.cat([f.qweight for f in parts], dim),
                   torch.cat([f.scales for f in parts], dim), mins,
                   group_size=first.group_size, stacked=stacked, act_dtype=first.act_dtype)

    @classmethod
    def concat_experts(cls, rows: Sequence[Sequence[Any]]) -> Self | None:
        """Each expert's dense row parts joined into one stack with a single copy: the rows of all
        parts, concatenated in (expert, row) order, are the [E, N, ...] stack in memory."""
        sizes = {sum(f.out_features for f in r) for r in rows}
        if len(sizes) != 1 or any(f.stacked for r in rows for f in r):
            return None
        flat = cls.concat([f for r in rows for f in r], 1)
        if flat is None:
            return None

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(len(rows), -1, t.shape[-1])

        mins = split(flat.mins) if flat.mins is not None else None
        return flat._relaid(split(flat.qweight), split(flat.scales), mins, "nk", stacked=True)

    def take_rows(self, rows: torch.Tensor) -> Self:
        """Output rows `rows` of every expert; codes, scales and mins move with their row."""
        nk = self.to_layout("nk")
        mins = nk.mins[:, rows] if nk.mins is not None else None
        return nk._relaid(nk.qweight[:, rows], nk.scales[:, rows], mins, "nk")

    @property
    def kn_ok(self) -> bool:
        """Whether rows pack into whole int32 words (K a multiple of 8 codes for int4,
        4 for int8)."""
        return self.in_features % (32 // self.bits) == 0

    def to_layout(self, layout: str) -> Self:
        """The same weight with codes [E, N, K'] ("nk", storage and CPU), words
        [E, K/VALS, N] ("kn"), or those words in the tensor-core GEMV's load order ("tiled";
        scales and mins as in "kn").

        "kn" puts output channels on the fast axis: GPU threads then run along N, so a warp's loads
        coalesce and each thread accumulates its own outputs over K (kernels/triton/quant_gemv.py).
        """
        if layout == self.layout:
            return self
        if self.layout == "tiled":  # kn and tiled share the scales' layout
            as_kn = self._relaid(untile_words(self.qweight), self.scales, self.mins, "kn")
            return as_kn.to_layout(layout)
        if layout == "tiled" and self.layout == "kn":
            return self._relaid(tile_words(self.qweight), self.scales, self.mins, layout)
        mins = swap_nk(self.mins) if self.mins is not None else None  # between nk and kn / tiled
        if layout == "tiled":  # from nk: tile a transposed view, so that only one copy is made
            kn = self.qweight.contiguous().view(torch.int32).transpose(1, 2)
            return self._relaid(tile_words(kn), swap_nk(self.scales), mins, layout)
        if layout == "kn":
            q = swap_nk(self.qweight.contiguous().view(torch.int32))
        else:
            q = kn_to_nk(self.qweight, self.bits)
        return self._relaid(q, swap_nk(self.scales), mins, layout)

    def _relaid(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                layout: str, stacked: bool | None = None) -> Self:
        return type(self)(qweight, scales, mins, group_size=self.group_size,
                          stacked=self.stacked if stacked is None else stacked,
                          act_dtype=self.act_dtype, layout=layout)

    def append_experts(self, other: Any) -> Self | None:
        """This stack with `other`'s experts (a stack, or a dense weight of the same shape)
        after its own, in this stack's layout and on its device; None where they do not join."""
        if (type(other) is not type(self) or not self.stacked
                or other._join_key() != self._join_key() or other.bits != self.bits
                or (other.out_features, other.in_features)
                != (self.out_features, self.in_features)):
            return None
        o = other.to(self.qweight.device).to_layout(self.layout)
        mins = None
        if self.mins is not None and o.mins is not None:
            mins = torch.cat([self.mins, o.mins])
        return self._relaid(torch.cat([self.qweight, o.qweight]),
                            torch.cat([self.scales, o.scales]), mins, self.layout)

    def mapped_to(self, device: torch.device) -> Self:
        """This stack (in RAM) in the layout the GPU kernels read on `device`, page-locked: a
        stack a CUDA device reads across the host link (`spillover.offload.mapped`)."""
        from spillover.kernels.quant_dispatch import gpu_layout

        laid = self.to_layout(gpu_layout(self, device) if self.kn_ok else "nk")
        mins = laid.mins.pin_memory() if laid.mins is not None else None
        return laid._relaid(laid.qweight.pin_memory(), laid.scales.pin_memory(), mins,
                            laid.layout)

    @property
    def nbytes(self) -> int:
        """Packed bytes: the same in every layout, so counted where they are (no nk copy)."""
        parts = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def __repr__(self) -> str:
        shape = [self.num_experts] if self.stacked else []
        return (f"{type(self).__name__}(shape={shape + [self.out_features, self.in_features]}, "
                f"group={self.group_size}, sym={self.symmetric})")

    # ---- expert subsets (tiered banks: GPU slots, host rows, staging) ---------------------------
    def take_experts(self, experts: Sequence[int]) -> GroupedIntWeight:
        """The stacked weight of `experts` (in that order), same layout and device: a copy."""
        idx = torch.as_tensor(list(experts), dtype=torch.int64, device=self.qweight.device)
        return self._relaid(self.qweight[idx], self.scales[idx],
                           self.mins[idx] if self.mins is not None else None, self.layout)

    def expert_range(self, start: int, stop: int) -> Self:
        """Experts start..stop-1 as a view (no copy: pinned RAM stays pinned)."""
        mins = self.mins[start:stop] if self.mins is not None else None
        return self._relaid(self.qweight[start:stop], self.scales[start:stop], mins, self.layout)

    def put_experts_(self, slots: Sequence[int], src: Any) -> None:
        """Overwrite experts `slots` with `src`'s experts in order (same layout and device)."""
        idx = torch.as_tensor(list(slots), dtype=torch.int64, device=self.qweight.device)
        for dst, part in zip((self.qweight, self.scales, self.mins),
                             (src.qweight, src.scales, src.mins), strict=True):
            if dst is not None and part is not None:
                dst[idx] = part

