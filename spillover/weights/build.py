"""Model-side entry points of the quant package: quantize a loaded model, or load a converted store.

`load_for_llm` is what `LLM(quant=...)` calls: it maps the user-facing choice (one of
spillover.quant.QUANT_CHOICES) onto a `QuantPolicy` (`load_policy`) and quantizes while loading
(spillover.weights.quantize_stream: each float tensor packed as it arrives, the float model never
held). `quantize_for_load(model, quant)`
quantizes an already loaded float model in place with the same policy, through `quantize_model`
(linears via `Linear.set_format`, MoE experts via the bank's `install`): the reference.
`load_from_store(path, cfg, device, dtype)` builds the model and fills it from a store written by
`spillover convert`, handing packed tensors to the loader as format objects (no dequantization).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spillover.config import ModelConfig
from spillover.layers.linear import Linear
from spillover.models.causal_lm import CausalLM
from spillover.offload.bank import is_expert_bank
from spillover.quant import normalize_quant
from spillover.weights.quantize import QuantPolicy, quantize_model

if TYPE_CHECKING:
    from spillover.weights.resolve import ModelSource

log = logging.getLogger(__name__)

# quantize at load
_FORMAT = {"int8": "int8", "int4": "int4", "fp8": "fp8_block", "int4-experts": "int8"}
_KEEP = ("auto", "bf16")  # no quantization at load: the checkpoint's own formats
# int4-experts: the routed experts' slots (a bank's "<bank>.w13" / "<bank>.w2") go to int4.
_EXPERT_SLOTS = ("*.experts.w13", "*.experts.w2")


def load_policy(quant: str, group_size: int, act_dtype: torch.dtype) -> QuantPolicy:
    """The policy behind a `--quant` choice.

    int4 is asymmetric RTN (float min per group): the robust data-free default
    (docs/quantization.md, "4. Accuracy"), and it is what every int4 kernel (Triton, CPU int4pack
    via zero = min + 8 scale) takes. int8 is symmetric per output channel, the layout torch's CPU
    int8 op needs (the int8 pack has no zero point, so int4-experts, int4 experts over int8 layers,
    can be asymmetric throughout).
    """
    quant = normalize_quant(quant)
    if quant not in _FORMAT:
        raise ValueError(f"quant must be one of {', '.join(_FORMAT)} here, got {quant!r}")
    if quant in ("int4", "int4-experts") and group_size not in (32, 64, 128):
        raise ValueError(f"int4 group size must be 32, 64 or 128, got {group_size}")
    experts = dict.fromkeys(_EXPERT_SLOTS, "int4") if quant == "int4-experts" else {}
    return QuantPolicy(default=_FORMAT[quant], group_size=group_size,
                       symmetric=quant not in ("int4", "int4-experts"), overrides=experts,
                       act_dtype=act_dtype)


def quantize_for_load(model: CausalLM, quant: str | None, group_size: int = 128) -> dict[str, str]:
    """Quantize `model` in place; returns {name: "format (reason)"} ({} for auto / bf16).

    Formats compute in the model's dtype (float32 in CPU tests, bf16 on the GPU). Router, norms,
    embeddings, lm_head and the linear-attention conv/gate scalars stay in float (DEFAULT_KEEP).
    """
    quant = normalize_quant(quant)
    if quant in _KEEP:
        return {}
    if quant not in _FORMAT:  # checked before touching the model
        raise ValueError(f"quant must be one of {', '.join(_KEEP + tuple(_FORMAT))} here, got "
                         f"{quant!r} (native needs a GGUF file: load_for_llm)")
    policy = load_policy(quant, group_size, model.model.embed_tokens.weight.dtype)
    record = quantize_model(model, policy)
    _log_fallback(record, quant, group_size)
    return record


def _log_fallback(record: dict[str, str], quant: str, group_size: int) -> None:
    fallback = [n for n, r in record.items() if "not a multiple" in r]
    if fallback:
        log.info("quant %s: %d tensors fell back to int8 per channel (in_features not "
                 "a multiple of %d)",
                 quant, len(fallback), group_size)


def load_for_llm(source: ModelSource, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 quant: str | None = None,
                 group_size: int = 128) -> tuple[CausalLM, dict[str, str]]:
    """What `LLM.__init__` calls: (model, per-tensor format record).

    quant (spillover.quant.QUANT_CHOICES): "auto" and "bf16" load the checkpoint's formats (a GGUF
    dequantized; a store or pre-quantized checkpoint packed as it is); "native" keeps a GGUF's
    quantized matrices in their own blocks (lossless int4/int8 repack, computed by our kernels);
    int8 / int4 / fp8 / int4-experts quantize each float tensor as it is loaded.
    """
    quant = normalize_quant(quant)
    if source.kind == "store":
        _loads_packed(source.path, "a converted store", quant)
        from spillover.weights.store import open_store

        entries = open_store(source.path).manifest["tensors"]
        record = {n: f"{e['format']} (store: {e.get('reason', '')})" for n, e in entries.items()}
        return load_from_store(source.path, cfg, device, dtype), record
    if source.kind == "hf":
        from spillover.quant.importers.checkpoint import (
            checkpoint_record,
            detect_quantization,
            iter_checkpoint,
        )

        qcfg = detect_quantization(source.path)
        # GPTQ / AWQ / compressed-tensors / FP8 checkpoint: its modules stay packed
        if qcfg is not None:
            _loads_packed(source.path, f"a {qcfg.method} checkpoint", quant)
            model = load_items(iter_checkpoint(source.path, qcfg, dtype), cfg, device, dtype)
            return model, checkpoint_record(source.path, qcfg)
    if quant == "native":
        if source.kind != "gguf":
            raise ValueError("quant='native' needs a .gguf model (it keeps the file's own blocks)")
        from spillover.weights.gguf import iter_gguf

        model = load_items(iter_gguf(source.path, cfg, native=True, act_dtype=dtype), cfg, device,
                           dtype)
        return model, {n: f"{m.fmt.name} (native {source.path.name})"
                       for n, m in model.named_modules()
                       if isinstance(m, Linear) and m.fmt is not None}
    from spillover.weights.resolve import iter_source, load_model

    if quant in _KEEP:
        return load_model(source, cfg, device, dtype), {}
    from spillover.weights.quantize_stream import load_quantized

    # Each float tensor is packed as it arrives (same result as load_model + quantize_for_load,
    # without ever holding the float model).
    model, record = load_quantized(iter_source(source, cfg), cfg, device, dtype,
                                   load_policy(quant, group_size, dtype))
    _log_fallback(record, quant, group_size)
    return model, record


def _loads_packed(path: Path, what: str, quant: str) -> None:
    """A store or pre-quantized checkpoint loads in its own formats: `auto`, or `bf16` said so."""
    if quant not in _KEEP:
        raise ValueError(f"{path} is {what}, already quantized; drop quant={quant!r}")
    if quant == "bf16":
        log.warning("quant bf16 ignored: %s is %s and loads in its own formats", path, what)


def iter_store(store_path: str | Path, cfg: ModelConfig, act_dtype: torch.dtype
               ) -> Iterator[tuple[str, Any, str]]:
    """(Hugging Face name, tensor or format object, file) for every tensor of a store.

    Stores converted from GGUF keep llama.cpp names and its q/k row order; both are mapped here the
    way `iter_gguf` maps them, so the loader sees one naming whatever the source was.
    """
    from spillover.weights.gguf import gguf_rows_fix
    from spillover.weights.names import GGUF_IGNORED, gguf_to_hf
    from spillover.weights.store import open_store

    store = open_store(store_path)
    from_gguf = store.manifest["source"]["kind"] == "gguf"
    for name in store.names():
        if from_gguf and name in GGUF_IGNORED:
            continue
        hf = gguf_to_hf(name) if from_gguf else name
        if hf is None:
            raise ValueError(f"{store.path}: tensor {name} has no mapping for this architecture")
        item = store.weight(name, act_dtype)
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            item = item.to(act_dtype)
        if from_gguf:
            item = gguf_rows_fix(name, item, cfg)
        yield hf, item, str(store.path / store.entry(name)["shard"])


def load_from_store(store_path: str | Path, cfg: ModelConfig, device: torch.device | str,
                    dtype: torch.dtype) -> CausalLM:
    """Build the model and load a converted store; packed tensors stay packed (`set_format`)."""
    model = load_items(iter_store(store_path, cfg, dtype), cfg, device, dtype)
    log.info("loaded store %s", store_path)
    return model


def load_items(items: Iterable[tuple[str, Any, str]], cfg: ModelConfig, device: torch.device | str,
               dtype: torch.dtype) -> CausalLM:
    """Build the model and fill it from (HF name, tensor or format object, file) items.

    The one path for every packed source (stores, native GGUF, pre-quantized checkpoints): the model
    is built on meta, format objects are swapped in by the loader as they are (their targets never
    get a float tensor), plain tensors are copied into parameters allocated as they arrive. Float
    parameters land on `device` directly; formats stay where the source made them (the CPU) and
    `move_model` moves them.
    """
    from spillover.weights.loader import load_weights
    from spillover.weights.resolve import META, build_model

    device = torch.device(device)
    model = build_model(cfg, META, dtype)
    with torch.no_grad():
        n = load_weights(model, items, tied_lm_head=cfg.tie_word_embeddings, device=device)
    log.info("loaded %d tensors", n)
    return move_model(model, device)


def move_model(model: CausalLM, device: torch.device) -> CausalLM:
    """Move a model and the packed formats nn.Module.to does not know about."""
    if device.type == "cpu":
        return model
    model.to(device)
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.fmt is not None:
            mod.set_format(mod.fmt.to(device))
        elif is_expert_bank(mod):
            for name, fmt in mod.formats().items():
                if fmt is not None:
                    mod.install(name, fmt.to(device))
    return model
