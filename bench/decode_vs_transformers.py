"""Greedy decode tokens/s of the demo model: spillover `LLM.generate` vs transformers `generate`.

Same machine, same process, same prompt, fp32 by default; prints tokens/s and the weight bytes
streamed per second (each decoded token reads every weight once).

    python bench/decode_vs_transformers.py [--tokens 128] [--device cpu|cuda]
        [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from spillover import LLM, SamplingParams
from spillover.weights.resolve import demo_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true",
                    help="random weights of the demo model's config "
                         "(for machines without the GGUF)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    if args.synthetic:
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic import catalog_folder

        folder = catalog_folder("HuggingFaceTB/SmolLM2-135M-Instruct", Path(tempfile.mkdtemp()))
        llm = LLM(model=str(folder), device=args.device, dtype=args.dtype)
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        ids = torch.randint(0, llm.config.vocab_size, (39,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    else:
        llm = LLM(device=args.device, dtype=args.dtype)
        path = demo_model_path()
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=dtype)
        ids = llm.apply_chat_template([{"role": "user",
                                        "content": "Tell me a long story about a lighthouse."}])
    ref = ref.to(args.device).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def ours() -> int:
        return len(llm.generate([ids], params)[0].token_ids)

    def theirs() -> int:
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids], device=args.device), max_new_tokens=args.tokens,
                               min_new_tokens=args.tokens, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                         device=args.device))
        return out.shape[1] - len(ids)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {args.device}, dtype {args.dtype}, prompt "
          f"{len(ids)} tokens")
    for name, fn in (("spillover", ours), ("transformers", theirs)):
        fn()  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best = max(best, n / dt)
        print(f"{name:13s} decode {best:8.1f} tok/s   weights streamed "
              f"{best * weight_bytes / 1e9:6.2f} GB/s (incl. prefill of {len(ids)} tokens)")


if __name__ == "__main__":
    main()
