"""Sampling one step's rows: the Sampler plus per-request logits processors, one host transfer.

`Sampler` applies logit_bias, penalties, greedy argmax and the random draw in one call; logits
processors (constrained decoding) must run after bias / penalties and before argmax or
temperature. When a batch has any, the bias and penalties are applied here first, the processors
run, and the Sampler gets the result with those parameters neutralised. Logprobs stay those of
the raw model logits in both cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from spillover.engine.request import Request
from spillover.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    apply_bias_and_bans,
    apply_penalties,
)


@dataclass
class SampledRows:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # None where the request asked for no logprobs


def sample_rows(sampler: Sampler, logits: torch.Tensor, requests: Sequence[Request]) -> SampledRows:
    """logits [B, V] float32, one row per request (aligned) -> one token per row."""
    batch = SamplingBatch.from_requests(requests, logits.device)
    if any(r.sampling_params.logits_processors for r in requests):
        out = _sample_with_processors(sampler, logits, batch, requests)
    else:
        out = sampler(logits, batch)
    if all(k is None for k in batch.num_logprobs):
        # The step's only host sync: greedy rows never leave the device before this.
        return SampledRows(out.token_ids.tolist(), [None] * len(batch))
    lps = out.logprob_dicts(batch.num_logprobs)
    return SampledRows(out.token_ids.tolist(), lps)


def _sample_with_processors(
    sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch, requests: Sequence[Request]
) -> SamplerOutput:
    raw = logits.float()
    x = apply_bias_and_bans(raw, batch.logit_bias, batch.banned_token_ids)
    x = apply_penalties(x, batch.prompt_token_ids, batch.output_token_ids, batch.presence_penalty,
                        batch.frequency_penalty, batch.repetition_penalty)
    x = x.clone() if x is raw else x
    for i, req in enumerate(requests):
        for fn in req.sampling_params.logits_processors:
            x[i] = fn(list(req.output_token_ids), x[i])
    b = len(batch)
    neutral = replace(
        batch, logit_bias=[{}] * b, banned_token_ids=[[]] * b, presence_penalty=[0.0] * b,
        frequency_penalty=[0.0] * b, repetition_penalty=[1.0] * b, num_logprobs=[None] * b,
    )
    out = sampler(x, neutral)
    want = [k for k in batch.num_logprobs if k is not None]
    if want:
        lps = torch.log_softmax(raw, dim=-1)
        out.sampled_logprobs = lps.gather(1, out.token_ids[:, None]).squeeze(1)
        out.top_logprobs, out.top_token_ids = lps.topk(max(want), dim=-1)
    return out
