"""Streaming weight loading.

Sources yield `(checkpoint_name, tensor, file)` one tensor at a time (memory-mapped safetensors, or
GGUF dequantised tensor by tensor). `load_weights` maps checkpoint names onto our parameters (merged
q|k|v and gate|up projections, stacked experts) and fails loudly, naming tensor and file, on
anything missing, unexpected, mis-shaped or loaded twice.

The model may be built on `meta` (`build_model(cfg, META, dtype)`): a parameter is then allocated
on the target device when its first float tensor arrives, so peak RAM is what the model ends up
holding plus the tensor in flight, never a float copy of packed weights.

A source may also yield a packed weight format (spillover.quant: native GGUF blocks, a converted
store, a tensor quantized on the fly by spillover.weights.quantize_stream) instead of a tensor.
Packed parts of one `Linear` or expert bank are collected and, as soon as all arrived, joined by the
format's own `concat` along the output rows (merged q|k|v, gate|up) and the expert axis, then
installed with `Linear.set_format` / the bank's `install`; such a parameter never gets a float
tensor. Parts that cannot be joined (their layouts differ) are dequantized into the dense parameter
instead. Packed tensors aimed at anything else (embeddings, norms) are dequantized.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from spillover.layers.linear import Linear
from spillover.offload.bank import is_expert_bank
from spillover.quant import WeightFormat, concat_experts
from spillover.weights.names import IGNORED_PREFIXES, IGNORED_SUFFIXES

WeightItem = tuple[str, torch.Tensor, str]
PackedOrTensor = WeightFormat | torch.Tensor
# (index into the dense parameter, packed format)
Piece = tuple[tuple[slice | int, ...], WeightFormat]
Owners = dict[str, list[tuple[nn.Module, str]]]  # parameter name -> every (module, attr) holding it


class WeightLoadError(ValueError):
    pass


# gate_up_proj per expert: one expert's merged rows (what spillover.weights.quantize_stream yields
# for block formats)
_EXPERT = re.compile(
    r"^(?P<p>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<w>gate_up_proj|gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERT = re.compile(
    r"^(?P<p>.*\.mlp\.experts)\.(?P<w>gate_up_proj|gate_proj|up_proj|down_proj)$")
_QKV = re.compile(r"^(?P<p>.*\.self_attn)\.(?P<w>[qkv])_proj\.(?P<t>weight|bias)$")
_GATE_UP = re.compile(r"^(?P<p>.*\.(?:mlp|shared_expert))\.(?P<w>gate|up)_proj\.weight$")


def iter_safetensors(folder: str | Path) -> Iterator[WeightItem]:
    """(name, tensor, file) for every tensor of a folder's shards, in file order.

    Each tensor is read with positioned reads into memory of its own, freed once the consumer drops
    it: a memory map (safe_open) would keep every page read so far resident, and counted in RSS,
    until its shard closes (a whole 50 GB shard when Hugging Face writes one file).
    """
    from spillover.quant.importers.source import Source

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
            shard = Source(path)
            end = max((t.offset + t.nbytes for t in shard.tensors), default=0)
        except Exception as e:  # bad length prefix, JSON or dtype
            raise WeightLoadError(f"{path}: cannot read safetensors header ({e})") from e
        if end > path.stat().st_size:
            raise WeightLoadError(f"{path}: truncated (tensors end at byte {end}, the file has "
                                  f"{path.stat().st_size})")
        for t in shard.tensors:
            try:
                tensor = shard.read(t)
            except Exception as e:
                raise WeightLoadError(f"{path}: tensor {t.name} cannot be read ({e})") from e
            yield t.name, tensor, str(path)


def param_target(name: str, params: dict[str, nn.Parameter], modules: dict[str, nn.Module]
            ) -> tuple[str, tuple[slice | int, ...]] | None:
    """Our parameter name and the index inside it that checkpoint tensor `name` fills."""
    if name in params:
        return name, ()
    if m := _EXPERT.match(name):
        bank, e, w = m["p"], int(m["e"]), m["w"]
        if w in ("down_proj", "gate_up_proj"):
            return f"{bank}.{'w2' if w == 'down_proj' else 'w13'}", (e,)
        half = params[f"{bank}.w13"].shape[1] // 2 if f"{bank}.w13" in params else 0
        return f"{bank}.w13", (e, slice(0, half) if w == "gate_proj" else slice(half, 2 * half))
    if m := _STACKED_EXPERT.match(name):
        bank, w = m["p"], m["w"]
        if w == "down_proj":
            return f"{bank}.w2", ()
        if w == "gate_up_proj":
            return f"{bank}.w13", ()
        half = params[f"{bank}.w13"].shape[1] // 2 if f"{bank}.w13" in params else 0
        return f"{bank}.w13", (slice(None),
                               slice(0, half) if w == "gate_proj" else slice(half, 2 * half))
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


def skipped(name: str, tied_lm_head: bool) -> bool:
    """Checkpoint tensors the model has no place for by design (rotary caches, a tied
    lm_head copy)."""
    if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
        return True
    return tied_lm_head and name == "lm_head.weight"  # some tied checkpoints still store a copy


def load_weights(model: nn.Module, weights: Iterable[tuple[str, PackedOrTensor, str]],
                 tied_lm_head: bool = False, device: torch.device | str = "cpu") -> int:
    """Fill `model` from checkpoint items. Returns tensors loaded.

    Parameters still on `meta` are allocated on `device` when their first float tensor arrives (the
    model may also come materialised, then tensors are copied into place).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    owners = _owners(model, params, modules)
    device = torch.device(device)
    filled = {n: 0 for n in params}
    pending: dict[str, list[Piece]] = {}
    dense: set[str] = set()  # parameters that received a float tensor: they stay float
    count = 0
    for name, item, src in weights:
        if skipped(name, tied_lm_head):
            continue
        target = param_target(name, params, modules)
        if target is None or target[0] not in params:
            raise WeightLoadError(f"{src}: unexpected tensor {name} (no matching "
                                  "parameter in the model)")
        pname, index = target
        expected = tuple(params[pname][index].shape) if index else tuple(params[pname].shape)
        shape = tuple(item.shape) if isinstance(item, torch.Tensor) else packed_shape(item)
        if expected != shape:
            raise WeightLoadError(f"{src}: tensor {name} has shape {shape}, expected "
                                  f"{expected} ({pname})")
        if not isinstance(item, torch.Tensor) and packable(pname, modules):
            pending.setdefault(pname, []).append((index, item))
        else:
            tensor = item if isinstance(item, torch.Tensor) else item.dequantize()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WeightLoadError(f"{src}: tensor {name} contains NaN or Inf values")
            param = _materialize(pname, params, owners, device)
            (param.data[index] if index else param.data).copy_(tensor)
            dense.add(pname)
        filled[pname] += math.prod(shape)
        if filled[pname] > params[pname].numel():
            raise WeightLoadError(f"{src}: tensor {name} loaded twice ({pname})")
        if filled[pname] == params[pname].numel() and pname in pending:
            # Installed now, not at the end: the parts are freed as soon as they are concatenated.
            pieces = pending.pop(pname)
            _install(pname, pieces, pname in dense, params, owners, modules, device)
        count += 1
    missing = [n for n, c in filled.items() if c < params[n].numel()]
    if missing:
        shown = ", ".join(missing[:8])
        if len(missing) > 8:
            shown += f" … and {len(missing) - 8} more"
        raise WeightLoadError(f"checkpoint is missing tensors for: {shown}")
    materialize_buffers(model, device)
    return count


def _owners(model: nn.Module, params: dict[str, nn.Parameter],
            modules: dict[str, nn.Module]) -> Owners:
    """Where each parameter is held, tied copies included (lm_head sharing the embedding), so that
    replacing a meta parameter by its allocated one keeps the tie."""
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        mod_name, _, attr = full.rpartition(".")
        by_id.setdefault(id(p), []).append((modules[mod_name], attr))
    return {n: by_id[id(p)] for n, p in params.items()}


def _materialize(pname: str, params: dict[str, nn.Parameter], owners: Owners, device: torch.device
                 ) -> nn.Parameter:
    """The parameter, allocated (uninitialised, filled by the caller) on `device` if
    still on meta."""
    param = params[pname]
    if not param.is_meta:
        return param
    # Parameter.data cannot move off meta in place; a new Parameter goes to every holder instead.
    new = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                       requires_grad=False)
    for mod, attr in owners[pname]:
        setattr(mod, attr, new)
    params[pname] = new
    return new


def materialize_buffers(model: nn.Module, device: torch.device, zero: bool = False) -> None:
    """Buffers are never in a checkpoint: allocated uninitialised, as `to_empty` does (their module
    fills them; `zero` for models that are never loaded), and a parameter left on meta is a loader
    bug, not a checkpoint problem."""
    new = torch.zeros_like if zero else torch.empty_like
    for mod_name, mod in model.named_modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[bname] = new(buf, device=device)
        for pname, p in mod.named_parameters(recurse=False):
            assert not p.is_meta, f"{mod_name}.{pname} still on meta after loading"


def packed_shape(fmt: WeightFormat) -> tuple[int, ...]:
    """Logical [N, K] / [E, N, K] shape of a packed format."""
    lead = (fmt.num_experts,) if fmt.stacked else ()
    return (*lead, fmt.out_features, fmt.in_features)


def packable(pname: str, modules: dict[str, nn.Module]) -> bool:
    """Whether a packed format can stand in for this parameter (else it is dequantized)."""
    mod_name, _, attr = pname.rpartition(".")
    mod = modules.get(mod_name)
    if isinstance(mod, Linear):
        return attr == "weight"
    return mod is not None and is_expert_bank(mod) and attr in mod.formats()


def _row_start(index: tuple[slice | int, ...]) -> tuple[int, int]:
    """(expert, first output row) that a piece's index addresses (-1: all experts)."""
    expert = index[0] if index and isinstance(index[0], int) else -1
    rows = [i for i in index if isinstance(i, slice) and i != slice(None)]
    return expert, (rows[0].start or 0) if rows else 0


def _install(pname: str, pieces: list[Piece], mixed: bool, params: dict[str, nn.Parameter],
             owners: Owners, modules: dict[str, nn.Module], device: torch.device) -> None:
    """Swap one parameter's packed parts in as one format; `mixed`: some parts came as
    float tensors."""
    mod_name, _, attr = pname.rpartition(".")
    mod = modules[mod_name]
    pieces = sorted(pieces, key=lambda p: _row_start(p[0]))
    experts = sorted({_row_start(ix)[0] for ix, _ in pieces})
    fmt: WeightFormat | None = None
    if mixed:
        fmt = None
    elif experts == [-1]:  # dense Linear parts, or stacked expert tensors split by rows
        fmts = [f for _, f in pieces]
        fmt = fmts[0].concat(fmts, 1)
    else:  # per-expert checkpoint tensors: rows within each expert, then the experts stacked
        fmt = concat_experts([[f for ix, f in pieces if _row_start(ix)[0] == e] for e in experts])
    if fmt is None:  # layouts disagree: keep this parameter dense (still exact)
        param = _materialize(pname, params, owners, device)
        for index, f in pieces:
            (param.data[index] if index else param.data).copy_(f.dequantize())
        return
    # The released float parameter stays a 0-element Parameter on a real device (never meta), so
    # that `model.to(device)` and code reading `.weight.device` keep working.
    held = params[pname]
    where = device if held.is_meta else held.device
    if isinstance(mod, Linear):
        mod.set_format(fmt, where)
    elif is_expert_bank(mod):
        mod.install(attr, fmt, where)
