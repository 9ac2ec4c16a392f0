"""Read a source checkpoint tensor by tensor with bounded memory: safetensors folders/files or GGUF.

Tensors are read with positioned reads (no long-lived mmap), so resident memory holds only the
tensor being converted. GGUF quantized tensors come back as raw uint8 blocks with their type;
`identity()` fingerprints the source (file names, sizes, tensor directory) for the manifest and
for refusing to resume a conversion against a different source.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
             "I8": torch.int8, "I32": torch.int32, "I64": torch.int64,
             "F8_E4M3": torch.float8_e4m3fn,
             "BOOL": torch.bool}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    offset: int  # absolute byte offset in file
    nbytes: int
    dtype: torch.dtype  # storage dtype of what read() returns (uint8 for GGUF quantized blocks)
    shape: tuple[int, ...]  # logical shape, row-major [.., N, K]
    gguf_type: str | None = None  # GGMLQuantizationType name for GGUF tensors

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.gguf_type is None or self.dtype != torch.uint8:
            return self.shape
        return (*self.shape[:-1], self.nbytes // max(1, int(np.prod(self.shape[:-1]))))


class Source:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.kind = "gguf" if self.path.suffix == ".gguf" else "safetensors"
        self.tensors: list[SourceTensor] = (
            self._scan_gguf() if self.kind == "gguf" else self._scan_st())

    def _st_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors or .gguf source found")
        return files

    def _scan_st(self) -> list[SourceTensor]:
        out = []
        for f in self._st_files():
            with open(f, "rb") as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(hlen))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                b, e = info["data_offsets"]
                out.append(SourceTensor(name, str(f), 8 + hlen + b, e - b, ST_DTYPES[info["dtype"]],
                                        tuple(info["shape"])))
        return out

    def _scan_gguf(self) -> list[SourceTensor]:
        from gguf import GGMLQuantizationType as Q
        from gguf import GGUFReader

        reader = GGUFReader(self.path)
        out = []
        floats = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            dtype = floats.get(t.tensor_type, torch.uint8)
            qname = None if t.tensor_type in floats else t.tensor_type.name
            out.append(SourceTensor(t.name, str(self.path), int(t.data_offset), int(t.n_bytes),
                                    dtype, shape, qname))
        del reader  # drop the whole-file memmap
        return out

    def read(self, t: SourceTensor) -> torch.Tensor:
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        with TensorReader(t) as r:
            r.read_into(buf)
        return buf.view(t.dtype).reshape(t.stored_shape)

    def reader(self, t: SourceTensor) -> TensorReader:
        """Chunked reads of one tensor (the converter streams rows through a reused buffer)."""
        return TensorReader(t)

    def identity(self) -> str:
        h = hashlib.sha256()
        for f in sorted({t.file for t in self.tensors}):
            h.update(f"{Path(f).name}:{os.path.getsize(f)}\n".encode())
        for t in self.tensors:
            h.update(f"{t.name}:{t.offset}:{t.nbytes}:{t.dtype}:{t.shape}:{t.gguf_type}\n".encode())
        return h.hexdigest()


class TensorReader:
    """Positioned reads of one tensor's bytes straight into caller-owned buffers (no extra copy)."""

    def __init__(self, t: SourceTensor) -> None:
        self.t = t
        self.fd = os.open(t.file, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # a larger readahead window; Linux only, a hint
            os.posix_fadvise(self.fd, t.offset, t.nbytes, os.POSIX_FADV_SEQUENTIAL)

    def read_into(self, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Fill the contiguous CPU uint8 tensor `out` with bytes [offset, offset + len)
        of the tensor."""
        n = out.numel()
        if offset < 0 or offset + n > self.t.nbytes:
            raise ValueError(f"{self.t.name}: read of {n} bytes at {offset} outside its "
                             f"{self.t.nbytes}")
        view, got = out.numpy().data, 0
        while got < n:
            k = os.preadv(self.fd, [view[got:]], self.t.offset + offset + got)
            if k <= 0:
                raise OSError(f"{self.t.file}: short read for {self.t.name}")
            got += k
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
