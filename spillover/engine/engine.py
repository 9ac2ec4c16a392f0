"""Engine: the batching step loop (schedule -> forward -> sample -> update), single-threaded.

The server drives it from one engine thread: `add_request`, `abort`, and `step()` in a loop,
streaming each `TokenEvent` to the request's client. `LLM.generate` drives the same loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from spillover.config import ModelConfig
from spillover.engine.cuda_graphs import GraphSettings
from spillover.engine.memory import cache_sizes, memory_plan
from spillover.engine.outputs import EngineStats, QueueFullError, TokenEvent
from spillover.engine.params import SamplingParams
from spillover.engine.request import Request
from spillover.engine.runner import CacheLayout, ModelRunner
from spillover.engine.sampler import Sampler, prompt_logprobs
from spillover.engine.scheduler import RequestDelta, Scheduler, SchedulerConfig
from spillover.engine.step_sampler import sample_rows
from spillover.models.causal_lm import CausalLM
from spillover.plan.engine_cache import resolve_max_model_len
from spillover.plan.measure import PeakComparison, compare_peaks, measured_bytes_by_component
from spillover.plan.memory import KV_CACHE, LINEAR_STATE, MemoryPlan

__all__ = ["Engine", "EngineConfig", "EngineStats", "QueueFullError", "TokenEvent", "cache_sizes"]

log = logging.getLogger("spillover.engine")

# torch.Generator.manual_seed takes seeds in [-2**63, 2**64 - 1]; child i of an n > 1 request is
# seeded with seed + i.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Steps in a row that fail as a whole (not one request's fault) before the engine gives up.
MAX_FAILED_STEPS = 3

# Budget defaults (tokens per sequence, 1 GiB on the CPU, half the free GPU memory) live with the
# planner, which sizes the caches: spillover.plan.engine_cache.cache_plan_for_engine.


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derive from a memory budget
    kv_cache_memory_bytes: int | None = None
    num_state_slots: int | None = None
    max_prompt_checkpoints: int = 8
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's; resolve_max_model_len decides
    # add_request raises QueueFullError beyond this many waiting (not counting those that the
    # next step starts at once, into free max_num_seqs slots)
    max_queue_len: int = 1024
    # Decode steps replay CUDA graphs on CUDA unless enforce_eager; emulate_graphs runs their
    # padded, packed-input path eagerly on any device (CPU tests of that path).
    enforce_eager: bool = False
    emulate_graphs: bool = False


@dataclass
class _Tracked:
    """Engine-side state of one add_request call (all n completions)."""

    num_prompt_tokens: int
    n: int
    prompt_logprobs: list[dict[int, float] | None] | None
    num_open: int  # completions not finished yet
    sent_prompt_logprobs: bool = False


class Engine:
    def __init__(
        self,
        model: CausalLM,
        model_config: ModelConfig,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        config: EngineConfig,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = device
        # max_model_len resolved once: the caches, the scheduler and add_request read this value.
        config = replace(config,
                         max_model_len=resolve_max_model_len(model_config, config.max_model_len))
        self.config = config
        if device.type == "cuda":  # the peak compared with the plan after warm-up starts here
            torch.cuda.reset_peak_memory_stats(device)
        self.memory_plan: MemoryPlan = memory_plan(model_config, config, device, dtype, model)
        num_blocks, num_slots = self.memory_plan.num_kv_blocks, self.memory_plan.num_state_slots
        # planned vs measured, per device: filled after the first step that runs a forward
        self.memory_report: list[PeakComparison] | None = None
        hybrid = bool(model_config.linear_layers)
        graphs = None
        if not config.enforce_eager and (device.type == "cuda" or config.emulate_graphs):
            # no sequence holds more tokens than all the KV blocks (or than max_model_len)
            longest = min(config.max_model_len or 1, max(num_blocks, 1) * config.block_size)
            graphs = GraphSettings(config.max_num_seqs, longest,
                                   emulate=config.emulate_graphs or device.type != "cuda")
        self.runner = ModelRunner(
            model, CacheLayout(num_blocks, config.block_size, max(num_slots, 1)), device, dtype,
            graphs,
        )
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        sched_cfg = SchedulerConfig(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            hybrid=hybrid,
            num_state_slots=num_slots if hybrid else 0,
            enable_prefix_caching=config.enable_prefix_caching,
            max_prompt_checkpoints=(config.max_prompt_checkpoints
                                    if config.enable_prefix_caching else 0),
            eos_token_ids=self.eos_token_ids,
        )
        detokenize = (partial(tokenizer.decode, skip_special_tokens=True)
                      if tokenizer is not None else None)
        self.scheduler = Scheduler(sched_cfg, detokenize)
        self.max_model_len: int = self.scheduler.max_model_len
        self.sampler = Sampler()
        self._tracked: dict[str, _Tracked] = {}
        self._pending: list[TokenEvent] = []  # abort events, handed out by the next step()
        # caller id -> why it failed, for requests that step() ended with an error (the others
        # go on); handed out by take_failures()
        self._failed: dict[str, BaseException] = {}
        self._failures: dict[str, BaseException] = {}
        self._failed_steps = 0  # steps in a row that failed as a whole
        self._step_callers: set[str] | None = None  # caller ids of the step under way
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._computed_prompt_tokens = 0
        log.info("engine: %d KV blocks of %d tokens, %d state slots, max_model_len "
                 "%d, max_num_seqs %d",
                 num_blocks, config.block_size, num_slots, self.max_model_len, config.max_num_seqs)

    # ---- intake ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        if request_id in self._tracked:
            raise ValueError(f"duplicate request id {request_id!r}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds the model's context length of {self.max_model_len} tokens"
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        seed = params.seed
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX - (params.n - 1):
            raise ValueError(f"seed must lie in [{SEED_MIN}, {SEED_MAX - (params.n - 1)}]")
        # Requests that the next step starts into free slots do not wait: only the rest count.
        free = max(0, self.config.max_num_seqs - len(self.scheduler.running))
        queued = len(self.scheduler.waiting) - free
        if queued >= self.config.max_queue_len:
            raise QueueFullError(f"{queued} requests already waiting "
                                 f"(max_queue_len {self.config.max_queue_len})")
        if params.logits_processors:
            params = replace(params, logits_processors=[
                self._guarded(request_id, fn) for fn in params.logits_processors])
        req = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(req)
        self._tracked[request_id] = _Tracked(
            num_prompt_tokens=len(prompt_token_ids),
            n=params.n,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            num_open=params.n,
        )
        self._prompt_tokens += len(prompt_token_ids)

    def abort(self, request_id: str) -> None:
        """Frees the request's blocks and slots now; the next step() returns one final event
        (finish_reason "abort") per completion that was still open. Unknown ids: no-op."""
        self._tracked.pop(request_id, None)
        for req in self.scheduler.abort(request_id):
            # An n > 1 request aborted before its fork still owes all n completions an end.
            indexes = range(req.sampling_params.n) if req.is_fork_parent else [req.index]
            self._pending += [TokenEvent(
                request_id=request_id, index=i, new_token_ids=[], new_text="", logprobs=None,
                finished=True, finish_reason="abort", stop_reason=None,
                num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
            ) for i in indexes]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- the step ----------------------------------------------------------------------------
    def take_failures(self) -> dict[str, BaseException]:
        """Requests (caller ids) that steps since the last call ended with an error instead of
        events: they are aborted and their blocks freed; every other request goes on."""
        out, self._failures = self._failures, {}
        return out

    def _guarded(self, request_id: str, fn: Any) -> Any:
        """A logits processor whose exception fails its own request, not the step."""
        def run(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if request_id in self._failed:
                return logits
            try:
                return fn(output_ids, logits)
            except Exception as e:
                self._failed.setdefault(request_id, e)
                return logits
        return run

    def step(self) -> list[TokenEvent]:
        """One scheduling + forward + sampling step. A request whose own part of the step raises
        (its seed, its logits processor) is failed alone; an exception of the step as a whole fails
        the requests of that step; MAX_FAILED_STEPS such steps in a row re-raise."""
        events, self._pending = self._pending, []
        self._failed = {}
        self._step_callers = None
        try:
            events += self._step()
        except Exception as e:
            if self._step_callers is None:
                raise  # the scheduler itself failed: nothing to pin it on
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise
            log.exception("engine step failed; failing its %d requests", len(self._step_callers))
            for rid in self._step_callers:
                self._failed.setdefault(rid, e)
        else:
            self._failed_steps = 0
        if self._failed:
            for rid, exc in self._failed.items():
                log.warning("request %s failed: %s: %s", rid, type(exc).__name__, exc)
                self.abort(rid)
            events = [ev for ev in events if ev.request_id not in self._failed]
            self._pending = [ev for ev in self._pending if ev.request_id not in self._failed]
            self._failures.update(self._failed)
            self._failed = {}
        return events

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return events
        self._step_callers = {s.request.parent_id or s.request.request_id for s in plan.seqs}
        logits, inp = self.runner.execute(plan)
        if self.memory_report is None:
            self.memory_report = self._report_memory()
        for i, lo, hi in inp.prompt_logprob_spans:
            seq = plan.seqs[i]
            req = seq.request
            track = self._tracked.get(req.parent_id or req.request_id)
            k = req.sampling_params.prompt_logprobs
            if track is None or track.prompt_logprobs is None or k is None:
                continue
            nxt = [req.prompt_token_ids[p + 1] for p in seq.prompt_logprob_positions]
            track.prompt_logprobs.extend(prompt_logprobs(logits[lo:hi], nxt, k))
        sampled: dict[str, int] = {}
        token_logprobs: dict[str, dict[int, float] | None] = {}
        seqs = plan.sample_seqs
        # A row whose own RNG cannot be made fails its request alone; its row gets a dummy token.
        ok = [j for j, s in enumerate(seqs) if self._row_ok(s.request, logits.device)]
        for j in sorted(set(range(len(seqs))) - set(ok)):
            sampled[seqs[j].request_id] = self.eos_token_ids[0] if self.eos_token_ids else 0
            token_logprobs[seqs[j].request_id] = None
        if ok:
            rows_idx = [inp.sample_rows[j] for j in ok]
            rows = logits
            if rows_idx != list(range(logits.shape[0])):
                rows = logits.index_select(0, torch.tensor(rows_idx, device=logits.device))
            good = [seqs[j] for j in ok]
            out = sample_rows(self.sampler, rows, [s.request for s in good])
            for s, tok, lp in zip(good, out.token_ids, out.logprobs, strict=True):
                sampled[s.request_id] = tok
                token_logprobs[s.request_id] = lp
        for seq in plan.seqs:
            prompt_end = min(seq.end, seq.request.num_prompt_tokens)
            self._computed_prompt_tokens += max(0, prompt_end - seq.start)
        # The Request objects, since update() retires finished ones from the scheduler's table.
        requests = {s.request_id: s.request for s in plan.seqs}
        for delta in self.scheduler.update(plan, sampled):
            self._generated_tokens += len(delta.new_token_ids)
            lp = token_logprobs.get(delta.request_id)
            events.append(self._event(delta, requests[delta.request_id], lp))
        return events

    def _row_ok(self, req: Request, device: torch.device) -> bool:
        caller = req.parent_id or req.request_id
        if caller in self._failed:
            return False
        try:
            req.generator(device)
        except Exception as e:
            self._failed[caller] = e
            return False
        return True

    def _event(self, delta: RequestDelta, req: Request, lp: dict[int, float] | None) -> TokenEvent:
        caller_id = delta.parent_id or delta.request_id
        track = self._tracked.get(caller_id)
        event = TokenEvent(
            request_id=caller_id,
            index=delta.index,
            new_token_ids=delta.new_token_ids,
            new_text=delta.new_text,
            logprobs=[lp] if lp is not None else None,
            finished=delta.finished,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
            num_prompt_tokens=track.num_prompt_tokens if track else 0,
            num_cached_tokens=req.num_cached_tokens,
        )
        if track is None:
            return event
        if delta.index == 0 and not track.sent_prompt_logprobs:
            track.sent_prompt_logprobs = True
            event.prompt_logprobs = track.prompt_logprobs
        if delta.finished:
            track.num_open -= 1
            if track.num_open <= 0:
                del self._tracked[caller_id]
        return event

    # ---- introspection -----------------------------------------------------------------------
    def _report_memory(self) -> list[PeakComparison]:
        """Planned vs measured after warm-up, logged: the cache tensors as allocated against the
        plan's KV + state entries, and on CUDA torch's peak against the plan's GPU total."""
        plan = self.memory_plan
        tier = "gpu" if self.device.type == "cuda" else "host"
        caches = measured_bytes_by_component([], self.runner.kv_caches, self.runner.state_caches)
        planned = plan.tiers.get(tier, {})
        rows = [PeakComparison(
            f"{tier} caches",
            planned.get(KV_CACHE, 0) + planned.get(LINEAR_STATE, 0),
            sum(caches.get(tier, {}).values()),
        )]
        if self.device.type == "cuda":
            rows += compare_peaks(plan, {"gpu": torch.cuda.max_memory_allocated(self.device)})
        for row in rows:
            log.info("memory after warm-up, planned vs measured: %s", row.line())
        return rows

    def stats(self) -> EngineStats:
        s = self.scheduler
        bm = s.block_manager
        prefix = s.prompt_cache.stats if s.config.hybrid else bm.stats
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_usage=1.0 - bm.num_free_blocks / bm.num_blocks,
            prefix_queries_tokens=prefix.queries,
            prefix_hit_tokens=prefix.hits,
            num_preemptions=s.num_preemptions,
            state_slots_total=s.state_slots.num_slots,
            state_slots_free=s.state_slots.num_free,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generated_tokens,
            computed_prompt_tokens_total=self._computed_prompt_tokens,
        )
