"""Request: one sequence the engine computes, and its bookkeeping (no tensors).

The scheduler knows one number per request: tokens still to compute (`num_tokens_to_compute`).
Prefill, chunked prefill, a prefix-cache hit, a restored prompt checkpoint, decode and
recomputation after preemption are all "advance `num_computed_tokens` towards `compute_target`".

`n > 1`: the request the caller adds is a *parent* whose target stops one token short of its
prompt; it never samples. Once that prefix is computed the scheduler forks it into `n` children
(`fork(i)`): each shares the parent's full KV blocks (ref counts), gets a copy of the partly filled
last block and of the linear-attention state slot, and computes the last prompt token itself, so
every child samples its first token from its own logits row with its own generator.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from spillover.engine.params import SamplingParams
from spillover.engine.stop import IncrementalText

if TYPE_CHECKING:
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; will recompute
    FINISHED_STOPPED = "stop"  # eos, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's / cache's length limit
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        """OpenAI finish_reason ("stop" | "length" | "abort"), None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: tuple[int, ...] = ()  # set by the scheduler from its config if left empty
    # children of an n > 1 request point to the request the caller added
    parent_id: str | None = None
    index: int = 0  # completion index within the parent (CompletionOutput.index)

    # --- state owned by the scheduler -----------------------------------------------------------
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV / state is in the cache
    block_table: list[int] = field(default_factory=list)  # KV block ids, in token order
    state_slot: int | None = None  # linear-attention state slot (hybrid models)
    num_cached_tokens: int = 0  # prompt tokens served from a cache at first admission
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_preemptions: int = 0
    # Chained hashes of the full blocks of all_token_ids, grown lazily (tokens only ever append,
    # so they stay valid across preemption). Filled by BlockManager.
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0  # leading blocks of block_table published to the prefix cache
    # prompt positions already scored (not redone after preemption)
    num_prompt_logprobs_done: int = 0
    text: IncrementalText | None = None  # set by the scheduler when it has a detokenizer
    _generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: empty prompt")

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole history (decode is 1 token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_fork_parent(self) -> bool:
        return self.sampling_params.n > 1

    @property
    def compute_target(self) -> int:
        """Tokens this request wants in the cache: all of them, except that a fork parent stops
        one short of its prompt so that each child computes (and samples from) the last token."""
        if self.is_fork_parent:
            return self.num_prompt_tokens - 1
        return self.num_tokens

    @property
    def num_tokens_to_compute(self) -> int:
        return self.compute_target - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    # --- n > 1 -----------------------------------------------------------------------------------
    def fork(self, index: int) -> Request:
        """Child `index` of this parent, with no cache state yet (the scheduler assigns it).

        A seeded parent gives child i the seed `seed + i` so children differ yet stay
        reproducible; prompt logprobs are the parent's business (it computed the prompt).
        """
        params = self.sampling_params
        child_params = replace(
            params,
            n=1,
            seed=None if params.seed is None else params.seed + index,
            prompt_logprobs=None,
        )
        return Request(
            request_id=f"{self.request_id}#{index}",
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=child_params,
            arrival_time=self.arrival_time,
            eos_token_ids=self.eos_token_ids,
            parent_id=self.request_id,
            index=index,
        )

    # --- sampling randomness ---------------------------------------------------------------------
    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The request's own RNG when it has a seed (None otherwise), created on first use.

        It lives as long as the request, across preemption: tokens already sampled are kept, so
        continuing the same stream after a recompute gives the same text as without preemption.
        """
        seed = self.sampling_params.seed
        if seed is None:
            return None
        if self._generator is None:
            import torch  # local: this module is bookkeeping and must import without torch work

            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)
        return self._generator
