"""The command lines of the three engines a deployment can run, built from a plan.

Every flag written here for vLLM and SGLang must be one those engines document: the test
tests/unit/test_deploy_flags.py checks each against tests/fixtures/deploy/engine_args.json, which
names the source and version it was read from. The images are pinned to the same releases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spillover.plan.memory import MemoryPlan
from spillover.plan.parallel import ParallelPlan

# Pinned images. Bump together with the flag fixture (its "version" fields say what was read).
VLLM_IMAGE = "vllm/vllm-openai:v0.11.2"
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.6.post1"
SPILLOVER_IMAGE = "spillover:0.1.0"  # built from the Dockerfile at the repository root

PORT = 8000  # inside the container; compose publishes it on 127.0.0.1 unless asked otherwise
RAY_PORT = 6379  # vLLM multi-node: the Ray head
SGLANG_DIST_PORT = 5000  # SGLang multi-node: torch.distributed rendezvous on the first node
# Memory fractions. vLLM's --gpu-memory-utilization covers weights, activations and KV (its
# default); SGLang's --mem-fraction-static covers weights and the KV pool only, the rest of the
# GPU is left to activations and CUDA graphs (its default for 4-7 GPUs).
VLLM_MEMORY_FRACTION = 0.90
SGLANG_MEMORY_FRACTION = 0.85
ENGINE_FRACTION = {"vllm": VLLM_MEMORY_FRACTION, "sglang": SGLANG_MEMORY_FRACTION}

# --quantization for a pre-quantised checkpoint (its config's quant_method). vLLM and SGLang force
# the slow kernels when told plain awq / gptq although the Marlin ones apply; symmetric GPTQ and
# AWQ get the Marlin names, which both engines document.
_MARLIN = {"awq": "awq_marlin", "gptq": "gptq_marlin"}


@dataclass(frozen=True)
class Command:
    """argv of the server process inside the container (the image's entrypoint comes first)."""

    argv: tuple[str, ...]

    def flags(self) -> list[str]:
        return [a for a in self.argv if a.startswith("--")]

    def value(self, flag: str) -> str | None:
        args = list(self.argv)
        return args[args.index(flag) + 1] if flag in args else None


def engine_quantization(engine: str, method: str | None, scheme_name: str,
                        symmetric: bool = True) -> str | None:
    """--quantization matching the checkpoint: its own method when pre-quantised, `fp8` for the
    engines' online FP8 of a float checkpoint, none for bf16."""
    if method:
        if method in _MARLIN and symmetric:
            return _MARLIN[method]
        return method
    return "fp8" if scheme_name == "fp8" else None


def vllm_serve(model: str, par: ParallelPlan, plan: MemoryPlan, quantization: str | None,
               served_name: str, multi_node: bool) -> Command:
    argv = ["vllm", "serve", model, "--host", "0.0.0.0", "--port", str(PORT),
            "--served-model-name", served_name,
            "--tensor-parallel-size", str(par.tp)]
    if par.pp > 1:
        argv += ["--pipeline-parallel-size", str(par.pp)]
    if par.dp > 1:
        argv += ["--data-parallel-size", str(par.dp)]
    if par.expert_parallel:
        argv.append("--enable-expert-parallel")
    argv += ["--max-model-len", str(par.max_context),
             "--gpu-memory-utilization", f"{par.memory_fraction:.2f}",
             # the planner sized activations for this many tokens per forward pass
             "--max-num-batched-tokens", str(plan.limits.token_budget)]
    if quantization:
        argv += ["--quantization", quantization]
    if multi_node:
        argv += ["--distributed-executor-backend", "ray"]
    return Command(tuple(argv))


def sglang_launch(model: str, par: ParallelPlan, plan: MemoryPlan, quantization: str | None,
                  served_name: str, nodes: int) -> Command:
    argv = ["python3", "-m", "sglang.launch_server", "--model-path", model,
            "--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", served_name,
            # multi-node too: SGLang's TP spans every GPU of every node (no pipeline split)
            "--tp-size", str(par.tp)]
    if par.dp > 1:
        argv += ["--dp-size", str(par.dp)]
    if par.expert_parallel:
        argv += ["--ep-size", str(par.tp)]
    argv += ["--context-length", str(par.max_context),
             "--mem-fraction-static", f"{par.memory_fraction:.2f}",
             "--chunked-prefill-size", str(plan.limits.token_budget)]
    if quantization:
        argv += ["--quantization", quantization]
    if nodes > 1:
        # NODE_RANK and HEAD_ADDR come from each node's environment (see .env.example)
        argv += ["--nnodes", str(nodes), "--node-rank", "${NODE_RANK:?set NODE_RANK}",
                 "--dist-init-addr", "${HEAD_ADDR:?set HEAD_ADDR}:" + str(SGLANG_DIST_PORT)]
    return Command(tuple(argv))


def spillover_serve(model: str, plan: MemoryPlan, served_name: str) -> Command:
    """`spillover serve` with the totals the plan was made for: the engine re-plans from them and
    so allocates exactly the plan's budgets (GPU slots, pinned RAM, KV blocks)."""
    hw = plan.hardware
    argv = ["spillover", "serve", model, "--host", "0.0.0.0", "--port", str(PORT),
            "--served-model-name", served_name, "--quant", plan.scheme.name,
            "--max-model-len", str(plan.extra.get("context", plan.limits.context)),
            "--max-num-seqs", str(plan.limits.seqs),
            "--max-num-batched-tokens", str(plan.limits.token_budget)]
    if hw.gpu is not None:
        argv += ["--gpu-memory", str(hw.gpu.vram_total)]  # a bare integer is bytes
    argv += ["--cpu-memory", str(hw.ram_total)]
    return Command(tuple(argv))


def checkpoint_quant_method(model: str) -> tuple[str | None, bool]:
    """(quant_method, symmetric) of a pre-quantised checkpoint's config.json, from a local folder
    or the hub cache that `resolve` filled; (None, True) for a float checkpoint or when unknown.
    Never downloads: the planner has already read the config."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a hub id, or no cache: a catalog entry is a float checkpoint
            return None, True
        if not isinstance(cached, str):
            return None, True
        path = Path(cached)
    q = json.loads(path.read_text()).get("quantization_config")
    if not isinstance(q, dict):
        return None, True
    return str(q.get("quant_method") or "") or None, bool(q.get("sym", True))
