"""Profile of decode steps through the engine (the path `serve` takes): where a step's time goes.

Builds the Qwen3-Next-80B-A3B shape with synthetic weights (`--layers N` of them), prefills the
given prompts, then records `--steps` decode steps with torch.profiler and prints, per step: wall
time, GPU busy time (the union of kernel and copy intervals) and its share of the wall time, GPU
kernels and copies (per layer too), CUDA graph launches and host syncs; then the kernels that took
the most GPU time. `--json FILE` writes the same.

    python bench/decode_profile.py --layers 8 --batch 1
    python bench/decode_profile.py --layers 8 --batch 1 --enforce-eager
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spillover import LLM, SamplingParams  # noqa: E402
from spillover.bench.synthetic import build_synthetic, load_synthetic_config, with_layers  # noqa: E402
from spillover.engine.engine import EngineConfig  # noqa: E402


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen3-Next-80B-A3B-Instruct")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--prefill", action="store_true",
                    help="profile the prefill of a second prompt of --prompt-len tokens (batch 1, "
                         "one step per chunk) instead of decode steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cfg = with_layers(load_synthetic_config(args.model), args.layers)
    dev = torch.device("cuda")
    model = build_synthetic(cfg, dev, torch.bfloat16, args.quant, seed=0)
    llm = LLM.from_model(model, cfg, dev, torch.bfloat16)
    engine = llm.make_engine(EngineConfig(max_num_seqs=max(args.batch, 1),
                                          max_num_batched_tokens=8192,
                                          enforce_eager=args.enforce_eager,
                                          enable_prefix_caching=False))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", torch.randint(0, cfg.vocab_size, (args.prompt_len,),
                                                  generator=gen).tolist(), params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                               for r in sched.running):
        engine.step()
    for _ in range(8):  # capture and warm-up outside the record
        engine.step()
    if args.prefill:
        for r in list(sched.running):
            engine.abort(r.request_id)
        engine.add_request("p", torch.randint(0, cfg.vocab_size, (args.prompt_len,),
                                              generator=gen).tolist(), params)
        args.steps = -(-args.prompt_len // 8192)  # the steps of its chunks
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
    gpu: list[tuple[float, float]] = []
    kernels = copies = launches = syncs = 0
    by_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        name = ev.name
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            start = ev.time_range.start
            gpu.append((start, ev.time_range.end))
            if "memcpy" in name.lower() or "memset" in name.lower():
                copies += 1
            else:
                kernels += 1
                by_name[name[:90]] += ev.time_range.elapsed_us()
                count[name[:90]] += 1
        elif name == "cudaGraphLaunch":
            launches += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
    n = args.steps
    result: dict[str, Any] = {
        "layers": args.layers, "batch": args.batch, "eager": args.enforce_eager,
        "wall_ms_per_step": 1e3 * wall, "tok_s": args.batch / wall,
        "gpu_busy_ms_per_step": busy_us(gpu) / 1e3 / n,
        "gpu_busy_share": busy_us(gpu) / 1e6 / (wall * n),
        "kernels_per_step": kernels / n, "kernels_per_layer": kernels / n / args.layers,
        "copies_per_step": copies / n, "graph_launches_per_step": launches / n,
        "host_syncs_per_step": syncs / n,
        "top_kernels_us_per_step": {k: v / n for k, v in sorted(by_name.items(),
                                                                key=lambda kv: -kv[1])[:15]},
        "kernels_per_step_by_name": {k: v / n for k, v in sorted(count.items(),
                                                                 key=lambda kv: -kv[1])},
    }
    for k, v in result.items():
        if not isinstance(v, dict):
            print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")
    for k, v in result["top_kernels_us_per_step"].items():
        print(f"  {v:9.1f} us  {k}")
    for k, c in result["kernels_per_step_by_name"].items():
        print(f"  {c:7.1f} /step  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
