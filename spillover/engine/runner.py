"""ModelRunner: owns the cache tensors and turns a StepPlan into one forward pass.

The scheduler decides *what* to compute (which tokens of which sequences, in which KV blocks and
state slots); the runner performs the plan's cache copies, builds the flat varlen batch and the
`ForwardContext`, runs the model and returns logits for the rows that need them.

`SeqStep` + `run` is the older single-purpose entry (scoring, model tests): same context, no
scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spillover.config import ModelConfig
from spillover.engine.batch import FlatInputs, StepPlan
from spillover.kernels.context import AttentionCache, ForwardContext, LinearStateCache
from spillover.models.causal_lm import CausalLM


@dataclass
class SeqStep:
    token_ids: list[int]  # the new tokens of this sequence computed in this step
    num_cached: int  # tokens of this sequence already in its KV blocks / state slot
    block_table: list[int]  # KV blocks covering at least num_cached + len(token_ids) tokens
    state_slot: int = 0  # linear-attention state slot (hybrid models)
    want_logits: bool = True  # sample after this step (false for a non-final prefill chunk)


@dataclass(frozen=True)
class CacheLayout:
    num_blocks: int
    block_size: int
    num_state_slots: int


def allocate_caches(
    cfg: ModelConfig, layout: CacheLayout, device: torch.device, dtype: torch.dtype
) -> tuple[dict[int, AttentionCache], dict[int, LinearStateCache]]:
    # zeros, not empty: padded decode attention reads (and masks) unused slots, and 0 * NaN = NaN.
    kv: dict[int, AttentionCache] = {}
    for i in cfg.attention_layers:
        shape = (layout.num_blocks, layout.block_size, cfg.num_kv_heads, cfg.head_dim)
        kv[i] = AttentionCache(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
    states: dict[int, LinearStateCache] = {}
    for i in cfg.linear_layers:
        conv = torch.zeros(layout.num_state_slots, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1,
                           dtype=dtype, device=device)
        ssm = torch.zeros(layout.num_state_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim, dtype=torch.float32, device=device)
        states[i] = LinearStateCache(conv, ssm)
    return kv, states


def pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """[N, max_blocks] int32, padded with -1 (kernels never read past a sequence's context)."""
    width = max((len(t) for t in tables), default=0)
    out = torch.full((len(tables), max(width, 1)), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        if t:
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out


class ModelRunner:
    def __init__(self, model: CausalLM, layout: CacheLayout, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.cfg = model.config
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.kv_caches, self.state_caches = allocate_caches(self.cfg, layout, device, dtype)

    # ---- cache copies ------------------------------------------------------------------------
    def copy_state_slot(self, src: int, dst: int) -> None:
        """Duplicate a linear-attention state (prompt reuse checkpoints, n > 1 forks)."""
        for c in self.state_caches.values():
            c.conv[dst].copy_(c.conv[src])
            c.ssm[dst].copy_(c.ssm[src])

    def copy_block(self, src: int, dst: int) -> None:
        """Duplicate one KV block in every full-attention layer (a shared, partly filled block)."""
        for c in self.kv_caches.values():
            c.k[dst].copy_(c.k[src])
            c.v[dst].copy_(c.v[src])

    def apply_copies(self, plan: StepPlan) -> None:
        # In list order: a later copy may read a block or slot an earlier one wrote.
        for b in plan.block_copies:
            self.copy_block(b.src, b.dst)
        for s in plan.slot_copies:
            self.copy_state_slot(s.src, s.dst)

    # ---- StepPlan path (the engine) ------------------------------------------------------------
    def context_from_inputs(self, inp: FlatInputs) -> tuple[torch.Tensor, ForwardContext]:
        dev = self.device

        def put(x: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        ctx = ForwardContext(
            positions=put(inp.positions),
            query_lens=inp.query_lens,
            context_lens=inp.context_lens,
            slot_mapping=put(inp.slot_mapping),
            kv_indices=[put(ix) for ix in inp.kv_indices],
            block_tables=pad_block_tables(inp.block_tables).to(dev, non_blocking=True),
            context_lens_tensor=put(inp.context_lens, torch.int32),
            # Sequences without a slot (attention-only models) never touch state caches.
            state_slots=[max(s, 0) for s in inp.state_slots],
            kv_caches=self.kv_caches,
            state_caches=self.state_caches,
            logits_indices=put(inp.logits_indices),
        )
        return put(inp.token_ids), ctx

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[torch.Tensor, FlatInputs]:
        """Copies, forward, logits: float32 [len(inp.logits_indices), vocab] and the flat inputs."""
        self.apply_copies(plan)
        # Attention reads block tables; per-token kv index lists would cost O(context) Python.
        inp = plan.build_inputs(kv_indices=False)
        input_ids, ctx = self.context_from_inputs(inp)
        hidden = self.model(input_ids, ctx)
        if not inp.logits_indices:
            return torch.empty(0, self.cfg.vocab_size, device=self.device), inp
        return self.model.compute_logits(hidden, ctx), inp

    # ---- SeqStep path (scoring, model tests) ---------------------------------------------------
    def build_context(self, steps: list[SeqStep], all_logits: bool = False) -> tuple[torch.Tensor, ForwardContext]:
        bs = self.layout.block_size
        inp = FlatInputs([], [], [], [], [], [], [], [], [], [], [])
        for s in steps:
            n, start = len(s.token_ids), s.num_cached
            end = start + n
            if len(s.block_table) * bs < end:
                raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {end} tokens")
            row0 = len(inp.token_ids)
            inp.token_ids += s.token_ids
            inp.positions += range(start, end)
            inp.slot_mapping += [s.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            inp.query_lens.append(n)
            inp.context_lens.append(end)
            inp.block_tables.append(s.block_table[: -(-end // bs)])
            inp.state_slots.append(s.state_slot)
            if all_logits:
                inp.logits_indices += range(row0, row0 + n)
            elif s.want_logits:
                inp.logits_indices.append(row0 + n - 1)
        return self.context_from_inputs(inp)

    @torch.inference_mode()
    def run(self, steps: list[SeqStep], all_logits: bool = False) -> torch.Tensor:
        """One forward pass; float32 logits [rows, vocab] for the rows that want them, in order."""
        input_ids, ctx = self.build_context(steps, all_logits)
        hidden = self.model(input_ids, ctx)
        if ctx.logits_indices is not None and ctx.logits_indices.numel() == 0:
            return torch.empty(0, self.cfg.vocab_size, device=self.device)
        return self.model.compute_logits(hidden, ctx)
