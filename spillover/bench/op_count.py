"""Count the GPU operations a forward would issue, on the CPU.

`count_ops()` records every aten op that launches work (views and allocations are free) and
charges each call of a fused kernel entry point in `spillover.kernels` the launches it makes on
CUDA, not the torch reference ops it runs on the CPU. The count of one decode step is what a CUDA
graph replays, so tests can hold a decode layer to a launch budget without a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spillover import kernels
from spillover.kernels import quant_dispatch

# Ops that only make a new view or an uninitialised tensor: no kernel runs.
FREE = frozenset({
    "view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select",
    "unsqueeze", "squeeze", "expand", "permute", "transpose", "t", "as_strided", "detach",
    "alias", "unbind", "chunk", "narrow", "empty", "empty_like", "new_empty", "empty_strided",
    "lift_fresh", "view_as", "_reshape_alias", "unflatten", "flatten", "movedim",
})

# Launches per call of a kernel entry point on CUDA (the Triton path).
LAUNCHES: dict[str, int] = {
    "rms_norm": 1, "add_rms_norm": 1, "gated_rms_norm": 1, "route_topk": 1, "silu_mul": 1,
    "moe_sum": 1, "shared_combine": 1, "gdn_split": 1, "qk_norm_rope": 1, "sigmoid_mul": 1,
    "gdn_decode": 2, "paged_attention": 3,  # the K/V write, the split pass and its merge
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.inside = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not self.inside and name not in FREE:
            self.ops[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def charge(self, name: str, fn: Callable[..., Any], launches: int) -> Callable[..., Any]:
        def wrapped(*args: Any, **kw: Any) -> Any:
            if not self.inside:
                self.ops[f"kernel.{name}"] += launches
            self.inside += 1
            try:
                return fn(*args, **kw)
            finally:
                self.inside -= 1
        return wrapped


@contextmanager
def count_ops() -> Iterator[OpCounter]:
    """Counts the ops of the block (see the module doc)."""
    counter = OpCounter()
    saved: list[tuple[Any, str, Any]] = []
    targets = [(kernels, name, n) for name, n in LAUNCHES.items()]
    targets.append((quant_dispatch, "quant_matmul", 1))
    for module, name, n in targets:
        fn = getattr(module, name)
        saved.append((module, name, fn))
        setattr(module, name, counter.charge(name, fn, n))
    try:
        with torch.no_grad(), counter:
            yield counter
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
