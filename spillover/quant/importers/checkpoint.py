"""Pre-quantized Hugging Face checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized / block
FP8 / int8, Qwen FP8) read module by module into our packed formats, with no float round trip.

`group_entries(source, quant)` looks at the safetensors headers only: the tensors of each quantized
module (qweight/qzeros/scales/g_idx, weight_packed/weight_scale/..., weight + weight_scale_inv)
become one entry named `<module>.weight`; every other tensor is an entry of its own. Which modules
are quantized is read from the tensors present, not from the config's ignore lists (the file is
the authority; docs/quantization.md, "1. What we load"). `iter_checkpoint` reads one entry at a time
with positioned reads (memory holds one module) and yields the `(name, tensor or format, file)`
items `load_items` takes. `entry_layout` tells, before any data is read, which store parts an entry
becomes (for `convert`). Every error names the file and tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spillover.quant.importers.awq import import_awq
from spillover.quant.importers.checkpoint_config import (
    SUPPORTED_METHODS,
    CheckpointQuant,
    CheckpointQuantError,
    detect_quantization,
)
from spillover.quant.importers.compressed_tensors import import_compressed_tensors, import_int8
from spillover.quant.importers.fp8_block import import_fp8_block
from spillover.quant.importers.gptq import ActOrderNotSupported, import_gptq
from spillover.quant.importers.source import Source, SourceTensor
from spillover.quant.int4 import Int4Weight

__all__ = ["SUPPORTED_METHODS", "CheckpointQuant", "CheckpointQuantError", "Entry",
           "checkpoint_record", "detect_quantization", "entry_layout", "entry_shape",
           "group_entries", "import_entry", "iter_checkpoint"]

# method -> (part whose presence makes a module quantized, required parts, optional parts)
PARTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "gptq": ("qweight", ("qweight", "qzeros", "scales"), ("g_idx",)),
    "awq": ("qweight", ("qweight", "qzeros", "scales"), ()),
    "compressed-tensors": ("weight_packed", ("weight_packed", "weight_scale"),
                           ("weight_zero_point", "weight_g_idx", "weight_shape")),
    # input_scale (static activation scales) is dropped: activations stay in float here
    "fp8": ("weight_scale_inv", ("weight", "weight_scale_inv"), ("input_scale",)),
    # compressed-tensors float-quantized (block FP8) and int-quantized (int8): weight + weight_scale
    "compressed-tensors:float-quantized": ("weight_scale", ("weight", "weight_scale"),
                                           ("input_scale", "weight_zero_point")),
    "compressed-tensors:int-quantized": ("weight_scale", ("weight", "weight_scale"),
                                         ("input_scale", "input_zero_point", "weight_zero_point")),
}
PartLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def parts_of(quant: CheckpointQuant) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(marker part, required parts, optional parts) of a quantized module in this checkpoint."""
    return PARTS.get(f"{quant.method}:{quant.checkpoint_format}") or PARTS[quant.method]


def _fp8_block(quant: CheckpointQuant, k: int) -> tuple[int, int]:
    """(rows, columns) per FP8 scale; a 0 column count (per channel) means all of K."""
    assert quant.weight_block_size is not None
    bn, bk = quant.weight_block_size
    return bn, bk or k


def _fp8_scale_part(quant: CheckpointQuant) -> str | None:
    """The block-scale part of an FP8 checkpoint (its marker part), None for an integer one."""
    return parts_of(quant)[0] if quant.weight_block_size is not None else None


@dataclass(frozen=True)
class Entry:
    # what the loader sees: `<module>.weight` for a quantized module, else the tensor name
    name: str
    # quantized: part -> tensor; float: {"": tensor}
    parts: dict[str, SourceTensor] = field(hash=False)
    quant: CheckpointQuant | None = None  # None: a float tensor passed through

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def main(self) -> SourceTensor:
        """The tensor errors point at and whose file the loader reports."""
        if self.quant is None:
            return self.parts[""]
        return self.parts[parts_of(self.quant)[1][0]]

    @property
    def file(self) -> str:
        return self.main.file

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    def fail(self, part: str, why: str) -> CheckpointQuantError:
        t = self.parts.get(part, self.main)
        return CheckpointQuantError(f"{t.file}: tensor {t.name}: {why}")


def group_entries(source: Source, quant: CheckpointQuant) -> list[Entry]:
    """Entries in source order (so reads stay sequential within each file)."""
    marker, required, optional = parts_of(quant)
    by_name = {t.name: t for t in source.tensors}
    owner: dict[str, str] = {}  # tensor name -> module it belongs to
    for name, t in by_name.items():
        if not name.endswith("." + marker):
            continue
        module = name[: -len(marker) - 1]
        missing = [f"{module}.{p}" for p in required if f"{module}.{p}" not in by_name]
        if missing:
            raise CheckpointQuantError(f"{t.file}: tensor {name} has no {', '.join(missing)} "
                                       "in the checkpoint")
        for p in required + optional:
            if f"{module}.{p}" in by_name:
                owner[f"{module}.{p}"] = module
    entries: list[Entry] = []
    seen: set[str] = set()
    for t in source.tensors:
        if t.name not in owner:
            _check_float(t, quant)
            entries.append(Entry(t.name, {"": t}))
            continue
        module = owner[t.name]
        if module not in seen:
            seen.add(module)
            parts = {p: by_name[f"{module}.{p}"] for p in required + optional
                     if f"{module}.{p}" in by_name}
            entries.append(Entry(f"{module}.weight", parts, quant))
    return entries


def _check_float(t: SourceTensor, quant: CheckpointQuant) -> None:
    marker, required, optional = parts_of(quant)
    stray = [p for p in required + optional if p != "weight" and t.name.endswith("." + p)]
    if stray:
        module = t.name[: -len(stray[0]) - 1]
        raise CheckpointQuantError(f"{t.file}: tensor {t.name} has no {module}.{marker} beside it")
    # a quantized weight without its scale would otherwise pass through as a float tensor
    int_quantized = t.dtype == torch.int8 and quant.checkpoint_format == "int-quantized"
    if t.dtype == torch.float8_e4m3fn or int_quantized:
        kind = "FP8" if t.dtype == torch.float8_e4m3fn else "int8"
        raise CheckpointQuantError(f"{t.file}: tensor {t.name} is {kind} but has no "
                                   f"{t.name.removesuffix('.weight')}.{marker} "
                                   f"(quantization_config says {quant.method})")


def _int4_geometry(e: Entry) -> tuple[int, int, int, torch.dtype, bool]:
    """(N, K, groups, scale dtype, has mins) of an int4 module, from its headers."""
    q = e.quant
    assert q is not None
    if q.bits != 4:
        raise e.fail(parts_of(q)[0],
                     f"{q.method} {q.bits}-bit weights are not supported (4-bit only; "
                     f"bits set in {q.config_file})")
    if q.method == "compressed-tensors":
        packed, scale = e.parts["weight_packed"], e.parts["weight_scale"]
        n, k = packed.shape[0], packed.shape[1] * 8
        groups, sdt, mins = scale.shape[1], scale.dtype, "weight_zero_point" in e.parts
        ok = len(scale.shape) == 2 and scale.shape[0] == n
    else:
        qweight, scales = e.parts["qweight"], e.parts["scales"]
        k, n = (qweight.shape[0] * 8, qweight.shape[1]) if q.method == "gptq" else (
            qweight.shape[0], qweight.shape[1] * 8)
        # GPTQ zeros are data: a symmetric config promises all 8s (checked in import_entry)
        groups, sdt, mins = scales.shape[0], scales.dtype, q.method == "awq" or not q.sym
        ok = len(scales.shape) == 2 and scales.shape[1] == n
    if not ok or groups == 0 or k % groups or (k // groups) % 2:
        raise e.fail("", f"scales do not match the packed weight (N={n}, K={k}) in a "
                         f"{q.method} checkpoint")
    return n, k, groups, sdt, mins


def entry_layout(e: Entry) -> tuple[str, dict[str, Any], PartLayout]:
    """(store format, store meta, {part: (dtype, shape)}) that `import_entry(e)` produces."""
    q = e.quant
    assert q is not None, "float entries have no packed layout"
    scale_part = _fp8_scale_part(q)
    if scale_part is not None:
        w, s = e.parts["weight"], e.parts[scale_part]
        if w.dtype != torch.float8_e4m3fn or len(w.shape) != 2:
            raise e.fail("weight",
                         f"expected a 2-D float8_e4m3fn weight, found {w.dtype} {list(w.shape)}")
        bn, bk = _fp8_block(q, w.shape[1])
        blocks = (-(-w.shape[0] // bn), -(-w.shape[1] // bk))
        if tuple(s.shape) != blocks and not (bk == w.shape[1] and tuple(s.shape) == blocks[:1]):
            raise e.fail(scale_part, f"shape {list(s.shape)} != {list(blocks)} blocks of {bn}x{bk}")
        meta: dict[str, Any] = {"format": "fp8_block", "block": bk, "stacked": False}
        if bn != bk:
            meta["block_n"] = bn
        return "fp8_block", meta, {"weight": (w.dtype, tuple(w.shape)),
                                   "scale": (torch.float32, blocks)}
    if q.checkpoint_format == "int-quantized":
        w, s = e.parts["weight"], e.parts["weight_scale"]
        if w.dtype != torch.int8 or len(w.shape) != 2:
            raise e.fail("weight", f"expected a 2-D int8 weight, found {w.dtype} {list(w.shape)}")
        n, k = w.shape
        groups = 1 if q.group_size is None else k // q.group_size
        shapes = ((n, groups), (n,)) if groups == 1 else ((n, groups),)
        if tuple(s.shape) not in shapes or (q.group_size is not None and k % q.group_size):
            raise e.fail("weight_scale",
                         f"shape {list(s.shape)} does not match [{n}, {groups}] (N={n}, K={k}, "
                         f"group {q.group_size or 'per channel'})")
        meta = {"format": "int8", "group_size": k // groups, "symmetric": True, "stacked": False}
        return "int8", meta, {"qweight": (torch.int8, (n, k)), "scales": (s.dtype, (n, groups))}
    n, k, groups, sdt, mins = _int4_geometry(e)
    parts: PartLayout = {"qweight": (torch.uint8, (n, k // 2)), "scales": (sdt, (n, groups))}
    if mins:  # float32: -zero * scale is exact there, not in the 16-bit scale dtype
        parts["mins"] = (torch.float32, (n, groups))
    meta = {"format": "int4", "group_size": k // groups, "symmetric": not mins, "stacked": False}
    return "int4", meta, parts


def entry_shape(e: Entry) -> tuple[int, ...]:
    """Logical [N, K] of a quantized module (its tensors are packed along one
    dimension or other)."""
    _, _, layout = entry_layout(e)
    if "weight" in layout:
        return layout["weight"][1]
    n, half_k = layout["qweight"][1]
    return n, 2 * half_k


def import_entry(e: Entry, read: Callable[[SourceTensor], torch.Tensor],
                 act_dtype: torch.dtype = torch.bfloat16) -> Any:
    """Read one quantized module and repack it (an Int4Weight, Int8Weight or Fp8BlockWeight), laid
    out exactly as `entry_layout` promised, so loading and converting give the same tensors."""
    q = e.quant
    assert q is not None
    fmt_name, _, layout = entry_layout(e)
    t = {p: read(s) for p, s in e.parts.items()}
    scale_part = _fp8_scale_part(q)
    try:
        if scale_part is not None:
            block = _fp8_block(q, t["weight"].shape[1])
            return import_fp8_block(t["weight"], t[scale_part].reshape(layout["scale"][1]), block,
                                    act_dtype=act_dtype)
        if q.checkpoint_format == "int-quantized":
            return import_int8(t["weight"], t["weight_scale"], t.get("weight_zero_point"),
                               layout["scales"][1][1], act_dtype=act_dtype)
        if q.method == "gptq":
            fmt = import_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                              checkpoint_format=q.checkpoint_format, act_dtype=act_dtype)
        elif q.method == "awq":
            fmt = import_awq(t["qweight"], t["qzeros"], t["scales"], act_dtype=act_dtype)
        else:
            shape = t.get("weight_shape")
            n, k = layout["qweight"][1][0], layout["qweight"][1][1] * 2
            if shape is not None and shape.tolist() != [n, k]:
                raise e.fail("weight_shape",
                             f"{shape.tolist()} != [{n}, {k}]: padded packing is not supported")
            fmt = import_compressed_tensors(t["weight_packed"], t["weight_scale"],
                                            t.get("weight_zero_point"), t.get("weight_g_idx"),
                                            act_dtype=act_dtype)
    except CheckpointQuantError:
        raise
    except ActOrderNotSupported as err:
        g = e.parts.get("g_idx") or e.parts.get("weight_g_idx") or e.main
        raise ActOrderNotSupported(f"{g.file}: tensor {g.name}: {err}") from err
    except (NotImplementedError, AssertionError, RuntimeError, ValueError) as err:
        raise e.fail("", f"cannot import as {fmt_name} ({err})") from err
    if "mins" in layout and fmt.mins is None:
        # an asymmetric checkpoint whose module has every zero at 8: same values, common layout
        fmt = Int4Weight(fmt.qweight, fmt.scales, -8 * fmt.scales.float(),
                         group_size=fmt.group_size, stacked=False, act_dtype=act_dtype)
    elif "mins" not in layout and fmt.mins is not None:
        raise e.fail("qzeros", f"zero points are not all 8 although {q.config_file} says sym=true")
    return fmt


def _resolve(path: str | Path, quant: CheckpointQuant | None) -> CheckpointQuant:
    quant = quant or detect_quantization(path)
    if quant is None:
        raise CheckpointQuantError(f"{path}: config.json has no quantization_config (not a "
                                   "quantized checkpoint)")
    return quant


def iter_checkpoint(path: str | Path, quant: CheckpointQuant | None = None,
                    act_dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, Any, str]]:
    """(Hugging Face name, tensor or format object, file) for every tensor of a quantized
    checkpoint, like `iter_store`: quantized modules as format objects, everything else as
    act_dtype tensors."""
    quant = _resolve(path, quant)
    source = Source(path)
    for e in group_entries(source, quant):
        if e.quant is not None:
            yield e.name, import_entry(e, source.read, act_dtype), e.file
            continue
        t = source.read(e.main)
        yield e.name, t.to(act_dtype) if t.is_floating_point() else t, e.file


def checkpoint_record(path: str | Path, quant: CheckpointQuant | None = None) -> dict[str, str]:
    """{name: "format (why)"} for every entry, as LLM.quant_record reports it (headers only)."""
    quant = _resolve(path, quant)
    record: dict[str, str] = {}
    for e in group_entries(Source(path), quant):
        if e.quant is not None:
            record[e.name] = f"{entry_layout(e)[0]} ({quant.method} checkpoint)"
        elif quant.ignores(e.module):
            record[e.name] = f"dense (left in float by {Path(quant.config_file).name})"
        else:
            record[e.name] = f"dense (float in {quant.method} checkpoint)"
    return record
