"""MemoryPlan -> JSON object and a readable rich table (the only place that formats a plan)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from spillover.hw.info import HardwareInfo, fmt_bytes
from spillover.plan.memory import MemoryPlan

TIERS = ("gpu", "host", "disk")
TIER_LABEL = {"gpu": "GPU", "host": "pinned RAM", "disk": "disk (mmap)"}
TIER_STYLE = {"gpu": "green", "host": "yellow", "disk": "red"}
VERDICT = {
    "gpu": "fits entirely on the GPU",
    "gpu+ram": "fits: GPU + pinned RAM",
    "ram": "fits in RAM (CPU only)",
    "disk": "does NOT fit in GPU + RAM: part of the weights would be read from disk every token",
    "no": "does NOT fit: the caches alone exceed the GPU",
}


def to_json(plan: MemoryPlan) -> dict[str, Any]:
    p = plan.predicted
    return {
        "model": plan.model,
        "hardware": plan.hardware.to_json(),
        "quant": plan.scheme.name,
        "quant_description": plan.scheme.description,
        "context": plan.extra.get("context"),
        "seqs": plan.extra.get("seqs"),
        "params": {
            "total": plan.params_total,
            "active_per_token": plan.params_active_per_token,
            "by_component": plan.params_by_component,
        },
        "weights_bytes": plan.weights_bytes,
        "weights_total_bytes": plan.weights_total,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "state_bytes_per_sequence": plan.state_bytes_per_sequence,
        "activation_bytes": plan.activation_bytes,
        "staging_bytes": plan.staging_bytes,
        "runtime_bytes": plan.runtime_bytes,
        "budgets": {"gpu": plan.gpu_budget, "host": plan.host_budget},
        "tiers": plan.tiers,
        "tier_totals": {t: plan.tier_total(t) for t in TIERS},
        "expert_slots_per_layer": plan.expert_slots_per_layer,
        "host_experts_per_layer": plan.host_experts_per_layer,
        "num_experts": plan.num_experts,
        "dense_layers_on_gpu": plan.dense_layers_on_gpu,
        "block_size": plan.block_size,
        "num_kv_blocks": plan.num_kv_blocks,
        "num_state_slots": plan.num_state_slots,
        "max_context": plan.max_context,
        "max_seqs": plan.max_seqs,
        "fits": plan.fits,
        "verdict": plan.verdict,
        "verdict_text": VERDICT[plan.verdict],
        "reasons": list(plan.reasons),
        "suggestions": list(plan.suggestions),
        "checkpoint_bytes": plan.checkpoint_bytes,
        "predicted": {
            "decode_tok_s": round(p.decode_tok_s, 2),
            "prefill_tok_s": round(p.prefill_tok_s, 1),
            "decode_ms_by_link": {k: round(v, 4) for k, v in p.decode_ms_by_link.items()},
            "prefill_ms_by_link_per_chunk": {k: round(v, 3)
                                             for k, v in p.prefill_ms_by_link.items()},
            "prefill_chunk_tokens": p.prefill_chunk_tokens,
            "host_experts_path": p.host_path,
            "notes": list(p.notes),
        },
    }


def _gib(n: int) -> str:
    return fmt_bytes(n) if n else "-"


def memory_bar(plan: MemoryPlan, width: int = 60) -> Text:
    totals = {t: plan.tier_total(t) for t in TIERS}
    grand = sum(totals.values()) or 1
    bar = Text()
    for t in TIERS:
        n = round(width * totals[t] / grand)
        if totals[t] and n == 0:
            n = 1
        bar.append("█" * n, style=TIER_STYLE[t])
    bar.append("  ")
    bar.append("  ".join(f"{TIER_LABEL[t]} {fmt_bytes(totals[t])}" for t in TIERS if totals[t]))
    return bar


def hardware_table(hw: HardwareInfo) -> Table:
    t = Table(title="Hardware", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for g in hw.gpus:
        free = f", {fmt_bytes(g.vram_free)} free" if g.vram_free is not None else ""
        t.add_row(
            f"GPU {g.index}",
            f"{g.name} ({g.sm}), {fmt_bytes(g.vram_total)}{free}, "
            f"PCIe {g.pcie_gen}.0 x{g.pcie_width}" + (f", driver {g.driver}" if g.driver else ""),
        )
    if not hw.gpus:
        t.add_row("GPU", "none")
    c = hw.cpu
    flags = (("AVX2", c.avx2), ("AVX-512", c.avx512), ("AMX", c.amx))
    isa = ", ".join(n for n, ok in flags if ok) or "no AVX2"
    t.add_row("CPU", f"{c.model}, {c.cores} cores / {c.threads} threads, {isa}")
    avail = f", {fmt_bytes(hw.ram_available)} available" if hw.ram_available is not None else ""
    t.add_row("RAM", f"{fmt_bytes(hw.ram_total)}{avail}")
    if hw.disk_free is not None:
        t.add_row("Disk", f"{fmt_bytes(hw.disk_free)} free at {hw.disk_path}")
    links = hw.links
    for name, rate in (
        ("gpu_mem", links.gpu_mem),
        ("host_mem", links.host_mem),
        ("h2d", links.h2d),
        ("d2h", links.d2h),
        ("disk", links.disk),
    ):
        if rate:
            t.add_row(f"  {name}",
                      f"{rate / 1e9:.1f} GB/s  [dim]{links.sources.get(name, '')}[/dim]")
    if links.cpu_gemv:  # the CPU decode terms, once `probe --measure` has measured them
        t.add_row("  cpu_gemv", f"{links.cpu_gemv / 1e9:.1f} GB/s  "
                                f"[dim]{links.sources.get('cpu_gemv', '')}[/dim]")
    if links.cpu_layer_s:
        t.add_row("  cpu fixed", f"{links.cpu_step_s * 1e3:.2f} ms a step + "
                                 f"{links.cpu_layer_s * 1e3:.2f} ms a layer  "
                                 f"[dim]{links.sources.get('cpu_layer_s', '')}[/dim]")
    for r in hw.reasons:
        t.add_row("", f"[dim]{r}[/dim]")
    return t


def render(plan: MemoryPlan, console: Console | None = None) -> None:
    # piped output (files, CI logs) gets a width that keeps the bill on one line per component
    console = console or (Console() if sys.stdout.isatty() else Console(width=120))
    cfg = plan.config
    ctx, seqs = plan.extra.get("context"), plan.extra.get("seqs")
    head = Text()
    head.append(f"{plan.model}", style="bold")
    head.append(
        f"  ({cfg.model_type}, {plan.params_total / 1e9:.2f}B params, "
        f"{plan.params_active_per_token / 1e9:.2f}B active per token)\n"
    )
    head.append(f"{plan.scheme.name}: {plan.scheme.description}; context {ctx} x "
                f"{seqs} sequence(s)\n")
    head.append(f"on {plan.hardware.describe()}")
    console.print(Panel(head, title="spillover plan"))
    console.print(hardware_table(plan.hardware))

    comps = Table(title="Memory bill and placement")
    for col in ("component", "params", "bytes", *(TIER_LABEL[t] for t in TIERS)):
        comps.add_column(col, justify="left" if col == "component" else "right", no_wrap=True)
    rows = list(plan.weights_bytes)
    rows += [k for t in TIERS for k in plan.tiers[t] if k not in plan.weights_bytes]
    seen: set[str] = set()
    for comp in rows:
        if comp in seen:
            continue
        seen.add(comp)
        total = plan.weights_bytes.get(comp) or sum(plan.tiers[t].get(comp, 0) for t in TIERS)
        params = plan.params_by_component.get(comp)
        comps.add_row(
            comp,
            f"{params:,}" if params else "",
            _gib(total),
            *(_gib(plan.tiers[t].get(comp, 0)) for t in TIERS),
        )
    comps.add_row("total", f"{plan.params_total:,}", "", *(_gib(plan.tier_total(t)) for t in TIERS),
                  style="bold")
    console.print(comps)
    console.print(memory_bar(plan))

    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row(
        "KV per token",
        f"{plan.kv_bytes_per_token:,} B ({len(cfg.attention_layers)} full-attention "
        f"layers x {cfg.num_kv_heads} KV heads x {cfg.head_dim})",
    )
    if plan.state_bytes_per_sequence:
        facts.add_row(
            "state per sequence",
            f"{fmt_bytes(plan.state_bytes_per_sequence)} "
            f"({len(cfg.linear_layers)} linear-attention layers, fixed, any length)",
        )
    facts.add_row(
        "KV blocks / state slots",
        f"{plan.num_kv_blocks} x {plan.block_size} tokens / {plan.num_state_slots}"
    )
    if plan.num_experts:
        facts.add_row(
            "experts per layer",
            f"{plan.expert_slots_per_layer} GPU slots, {plan.host_experts_per_layer} in RAM, "
            f"{plan.num_experts - plan.expert_slots_per_layer - plan.host_experts_per_layer} on "
            f"disk (of {plan.num_experts})",
        )
    facts.add_row("longest context", f"{plan.max_context:,} tokens x {seqs} sequence(s)")
    facts.add_row("most sequences", f"{plan.max_seqs} at {ctx} tokens")
    console.print(facts)

    pr = plan.predicted
    speed = Table(title="Predicted speed")
    speed.add_column("phase")
    speed.add_column("tok/s", justify="right")
    speed.add_column("time per link")
    speed.add_row(
        "decode (batch 1, full context)",
        f"{pr.decode_tok_s:,.1f}",
        ", ".join(f"{k} {v:.2f} ms" for k, v in pr.decode_ms_by_link.items()),
    )
    speed.add_row(
        f"prefill ({pr.prefill_chunk_tokens}-token chunks)",
        f"{pr.prefill_tok_s:,.0f}",
        ", ".join(f"{k} {v:.1f} ms" for k, v in pr.prefill_ms_by_link.items()),
    )
    console.print(speed)
    style = "bold green" if plan.fits else "bold red"
    lines = [Text(VERDICT[plan.verdict], style=style)]
    lines += [Text(f"• {r}") for r in plan.reasons]
    if plan.suggestions:
        lines.append(Text("What would make it fit or faster:", style="bold"))
        lines += [Text(f"→ {s}") for s in plan.suggestions]
    console.print(Panel(Group(*lines), title="Verdict"))
