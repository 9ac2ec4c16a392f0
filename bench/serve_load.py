"""Load test of `spillover serve` shutdown: many concurrent streams, some disconnecting early, and
one SIGTERM in the middle. Every stream must end cleanly; nothing may be lost.

    python bench/serve_load.py                       # 64 streams, 20 disconnect, SIGTERM at 5 s
    python bench/serve_load.py --streams 64 --disconnect 20 --max-tokens 64 \\
        --sigterm-after 5 --shutdown-timeout 10 --json load.json

It spawns `python -m spillover serve` (the demo model, CPU) on a free port, opens --streams
streaming chat completions at once (`ignore_eos`, --max-tokens each), of which --disconnect close
their connection after their first --disconnect-after content chunks. --sigterm-after seconds
after the streams start it sends SIGTERM to the server, and while the server drains it sends a
probe request every --probe-every seconds (these must be answered 503 with Retry-After).

Each stream is classified as:
  completed     a chunk with finish_reason, then `data: [DONE]`
  drained       an error event (the drain timeout), then `data: [DONE]`
  disconnected  closed by this client on purpose after its first chunks
  rejected      answered with an HTTP error status at once (clean, but reported)
  lost          anything else: connection dropped without [DONE], no response, a malformed end
Exits 1 if any stream is lost, a probe got something other than 503 + Retry-After (or a refused
connection once the server is closing), or the server's exit code is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

CHAT = "/v1/chat/completions"
CLASSES = ("completed", "drained", "disconnected", "rejected", "lost")


@dataclass
class Stream:
    index: int
    disconnect: bool
    status: int | None = None
    chunks: int = 0  # content chunks received
    finish_reason: str | None = None
    error: str | None = None  # the error event's message, if any
    done: bool = False  # saw `data: [DONE]`
    exception: str | None = None
    first_token_s: float | None = None  # since the streams started
    end_s: float | None = None
    cls: str = "lost"
    events_after_done: int = 0


@dataclass
class Probes:
    sent: int = 0
    answered_503: int = 0  # with Retry-After
    refused: int = 0  # connection refused / closed: the listener is shutting down
    other: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def classify(s: Stream) -> str:
    if s.status is not None and s.status != 200 and s.exception is None:
        return "rejected"
    if s.disconnect and s.exception == "disconnected":
        return "disconnected"
    if s.exception is not None or not s.done or s.events_after_done:
        return "lost"
    if s.error is not None:
        return "drained"
    if s.finish_reason is not None:
        return "completed"
    return "lost"  # [DONE] without a finish_reason or an error


async def run_stream(client: httpx.AsyncClient, s: Stream, body: dict, after: int,
                     t0: float) -> None:
    try:
        async with client.stream("POST", CHAT, json=body) as resp:
            s.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                s.error = resp.text[:200]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if s.done:
                    s.events_after_done += 1
                    continue
                data = line[6:]
                if data == "[DONE]":
                    s.done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    s.error = str(err.get("message", err) if isinstance(err, dict) else err)
                    continue
                for choice in chunk.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        s.chunks += 1
                        if s.first_token_s is None:
                            s.first_token_s = time.monotonic() - t0
                    if choice.get("finish_reason"):
                        s.finish_reason = choice["finish_reason"]
                if s.disconnect and s.chunks >= after and s.finish_reason is None:
                    s.exception = "disconnected"
                    break  # leaving the context manager closes the connection
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        s.exception = f"{type(e).__name__}: {e}"
    finally:
        s.end_s = time.monotonic() - t0


async def probe_loop(base: str, probes: Probes, stop: asyncio.Event, every: float) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while not stop.is_set():
            probes.sent += 1
            try:
                r = await client.post(CHAT, json=body)
                if r.status_code == 503 and r.headers.get("retry-after"):
                    probes.answered_503 += 1
                else:
                    probes.other.append(f"{r.status_code}: {r.text[:120]}")
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                probes.refused += 1
            except httpx.HTTPError as e:
                probes.other.append(f"{type(e).__name__}: {e}")
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before /health")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{base}/health not ready after {timeout} s")


def disconnect_set(n: int, k: int) -> set[int]:
    """k of n indices, spread evenly."""
    return {i * n // k for i in range(k)} if k else set()


async def load(args: argparse.Namespace, base: str, proc: subprocess.Popen) -> dict:
    drop = disconnect_set(args.streams, args.disconnect)
    streams = [Stream(i, i in drop) for i in range(args.streams)]
    probes = Probes()
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.read_timeout, connect=10)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
        tasks = []
        for s in streams:
            body = {"messages": [{"role": "user",
                                  "content": f"Request {s.index}: count slowly upward from 1."}],
                    "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            tasks.append(asyncio.create_task(
                run_stream(client, s, body, args.disconnect_after, t0)))
        await asyncio.sleep(max(0.0, args.sigterm_after - (time.monotonic() - t0)))
        sigterm_s = time.monotonic() - t0
        with_tokens = sum(s.first_token_s is not None for s in streams)
        finished_before = sum(t.done() for t in tasks)
        proc.send_signal(signal.SIGTERM)
        stop = asyncio.Event()
        await asyncio.sleep(0.3)  # let the server see the signal before the first probe
        prober = asyncio.create_task(probe_loop(base, probes, stop, args.probe_every))
        await asyncio.gather(*tasks)
        stop.set()
        await prober
        streams_end_s = time.monotonic() - t0
    for s in streams:
        s.cls = classify(s)
    return {"streams": streams, "probes": probes, "sigterm_s": sigterm_s,
            "streams_with_tokens_at_sigterm": with_tokens,
            "streams_ended_before_sigterm": finished_before, "streams_end_s": streams_end_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--disconnect", type=int, default=20, help="streams that close early")
    ap.add_argument("--disconnect-after", type=int, default=3, metavar="N",
                    help="content chunks a disconnecting stream reads first")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sigterm-after", type=float, default=5.0, metavar="S",
                    help="seconds after the streams start")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S")
    ap.add_argument("--probe-every", type=float, default=1.0, metavar="S")
    ap.add_argument("--read-timeout", type=float, default=120.0)
    ap.add_argument("--serve-args", default="--device cpu --dtype float32 --max-model-len 1024",
                    help="more arguments for `spillover serve`")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "spillover", "serve", "--port", str(port),
           "--max-num-seqs", str(args.streams), "--shutdown-timeout",
           f"{args.shutdown_timeout:g}", *args.serve_args.split()]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    log = tempfile.TemporaryFile(mode="w+")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    exit_code: int | None = None
    try:
        asyncio.run(wait_healthy(base, proc, 300))
        load_s = time.monotonic() - start
        t_load = time.monotonic()
        res = asyncio.run(load(args, base, proc))
        try:
            exit_code = proc.wait(args.shutdown_timeout + 30)
        except subprocess.TimeoutExpired:
            exit_code = None
        wall_s = time.monotonic() - t_load
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.seek(0)
        server_log = log.read()
        log.close()

    streams: list[Stream] = res["streams"]
    probes: Probes = res["probes"]
    counts = Counter(s.cls for s in streams)
    lost = counts["lost"]
    fail = lost or probes.other or exit_code != 0

    print(f"$ {' '.join(cmd[1:])}")
    print(f"server ready in {load_s:.1f} s; SIGTERM at {res['sigterm_s']:.1f} s "
          f"({res['streams_with_tokens_at_sigterm']}/{len(streams)} streams had tokens, "
          f"{res['streams_ended_before_sigterm']} had ended)")
    print(f"{'class':<14}{'streams':>8}")
    for c in CLASSES:
        print(f"{c:<14}{counts[c]:>8}")
    print(f"{'total':<14}{len(streams):>8}")
    print(f"probes after SIGTERM: {probes.sent} sent, {probes.answered_503} answered 503 + "
          f"Retry-After, {probes.refused} refused (listener closing), {len(probes.other)} other")
    for o in probes.other[:5]:
        print(f"  probe: {o}")
    for s in streams:
        if s.cls == "lost":
            print(f"  lost stream {s.index}: status={s.status} chunks={s.chunks} done={s.done} "
                  f"finish={s.finish_reason} error={s.error} exc={s.exception}")
    for line in server_log.splitlines():
        if line.startswith("spillover: ") and "ready" not in line and "loading" not in line:
            print(f"  server: {line}")
    print(f"server exit code: {exit_code}")
    print(f"wall: {wall_s:.1f} s (streams start to server exit), all streams ended at "
          f"{res['streams_end_s']:.1f} s")
    print(f"lost: {lost}")

    if args.json:
        out = {"command": cmd[1:], "args": vars(args), "counts": {c: counts[c] for c in CLASSES},
               "lost": lost, "server_exit_code": exit_code, "wall_s": round(wall_s, 2),
               "load_s": round(load_s, 2), "sigterm_s": round(res["sigterm_s"], 2),
               "streams_end_s": round(res["streams_end_s"], 2),
               "streams_with_tokens_at_sigterm": res["streams_with_tokens_at_sigterm"],
               "streams_ended_before_sigterm": res["streams_ended_before_sigterm"],
               "probes": asdict(probes), "streams": [asdict(s) for s in streams],
               "server_log": server_log.splitlines()[-50:]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
