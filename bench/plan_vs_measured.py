"""Planned vs measured: peak memory and decode speed of the engine's model against its MemoryPlan.

    python bench/plan_vs_measured.py                      # GPU: two model sizes, two placements
    python bench/plan_vs_measured.py --models Qwen/Qwen3-8B --context 2048 --json out.json
    python bench/plan_vs_measured.py --device cpu          # dry run on CPU (tiny model, no GPU)

Weights are synthetic (uninitialised storage filled with small noise): memory and speed depend on
shapes, not values. Nothing is downloaded.

1. Memory: for each model, everything on the GPU in bf16, caches from the plan's numbers
   (num_kv_blocks, block_size, num_state_slots); one prefill chunk of --token-budget tokens and a
   few decode steps; torch.cuda.max_memory_allocated() vs plan.gpu_torch_bytes (and per component).
2. Speed, two placements of one dense model: (a) all on the GPU, (b) the GPU budget the plan gets
   from --vram-b, with the layers the plan puts in RAM kept in pinned memory and copied into a GPU
   staging buffer before each use (the PCIe path of the speed model). Measured decode tok/s vs
   plan.predicted (per link), with the fixed per-token overhead the measurement implies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spillover.catalog import get_config  # noqa: E402
from spillover.config import ModelConfig  # noqa: E402
from spillover.hw.info import fmt_bytes, with_overrides  # noqa: E402
from spillover.hw.probe import probe  # noqa: E402
from spillover.plan.advice import make_plan  # noqa: E402
from spillover.plan.inventory import inventory_from_config  # noqa: E402
from spillover.plan.measure import compare_peaks, measured_bytes_by_component  # noqa: E402
from spillover.plan.memory import Limits, MemoryPlan  # noqa: E402
from spillover.plan.speed import predict  # noqa: E402


def _dtype(dev: torch.device) -> torch.dtype:
    # CPUs without bf16 matmul units run bf16 far slower than fp32: the dry run uses fp32
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(cfg: ModelConfig, dev: torch.device, dtype: torch.dtype,
          on: torch.device | None = None) -> Any:
    from spillover.weights.resolve import build_model

    model = build_model(cfg, on or dev, dtype)
    with torch.no_grad():
        # uninitialised memory may hold NaN/denormals that skew timings
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def runner_for(model: Any, plan: MemoryPlan, dev: torch.device, dtype: torch.dtype) -> Any:
    from spillover.engine.runner import CacheLayout, ModelRunner

    layout = CacheLayout(plan.num_kv_blocks, plan.block_size, max(plan.num_state_slots, 1))
    return ModelRunner(model, layout, dev, dtype)


def run_steps(runner: Any, cfg: ModelConfig, prompt: int, chunk: int, decode: int) -> list[float]:
    """Prefill `prompt` tokens in chunks, then `decode` single-token steps; seconds per
    decode step."""
    from spillover.engine.batch import StepPlan

    bs = runner.layout.block_size
    table = list(range(runner.layout.num_blocks))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (prompt + decode,), generator=g).tolist()
    done = 0
    while done < prompt:
        n = min(chunk, prompt - done)
        last = "last" if done + n == prompt else "none"
        runner.execute(StepPlan.one_sequence(ids[: done + n], table, bs, start=done, logits=last))
        done += n
    times = []
    for i in range(decode):
        plan = StepPlan.one_sequence(ids[: prompt + i + 1], table, bs, start=prompt + i,
                                     logits="last")
        _sync(runner.device)
        t = time.perf_counter()
        runner.execute(plan)
        _sync(runner.device)
        times.append(time.perf_counter() - t)
    return times


def memory_case(name: str, args: argparse.Namespace, dev: torch.device, hw: Any) -> dict[str, Any]:
    key, raw = get_config(name)
    cfg = ModelConfig.from_hf(raw)
    limits = Limits(context=args.context, seqs=1, token_budget=args.token_budget)
    plan = make_plan(key, cfg, inventory_from_config(cfg), hw, limits, "bf16", advise=False)
    if plan.verdict != "gpu" and dev.type == "cuda":
        return {"model": key, "skipped": f"bf16 does not fit on this GPU alone ({plan.verdict})"}
    dtype = _dtype(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    model = build(cfg, dev, dtype)
    runner = runner_for(model, plan, dev, dtype)
    static = measured_bytes_by_component(model.named_parameters(), runner.kv_caches,
                                         runner.state_caches)
    run_steps(runner, cfg, min(args.prompt, args.context - args.decode), args.token_budget, 4)
    peak = (
        torch.cuda.max_memory_allocated(dev) - base
        if dev.type == "cuda"
        else sum(sum(d.values()) for d in static.values())
    )
    tier = "gpu" if dev.type == "cuda" else "host"
    planned = sum(v for k, v in plan.tiers[tier].items() if k != "runtime")
    (cmp,) = compare_peaks(plan, {"gpu": peak}) if dev.type == "cuda" else [None]
    scale = 2 if dtype == torch.float32 else 1  # the plan is for bf16
    by_comp = {
        c: {"planned": plan.tiers[tier].get(c, 0) * scale, "measured": v}
        for c, v in static.get(tier, {}).items()
    }
    static_total = sum(static.get(tier, {}).values())
    by_comp["activations (peak - static)"] = {"planned": plan.activation_bytes,
                                              "measured": peak - static_total}
    del runner, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": key,
        "planned_peak": planned,
        "measured_peak": peak,
        "error_pct": round((peak / planned - 1) * 100, 2) if planned else None,
        "line": cmp.line() if cmp else "cpu dry run: static tensors only",
        "by_component": by_comp,
    }


class LayerStreamer:
    """Keeps whole decoder layers in pinned RAM and copies each into one GPU staging
    set before use."""

    def __init__(self, layers: list[torch.nn.Module], dev: torch.device) -> None:
        self.hosts: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        for layer in layers:
            entries = []
            for p in layer.parameters():
                pinned = torch.empty(p.shape, dtype=p.dtype, pin_memory=dev.type == "cuda")
                pinned.copy_(p.data)
                entries.append((p, pinned))
            self.hosts.append(entries)
        self.staging = [torch.empty(h.shape, dtype=h.dtype, device=dev)
                        for _, h in self.hosts[0]] if layers else []
        for layer, entries in zip(layers, self.hosts, strict=True):
            for (p, _), buf in zip(entries, self.staging, strict=True):
                p.data = buf  # every streamed layer computes from the same staging storage
            layer.register_forward_pre_hook(self._hook(entries))

    def _hook(self, entries: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> Any:
        def copy_in(_module: torch.nn.Module, _inputs: Any) -> None:
            for (_, pinned), buf in zip(entries, self.staging, strict=True):
                buf.copy_(pinned, non_blocking=True)

        return copy_in


def speed_case(name: str, args: argparse.Namespace, dev: torch.device, hw: Any,
               vram: str | None) -> dict[str, Any]:
    key, raw = get_config(name)
    cfg = ModelConfig.from_hf(raw)
    if cfg.is_moe:
        raise SystemExit("the streaming placement streams whole layers: give a dense model "
                         "for --speed-model")
    hw_case = with_overrides(hw, vram=vram) if vram else hw
    limits = Limits(context=args.context, seqs=1, token_budget=args.token_budget)
    inv = inventory_from_config(cfg)
    plan = make_plan(key, cfg, inv, hw_case, limits, "bf16", advise=False)
    dtype = _dtype(dev)
    on_gpu = plan.dense_layers_on_gpu if dev.type == "cuda" else cfg.num_layers
    # the model must fit the real GPU once; streamed layers then leave it
    model = build(cfg, dev, dtype)
    layers = list(model.model.layers)
    streamed = layers[on_gpu:]
    streamer = LayerStreamer(streamed, dev) if streamed and dev.type == "cuda" else None
    model.to(dev)  # resident parts move; streamed layers already point at the GPU staging set
    runner = runner_for(model, plan, dev, dtype)
    prompt = max(1, args.context - args.decode - 1)
    times = run_steps(runner, cfg, prompt, args.token_budget, args.decode)
    measured = 1.0 / statistics.median(times[2:] or times)
    # the bench streams over PCIe: predict that path (the plan picks the faster of CPU and PCIe)
    pred = plan.predicted
    if streamed and dev.type == "cuda":
        links = replace(hw_case.links,
                        host_mem=min(hw_case.links.host_mem, hw_case.links.h2d * 0.99))
        from spillover.plan.memory import _Bill, _place, _traffic  # same numbers as the plan

        bill = _Bill(cfg, inv, plan.scheme, limits)
        pl = _place(bill, plan.gpu_budget, plan.host_budget, True, plan.extra["context"], 1)
        pred = predict(
            _traffic(cfg, bill, inv, pl, plan.extra["context"], True, limits),
            replace(hw_case, links=links),
            plan.predicted.prefill_chunk_tokens,
        )
    bytes_ms = sum(v for k, v in pred.decode_ms_by_link.items() if k != "fixed")
    del streamer, runner, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": key,
        "placement": f"{on_gpu}/{cfg.num_layers} layers on {dev.type}"
        + (f", {len(streamed)} streamed from pinned RAM" if streamed else ""),
        "vram_budget": vram or "all",
        "predicted_decode_tok_s": round(pred.decode_tok_s, 2),
        "measured_decode_tok_s": round(measured, 2),
        "ratio_measured_over_predicted": round(measured / pred.decode_tok_s, 3),
        "predicted_ms_by_link": {k: round(v, 3) for k, v in pred.decode_ms_by_link.items()},
        "measured_ms": round(1e3 / measured, 3),
        "implied_fixed_ms": round(1e3 / measured - bytes_ms, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--models", help="comma-separated catalog names for the memory check")
    ap.add_argument("--speed-model", help="dense catalog model for the two placements")
    ap.add_argument("--vram-b", default="10GiB", help="GPU budget of placement (b)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # dry run: tiny, fast, checks the whole path without a GPU
        args.models = args.models or "HuggingFaceTB/SmolLM2-135M-Instruct"
        args.speed_model = args.speed_model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        args.context, args.prompt, args.decode, args.token_budget = 256, 64, 8, 64
    hw = probe(measure=cuda)  # link rates of this machine, measured once and cached
    print(f"hardware: {hw.describe()}; links: " + ", ".join(
        f"{k} {v}" for k, v in hw.links.sources.items()))
    out: dict[str, Any] = {"hardware": hw.to_json(), "device": str(dev), "memory": [], "speed": []}
    for name in (args.models or "Qwen/Qwen3-8B,Qwen/Qwen3-30B-A3B").split(","):
        r = memory_case(name.strip(), args, dev, hw)
        out["memory"].append(r)
        print(f"[memory] {r['model']}: {r.get('line') or r.get('skipped')}")
        for comp, v in r.get("by_component", {}).items():
            print(f"    {comp:<28} planned {fmt_bytes(v['planned']):>12}  measured "
                  f"{fmt_bytes(v['measured']):>12}")
    speed_model = args.speed_model or "Qwen/Qwen3-8B"
    for vram in (None, args.vram_b if cuda else None):
        if vram is None and out["speed"]:
            continue
        r = speed_case(speed_model, args, dev, hw, vram)
        out["speed"].append(r)
        print(
            f"[speed] {r['model']} ({r['placement']}): predicted {r['predicted_decode_tok_s']} "
            f"tok/s, measured {r['measured_decode_tok_s']} tok/s "
            f"(x{r['ratio_measured_over_predicted']}); per link {r['predicted_ms_by_link']} ms; "
            f"implied fixed {r['implied_fixed_ms']} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
