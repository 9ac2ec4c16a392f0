"""What `spillover deploy` writes, checked against outside references: every vLLM / SGLang / Ray
flag against the engines' documented arguments (tests/data/deploy/engine_args.json, with the
version each list was read from), every compose file (the generated ones and the repository's
compose.yaml) against the compose-spec JSON schema, and no secret value in any of them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spillover.deploy import Deployment, choose, compose, env_example, to_yaml
from spillover.deploy.engines import SGLANG_IMAGE, VLLM_IMAGE
from spillover.hw.info import nominal_hardware
from spillover.plan.memory import Limits
from spillover.plan.source import resolve

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "deploy"
ARGS = json.loads((DATA / "engine_args.json").read_text())
SCHEMA = json.loads((DATA / "compose-spec.json").read_text())
SECRET_NAMES = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
# shapes of real credentials: Hugging Face tokens, OpenAI-style keys, long hex / base64 blobs
SECRET_VALUES = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|[A-Fa-f0-9]{40,}")

CASES = {
    "vllm-tp4": dict(gpu="h100", gpus=4),
    "vllm-fp8-tp2-dp2": dict(gpu="h100", gpus=4, quant="fp8"),
    "vllm-2-nodes": dict(gpu="h100", gpus=2, nodes=2, engine="vllm"),
    "sglang-tp4": dict(gpu="h100", gpus=4, engine="sglang"),
    "sglang-fp8": dict(gpu="h100", gpus=4, engine="sglang", quant="fp8"),
    "sglang-2-nodes": dict(gpu="h100", gpus=2, nodes=2, engine="sglang"),
    "spillover-5090": dict(gpu="rtx5090", ram="60GB"),
    "spillover-h100-int4": dict(gpu="h100", quant="int4"),
}


def deployment(case: str) -> Deployment:
    kw: dict[str, Any] = dict(CASES[case])
    hw = nominal_hardware(kw.pop("gpu"), kw.pop("ram", "256GB"))
    return choose(resolve("qwen3-next-80b", allow_hub=False), hw, Limits(), **kw)


def unknown_flags(argv: list[str] | tuple[str, ...], documented: list[str]) -> list[str]:
    known = set(documented)
    return [a.split("=", 1)[0] for a in argv
            if a.startswith("--") and a.split("=", 1)[0] not in known]


def secrets_in(doc: Any, path: str = "") -> list[str]:
    """Literal values that look like, or are named like, credentials anywhere in a compose doc."""
    found: list[str] = []
    if isinstance(doc, dict):
        if path.endswith("environment") and not path.startswith("secrets"):
            for k, v in doc.items():
                if SECRET_NAMES.search(str(k)) and v not in (None, ""):
                    found.append(f"{path}.{k}")
        for k, v in doc.items():
            found += secrets_in(v, f"{path}.{k}" if path else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            if isinstance(v, str) and "=" in v and path.endswith("environment"):
                name, value = v.split("=", 1)
                if SECRET_NAMES.search(name) and value:
                    found.append(f"{path}[{i}]")
            found += secrets_in(v, f"{path}[{i}]")
    elif isinstance(doc, str) and SECRET_VALUES.search(doc):
        found.append(path)
    return found


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("spillover")])
def test_every_engine_flag_is_documented(case: str) -> None:
    d = deployment(case)
    engine = ARGS[d.engine]
    assert unknown_flags(d.command.argv, engine["flags"]) == []
    q = d.command.value("--quantization")
    assert q is None or q in engine["quantization"]
    # the image is the release the flag list was read for
    assert d.image == engine["image"] == {"vllm": VLLM_IMAGE, "sglang": SGLANG_IMAGE}[d.engine]


def test_ray_flags_are_documented() -> None:
    services = compose(deployment("vllm-2-nodes"))["services"]
    starts = []
    for svc in services.values():
        for part in re.split(r";|&&", svc["entrypoint"][2]):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"] or words[:3] == ["exec", "ray", "start"]:
                starts.append(words)
                assert unknown_flags(words, ARGS["ray"]["flags"]) == []
    assert len(starts) == 2  # the head and the worker


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("spillover")])
def test_spillover_commands_parse_with_the_real_cli(case: str) -> None:
    from spillover.cli.main import build_parser

    d = deployment(case)
    args = build_parser().parse_args(list(d.command.argv[1:]))
    assert args.command == "serve" and args.quant == d.plan.scheme.name
    assert int(args.gpu_memory) == d.plan.hardware.gpus[0].vram_total
    assert int(args.cpu_memory) == d.plan.hardware.ram_total


def test_the_flag_check_catches_a_made_up_flag() -> None:
    argv = ["vllm", "serve", "m", "--tensor-parallel", "4", "--max-model-len", "8"]
    assert unknown_flags(argv, ARGS["vllm"]["flags"]) == ["--tensor-parallel"]
    assert unknown_flags(["--tp", "2"], ARGS["sglang"]["flags"]) == ["--tp"]  # an abbreviation


def compose_files() -> dict[str, dict[str, Any]]:
    docs = {c: yaml.safe_load(to_yaml(compose(deployment(c)))) for c in CASES}
    docs["repository compose.yaml"] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return compose_files()


def test_compose_files_are_valid_compose_spec(docs: dict[str, dict[str, Any]]) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    for name, doc in docs.items():
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == [], name


def test_the_schema_rejects_a_broken_service(docs: dict[str, dict[str, Any]]) -> None:
    doc = json.loads(json.dumps(docs["vllm-tp4"]))
    doc["services"]["server"]["healthchek"] = doc["services"]["server"].pop("healthcheck")
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(doc))
    doc = json.loads(json.dumps(docs["vllm-tp4"]))
    doc["services"]["server"]["restart"] = ["always"]
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(doc))


def test_no_secret_values_anywhere(docs: dict[str, dict[str, Any]]) -> None:
    for name, doc in docs.items():
        assert secrets_in(doc) == [], name
        # the secrets come from the environment of `docker compose up`, never from a value
        for secret in doc["secrets"].values():
            assert set(secret) == {"environment"}, name
    for case in CASES:
        for line in env_example(deployment(case)).splitlines():
            if line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            assert not (SECRET_NAMES.search(key) and value), line


def test_the_secret_check_bites() -> None:
    leaky = {"services": {"s": {"environment": {"HF_TOKEN": "hf_" + "a" * 30}}}}
    assert secrets_in(leaky) == ["services.s.environment.HF_TOKEN",
                                 "services.s.environment.HF_TOKEN"]
    assert secrets_in({"services": {"s": {"environment": ["VLLM_API_KEY=abc"]}}})
    assert secrets_in({"services": {"s": {"command": ["--api-key", "sk-" + "b" * 24]}}})


def test_services_are_local_healthy_and_restart(docs: dict[str, dict[str, Any]]) -> None:
    for name, doc in docs.items():
        assert "hf-cache" in doc["volumes"], name
        for svc_name, svc in doc["services"].items():
            if svc.get("network_mode") == "host":
                # no port mapping guards it: the server itself binds to BIND_ADDR (127.0.0.1)
                assert "ports" not in svc
                argv = svc.get("command", [])
                if "--host" in argv:
                    assert argv[argv.index("--host") + 1] == "${BIND_ADDR:-127.0.0.1}"
            else:
                assert svc["ports"] == ["${BIND_ADDR:-127.0.0.1}:${PORT:-8000}:8000"], name
            assert svc["restart"] == "unless-stopped"
            assert any(v.startswith("hf-cache:") for v in svc["volumes"])
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"]
            if svc_name != "worker":
                assert "/health" in " ".join(svc["healthcheck"]["test"]), name
                assert set(svc["secrets"]) == {"api_key", "hf_token"}


def test_gpu_reservation_matches_the_split() -> None:
    d = deployment("vllm-fp8-tp2-dp2")
    svc = compose(d)["services"]["server"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    d = deployment("spillover-5090")
    svc = compose(d)["services"]["server"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
