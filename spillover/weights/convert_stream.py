"""The converter's fast path: stream one planned tensor from the source file into its shard by rows.

Float (bf16/fp16/fp32/FP8) matrices going to int4/int8, and tensors kept as they are, never exist
whole in memory: a few MB of rows are read straight into a reused buffer, widened to float32 in a
reused scratch, packed by `RowPacker` (bit-identical to whole-tensor RTN, see its tests) and written
at their final offsets in the shard. Peak memory is a few chunks, whatever the tensor's size.
Everything else (GGUF blocks, pre-quantized checkpoint modules, FP8 kept as FP8) returns False and
takes `produce()`'s whole-tensor path.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

import torch

from spillover.quant.packing import CHUNK_ELEMS, RowPacker
from spillover.weights.store import ShardWriter, StoreError

if TYPE_CHECKING:
    from spillover.quant.importers.source import Source, SourceTensor
    from spillover.weights.convert import Planned

COPY_CHUNK = 8 << 20  # bytes per read+write when a tensor is kept as stored
FP8_BLOCK = 128


class Streamer:
    """Owns the reused buffers, so a whole conversion allocates them once."""

    def __init__(self, chunk_elems: int | None = None) -> None:
        self.chunk_elems = chunk_elems or CHUNK_ELEMS
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._packers: dict[tuple[int, int, bool, torch.dtype], RowPacker] = {}

    def raw(self, nbytes: int) -> torch.Tensor:
        if self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        return self._raw[:nbytes]

    def packer(self, bits: int, group: int, symmetric: bool, sdt: torch.dtype) -> RowPacker:
        key = (bits, group, symmetric, sdt)
        if key not in self._packers:
            self._packers[key] = RowPacker(bits, group, symmetric, sdt, self.chunk_elems)
        return self._packers[key]

    def write(self, source: Source, p: Planned, writer: ShardWriter) -> bool:
        """Write all of `p`'s parts; False (nothing written) if `p` needs the whole-tensor path."""
        t = p.src
        if p.entry is not None or t.gguf_type is not None or not t.dtype.is_floating_point:
            return False
        if p.fmt == "dense" and p.scale is None and set(p.parts) == {"weight"}:
            spec = p.parts["weight"]
            if spec.dtype != t.dtype or tuple(spec.shape) != tuple(t.shape):
                return False
            self._copy(source, t, writer, spec.key)
            return True
        if p.fmt in ("int4", "int8") and len(t.shape) in (2, 3):
            return self._pack(source, p, writer)
        return False

    def _copy(self, source: Source, t: SourceTensor, writer: ShardWriter, key: str) -> None:
        buf = self.raw(min(COPY_CHUNK, t.nbytes))
        with source.reader(t) as r:
            for off in range(0, t.nbytes, COPY_CHUNK):
                chunk = r.read_into(buf[:min(COPY_CHUNK, t.nbytes - off)], off)
                write_at(writer, key, off, chunk)
        writer.pending.discard(key)

    def _pack(self, source: Source, p: Planned, writer: ShardWriter) -> bool:
        t = p.src
        k, rows = t.shape[-1], prod(t.shape[:-1])
        bits = 4 if p.fmt == "int4" else 8
        # The same arguments as produce() -> pack_weight(): int8 is per channel there.
        group = int(p.meta["group_size"]) if bits == 4 else k
        scales = p.parts.get("scales")
        if scales is None or k % group or k % 2:
            return False
        packer = self.packer(bits, group, bool(p.meta["symmetric"]), torch.float16)  # as pack_weight()
        layout = packer.part_dtypes(k)
        if set(layout) != set(p.parts) or any(
                (p.parts[n].dtype, tuple(p.parts[n].shape)) != (dt, (*t.shape[:-1], c))
                for n, (dt, c) in layout.items()):
            return False
        dequant = _Fp8Rows.of(source, p) if p.scale is not None else None
        if p.scale is not None and dequant is None:
            return False
        step = packer.rows_per_chunk(k)
        row_bytes = k * t.dtype.itemsize
        outs = {n: torch.empty(min(step, rows), c, dtype=dt) for n, (dt, c) in layout.items()}
        with source.reader(t) as r:
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                raw = r.read_into(self.raw(n * row_bytes), r0 * row_bytes)
                x = packer.scratch(n, k).copy_(raw.view(t.dtype).view(n, k))
                if dequant is not None:
                    dequant.apply(x, r0)
                views = {name: o[:n] for name, o in outs.items()}
                packer.pack_into(x, views)
                for name, v in views.items():
                    write_at(writer, p.parts[name].key, r0 * v.shape[1] * v.element_size(), v)
        for spec in p.parts.values():
            writer.pending.discard(spec.key)
        return True


class _Fp8Rows:
    """Row-chunk form of `dequant_fp8_block_ref` (w = fp8 * scale of its 128x128 block), same products."""

    def __init__(self, scale: torch.Tensor, n: int, k: int) -> None:
        self.scale = scale.float().reshape(-1, scale.shape[-1])  # [lead * N/128, K/128]
        self.n, self.k, self.nrb = n, k, scale.shape[-2]

    @classmethod
    def of(cls, source: Source, p: Planned) -> _Fp8Rows | None:
        assert p.scale is not None
        t = p.src
        n, k = t.shape[-2:]
        scale = source.read(p.scale)
        if t.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (
                *t.shape[:-2], -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)):
            return None  # produce() decides what an odd pairing means
        return cls(scale, n, k)

    def apply(self, x: torch.Tensor, r0: int) -> None:
        r = torch.arange(r0, r0 + x.shape[0])
        rows = self.scale[(r // self.n) * self.nrb + (r % self.n) // FP8_BLOCK]
        x.mul_(rows.repeat_interleave(FP8_BLOCK, dim=1)[:, :self.k])


def write_at(writer: ShardWriter, key: str, byte_offset: int, tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes (typed, or raw uint8) at `byte_offset` inside part `key`.

    Uses the writer's own file object and offsets, exactly as `ShardWriter.write`; the caller marks
    the part written once all of it is.
    """
    off, spec = writer.offsets[key]
    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    if tensor.dtype not in (spec.dtype, torch.uint8) or byte_offset + data.numel() > spec.nbytes:
        raise StoreError(f"{key}: {tensor.dtype} write of {data.numel()} bytes at {byte_offset} does not fit "
                         f"the planned {spec.dtype} {spec.shape}")
    writer.f.seek(writer.data_start + off + byte_offset)
    writer.f.write(data.numpy().data)
