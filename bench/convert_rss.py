"""Converter peak-RSS measurement on a synthetic multi-GB bf16 checkpoint (not a test).

    python bench/convert_rss.py --gb 3 [--dir /tmp/spillover_rss] [--quant int4 --group-size 128]
        [--threads N] [--code OTHER_CHECKOUT]

Writes a checkpoint of ~GB gigabytes (MoE-like: many 512x2048 expert matrices plus a few large
2048x32768 ones), converts it in a child process and samples that process's RSS (psutil, every
20 ms). Prints peak RSS next to the largest tensor, the total source size, the baseline RSS of an
idle interpreter with torch imported, the conversion's own wall time (measured in the child, so
interpreter start-up and imports are excluded) as MB/s of source, and its CPU time (all threads).
`--code` runs the converter of another checkout (e.g. `git archive` of an older commit unpacked
somewhere) on the same data, for before/after; the store digest shows both wrote the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

CHILD = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from spillover.weights.convert import convert  # imported in both modes: same baseline
import spillover
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
if sys.argv[3] == "idle":
    time.sleep(2)
else:
    t0, c0 = time.perf_counter(), time.process_time()
    convert(sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), show_progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"CONVERT_SECONDS {wall} {cpu} {spillover.__file__} {torch.get_num_threads()}")
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
            # an lm_head-sized tensor now and then
            shape = (32768, 2048) if i % 100 == 0 else (512, 2048)
            t = torch.randn(shape, generator=g).bfloat16()
            tensors[f"model.layers.{i // 100}.mlp.experts.{i % 100}.gate_proj.weight"] = t
            size += t.numel() * 2
            largest = max(largest, t.numel() * 2)
            i += 1
        save_file(tensors, str(folder / f"model-{shard:05d}.safetensors"))
        total += size
        shard += 1
    return total, largest


def peak_rss(code: Path, args: list[str]) -> tuple[float, float, str]:
    """(peak RSS MB, wall seconds, child stdout) of one child run."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(code), *args], cwd=code,
                            stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak, t0 = 0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"child failed with {proc.returncode}")
    return peak / 1e6, time.time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--dir", default="/tmp/spillover_rss")
    ap.add_argument("--quant", default="int4", choices=("int4", "int8", "keep"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in the child (0: torch's default)")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose spillover package converts (default: this one)")
    ap.add_argument("--keep-source", action="store_true",
                    help="reuse --dir/src if present, keep it")
    a = ap.parse_args()
    root, code = Path(a.dir), Path(a.code).resolve()
    shutil.rmtree(root / "out", ignore_errors=True)
    if a.keep_source and (root / "src" / "sizes.txt").is_file():
        total, largest = map(int, (root / "src" / "sizes.txt").read_text().split())
    else:
        shutil.rmtree(root, ignore_errors=True)
        total, largest = write_checkpoint(root / "src", a.gb)
        (root / "src" / "sizes.txt").write_text(f"{total} {largest}\n")
    threads = str(a.threads)
    idle, _, _ = peak_rss(code, [threads, "idle"])
    child_args = [threads, str(root / "src"), str(root / "out"), a.quant, str(a.group_size)]
    peak, secs, out = peak_rss(code, child_args)
    conv_s, cpu_s, module, nthreads = out.split("CONVERT_SECONDS ")[1].split()
    conv, cpu = float(conv_s), float(cpu_s)
    out_bytes = sum(p.stat().st_size for p in (root / "out").glob("*.safetensors"))
    shards = json.loads((root / "out" / "manifest.json").read_text())["shards"]
    joined = "".join(shards[s]["sha256"] for s in sorted(shards))
    digest = hashlib.sha256(joined.encode()).hexdigest()
    label = f"{a.quant}-g{a.group_size}" if a.quant == "int4" else a.quant
    print(f"code              {module} ({nthreads} torch threads)")
    print(f"source            {total / 1e9:8.2f} GB bf16")
    print(f"largest tensor    {largest / 1e6:8.1f} MB")
    print(f"store ({label:9s}) {out_bytes / 1e9:8.2f} GB")
    print(f"store digest      {digest[:16]} (sha256 over the shard checksums: equal = same bytes)")
    print(f"idle RSS          {idle:8.1f} MB (python + torch + converter imported)")
    ratio = (peak - idle) / (largest / 1e6)
    print(f"peak RSS          {peak:8.1f} MB  = idle + {ratio:.2f} x largest tensor")
    print(f"convert()         {conv:8.1f} s  = {total / 1e6 / conv:.0f} MB/s of source "
          f"(child wall {secs:.1f} s incl. start-up)")
    # CPU seconds (all threads, user + system) are steadier than wall time on a shared machine.
    print(f"convert() CPU     {cpu:8.1f} s  = {cpu / (total / 1e9):.2f} CPU s per GB of source")
    shutil.rmtree(root / "out", ignore_errors=True)
    if not a.keep_source:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
