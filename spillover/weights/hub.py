"""A hub id where a path goes: plan from the hub's metadata, refuse a model that cannot fit before
any weight is fetched, then download only the files a model folder needs.

The download is huggingface_hub's `snapshot_download`: progress bar, resume of an interrupted
file (a ranged request for the rest), the standard cache, HF_TOKEN, `revision` and offline mode
(HF_HUB_OFFLINE: the cached snapshot, no request) all come from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from spillover.hw.info import HardwareInfo, fmt_bytes
from spillover.plan.hub import (
    IGNORED_PATTERNS,
    NEEDED_PATTERNS,
    HubRepo,
    hub_error,
    hub_offline,
)
from spillover.plan.memory import Limits, MemoryPlan
from spillover.plan.source import ModelSource, from_hub

log = logging.getLogger("spillover.hub")

# The context the fit check plans for when the caller names none: the engine's default room per
# sequence (spillover.plan.engine_cache.ENGINE_TOKENS_PER_SEQ), one sequence.
FIT_CONTEXT = 4096


class ModelDoesNotFitError(RuntimeError):
    """The plan says the model cannot run here; nothing was downloaded."""


@dataclass(frozen=True)
class HubOptions:
    revision: str | None = None
    gguf_file: str | None = None  # a GGUF repo: this file (else the one the plan picks)
    quant: str | None = "auto"  # the load's --quant: the format the fit check sizes
    hardware: HardwareInfo | None = None  # None: no fit check (convert streams any size)
    context: int | None = None  # tokens per sequence the check plans for (None: FIT_CONTEXT)
    tiered: bool = False  # memory budgets given: a MoE model's experts may live in RAM


def plan_quant(quant: str | None) -> str:
    """The planner's format for a load's `--quant`: `auto` keeps a float checkpoint's own 16-bit
    weights (a GGUF or a pre-quantised checkpoint is sized in its own format anyway)."""
    from spillover.quant import normalize_quant

    q = normalize_quant(quant or "auto")
    return "bf16" if q in ("auto", "native") else q


def fit_plan(src: ModelSource, hw: HardwareInfo, quant: str | None,
             context: int | None) -> MemoryPlan:
    from spillover.plan.advice import make_plan

    ctx = min(context or FIT_CONTEXT, src.config.max_position)
    limits = Limits(context=max(ctx, 1), seqs=1)
    return make_plan(src.name, src.config, src.inventory, hw, limits, plan_quant(quant),
                     fixed=src.scheme)


def runnable(plan: MemoryPlan, tiered: bool) -> bool:
    """The weights fit in GPU + RAM. A plan that reads weights from disk every token (verdict
    "disk") is refused too: it would download the whole model to decode a token every few
    seconds, where a smaller format fits (the refusal says which). On a GPU the model loads
    whole onto it, unless it is a MoE model given memory budgets (`tiered`): its routed experts
    then go to RAM as the plan places them."""
    if not plan.fits:
        return False
    if plan.hardware.gpu is not None and not (tiered and plan.config.is_moe):
        return plan.verdict == "gpu"
    return True


def refusal(repo_id: str, plan: MemoryPlan) -> str:
    """Why `plan` does not fit, and what would make it fit (spillover.plan.advice)."""
    gpu = plan.hardware.gpu
    where = (f"{fmt_bytes(plan.gpu_budget)} of GPU memory and " if gpu is not None else "") + \
        f"{fmt_bytes(plan.host_budget)} of RAM"
    lines = [f"{repo_id} does not fit this machine: {plan.scheme.name} weights take "
             f"{fmt_bytes(plan.weights_total)}, with {where} to hold them (verdict: "
             f"{plan.verdict}). Nothing was downloaded."]
    if plan.fits:  # fits only with part of it in RAM
        lines.append("It fits only with part of it in RAM: spillover keeps a MoE model's routed "
                     "experts there when given --gpu-memory / --cpu-memory; other weights "
                     "must fit on the GPU.")
    if plan.suggestions:
        lines.append("What would make it fit:")
        lines += [f"  - {s}" for s in plan.suggestions]
    lines.append(f"`spillover plan {repo_id}` shows the whole bill.")
    return "\n".join(lines)


def plan_hub_model(repo_id: str, opts: HubOptions) -> tuple[ModelSource, MemoryPlan | None]:
    """The hub model's source (and the chosen GGUF file of a GGUF repo) and, with
    `opts.hardware`, its plan; raises ModelDoesNotFitError when the plan does not fit."""
    hw = opts.hardware

    def fits(src: ModelSource) -> bool:
        return hw is None or runnable(fit_plan(src, hw, opts.quant, opts.context), opts.tiered)

    max_bytes = None
    if hw is not None:
        max_bytes = hw.ram_total + (hw.gpu.vram_total if hw.gpu is not None else 0)
    src = from_hub(repo_id, opts.revision, opts.gguf_file, fits, max_bytes)
    if hw is None:
        return src, None
    plan = fit_plan(src, hw, opts.quant, opts.context)
    if not runnable(plan, opts.tiered):
        raise ModelDoesNotFitError(refusal(repo_id, plan))
    need = src.checkpoint_bytes or 0
    if hw.disk_free is not None and need > hw.disk_free:
        raise ModelDoesNotFitError(
            f"{repo_id}: the files to download take {fmt_bytes(need)}, more than the "
            f"{fmt_bytes(hw.disk_free)} free at {hw.disk_path}. Nothing was downloaded; free "
            "some space or point HF_HOME at a larger disk.")
    return src, plan


def fetch_hub_model(repo_id: str, opts: HubOptions | None = None) -> tuple[str, Path]:
    """("hf" | "gguf", local path) of `repo_id`, downloaded after the fit check (or the cached
    snapshot when offline)."""
    from huggingface_hub import snapshot_download

    opts = opts or HubOptions()
    if hub_offline():
        return _cached(repo_id, opts)
    src, plan = plan_hub_model(repo_id, opts)
    if plan is not None:
        log.info("plan for %s: %s, %s weights", repo_id, plan.verdict,
                 fmt_bytes(plan.weights_total))
    gguf = bool(src.files) and all(f.endswith(".gguf") for f in src.files)
    try:
        # the revision as the user named it (main by default): the cache then records the
        # branch -> commit reference that an offline run looks up
        folder = Path(snapshot_download(repo_id, revision=opts.revision,
                                        allow_patterns=list(src.files) or list(NEEDED_PATTERNS),
                                        ignore_patterns=None if gguf else list(IGNORED_PATTERNS)))
    except Exception as e:
        raise hub_error(repo_id, f"download failed: {type(e).__name__}: {str(e)[:300]}") from e
    if gguf:
        return "gguf", folder / src.files[0]
    return "hf", folder


def _cached(repo_id: str, opts: HubOptions) -> tuple[str, Path]:
    """Offline: the snapshot already in the cache, no request (huggingface_hub's local_files_only);
    a GGUF repo gives the named file or the largest cached one."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if opts.gguf_file is None:
        try:
            folder = Path(snapshot_download(repo_id, revision=opts.revision,
                                            local_files_only=True,
                                            allow_patterns=list(NEEDED_PATTERNS),
                                            ignore_patterns=list(IGNORED_PATTERNS)))
            if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
                return "hf", folder
        except Exception:  # not cached as a model folder: a GGUF repo, or nothing
            pass
    for name in [opts.gguf_file] if opts.gguf_file else _cached_gguf_names(repo_id, opts):
        path = try_to_load_from_cache(repo_id, name, revision=opts.revision)
        if isinstance(path, str):
            return "gguf", Path(path)
    raise hub_error(repo_id, "offline (HF_HUB_OFFLINE) and not in the cache")


def _cached_gguf_names(repo_id: str, opts: HubOptions) -> list[str]:
    """The repo's GGUF files, largest first, from the file list cached by the download."""
    from huggingface_hub import get_cached_repo_tree

    try:
        tree = get_cached_repo_tree(repo_id, revision=opts.revision)
    except Exception:
        return []
    files: dict[str, int | None] = {f.path: f.size for f in tree}
    return HubRepo(repo_id, opts.revision, None, files).gguf_files
