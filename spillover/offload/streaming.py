"""Layerwise prefill streaming of a tiered layer: above `stream_rows` routed rows, every expert
of the layer outside its GPU slots goes to the device in one staging copy, started while the
previous layer computes (`prefetch`, chained by `link_next`), and the misses run there."""

from __future__ import annotations

from typing import Any

import torch

from spillover.offload.transfer import Staging, TierStats


class LayerStreaming:
    """The streaming half of `TieredExpertBank` (the attributes below are the bank's)."""

    host: tuple[Any, Any] | None
    host_row: dict[int, int]
    stream_prefix: int
    device: torch.device
    staging: Staging
    tier_stats: TierStats
    _next: list[Any]
    _staged: tuple[Any, Any, torch.cuda.Event | None] | None
    _timed: list[tuple[torch.cuda.Event, torch.cuda.Event, int]]

    def link_next(self, bank: Any) -> None:
        self._next = [bank]

    def prefetch(self) -> None:
        """Start copying this layer's host stack to the device on the copy stream (idempotent)."""
        if self._staged is not None or self.host is None or not self.stream_prefix:
            return
        n = self.stream_prefix
        h13, h2 = self.host[0].expert_range(0, n), self.host[1].expert_range(0, n)
        stream = self.staging.stream
        if stream is None:  # CPU "device": the host stack is where it runs
            self._staged = (h13, h2, None)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.staging.reclaim()
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            d13 = h13.to(self.device, non_blocking=True)
            d2 = h2.to(self.device, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        self._staged = (d13, d2, event)
        self._timed.append((start, event, h13.nbytes + h2.nbytes))

    def _stream_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """Many rows (prefill): the layer's streamed host prefix is on the device (prefetched
        while the previous layer computed, else copied now) and the misses there run on it; the
        other misses (on disk, or RAM copies of evicted slot experts) are gathered and copied for
        this step."""
        out: torch.Tensor | None = None
        prefix = self.stream_prefix
        staged = [e for e in experts if self.host_row.get(e, prefix) < prefix]
        others = [e for e in experts if e not in set(staged)]
        self.tier_stats.streamed_experts += len(experts)
        if staged:
            self.prefetch()
            assert self._staged is not None
            d13, d2, event = self._staged
            self._staged = None
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            out = self._local_pass(hidden, topk_ids, topk_weights, staged, d13, d2,
                                   [self.host_row[e] for e in staged])
            self.staging.retire((d13, d2), self.device)
        if others:
            part = self._copy_pass(hidden, topk_ids, topk_weights, others)
            out = part if out is None else out + part
        assert out is not None
        return out

    def release_staged(self) -> None:
        """Hand back a prefetched stack that no miss of this step read: staged stacks would
        otherwise outlive their step, one a layer."""
        if self._staged is not None:
            d13, d2, _ = self._staged
            self._staged = None
            self.staging.retire((d13, d2), self.device)

    def _copy_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, experts: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _local_pass(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    experts: list[int], w13: Any, w2: Any, rows: list[int]) -> torch.Tensor:
        raise NotImplementedError
