"""StepPlan: the scheduler -> runner contract for one forward pass (plain Python, no tensors).

The runner consumes a plan in this order:
1. perform `block_copies` (every full-attention layer, K and V) and `slot_copies` (every linear-
   attention layer, conv and recurrent state), in list order, before the forward;
2. `plan.build_inputs()` gives the flat varlen lists it turns into tensors and a ForwardContext;
3. run the model, compute logits only at `inputs.logits_indices`;
4. sample the rows `inputs.sample_rows` (aligned with `plan.sample_seqs`), compute prompt logprobs
   for `inputs.prompt_logprob_spans`, and hand `{request_id: token}` to `Scheduler.update`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spillover.engine.params import SamplingParams
from spillover.engine.request import Request


@dataclass(frozen=True)
class BlockCopy:
    """Copy KV block `src` into block `dst` (all full-attention layers) before the step."""

    src: int
    dst: int


@dataclass(frozen=True)
class SlotCopy:
    """Copy linear-attention state slot `src` into `dst` (conv + recurrent, all linear layers)."""

    src: int
    dst: int


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # tokens already in the cache (positions of the new tokens start here)
    num_new_tokens: int  # query length this step: a prefill chunk or 1 decode token
    block_table: list[int]  # snapshot covering start + num_new_tokens tokens
    state_slot: int | None  # hybrid models; a seq with start == 0 starts from a zero state
    # True when the chunk reaches the end of the known tokens: its last row is sampled. A prefill
    # chunk that stops inside the prompt (or a fork parent) needs no logits at all.
    sample: bool
    # Positions whose logits give prompt logprobs (position i scores prompt token i + 1).
    prompt_logprob_positions: range = range(0)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def context_len(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids_slice(self.start, self.end)


@dataclass
class FlatInputs:
    """Flat varlen batch of T new tokens for N sequences, as Python lists."""

    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    query_lens: list[int]  # [N]
    context_lens: list[int]  # [N]
    slot_mapping: list[int]  # [T] flat KV slot = block_id * block_size + offset
    # [N][context_len] flat slots of each seq's context (empty if not asked)
    kv_indices: list[list[int]]
    block_tables: list[list[int]]  # [N] ragged; the runner pads with -1 for GPU kernels
    state_slots: list[int]  # [N], -1 for sequences without one
    logits_indices: list[int]  # rows of the hidden state that need logits
    sample_rows: list[int]  # per sampled seq (plan.sample_seqs order): its row in logits_indices
    # (seq index in plan.seqs, lo, hi): rows [lo, hi) of logits_indices hold its prompt logits
    prompt_logprob_spans: list[tuple[int, int, int]]


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq]  # scheduled order; running requests first, then new admissions
    block_size: int
    block_copies: list[BlockCopy] = field(default_factory=list)
    slot_copies: list[SlotCopy] = field(default_factory=list)
    # Requests that left the engine (finished, aborted, preempted) since the previous plan, so a
    # runner with per-request caches (persistent batch, CUDA graph inputs) can drop them.
    finished_request_ids: list[str] = field(default_factory=list)
    num_preempted: int = 0  # preemptions made while building this plan

    @classmethod
    def one_sequence(
        cls,
        token_ids: list[int],
        block_table: list[int],
        block_size: int,
        *,
        start: int = 0,
        state_slot: int = 0,
        logits: Literal["all", "last", "none"] = "all",
    ) -> StepPlan:
        """A plan of one sequence outside the scheduler (scoring, model tests, benches): compute
        positions [start, len(token_ids)) of `token_ids` (the sequence so far) on a cache whose
        blocks `block_table` (and state slot `state_slot`, hybrid models) already hold the first
        `start` tokens. logits: of every new position ("all", as prompt logprob rows), of the
        last one ("last", the sampled row) or none."""
        end = len(token_ids)
        if not 0 <= start < end:
            raise ValueError(f"no tokens to compute: start {start} of a {end}-token sequence")
        blocks = -(-end // block_size)
        if len(block_table) < blocks:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold {end} tokens")
        seq = ScheduledSeq(
            request=Request("one-sequence", list(token_ids), SamplingParams()),
            start=start,
            num_new_tokens=end - start,
            block_table=list(block_table[:blocks]),
            state_slot=state_slot,
            sample=logits == "last",
            prompt_logprob_positions=range(start, end) if logits == "all" else range(0),
        )
        return cls([seq], block_size)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sample_seqs(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.sample]

    def build_inputs(self, kv_indices: bool = True) -> FlatInputs:
        """Flat lists for the runner. `kv_indices` costs O(context) Python work per sequence;
        a runner whose kernels read block_tables + context_lens should pass False."""
        bs = self.block_size
        inp = FlatInputs([], [], [], [], [], [], [], [], [], [], [])
        row = 0
        for i, seq in enumerate(self.seqs):
            table = seq.block_table
            positions = range(seq.start, seq.end)
            inp.token_ids += seq.token_ids
            inp.positions += positions
            inp.query_lens.append(seq.num_new_tokens)
            inp.context_lens.append(seq.context_len)
            inp.slot_mapping += [table[p // bs] * bs + p % bs for p in positions]
            if kv_indices:
                inp.kv_indices.append([table[p // bs] * bs + p % bs
                                       for p in range(seq.context_len)])
            inp.block_tables.append(list(table))
            inp.state_slots.append(-1 if seq.state_slot is None else seq.state_slot)
            if seq.prompt_logprob_positions:
                lo = len(inp.logits_indices)
                inp.logits_indices += [row + p - seq.start for p in seq.prompt_logprob_positions]
                inp.prompt_logprob_spans.append((i, lo, len(inp.logits_indices)))
            if seq.sample:
                inp.sample_rows.append(len(inp.logits_indices))
                inp.logits_indices.append(row + seq.num_new_tokens - 1)
            row += seq.num_new_tokens
        return inp
