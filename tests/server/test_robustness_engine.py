"""The engine survives any one request, and `spillover serve` starts and stops like a service
(issue 20, findings 1, 6, 7 and 8): a seed torch refuses, a request whose part of a step raises,
a dead engine thread, a model that cannot load, SIGTERM with streams open, and --max-queue-len
under a burst."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.engine import Engine, EngineConfig
from spillover.engine.outputs import QueueFullError
from spillover.server.api import create_app
from spillover.server.bridge import EngineBridge
from spillover.server.protocol import APIError
from spillover.server.serving import ServerState
from spillover.weights.resolve import load_tokenizer, resolve_model
from tests.models.tiny import save_hf
from tests.server.conftest import ThreadServer, free_port, wait_healthy
from tests.server.stub_engine import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Count from one to twenty."}]


# ---- engine level ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    folder = tmp_path_factory.mktemp("qwen3")
    save_hf("qwen3", folder)
    return LLM(model=str(folder), device="cpu", dtype="float32")


def engine_of(llm: LLM, **kw: Any) -> Engine:
    return llm.make_engine(EngineConfig(**kw))


def boom(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("processor exploded")


def test_engine_rejects_a_seed_torch_refuses(tiny: LLM) -> None:
    """Finding 1: today the seed is accepted and the next step() raises on the engine thread."""
    engine = engine_of(tiny)
    for seed, n in ((2**64, 1), (-(2**63) - 1, 1), (2**64 - 1, 2)):
        with pytest.raises(ValueError, match="seed"):
            engine.add_request(f"s{seed}", [1, 2, 3], SamplingParams(max_tokens=2, seed=seed, n=n))
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2, seed=2**63 - 1, n=2))
    while engine.has_unfinished():
        engine.step()


def test_engine_step_fails_only_the_offending_request(tiny: LLM) -> None:
    """Finding 1: a request whose own part of a step raises (here its logits processor) ends with
    a failure; the request batched with it runs to the end."""
    engine = engine_of(tiny)
    engine.add_request("bad", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0,
                                                        logits_processors=[boom]))
    engine.add_request("good", [5, 6, 8], SamplingParams(max_tokens=4, temperature=0.0,
                                                         ignore_eos=True))
    got: dict[str, list[int]] = {"bad": [], "good": []}
    failures: dict[str, BaseException] = {}
    for _ in range(20):
        if not engine.has_unfinished():
            break
        for ev in engine.step():
            got[ev.request_id] += ev.new_token_ids
        failures.update(engine.take_failures())
    assert not engine.has_unfinished()
    assert list(failures) == ["bad"] and "exploded" in str(failures["bad"])
    assert got["bad"] == [] and len(got["good"]) == 4
    assert engine.stats().num_running == 0
    # and the engine serves the next request
    engine.add_request("next", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    n = 0
    while engine.has_unfinished():
        n += sum(len(ev.new_token_ids) for ev in engine.step())
    assert n == 3


def test_bridge_fails_one_request_and_keeps_serving(tiny: LLM) -> None:
    """Finding 1: through the bridge, the failed request reads a 500 APIError, the other its
    tokens, and the engine thread stays alive (today both get EngineDead and the thread dies)."""
    engine = engine_of(tiny)

    async def main() -> tuple[Any, list[Any], bool]:
        bridge = EngineBridge(engine, asyncio.get_running_loop())
        bridge.start()
        try:
            bad = await bridge.submit("bad", [5, 6, 7], SamplingParams(
                max_tokens=4, logits_processors=[boom]))
            good = await bridge.submit("good", [5, 6, 8], SamplingParams(max_tokens=4,
                                                                         ignore_eos=True))
            first_bad = await asyncio.wait_for(bad.events.get(), 30)
            good_events = []
            while not good.done:
                good_events.append(await asyncio.wait_for(good.events.get(), 30))
            return first_bad, good_events, bridge.alive
        finally:
            bridge.stop()

    first_bad, good_events, alive = asyncio.run(main())
    assert isinstance(first_bad, APIError) and first_bad.status == 500
    assert "exploded" in first_bad.message
    assert all(not isinstance(e, BaseException) for e in good_events)
    assert sum(len(e.new_token_ids) for e in good_events) == 4
    assert alive


def test_queue_counts_only_waiting_requests(tiny: LLM) -> None:
    """Finding 8: max_queue_len 4 and max_num_seqs 16 admit 16 that start at once + 4 waiting
    (today: 4, since the 16 that the next step starts count as waiting)."""
    engine = engine_of(tiny, max_num_seqs=16, max_queue_len=4)
    admitted, refused = 0, 0
    for i in range(40):
        try:
            engine.add_request(f"r{i}", [1 + i, 2, 3], SamplingParams(max_tokens=50,
                                                                     ignore_eos=True))
            admitted += 1
        except QueueFullError:
            refused += 1
    assert (admitted, refused) == (20, 20)
    engine.step()
    s = engine.stats()
    assert (s.num_running, s.num_waiting) == (16, 4)
    with pytest.raises(QueueFullError):  # full: 16 running and 4 waiting
        engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=2))


# ---- server level: the stub engine in-process ------------------------------------------------

class DyingEngine(ScriptedEngine):
    """Its step raises an error no request owns: the engine thread dies."""

    def step(self) -> Any:
        raise RuntimeError("device lost")


def test_dead_engine_is_unhealthy_and_fatal() -> None:
    """Finding 1: a dead engine thread turns /health 503 and tells `serve` to exit (on_fatal)."""
    fatal: list[str] = []
    ready = threading.Event()
    engine = DyingEngine(load_tokenizer(resolve_model(None)))
    state = ServerState(model_name="stub")
    app = create_app(state, lambda: engine, on_ready=ready.set, on_fatal=fatal.append)
    with ThreadServer(app) as base:
        wait_healthy(base, 20)
        assert ready.is_set()
        r = httpx.post(f"{base}{CHAT}", json={"messages": MSG}, timeout=30)
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        h = httpx.get(f"{base}/health", timeout=5)
        assert h.status_code == 503 and "engine failed" in h.json()["error"]["message"]
        deadline = time.monotonic() + 5
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fatal and "device lost" in fatal[0]


# ---- `spillover serve` in a subprocess -------------------------------------------------------

def serve_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spillover.cli.main", "serve", "--port", str(port), "--device",
            "cpu", "--dtype", "float32", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def test_serve_bad_path_exits_nonzero_with_the_message(tmp_path: Path) -> None:
    """Finding 6: today it prints a traceback and answers 503 forever."""
    bad = str(tmp_path / "no-such-model")
    proc = subprocess.Popen(serve_cmd(free_port(), bad), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("`spillover serve` kept running with a model that cannot load")
    assert proc.returncode != 0
    assert "no-such-model" in err and "error" in err
    assert "Traceback" not in err + out


class Proc:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(serve_cmd(self.port, *extra), env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def burst_server() -> Iterator[tuple[Proc, socket.socket]]:
    p = Proc("--max-model-len", "1024", "--max-num-seqs", "16", "--max-queue-len", "4")
    try:
        wait_healthy(p.base, 240, p.proc)
        idle = socket.create_connection(("127.0.0.1", p.port))  # sends nothing, ever
        yield p, idle
        idle.close()
    finally:
        p.stop()


def test_burst_admits_running_plus_max_queue_len(burst_server: Any) -> None:
    """Finding 8: 40 at once with --max-queue-len 4 and --max-num-seqs 16: 16 run, 4 wait,
    20 get 429 (today 32 got 429)."""
    p, _ = burst_server

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as c:
            async def one(i: int) -> int:
                r = await c.post(f"{p.base}{CHAT}", json={
                    "messages": [{"role": "user", "content": f"Story number {i}."}],
                    "max_tokens": 4, "ignore_eos": True})
                return r.status_code
            return list(await asyncio.gather(*(one(i) for i in range(40))))

    codes = asyncio.run(main())
    assert codes.count(429) == 20 and codes.count(200) == 20, codes


def test_seed_outside_int64_is_400_and_engine_keeps_serving(burst_server: Any) -> None:
    """Finding 1: today the first of these kills the engine thread and every later request,
    /health included, gets 503."""
    p, _ = burst_server
    for seed in (2**64, -(2**63) - 1):
        r = httpx.post(f"{p.base}{CHAT}", json={"messages": MSG, "seed": seed, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"
    assert httpx.get(f"{p.base}/health", timeout=5).status_code == 200
    r = httpx.post(f"{p.base}{CHAT}", json={"messages": MSG, "seed": 2**63 - 1, "n": 2,
                                            "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_idle_connection_is_closed(burst_server: Any) -> None:
    """Finding 7: a connection that never sends its request headers is closed (today: never)."""
    _, idle = burst_server
    idle.settimeout(30)
    try:
        data = idle.recv(1)
    except TimeoutError:
        pytest.fail("the server kept an idle connection open")
    assert data == b""


def test_sigterm_drains_then_ends_open_streams() -> None:
    """Finding 7: after SIGTERM new requests get 503 with Retry-After, a short running request
    finishes, streams still open after --shutdown-timeout end with an error event and [DONE],
    and the process exits 0. Today the listener closes at once and streams are cut bare."""
    p = Proc("--max-model-len", "4096", "--shutdown-timeout", "10")
    try:
        wait_healthy(p.base, 240, p.proc)
        streams: list[list[str]] = [[], []]
        short: list[int] = []

        def stream(i: int) -> None:
            body = {"messages": MSG, "max_tokens": 3000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{p.base}{CHAT}", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        streams[i].append(line)

        def short_one() -> None:
            r = httpx.post(f"{p.base}{CHAT}", json={"messages": MSG, "max_tokens": 3,
                                                    "ignore_eos": True}, timeout=120)
            short.append(r.status_code)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=short_one))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(map(len, streams)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(streams), "the streams did not start"
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        r = httpx.post(f"{p.base}{CHAT}", json={"messages": MSG, "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert httpx.get(f"{p.base}/health", timeout=5).status_code == 503
        for t in threads:
            t.join(60)
        assert short == [200]
        for lines in streams:
            assert lines[-1] == "data: [DONE]"
            assert '"error"' in lines[-2] and "shutting down" in lines[-2]
        assert p.proc.wait(30) == 0
        out, _ = p.stop()
        assert "spillover: ready" in out
    finally:
        p.stop()
