"""ModelRunner: owns the cache tensors and turns a StepPlan into one forward pass.

The scheduler decides *what* to compute (which tokens of which sequences, in which KV blocks and
state slots); the runner performs the plan's cache copies, builds the flat varlen batch and the
whole `ForwardContext` (rotary rows and linear-attention metadata included: the model only reads
it, so a CUDA graph can capture it), runs the model and returns logits for the rows that need
them. `execute(plan)` is its one entry: scoring and model tests build a one-sequence plan
(`StepPlan.one_sequence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from spillover.config import ModelConfig
from spillover.engine.batch import FlatInputs, StepPlan
from spillover.engine.cuda_graphs import DecodeGraphs, GraphSettings
from spillover.kernels.context import (
    AttentionCache,
    ForwardContext,
    LinearStateCache,
    build_linear_meta,
)
from spillover.models.causal_lm import CausalLM


@dataclass(frozen=True)
class CacheLayout:
    num_blocks: int
    block_size: int
    num_state_slots: int


def allocate_caches(
    cfg: ModelConfig, layout: CacheLayout, device: torch.device, dtype: torch.dtype,
    spare: int = 0,
) -> tuple[dict[int, AttentionCache], dict[int, LinearStateCache]]:
    """The caches of `layout`, plus `spare` KV blocks and state slots past its counts that the
    scheduler never hands out (the padding rows of a CUDA-graph step write there)."""
    # zeros, not empty: padded decode attention reads (and masks) unused slots, and 0 * NaN = NaN.
    kv: dict[int, AttentionCache] = {}
    for i in cfg.attention_layers:
        shape = (layout.num_blocks + spare, layout.block_size, cfg.num_kv_heads, cfg.head_dim)
        kv[i] = AttentionCache(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
    states: dict[int, LinearStateCache] = {}
    for i in cfg.linear_layers:
        conv = torch.zeros(layout.num_state_slots + spare, cfg.linear_conv_dim,
                           cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
        ssm = torch.zeros(layout.num_state_slots + spare, cfg.linear_num_value_heads,
                          cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                          dtype=torch.float32, device=device)
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


class StepOutput(NamedTuple):
    logits: torch.Tensor  # float32 [len(inputs.logits_indices), vocab]
    inputs: FlatInputs  # the flat batch the plan became (sample_rows, prompt_logprob_spans)


class ModelRunner:
    def __init__(self, model: CausalLM, layout: CacheLayout, device: torch.device,
                 dtype: torch.dtype, graphs: GraphSettings | None = None) -> None:
        self.model = model
        self.cfg = model.config
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.kv_caches, self.state_caches = allocate_caches(
            self.cfg, layout, device, dtype, spare=1 if graphs is not None else 0)
        # Decode steps replay CUDA graphs (emulated eagerly off CUDA); other steps run eagerly.
        self.graphs = None if graphs is None else DecodeGraphs(
            model, self.kv_caches, self.state_caches, device, graphs.max_batch,
            graphs.max_model_len, layout.block_size, scratch_block=layout.num_blocks,
            scratch_slot=layout.num_state_slots, emulate=graphs.emulate)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """The runner's one entry: the plan's cache copies, then one forward pass; logits of the
        rows `inputs.logits_indices` names, in that order."""
        if plan.block_size != self.layout.block_size:
            raise ValueError(f"plan of {plan.block_size}-token blocks for a cache of "
                             f"{self.layout.block_size}-token blocks")
        self._apply_copies(plan)
        # Attention reads block tables; per-token kv index lists would cost O(context) Python.
        inp = plan.build_inputs(kv_indices=False)
        if self.graphs is not None and self.graphs.accepts(inp):
            return StepOutput(self.graphs.run(inp), inp)
        input_ids, ctx = self._build_context(inp)
        hidden = self.model(input_ids, ctx)
        if not inp.logits_indices:
            return StepOutput(torch.empty(0, self.cfg.vocab_size, device=self.device), inp)
        return StepOutput(self.model.compute_logits(hidden, ctx), inp)

    # ---- cache copies ------------------------------------------------------------------------
    def _apply_copies(self, plan: StepPlan) -> None:
        # In list order: a later copy may read a block or slot an earlier one wrote.
        for b in plan.block_copies:
            # Duplicate one KV block in every full-attention layer (a shared, partly filled block).
            for c in self.kv_caches.values():
                c.k[b.dst].copy_(c.k[b.src])
                c.v[b.dst].copy_(c.v[b.src])
        for s in plan.slot_copies:
            # Duplicate a linear-attention state (prompt reuse checkpoints, n > 1 forks).
            for st in self.state_caches.values():
                st.conv[s.dst].copy_(st.conv[s.src])
                st.ssm[s.dst].copy_(st.ssm[s.src])

    # ---- the forward's context -----------------------------------------------------------------
    def _build_context(self, inp: FlatInputs) -> tuple[torch.Tensor, ForwardContext]:
        """Token ids [T] and the complete ForwardContext of one step: everything a layer reads
        is computed here, before the forward."""
        dev = self.device

        def put(x: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        positions = put(inp.positions)
        # Sequences without a slot (attention-only models) never touch state caches.
        state_slots = [max(s, 0) for s in inp.state_slots]
        linear = None
        if self.cfg.linear_layers:
            linear = build_linear_meta(inp.query_lens, inp.context_lens, state_slots, dev)
        ctx = ForwardContext(
            positions=positions,
            query_lens=inp.query_lens,
            context_lens=inp.context_lens,
            slot_mapping=put(inp.slot_mapping),
            kv_indices=[put(ix) for ix in inp.kv_indices],
            block_tables=pad_block_tables(inp.block_tables).to(dev, non_blocking=True),
            context_lens_tensor=put(inp.context_lens, torch.int32),
            state_slots=state_slots,
            kv_caches=self.kv_caches,
            state_caches=self.state_caches,
            logits_indices=put(inp.logits_indices),
            rope_cos_sin=self.model.rope_cos_sin(positions, max(inp.context_lens, default=0)),
            linear=linear,
        )
        return put(inp.token_ids), ctx
