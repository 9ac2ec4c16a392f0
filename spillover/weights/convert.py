"""Streaming, bounded-RAM, resumable conversion of a checkpoint into our store (weights/store.py).

`convert(src, out, quant, group_size)` reads one source tensor at a time (bf16/fp16/fp32/FP8
safetensors, or GGUF), packs it, and streams the parts into pre-laid-out shards. Float tensors
going to int4/int8 or kept as stored go through `convert_stream`: row chunks read into reused
buffers, packed on worker threads and written at their offsets, so memory is a few MB per worker
whatever the tensor's size; the rest (GGUF blocks, pre-quantized modules, FP8 kept) is produced
whole, a small multiple of that tensor.

Resume: the whole plan (every tensor's format, part shapes and shard) is computed from headers
before any data is read and saved in `.progress/plan.json`. Each shard is written to a temporary
file, fsynced, renamed, then marked done with its checksum. A rerun with the same source and
options skips done shards and redoes the rest; since packing is deterministic and the manifest has
no timestamps, an interrupted-and-resumed store is byte-identical to an uninterrupted one.
GGUF blocks of supported types are imported losslessly whatever `quant` says (quant applies to
float tensors); FP8 block weights are kept as FP8 when the policy keeps them or quant is "auto".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from spillover.kernels.ref_quant import dequant_fp8_block_ref
from spillover.quant import normalize_quant, pack_weight
from spillover.quant.importers.checkpoint import (
    Entry,
    detect_quantization,
    entry_layout,
    entry_shape,
    group_entries,
    import_entry,
)
from spillover.quant.importers.fp8_block import import_fp8_block
from spillover.quant.importers.gguf import import_gguf
from spillover.quant.importers.source import Source, SourceTensor
from spillover.weights.convert_stream import ShardFinisher, Streamer, mark_done
from spillover.weights.quantize import QuantPolicy
from spillover.weights.store import (
    MANIFEST,
    STORE_VERSION,
    PartSpec,
    ShardWriter,
    StoreError,
    part_key,
    write_json_atomic,
)

# The QUANT_CHOICES a store is written in: float matrices to int4 or int8, or every tensor kept as
# stored (auto). fp8 and int4-experts quantize at load; a GGUF's blocks are imported
# whatever it says.
QUANTS = ("auto", "int8", "int4")
PROGRESS = ".progress"
F16, F32 = torch.float16, torch.float32
# GGUF type -> (format, group, scale dtype, has mins, code bits) of its lossless import
GGUF_IMPORTS: dict[str, tuple[str, int, torch.dtype, bool]] = {
    "Q4_0": ("int4", 32, F16, False), "Q4_1": ("int4", 32, F16, True),
    "Q4_K": ("int4", 32, F32, True),
    "Q8_0": ("int8", 32, F16, False), "Q5_K": ("int8", 32, F32, True),
    "Q6_K": ("int8", 16, F32, False),
}
AUX_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")


@dataclass(frozen=True)
class Planned:
    name: str
    src: SourceTensor
    fmt: str  # dense | int4 | int8 | fp8_block
    meta: dict[str, Any]
    parts: dict[str, PartSpec]
    reason: str
    scale: SourceTensor | None = None  # FP8 weight_scale_inv partner
    shard: str = ""
    # a pre-quantized checkpoint's module: all its tensors, imported together
    entry: Entry | None = None

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape (a checkpoint module's `src` is its packed qweight / weight_packed)."""
        return entry_shape(self.entry) if self.entry is not None else self.src.shape


@dataclass(frozen=True)
class ConvertOptions:
    quant: str = "int4"
    group_size: int = 128
    symmetric: bool = True
    shard_bytes: int = 2 << 30
    policy: QuantPolicy = field(default_factory=QuantPolicy)

    def record(self) -> dict[str, Any]:
        return {"quant": self.quant, "group_size": self.group_size, "symmetric": self.symmetric,
                "shard_bytes": self.shard_bytes, "keep": list(self.policy.keep),
                "overrides": dict(self.policy.overrides)}


def _int_parts(name: str, fmt: str, lead: tuple[int, ...], k: int, group: int, sdt: torch.dtype,
               mins: bool) -> dict[str, PartSpec]:
    code = (torch.uint8, k // 2) if fmt == "int4" else (torch.int8, k)
    parts = {"qweight": PartSpec(part_key(name, "qweight", fmt), code[0], (*lead, code[1])),
             "scales": PartSpec(part_key(name, "scales", fmt), sdt, (*lead, k // group))}
    if mins:
        parts["mins"] = PartSpec(part_key(name, "mins", fmt), sdt, (*lead, k // group))
    return parts


def _plan_tensor(t: SourceTensor, scale: SourceTensor | None, opts: ConvertOptions) -> Planned:
    module = t.name.removesuffix(".weight")
    lead, k = t.shape[:-1], t.shape[-1] if t.shape else 0
    stacked = len(t.shape) == 3
    if t.gguf_type in GGUF_IMPORTS:
        fmt, g, sdt, mins = GGUF_IMPORTS[t.gguf_type]
        meta = {"format": fmt, "group_size": g, "symmetric": fmt == "int4" and not mins,
                "stacked": stacked}
        return Planned(t.name, t, fmt, meta, _int_parts(t.name, fmt, lead, k, g, sdt, mins),
                       f"lossless import of GGUF {t.gguf_type}")
    fmt, why = (opts.quant, "policy default") if opts.quant != "auto" else ("keep", "--quant auto")
    if fmt != "keep":
        fmt, why = opts.policy.format_for(module)
        if fmt not in ("int4", "int8"):
            fmt, why = "keep", f"{why} -> {fmt}: stored unconverted"
    # other GGUF types are dequantized to f32
    dense_dt = F32 if t.gguf_type is not None else t.dtype
    is_matrix = len(t.shape) in (2, 3) and (t.dtype.is_floating_point or t.gguf_type is not None)
    if fmt == "keep" or not is_matrix:
        why = why if is_matrix else "not a weight matrix"
        if scale is not None:  # FP8 kept as FP8, losslessly
            nb = (*t.shape[:-2], -(-t.shape[-2] // 128), -(-k // 128))
            parts = {"weight": PartSpec(part_key(t.name, "weight", "fp8_block"), t.dtype, t.shape),
                     "scale": PartSpec(part_key(t.name, "scale", "fp8_block"), F32, nb)}
            return Planned(t.name, t, "fp8_block",
                           {"format": "fp8_block", "block": 128, "stacked": stacked},
                           parts, why, scale)
        return Planned(t.name, t, "dense", {"format": "dense"},
                       {"weight": PartSpec(t.name, dense_dt, t.shape)}, why, scale)
    group = opts.group_size if fmt == "int4" else k
    if k % group or k % 2:
        return Planned(t.name, t, "dense", {"format": "dense"},
                       {"weight": PartSpec(t.name, dense_dt, t.shape)},
                       f"in={k} not a multiple of group {group}", scale)
    sym = opts.symmetric or fmt == "int8"
    meta = {"format": fmt, "group_size": group, "symmetric": sym, "stacked": stacked}
    return Planned(t.name, t, fmt, meta, _int_parts(t.name, fmt, lead, k, group, F16, not sym), why,
                   scale)


def _plan_tensors(source: Source, opts: ConvertOptions) -> list[Planned]:
    by_name = {t.name: t for t in source.tensors}
    scales = {n.removesuffix("_scale_inv") for n in by_name if n.endswith(".weight_scale_inv")}
    planned: list[Planned] = []
    for t in source.tensors:
        if t.name.endswith(".weight_scale_inv") and t.name.removesuffix("_scale_inv") in by_name:
            continue  # consumed with its FP8 weight
        scale = by_name[t.name + "_scale_inv"] if t.name in scales else None
        planned.append(_plan_tensor(t, scale, opts))
    return planned


def _plan_entry(e: Entry, opts: ConvertOptions) -> Planned:
    """A GPTQ/AWQ/compressed-tensors/FP8 module is imported losslessly whatever `quant` says (as
    GGUF blocks are); the checkpoint's float tensors follow the normal policy."""
    if e.quant is None:
        return _plan_tensor(e.main, None, opts)
    fmt, meta, layout = entry_layout(e)
    parts = {k: PartSpec(part_key(e.name, k, fmt), dt, shape) for k, (dt, shape) in layout.items()}
    return Planned(e.name, e.main, fmt, meta, parts,
                   f"lossless import of {e.quant.method} checkpoint", entry=e)


def plan_conversion(source: Source, opts: ConvertOptions) -> list[Planned]:
    quant = detect_quantization(source.path) if source.kind == "safetensors" else None
    if quant is not None:
        planned = [_plan_entry(e, opts) for e in group_entries(source, quant)]
    else:
        planned = _plan_tensors(source, opts)
    # Shards in source order; a tensor never straddles two shards.
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes() > opts.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes()
    n = len(shards)
    out: list[Planned] = []
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        out.extend(Planned(**{**p.__dict__, "shard": name}) for p in group)
    return out


def produce(source: Source, p: Planned, opts: ConvertOptions) -> dict[str, torch.Tensor]:
    """Read one source tensor and return its parts exactly as planned."""
    if p.entry is not None:
        return dict(import_entry(p.entry, source.read).tensors())
    raw = source.read(p.src)
    if p.src.gguf_type in GGUF_IMPORTS:
        return import_gguf(raw, _gguf_type(p.src.gguf_type), p.src.shape[-1]).tensors()
    if p.src.gguf_type is not None:
        import gguf

        values = gguf.quants.dequantize(raw.numpy(), _gguf_type(p.src.gguf_type))
        raw = torch.from_numpy(values.copy())
        raw = raw.reshape(p.src.shape)
    if p.fmt == "fp8_block":
        assert p.scale is not None
        return import_fp8_block(raw, source.read(p.scale)).tensors()
    if p.fmt == "dense":
        return {"weight": raw}
    w = dequant_fp8_block_ref(raw, source.read(p.scale)) if p.scale is not None else raw
    sym = bool(p.meta["symmetric"])
    return pack_weight(w, p.fmt, int(p.meta["group_size"]) if p.fmt == "int4" else None,
                       sym).tensors()


def _gguf_type(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _manifest(source: Source, opts: ConvertOptions, planned: list[Planned]) -> dict[str, Any]:
    return {
        "spillover_store": STORE_VERSION,
        "source": {"kind": source.kind, "path": str(source.path.resolve()),
                   "identity": source.identity()},
        "quant": opts.record(),
        "tensors": {p.name: {"format": p.fmt, "meta": p.meta, "shape": list(p.shape),
                             "shard": p.shard,
                             "parts": {k: s.key for k, s in p.parts.items()}, "reason": p.reason}
                    for p in planned},
    }


def convert(src: str | Path, out: str | Path, quant: str = "int4", group_size: int = 128, *,
            symmetric: bool = True, shard_bytes: int = 2 << 30, policy: QuantPolicy | None = None,
            show_progress: bool = True, on_tensor: Callable[[str], None] | None = None) -> Path:
    """Convert `src` into a store at `out` (resuming a previous run there); returns `out`.

    `on_tensor(name)` is called after each tensor is handed to the shard (tests use it to
    inject crashes).
    """
    quant = normalize_quant(quant)  # legacy "keep" is auto
    if quant not in QUANTS:
        raise ValueError(f"convert --quant must be one of {', '.join(QUANTS)}, got {quant!r} "
                         "(bf16, fp8, int4-experts and native apply at load; a GGUF's blocks are "
                         "imported whatever --quant says)")
    # The policy's default format must be the requested one: a default QuantPolicy says int4, which
    # made `--quant int8` write int4 tensors.
    policy = policy or QuantPolicy(default=quant if quant != "auto" else "int4",
                                   group_size=group_size, symmetric=symmetric)
    opts = ConvertOptions(quant, group_size, symmetric, shard_bytes, policy)
    source = Source(src)
    planned = plan_conversion(source, opts)
    manifest = _manifest(source, opts, planned)
    out = Path(out)
    prog = out / PROGRESS
    if (out / MANIFEST).is_file() and not prog.exists():
        import json

        done = json.loads((out / MANIFEST).read_text())
        if {k: v for k, v in done.items() if k != "shards"} != manifest:
            raise StoreError(f"{out} already holds a different finished conversion; "
                             "choose another folder")
        return out
    prog.mkdir(parents=True, exist_ok=True)
    _check_same_plan(prog / "plan.json", manifest)
    shards = sorted({p.shard for p in planned})
    total = sum(p.src.nbytes for p in planned)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TimeRemainingColumn(), disable=not show_progress)
    with progress as bar, ShardFinisher() as finish:
        task = bar.add_task(f"convert -> {quant}", total=total)
        for shard in shards:
            members = [p for p in planned if p.shard == shard]
            if not _shard_done(out, prog, shard):
                _write_shard(source, out, prog, shard, members, opts, on_tensor, finish)
            bar.advance(task, sum(p.src.nbytes for p in members))
    manifest["shards"] = {s: {"sha256": (prog / f"{s}.done").read_text().strip(),
                              "bytes": (out / s).stat().st_size} for s in shards}
    _copy_aux(source, out)
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(prog)
    return out


def _check_same_plan(path: Path, manifest: dict[str, Any]) -> None:
    import json

    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(manifest)):
            raise StoreError(f"{path.parent.parent}: an unfinished conversion with another source "
                             "or options is in this folder; delete it or pick another output")
        return
    write_json_atomic(path, manifest)


def _shard_done(out: Path, prog: Path, shard: str) -> bool:
    marker = prog / f"{shard}.done"
    return marker.is_file() and (out / shard).is_file()


def _write_shard(source: Source, out: Path, prog: Path, shard: str, members: list[Planned],
                 opts: ConvertOptions, on_tensor: Callable[[str], None] | None,
                 finish: ShardFinisher | None = None) -> None:
    tmp = out / f"{shard}.tmp"
    writer = ShardWriter(tmp, [s for p in members for s in p.parts.values()])
    # Streamed tensors are queued by row chunks to worker threads (on_tensor may run before they
    # land); all of them are in the file once the `with` ends, and none writes after an error.
    with Streamer() as streamer:
        for p in members:
            if not streamer.write(source, p, writer):  # row-chunked when it can, else whole tensor
                parts = produce(source, p, opts)
                if set(parts) != set(p.parts):
                    raise StoreError(f"{p.name}: produced parts {sorted(parts)} != planned "
                                     f"{sorted(p.parts)}")
                for k, tensor in parts.items():
                    writer.write(p.parts[k].key, tensor)
                del parts
            if on_tensor is not None:
                on_tensor(p.name)
    writer.close()
    os.replace(tmp, out / shard)
    if finish is not None:  # checksum + done-marker in the background, overlapping the next shard
        finish.submit(out / shard, prog / f"{shard}.done")
    else:
        mark_done(out / shard, prog / f"{shard}.done")


def _copy_aux(source: Source, out: Path) -> None:
    """Config and tokenizer files travel with the store (safetensors sources)."""
    folder = source.path if source.path.is_dir() else None
    if folder is None:
        return
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in AUX_SUFFIXES and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out / f.name)
