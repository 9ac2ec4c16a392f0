"""End-to-end speed and memory through the engine's own request path (`Engine.add_request` /
`Engine.step`, as `LLM.generate` and the server drive it).

    result = run_bench(llm, prompt_lens=[512, 8192], decode_batches=[1, 8], decode_tokens=64)

Prompts are random token ids (no tokenizer needed). Measured:
- prefill: time to first token of one request of each prompt length alone (chunked prefill
  included), and prompt tokens / that time;
- decode: `batch` requests decoding together, timed over `decode_tokens` steps once every request
  is past its prefill and `warmup_steps` decode steps; tok/s counts the tokens of all requests;
- memory: torch's CUDA peaks (allocated, reserved), the process RSS now and at peak, and the
  engine's planned vs measured rows;
- tiers: what tiered expert banks count (slot hits and misses, copies, CPU expert time), summed
  over layers, per decode phase and overall (`tier_snapshot`; `stats_hook` adds the caller's own).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spillover.engine.engine import Engine
from spillover.engine.params import SamplingParams
from spillover.llm import LLM
from spillover.offload.tiered import TieredExpertBank

log = logging.getLogger("spillover.bench")

DECODE_PROMPT_LEN = 128  # prompt of each decode request: short, so that the KV cache stays small
WARMUP_STEPS = 4  # decode steps run before timing (kernel selection, allocator growth)


def run_bench(
    llm_or_engine: LLM | Engine,
    prompt_lens: Sequence[int] = (512, 8192),
    decode_batches: Sequence[int] = (1, 8),
    decode_tokens: int = 64,
    *,
    decode_prompt_len: int = DECODE_PROMPT_LEN,
    warmup_steps: int = WARMUP_STEPS,
    seed: int = 0,
    stats_hook: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Prefill and decode speed and memory of a model (see the module docstring); a JSON-ready dict.

    Given an LLM, an engine is made for the bench: max_num_seqs at least the largest batch, no
    prefix caching (random prompts share nothing, and a hit would hide the prefill), a context long
    enough for the longest prompt. Given an Engine, it runs as configured. `stats_hook(model)`
    returns a dict merged into the result's "tiers".
    """
    if decode_tokens < 1 or any(n < 1 for n in (*prompt_lens, *decode_batches)):
        raise ValueError("prompt lengths, batches and decode_tokens must be positive")
    decode_len = decode_prompt_len + _decode_max_tokens(
        max(decode_batches), decode_tokens, warmup_steps
    )
    engine = _engine_for(llm_or_engine, prompt_lens, decode_batches, decode_len)
    model = engine.runner.model
    cuda = engine.device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    # Warm-up: a prefill of each length and a few decode steps, so that first-call costs (kernel
    # selection and compilation for each shape, allocator growth) stay out of the measurements.
    chunk = engine.config.max_num_batched_tokens
    for i, n in enumerate(sorted({min(n, chunk, engine.max_model_len - 8) for n in prompt_lens})):
        _prefill(engine, prompt(n), f"warmup-{i}", cuda, max_tokens=4)
    before = tier_snapshot(model)
    result: dict[str, Any] = {"prefill": [], "decode": []}
    for n in prompt_lens:
        ttft = _prefill(engine, prompt(n), f"prefill-{n}", cuda)
        result["prefill"].append({"prompt_len": n, "ttft_s": ttft, "tok_s": n / ttft})
        # progress as it goes: a run cut short by a time limit still leaves its figures
        log.info("prefill %d tokens: %.1f tok/s", n, n / ttft)
    snapshot = (lambda: tier_snapshot(model)) if _has_tiers(model) else dict
    for b in decode_batches:
        row = _decode(engine, [prompt(decode_prompt_len) for _ in range(b)], decode_tokens,
                      warmup_steps, cuda, snapshot)
        result["decode"].append(row)
        log.info("decode batch %d: %s", b, {k: v for k, v in row.items() if k != "steps_ms"})
    tiers = tier_rates(before, tier_snapshot(model)) if _has_tiers(model) else {}
    if stats_hook is not None:
        tiers.update(stats_hook(model))
    result["tiers"] = tiers
    result["memory"] = memory_stats(engine)
    result["engine"] = {
        "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "max_model_len": engine.max_model_len,
        "decode_prompt_len": decode_prompt_len,
        "warmup_steps": warmup_steps,
        "decode_tokens": decode_tokens,
    }
    from spillover import kernels

    used: dict[str, list[str]] = {}
    for op, impl in kernels.chosen():
        used.setdefault(op, []).append(impl)
    result["kernels"] = used
    return result


def _engine_for(
    src: LLM | Engine, prompt_lens: Sequence[int], batches: Sequence[int], decode_len: int
) -> Engine:
    need = max(max(prompt_lens) + 1, decode_len)
    if isinstance(src, Engine):
        if src.max_model_len < need:
            raise ValueError(
                f"the engine's max_model_len {src.max_model_len} is below the {need} tokens "
                "this bench needs"
            )
        if src.config.max_num_seqs < max(batches):
            log.warning(
                "max_num_seqs %d < batch %d: decode runs at most %d at once",
                src.config.max_num_seqs,
                max(batches),
                src.config.max_num_seqs,
            )
        return src
    limit = src.config.max_position
    if need > limit:
        raise ValueError(f"the bench needs {need} tokens of context; the model has {limit}")
    cfg = dataclasses.replace(
        src.engine_config,
        max_num_seqs=max(src.engine_config.max_num_seqs, *batches),
        enable_prefix_caching=False,
        max_model_len=max(need, src.engine_config.max_model_len or 0),
    )
    return src.make_engine(cfg)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _prefill(engine: Engine, ids: list[int], rid: str, cuda: bool, max_tokens: int = 1) -> float:
    """Seconds from add_request to the first token of one request alone (then run to its end)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    _sync(cuda)
    t0 = time.perf_counter()
    engine.add_request(rid, ids, params)
    ttft = None
    while engine.has_unfinished():
        for ev in engine.step():
            if ttft is None and ev.request_id == rid and ev.new_token_ids:
                ttft = time.perf_counter() - t0
    assert ttft is not None, f"request {rid} produced no token"
    return ttft


def _decode_max_tokens(batch: int, tokens: int, warmup: int) -> int:
    """Enough that no request finishes inside the timed window: requests admitted a few steps
    apart (at most one per step, `batch` steps) stay ahead of the slowest by that much."""
    return 1 + warmup + tokens + batch


def _decode(
    engine: Engine, prompts: list[list[int]], tokens: int, warmup: int, cuda: bool,
    snapshot: Callable[[], dict[str, float]] = dict,
) -> dict[str, Any]:
    """Steady-state decode of len(prompts) requests: `tokens` steps timed after every request has
    its first token and `warmup` more; then aborted (none finishes inside the window).
    `snapshot()` is taken at both ends of the timed window: the row carries what it accrued."""
    batch = len(prompts)
    params = SamplingParams(
        max_tokens=_decode_max_tokens(batch, tokens, warmup), temperature=0.0, ignore_eos=True
    )
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    made = dict.fromkeys(ids, 0)
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    while min(made.values()) < 1 + warmup:
        for ev in engine.step():
            made[ev.request_id] += len(ev.new_token_ids)
    _sync(cuda)
    before = snapshot()
    t0 = time.perf_counter()
    timed = 0
    for _ in range(tokens):
        for ev in engine.step():
            timed += len(ev.new_token_ids)
    _sync(cuda)
    secs = time.perf_counter() - t0
    accrued = tier_rates(before, snapshot())
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return {
        **{k: v for k, v in accrued.items() if k != "steps"},  # (a bank's calls, not steps)
        "batch": batch,
        "steps": tokens,
        "tokens": timed,
        "seconds": secs,
        "tok_s": timed / secs,
        "ms_per_step": 1e3 * secs / tokens,
        **({"mapped_gb_s": accrued["mapped_bytes"] / secs / 1e9}
           if accrued.get("mapped_bytes") else {}),  # RAM read by the GPU's kernels, averaged
    }


# ---- memory and tiers ---------------------------------------------------------------------------
def memory_stats(engine: Engine | None = None) -> dict[str, Any]:
    """Process RSS (now and peak), torch's CUDA peaks, and the engine's planned vs measured rows."""
    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out: dict[str, Any] = {
        "rss_bytes": psutil.Process().memory_info().rss,
        "rss_peak_bytes": peak_kb if sys.platform == "darwin" else peak_kb * 1024,
    }
    if torch.cuda.is_available() and (engine is None or engine.device.type == "cuda"):
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        # The whole device as the driver sees it now (CUDA context included; other processes
        # too, on a shared card): what a --gpu-memory budget bounds.
        free, total = torch.cuda.mem_get_info()
        out["cuda_device_used_bytes"] = total - free
        out["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved()
    if engine is not None:
        plan = engine.memory_plan
        out["planned_tiers"] = {tier: dict(parts) for tier, parts in plan.tiers.items()}
        out["planned_vs_measured"] = [
            {"what": r.device, "planned_bytes": r.planned, "measured_bytes": r.measured}
            for r in engine.memory_report or []
        ]
    return out


def _has_tiers(model: nn.Module) -> bool:
    return any(isinstance(m, TieredExpertBank) for m in model.modules())


def tier_snapshot(model: nn.Module) -> dict[str, float]:
    """Every tiered bank's slot counters and `tier_stats` (copied bytes and GPU-timed seconds,
    CPU expert time, disk reads...), summed over layers; timed copies are waited for first."""
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value

    for m in model.modules():
        if not isinstance(m, TieredExpertBank):
            continue
        m.settle(wait=True)
        counters = m.residency.counters
        for key in ("lookups", "hits", "misses", "admissions", "evictions"):
            add(key, getattr(counters, key))
        for f in dataclasses.fields(m.tier_stats):
            add(f.name, getattr(m.tier_stats, f.name))
    return out


def tier_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counters accrued between two snapshots, with the slot hit rate and GB/s per link."""
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    if not d:
        return {}
    hits, misses = d.get("hits", 0), d.get("misses", 0)
    if hits + misses:
        d["slot_hit_rate"] = hits / (hits + misses)
    if d.get("copy_s"):
        d["copy_gb_s"] = d.get("copy_bytes", 0) / d["copy_s"] / 1e9  # host-to-device link
    return d


# ---- output -------------------------------------------------------------------------------------
def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def report_lines(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(section, what, value) rows of the printed report."""
    rows = []
    for p in result.get("prefill", []):
        rows.append(
            (
                "prefill",
                f"{p['prompt_len']} tokens",
                f"{p['tok_s']:,.1f} tok/s  (TTFT {p['ttft_s'] * 1e3:,.1f} ms)",
            )
        )
    for d in result.get("decode", []):
        extra = f", slot hits {d['slot_hit_rate']:.1%}" if "slot_hit_rate" in d else ""
        if "mapped_gb_s" in d:
            extra += f", RAM read by the GPU {d['mapped_gb_s']:.1f} GB/s"
        rows.append(
            (
                "decode",
                f"batch {d['batch']}",
                f"{d['tok_s']:,.1f} tok/s  ({d['ms_per_step']:.1f} ms/step{extra})",
            )
        )
        if "slot_hit_rate" in d and d.get("steps"):
            # where a step's time went: misses on the CPU, copies into slots, disk reads
            per = {k: 1e3 * d.get(k, 0.0) / d["steps"] for k in ("cpu_s", "copy_s", "disk_s")}
            rows.append(("decode", f"batch {d['batch']} time/step",
                         f"CPU experts {per['cpu_s']:.1f} ms, copies {per['copy_s']:.1f} ms, "
                         f"disk {per['disk_s']:.1f} ms, "
                         f"misses {d.get('misses', 0) / d['steps']:.1f}"))
    tiers = result.get("tiers", {})
    if "slot_hit_rate" in tiers:
        rows.append(("tiers", "slot hit rate", f"{tiers['slot_hit_rate']:.1%}"))
    if "copy_gb_s" in tiers:
        rows.append(("tiers", "host->GPU copies", f"{tiers['copy_gb_s']:.1f} GB/s "
                     f"({tiers.get('copy_bytes', 0) / 1e9:.1f} GB)"))
    mem = result.get("memory", {})
    for key, label in (
        ("cuda_max_allocated_bytes", "CUDA peak allocated"),
        ("cuda_max_reserved_bytes", "CUDA peak reserved"),
        ("cuda_device_used_bytes", "device used (driver)"),
        ("cuda_context_bytes", "CUDA context + other"),
        ("rss_bytes", "process RSS"),
        ("rss_peak_bytes", "process RSS peak"),
    ):
        if key in mem:
            rows.append(("memory", label, _gib(mem[key])))
    for r in mem.get("planned_vs_measured", []):
        rows.append(
            (
                "memory",
                f"{r['what']} planned / measured",
                f"{_gib(r['planned_bytes'])} / {_gib(r['measured_bytes'])}",
            )
        )
    return rows


def print_report(result: dict[str, Any], title: str = "spillover bench") -> None:
    """The result as a table (rich when importable, plain text otherwise)."""
    rows = report_lines(result)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for section, what, value in rows:
            print(f"  {section:8s} {what:28s} {value}")
        return
    table = Table(title=title)
    for col in ("", "what", "value"):
        table.add_column(col)
    for section, what, value in rows:
        table.add_row(section, what, value)
    Console().print(table)
