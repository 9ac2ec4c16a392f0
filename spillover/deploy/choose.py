"""Which engine serves a model on the named hardware, decided by the same planner as
`spillover plan`.

auto: a distributed engine (vLLM) when the model fits across the GPUs without offload; spillover
when one GPU plus RAM serves it; otherwise an error that says how many GPUs would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from spillover.deploy.engines import (
    ENGINE_FRACTION,
    SGLANG_IMAGE,
    SPILLOVER_IMAGE,
    VLLM_IMAGE,
    Command,
    checkpoint_quant_method,
    engine_quantization,
    sglang_launch,
    spillover_serve,
    vllm_serve,
)
from spillover.hw.info import HardwareInfo, fmt_bytes
from spillover.plan.advice import make_plan
from spillover.plan.formats import BF16, FP8, WeightScheme
from spillover.plan.memory import Limits, MemoryPlan, plan_memory
from spillover.plan.parallel import (
    TP_SIZES,
    ParallelPlan,
    plan_parallel,
    smallest_parallel,
    tp_allowed,
)
from spillover.plan.source import ModelSource
from spillover.quant import normalize_quant

ENGINES = ("auto", "spillover", "vllm", "sglang")
ENGINE_NAME = {"spillover": "spillover", "vllm": "vLLM", "sglang": "SGLang"}
CONTAINER_MODELS = "/models"  # where a local model folder or file is mounted, read-only


class DeployError(ValueError):
    """No engine serves the model on this hardware (the message says what would)."""


@dataclass(frozen=True)
class Deployment:
    engine: str  # spillover | vllm | sglang
    image: str
    model: str  # the model: a hub id (catalog names resolve to one), or a folder / GGUF name
    served_name: str  # the model id clients send
    gpu_name: str
    gpus: int  # per node
    nodes: int
    plan: MemoryPlan  # one GPU's plan: spillover's placement, or the bill the split divides
    parallel: ParallelPlan | None  # vLLM / SGLang only
    quantization: str | None  # the distributed engine's --quantization
    command: Command
    model_mount: tuple[str, str] | None  # (host path, container path) of a local model
    why: tuple[str, ...]  # the choice, explained


def choose(src: ModelSource, hw: HardwareInfo, limits: Limits, *, gpus: int = 1, nodes: int = 1,
           engine: str = "auto", quant: str = "auto", model_arg: str | None = None) -> Deployment:
    """`hw` names one GPU of the kind the machine has `gpus` of (per node); `model_arg` is the
    MODEL the user typed (a local folder or file is mounted into the container)."""
    if engine not in ENGINES:
        raise DeployError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
    if gpus < 1 or nodes < 1:
        raise DeployError("--gpus and --nodes must be at least 1")
    if hw.gpu is None:
        raise DeployError("a deployment needs a GPU: name one with --gpu (e.g. --gpu h100)")
    if nodes > 1 and engine == "spillover":
        raise DeployError("spillover serves from one GPU of one machine: --nodes needs "
                          "--engine vllm or sglang")
    single = make_plan(src.name, src.config, src.inventory, hw, limits, quant, fixed=src.scheme)
    if engine == "spillover" or (engine == "auto" and gpus * nodes == 1):
        return _spillover(src, hw, single, gpus, engine, model_arg)
    dist_engine = "vllm" if engine == "auto" else engine
    found = plan_distributed(src, hw, limits, dist_engine, gpus, nodes, quant)
    if found is not None:
        one, par = found
        return _distributed(src, hw, dist_engine, one, par, single, gpus, nodes, engine,
                            model_arg)
    if engine == "auto" and nodes == 1 and single.fits:
        d = _spillover(src, hw, single, gpus, engine, model_arg)
        reason = _no_fit_reason(src, hw, limits, "vllm", gpus, nodes, quant)
        if distributed_schemes(src, hw, quant):
            why = (f"the model does not fit across {gpus} x {hw.gpu.name} without offload "
                   f"({reason}); spillover serves it from one of them plus RAM",)
        else:
            why = (f"not vLLM or SGLang: {reason}; spillover serves it from one of the "
                   f"{gpus} GPUs",)
        return replace(d, why=why + d.why)
    raise DeployError(_nothing_fits(src, hw, limits, dist_engine, gpus, nodes, quant, single))


def distributed_schemes(src: ModelSource, hw: HardwareInfo, quant: str) -> list[WeightScheme]:
    """Formats vLLM and SGLang can serve this checkpoint in, best quality first: its own when
    pre-quantised; bf16, or FP8 quantised online where the GPU has FP8 tensor cores. They do not
    quantise a float checkpoint to int8 / int4 on load; a GGUF file is spillover's alone."""
    if src.scheme is not None:
        return [src.scheme]
    if src.inventory.is_native_only:
        return []
    q = normalize_quant(quant)
    fp8 = bool(hw.gpu and hw.gpu.fp8)
    out = {"auto": [BF16] + ([FP8] if fp8 else []), "bf16": [BF16],
           "fp8": [FP8] if fp8 else []}.get(q, [])
    return [WeightScheme.uniform(f) for f in out]


def plan_distributed(src: ModelSource, hw: HardwareInfo, limits: Limits, engine: str, gpus: int,
                     nodes: int, quant: str) -> tuple[MemoryPlan, ParallelPlan] | None:
    """(the one-GPU bill, its split) for the best format whose split fits, or None."""
    frac = ENGINE_FRACTION[engine]
    for scheme in distributed_schemes(src, hw, quant):
        one = plan_memory(src.name, src.config, src.inventory, scheme, hw, limits)
        if engine == "sglang" and nodes > 1:
            tp = gpus * nodes  # SGLang's multi-node recipe: one TP group over all GPUs
            par: ParallelPlan | None = None
            if tp_allowed(src.config, tp):
                par = plan_parallel(one, hw, tp, memory_fraction=frac)
                par = par if par.fits else None
        else:
            par = smallest_parallel(one, hw, gpus, nodes, memory_fraction=frac)
        if par is not None:
            return one, par
    return None


def advise_gpus(src: ModelSource, hw: HardwareInfo, limits: Limits,
                quant: str = "auto") -> tuple[int, ParallelPlan] | None:
    """The fewest GPUs of this kind (one node) on which vLLM serves the model, in any format it
    can load (fewer GPUs first, then quality), or None."""
    for n in TP_SIZES:
        found = plan_distributed(src, hw, limits, "vllm", n, 1, quant)
        if found is not None:
            return n, found[1]
    return None


def gpu_advice(src: ModelSource, hw: HardwareInfo, limits: Limits, quant: str, gpus: int,
               single_fits: bool) -> list[str]:
    """Lines for `spillover plan`: the split on `gpus` GPUs when more than one, and when one GPU
    plus RAM is not enough, the fewest GPUs (and the engine) that would serve the model."""
    if hw.gpu is None:
        return []
    out: list[str] = []
    name = _gpu_name(hw)
    if gpus > 1:
        found = plan_distributed(src, hw, limits, "vllm", gpus, 1, quant)
        if found is None:
            out.append(f"on {gpus} x {name}: no split fits without offload ("
                       + _no_fit_reason(src, hw, limits, "vllm", gpus, 1, quant) + ")")
        else:
            one, par = found
            out.append(f"on {gpus} x {name}: vLLM tensor parallel {par.tp}"
                       + (f" x {par.dp} replicas" if par.dp > 1 else "")
                       + f" ({one.scheme.name}, {fmt_bytes(par.bill.weights)} of weights per "
                       f"GPU, context up to {par.max_context}, ~{par.decode_tok_s:.0f} tok/s "
                       f"decode): `spillover deploy {src.name} --gpus {gpus} --out DIR`")
    if not single_fits:
        need = advise_gpus(src, hw, limits, quant)
        if need is None:
            out.append(f"one {name} is not enough even with RAM, nor are {max(TP_SIZES)} of them")
        else:
            n, par = need
            out.append(f"one {name} is not enough even with RAM: {n} x {name} would serve it "
                       f"with vLLM tensor parallel {par.tp} (`spillover deploy {src.name} "
                       f"--gpus {n} --out DIR`)")
    return out


def _spillover(src: ModelSource, hw: HardwareInfo, plan: MemoryPlan, gpus: int,
               engine: str, model_arg: str | None) -> Deployment:
    if not plan.fits:
        raise DeployError(
            "spillover cannot serve it on one GPU + RAM: " + "; ".join(plan.reasons)
            + "".join(f"\n  -> {s}" for s in plan.suggestions)
        )
    where = {"gpu": "all in VRAM", "gpu+ram": "GPU + pinned RAM", "ram": "RAM"}[plan.verdict]
    why = [f"one {hw.gpu.name if hw.gpu else 'GPU'} serves it with spillover ({where}, "
           f"{plan.scheme.name}): ~{plan.predicted.decode_tok_s:.0f} tok/s decode"]
    if engine == "spillover" and gpus > 1:
        why.append(f"--engine spillover: one of the {gpus} GPUs is used")
    model, mount = _container_model(src, model_arg)
    served = _served_name(src, model_arg)
    return Deployment("spillover", SPILLOVER_IMAGE, src.name, served, _gpu_name(hw), gpus, 1,
                      plan, None, None, spillover_serve(model, plan, served), mount, tuple(why))


def _distributed(src: ModelSource, hw: HardwareInfo, engine: str, one: MemoryPlan,
                 par: ParallelPlan, single: MemoryPlan, gpus: int, nodes: int,
                 asked: str, model_arg: str | None) -> Deployment:
    model, mount = _container_model(src, model_arg)
    method, sym = checkpoint_quant_method(mount[0] if mount else src.name)
    quant = engine_quantization(engine, method, one.scheme.name, sym)
    served = _served_name(src, model_arg)
    if engine == "vllm":
        cmd, image = vllm_serve(model, par, one, quant, served, nodes > 1), VLLM_IMAGE
    else:
        cmd, image = sglang_launch(model, par, one, quant, served, nodes), SGLANG_IMAGE
    name = ENGINE_NAME[engine]
    split = f"tensor parallel {par.tp}" + (f" x pipeline {par.pp}" if par.pp > 1 else "")
    why = [f"{par.tp * par.pp} x {_gpu_name(hw)} hold the model ({one.scheme.name}, "
           f"{fmt_bytes(par.bill.weights)} of weights per GPU) without offload: {name} {split}"]
    if par.dp > 1:
        why.append(f"the other GPUs run {par.dp - 1} more replica(s) (data parallel {par.dp})")
    idle = gpus * nodes - par.gpus
    if idle > 0:
        why.append(f"{idle} GPU(s) stay idle: the split needs a power of two that divides the "
                   "head counts")
    if par.expert_parallel:
        why.append(f"expert parallel: each expert's {one.config.moe_intermediate_size}-wide "
                   f"intermediate would be cut to {one.config.moe_intermediate_size // par.tp} "
                   "columns per GPU under TP; EP keeps experts whole, one set per GPU")
    if asked == "auto" and single.fits:
        why.append(f"spillover on one GPU + RAM would decode ~{single.predicted.decode_tok_s:.0f} "
                   f"tok/s; {name} is predicted at ~{par.decode_tok_s:.0f}")
    return Deployment(engine, image, src.name, served, _gpu_name(hw), gpus, nodes, one, par,
                      quant, cmd, mount, tuple(why))


def _no_fit_reason(src: ModelSource, hw: HardwareInfo, limits: Limits, engine: str, gpus: int,
                   nodes: int, quant: str) -> str:
    schemes = distributed_schemes(src, hw, quant)
    if not schemes:
        return (f"--quant {quant} is not a format vLLM or SGLang load a float checkpoint in"
                if not src.inventory.is_native_only else "a GGUF file is served by spillover only")
    one = plan_memory(src.name, src.config, src.inventory, schemes[-1], hw, limits)
    tp = max(t for t in TP_SIZES if t <= gpus)
    par = plan_parallel(one, hw, tp, pp=nodes, memory_fraction=ENGINE_FRACTION[engine])
    return f"{schemes[-1].name}, tensor parallel {tp}: " + "; ".join(par.reasons or ("no fit",))


def _nothing_fits(src: ModelSource, hw: HardwareInfo, limits: Limits, engine: str, gpus: int,
                  nodes: int, quant: str, single: MemoryPlan) -> str:
    lines = [f"{src.name} does not fit on {gpus * nodes} x {_gpu_name(hw)}: "
             + _no_fit_reason(src, hw, limits, engine, gpus, nodes, quant)]
    if not single.fits:
        lines.append("one GPU + RAM (spillover): " + "; ".join(single.reasons))
    need = advise_gpus(src, hw, limits, quant)
    if need is not None and need[0] > gpus:
        lines.append(f"{need[0]} x {_gpu_name(hw)} would serve it with vLLM tensor parallel "
                     f"{need[1].tp} (--gpus {need[0]})")
    return "\n  ".join(lines)


def _container_model(src: ModelSource,
                     model_arg: str | None) -> tuple[str, tuple[str, str] | None]:
    """The MODEL argument inside the container: a hub id as is; a local folder or file mounted."""
    if src.kind in ("folder", "gguf") and model_arg:
        path = Path(model_arg).expanduser()
        host = str(path.resolve())
        inside = f"{CONTAINER_MODELS}/{path.name}"
        return inside, (host, inside)
    return src.name, None


def _served_name(src: ModelSource, model_arg: str | None) -> str:
    """The id clients send: the hub id, or a local folder's or file's name (as `spillover serve`
    names a path)."""
    if src.kind in ("folder", "gguf") and model_arg:
        return Path(model_arg).expanduser().name
    return src.name


def _gpu_name(hw: HardwareInfo) -> str:
    return hw.gpu.name if hw.gpu else "no GPU"

