"""GGUF files: metadata -> ModelConfig, tensors -> (HF name, dequantised tensor) one at a time.

Quantised types are dequantised at load for now (the quant package repacks them natively).
llama.cpp's converter permutes Llama's q/k rows for its interleaved RoPE; we undo that so the
model sees Hugging Face's rotate-half layout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spillover.models.config import ModelConfig
from spillover.weights.loader import WeightItem, WeightLoadError
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
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def iter_gguf(path: str | Path, cfg: ModelConfig) -> Iterator[WeightItem]:
    import gguf

    path = Path(path)
    reader = open_gguf(path)
    is_llama = cfg.extra.get("gguf_architecture") == "llama"
    for t in reader.tensors:
        if t.name in GGUF_IGNORED:
            continue
        name = gguf_to_hf(t.name)
        if name is None:
            raise WeightLoadError(f"{path}: unexpected tensor {t.name} (no mapping for this architecture)")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise WeightLoadError(f"{path}: tensor {t.name} has unsupported type {qtype}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        except Exception as e:
            raise WeightLoadError(f"{path}: tensor {t.name} cannot be decoded ({e})") from e
        if not arr.flags.writeable:  # F32/F16 tensors come straight from the read-only mmap
            arr = arr.copy()
        w = torch.from_numpy(arr)
        if is_llama and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif is_llama and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, w, str(path)
