"""Choosing the weight format (`--quant auto`) and saying what would make a plan fit.

Still pure: every suggestion comes from re-running plan_memory with one thing changed.
"""

from __future__ import annotations

from dataclasses import replace

from spillover.catalog import CONFIGS
from spillover.config import ModelConfig
from spillover.hw.info import GiB, HardwareInfo, fmt_bytes
from spillover.plan.formats import INT4, WeightScheme, auto_candidates, scheme_for
from spillover.plan.inventory import Inventory, inventory_from_config
from spillover.plan.memory import Limits, MemoryPlan, host_budget, plan_memory
from spillover.quant import normalize_quant

USABLE_TOK_S = 10.0  # decode speed below which a suggested model is not worth suggesting first


def candidate_schemes(cfg: ModelConfig, inv: Inventory, hw: HardwareInfo,
                      quant: str) -> list[WeightScheme]:
    quant = normalize_quant(quant)
    if inv.is_native_only:
        return [scheme_for("native")]
    if quant != "auto":
        return [scheme_for(quant)]
    gpu = hw.gpu
    out = auto_candidates(fp8_native=bool(gpu and gpu.fp8))
    if not cfg.is_moe:  # a separate expert format means nothing without experts
        out = [s for s in out if s.dense == s.experts]
    return out


def make_plan(
    model: str,
    cfg: ModelConfig,
    inv: Inventory,
    hw: HardwareInfo,
    limits: Limits,
    quant: str = "auto",
    advise: bool = True,
    fixed: WeightScheme | None = None,
) -> MemoryPlan:
    """The plan for `quant` (for `auto`: the best-quality scheme that fits), with suggestions;
    `fixed`: the format of a pre-quantised checkpoint, which is what loads whatever `quant` says."""
    quant = normalize_quant(quant)  # one of spillover.quant.QUANT_CHOICES, legacy spellings mapped
    schemes = [fixed] if fixed is not None else candidate_schemes(cfg, inv, hw, quant)
    plans = []
    for s in schemes:
        p = plan_memory(model, cfg, inv, s, hw, limits)
        plans.append(p)
        if p.fits:
            break
    chosen = next((p for p in plans if p.fits), plans[-1])
    notes = list(chosen.reasons)
    if quant == "auto" and len(schemes) > 1:
        tried = ", ".join(p.scheme.name for p in plans)
        why = "best quality that fits" if chosen.fits else "nothing fits; showing the smallest"
        notes.insert(0, f"--quant auto chose {chosen.scheme.name} ({why}; tried {tried})")
    if inv.is_native_only and quant not in ("auto", "native"):
        notes.insert(0, f"--quant {quant} ignored: a GGUF file keeps the formats it was saved with")
    elif fixed is not None and quant not in ("auto", "native"):
        notes.insert(0,
                     f"--quant {quant} ignored: a pre-quantised checkpoint loads in its own format")
    chosen = replace(chosen, reasons=tuple(notes))
    if advise:
        chosen = replace(chosen,
                         suggestions=tuple(suggest(chosen, inv, hw, limits, fixed is not None)))
    return chosen


def suggest(plan: MemoryPlan, inv: Inventory, hw: HardwareInfo, limits: Limits,
            fixed: bool = False) -> list[str]:
    """What would make the plan fit (or run faster); `fixed`: the format cannot change
    (pre-quantised)."""
    cfg = plan.config
    requant = not inv.is_native_only and not fixed
    out: list[str] = []
    ctx = plan.extra.get("context", limits.context)
    if not plan.fits:
        if requant:
            for s in auto_candidates(fp8_native=True):
                if (s.quality_rank <= plan.scheme.quality_rank
                        or (s.dense != s.experts and not cfg.is_moe)):
                    continue
                p = plan_memory(plan.model, cfg, inv, s, hw, limits)
                if p.fits:
                    out.append(
                        f"use --quant {s.name}: weights {fmt_bytes(p.weights_total)}, "
                        f"{fmt_bytes(p.tier_total('gpu'))} on the GPU, "
                        f"~{p.predicted.decode_tok_s:.0f} tok/s decode"
                    )
                    break
        if 0 < plan.max_context < ctx:
            out.append(f"use --context {plan.max_context} (the longest that fits with "
                       f"{plan.scheme.name})")
        elif plan.max_context == 0 and plan.verdict == "no":
            out.append("lower --context or --seqs: the caches alone do not fit on the GPU")
        need = _ram_needed(plan, hw)
        if need > hw.ram_total:
            out.append(
                f"with {need / 1e9:.0f} GB of RAM (now {hw.ram_total / 1e9:.0f} GB) "
                f"{plan.scheme.name} would fit in GPU + RAM"
            )
        out.extend(_smaller_models(plan, hw, limits))
    elif plan.verdict == "gpu+ram" and requant and plan.scheme.experts != INT4:
        p = plan_memory(plan.model, cfg, inv, WeightScheme.uniform(INT4), hw, limits)
        if p.fits and p.predicted.decode_tok_s > 1.2 * plan.predicted.decode_tok_s:
            out.append(
                f"--quant int4 keeps more on the GPU: ~{p.predicted.decode_tok_s:.0f} tok/s decode "
                f"instead of ~{plan.predicted.decode_tok_s:.0f}"
            )
    return out


def _ram_needed(plan: MemoryPlan, hw: HardwareInfo) -> int:
    """RAM size at which this scheme fits: all that the GPU cannot hold, plus the OS reserve."""
    over = plan.tier_total("disk")
    if not over:
        return 0
    budget = host_budget(replace(hw, ram_available=None), plan.limits)
    target = budget + over
    # host_budget reserves max(4 GiB, 10 %): invert it
    return int(max(target + 4 * GiB, target / 0.9))


def _smaller_models(plan: MemoryPlan, hw: HardwareInfo, limits: Limits) -> list[str]:
    fitting: list[tuple[int, str, MemoryPlan]] = []
    for key, raw in CONFIGS.items():
        cfg = ModelConfig.from_hf(raw)
        inv = inventory_from_config(cfg)
        if inv.total_params >= plan.params_total or "Thinking" in key:
            continue
        lim = replace(limits, context=min(limits.context, cfg.max_position))
        p = make_plan(key, cfg, inv, hw, lim, "auto", advise=False)
        if p.fits:
            fitting.append((inv.total_params, key, p))
    # the largest that still decodes at a usable pace; if none does, simply the largest
    fitting.sort(key=lambda x: x[0], reverse=True)
    usable = [f for f in fitting if f[2].predicted.decode_tok_s >= USABLE_TOK_S] or fitting
    return [
        f"a smaller model: {key} ({n / 1e9:.1f}B) fits with {p.scheme.name}, "
        f"~{p.predicted.decode_tok_s:.0f} tok/s"
        for n, key, p in usable[:2]
    ]
