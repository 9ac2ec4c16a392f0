"""Resolve the MODEL argument of `plan` to a ModelConfig and an inventory, reading headers only.

Order: a local GGUF file, a local folder, the built-in catalog, then the Hugging Face hub
(config.json + safetensors headers, never the weights). Offline, the hub step fails with a
clear message and the catalog is offered instead.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from spillover.catalog import CONFIGS, UnknownModelError, lookup
from spillover.config import ModelConfig
from spillover.plan.formats import WeightScheme, checkpoint_scheme
from spillover.plan.inventory import (
    SAFETENSORS_DTYPE_BYTES,
    Inventory,
    inventory_from_config,
    inventory_from_gguf_tensors,
)

HUB_TIMEOUT_S = 5.0


class ModelSourceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str
    config: ModelConfig
    inventory: Inventory
    kind: str  # gguf | folder | catalog | hub
    checkpoint_bytes: int | None = None  # what a download or the files on disk take
    notes: tuple[str, ...] = ()
    scheme: WeightScheme | None = None  # a pre-quantised checkpoint's own format: the plan sizes it


def resolve(model: str, allow_hub: bool = True) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path)
    if path.is_dir():
        return from_folder(path)
    key = lookup(model)
    if key is not None:
        cfg = ModelConfig.from_hf(CONFIGS[key])
        inv = inventory_from_config(cfg)
        note = () if key == model else (f"{model!r} -> catalog entry {key}",)
        return ModelSource(key, cfg, inv, "catalog", None, note)
    if "/" in model and allow_hub and not path.exists():
        return from_hub(model)
    raise UnknownModelError(
        f"{model!r} is not a local .gguf file or model folder, nor in the built-in catalog"
        + ("" if "/" in model else " (hub ids look like Org/Name)")
    )


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    import gguf  # the reader maps the file; only headers are touched

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            meta["_n_tokens"] = len(f.data)  # the token list itself is large and not needed
            continue
        if key.startswith("tokenizer.ggml.") and not key.endswith("_token_id"):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # unknown value types in new files: skip, the config keys are plain
            continue
    return meta, reader


def from_gguf(path: Path) -> ModelSource:
    meta, reader = read_gguf(path)
    names = {t.name for t in reader.tensors}
    arch = meta.get("general.architecture")
    if arch and f"{arch}.vocab_size" not in meta and "_n_tokens" in meta:
        meta[f"{arch}.vocab_size"] = meta["_n_tokens"]
    cfg = ModelConfig.from_gguf(meta, names)
    inv = inventory_from_gguf_tensors(reader.tensors)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return ModelSource(
        str(meta.get("general.name") or path.stem),
        cfg,
        inv,
        "gguf",
        path.stat().st_size,
        (f"GGUF tensor types: {', '.join(types)}",),
    )


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(n)))


def _checkpoint_quant(raw: dict[str, Any]) -> tuple[WeightScheme | None, list[str]]:
    """(the format a pre-quantised checkpoint loads in, a note); (None, []) for a
    float checkpoint."""
    from spillover.quant.importers.checkpoint_config import CheckpointQuantError, parse_quantization

    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        return None, []
    method = q.get("quant_method", "unknown")
    try:
        cq = parse_quantization(q, "config.json")
    except CheckpointQuantError as e:
        return None, [f"checkpoint is pre-quantised in a way spillover cannot load ({e}); the plan "
                      "sizes the format chosen with --quant for a float checkpoint of this model"]
    scheme = checkpoint_scheme(cq.method, cq.checkpoint_format, cq.bits, cq.group_size, cq.sym,
                               cq.weight_block_size)
    if scheme is None:
        return None, [f"checkpoint is pre-quantised ({method}, {cq.bits}-bit), which spillover "
                      "cannot load (4-bit GPTQ/AWQ/compressed-tensors, FP8 and compressed-tensors "
                      "int8 only); the plan sizes the format chosen with --quant for a float "
                      "checkpoint of this model"]
    return scheme, [f"checkpoint is pre-quantised ({method}): it loads as stored, "
                    f"{scheme.description}; the plan sizes that"]


def _checkpoint_notes(params_on_disk: int | None, inv: Inventory,
                      quant_notes: list[str]) -> list[str]:
    notes = list(quant_notes)
    if params_on_disk and params_on_disk != inv.total_params:
        extra = params_on_disk - inv.total_params
        notes.append(
            f"files hold {params_on_disk:,} parameters; {extra:,} are not loaded for inference "
            "(e.g. MTP layers) or are quantisation scales"
        )
    return notes


def from_folder(path: Path) -> ModelSource:
    cfg = ModelConfig.from_folder(path)
    raw = json.loads((path / "config.json").read_text())
    inv = inventory_from_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    params = 0
    for f in files:
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                params += n
    size = sum(f.stat().st_size for f in files) or None
    scheme, quant_notes = _checkpoint_quant(raw)
    return ModelSource(path.name, cfg, inv, "folder", size,
                       tuple(_checkpoint_notes(params or None, inv, quant_notes)), scheme)


def _hub_error(repo_id: str, why: str) -> ModelSourceError:
    from spillover.catalog import catalog_ids

    return ModelSourceError(
        f"could not read config.json of {repo_id!r} from the Hugging Face hub ({why}). "
        f"Offline, plan works for local files and the built-in catalog: {', '.join(catalog_ids())}"
    )


def _offline() -> bool:
    # read at call time: huggingface_hub reads the variable once, at its own import
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable() -> str | None:
    """One quick connection attempt, instead of the client's retries with back-off, which stall an
    offline run."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {host}: {e}"
    return None


def from_hub(repo_id: str) -> ModelSource:
    if _offline():
        raise _hub_error(repo_id, "HF_HUB_OFFLINE is set")
    reach = _hub_unreachable()
    if reach:
        raise _hub_error(repo_id, reach)
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        cfg_path = hf_hub_download(repo_id, "config.json", etag_timeout=HUB_TIMEOUT_S)
        raw = json.loads(Path(cfg_path).read_text())
    except Exception as e:  # offline, unknown repo, gated repo: say which, then offer the catalog
        raise _hub_error(repo_id, f"{type(e).__name__}: {str(e)[:200]}") from e
    cfg = ModelConfig.from_hf(raw)
    inv = inventory_from_config(cfg)
    size: int | None = None
    params: int | None = None
    notes: list[str] = []
    try:
        meta = get_safetensors_metadata(repo_id)
        params = sum(int(v) for v in meta.parameter_count.values())
        size = 0
        for fm in meta.files_metadata.values():
            for t in fm.tensors.values():
                n = 1
                for d in t.shape:
                    n *= int(d)
                size += n * SAFETENSORS_DTYPE_BYTES.get(t.dtype, 2)
    except Exception as e:
        notes.append(f"safetensors headers not read ({type(e).__name__}); sizes come "
                     "from config.json")
    scheme, quant_notes = _checkpoint_quant(raw)
    notes = _checkpoint_notes(params, inv, quant_notes) + notes
    return ModelSource(repo_id, cfg, inv, "hub", size, tuple(notes), scheme)
