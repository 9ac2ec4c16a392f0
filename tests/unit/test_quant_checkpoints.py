"""Pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors, Qwen FP8) load packed and exact.

Each tiny random model is quantized with plain torch into the format's on-disk layout
(docs/quantization.md, "1. What we load") and saved with a realistic `quantization_config`; a float
checkpoint of the exact dequantized values is the reference. Loading the quantized folder (and its
`spillover convert` store) must give the reference logits, with the modules really packed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from spillover import LLM
from spillover.layers.linear import Linear
from spillover.offload.bank import is_expert_bank
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight
from spillover.quant.importers.awq import ORDER
from spillover.quant.importers.checkpoint import (
    CheckpointQuantError,
    detect_quantization,
    iter_checkpoint,
)
from spillover.quant.importers.gptq import ActOrderNotSupported
from spillover.weights.convert import convert
from spillover.weights.store import open_store
from tests.models.tiny import CONFIGS, save_hf
from tests.unit.test_quant_importers import _pack_nibbles

G = 32  # divides every in_features of the tiny configs
# Left in float by the quantizers, as in published checkpoints: router, shared-expert gate, GDN's
# in_proj_ba (and lm_head, embeddings, norms, conv, which are not layer linears)
FLOAT = re.compile(r"\.mlp\.gate\.weight$|shared_expert_gate|in_proj_ba|conv1d")
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*in_proj_ba$"]
# FP8 blocks are 128 x 128: these variants have every merged part (q|k|v, gate|up) a whole
# number of blocks
FP8_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-fp8": ("Qwen3Config",
                  dict(hidden_size=128, intermediate_size=256, head_dim=64, num_hidden_layers=2,
                       tie_word_embeddings=False)),
    "qwen3_moe-fp8": ("Qwen3MoeConfig",
                      dict(hidden_size=128, head_dim=64, num_hidden_layers=2, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=128,
                           norm_topk_prob=True)),
}

Parts = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- writing checkpoints in each layout --------------------------------------------------------

def _rtn(w: torch.Tensor, sym: bool,
         sdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [N, K] in 0..15, zeros z [N, K/G], scales s [N, K/G] (sdt) with w ~ s * (q - z)."""
    n, k = w.shape
    g = w.float().reshape(n, k // G, G)
    if sym:
        s = (g.abs().amax(-1) / 7).clamp_min(1e-6).to(sdt)
        z = torch.full(s.shape, 8, dtype=torch.long)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp_min(1e-6).to(sdt)
        z = torch.round(-lo / s.float()).clamp(0, 15).long()
    q = (torch.round(g / s.float()[..., None]) + z[..., None]).clamp(0, 15).long().reshape(n, k)
    return q, z, s


def _dequant(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q - z.repeat_interleave(G, 1)).float() * s.float().repeat_interleave(G, 1)


def _gptq(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    q, z, s = _rtn(w, sym, torch.float16)
    k = w.shape[1]
    parts = {"qweight": _pack_nibbles(q).T.contiguous(),  # [K/8, N], packed along K
             "qzeros": _pack_nibbles((z.T - 1) & 15),  # v1 ("gptq") stores zero - 1, packed along N
             "scales": s.T.contiguous(), "g_idx": (torch.arange(k) // G).int()}
    return parts, _dequant(q, z, s)


def _awq(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    q, z, s = _rtn(w, sym, torch.float16)
    parts = {"qweight": _pack_nibbles(q.T.contiguous(), ORDER),  # [K, N/8], interleaved along N
             "qzeros": _pack_nibbles(z.T.contiguous(), ORDER), "scales": s.T.contiguous()}
    return parts, _dequant(q, z, s)


def _compressed_tensors(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q, z, s = _rtn(w, sym, torch.bfloat16)
    # signed codes q - 8 and zero points z - 8: w = (q_signed - zp) * scale
    parts = {"weight_packed": pack_to_int32((q - 8).to(torch.int8), 4), "weight_scale": s,
             "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    if not sym:
        parts["weight_zero_point"] = pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0)
    return parts, _dequant(q, z, s)


def _fp8(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    n, k = w.shape
    b = 128
    padded = torch.nn.functional.pad(w.float(), (0, -k % b, 0, -n % b))
    tiles = padded.unflatten(1, (-1, b)).unflatten(0, (-1, b))
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-8)  # [N/b, K/b]
    full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    q = (w.float() / full).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale}, q.float() * full


def _ct_fp8(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    """compressed-tensors float-quantized FP8_BLOCK: Qwen's FP8 pair under the name weight_scale."""
    parts, ref = _fp8(w, sym)
    return {"weight": parts["weight"], "weight_scale": parts["weight_scale_inv"]}, ref


def _ct_fp8_channel(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    """compressed-tensors float-quantized FP8_DYNAMIC weights: e4m3 [N, K], one float32 scale
    per row [N, 1]."""
    scale = (w.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-8)
    q = (w.float() / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def _ct_int8(w: torch.Tensor, sym: bool) -> tuple[Parts, torch.Tensor]:
    """compressed-tensors int-quantized W8A8 weights: int8 [N, K], per-channel bf16 scale [N, 1]
    (and, as some writers do, an all-zero weight_zero_point)."""
    s = (w.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-6).bfloat16()
    q = torch.round(w.float() / s.float()).clamp(-127, 127).to(torch.int8)
    parts = {"weight": q, "weight_scale": s}
    if not sym:  # (used as "with zero points" here: int8 stays symmetric)
        parts["weight_zero_point"] = torch.zeros(s.shape, dtype=torch.int8)
    return parts, q.float() * s.float()


def _qconfig(method: str, sym: bool) -> dict[str, Any]:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": False, "sym": sym,
                "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
                "lm_head": False,
                "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:2.2.0"]}}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm",
                "zero_point": True, "modules_to_not_convert": ["gate", "in_proj_ba"]}
    if method == "compressed-tensors":
        weights = {"num_bits": 4, "type": "int", "symmetric": sym, "group_size": G,
                   "strategy": "group",
                   "dynamic": False, "actorder": None, "block_structure": None,
                   "observer": "minmax"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "kv_cache_scheme": None,
                "global_compression_ratio": None,
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": None,
                                              "output_activations": None}},
                "ignore": IGNORE}
    if method in ("ct-fp8", "ct-fp8-channel", "ct-int8"):
        if method == "ct-fp8":
            weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                       "strategy": "block",
                       "block_structure": [128, 128], "dynamic": False, "observer": "minmax"}
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 128,
                    "strategy": "group", "dynamic": True, "observer": None}
        elif method == "ct-fp8-channel":  # llm-compressor's FP8_DYNAMIC preset
            weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                       "strategy": "channel",
                       "block_structure": None, "dynamic": False, "observer": "minmax"}
            acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                    "dynamic": True, "observer": None}
        else:
            weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                       "strategy": "channel", "dynamic": False, "observer": "minmax"}
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                    "dynamic": True, "observer": None}
        fmt = "int-quantized" if method == "ct-int8" else "float-quantized"
        return {"quant_method": "compressed-tensors", "format": fmt,
                "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": acts,
                                              "output_activations": None}},
                "ignore": IGNORE}
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "mlp.gate", "shared_expert_gate"]}


WRITERS: dict[str, Callable[[torch.Tensor, bool], tuple[Parts, torch.Tensor]]] = {
    "gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _fp8,
    "ct-fp8": _ct_fp8, "ct-fp8-channel": _ct_fp8_channel, "ct-int8": _ct_int8}
# writer -> (quant_method in config.json, packed format type, its store name)
EXPECT: dict[str, tuple[str, type, str]] = {
    "gptq": ("gptq", Int4Weight, "int4"), "awq": ("awq", Int4Weight, "int4"),
    "compressed-tensors": ("compressed-tensors", Int4Weight, "int4"),
    "fp8": ("fp8", Fp8BlockWeight, "fp8_block"),
    "ct-fp8": ("compressed-tensors", Fp8BlockWeight, "fp8_block"),
    "ct-fp8-channel": ("compressed-tensors", Fp8BlockWeight, "fp8_block"),
    "ct-int8": ("compressed-tensors", Int8Weight, "int8")}


def _write(tmp: Path, model: str, method: str, sym: bool,
           tweak: Callable[[str, Parts], None] | None = None) -> tuple[Path, Path]:
    """(quantized checkpoint, float checkpoint of its exact dequantized weights)."""
    save_hf(model, tmp / "float")
    cfg = json.loads((tmp / "float" / "config.json").read_text())
    qdir, ref = tmp / f"{method}-ckpt", tmp / "reference"
    qdir.mkdir()
    ref.mkdir()
    out: Parts = {}
    dense: Parts = {}
    for name, t in load_file(str(tmp / "float" / "model.safetensors")).items():
        in_layer = name.startswith("model.layers.") and name.endswith(".weight")
        if in_layer and t.dim() == 2 and not FLOAT.search(name):
            parts, dense[name] = WRITERS[method](t, sym)
            if tweak is not None:
                tweak(name, parts)
            out.update({f"{name.removesuffix('.weight')}.{p}": v for p, v in parts.items()})
        else:  # published checkpoints keep these in 16 bits
            out[name] = t.bfloat16()
            dense[name] = out[name].float()
    # two shards cut through the middle, so one module's parts may sit in different files
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: out[k].contiguous() for k in keys}, str(qdir / file),
                  metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (qdir / "model.safetensors.index.json").write_text(json.dumps(index))
    (qdir / "config.json").write_text(json.dumps({**cfg,
                                                  "quantization_config": _qconfig(method, sym)}))
    save_file(dense, str(ref / "model.safetensors"))
    (ref / "config.json").write_text(json.dumps(cfg))
    return qdir, ref


def _drop(qdir: Path, name: str) -> None:
    """Remove one tensor from whichever shard holds it (a damaged checkpoint)."""
    for f in qdir.glob("*.safetensors"):
        t = load_file(str(f))
        if t.pop(name, None) is not None:
            save_file(t, str(f))


def _packed_types(llm: LLM) -> set[type]:
    found: set[type] = set()
    for m in llm.model.modules():
        if isinstance(m, Linear):
            found |= {type(m.fmt)} if m.fmt is not None else set()
        elif is_expert_bank(m):
            found |= {type(f) for f in m.formats().values() if f is not None}
    return found


def _dense_linears(llm: LLM) -> list[str]:
    """Layer linears left dense (those the writer quantized must all be packed)."""
    return [n for n, m in llm.model.named_modules() if isinstance(m, Linear) and m.fmt is None
            and n.startswith("model.layers.") and not FLOAT.search(n + ".weight")]


def _logits(model: Path, ids: list[int]) -> torch.Tensor:
    return LLM(model=str(model), device="cpu", dtype="float32").forward_logits(ids)


# ---- end to end --------------------------------------------------------------------------------

# prefill-sized (dequant + matmul) and decode-sized (CPU int4 op)
IDS = [list(range(3, 40)), [7, 1, 99]]
CASES = [
    ("gptq", "qwen3", True), ("gptq", "qwen3_moe-norm", False), ("awq", "llama-untied", False),
    ("awq", "qwen3_moe-norm", False), ("compressed-tensors", "qwen3", True),
    ("compressed-tensors", "qwen3_next", False), ("fp8", "qwen3-fp8", True),
    ("fp8", "qwen3_moe-fp8", True),
    ("ct-fp8", "qwen3_moe-fp8", True), ("ct-fp8-channel", "qwen3", True),
    ("ct-fp8-channel", "qwen3_moe-norm", True),
    ("ct-int8", "qwen3", True), ("ct-int8", "qwen3_moe-norm", False),
]


@pytest.mark.parametrize(("method", "model", "sym"), CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_checkpoint_loads_packed_and_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           method: str, model: str, sym: bool) -> None:
    if model in FP8_CONFIGS:
        monkeypatch.setitem(CONFIGS, model, FP8_CONFIGS[model])
    qdir, ref = _write(tmp_path, model, method, sym)
    quant = detect_quantization(qdir)
    quant_method, fmt_type, fmt_name = EXPECT[method]
    assert quant is not None and quant.method == quant_method
    llm = LLM(model=str(qdir), device="cpu", dtype="float32")
    assert _packed_types(llm) == {fmt_type}
    assert not _dense_linears(llm), "quantized modules were dequantized instead of kept packed"
    if CONFIGS[model][1].get("num_experts"):
        fmts = [f for m in llm.model.modules() if is_expert_bank(m) for f in m.formats().values()]
        assert fmts and all(isinstance(f, fmt_type) and f.stacked for f in fmts)
    probe = ("model.layers.0.mlp.down_proj.weight" if not CONFIGS[model][1].get("num_experts")
             else "model.layers.0.mlp.experts.1.down_proj.weight")
    assert llm.quant_record[probe] == f"{fmt_name} ({quant_method} checkpoint)"
    assert llm.quant_record["lm_head.weight"].startswith("dense")
    store = convert(qdir, tmp_path / "store", show_progress=False)
    entries = open_store(store).manifest["tensors"]
    formats = {e["format"] for n, e in entries.items() if "proj" in n and not FLOAT.search(n)}
    assert formats == {fmt_name}
    from_store = LLM(model=str(store), device="cpu", dtype="float32")
    assert _packed_types(from_store) == {fmt_type} and not _dense_linears(from_store)
    for ids in IDS:
        expected = _logits(ref, ids)
        for got in (llm.forward_logits(ids), from_store.forward_logits(ids)):
            assert (got - expected).abs().max().item() <= 1e-4


def test_asymmetric_module_with_all_zeros_at_8_joins_its_neighbours(tmp_path: Path) -> None:
    """An asym GPTQ module that happens to be symmetric still merges with q|k|v (one layout)."""
    def symmetric_q(name: str, parts: Parts) -> None:
        if name.endswith("layers.0.self_attn.q_proj.weight"):
            parts["qzeros"] = torch.full_like(parts["qzeros"], 0x77777777)  # v1: every zero 8

    qdir, _ = _write(tmp_path, "qwen3", "gptq", False, symmetric_q)
    items = {n: f for n, f, _ in iter_checkpoint(qdir, act_dtype=torch.float32)}
    assert items["model.layers.0.self_attn.q_proj.weight"].mins is not None
    assert not _dense_linears(LLM(model=str(qdir), device="cpu", dtype="float32"))


# ---- refusals ----------------------------------------------------------------------------------

def test_act_order_is_refused_naming_file_and_tensor(tmp_path: Path) -> None:
    def shuffle(name: str, parts: Parts) -> None:
        if name.endswith("layers.1.mlp.down_proj.weight"):
            perm = torch.randperm(len(parts["g_idx"]), generator=torch.Generator().manual_seed(0))
            parts["g_idx"] = parts["g_idx"][perm]

    qdir, _ = _write(tmp_path, "qwen3", "gptq", True, shuffle)
    with pytest.raises(ActOrderNotSupported, match=r"model-0000\d-of-00002\.safetensors: tensor "
                                                   r"model\.layers\.1\.mlp\.down_proj\.g_idx: "
                                                   r".*act-order"):
        LLM(model=str(qdir), device="cpu", dtype="float32")


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_other_bit_widths_are_refused(tmp_path: Path, method: str) -> None:
    qdir, _ = _write(tmp_path, "qwen3", method, True)
    cfg = json.loads((qdir / "config.json").read_text())
    q = cfg["quantization_config"]
    if method == "compressed-tensors":
        q["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    else:
        q["bits"] = 8
    (qdir / "config.json").write_text(json.dumps(cfg))
    marker = "weight_packed" if method == "compressed-tensors" else "qweight"
    pattern = (rf"safetensors: tensor model\.layers\.\d+\.\S+\.{marker}: "
               rf"{method} 8-bit weights are not supported")
    with pytest.raises(CheckpointQuantError, match=pattern):
        LLM(model=str(qdir), device="cpu", dtype="float32")
    with pytest.raises(CheckpointQuantError, match=pattern):
        convert(qdir, tmp_path / "store", show_progress=False)


def test_unknown_method_and_quant_flag_are_refused(tmp_path: Path) -> None:
    qdir, _ = _write(tmp_path, "qwen3", "awq", False)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(model=str(qdir), device="cpu", dtype="float32", quant="int4")
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointQuantError,
                       match=r"config\.json: quant_method 'bitsandbytes' is not supported; "
                             r"supported: awq, compressed-tensors, fp8, gptq"):
        LLM(model=str(qdir), device="cpu", dtype="float32")


def test_missing_part_is_refused(tmp_path: Path) -> None:
    qdir, _ = _write(tmp_path, "qwen3", "gptq", True)
    _drop(qdir, "model.layers.0.self_attn.o_proj.scales")
    with pytest.raises(CheckpointQuantError,
                       match=r"tensor model\.layers\.0\.self_attn\.o_proj\.qweight has no "
                             r"model\.layers\.0\.self_attn\.o_proj\.scales"):
        list(iter_checkpoint(qdir))


def test_legacy_quantize_config_json_is_read(tmp_path: Path) -> None:
    """Older AutoGPTQ folders carry their settings in quantize_config.json, not in config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert detect_quantization(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128,
                                                               "desc_act": False, "sym": True}))
    quant = detect_quantization(tmp_path)
    assert quant is not None
    assert (quant.method, quant.group_size, quant.checkpoint_format) == ("gptq", 128, "gptq")


def test_convert_resumes_byte_identical(tmp_path: Path) -> None:
    import hashlib

    qdir, _ = _write(tmp_path, "qwen3_moe-norm", "gptq", False)

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
                if p.is_file()}

    kw: dict[str, Any] = {"shard_bytes": 40_000, "show_progress": False}
    ref = digest(convert(qdir, tmp_path / "ref", **kw))
    assert sum(n.endswith(".safetensors") for n in ref) >= 3
    seen = 0

    def boom(name: str) -> None:
        nonlocal seen
        seen += 1
        if seen == 60:
            raise KeyboardInterrupt(name)

    with pytest.raises(KeyboardInterrupt):
        convert(qdir, tmp_path / "out", on_tensor=boom, **kw)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert digest(convert(qdir, tmp_path / "out", **kw)) == ref


def test_compressed_tensors_unsupported_schemes_are_refused_naming_the_config(
    tmp_path: Path,
) -> None:
    """Per-tensor FP8 and asymmetric int8 have no lossless home in our formats."""
    from spillover.quant.importers.checkpoint_config import parse_quantization

    q = _qconfig("ct-fp8", True)
    q["config_groups"]["group_0"]["weights"].update(strategy="tensor", block_structure=None)
    with pytest.raises(CheckpointQuantError,
                       match=r"x/config\.json: compressed-tensors float-quantized float8 "
                             r"weights with strategy 'tensor' are not supported"):
        parse_quantization(q, "x/config.json")
    q = _qconfig("ct-int8", True)
    q["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(CheckpointQuantError,
                       match="int-quantized 8-bit asymmetric weights are not supported"):
        parse_quantization(q, "x/config.json")


def test_int8_zero_points_and_missing_scales_are_refused_naming_file_and_tensor(
    tmp_path: Path,
) -> None:
    def shifted_zero(name: str, parts: Parts) -> None:
        if name.endswith("layers.1.mlp.up_proj.weight"):
            parts["weight_zero_point"] = torch.ones_like(parts["weight_zero_point"])

    qdir, _ = _write(tmp_path / "a", "qwen3", "ct-int8", False, shifted_zero)
    with pytest.raises(CheckpointQuantError,
                       match=r"safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight: "
                             r"cannot import as int8 \(int8 weight_zero_point is not all 0"):
        LLM(model=str(qdir), device="cpu", dtype="float32")

    qdir, _ = _write(tmp_path / "b", "qwen3", "ct-int8", True)
    _drop(qdir, "model.layers.0.self_attn.o_proj.weight_scale")
    with pytest.raises(CheckpointQuantError,
                       match=r"tensor model\.layers\.0\.self_attn\.o_proj\.weight is int8 but "
                             r"has no model\.layers\.0\.self_attn\.o_proj\.weight_scale"):
        list(iter_checkpoint(qdir))
