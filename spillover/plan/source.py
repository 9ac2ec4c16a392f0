"""Resolve the MODEL argument of `plan` to a ModelConfig and an inventory, reading headers only.

Order: a local GGUF file, a local folder, the built-in catalog, then the Hugging Face hub
(config.json + safetensors headers, never the weights). Offline, the hub step fails with a
clear message and the catalog is offered instead.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spillover.catalog import CONFIGS, UnknownModelError, lookup
from spillover.config import ModelConfig
from spillover.plan.formats import WeightScheme, checkpoint_scheme
from spillover.plan.hub import HubError, HubRepo, hub_error, list_repo, read_config, read_gguf_head
from spillover.plan.inventory import (
    SAFETENSORS_DTYPE_BYTES,
    Inventory,
    inventory_from_config,
    inventory_from_gguf_tensors,
)

# a hub error is a model-source error: callers catch one class
ModelSourceError = HubError


@dataclass(frozen=True)
class ModelSource:
    name: str
    config: ModelConfig
    inventory: Inventory
    kind: str  # gguf | folder | catalog | hub
    checkpoint_bytes: int | None = None  # what a download or the files on disk take
    notes: tuple[str, ...] = ()
    scheme: WeightScheme | None = None  # a pre-quantised checkpoint's own format: the plan sizes it
    files: tuple[str, ...] = ()  # hub: the files a download fetches (a GGUF repo: the one chosen)
    revision: str | None = None  # hub: the commit the plan was read at


def resolve(model: str, allow_hub: bool = True, revision: str | None = None,
            gguf_file: str | None = None, fits: Callable[[ModelSource], bool] | None = None,
            max_bytes: int | None = None) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path)
    if path.is_dir():
        return from_folder(path)
    key = lookup(model) if revision is None and gguf_file is None else None
    if key is not None:
        cfg = ModelConfig.from_hf(CONFIGS[key])
        inv = inventory_from_config(cfg)
        note = () if key == model else (f"{model!r} -> catalog entry {key}",)
        return ModelSource(key, cfg, inv, "catalog", None, note)
    if "/" in model and allow_hub and not path.exists():
        return from_hub(model, revision, gguf_file, fits, max_bytes)
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


class _Head(tuple):  # type: ignore[type-arg]
    """read_gguf's (meta, reader), with the reader's data_offset: where the header ends."""

    @property
    def data_offset(self) -> int:
        return int(self[1].data_offset)


def _read_head(path: Path) -> _Head:
    return _Head(read_gguf(path))


def from_gguf(path: Path, parsed: tuple[dict[str, Any], Any] | None = None) -> ModelSource:
    """A GGUF file's model, from its header (`parsed`: read_gguf's answer, when already read)."""
    meta, reader = parsed if parsed is not None else read_gguf(path)
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
        (f"GGUF tensor types: {', '.join(types)}",
         "sized and timed as stored, i.e. loaded with --quant native; the default --quant auto "
         "dequantizes to the compute dtype (bf16 on a GPU, float32 on the CPU): more memory, "
         "slower decode"),
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


def from_hub(repo_id: str, revision: str | None = None, gguf_file: str | None = None,
             fits: Callable[[ModelSource], bool] | None = None,
             max_bytes: int | None = None) -> ModelSource:
    """`repo_id` at `revision`, from its file list, config.json and safetensors headers (or a GGUF
    file's header), with `files`: what a download needs. A GGUF repo: `gguf_file`, else the
    largest file of at most `max_bytes` for which `fits` holds (else the smallest)."""
    repo = list_repo(repo_id, revision)
    if gguf_file is not None or not repo.has_safetensors:
        return _from_hub_gguf(repo, gguf_file, fits, max_bytes)
    raw = read_config(repo)
    cfg = ModelConfig.from_hf(raw)
    inv = inventory_from_config(cfg)
    size: int | None = None
    params: int | None = None
    notes: list[str] = []
    try:
        from huggingface_hub import HfApi

        # a new HfApi reads HF_ENDPOINT now; the module-level helper's was fixed at import
        meta = HfApi().get_safetensors_metadata(repo_id, revision=repo.sha or revision)
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
    files = tuple(repo.needed_files())
    return ModelSource(repo_id, cfg, inv, "hub", size or repo.download_bytes(list(files)),
                       tuple(notes), scheme, files, repo.sha)


def _from_hub_gguf(repo: HubRepo, gguf_file: str | None,
                   fits: Callable[[ModelSource], bool] | None,
                   max_bytes: int | None) -> ModelSource:
    if gguf_file is not None:
        if gguf_file not in repo.files:
            raise hub_error(repo.repo_id, f"no file {gguf_file!r}; its GGUF files: "
                                          f"{', '.join(repo.gguf_files) or 'none'}")
        return _hub_gguf_source(repo, gguf_file, ())
    files = repo.gguf_files
    if not files:
        raise hub_error(repo.repo_id, "it has neither config.json + .safetensors nor a single-file "
                                      ".gguf that spillover loads")
    tried: list[str] = []
    for f in files:
        size = repo.files.get(f) or 0
        if max_bytes is not None and size > max_bytes and f != files[-1]:
            continue  # larger than GPU + RAM together: not worth reading its header
        src = _hub_gguf_source(repo, f, tuple(tried))
        if not _gguf_loadable(src) and f != files[-1]:
            tried.append(f"{f} (tensor types spillover does not load)")
            continue
        if fits is None or fits(src) or f == files[-1]:
            return src
        tried.append(f)
    raise AssertionError("unreachable: the smallest file is always returned")


def _gguf_loadable(src: ModelSource) -> bool:
    """Every tensor in a float type or a block format the GGUF importer reads (IQ* and the
    ternary formats are not)."""
    from spillover.quant.importers.gguf import SUPPORTED

    ok = {"F32", "F16", "BF16", *(q.name for q in SUPPORTED)}
    return all(t.stored_dtype in ok for t in src.inventory.tensors)


def _hub_gguf_source(repo: HubRepo, filename: str, tried: tuple[str, ...]) -> ModelSource:
    with tempfile.TemporaryDirectory(prefix="spillover-gguf-head-") as tmp:
        meta, reader = read_gguf_head(repo, filename, Path(tmp) / Path(filename).name, _read_head)
        src = from_gguf(Path(tmp) / Path(filename).name, (meta, reader))
    others = [f for f in repo.gguf_files if f != filename]
    notes = [f"{repo.repo_id}: {filename}" + (f" (others: {', '.join(others)})" if others else "")]
    if tried:
        notes.append(f"larger GGUF files that do not fit: {', '.join(tried)}")
    return replace(src, name=f"{repo.repo_id}/{filename}", kind="hub",
                   checkpoint_bytes=repo.files.get(filename) or src.checkpoint_bytes,
                   notes=src.notes + tuple(notes), files=(filename,), revision=repo.sha)
