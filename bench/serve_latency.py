"""Serving latency and throughput of `spillover serve`: TTFT, inter-token latency, E2E and output
tokens/s at several concurrency levels, measured at the client over streaming chat completions.

    python bench/serve_latency.py          # spawns `spillover serve` (demo model)
    python bench/serve_latency.py --base-url http://127.0.0.1:8000 --concurrency 1 8 32
    python bench/serve_latency.py --serve-args "--device cuda --dtype bfloat16" --output-len 128

Each request gets a distinct prompt (so prefix caching does not flatter TTFT) and `ignore_eos`, so
every request produces exactly --output-len tokens. Definitions follow `vllm bench serve`: TTFT is
request start to first content chunk, ITL the gaps between later chunks, throughput the output
tokens of all requests over the wall time of the level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("apple river stone cloud music paper garden window orange silver mountain coffee bridge "
         "forest letter candle ocean pencil market winter lantern meadow copper violin "
         "harbor").split()


@dataclass
class Result:
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    ok: bool = False


def prompt(rng: random.Random, n_words: int) -> str:
    return "Continue this list of words: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one(client: httpx.AsyncClient, model: str, text: str, output_len: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": output_len,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    r = Result()
    start = last = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                r.tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if r.ttft == 0.0:
                r.ttft = now - start
            else:
                r.itl.append(now - last)
            last = now
    r.e2e = time.perf_counter() - start
    r.ok = r.tokens == output_len
    return r


async def level(base: str, model: str, concurrency: int, num_requests: int, input_words: int,
                output_len: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed + concurrency)
    prompts = [prompt(rng, input_words) for _ in range(num_requests)]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(1800.0),
                                 limits=limits) as client:
        async def bounded(p: str) -> Result:
            async with sem:
                return await one(client, model, p, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = sorted(r.ttft for r in results)
    itl = sorted(x for r in results for x in r.itl)
    tokens = sum(r.tokens for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    return {"concurrency": concurrency, "requests": num_requests,
            "failed": sum(not r.ok for r in results),
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99),
            "e2e_s_mean": statistics.mean(r.e2e for r in results),
            "out_tok_s": tokens / wall, "req_s": num_requests / wall, "wall_s": wall}


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return str(httpx.get(f"{base}/v1/models").json()["data"][0]["id"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("server not ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None,
                    help="an already running server (default: spawn one)")
    ap.add_argument("--serve-args", default="",
                    help="extra arguments for the spawned `spillover serve`")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=0,
                    help="per level (default: max(4, concurrency))")
    ap.add_argument("--input-words", type=int, default=40,
                    help="~1.3 tokens per word with the demo tokenizer")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per level")
    args = ap.parse_args()

    proc = None
    base = args.base_url
    if base is None:
        base = f"http://127.0.0.1:{args.port}"
        cmd = [sys.executable, "-m", "spillover.cli.main", "serve", "--port", str(args.port),
               "--max-num-seqs", str(max(args.concurrency)), *shlex.split(args.serve_args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        model = wait_ready(base, proc)
        asyncio.run(level(base, model, 1, 1, 8, 2, args.seed + 999))  # warm-up
        print("| concurrency | requests | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | E2E mean (s) "
              "| out tok/s | req/s |")
        print("|---|---|---|---|---|---|---|")
        for c in args.concurrency:
            n = args.requests or max(4, c)
            r = asyncio.run(level(base, model, c, n, args.input_words, args.output_len, args.seed))
            if args.json:
                print(json.dumps(r))
            failed = f" ({r['failed']:.0f} failed)" if r["failed"] else ""
            print(f"| {c} | {n}{failed} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
                  f"{r['itl_ms_p50']:.0f} / {r['itl_ms_p99']:.0f} | {r['e2e_s_mean']:.2f} | "
                  f"{r['out_tok_s']:.1f} | {r['req_s']:.2f} |", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
