"""CUDA graphs for decode steps: one capture per batch-size bucket, replayed over persistent
input buffers.

A decode step of n sequences (one new token each) runs as the graphs of the smallest bucket
b >= n. The step's inputs go into one packed int64 buffer with a single host-to-device copy; the
graph derives the whole `ForwardContext` from it (rotary rows, int32 block tables, linear-attention
slot tensors), so nothing in a captured region reads a host value. Rows n..b-1 are padding: they
write their K/V into a scratch block and their recurrent state into a scratch slot that the
scheduler never hands out, and their logits are dropped.

The model's `pieces()` cut the forward where a layer must decide on the host (a tiered expert bank
with experts outside its GPU slots): each captured piece is its own graph over static input
buffers, and the pieces between them run eagerly. A model whose banks are all resident is one
graph. With `emulate=True` the same padded, packed path runs eagerly on any device (the CPU tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, SupportsIndex

import torch

from spillover.engine.batch import FlatInputs
from spillover.kernels.context import AttentionCache, ForwardContext, LinearStateCache
from spillover.models.causal_lm import Carry, CausalLM

log = logging.getLogger("spillover.engine")

IDS, POS, SLOT, CLEN, STATE = range(5)  # the packed buffer's columns; block tables follow
# Larger decode batches run eagerly: their launches weigh little beside their math, and the
# quantized MoE kernels pick GEMV or GEMM without a host sync only up to
# kernels.quant_dispatch.SYNC_FREE_ROWS rows (batch x top-k).
MAX_GRAPH_BATCH = 128


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get graphs: 1, 2, 4, 8, then every 8, and max_batch (a step pads to the
    next one)."""
    return [*(b for b in (1, 2, 4, 8) if b < max_batch), *range(16, max_batch, 8), max_batch]


class HostValuesUnread(list[int]):
    """A per-sequence host list that a captured step must not read: its values at capture would
    be frozen into the graph. Its length is fine to read (it is the bucket's)."""

    WHY = ("a CUDA-graph decode step read a per-sequence host list: use the context's tensors "
           "(block tables, context_lens_tensor, linear meta)")

    def __iter__(self) -> Iterator[int]:
        raise RuntimeError(self.WHY)

    def __getitem__(self, i: SupportsIndex | slice) -> Any:  # type: ignore[override]
        raise RuntimeError(self.WHY)


class Uncapturable(RuntimeError):
    """A graph piece synchronised with the host while warming up: it cannot be captured."""


@dataclass(frozen=True)
class GraphSettings:
    max_batch: int  # the largest decode batch replayed (larger ones run eagerly)
    max_model_len: int
    emulate: bool = False  # run the padded, packed path eagerly (tests on the CPU)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: an eager piece
    inputs: Carry  # static buffers the graph reads (the previous piece's results are copied in)
    outputs: Carry


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_caches: dict[int, AttentionCache],
                 state_caches: dict[int, LinearStateCache], device: torch.device,
                 max_batch: int, max_model_len: int, block_size: int, scratch_block: int,
                 scratch_slot: int, emulate: bool = False) -> None:
        self.model = model
        self.kv_caches, self.state_caches = kv_caches, state_caches
        self.device = device
        self.emulate = emulate
        self.buckets = buckets(min(max_batch, MAX_GRAPH_BATCH))
        self.max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)  # block-table entries a sequence can need
        self.pad_row = [0, 0, scratch_block * block_size, 1, scratch_slot,
                        scratch_block] + [-1] * (self.width - 1)
        cols = 5 + self.width
        self.packed = torch.zeros(self.max_batch, cols, dtype=torch.long, device=device)
        self.host = torch.zeros(self.max_batch, cols, dtype=torch.long,
                                pin_memory=device.type == "cuda")
        self.pieces = model.pieces()
        self.graphs: dict[int, list[_Captured]] = {}
        self.eager_from = self.max_batch + 1  # batches from this size up run eagerly
        self.replayed = 0  # steps that replayed graphs
        self.contexts: dict[int, ForwardContext] = {}
        self.steps = 0  # decode steps run through this path
        self.padded_rows = 0  # padding rows those steps computed (a cost of bucketing)
        self.pool: Any = None
        if not emulate:
            self.pool = torch.cuda.graph_pool_handle()
        # the rotary table for every position up front: a graph must not grow it
        model.rope_cos_sin(torch.zeros(1, dtype=torch.long, device=device), max_model_len)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def accepts(self, inp: FlatInputs) -> bool:
        return (0 < len(inp.query_lens) <= self.max_batch and all(q == 1 for q in inp.query_lens)
                and max(inp.context_lens) <= self.max_model_len)

    def run(self, inp: FlatInputs) -> torch.Tensor:
        """Logits [len(inp.logits_indices), vocab] (float32) of a decode step `accepts` took."""
        n = len(inp.query_lens)
        b = self.bucket(n)
        assert b is not None
        self.steps += 1
        self.padded_rows += b - n
        self._fill(inp, b)
        if not self.emulate and b not in self.graphs and b < self.eager_from:
            self._try_capture(b)
        if b in self.graphs:
            self.replayed += 1
            logits = self._replay(b)
        else:
            logits = self._eager(b)
        if inp.logits_indices == list(range(n)):
            return logits[:n]
        return logits.index_select(0, torch.tensor(inp.logits_indices, device=self.device))

    def capture_all(self) -> None:
        """Capture every bucket now (the server's warm-up), on padding rows alone."""
        if self.emulate:
            return
        t0 = time.perf_counter()
        for b in self.buckets:
            if b not in self.graphs and b < self.eager_from:
                self.packed[:b] = torch.tensor([self.pad_row] * b, device=self.device)
                self._try_capture(b)
        log.info("cuda graphs: %d batch sizes captured in %.1f s (%s run eagerly)",
                 len(self.graphs), time.perf_counter() - t0,
                 f"{self.eager_from} and more" if self.eager_from <= self.max_batch else "none")

    # ---- inputs ------------------------------------------------------------------------------
    def _fill(self, inp: FlatInputs, b: int) -> None:
        # Only the block-table columns this batch uses: kernels read a row's table no further
        # than its context, so stale entries past it are never seen.
        width = max(1, *(len(t) for t in inp.block_tables))
        rows = [[t, p, s, c, max(st, 0), *bt, *[-1] * (width - len(bt))]
                for t, p, s, c, st, bt in zip(inp.token_ids, inp.positions, inp.slot_mapping,
                                              inp.context_lens, inp.state_slots,
                                              inp.block_tables, strict=True)]
        rows += [self.pad_row[: 5 + width]] * (b - len(rows))
        self.host[:b, : 5 + width] = torch.tensor(rows, dtype=torch.long)
        self.packed[:b, : 5 + width].copy_(self.host[:b, : 5 + width], non_blocking=True)

    def _context(self, b: int) -> ForwardContext:
        """The step's ForwardContext, every tensor derived from the packed buffer (inside the
        first graph, when captured). Host lists a layer might read are `HostValuesUnread`."""
        packed = self.packed[:b]
        positions = packed[:, POS]
        clen = packed[:, CLEN].to(torch.int32)
        slots = packed[:, STATE].contiguous()
        return ForwardContext(
            positions=positions,
            query_lens=[1] * b,
            context_lens=HostValuesUnread([0] * b),
            slot_mapping=packed[:, SLOT].contiguous(),
            block_tables=packed[:, 5:].to(torch.int32),
            context_lens_tensor=clen,
            state_slots=HostValuesUnread([0] * b),
            kv_caches=self.kv_caches,
            state_caches=self.state_caches,
            logits_indices=None,
            rope_cos_sin=self.model.rope_cos_sin(positions, self.max_model_len),
            linear=(slots, clen == 1, torch.arange(b + 1, device=self.device))
            if self.state_caches else None,
        )

    # ---- running ------------------------------------------------------------------------------
    def _eager(self, b: int) -> torch.Tensor:
        ctx = self._context(b)
        carry: Carry = (self.packed[:b, IDS],)
        for piece in self.pieces:
            carry = piece.run(carry, ctx)
        return carry[0]

    def _replay(self, b: int) -> torch.Tensor:
        prelude, *pieces = self.graphs[b]
        assert prelude.graph is not None
        prelude.graph.replay()
        carry: Carry = (self.packed[:b, IDS],)
        ctx = self.contexts[b]
        for piece, cap in zip(self.pieces, pieces, strict=True):
            if cap.graph is None:
                carry = piece.run(carry, ctx)
                continue
            for dst, src in zip(cap.inputs, carry, strict=True):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            cap.graph.replay()
            carry = cap.outputs
        return carry[0]

    def _try_capture(self, b: int) -> None:
        try:
            self._capture(b)
        except Uncapturable as e:
            # e.g. an expert kernel that counts rows on the host above some batch: this size and
            # larger ones run eagerly, smaller ones keep their graphs
            self.eager_from = min(self.eager_from, b)
            log.warning("cuda graphs: decode batches of %d and more run eagerly: %s", b, e)
        except RuntimeError:
            # the capture itself failed: the graph memory pool may be unusable afterwards
            self.eager_from = 0
            log.warning("cuda graphs: decode runs eagerly, the capture of batch %d failed", b,
                        exc_info=True)

    def _capture(self, b: int) -> None:
        """Warm up (kernel compilation, autotuning, lazy tables) on padding rows alone, then
        capture the context and each graph piece; the eager pieces run between to give the next
        one real inputs. Padding rows touch only the scratch block and slot, so no sequence's
        cache changes."""
        t0 = time.perf_counter()
        real = self.packed[:b].clone()
        try:
            self.packed[:b] = torch.tensor([self.pad_row] * b, device=self.device)
            self._warm_up(b)
            self.graphs[b], self.contexts[b] = self._capture_pieces(b)
        finally:
            self.packed[:b] = real
        log.info("cuda graphs: batch %d captured in %d piece(s) (%d eager) in %.2f s", b,
                 sum(c.graph is not None for c in self.graphs[b]),
                 sum(c.graph is None for c in self.graphs[b]), time.perf_counter() - t0)

    def _warm_up(self, b: int) -> None:
        """One eager pass in which the graph pieces may not synchronise with the host: a piece
        that would (a device value read on the host, a copy from pageable memory) is refused
        here, before a capture could leave the graph memory pool half-recorded."""
        ctx = self._context(b)
        carry: Carry = (self.packed[:b, IDS],)
        for piece in self.pieces:
            if piece.graph:
                torch.cuda.set_sync_debug_mode("error")
            try:
                carry = piece.run(carry, ctx)
            except RuntimeError as e:
                if piece.graph and "synchroniz" in str(e):
                    raise Uncapturable(str(e)) from e
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(self.device)

    def _capture_pieces(self, b: int) -> tuple[list[_Captured], ForwardContext]:
        # The context first, as its own graph: every piece, eager ones too, reads it.
        prelude = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA meanwhile
        with torch.cuda.graph(prelude, pool=self.pool, capture_error_mode="thread_local"):
            ctx = self._context(b)
        captured = [_Captured(prelude, (), ())]
        carry: Carry = (self.packed[:b, IDS],)
        prelude.replay()
        for i, piece in enumerate(self.pieces):
            if not piece.graph:
                carry = piece.run(carry, ctx)
                captured.append(_Captured(None, (), ()))
                continue
            inputs = carry if i == 0 else tuple(t.clone() for t in carry)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = piece.run(inputs, ctx)
            graph.replay()
            captured.append(_Captured(graph, inputs, outputs))
            carry = outputs
        torch.cuda.synchronize(self.device)
        return captured, ctx
