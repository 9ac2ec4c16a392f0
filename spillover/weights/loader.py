"""Streaming weight loading.

Sources yield `(checkpoint_name, tensor, file)` one tensor at a time (memory-mapped safetensors, or
GGUF dequantised tensor by tensor), so the model (built on `meta`, then materialised once) is the
only full copy in RAM. `load_weights` maps checkpoint names onto our parameters (merged q|k|v and
gate|up projections, stacked experts) and fails loudly, naming tensor and file, on anything missing,
unexpected, mis-shaped or loaded twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from spillover.layers.linear import Linear
from spillover.weights.names import IGNORED_PREFIXES, IGNORED_SUFFIXES

WeightItem = tuple[str, torch.Tensor, str]


class WeightLoadError(ValueError):
    pass


_EXPERT = re.compile(r"^(?P<p>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERT = re.compile(r"^(?P<p>.*\.mlp\.experts)\.(?P<w>gate_up_proj|gate_proj|up_proj|down_proj)$")
_QKV = re.compile(r"^(?P<p>.*\.self_attn)\.(?P<w>[qkv])_proj\.(?P<t>weight|bias)$")
_GATE_UP = re.compile(r"^(?P<p>.*\.(?:mlp|shared_expert))\.(?P<w>gate|up)_proj\.weight$")


def iter_safetensors(folder: str | Path) -> Iterator[WeightItem]:
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise WeightLoadError(f"{index}: shard {f} is listed but missing")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{folder}: no *.safetensors files found")
    for f in files:
        path = folder / f
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise WeightLoadError(f"{path}: cannot read safetensors header ({e})") from e
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise WeightLoadError(f"{path}: tensor {name} cannot be read ({e})") from e
                yield name, tensor, str(path)


def _target(name: str, params: dict[str, nn.Parameter], modules: dict[str, nn.Module]
            ) -> tuple[str, tuple[slice | int, ...]] | None:
    """Our parameter name and the index inside it that checkpoint tensor `name` fills."""
    if name in params:
        return name, ()
    if m := _EXPERT.match(name):
        bank, e, w = m["p"], int(m["e"]), m["w"]
        if w == "down_proj":
            return f"{bank}.w2", (e,)
        half = params[f"{bank}.w13"].shape[1] // 2 if f"{bank}.w13" in params else 0
        return f"{bank}.w13", (e, slice(0, half) if w == "gate_proj" else slice(half, 2 * half))
    if m := _STACKED_EXPERT.match(name):
        bank, w = m["p"], m["w"]
        if w == "down_proj":
            return f"{bank}.w2", ()
        if w == "gate_up_proj":
            return f"{bank}.w13", ()
        half = params[f"{bank}.w13"].shape[1] // 2 if f"{bank}.w13" in params else 0
        return f"{bank}.w13", (slice(None), slice(0, half) if w == "gate_proj" else slice(half, 2 * half))
    for pat, merged, order in ((_QKV, "qkv_proj", "qkv"), (_GATE_UP, "gate_up_proj", None)):
        if m := pat.match(name):
            kind = m.groupdict().get("t") or "weight"
            mod = modules.get(f"{m['p']}.{merged}")
            if not isinstance(mod, Linear):
                return None
            i = order.index(m["w"]) if order else ("gate", "up").index(m["w"])
            off = sum(mod.shards[:i])
            return f"{m['p']}.{merged}.{kind}", (slice(off, off + mod.shards[i]),)
    return None


def load_weights(model: nn.Module, weights: Iterable[WeightItem], tied_lm_head: bool = False) -> int:
    """Copy every checkpoint tensor into `model` (already materialised). Returns tensors loaded."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled = {n: 0 for n in params}
    count = 0
    for name, tensor, src in weights:
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            continue
        if tied_lm_head and name == "lm_head.weight":
            continue  # tied to the embedding; some checkpoints still store a copy
        target = _target(name, params, modules)
        if target is None or target[0] not in params:
            raise WeightLoadError(f"{src}: unexpected tensor {name} (no matching parameter in the model)")
        pname, index = target
        dst = params[pname].data[index] if index else params[pname].data
        if tuple(dst.shape) != tuple(tensor.shape):
            raise WeightLoadError(
                f"{src}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)} ({pname})"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightLoadError(f"{src}: tensor {name} contains NaN or Inf values")
        dst.copy_(tensor)
        filled[pname] += dst.numel()
        if filled[pname] > params[pname].numel():
            raise WeightLoadError(f"{src}: tensor {name} loaded twice ({pname})")
        count += 1
    missing = [n for n, c in filled.items() if c < params[n].numel()]
    if missing:
        shown = ", ".join(missing[:8]) + (f" … and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightLoadError(f"checkpoint is missing tensors for: {shown}")
    return count
