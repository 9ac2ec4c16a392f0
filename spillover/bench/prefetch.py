"""How well the next MoE layer's router, applied to this layer's input, predicts the experts the
next layer will route to: the cheap predictor a tiered bank could prefetch by at decode.

For each pair of consecutive MoE layers (i, i+1) and each token: the share of layer i+1's
top-k experts found in the top-k that layer i+1's router gives on layer i's MoE input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from spillover.layers.moe import SparseMoE
from spillover.offload.profile import pre_hooks


@dataclass
class PrefetchAccuracy:
    hits: list[int] = field(default_factory=list)  # per layer pair: predicted experts routed
    total: list[int] = field(default_factory=list)  # per layer pair: experts routed

    @property
    def overall(self) -> float:
        return sum(self.hits) / max(sum(self.total), 1)

    def per_pair(self) -> list[float]:
        return [h / max(t, 1) for h, t in zip(self.hits, self.total, strict=True)]


@contextmanager
def measure_prefetch(model: nn.Module) -> Iterator[PrefetchAccuracy]:
    """Forward hooks on every MoE block; accuracy accrues while the block runs."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    acc = PrefetchAccuracy([0] * max(len(blocks) - 1, 0), [0] * max(len(blocks) - 1, 0))
    inputs: dict[int, torch.Tensor] = {}

    def hook(i: int):  # type: ignore[no-untyped-def]
        def pre(module: SparseMoE, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            k = module.top_k  # the routed columns (a shared expert in the bank adds one)
            actual = module.route(x)[1][:, :k]
            if i > 0 and i - 1 in inputs and inputs[i - 1].shape == x.shape:
                guess = module.route(inputs[i - 1])[1][:, :k]
                found = (actual.unsqueeze(-1) == guess.unsqueeze(-2)).any(-1)
                acc.hits[i - 1] += int(found.sum())
                acc.total[i - 1] += actual.numel()
            inputs[i] = x.detach()
        return pre

    with pre_hooks(blocks, hook):
        yield acc
