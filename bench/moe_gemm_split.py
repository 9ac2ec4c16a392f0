"""Where a grouped MoE GEMM call's time goes: GPU work against host enqueue.

    python bench/moe_gemm_split.py   # GPU: int4 and FP8 at Qwen3-Next's w13/w2, T = 16-512 tokens

For each call of the grouped GEMM (`kernels/triton/quant_gemm.py`, rows grouped on the device with
no sync), three times per call: `events` (CUDA events around 20 eager calls, as bench/quant_gemm.py
reports), `host` (wall time to enqueue 20 eager calls, no sync in between) and `graph` (the same
call captured in a CUDA graph and replayed: GPU work only, no Python or launch cost). When `graph`
is close to `events`, the GPU work is what limits the call.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quant_gemm as qg  # bench/quant_gemm.py: formats, calls, event timing
    from quant_gemv import gpu_time  # bench/quant_gemv.py: CUDA-graph timing

    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kind in ("int4", "fp8"):
        for n, k, tag in ((1024, 2048, "w13"), (2048, 512, "w2")):
            bank = qg.make(kind, qg.EXPERTS, n, k)
            for tokens in (16, 128, 512):
                picks = [torch.randperm(qg.EXPERTS, device="cuda", generator=gen)[:qg.TOP_K]
                         for _ in range(tokens)]
                ids = torch.stack(picks).flatten().to(torch.int32)
                x = torch.randn(ids.numel(), k, device="cuda", generator=gen).to(torch.bfloat16)
                fn = qg.triton_call(bank, x, ids)
                events = qg.timed(fn, 20)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                host = (time.perf_counter() - t0) / 20
                torch.cuda.synchronize()
                graph = gpu_time([fn], reps=20)
                print(f"{kind} {tag} T={tokens}: events {events * 1e6:7.1f} us, host "
                      f"enqueue {host * 1e6:7.1f} us, graph replay (GPU only) "
                      f"{graph * 1e6:7.1f} us", flush=True)
            del bank


if __name__ == "__main__":
    main()
