"""config.json `quantization_config` of a pre-quantized checkpoint -> `CheckpointQuant`.

Understood: GPTQ (v1 "gptq" / "gptq_v2" packing), AWQ "gemm", compressed-tensors `pack-quantized`
integer weights, `float-quantized` FP8 per channel or in blocks (FP8_DYNAMIC, FP8_BLOCK) and
`int-quantized` int8 (W8A8: the weights are kept, activations stay in float), and Qwen / DeepSeek
fine-grained FP8 (`quant_method: fp8` with `weight_block_size`); docs/quantization.md, "1. What we
load". Anything else is refused here, naming config.json, before a tensor is read. Bit widths are
checked per module (checkpoint.py) so that the error can name the tensor as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_METHODS = ("awq", "compressed-tensors", "fp8", "gptq")
GPTQ_FORMATS = ("gptq", "gptq_v2")


class CheckpointQuantError(ValueError):
    """A quantized checkpoint (or one of its tensors) that spillover cannot import losslessly."""


@dataclass(frozen=True)
class CheckpointQuant:
    method: str  # one of SUPPORTED_METHODS
    bits: int
    group_size: int | None  # None: one group per output row (per channel), or FP8 blocks
    sym: bool
    desc_act: bool = False
    # GPTQ packing (gptq | gptq_v2), AWQ version (gemm), compressed-tensors format, FP8 fmt (e4m3)
    checkpoint_format: str = ""
    # modules_to_not_convert / compressed-tensors `ignore` (names, "re:" regexes)
    ignore: tuple[str, ...] = ()
    # FP8 only: (rows, columns) per scale, 0 = all of K
    weight_block_size: tuple[int, int] | None = None
    config_file: str = ""

    def ignores(self, module: str) -> bool:
        """Whether the config lists `module` as left in float (only used to explain the
        record: which modules are quantized is read from the tensors present, the file being
        the authority)."""
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return True
            # transformers matches modules_to_not_convert by substring
            elif pat == module or pat in module:
                return True
        return False


def detect_quantization(folder: str | Path) -> CheckpointQuant | None:
    """The checkpoint's quantization, or None for a float checkpoint (or a non-folder source)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        q = json.loads(path.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if q is None:
        legacy = folder / "quantize_config.json"  # AutoGPTQ's own file, beside a plain config.json
        if not legacy.is_file():
            return None
        path, q = legacy, {"quant_method": "gptq", **json.loads(legacy.read_text())}
    if not isinstance(q, dict):
        raise CheckpointQuantError(f"{path}: quantization_config is not an object")
    return parse_quantization(q, str(path))


def _names(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


def _group(value: Any) -> int | None:
    g = int(value) if value is not None else -1
    return None if g <= 0 else g  # GPTQ/AWQ write -1 for per channel


def parse_quantization(q: dict[str, Any], where: str = "config.json") -> CheckpointQuant:
    method = str(q.get("quant_method", "")).lower().replace("_", "-")
    if method == "gptq":
        fmt = str(q.get("checkpoint_format") or "gptq")
        if fmt not in GPTQ_FORMATS:
            raise CheckpointQuantError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                                       f"(supported: {', '.join(GPTQ_FORMATS)})")
        return CheckpointQuant("gptq", int(q.get("bits", 4)), _group(q.get("group_size", 128)),
                               bool(q.get("sym", True)), bool(q.get("desc_act", False)), fmt,
                               _names(q.get("modules_to_not_convert")), config_file=where)
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointQuantError(f"{where}: AWQ version {version!r} is not supported "
                                       "(supported: gemm)")
        return CheckpointQuant("awq", int(q.get("bits", q.get("w_bit", 4))),
                               _group(q.get("group_size", q.get("q_group_size", 128))),
                               not bool(q.get("zero_point", True)), False, version,
                               _names(q.get("modules_to_not_convert")), config_file=where)
    if method == "compressed-tensors":
        return _compressed_tensors(q, where)
    if method == "fp8":
        block = q.get("weight_block_size")
        if not isinstance(block, list | tuple) or len(block) != 2 or int(block[0]) != int(block[1]):
            raise CheckpointQuantError(f"{where}: FP8 weight_block_size {block!r} is not supported "
                                       "(square blocks such as [128, 128]; per-tensor FP8 is not)")
        fmt = str(q.get("fmt", "e4m3"))
        if fmt != "e4m3":
            raise CheckpointQuantError(f"{where}: FP8 fmt {fmt!r} is not supported (e4m3)")
        b = int(block[0])
        return CheckpointQuant("fp8", 8, None, True, False, fmt,
                               _names(q.get("modules_to_not_convert")),
                               (b, b), where)
    raise CheckpointQuantError(f"{where}: quant_method {q.get('quant_method')!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED_METHODS)}")


CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized")


def _compressed_tensors(q: dict[str, Any], where: str) -> CheckpointQuant:
    groups = q.get("config_groups") or {}
    formats = {str(q.get("format"))} | {str(g["format"]) for g in groups.values()
                                        if g.get("format")}
    formats.discard("None")
    if len(formats) != 1 or not formats <= set(CT_FORMATS):
        raise CheckpointQuantError(f"{where}: compressed-tensors format {sorted(formats)} is not "
                                   "supported (supported: pack-quantized integer weights such as "
                                   "W4A16, float-quantized block FP8, int-quantized int8)")
    (fmt,) = formats
    weights = [g.get("weights") or {} for g in groups.values()]
    if not weights or not all(weights):
        raise CheckpointQuantError(f"{where}: compressed-tensors config_groups declare no "
                                   "weight quantization")
    w0 = weights[0]

    def key(w: dict[str, Any]) -> tuple[Any, ...]:
        return (w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True),
                w.get("strategy"), w.get("group_size"), _names(w.get("block_structure")))

    if any(key(w) != key(w0) for w in weights):
        raise CheckpointQuantError(f"{where}: compressed-tensors groups with different weight "
                                   "schemes are not supported")
    kind = w0.get("type", "int")
    bits = int(w0.get("num_bits", 4))
    strategy = str(w0.get("strategy", "group"))
    ignore = _names(q.get("ignore"))
    if fmt == "float-quantized":
        block = _names(w0.get("block_structure"))
        # FP8_DYNAMIC: one scale per row
        if kind == "float" and bits == 8 and strategy == "channel":
            return CheckpointQuant("compressed-tensors", 8, None, True, False, fmt, ignore, (1, 0),
                                   where)
        square = len(block) == 2 and block[0] == block[1]
        if kind != "float" or bits != 8 or strategy != "block" or not square:
            raise CheckpointQuantError(f"{where}: compressed-tensors float-quantized {kind}{bits} "
                                       f"weights with strategy {strategy!r} are not supported (FP8 "
                                       "per channel, e.g. FP8_DYNAMIC, or in square blocks, e.g. "
                                       "FP8_BLOCK; per-tensor FP8 is not)")
        b = int(block[0])
        return CheckpointQuant("compressed-tensors", 8, None, True, False, fmt, ignore, (b, b),
                               where)
    if kind != "int":
        raise CheckpointQuantError(f"{where}: compressed-tensors {kind} weights are not supported "
                                   f"in {fmt} (integer weights only)")
    if strategy not in ("group", "channel"):
        raise CheckpointQuantError(f"{where}: compressed-tensors strategy {strategy!r} is not "
                                   "supported (group, channel)")
    group = _group(w0.get("group_size")) if strategy == "group" else None
    sym = bool(w0.get("symmetric", True))
    if fmt == "int-quantized" and (bits != 8 or not sym):
        raise CheckpointQuantError(f"{where}: compressed-tensors int-quantized {bits}-bit "
                                   f"{'symmetric' if sym else 'asymmetric'} weights are not "
                                   "supported (symmetric int8, e.g. W8A8)")
    return CheckpointQuant("compressed-tensors", bits, group, sym,
                           w0.get("actorder") not in (None, False),
                           fmt, ignore, config_file=where)
