"""Aggregate generation throughput of the batching engine: R requests x T output tokens at
several max_num_seqs (16 vs 1 by default), same model, same process.

    python bench/engine_throughput.py                      # demo model, CPU, float32
    python bench/engine_throughput.py --device cuda --dtype bfloat16 --synthetic
        # random weights of the demo model's config (SmolLM2-135M) for machines without the GGUF

Prompts: distinct chat prompts (demo) or random token ids of mixed lengths (synthetic). Every
request decodes exactly T tokens (ignore_eos), greedy. Prints one line per setting and a JSON
summary; tokens/s counts generated tokens over the wall time from submission to the last token.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from spillover import LLM, SamplingParams
from spillover.engine.engine import Engine, EngineConfig

TOPICS = ["a lighthouse", "the moon", "a lost cat", "volcanoes", "a chess game", "bread baking",
          "a river", "an old clock", "the desert", "a violin", "winter", "a robot", "the ocean",
          "a library", "trains", "a garden"]


def prompts_for(llm: LLM, n: int, synthetic: bool) -> list[list[int]]:
    if synthetic:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, llm.config.vocab_size, (int(16 + (37 * i) % 96),),
                              generator=g).tolist()
                for i in range(n)]
    return [llm.apply_chat_template([
        {"role": "user", "content": f"Tell story {i} about {TOPICS[i % len(TOPICS)]}."}])
            for i in range(n)]


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams,
        device: str) -> tuple[float, int, int]:
    """(seconds, generated tokens, steps) for all prompts submitted at once."""
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    tokens = steps = 0
    while engine.has_unfinished():
        for ev in engine.step():
            tokens += len(ev.new_token_ids)
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens, steps


def check_kernels(llm: LLM, prompts: list[list[int]]) -> None:
    """Greedy tokens with the Triton decode kernel vs the forced torch references (same engine
    settings): bf16 rounding may flip a late token, a kernel bug flips nearly all of them."""
    import os

    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = []
    for force in ("", "ref"):
        os.environ["SPILLOVER_KERNELS"] = force
        engine = llm.make_engine(EngineConfig(max_num_seqs=8, enable_prefix_caching=False))
        toks: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            engine.add_request(f"c{i}", p, params)
            toks[f"c{i}"] = []
        while engine.has_unfinished():
            for ev in engine.step():
                toks[ev.request_id] += ev.new_token_ids
        outs.append(toks)
    os.environ.pop("SPILLOVER_KERNELS", None)
    same = sum(outs[0][k] == outs[1][k] for k in outs[0])

    def first_difference(a: list[int], b: list[int]) -> int:
        return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 32)

    prefix = [first_difference(outs[0][k], outs[1][k]) for k in outs[0]]
    print(f"kernel check (triton vs torch ref, greedy 32 tokens): {same}/{len(prompts)} identical, "
          f"first divergence at {prefix}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--synthetic", action="store_true",
                    help="random SmolLM2-135M weights (no GGUF needed)")
    ap.add_argument("--model", default=None, help="a model folder / GGUF instead of the demo model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", default="16,1", help="comma-separated settings to compare")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = args.model
    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic import catalog_folder

        model = str(catalog_folder("HuggingFaceTB/SmolLM2-135M-Instruct", Path(tempfile.mkdtemp())))
    llm = LLM(model=model, device=args.device, dtype=args.dtype)
    prompts = prompts_for(llm, args.requests, args.synthetic)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    if args.device.startswith("cuda"):
        dev = torch.cuda.get_device_name()
    else:
        dev = platform.processor() or platform.machine()
    print(f"# {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, "
          f"{args.requests} requests x {args.output_tokens} tokens, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    results = []
    for seqs in [int(s) for s in args.max_num_seqs.split(",")]:
        engine = llm.make_engine(EngineConfig(max_num_seqs=seqs,
                                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                                   enable_prefix_caching=False))
        run(engine, prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
            args.device)
        secs, tokens, steps = run(engine, prompts, params, args.device)
        st = engine.stats()
        row = dict(max_num_seqs=seqs, seconds=round(secs, 2), tokens=tokens,
                   tok_per_s=round(tokens / secs, 1),
                   steps=steps, ms_per_step=round(1000 * secs / steps, 1),
                   preemptions=st.num_preemptions)
        results.append(row)
        print(f"max_num_seqs {seqs:3d}: {tokens} tokens in {secs:7.2f} s = "
              f"{tokens / secs:8.1f} tok/s ({steps} steps, {1000 * secs / steps:.1f} ms/step, "
              f"{st.num_preemptions} preemptions)")
        del engine
    if len(results) > 1:
        print(f"speed-up max_num_seqs {results[0]['max_num_seqs']} vs "
              f"{results[-1]['max_num_seqs']}: "
              f"{results[0]['tok_per_s'] / results[-1]['tok_per_s']:.2f}x")
    from spillover import kernels

    print("kernels:", kernels.chosen())
    if args.device.startswith("cuda"):
        check_kernels(llm, prompts[:8])
    print(json.dumps(dict(device=dev, dtype=args.dtype, results=results)))


if __name__ == "__main__":
    main()
