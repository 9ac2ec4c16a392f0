"""The small fused kernels (`kernels/triton/norms.py`, `routing.py`, `activation.py`) against their
torch references, eager and under torch.compile, at Qwen3-Next-80B's decode shapes.

    python bench/fused_small.py              # GPU: error vs the reference, GPU time a call
    python bench/fused_small.py --rows 1 16  # token counts (default 1 and 16)

For each op and row count it prints the largest difference from the fp32-computed reference and
the GPU time a call of: the Triton kernel, the eager reference (several torch kernels), and
torch.compile of the reference. Times come from a CUDA graph replaying 20 calls
(`bench/quant_gemv.py`'s `gpu_time`): GPU work only, no Python or launch cost, which is what a
decode step replayed from a graph pays.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spillover.kernels import ref  # noqa: E402
from spillover.kernels.triton import activation, norms, routing  # noqa: E402

HIDDEN, EXPERTS, TOP_K, SHARED_I, HV, DV = 2048, 512, 10, 512, 32, 128  # Qwen3-Next-80B-A3B
Case = tuple[str, Callable[..., object], Callable[..., object], tuple[object, ...]]


def cases(rows: int) -> list[Case]:
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, res = torch.randn(rows, HIDDEN, **bf16), torch.randn(rows, HIDDEN, **bf16)
    w = torch.randn(HIDDEN, **bf16) * 0.1
    o, z = torch.randn(rows, HV, DV, **bf16), torch.randn(rows, HV, DV, **bf16)
    wd = torch.randn(DV, **bf16) + 1
    logits = torch.randn(rows, EXPERTS, **bf16)
    gate_up = torch.randn(rows, 2 * SHARED_I, **bf16)
    return [
        ("rms_norm (1+w)", norms.rms_norm, ref.rms_norm, (x, w, 1e-6, 1.0)),
        ("add_rms_norm (1+w)", norms.add_rms_norm, ref.add_rms_norm, (x, res, w, 1e-6, 1.0)),
        ("gated_rms_norm", norms.gated_rms_norm, ref.gated_rms_norm, (o, z, wd, 1e-6)),
        ("route_topk 512/10", routing.route_topk, ref.route_topk,
         (logits, TOP_K, True, torch.bfloat16)),
        ("silu_mul shared", activation.silu_mul, ref.silu_mul, (gate_up,)),
    ]


def max_diff(got: object, want: object) -> float:
    pairs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
    return max((g.float() - w.float()).abs().max().item() for g, w in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="tokens a call")
    args = parser.parse_args()
    from quant_gemv import gpu_time  # bench/quant_gemv.py: CUDA-graph timing

    print(f"{'op':<20} {'rows':>4} {'max diff':>9} {'triton us':>10} {'torch us':>9} "
          f"{'compiled us':>12}")
    for rows in args.rows:
        for name, fast, reference, inputs in cases(rows):
            compiled = torch.compile(reference, dynamic=False)
            diff = max_diff(fast(*inputs), reference(*inputs))
            times = [gpu_time([lambda f=f, a=inputs: f(*a)]) * 1e6
                     for f in (fast, reference, compiled)]
            print(f"{name:<20} {rows:>4} {diff:>9.2e} {times[0]:>10.1f} {times[1]:>9.1f} "
                  f"{times[2]:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
