"""Scheduler: which requests compute how many tokens in the next step (pure Python, no tensors).

One rule: each request has tokens still to compute (`Request.num_tokens_to_compute`). Each step
hands out at most `max_num_batched_tokens` of them over at most `max_num_seqs` requests, running
requests first (in admission order), then waiting ones (FCFS). A long prompt simply takes several
steps (chunked prefill) while decodes of other requests ride in the same batch.

When KV blocks run out, the most recently admitted running request is preempted: its blocks and
state slot are freed and it goes back to the front of the waiting queue to be recomputed later
(prompt + the tokens it already produced). Nothing is lost; the only cost is recomputation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from spillover.engine.batch import BlockCopy, ScheduledSeq, SlotCopy, StepPlan
from spillover.engine.kv_cache import BlockManager
from spillover.engine.request import Request, RequestStatus
from spillover.engine.state_cache import PromptStateCache, StateSlotPool
from spillover.engine.stop import Decode, IncrementalText


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks (full-attention layers); from the MemoryPlan
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    max_num_seqs: int = 64  # running requests at most
    max_model_len: int | None = None  # None: limited by the cache only
    hybrid: bool = False  # model has linear-attention layers (state slots, no block-hash reuse)
    num_state_slots: int = 0  # hybrid: slots for running requests and prompt checkpoints
    enable_prefix_caching: bool = True  # block-hash prefix caching (attention-only models)
    max_prompt_checkpoints: int = 0  # hybrid prompt reuse: checkpoints kept (each holds a slot)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.hybrid and self.num_state_slots < 1:
            raise ValueError("a hybrid model needs num_state_slots >= 1")


@dataclass
class RequestDelta:
    """What one request produced in one step: the unit of streaming."""

    request_id: str
    new_token_ids: list[int]
    new_text: str = ""  # empty without a detokenizer; holds back a possible stop-string prefix
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string / stop token id, None for eos
    parent_id: str | None = None  # n > 1: the request id the caller added
    index: int = 0  # n > 1: CompletionOutput.index


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0
    num_forks: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count


class Scheduler:
    def __init__(self, config: SchedulerConfig, detokenize: Decode | None = None) -> None:
        self.config = config
        self.detokenize = detokenize
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching and not config.hybrid
        )
        self.state_slots = StateSlotPool(config.num_state_slots if config.hybrid else 0)
        self.prompt_cache = PromptStateCache(
            self.state_slots, self.block_manager,
            config.max_prompt_checkpoints if config.hybrid else 0
        )
        cache_tokens = config.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or cache_tokens, cache_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._requests: dict[str, Request] = {}  # live requests by id (fork parents until forked)
        self._children: dict[str, list[str]] = {}  # fork parent id -> live child ids
        self._left_ids: list[str] = []  # for StepPlan.finished_request_ids

    # --- intake and cancellation -----------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queues `req`. Raises ValueError for what can never run (the server answers 400)."""
        if req.request_id in self._requests or req.request_id in self._children:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {req.num_prompt_tokens} tokens exceeds the limit of "
                f"{self.max_model_len}"
            )
        if req.sampling_params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer (Scheduler(detokenize=...))")
        if req.is_fork_parent and req.num_prompt_tokens == 1:
            # Nothing to share: the children start from scratch.
            self._children[req.request_id] = []
            for i in range(req.sampling_params.n):
                child = req.fork(i)
                self._register(child)
                self.waiting.append(child)
            return
        self._register(req)
        self.waiting.append(req)

    def abort(self, request_id: str) -> list[Request]:
        """Aborts a request (or all children of an n > 1 request); frees its blocks and slot at
        once. Returns the requests aborted (empty when unknown or already finished)."""
        ids = list(self._children.get(request_id, []))
        if request_id in self._requests:
            ids.append(request_id)
        aborted = []
        for rid in ids:
            req = self._requests[rid]
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def num_preemptions(self) -> int:
        return self.stats.num_preemptions

    # --- one step --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(seqs=[], block_size=self.config.block_size)
        self._fork_ready_parents(plan)
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_to_compute, budget)
            if n <= 0:
                i += 1
                continue
            if not self._allocate_or_preempt(req, n, plan):
                break  # req itself was preempted: nothing behind it is left to schedule
            plan.seqs.append(self._scheduled(req, n))
            budget -= n
            i += 1
        # Admitting new work right after preempting would only preempt it again next step.
        if plan.num_preempted == 0:
            self._admit_waiting(plan, budget)
        plan.finished_request_ids, self._left_ids = self._left_ids, []
        self.stats.num_steps += 1
        return plan

    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[RequestDelta]:
        """Applies a step's results: advances computed tokens, appends the sampled token of every
        seq with `sample`, applies stop rules and frees what finished. `sampled` maps request id
        to token id for each of plan.sample_seqs."""
        deltas = []
        for seq in plan.seqs:
            req = seq.request
            # Aborted (or aborted and re-added) between schedule() and update(): drop the result.
            if req.status != RequestStatus.RUNNING or req.num_computed_tokens != seq.start:
                continue
            req.num_computed_tokens += seq.num_new_tokens
            if seq.prompt_logprob_positions:
                req.num_prompt_logprobs_done = seq.prompt_logprob_positions.stop
            self.block_manager.commit_full_blocks(req)
            if seq.sample:
                deltas.append(self._append_token(req, sampled[req.request_id]))
        return deltas

    # --- scheduling helpers ----------------------------------------------------------------------
    def _scheduled(self, req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        lp_positions = range(0)
        if req.sampling_params.prompt_logprobs is not None:
            # position i scores prompt token i + 1; skip what a pre-preemption run already emitted
            lo = max(start, req.num_prompt_logprobs_done)
            lp_positions = range(lo, max(lo, min(start + n, req.num_prompt_tokens - 1)))
        return ScheduledSeq(
            request=req,
            start=start,
            num_new_tokens=n,
            block_table=list(req.block_table),
            state_slot=req.state_slot,
            sample=start + n == req.num_tokens,
            prompt_logprob_positions=lp_positions,
        )

    def _allocate_or_preempt(self, req: Request, n: int, plan: StepPlan) -> bool:
        while not self._allocate(req, n):
            victim = self.running[-1]
            self._preempt(victim)
            plan.num_preempted += 1
            if victim is req:
                return False
        return True

    def _allocate(self, req: Request, n: int, cached: list[int] | None = None) -> bool:
        """Blocks for n more tokens, evicting prompt checkpoints (hybrid) before giving up."""
        while not self.block_manager.allocate(req, n, cached or ()):
            if not self.prompt_cache.evict_lru():
                return False
        return True

    def _allocate_slot(self) -> int | None:
        slot = self.state_slots.allocate()
        while slot is None and self.prompt_cache.evict_lru():
            slot = self.state_slots.allocate()
        return slot

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            block_copies: list[BlockCopy] = []
            slot_copies: list[SlotCopy] = []
            hit = self._start_fresh(req, block_copies, slot_copies)
            if hit is None:
                break
            n = min(req.num_tokens_to_compute, budget)
            if not self._allocate(req, n):
                self._release_resources(req)  # undo the cache hit and slot; stay first in line
                break
            self._record_hit(req, hit)
            plan.block_copies += block_copies
            plan.slot_copies += slot_copies
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.seqs.append(self._scheduled(req, n))
            budget -= n

    def _start_fresh(
        self, req: Request, block_copies: list[BlockCopy], slot_copies: list[SlotCopy]
    ) -> int | None:
        """Takes a prefix-cache hit (attention-only) or restores a prompt checkpoint / takes a
        fresh state slot (hybrid) for a request about to be admitted, appending the copies that
        must run before the step. Returns the tokens hit, None when resources are short."""
        # The last token must be computed to get logits, so a hit stops one token short.
        max_hit = req.compute_target - 1
        reuse = req.sampling_params.prompt_logprobs is None  # prompt logprobs need every position
        if not self.config.hybrid:
            cached = self.block_manager.match_prefix(req, max_hit) if reuse else []
            if not self._allocate(req, 0, cached):
                return None
            return len(cached) * self.config.block_size
        if reuse and self.prompt_cache.enabled:
            hit = self.prompt_cache.lookup(req.all_token_ids, max_hit)
            restored = self.prompt_cache.restore(req, hit[0]) if hit is not None else None
            if restored is not None:
                if restored.block_copy is not None:
                    block_copies.append(restored.block_copy)
                slot_copies.append(restored.slot_copy)
                return restored.num_tokens
        slot = self._allocate_slot()
        if slot is None:
            return None
        req.state_slot = slot
        return 0

    def _record_hit(self, req: Request, num_tokens: int) -> None:
        stats = self.prompt_cache.stats if self.config.hybrid else self.block_manager.stats
        stats.queries += req.compute_target
        stats.hits += num_tokens
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_tokens

    # --- n > 1 -----------------------------------------------------------------------------------
    def _fork_ready_parents(self, plan: StepPlan) -> None:
        for parent in [r for r in self.running
                       if r.is_fork_parent and r.num_tokens_to_compute == 0]:
            pos = self.running.index(parent)
            children = [parent.fork(i) for i in range(parent.sampling_params.n)]
            # Child 0 takes over the parent's blocks and slot as they are.
            first = children[0]
            first.block_table, first.state_slot = parent.block_table, parent.state_slot
            first.num_computed_tokens = parent.num_computed_tokens
            first.num_committed_blocks = parent.num_committed_blocks
            first.block_hashes = list(parent.block_hashes)
            first.num_cached_tokens = parent.num_cached_tokens
            first.status = RequestStatus.RUNNING
            parent.block_table, parent.state_slot = [], None
            room = self.config.max_num_seqs - len(self.running) + 1
            forked, queued = [first], []
            for child in children[1:]:
                if len(forked) < room and self._fork_child(first, child, plan):
                    forked.append(child)
                else:
                    queued.append(child)  # computes its prompt itself later
            self._retire(parent)
            self._children[parent.request_id] = []
            for child in children:
                self._register(child)
            self.running[pos : pos + 1] = forked
            self.waiting.extendleft(reversed(queued))
            self.stats.num_forks += 1

    def _fork_child(self, source: Request, child: Request, plan: StepPlan) -> bool:
        n = source.num_computed_tokens
        if not self.block_manager.can_adopt(n):
            return False
        if self.config.hybrid:
            slot = self._allocate_slot()
            if slot is None:
                return False
            assert source.state_slot is not None
            plan.slot_copies.append(SlotCopy(src=source.state_slot, dst=slot))
            child.state_slot = slot
        copy = self.block_manager.adopt(child, source.block_table, n, source.num_committed_blocks)
        if copy is not None:
            plan.block_copies.append(copy)
        child.block_hashes = list(source.block_hashes)
        child.num_cached_tokens = source.num_cached_tokens
        child.status = RequestStatus.RUNNING
        return True

    # --- lifecycle -------------------------------------------------------------------------------
    def _register(self, req: Request) -> None:
        if not req.eos_token_ids:
            req.eos_token_ids = self.config.eos_token_ids
        if self.detokenize is not None and req.text is None and not req.is_fork_parent:
            req.text = IncrementalText(self.detokenize, req.sampling_params.stop,
                                       req.prompt_token_ids[-8:])
        self._requests[req.request_id] = req
        if req.parent_id is not None:
            self._children.setdefault(req.parent_id, []).append(req.request_id)

    def _append_token(self, req: Request, token: int) -> RequestDelta:
        sp = req.sampling_params
        req.output_token_ids.append(token)
        n_out = req.num_output_tokens
        checks = n_out > sp.min_tokens
        status: RequestStatus | None = None
        if checks and not sp.ignore_eos and token in req.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif checks and token in sp.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif req.text is not None:
            # eos / stop ids are not part of the text; everything else is, up to a stop string.
            stop = req.text.append(token, check_stop=checks)
            if stop is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if status is None and (n_out >= sp.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        finished = status is not None
        delta = RequestDelta(
            request_id=req.request_id,
            new_token_ids=[token],
            new_text=req.text.take_delta(finished) if req.text is not None else "",
            finished=finished,
            finish_reason=status.finish_reason if status is not None else None,
            stop_reason=req.stop_reason,
            parent_id=req.parent_id,
            index=req.index,
        )
        if status is not None:
            self._finish(req, status)
        return delta

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_resources(req)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)
        self._left_ids.append(req.request_id)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        # A finished (not aborted) hybrid request leaves a checkpoint for the next chat turn.
        kept = status != RequestStatus.FINISHED_ABORTED and self.prompt_cache.store(req)
        if not kept:
            self._release_resources(req)
        self.stats.finished[status.value] = self.stats.finished.get(status.value, 0) + 1
        self._retire(req)

    def _retire(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._left_ids.append(req.request_id)
        if req.parent_id is not None and req.parent_id in self._children:
            siblings = self._children[req.parent_id]
            if req.request_id in siblings:
                siblings.remove(req.request_id)
            if not siblings:
                del self._children[req.parent_id]

    def _release_resources(self, req: Request) -> None:
        self.block_manager.free(req)
        if req.state_slot is not None:
            self.state_slots.free(req.state_slot)
            req.state_slot = None
        req.num_computed_tokens = 0
