"""Built-in catalog of model configs (data), looked up by hub id or a loose name."""

from __future__ import annotations

import copy
import re
from typing import Any

from spillover.catalog.configs import ALIASES, CONFIGS

__all__ = ["CONFIGS", "ALIASES", "UnknownModelError", "catalog_ids", "lookup", "get_config"]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else "unknown model"


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", s.lower())


def catalog_ids() -> list[str]:
    return list(CONFIGS)


def lookup(name: str) -> str | None:
    """Catalog id for `name`: an exact hub id, an alias, or an unambiguous fragment ('qwen3-8b')."""
    if name in CONFIGS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    q = _norm(name)
    every = {**{k: k for k in CONFIGS}, **ALIASES}
    for key, target in every.items():
        if q in (_norm(key), _norm(key.split("/", 1)[-1])):
            return target
    hits = sorted({t for k, t in every.items() if q and q in _norm(k)})
    if len(hits) == 1:
        return hits[0]
    # "qwen3-next-80b" matches Instruct and Thinking: both have one architecture, pick Instruct
    if hits and all(h.replace("Thinking", "Instruct") == hits[0] for h in hits):
        return hits[0]
    return None


def get_config(name: str) -> tuple[str, dict[str, Any]]:
    """(catalog id, a copy of its config.json dict); raises UnknownModelError with close names."""
    key = lookup(name)
    if key is None:
        q = _norm(name.split("/")[-1])
        close = [k for k in CONFIGS
                 if any(part and part in _norm(k) for part in re.split(r"[-_.]", q))]
        hint = f" Close: {', '.join(close[:6])}." if close else ""
        raise UnknownModelError(
            f"{name!r} is not in the built-in catalog ({len(CONFIGS)} models: run with "
            f"--list-models).{hint}"
        )
    return key, copy.deepcopy(CONFIGS[key])
