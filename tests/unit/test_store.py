"""ShardWriter layout (aligned, valid safetensors) and checksum verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spillover.weights.store import (
    MANIFEST,
    STORE_VERSION,
    PartSpec,
    ShardWriter,
    StoreError,
    open_store,
    sha256_file,
)


def _write(path: Path) -> dict[str, torch.Tensor]:
    tensors = {"a#qweight": torch.randint(0, 255, (3, 5), dtype=torch.uint8),
               "a#scales": torch.rand(3, 1).half(), "b": torch.rand(7),
               "c": torch.randint(-5, 5, (2, 3), dtype=torch.int8)}
    w = ShardWriter(path, [PartSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k in ("c", "a#scales", "b", "a#qweight"):  # any order: offsets are fixed up front
        w.write(k, tensors[k])
    w.close()
    return tensors


def test_shard_is_valid_safetensors_and_aligned(tmp_path: Path) -> None:
    tensors = _write(tmp_path / "s.safetensors")
    loaded = load_file(str(tmp_path / "s.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    raw = (tmp_path / "s.safetensors").read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    assert (8 + hlen) % 8 == 0
    for k, info in header.items():
        if k != "__metadata__":
            assert info["data_offsets"][0] % tensors[k].element_size() == 0


def test_writer_rejects_unplanned_shapes_and_missing_parts(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "x.safetensors", [PartSpec("a", torch.float32, (2,))])
    with pytest.raises(StoreError, match="planned"):
        w.write("a", torch.zeros(3))
    with pytest.raises(StoreError, match="never written"):
        w.close()


def test_verify_detects_corruption(tmp_path: Path) -> None:
    _write(tmp_path / "s.safetensors")
    manifest = {"spillover_store": STORE_VERSION, "source": {}, "quant": {},
                "tensors": {"b": {"format": "dense", "meta": {"format": "dense"}, "shape": [7],
                                  "shard": "s.safetensors", "parts": {"weight": "b"}}},
                "shards": {"s.safetensors": {"sha256": sha256_file(tmp_path / "s.safetensors"),
                                             "bytes": 0}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    store = open_store(tmp_path)
    store.verify()
    assert store.tensor("b").shape == (7,)
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "s.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        open_store(tmp_path).verify()
