"""A model on the Hugging Face hub, read before anything is downloaded: its file list with sizes,
config.json, the safetensors headers, or a GGUF file's header (a ranged read of its first bytes).

Every request goes through huggingface_hub, which brings HF_ENDPOINT, HF_TOKEN, proxies, the
standard cache and offline mode (HF_HUB_OFFLINE); the GGUF header is the one ranged read made by
hand, with huggingface_hub's session, URL and headers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
HUB_TIMEOUT_S = 5.0
# A GGUF header (metadata + tensor table, the vocabulary included) is read in ranged chunks that
# grow until the whole header is in: most are under 8 MiB, a 256K-token vocabulary is ~10 MiB.
GGUF_HEAD_BYTES = 4 << 20
GGUF_HEAD_MAX_BYTES = 256 << 20
# What a model folder needs: weights, config, tokenizer, generation config, chat template.
# Top-level only: repos keep duplicates in sub-folders (Meta's original/*.pth, onnx/), and
# Mistral's consolidated.safetensors repeats the sharded weights in another layout.
NEEDED_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "*.tiktoken", "chat_template.jinja", "chat_template.json",
)
IGNORED_PATTERNS = ("*/*", "consolidated*")
_NOT_A_MODEL_GGUF = re.compile(r"(mmproj|imatrix)", re.IGNORECASE)
_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class HubError(RuntimeError):
    """The hub could not be read (offline, unknown or gated repo, no weights): says why."""


def is_hub_id(model: str) -> bool:
    """`Org/Name` that is not a local path: what the hub calls a repo id."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return False
    parts = model.split("/")
    return len(parts) == 2 and all(re.fullmatch(r"[\w.\-]+", p) for p in parts)


def hub_offline() -> bool:
    # read at call time as well: huggingface_hub reads the variable once, at its own import
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """One quick connection attempt, instead of the client's retries with back-off, which stall an
    offline run."""
    from huggingface_hub import constants

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {host}: {e}"
    return None


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str | None
    sha: str | None  # the commit the revision points at
    files: dict[str, int | None]  # path in the repo -> size in bytes

    @property
    def gguf_files(self) -> list[str]:
        """Model GGUF files, largest first: projectors and importance matrices left out, and
        split files (`-00001-of-00003.gguf`), which the loader does not read."""
        out = [f for f in self.files if f.endswith(".gguf")
               and not _NOT_A_MODEL_GGUF.search(f) and not _SPLIT_PART.search(f)]
        return sorted(out, key=lambda f: -(self.files.get(f) or 0))

    @property
    def has_safetensors(self) -> bool:
        return "config.json" in self.files and any(
            f.endswith(".safetensors") and "/" not in f for f in self.files)

    def needed_files(self) -> list[str]:
        """The files `snapshot_download(allow_patterns=NEEDED_PATTERNS,
        ignore_patterns=IGNORED_PATTERNS)` fetches."""
        return [f for f in self.files
                if any(fnmatch.fnmatch(f, p) for p in NEEDED_PATTERNS)
                and not any(fnmatch.fnmatch(f, p) for p in IGNORED_PATTERNS)]

    def download_bytes(self, files: list[str]) -> int:
        return sum(self.files.get(f) or 0 for f in files)


def hub_error(repo_id: str, why: str) -> HubError:
    from spillover.catalog import catalog_ids

    return HubError(
        f"could not read {repo_id!r} from the Hugging Face hub ({why}). Offline, plan works for "
        f"local files and the built-in catalog: {', '.join(catalog_ids())}"
    )


def list_repo(repo_id: str, revision: str | None = None) -> HubRepo:
    """The repo's files and their sizes at `revision` (one API call)."""
    if hub_offline():
        raise hub_error(repo_id, "HF_HUB_OFFLINE is set")
    reach = hub_unreachable()
    if reach:
        raise hub_error(repo_id, reach)
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                  timeout=HUB_TIMEOUT_S)
    except Exception as e:  # unknown repo, gated repo, bad revision: say which
        raise hub_error(repo_id, f"{type(e).__name__}: {str(e)[:300]}") from e
    files = {s.rfilename: s.size for s in info.siblings or []}
    return HubRepo(repo_id, revision, info.sha, files)


def read_config(repo: HubRepo) -> dict[str, object]:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo.repo_id, "config.json", revision=repo.sha or repo.revision,
                               etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:
        raise hub_error(repo.repo_id, f"config.json: {type(e).__name__}: {str(e)[:200]}") from e
    return dict(json.loads(Path(path).read_text()))


def read_gguf_head(repo: HubRepo, filename: str, dest: Path,
                   parse: Callable[[Path], T]) -> T:
    """`parse(dest)` of `filename`'s header, read into `dest`: a sparse file of the full size, so
    that the tensor data is never fetched, yet a GGUF reader finds every offset where it expects
    it. `parse` returns something with the reader's `data_offset`: where the header ends."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    size = repo.files.get(filename) or 0
    url = hf_hub_url(repo.repo_id, filename, revision=repo.sha or repo.revision)
    n = GGUF_HEAD_BYTES
    while True:
        end = min(n, size) if size else n
        r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes=0-{end - 1}"},
                              timeout=HUB_TIMEOUT_S * 6, follow_redirects=True)
        hf_raise_for_status(r)
        with open(dest, "wb") as f:
            f.write(r.content[:end])
            f.truncate(max(size, end))
        try:
            parsed = parse(dest)
            if getattr(parsed, "data_offset", end + 1) <= end:
                return parsed
        except Exception:  # cut inside the header: read more
            pass
        if end >= size or n >= GGUF_HEAD_MAX_BYTES:
            raise hub_error(repo.repo_id, f"{filename}: no readable GGUF header in its first "
                                          f"{end} bytes")
        n *= 4
