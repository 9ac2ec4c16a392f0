"""GGUF files: metadata -> ModelConfig, tensors -> (HF name, dequantised tensor) one at a time.

Quantised types are dequantised at load by default; `iter_gguf(..., native=True)` instead yields
matrices as packed formats (spillover.quant.importers.gguf: lossless int4/int8 repacking), which the
loader installs with `set_format`. llama.cpp's converter permutes Llama's q/k rows for its
interleaved RoPE; we undo that (on dense rows, or on packed rows and their scales) so the model sees
Hugging Face's rotate-half layout.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spillover.config import ModelConfig
from spillover.quant import WeightFormat
from spillover.weights.loader import WeightLoadError
from spillover.weights.names import GGUF_IGNORED, gguf_to_hf

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}


@functools.lru_cache(maxsize=4)
def _open(path: Path, mtime_ns: int) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def open_gguf(path: str | Path) -> Any:
    """Parsed header + memory-mapped tensors; cached, since parsing a vocabulary takes seconds."""
    path = Path(path).resolve()
    try:
        return _open(path, path.stat().st_mtime_ns)
    except Exception as e:  # gguf raises ValueError/struct/mmap errors for bad or truncated files
        raise WeightLoadError(f"{path}: not a readable GGUF file ({e})") from e


def _release_pages(reader: Any, begin: int, end: int) -> None:
    """Unmap the file pages in [begin, end), whose tensors were already copied out.

    Without this, every page read stays mapped for as long as the cached reader lives. A 40 GB GGUF
    would then show 40 GB of resident memory on top of the model it was loaded into. The page cache
    keeps the data, so a later read costs no disk I/O.

    The caller releases everything from the first tensor up to the one just read, not only that
    tensor. A fault maps the whole page-cache folio it hits (2 MB on a recently written file), so
    reading a tensor maps again the tail of the tensors before it.
    """
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return  # not a file map, or a platform without madvise: pages stay, nothing breaks
    begin &= ~(mmap.PAGESIZE - 1)
    mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            meta[key] = range(len(field.data))  # only the count is needed here
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types we never read
            continue
    return meta


def gguf_config(path: str | Path) -> ModelConfig:
    reader = open_gguf(path)
    return ModelConfig.from_gguf(gguf_metadata(reader), {t.name for t in reader.tensors})


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # inverse of llama.cpp's permute: rows grouped (head, pair, half) -> (head, half, pair)
    shape = w.shape
    grouped = w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return grouped.transpose(1, 2).reshape(shape)


def gguf_rows_fix(gguf_name: str, item: torch.Tensor | WeightFormat, cfg: ModelConfig
                  ) -> torch.Tensor | WeightFormat:
    """Undo llama.cpp's q/k row permutation (Llama only) on a dense tensor or a packed format."""
    if cfg.extra.get("gguf_architecture") != "llama":
        return item
    if gguf_name.endswith("attn_q.weight"):
        heads = cfg.num_heads
    elif gguf_name.endswith("attn_k.weight"):
        heads = cfg.num_kv_heads
    else:
        return item
    if isinstance(item, torch.Tensor):
        return _unpermute(item, heads)
    # a packed format moves each row with its scales; where a scale block spans rows (FP8), the
    # dequantized weight is permuted instead
    moved = item.take_rows(_unpermute(torch.arange(item.out_features), heads))
    return moved if moved is not None else _unpermute(item.dequantize(), heads)


def iter_gguf(path: str | Path, cfg: ModelConfig, native: bool = False,
              act_dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Any, str]]:
    """(HF name, tensor, file) per tensor; with `native`, quantized matrices come as packed
    formats computing in `act_dtype` instead of float32 tensors."""
    import gguf

    from spillover.quant.importers.gguf import SUPPORTED as NATIVE_TYPES
    from spillover.quant.importers.gguf import import_gguf

    path = Path(path)
    reader = open_gguf(path)
    data_begin = min((int(t.data_offset) for t in reader.tensors), default=0)
    for t in reader.tensors:
        done = int(t.data_offset) + int(t.n_bytes)  # this tensor's end: all before it is copied out
        if t.name in GGUF_IGNORED:
            continue
        name = gguf_to_hf(t.name)
        if name is None:
            raise WeightLoadError(f"{path}: unexpected tensor {t.name} (no mapping for "
                                  "this architecture)")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise WeightLoadError(f"{path}: tensor {t.name} has unsupported type {qtype}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        if native and t.tensor_type in NATIVE_TYPES and len(shape) in (2, 3):
            try:  # copy: the reader's blocks are a read-only view of the file
                fmt = import_gguf(np.array(t.data), t.tensor_type, shape[-1], act_dtype)
            except Exception as e:
                raise WeightLoadError(f"{path}: tensor {t.name} cannot be repacked ({e})") from e
            _release_pages(reader, data_begin, done)
            yield name, gguf_rows_fix(t.name, fmt, cfg), str(path)
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        except Exception as e:
            raise WeightLoadError(f"{path}: tensor {t.name} cannot be decoded ({e})") from e
        if not arr.flags.writeable:  # F32/F16 tensors come straight from the read-only mmap
            arr = arr.copy()
        _release_pages(reader, data_begin, done)
        yield name, gguf_rows_fix(t.name, torch.from_numpy(arr), cfg), str(path)
