"""ModelRunner: owns the cache tensors and turns per-sequence step descriptions into one forward pass.

The scheduler decides *what* to compute (which tokens of which sequences, in which KV blocks and
state slots); the runner builds the flat varlen batch and `ForwardContext`, runs the model and
returns logits for the rows that need sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spillover.layers.context import AttentionCache, ForwardContext, LinearStateCache
from spillover.models.causal_lm import CausalLM
from spillover.models.config import ModelConfig


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


class ModelRunner:
    def __init__(self, model: CausalLM, layout: CacheLayout, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.cfg = model.config
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.kv_caches, self.state_caches = allocate_caches(self.cfg, layout, device, dtype)

    def copy_state_slot(self, src: int, dst: int) -> None:
        """Duplicate a linear-attention state (prompt reuse checkpoints, n > 1 forks)."""
        for c in self.state_caches.values():
            c.conv[dst].copy_(c.conv[src])
            c.ssm[dst].copy_(c.ssm[src])

    def build_context(self, steps: list[SeqStep], all_logits: bool = False) -> tuple[torch.Tensor, ForwardContext]:
        bs = self.layout.block_size
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        kv_indices: list[torch.Tensor] = []
        logits_rows: list[int] = []
        query_lens, context_lens = [], []
        for s in steps:
            n, start = len(s.token_ids), s.num_cached
            end = start + n
            if len(s.block_table) * bs < end:
                raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {end} tokens")
            row0 = len(ids)
            ids.extend(s.token_ids)
            positions.extend(range(start, end))
            slot_mapping.extend(s.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            if self.cfg.attention_layers and start > 0:
                bt = torch.tensor(s.block_table, dtype=torch.long)
                pos = torch.arange(end)
                kv_indices.append((bt[pos // bs] * bs + pos % bs).to(dev))
            else:
                kv_indices.append(torch.empty(0, dtype=torch.long, device=dev))
            if all_logits:
                logits_rows.extend(range(row0, row0 + n))
            elif s.want_logits:
                logits_rows.append(row0 + n - 1)
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_lens=query_lens,
            context_lens=context_lens,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            kv_indices=kv_indices,
            state_slots=[s.state_slot for s in steps],
            kv_caches=self.kv_caches,
            state_caches=self.state_caches,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx

    @torch.inference_mode()
    def run(self, steps: list[SeqStep], all_logits: bool = False) -> torch.Tensor:
        """One forward pass; float32 logits [rows, vocab] for the rows that want them, in order."""
        input_ids, ctx = self.build_context(steps, all_logits)
        hidden = self.model(input_ids, ctx)
        if ctx.logits_indices is not None and ctx.logits_indices.numel() == 0:
            return torch.empty(0, self.cfg.vocab_size, device=self.device)
        return self.model.compute_logits(hidden, ctx)
