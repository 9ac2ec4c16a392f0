"""What every dispatcher in `spillover.kernels` shares: the one override variable, what is
importable, and the one record of kernel choices.

Imports nothing from its own package, so that `kernels/__init__.py` (the op dispatchers, the public
entry) and `kernels/quant_dispatch.py` (the quantized matmuls) both use it without an import cycle.

`SPILLOVER_KERNELS` (unset or empty: choose per shape):
- `ref`: every op, quantized matmuls included, runs its torch reference (debugging, A/B checks);
- `cpu`: quantized matmuls on the CPU take torch's weight-only ops at any row count (tests);
- `triton`: quantized matmuls take the Triton kernels, on the CPU too under TRITON_INTERPRET=1
  (tests). Other ops choose as when unset.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Hashable
from functools import cache

ENV = "SPILLOVER_KERNELS"
MODES = ("ref", "cpu", "triton")
_ALIASES = {"": "", "auto": "", **{m: m for m in MODES}}

log = logging.getLogger("spillover.kernels")
_logged: dict[tuple[str, str, str], str] = {}  # (op, shape class, impl) -> reason
_resolved: dict[tuple[str, str, Hashable], str] = {}  # (op, mode, shape class) -> impl


def kernels_mode() -> str:
    """The override in force: "" (choose per shape), "ref", "cpu" or "triton".

    Read at every call (tests and scripts/gpu_check.py set it between runs); any other value is
    an error rather than a silent fallback to the default choice.
    """
    raw = os.environ.get(ENV, "")
    mode = _ALIASES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"{ENV}={raw!r} is not understood: use ref (torch references for every "
                         "op), cpu or triton (a quantized-matmul family, for tests), or leave it "
                         "unset")
    return mode


def force_ref() -> bool:
    """SPILLOVER_KERNELS=ref: every op to its torch reference."""
    return kernels_mode() == "ref"


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def has_fla() -> bool:
    return importlib.util.find_spec("fla") is not None


def triton_interpreted() -> bool:
    """Triton runs under its CPU interpreter (TRITON_INTERPRET=1: tests): no inline asm there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose(op: str, impl: str, reason: str, shape_class: str = "") -> str:
    """Record that `op` runs `impl` for `shape_class`, logging it with its reason the first time
    that (op, shape class, impl) is seen. Returns impl."""
    key = (op, shape_class, impl)
    if key not in _logged:
        _logged[key] = reason
        log.info("kernel %s [%s] -> %s (%s)", op, shape_class or "any", impl, reason)
    return impl


def resolve(op: str, shape_class: Hashable, pick: Callable[[], tuple[str, str]]) -> str:
    """The implementation of `op` for a shape class under the override in force: `pick()` gives
    (impl, reason) the first time and is not asked again for that class; logged by `choose`."""
    key = (op, kernels_mode(), shape_class)
    impl = _resolved.get(key)
    if impl is None:
        impl, reason = pick()
        _resolved[key] = impl
        choose(op, impl, reason, str(shape_class))
    return impl


def chosen() -> list[tuple[str, str]]:
    """Which implementation each op has used so far: sorted (op, impl) pairs (tests, reports)."""
    return sorted({(op, impl) for op, _, impl in _logged})


def choices() -> dict[tuple[str, str, str], str]:
    """Every (op, shape class, impl) chosen so far, with its reason."""
    return dict(_logged)


def reset() -> None:
    """Forget every resolved choice and what was logged (tests that change what a choice reads)."""
    _logged.clear()
    _resolved.clear()
