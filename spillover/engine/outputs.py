"""What the Engine hands out: streaming token events, statistics, and its admission error."""

from __future__ import annotations

from dataclasses import dataclass


class QueueFullError(RuntimeError):
    """add_request refused: the waiting queue already holds EngineConfig.max_queue_len requests
    (the server answers 503 / 429 and the client retries)."""


@dataclass
class TokenEvent:
    request_id: str  # the id given to add_request (for n > 1: that parent id)
    index: int  # completion index 0..n-1
    new_token_ids: list[int]  # as sampled; eos included (it is a generated token)
    new_text: str  # detokenized delta (stop strings held back / cut; eos and stop ids excluded)
    logprobs: list[dict[int, float]] | None  # one dict per new token: chosen token + top_logprobs
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: str | int | None  # the stop string or stop token id; None for eos / length
    # first event of index 0 only; leading None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from prefix cache / prompt checkpoint


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int  # includes unreferenced blocks still kept for prefix reuse
    kv_usage: float  # 0..1, blocks referenced by requests or prompt checkpoints
    prefix_queries_tokens: int  # prompt tokens looked up in the prefix cache / prompt checkpoints
    prefix_hit_tokens: int  # of which served from it
    num_preemptions: int
    state_slots_total: int
    state_slots_free: int
    prompt_tokens_total: int  # prompt tokens of every request added
    generation_tokens_total: int  # tokens sampled
    computed_prompt_tokens_total: int  # prompt tokens run through the model (recomputes included)
