"""The converter's row-streaming path writes the same bytes as the whole-tensor path (produce())."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import spillover.weights.convert_stream as cs
from spillover.weights.convert import convert
from spillover.weights.store import open_store

FP8 = torch.float8_e4m3fn


def _source(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(77, 64, generator=g).bfloat16(),  # kept: raw copy
        "model.layers.0.self_attn.q_proj.weight": torch.randn(100, 256, generator=g).bfloat16(),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(33, 128, generator=g).half(),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(45, 128, generator=g),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(3, 70, 128, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(300, 256, generator=g).to(FP8),
        "model.layers.0.mlp.down_proj.weight_scale_inv": torch.rand(3, 2, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2, 130, 128, generator=g).to(FP8),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 2, 1, generator=g),
        # 96 % 128: dense
        "model.layers.0.mlp.gate_proj.weight": torch.randn(40, 96, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(64),
        # kept as FP8 by the policy: the whole-tensor path, buffered writes beside the streamed ones
        "model.layers.0.mlp.shared_expert_gate.weight": torch.randn(130, 128, generator=g).to(FP8),
        "model.layers.0.mlp.shared_expert_gate.weight_scale_inv": torch.rand(2, 1, generator=g),
        "model.layers.0.mlp.gate.weight": torch.zeros(0, 64).bfloat16(),  # empty: kept, no chunks
    }
    flat = t["model.layers.0.self_attn.q_proj.weight"]
    flat[0, :64] = torch.tensor([2.0, -2.0] * 32)  # exact +-max ties
    flat[1, :128] = -0.0
    folder.mkdir(parents=True)
    save_file(t, str(folder / "model.safetensors"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


@pytest.mark.parametrize(("quant", "group", "sym", "workers"),
                         [("int4", 32, True, 1), ("int4", 128, False, 3), ("int8", 128, True, 2)])
def test_streamed_store_equals_whole_tensor_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  quant: str,
                                                  group: int, sym: bool, workers: int) -> None:
    _source(tmp_path / "src")
    monkeypatch.setattr(cs, "WORKERS", workers)
    monkeypatch.setattr(cs, "CHUNK_ELEMS", 7 * 128)  # several chunks per tensor, ragged last ones
    monkeypatch.setattr(cs, "MIN_CHUNK_ELEMS", 1)
    monkeypatch.setattr(cs, "COPY_CHUNK", 1000)
    calls: list[bool] = []
    real = cs.Streamer.write

    def spy(self: cs.Streamer, *a: object) -> bool:
        calls.append(real(self, *a))  # type: ignore[arg-type]
        return calls[-1]

    monkeypatch.setattr(cs.Streamer, "write", spy)
    streamed = convert(tmp_path / "src", tmp_path / "a", quant, group, symmetric=sym,
                       shard_bytes=60000, show_progress=False)
    assert len(calls) == 11 and sum(calls) == 10  # all but the kept FP8 tensor stream
    monkeypatch.setattr(cs.Streamer, "write", lambda *a: False)
    whole = convert(tmp_path / "src", tmp_path / "b", quant, group, symmetric=sym,
                    shard_bytes=60000, show_progress=False)
    assert _digest(streamed) == _digest(whole)
    store = open_store(streamed)
    store.verify()
    assert store.manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]["format"] == quant


def test_workers_keep_callers_threads_and_raise_failures() -> None:
    before = torch.get_num_threads()
    pool = cs._workers(3)
    assert torch.get_num_threads() == before
    seen: list[int] = []

    def count() -> None:
        seen.append(torch.get_num_threads())

    def fail() -> None:
        raise RuntimeError("chunk failed")

    pool.run([count] * 6)
    assert seen == [1] * 6  # the workers' ops are single-threaded
    with pytest.raises(RuntimeError, match="chunk failed"):
        pool.run([count, fail, count])
    assert torch.get_num_threads() == before


def test_chunk_failure_surfaces_and_resume_is_identical(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _source(tmp_path / "src")
    monkeypatch.setattr(cs, "WORKERS", 2)
    monkeypatch.setattr(cs, "CHUNK_ELEMS", 7 * 128)
    monkeypatch.setattr(cs, "MIN_CHUNK_ELEMS", 1)
    kw = {"shard_bytes": 20000, "show_progress": False}
    ref = _digest(convert(tmp_path / "src", tmp_path / "ref", "int4", 32, **kw))  # type: ignore[arg-type]
    real = cs.RowPacker.pack_into
    calls = {"n": 0}

    def flaky(self: cs.RowPacker, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("disk on fire")
        real(self, x, out)

    monkeypatch.setattr(cs.RowPacker, "pack_into", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(tmp_path / "src", tmp_path / "out", "int4", 32, **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(cs.RowPacker, "pack_into", real)
    assert _digest(convert(tmp_path / "src", tmp_path / "out", "int4", 32, **kw)) == ref  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "k", "workers"),
                         [(512, 2048, 2), (32768, 2048, 4), (3, 64, 2), (1, 4096, 8)])
def test_row_ranges_cover_rows_once(rows: int, k: int, workers: int) -> None:
    ranges = cs._row_ranges(rows, k, 1 << 20, workers)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:] + [(rows, rows)],
                                                          strict=True))
    assert all((b - a) * k <= (1 << 20) + k for a, b in ranges)  # bounded by the chunk size
    if rows * k >= workers * cs.MIN_CHUNK_ELEMS:
        assert len(ranges) >= workers  # big enough tensors keep every worker busy
