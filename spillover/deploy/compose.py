"""Deployment -> compose.yaml and .env.example.

Secrets are never written: the API key and the hub token are compose secrets read from the
environment of whoever runs `docker compose up` (compose-spec `secrets.*.environment`), so they
reach the container as files under /run/secrets and appear in no file, image or `docker inspect`.
Each server reads them at start (the entrypoint snippets below). The port is published on
127.0.0.1 unless BIND_ADDR says otherwise.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from spillover.deploy.choose import Deployment
from spillover.deploy.engines import PORT, RAY_PORT

API_KEY_ENV = "SPILLOVER_API_KEY"  # the one name the user sets, whichever engine runs
HF_TOKEN_ENV = "HF_TOKEN"
HF_CACHE = "/root/.cache/huggingface"  # vLLM and SGLang images run as root
SPILLOVER_HF_CACHE = "/home/spillover/.cache/huggingface"  # our image runs as user spillover
LOCAL = f"127.0.0.1:{PORT}"  # inside the container, behind the published port
# On host networking the server binds to BIND_ADDR:PORT itself (no port mapping guards it).
HOST_NET = f"${{BIND_ADDR:-127.0.0.1}}:${{PORT:-{PORT}}}"
# Loading an 80B checkpoint (and compiling CUDA graphs) takes minutes: no restarts meanwhile.
HEALTH_START_PERIOD = "30m"
SHM_SIZE = "16gb"  # NCCL and the engines' worker processes share tensors through /dev/shm
# Exported inside the container before the server starts; `$$` is compose's escaped `$`.
_READ_TOKEN = ('[ -s /run/secrets/hf_token ] && export HF_TOKEN="$$(cat /run/secrets/hf_token)"; ')
_ENTRY = {
    # vLLM reads its key from VLLM_API_KEY; SGLang only from --api-key, appended here
    "vllm": _READ_TOKEN + ('[ -s /run/secrets/api_key ] && '
                           'export VLLM_API_KEY="$$(cat /run/secrets/api_key)"; exec "$$@"'),
    "sglang": _READ_TOKEN + ('[ -s /run/secrets/api_key ] && '
                             'set -- "$$@" --api-key "$$(cat /run/secrets/api_key)"; exec "$$@"'),
}


def health(addr: str) -> str:
    """A check every image can run: python3 is in all three, curl may not be."""
    return ("import urllib.request; "
            f"urllib.request.urlopen('http://{addr}/health', timeout=5)")


def compose(d: Deployment) -> dict[str, Any]:
    """The compose document (a plain dict: yaml.safe_dump writes it)."""
    if d.engine == "vllm" and d.nodes > 1:
        services = _ray_services(d)
    else:
        services = {"server": _server(d)}
    return {
        "name": _project_name(d),
        "services": services,
        "secrets": {
            "api_key": {"environment": API_KEY_ENV},
            "hf_token": {"environment": HF_TOKEN_ENV},
        },
        "volumes": {"hf-cache": {}},
    }


def to_yaml(doc: dict[str, Any]) -> str:
    import yaml  # PyYAML comes with huggingface_hub and transformers

    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100))


def env_example(d: Deployment) -> str:
    """Names only: the values of the two secrets belong in the shell or a secrets manager."""
    lines = [
        "# Read by compose.yaml from the environment of `docker compose up`. Export the two",
        "# secrets in your shell or secrets manager (empty HF_TOKEN for a public model); never",
        "# write their values here or in any file next to compose.yaml.",
        f"{API_KEY_ENV}=",
        f"{HF_TOKEN_ENV}=",
        "# Where the API is published (127.0.0.1: this machine only).",
        "BIND_ADDR=127.0.0.1",
        f"PORT={PORT}",
    ]
    if d.nodes > 1:
        lines += ["# Multi-node: the first node's address on the cluster network, on every node.",
                  "HEAD_ADDR="]
        if d.engine == "vllm":
            lines += ["# This node's own address on that network (set it where a node has "
                      "several).", "NODE_ADDR="]
        if d.engine == "sglang":
            lines += ["# This node's rank: 0 on the first node, 1 .. N-1 on the others.",
                      "NODE_RANK="]
    return "\n".join(lines) + "\n"


def _server(d: Deployment) -> dict[str, Any]:
    multi = d.nodes > 1
    svc: dict[str, Any] = {"image": d.image}
    if d.engine != "spillover":  # our image's entrypoint reads the secrets itself
        svc["entrypoint"] = ["/bin/sh", "-c", _ENTRY[d.engine], "sh"]
    svc["command"] = list(_host_for(d.command.argv, multi))
    if multi:
        svc["network_mode"] = "host"  # NCCL and the rendezvous need the nodes' own addresses
    else:
        svc["ports"] = [f"${{BIND_ADDR:-127.0.0.1}}:${{PORT:-{PORT}}}:{PORT}"]
    cache = SPILLOVER_HF_CACHE if d.engine == "spillover" else HF_CACHE
    svc["volumes"] = [f"hf-cache:{cache}"]
    if d.model_mount:
        svc["volumes"].append(f"{d.model_mount[0]}:{d.model_mount[1]}:ro")
    svc["secrets"] = ["api_key", "hf_token"]
    svc["shm_size"] = SHM_SIZE
    # pinned host memory (spillover's RAM tier, NCCL buffers) must not hit a memlock limit
    svc["ulimits"] = {"memlock": {"soft": -1, "hard": -1}}
    svc["deploy"] = {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1 if d.engine == "spillover" else d.gpus,
         "capabilities": ["gpu"]}]}}}
    test = ["CMD", "python3", "-c", health(HOST_NET if multi else LOCAL)]
    if multi and d.engine == "sglang":
        # only node 0 serves HTTP: the other ranks report healthy (the rank is set per node)
        test = ["CMD-SHELL", f'[ "${{NODE_RANK:-0}}" != 0 ] || python3 -c "{test[3]}"']
    svc["healthcheck"] = {"test": test, "interval": "30s", "timeout": "10s", "retries": 3,
                          "start_period": HEALTH_START_PERIOD}
    svc["restart"] = "unless-stopped"
    return svc


def _ray_services(d: Deployment) -> dict[str, Any]:
    """vLLM over several nodes: Ray on every node, `vllm serve` on the first. One file for all
    nodes: `--profile head` on the first, `--profile worker` on the others."""
    head = _server(d)
    serve = _ENTRY["vllm"].replace('exec "$$@"', "")
    head["entrypoint"] = ["/bin/sh", "-c",
                          serve + f"ray start --head --port={RAY_PORT} && exec \"$$@\"", "sh"]
    head["profiles"] = ["head"]
    # which of a node's addresses vLLM and Ray announce (empty: vLLM picks one itself)
    head["environment"] = {"VLLM_HOST_IP": "${NODE_ADDR:-}"}
    # a deep copy: shared objects would be written as YAML anchors
    worker = copy.deepcopy({k: v for k, v in head.items()
                            if k not in ("healthcheck", "command", "secrets")})
    worker["entrypoint"] = ["/bin/sh", "-c", _READ_TOKEN + "exec ray start --block "
                            f"--address=${{HEAD_ADDR:?set HEAD_ADDR}}:{RAY_PORT}"]
    worker["profiles"] = ["worker"]
    worker["secrets"] = ["hf_token"]  # Ray workers download their shard of the weights too
    return {"head": head, "worker": worker}


def _host_for(argv: tuple[str, ...], multi: bool) -> tuple[str, ...]:
    """On host networking the server binds where BIND_ADDR and PORT say."""
    if not multi:
        return argv
    out = list(argv)
    for flag, value in (("--host", "${BIND_ADDR:-127.0.0.1}"), ("--port", f"${{PORT:-{PORT}}}")):
        if flag in out:
            out[out.index(flag) + 1] = value
    return tuple(out)


def _project_name(d: Deployment) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", d.served_name.split("/")[-1].lower()).strip("-")
    return f"{d.engine}-{slug}"[:60]
