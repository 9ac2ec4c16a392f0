"""Peak RSS of quantize-at-load on a synthetic multi-GB bf16 Qwen3-MoE checkpoint (not a test).

    python bench/load_rss.py --gb 2.5 [--dir /tmp/spillover_load_rss] [--quant int4] [--dtype auto]
        [--old] [--keep]

Writes a random bf16 Qwen3-MoE-shaped Hugging Face folder (bench/synthetic.py; real Qwen3-Next
expert shapes: hidden 2048, expert rows 512, per-expert checkpoint tensors; layers chosen to reach
~GB), then in a child process runs `LLM(model=dir, quant=..., device="cpu", dtype=...)` and reads
the child's own peak RSS (VmHWM in /proc/self/status: the kernel's high-water mark, what
`/usr/bin/time -v` reports, without the parent's RSS that `ru_maxrss` inherits across fork). An idle
child importing the same modules gives the baseline. `--old` also runs the previous path (the float
model loaded whole, then `quantize_for_load`) for a before/after row. Prints float size, loaded
(packed) model size, peak RSS, and peak minus idle as a multiple of the loaded model and, for the
part above the loaded model, of the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import make_synthetic_folder  # noqa: E402

HIDDEN, EXPERT_ROWS, EXPERTS, VOCAB = 2048, 512, 64, 32768
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 128

CHILD = r"""
import json, sys, time
import torch
from spillover import LLM
from spillover.weights.resolve import load_config, load_model, resolve_model
from spillover.llm import resolve_dtype
from spillover.weights.build import quantize_for_load
mode, folder, quant, dtype = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))

def held(model):
    # bytes the loaded model holds: float parameters plus every packed format's tensors
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = 0
    for m in model.modules():
        for attr in ("fmt", "w13_fmt", "w2_fmt"):
            f = getattr(m, attr, None)
            if f is not None:
                packed += sum(t.numel() * t.element_size() for t in f.tensors().values())
    return dense, packed

out = {}
t0 = time.perf_counter()
if mode == "stream":
    model = LLM(model=folder, quant=quant, device="cpu", dtype=dtype).model
elif mode == "old":
    src = resolve_model(folder)
    cpu = torch.device("cpu")
    model = load_model(src, load_config(src), cpu, resolve_dtype(dtype, cpu))
    quantize_for_load(model, quant)
if mode != "idle":
    out["seconds"] = time.perf_counter() - t0
    out["dense"], out["packed"] = held(model)
# VmHWM: this process's own high-water mark (ru_maxrss would also count the parent's RSS at fork)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["peak"] = int(hwm.split()[1]) * 1024
print("RESULT " + json.dumps(out))
"""


def qwen3_moe_config(gb: float) -> tuple[dict[str, Any], int, int]:
    """(config, checkpoint bytes, largest tensor bytes) for a bf16 checkpoint of about `gb` GB."""
    attn = HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN
    layer = 2 * (EXPERTS * 3 * EXPERT_ROWS * HIDDEN + attn + EXPERTS * HIDDEN)
    embed = 2 * VOCAB * HIDDEN  # bf16 bytes of one [vocab, hidden] matrix
    layers = max(1, round((gb * 1e9 - 2 * embed) / layer))
    cfg = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=HIDDEN,
               intermediate_size=4 * EXPERT_ROWS, moe_intermediate_size=EXPERT_ROWS,
               num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               head_dim=HEAD_DIM, num_experts=EXPERTS, num_experts_per_tok=8,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-6)
    return cfg, layers * layer + 2 * embed, embed


def run_child(mode: str, folder: Path, quant: str, dtype: str, threads: int) -> dict[str, Any]:
    argv = [sys.executable, "-c", CHILD, mode, str(folder), quant, dtype, str(threads)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.5)
    ap.add_argument("--dir", default="/tmp/spillover_load_rss")
    ap.add_argument("--quant", default="int4", choices=["int4", "int8", "fp8"])
    ap.add_argument("--dtype", default="auto",
                    help="model dtype (auto: float32 on the CPU, as LLM picks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old", action="store_true",
                    help="also measure load float + quantize_for_load")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic checkpoint")
    a = ap.parse_args()
    cfg, ckpt_bytes, largest = qwen3_moe_config(a.gb)
    folder = Path(a.dir) / f"qwen3_moe-{cfg['num_hidden_layers']}l"
    t0 = time.time()
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        make_synthetic_folder(cfg, folder)
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint         {on_disk / 1e9:8.2f} GB bf16 ({cfg['num_hidden_layers']} layers x "
          f"{EXPERTS} experts, hidden {HIDDEN}; written in {time.time() - t0:.0f} s)")
    print(f"float model        {ckpt_bytes / 1e9:8.2f} GB in bf16, "
          f"{2 * ckpt_bytes / 1e9:.2f} GB in float32")
    print(f"largest tensor     {largest / 1e6:8.1f} MB bf16 ({2 * largest / 1e6:.1f} MB float32): "
          "embedding, lm_head")
    idle = run_child("idle", folder, a.quant, a.dtype, a.threads)["peak"]
    print(f"idle RSS           {idle / 1e6:8.1f} MB (python + torch + spillover imported)")
    for mode in ("stream", "old") if a.old else ("stream",):
        r = run_child(mode, folder, a.quant, a.dtype, a.threads)
        model = r["dense"] + r["packed"]
        over = r["peak"] - idle
        label = "LLM(quant=...)" if mode == "stream" else "old: float+quantize"
        print(f"[{label}] quant={a.quant} dtype={a.dtype}: load {r['seconds']:.1f} s")
        print(f"  loaded model     {model / 1e9:8.3f} GB (packed {r['packed'] / 1e9:.3f} GB + "
              f"float params {r['dense'] / 1e9:.3f} GB)")
        print(f"  peak RSS         {r['peak'] / 1e6:8.1f} MB; peak - idle {over / 1e6:.1f} MB = "
              f"{over / model:.2f} x loaded model; above the model: {(over - model) / 1e6:.1f} MB "
              f"= {(over - model) / largest:.2f} x largest bf16 tensor")
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
