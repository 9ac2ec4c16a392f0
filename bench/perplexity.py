"""Perplexity of the demo model (SmolLM2-135M-Instruct Q4_1 GGUF) per weight format.

    python bench/perplexity.py [--text tests/data/perplexity_en.txt] [--model PATH]

Rows: `gguf Q4_1` (the loader's exact float32 dequantization of the file's blocks, which computes
the same function as the blocks themselves: the Q4_1 -> int4 import is bit-exact, see
tests/unit/test_quant_importers_gguf.py), `bf16` (every Linear weight rounded to bf16, float32
compute), `int8` (per channel) and `int4-g128` (symmetric RTN) applied to the linears with
`quantize_model`'s default policy (embeddings, lm_head and norms kept). NOTE: the int8/int4 rows
re-quantize the already-4-bit weights, so they measure format noise on top of Q4_1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from spillover.layers.linear import Linear  # noqa: E402
from spillover.weights.quantize import QuantPolicy, quantize_model  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity_en.txt"


def perplexity(llm: object, ids: list[int]) -> float:
    logits = llm.forward_logits(ids)  # type: ignore[attr-defined]
    nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return float(nll.exp())


def perplexity_table(llm: object, ids: list[int]) -> dict[str, float]:
    """Runs every variant on one loaded model, restoring the float weights in between."""
    model: nn.Module = llm.model  # type: ignore[attr-defined]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    original = {n: m.weight.data.clone() for n, m in linears.items()}

    def restore() -> None:
        for n, m in linears.items():
            m.fmt = None
            m.weight = nn.Parameter(original[n].clone(), requires_grad=False)

    out = {"gguf Q4_1 (fp32 dequant)": perplexity(llm, ids)}
    for m in linears.values():
        m.weight.data = m.weight.data.bfloat16().float()
    out["bf16 weights"] = perplexity(llm, ids)
    for label, policy in (("int8 per-channel",
                           QuantPolicy(default="int8", act_dtype=torch.float32)),
                          ("int4-g128 sym",
                           QuantPolicy(default="int4", group_size=128, act_dtype=torch.float32)),
                          ("int4-g32 asym",
                           QuantPolicy(default="int4", group_size=32, symmetric=False,
                                       act_dtype=torch.float32))):
        restore()
        quantize_model(model, policy)
        out[label] = perplexity(llm, ids)
    restore()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--model", default=None, help="model path (default: the built-in demo GGUF)")
    args = ap.parse_args()
    from spillover import LLM

    t0 = time.time()
    llm = LLM(model=args.model, device="cpu", dtype="float32")
    ids = llm.tokenizer(Path(args.text).read_text(), add_special_tokens=False).input_ids
    table = perplexity_table(llm, ids)
    base = table["bf16 weights"]
    print(f"text: {args.text} ({len(ids)} tokens); model: {llm.source}")
    for k, v in table.items():
        print(f"{k:28s} ppl {v:8.3f}   {100 * (v / base - 1):+6.2f} % vs bf16")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
