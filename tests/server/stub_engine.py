"""A scripted stand-in for the Engine (same API): it "generates" the text that follows `SCRIPT:` in
the prompt, one token per step. The demo model is too small to produce tool calls or `<think>`
blocks on demand, so protocol paths that need exact output run against this."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from spillover.engine.outputs import EngineStats, QueueFullError, TokenEvent
from spillover.engine.params import SamplingParams

END = "<|im_end|>"


@dataclass
class _Req:
    rid: str
    params: SamplingParams
    script: list[int]
    prompt_len: int
    pos: list[int] = field(default_factory=list)  # per completion index
    done: list[bool] = field(default_factory=list)


class ScriptedEngine:
    def __init__(self, tokenizer: Any, max_running: int = 64, max_queue_len: int = 1000,
                 step_delay: float = 0.0, max_model_len: int = 2048) -> None:
        self.tokenizer = tokenizer
        eos = int(tokenizer.eos_token_id)
        self.model_config = SimpleNamespace(vocab_size=len(tokenizer), eos_token_ids=(eos,))
        self.max_model_len = max_model_len
        self.max_running, self.max_queue_len = max_running, max_queue_len
        self.step_delay = step_delay
        self.running: dict[str, _Req] = {}
        self.waiting: list[_Req] = []
        self.total_blocks = 100
        self.gate = threading.Event()  # cleared: step() sleeps (lets tests fill the queue)
        self.gate.set()

    def _blocks_used(self) -> int:
        return sum(1 + (r.prompt_len + max(r.pos, default=0)) // 16 for r in self.running.values())

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"exceeds the model's context length of {self.max_model_len} tokens")
        if len(self.waiting) >= self.max_queue_len:
            raise QueueFullError("queue full")
        text = self.tokenizer.decode(prompt_token_ids)
        script = text.rsplit("SCRIPT:", 1)[-1].split(END)[0] if "SCRIPT:" in text else "Hello."
        ids = list(self.tokenizer(script, add_special_tokens=False).input_ids)
        self.waiting.append(_Req(request_id, params, ids, len(prompt_token_ids), [0] * params.n,
                                 [False] * params.n))

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = [r for r in self.waiting if r.rid != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[TokenEvent]:
        if not self.gate.is_set():
            time.sleep(0.01)
            return []
        if self.step_delay:
            time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting.pop(0)
            self.running[r.rid] = r
        events = []
        for r in list(self.running.values()):
            for i in range(r.params.n):
                if r.done[i]:
                    continue
                p = r.pos[i]
                tok = r.script[p] if p < len(r.script) else int(self.tokenizer.eos_token_id)
                r.pos[i] += 1
                eos = p >= len(r.script)
                length = not eos and r.pos[i] >= r.params.max_tokens
                dec = self.tokenizer.decode
                text = "" if eos else dec(r.script[: p + 1])[len(dec(r.script[:p])):]
                lp = [{tok: -0.5, (tok + 1) % 100: -1.5}] if r.params.logprobs is not None else None
                r.done[i] = eos or length
                events.append(TokenEvent(r.rid, i, [tok], text, lp, r.done[i],
                                         "stop" if eos else ("length" if length else None), None,
                                         num_prompt_tokens=r.prompt_len, num_cached_tokens=0))
            if all(r.done):
                del self.running[r.rid]
        return events

    def stats(self) -> EngineStats:
        used = self._blocks_used()
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_blocks_total=self.total_blocks,
                           kv_blocks_free=self.total_blocks - used,
                           kv_usage=used / self.total_blocks, prefix_queries_tokens=0,
                           prefix_hit_tokens=0, num_preemptions=0, state_slots_total=0,
                           state_slots_free=0, prompt_tokens_total=0, generation_tokens_total=0,
                           computed_prompt_tokens_total=0)
