"""Sampler: logits [B, V] -> one token per row, with per-row parameters.

Order of operations (as vLLM's, so results and logprobs read the same):
1. raw logprobs (log-softmax of the model's logits) if any row asks for logprobs;
2. logit_bias, then min_tokens (eos and stop ids banned until enough tokens are out);
3. repetition (prompt + output), frequency and presence (output) penalties;
4. greedy rows: argmax here;
5. temperature, min_p, top_k, top_p; sample with the exponential-race trick
   (argmax(p / q), q ~ Exp(1)), which needs no cumulative sums and no host sync.

Which steps run is decided from the Python-side parameters, so a batch of plain greedy rows is one
argmax on the device. A row with a seed draws its noise from its own generator, so its text does
not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spillover.engine.request import Request

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, one entry per row of the logits."""

    temperature: list[float]
    top_p: list[float]
    top_k: list[int]  # 0: disabled
    min_p: list[float]
    presence_penalty: list[float]
    frequency_penalty: list[float]
    repetition_penalty: list[float]
    logit_bias: list[dict[int, float]]
    generators: list[torch.Generator | None]  # seeded rows
    prompt_token_ids: list[Sequence[int]]
    output_token_ids: list[Sequence[int]]
    banned_token_ids: list[Sequence[int]]  # min_tokens not reached yet: eos + stop ids
    greedy: list[bool]
    num_logprobs: list[int | None]

    @classmethod
    def from_requests(cls, requests: Sequence[Request],
                      device: torch.device | str = "cpu") -> SamplingBatch:
        b = cls([], [], [], [], [], [], [], [], [], [], [], [], [], [])
        for r in requests:
            sp = r.sampling_params
            b.temperature.append(sp.temperature)
            b.top_p.append(sp.top_p)
            b.top_k.append(sp.top_k)
            b.min_p.append(sp.min_p)
            b.presence_penalty.append(sp.presence_penalty)
            b.frequency_penalty.append(sp.frequency_penalty)
            b.repetition_penalty.append(sp.repetition_penalty)
            b.logit_bias.append(sp.logit_bias)
            b.generators.append(r.generator(device))
            b.prompt_token_ids.append(r.prompt_token_ids)
            b.output_token_ids.append(r.output_token_ids)
            banned: list[int] = []
            if r.num_output_tokens < sp.min_tokens:
                banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(r.eos_token_ids))
            b.banned_token_ids.append(banned)
            b.greedy.append(sp.greedy)
            b.num_logprobs.append(sp.logprobs)
        return b

    def __len__(self) -> int:
        return len(self.temperature)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    sampled_logprobs: torch.Tensor | None = None  # [B] raw logprob of the sampled token
    top_token_ids: torch.Tensor | None = None  # [B, K] K = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None = None  # [B, K]

    def logprob_dicts(self, num_logprobs: Sequence[int | None]) -> list[dict[int, float] | None]:
        """Per row: {sampled token and its top-k alternatives: logprob}, None where not asked.
        One host transfer for the whole batch."""
        if self.sampled_logprobs is None:
            return [None] * len(num_logprobs)
        assert self.top_token_ids is not None and self.top_logprobs is not None
        ids, lps = self.token_ids.tolist(), self.sampled_logprobs.tolist()
        top_ids, top_lps = self.top_token_ids.tolist(), self.top_logprobs.tolist()
        out: list[dict[int, float] | None] = []
        for i, k in enumerate(num_logprobs):
            if k is None:
                out.append(None)
                continue
            d = {ids[i]: lps[i]}
            for t, lp in zip(top_ids[i][:k], top_lps[i][:k], strict=True):
                d.setdefault(t, lp)
            out.append(d)
        return out


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(batch), "one logits row per batch row"
        logits = logits.float()
        out = SamplerOutput(token_ids=torch.empty(0))
        want = [k for k in batch.num_logprobs if k is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want else None

        logits = apply_bias_and_bans(logits, batch.logit_bias, batch.banned_token_ids)
        logits = apply_penalties(
            logits,
            batch.prompt_token_ids,
            batch.output_token_ids,
            batch.presence_penalty,
            batch.frequency_penalty,
            batch.repetition_penalty,
        )
        greedy_ids = logits.argmax(dim=-1)
        if all(batch.greedy):
            out.token_ids = greedy_ids
        else:
            sampled = self._sample(logits, batch)
            greedy_mask = torch.tensor(batch.greedy, device=logits.device)
            out.token_ids = torch.where(greedy_mask, greedy_ids, sampled)

        if raw_logprobs is not None:
            out.sampled_logprobs = raw_logprobs.gather(1, out.token_ids[:, None]).squeeze(1)
            k = max(want)
            if k > 0:
                out.top_logprobs, out.top_token_ids = raw_logprobs.topk(k, dim=-1)
            else:
                out.top_logprobs = raw_logprobs.new_empty(len(batch), 0)
                out.top_token_ids = out.token_ids.new_empty(len(batch), 0)
        return out

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        dev = logits.device
        # Greedy rows ride along with temperature 1 and are overwritten by the caller.
        temps = [1.0 if g else t for g, t in zip(batch.greedy, batch.temperature, strict=True)]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, device=dev)[:, None]
        if any(m > 0 for m in batch.min_p):
            logits = apply_min_p(logits, torch.tensor(batch.min_p, device=dev))
        if any(k > 0 for k in batch.top_k) or any(p < 1.0 for p in batch.top_p):
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        return race_sample(probs, batch.generators)


def race_sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exp(1) per entry: distributed as a categorical draw from probs.
    Seeded rows draw q from their own generator; the others share the global RNG."""
    q = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        q.exponential_()
    for i in seeded:
        q[i].exponential_(generator=generators[i])
    # Exp(1) can return exactly 0; a zero would make a banned (p = 0) token win with 0/0 = nan.
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def apply_bias_and_bans(
    logits: torch.Tensor, logit_bias: Sequence[dict[int, float]], banned: Sequence[Sequence[int]]
) -> torch.Tensor:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, bias in enumerate(logit_bias):
        for t, v in bias.items():
            rows.append(i)
            cols.append(t)
            vals.append(v)
    ban_rows = [i for i, ids in enumerate(banned) for _ in ids]
    ban_cols = [t for ids in banned for t in ids]
    if not rows and not ban_rows:
        return logits
    logits = logits.clone()
    dev = logits.device
    if rows:
        r, c = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        logits.index_put_((r, c), torch.tensor(vals, device=dev), accumulate=True)
    if ban_rows:
        logits[torch.tensor(ban_rows, device=dev), torch.tensor(ban_cols, device=dev)] = _NEG_INF
    return logits


def token_counts(
    token_ids: Sequence[Sequence[int]], rows: list[int], vocab: int, device: torch.device
) -> torch.Tensor:
    """[len(rows), vocab] occurrence counts of the listed rows' tokens."""
    width = max((len(token_ids[i]) for i in rows), default=0)
    # Pad with an extra column `vocab` that is dropped afterwards.
    padded = torch.full((len(rows), width), vocab, dtype=torch.long)
    for j, i in enumerate(rows):
        ids = token_ids[i]
        if ids:
            padded[j, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
    repetition: Sequence[float],
) -> torch.Tensor:
    """repetition: divides positive / multiplies negative logits of tokens seen in prompt or
    output; frequency: subtracts count-in-output times the penalty; presence: subtracts the
    penalty once for each token present in the output."""
    rows = [
        i for i in range(logits.shape[0]) if repetition[i] != 1.0 or frequency[i] != 0.0
        or presence[i] != 0.0
    ]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    idx = torch.tensor(rows, device=dev)
    sub = logits[idx]
    out_counts = token_counts(output_token_ids, rows, vocab, dev)
    rep = torch.tensor([repetition[i] for i in rows], device=dev)[:, None]
    if any(repetition[i] != 1.0 for i in rows):
        seen = (token_counts(prompt_token_ids, rows, vocab, dev) > 0) | (out_counts > 0)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    freq = torch.tensor([frequency[i] for i in rows], device=dev)[:, None]
    pres = torch.tensor([presence[i] for i in rows], device=dev)[:, None]
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    logits = logits.clone()
    logits[idx] = sub
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times the most likely token's."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int],
                      top_p: Sequence[float]) -> torch.Tensor:
    """Keeps each row's top_k tokens (0: all), then the smallest set of them whose probability
    (renormalised over the survivors) reaches top_p. The most likely token always survives."""
    dev, vocab = logits.device, logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k], device=dev)[:, None]
    drop = ranks >= k
    if any(p < 1.0 for p in top_p):
        probs = torch.softmax(sorted_logits.masked_fill(drop, _NEG_INF), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_p, device=dev)[:, None]
        drop |= (mass_before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int],
                    num: int) -> list[dict[int, float]]:
    """Prompt logprobs from the logits of consecutive prompt positions: row i scores
    `next_token_ids[i]` (the prompt token after that position). Each dict holds that token's
    logprob and the `num` most likely tokens'."""
    assert logits.shape[0] == len(next_token_ids)
    if not next_token_ids:
        return []
    lps = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(list(next_token_ids), device=lps.device)
    chosen = lps.gather(1, targets[:, None]).squeeze(1).tolist()
    top_lps, top_ids = lps.topk(num, dim=-1) if num > 0 else (lps[:, :0], targets[:, None][:, :0])
    out = []
    for t, lp, ids, vals in zip(next_token_ids, chosen, top_ids.tolist(), top_lps.tolist(),
                                strict=True):
        d = {t: lp}
        for tid, v in zip(ids, vals, strict=True):
            d.setdefault(tid, v)
        out.append(d)
    return out
