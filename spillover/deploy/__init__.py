"""Deployment files decided by the planner: spillover on one GPU + RAM, or a hand-off to vLLM or
SGLang when the model fits across several GPUs (docs/architecture.md, "Deployment").

    d = choose(source, hardware, limits, gpus=4)       # choose.py: engine, split, command
    write_deployment(d, Path("deploy-out"))            # compose.yaml, .env.example, README.md
"""

from __future__ import annotations

from pathlib import Path

from spillover.deploy.choose import (
    ENGINES,
    DeployError,
    Deployment,
    advise_gpus,
    choose,
    gpu_advice,
)
from spillover.deploy.compose import compose, env_example, to_yaml
from spillover.deploy.readme import render

__all__ = ["ENGINES", "DeployError", "Deployment", "advise_gpus", "choose", "gpu_advice", "compose",
           "env_example", "to_yaml", "render", "write_deployment", "FILES"]

FILES = ("compose.yaml", ".env.example", "README.md")


def write_deployment(d: Deployment, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    texts = {"compose.yaml": to_yaml(compose(d)), ".env.example": env_example(d),
             "README.md": render(d)}
    paths = []
    for name in FILES:
        path = out / name
        path.write_text(texts[name])
        paths.append(path)
    return paths
