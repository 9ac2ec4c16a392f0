"""GPU correctness check: every tiny architecture on CUDA in bf16 against our fp32 CPU reference
(which tests/models holds equal to transformers), prefill + 16 cached decode steps + chunked prefill.
Qwen3-Next runs flash-linear-attention's Gated DeltaNet kernels when importable, else the torch path.

    python scripts/gpu_check.py            # prints one row per config and the kernels chosen
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spillover import LLM, kernels  # noqa: E402
from spillover.engine.runner import SeqStep  # noqa: E402
from tests.models.tiny import CONFIGS, save_hf  # noqa: E402

REL_TOL = 3e-2  # bf16 weights/activations over a few layers; fp32 accumulation and state


def run(llm: LLM, chunks: list[list[int]]) -> torch.Tensor:
    runner = llm._runner_for(sum(len(c) for c in chunks))
    table = list(range(runner.layout.num_blocks))
    out, done = [], 0
    for c in chunks:
        out.append(runner.run([SeqStep(c, done, table, 0)], all_logits=True).float().cpu())
        done += len(c)
    return torch.cat(out)


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} fla={kernels.has_fla()}")
    failures = 0
    g = torch.Generator().manual_seed(0)
    for name in sorted(CONFIGS):
        with tempfile.TemporaryDirectory() as d:
            save_hf(name, Path(d))
            cpu = LLM(model=d, device="cpu", dtype="float32")
            gpu = LLM(model=d, device="cuda", dtype="bfloat16")
            ids = torch.randint(0, 128, (48,), generator=g).tolist()
            plans = {
                "prefill": [ids],
                "decode16": [ids[:32]] + [[t] for t in ids[32:]],
                "chunked": [ids[:7], ids[7:20], ids[20:32]] + [[t] for t in ids[32:]],
            }
            ref = run(cpu, [ids])
            for plan, chunks in plans.items():
                got = run(gpu, chunks)
                rel = ((got - ref).norm() / ref.norm()).item()
                top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
                ok = rel <= REL_TOL and not torch.isnan(got).any()
                failures += not ok
                print(f"{name:26s} {plan:9s} rel_err {rel:.2e} max_abs {(got - ref).abs().max().item():.2e} "
                      f"top1_agree {top1:.3f} {'OK' if ok else 'FAIL'}")
    print("kernels chosen:", kernels.chosen())
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
