"""Synthetic-weight checkpoints: any config (catalog name or config dict) as a random HF folder.

Speed depends on shapes, not values, so a random model of a known config shows the speed of the
real one before anything is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_synthetic_folder(config: dict[str, Any], folder: Path, seed: int = 0) -> Path:
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def catalog_folder(name: str, root: Path) -> Path:
    from spillover.catalog import get_config

    model_id, cfg = get_config(name)
    return make_synthetic_folder(dict(cfg), root / model_id.replace("/", "--"))
