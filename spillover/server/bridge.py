"""asyncio <-> one engine thread.

The engine is single-threaded by design: only the engine thread touches it. The event loop sends
commands (add, abort) through a thread-safe queue; the engine thread steps and hands each step's
events back to the loop in one `call_soon_threadsafe`, where they are routed to per-request queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spillover.server.protocol import APIError

log = logging.getLogger("spillover.server")


@dataclass
class Stream:
    """What the HTTP layer reads for one request: its events, in order."""

    request_id: str
    n: int
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    finished_indices: set[int] = field(default_factory=set)
    created: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return len(self.finished_indices) >= self.n


class EngineDead(RuntimeError):
    pass


def request_failed(exc: BaseException) -> APIError:
    """The error one request gets when its part of an engine step raised (the others go on)."""
    return APIError(500, f"the request failed in the engine: {type(exc).__name__}: {exc}"[:500],
                    "server_error", code="request_failed")


class EngineBridge:
    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop,
                 on_step: Callable[[Any], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.loop = loop
        self._on_death = on_death  # called on the loop when the engine thread dies
        # set by drain(): no new requests (503), the running ones finish
        self.draining = False
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}
        self._stop = threading.Event()
        self._on_step = on_step
        # latest snapshot, replaced (never mutated) by the engine thread
        self.stats: Any = engine.stats()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spillover-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_open(self) -> int:
        """Requests submitted and not finished (running or waiting in the engine)."""
        return len(self._streams)

    async def drain(self, timeout: float) -> int:
        """Stops admitting requests, waits up to `timeout` seconds for the open ones to finish,
        then ends those left with a 503 error (a stream gets an error event and [DONE]).
        Returns how many were cut."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._streams and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = len(self._streams)
        if cut:
            err = APIError(503, f"the server is shutting down ({timeout:g} s drain timeout "
                                "passed)", "server_error", code="shutting_down",
                           headers={"Retry-After": "1"})
            for rid in list(self._streams):
                self._commands.put(("abort", rid))
            self._fail_all(err)
        return cut

    # ---- event-loop side -------------------------------------------------------------------------
    async def submit(self, request_id: str, prompt_ids: list[int], params: Any,
                     events: asyncio.Queue[Any] | None = None) -> Stream:
        """Adds a request; engine errors (ValueError, QueueFullError) are raised here, in
        the caller. Several requests may share one `events` queue (completions with a list
        of prompts)."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        if self.draining:
            raise EngineDead("the server is shutting down")
        stream = (Stream(request_id, params.n) if events is None
                  else Stream(request_id, params.n, events))
        self._streams[request_id] = stream
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put(("add", (request_id, prompt_ids, params, fut)))
        try:
            await asyncio.wrap_future(fut)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Frees the request's blocks and slots on the engine's next turn (before its next step)."""
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))

    def release(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _deliver(self, events: list[Any],
                 failures: dict[str, BaseException] | None = None) -> None:
        for rid, exc in (failures or {}).items():
            s = self._streams.pop(rid, None)
            if s is not None:
                s.events.put_nowait(request_failed(exc))
        for ev in events:
            s = self._streams.get(ev.request_id)
            if s is None:
                continue  # aborted meanwhile
            if ev.finished:
                s.finished_indices.add(ev.index)
            s.events.put_nowait(ev)
            if s.done:
                self._streams.pop(ev.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for s in list(self._streams.values()):
            s.events.put_nowait(exc)
        self._streams.clear()

    # ---- engine-thread side ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._drain(block=not busy)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    events = self.engine.step()
                    # requests the step failed alone (the engine goes on serving the rest)
                    take = getattr(self.engine, "take_failures", None)
                    failures = take() if take is not None else {}
                    self.stats = self.engine.stats()
                    if events or failures:
                        self.loop.call_soon_threadsafe(self._deliver, events, failures)
                    if self._on_step is not None:
                        self._on_step(self.stats)
        except BaseException as e:  # a dead engine must be visible: /health turns 503
            log.exception("engine thread died")
            self.error = e
            try:
                self.loop.call_soon_threadsafe(self._died, e)
            except RuntimeError:
                pass  # loop already closed

    def _died(self, e: BaseException) -> None:
        self._fail_all(EngineDead(f"engine failed: {e}"))
        if self._on_death is not None:
            self._on_death(e)

    def _drain(self, block: bool) -> None:
        changed = False
        while True:
            try:
                cmd, arg = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                break
            block = False
            if cmd == "add":
                rid, ids, params, fut = arg
                if not fut.set_running_or_notify_cancel():
                    continue  # the caller went away before the engine saw the request
                try:
                    self.engine.add_request(rid, ids, params)
                except Exception as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(None)
                changed = True
            elif cmd == "abort":
                try:
                    self.engine.abort(arg)
                except KeyError:
                    pass  # finished in the step that raced with the disconnect
                except Exception:  # one request's abort must not end the engine thread
                    log.exception("aborting request %s failed", arg)
                changed = True
        if changed:
            self.stats = self.engine.stats()
