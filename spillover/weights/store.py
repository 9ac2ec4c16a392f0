"""Our on-disk quantized store: safetensors shards + `manifest.json`, memory-mapped at load.

Layout of a store directory:
  manifest.json            {"spillover_store": 1, "source": {...identity}, "quant": {...},
                            "tensors": {name: {format, meta, shape, shard, parts: {part: key}}},
                            "shards": {file: {sha256, bytes}}}
  model-0000i-of-0000n.safetensors   plain safetensors; a quantized tensor `w` is stored as its
                            parts `w#qweight`, `w#scales` (and `w#mins`), a kept one under its name.
  (config / tokenizer files copied from the source)
The format of every tensor is recorded in the manifest, never guessed from names (style rule 8).
`ShardWriter` writes a shard whose layout is fixed up front (so tensors stream in with bounded RAM
and the bytes are deterministic); tensors are ordered by element size so every offset is aligned.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spillover.quant import QuantFormat, format_from_tensors

MANIFEST = "manifest.json"
STORE_VERSION = 1
DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
    torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class PartSpec:
    key: str  # safetensors key
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def part_key(name: str, part: str, fmt: str) -> str:
    return name if fmt == "dense" else f"{name}#{part}"


class ShardWriter:
    """Writes one safetensors file whose keys, dtypes and shapes are known before any data."""

    def __init__(self, path: Path, parts: list[PartSpec]) -> None:
        # NOTE: largest element size first keeps every tensor aligned for zero-copy views at load.
        ordered = sorted(parts, key=lambda p: -torch.empty(0, dtype=p.dtype).element_size())
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, PartSpec]] = {}
        pos = 0
        for p in ordered:
            header[p.key] = {"dtype": DTYPES[p.dtype], "shape": list(p.shape),
                             "data_offsets": [pos, pos + p.nbytes]}
            self.offsets[p.key] = (pos, p)
            pos += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.data_start + pos)
        self.pending = set(self.offsets)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        off, spec = self.offsets[key]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise StoreError(f"{key}: planned {spec.dtype} {spec.shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
        self.f.seek(self.data_start + off)
        self.f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.pending.discard(key)

    def close(self) -> None:
        if self.pending:
            raise StoreError(f"{self.path}: parts never written: {sorted(self.pending)[:3]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Store:
    """A converted store opened for reading; shards are memory-mapped (copy-on-write, lazy)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise StoreError(f"{self.path}: no {MANIFEST} (not a spillover store, or "
                             "conversion unfinished)")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("spillover_store") != STORE_VERSION:
            raise StoreError(f"{mf}: unsupported store version "
                             f"{self.manifest.get('spillover_store')}")
        self._maps: dict[str, tuple[torch.Tensor, int, dict[str, Any]]] = {}

    def _shard(self, name: str) -> tuple[torch.Tensor, int, dict[str, Any]]:
        if name not in self._maps:
            path = self.path / name
            size = path.stat().st_size
            buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
            (hlen,) = struct.unpack("<Q", bytes(buf[:8].tolist()))
            header = json.loads(bytes(buf[8:8 + hlen].numpy()))
            self._maps[name] = (buf, 8 + hlen, header)
        return self._maps[name]

    def raw(self, shard: str, key: str) -> torch.Tensor:
        buf, start, header = self._shard(shard)
        info = header[key]
        b, e = info["data_offsets"]
        return buf[start + b:start + e].view(TORCH_DTYPES[info["dtype"]]).view(info["shape"])

    def names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def entry(self, name: str) -> dict[str, Any]:
        return dict(self.manifest["tensors"][name])

    def tensor(self, name: str) -> torch.Tensor:
        """A kept (dense) tensor, as stored."""
        ent = self.manifest["tensors"][name]
        if ent["format"] != "dense":
            raise StoreError(f"{name} is stored as {ent['format']}; use weight()")
        return self.raw(ent["shard"], ent["parts"]["weight"])

    def weight(self, name: str,
               act_dtype: torch.dtype = torch.bfloat16) -> QuantFormat | torch.Tensor:
        """The format object for a quantized tensor (views into the mapped shard),
        else the tensor."""
        ent = self.manifest["tensors"][name]
        if ent["format"] == "dense":
            return self.tensor(name)
        parts = {p: self.raw(ent["shard"], k) for p, k in ent["parts"].items()}
        return format_from_tensors(parts, ent["meta"], act_dtype)

    def verify(self) -> None:
        """Recompute every shard checksum; raises StoreError on the first mismatch."""
        for shard, info in self.manifest["shards"].items():
            got = sha256_file(self.path / shard)
            if got != info["sha256"]:
                raise StoreError(f"{self.path / shard}: sha256 {got} != manifest {info['sha256']}")


def open_store(path: str | Path) -> Store:
    return Store(path)


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
