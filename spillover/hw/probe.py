"""Probe this machine: GPUs via NVML, CPU ISA, RAM, disk; optional micro-benchmarks of each link.

Everything degrades gracefully: no NVML, no driver or no GPU gives an empty GPU list and a reason.
Measurements are cached (they take seconds) and reused by later plans on the same machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from spillover.hw.gpus import match_gpu_name, pcie_bandwidth
from spillover.hw.info import (
    DEFAULT_DISK_BW,
    DEFAULT_HOST_MEM_BW,
    GB,
    GPU_BW_EFFICIENCY,
    CpuInfo,
    GpuInfo,
    HardwareInfo,
    LinkRates,
)


def cache_dir() -> Path:
    return Path(os.environ.get("SPILLOVER_CACHE", Path.home() / ".cache" / "spillover"))


def model_cache_dir() -> Path:
    hf = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
    return Path(hf) if hf else Path.home() / ".cache" / "huggingface"


def probe_gpus() -> tuple[list[GpuInfo], str]:
    try:
        import pynvml  # lazily: nvidia-ml-py is an optional dependency
    except ImportError:
        return [], "no GPU probed: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], f"no GPU probed: NVML unavailable ({e})"
    gpus: list[GpuInfo] = []
    try:
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _s(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gen = _try(lambda h=h: pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h), 4)
            width = _try(lambda h=h: pynvml.nvmlDeviceGetMaxPcieLinkWidth(h), 16)
            spec = match_gpu_name(name)
            if spec is not None:
                bw, flops, fp8 = spec.mem_bw_gbs * GB, spec.bf16_tflops * 1e12, spec.fp8
            else:
                bus = _try(lambda h=h: pynvml.nvmlDeviceGetMemoryBusWidth(h), 256)
                clk = _try(lambda h=h: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                           7000)
                bw, flops, fp8 = 2 * clk * 1e6 * bus / 8, 50e12, (major, minor) >= (8, 9)
            gpus.append(
                GpuInfo(
                    i,
                    name,
                    f"sm_{major}{minor}",
                    int(mem.total),
                    int(mem.free),
                    bw,
                    flops,
                    fp8,
                    int(gen),
                    int(width),
                    driver,
                    "nvml",
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus, f"{len(gpus)} GPU(s) found through NVML" if gpus else "NVML found no GPU"


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _try(fn: Any, default: int) -> int:
    try:
        return int(fn())
    except Exception:
        return default


def probe_cpu() -> CpuInfo:
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model in ("unknown CPU", "", platform.processor()):
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    threads = psutil.cpu_count(logical=True) or 1
    cores = psutil.cpu_count(logical=False) or threads
    return CpuInfo(
        model=model,
        cores=cores,
        threads=threads,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        amx="amx_tile" in flags,
    )


def probe(measure: bool = False, disk_path: str | Path | None = None,
          use_cache: bool = True) -> HardwareInfo:
    gpus, gpu_reason = probe_gpus()
    vm = psutil.virtual_memory()
    path = Path(disk_path) if disk_path else model_cache_dir()
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    disk_free = shutil.disk_usage(existing).free
    g = gpus[0] if gpus else None
    rate = pcie_bandwidth(g.pcie_gen, g.pcie_width) if g else 0.0
    sources = {
        "gpu_mem": f"datasheet x {GPU_BW_EFFICIENCY}" if g else "no GPU",
        "host_mem": "assumed 60 GB/s (run `spillover probe --measure`)",
        "h2d": f"PCIe {g.pcie_gen}.0 x{g.pcie_width} table" if g else "no GPU",
        "d2h": f"PCIe {g.pcie_gen}.0 x{g.pcie_width} table" if g else "no GPU",
        "disk": "assumed 2 GB/s (run `spillover probe --measure`)",
    }
    links = LinkRates(
        gpu_mem=g.mem_bw * GPU_BW_EFFICIENCY if g else 0.0,
        host_mem=DEFAULT_HOST_MEM_BW,
        h2d=rate,
        d2h=rate,
        disk=DEFAULT_DISK_BW,
        sources=sources,
    )
    hw = HardwareInfo(
        gpus=tuple(gpus),
        cpu=probe_cpu(),
        ram_total=int(vm.total),
        ram_available=int(vm.available),
        disk_free=int(disk_free),
        disk_path=str(path),
        links=links,
        reasons=(gpu_reason,),
        probed=True,
    )
    measured: dict[str, float] | None
    if measure:
        measured = measure_links(hw, path)
    else:
        measured = load_measurements(hw) if use_cache else None
    if measured:
        hw = apply_measurements(hw, measured)
        if measure:
            save_measurements(hw, measured)
    return hw


# ---- measurements --------------------------------------------------------------------------------
def _machine_key(hw: HardwareInfo) -> str:
    gpus = ",".join(g.name for g in hw.gpus) or "cpu"
    return f"{socket.gethostname()}|{hw.cpu.model}|{gpus}"


def load_measurements(hw: HardwareInfo) -> dict[str, float] | None:
    try:
        data = json.loads((cache_dir() / "probe.json").read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(_machine_key(hw))
    return {k: float(v) for k, v in entry.items()} if isinstance(entry, dict) else None


def save_measurements(hw: HardwareInfo, measured: dict[str, float]) -> Path:
    path = cache_dir() / "probe.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[_machine_key(hw)] = {**measured, "measured_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def apply_measurements(hw: HardwareInfo, m: dict[str, float]) -> HardwareInfo:
    links, sources = hw.links, dict(hw.links.sources)
    when = time.strftime("%Y-%m-%d", time.localtime(m.get("measured_at", time.time())))
    for key, field_name in (
        ("gpu_copy", "gpu_mem"),
        ("cpu_read", "host_mem"),
        ("h2d_pinned", "h2d"),
        ("d2h_pinned", "d2h"),
        ("disk_read", "disk"),
    ):
        if m.get(key):
            value = m[key]
            if key == "gpu_copy":
                # a copy reads and writes every byte; GEMV reads ~0.9 as fast
                value = value / 2 * 0.9
            links = _set_link(links, field_name, value)
            sources[field_name] = f"measured {m[key] / GB:.1f} GB/s ({key}, {when})"
    if m.get("cpu_gemv"):
        links = _set_link(links, "cpu_gemv", m["cpu_gemv"])
        sources["cpu_gemv"] = f"measured {m['cpu_gemv'] / GB:.1f} GB/s (float GEMV, {when})"
    for key in ("cpu_step_s", "cpu_layer_s"):
        if key in m:
            links = _set_link(links, key, float(m[key]))
            sources[key] = f"measured {m[key] * 1e3:.2f} ms (engine decode, {when})"
    return replace(hw, links=replace(links, sources=sources))


def _set_link(links: LinkRates, name: str, value: float) -> LinkRates:
    return replace(links, **{name: value})  # type: ignore[arg-type]  # a float field


def _time_best(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_links(hw: HardwareInfo, disk_path: Path | None = None,
                  size_mib: int = 256) -> dict[str, float]:
    """Short micro-benchmarks (a few seconds): bytes/s per link. GPU links only with CUDA."""
    import torch

    out: dict[str, float] = {}
    n = size_mib << 20
    torch.set_num_threads(hw.cpu.threads)
    host = torch.ones(n // 4, dtype=torch.float32)
    out["cpu_read"] = n / _time_best(lambda: host.sum())
    out["cpu_gemv"] = cpu_gemv_rate(n)
    if torch.cuda.is_available():
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        dev2 = torch.empty_like(dev)

        def timed(fn: Any) -> float:
            fn()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            best = float("inf")
            for _ in range(5):
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                best = min(best, s.elapsed_time(e) / 1e3)
            return best

        out["h2d_pinned"] = n / timed(lambda: dev.copy_(pinned, non_blocking=True))
        out["d2h_pinned"] = n / timed(lambda: pinned.copy_(dev, non_blocking=True))
        out["gpu_copy"] = 2 * n / timed(lambda: dev2.copy_(dev))  # read + write
        del pinned, dev, dev2
    out["disk_read"] = _disk_read_rate(disk_path or Path(tempfile.gettempdir()), min(n, 256 << 20))
    return out


def cpu_gemv_rate(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Bytes/s a one-token float32 matrix-vector product reads (what CPU decode spends its weight
    reads on), over a matrix too large for the caches; best of `repeat`."""
    import torch

    k = 4096
    w = torch.randn(max(nbytes // (4 * k), 1), k)
    x = torch.randn(1, k)
    return w.numel() * 4 / _time_best(lambda: torch.nn.functional.linear(x, w), repeat)


def _disk_read_rate(where: Path, n: int) -> float:
    """Cold read rate of a fresh file; the page cache is dropped for it where the OS allows."""
    where = next((p for p in [where, *where.parents] if p.exists()), Path(tempfile.gettempdir()))
    fd, name = tempfile.mkstemp(dir=where, prefix=".spillover-probe-")
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(n >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        with open(name, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            while f.read(8 << 20):
                pass
            return n / max(time.perf_counter() - t, 1e-9)
    finally:
        os.unlink(name)
