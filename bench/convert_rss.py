"""Converter peak-RSS measurement on a synthetic multi-GB bf16 checkpoint (not a test).

    python bench/convert_rss.py --gb 3 [--dir /tmp/spillover_rss]

Writes a checkpoint of ~GB gigabytes (MoE-like: many 512x2048 expert matrices plus a few large
2048x32768 ones), converts it to int4-g128 in a child process and samples that process's RSS
(psutil, every 20 ms). Prints peak RSS next to the largest tensor, the total source size and
the baseline RSS of an idle interpreter with torch imported.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

CHILD = """
import sys, torch
from spillover.weights.convert import convert  # imported in both modes: same baseline
if sys.argv[1] == "idle":
    import time; time.sleep(2)
else:
    convert(sys.argv[1], sys.argv[2], "int4", 128, show_progress=False)
"""


def write_checkpoint(folder: Path, gb: float) -> tuple[int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    total, largest, shard, i = 0, 0, 0, 0
    target = int(gb * 1e9)
    while total < target:
        tensors: dict[str, torch.Tensor] = {}
        size = 0
        while size < 500e6 and total + size < target:
            shape = (32768, 2048) if i % 100 == 0 else (512, 2048)  # an lm_head-sized tensor now and then
            t = torch.randn(shape, generator=g).bfloat16()
            tensors[f"model.layers.{i // 100}.mlp.experts.{i % 100}.gate_proj.weight"] = t
            size += t.numel() * 2
            largest = max(largest, t.numel() * 2)
            i += 1
        save_file(tensors, str(folder / f"model-{shard:05d}.safetensors"))
        total += size
        shard += 1
    return total, largest


def peak_rss(args: list[str]) -> tuple[float, float]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args])
    ps = psutil.Process(proc.pid)
    peak, t0 = 0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"child failed with {proc.returncode}")
    return peak / 1e6, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--dir", default="/tmp/spillover_rss")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    total, largest = write_checkpoint(root / "src", a.gb)
    idle, _ = peak_rss(["idle"])
    peak, secs = peak_rss([str(root / "src"), str(root / "out")])
    out_bytes = sum(p.stat().st_size for p in (root / "out").glob("*.safetensors"))
    print(f"source            {total / 1e9:8.2f} GB bf16")
    print(f"largest tensor    {largest / 1e6:8.1f} MB")
    print(f"store (int4-g128) {out_bytes / 1e9:8.2f} GB")
    print(f"idle RSS          {idle:8.1f} MB (python + torch + converter imported)")
    ratio = (peak - idle) / (largest / 1e6)
    print(f"peak RSS          {peak:8.1f} MB  = idle + {ratio:.1f} x largest tensor")
    print(f"time              {secs:8.1f} s  ({total / 1e9 / secs:.2f} GB/s of source)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
