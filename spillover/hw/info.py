"""HardwareInfo: what probe found or the user named. Every assumed number carries its reason."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from spillover.hw.gpus import GpuSpec, find_gpu, pcie_bandwidth

GiB = 1 << 30
GB = 1e9

# Priors used when nothing was measured (docs/planning.md, "1. Inputs").
DEFAULT_HOST_MEM_BW = 60e9  # dual-channel DDR5 desktop, all threads reading
DEFAULT_DISK_BW = 2.0e9  # NVMe read through mmap page faults, well under the sequential peak
GPU_BW_EFFICIENCY = 0.8  # achieved/datasheet for bandwidth-bound GEMV on the GPU


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    sm: str
    vram_total: int  # bytes
    vram_free: int | None  # bytes, when probed
    mem_bw: float  # datasheet bytes/s
    bf16_flops: float
    fp8: bool
    pcie_gen: int
    pcie_width: int
    driver: str | None = None
    source: str = "table"  # nvml | table | flags


@dataclass(frozen=True)
class CpuInfo:
    model: str = "unknown CPU"
    cores: int = 1
    threads: int = 1
    avx2: bool = False
    avx512: bool = False
    amx: bool = False

    @property
    def fp32_flops(self) -> float:
        """Rough dense peak: cores x 3 GHz x FLOP/cycle of the widest vector unit."""
        per_cycle = 64 if self.avx512 else (32 if self.avx2 else 8)
        return self.cores * 3e9 * per_cycle


@dataclass(frozen=True)
class LinkRates:
    """Effective bytes/s per link, as used by the speed model."""

    gpu_mem: float
    host_mem: float
    h2d: float
    d2h: float
    disk: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # The CPU decode path, measured by `spillover probe --measure` (0: not measured, the speed
    # model's defaults apply): bytes/s that float matrix-vector products read, and the fixed
    # seconds of an engine step and of each decoder layer (Python, small ops, attention).
    cpu_gemv: float = 0.0
    cpu_step_s: float = 0.0
    cpu_layer_s: float = 0.0


@dataclass(frozen=True)
class HardwareInfo:
    gpus: tuple[GpuInfo, ...]
    cpu: CpuInfo
    ram_total: int
    ram_available: int | None
    disk_free: int | None
    disk_path: str
    links: LinkRates
    reasons: tuple[str, ...] = ()
    probed: bool = False

    @property
    def gpu(self) -> GpuInfo | None:
        return self.gpus[0] if self.gpus else None

    def describe(self) -> str:
        g = self.gpu
        gpu = f"{g.name} {g.vram_total / GiB:.1f} GiB" if g else "no GPU"
        return f"{gpu}, {self.ram_total / GiB:.1f} GiB RAM, {self.cpu.cores} cores"

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "sm": g.sm,
                    "vram_total": g.vram_total,
                    "vram_free": g.vram_free,
                    "mem_bw": g.mem_bw,
                    "bf16_tflops": g.bf16_flops / 1e12,
                    "fp8": g.fp8,
                    "pcie": f"gen{g.pcie_gen} x{g.pcie_width}",
                    "driver": g.driver,
                    "source": g.source,
                }
                for g in self.gpus
            ],
            "cpu": {
                "model": self.cpu.model,
                "cores": self.cpu.cores,
                "threads": self.cpu.threads,
                "avx2": self.cpu.avx2,
                "avx512": self.cpu.avx512,
                "amx": self.cpu.amx,
            },
            "ram_total": self.ram_total,
            "ram_available": self.ram_available,
            "disk_free": self.disk_free,
            "disk_path": self.disk_path,
            "links_bytes_per_s": {
                "gpu_mem": self.links.gpu_mem,
                "host_mem": self.links.host_mem,
                "h2d": self.links.h2d,
                "d2h": self.links.d2h,
                "disk": self.links.disk,
            },
            "link_sources": dict(self.links.sources),
            "reasons": list(self.reasons),
        }


# ---- units ---------------------------------------------------------------------------------------
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """'32GiB', '60GB', '1.9TB', '512MiB', '1e9' -> bytes (GB = 1e9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a size from {text!r} (examples: 32GiB, 60GB, 1.9TB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str) -> float:
    """'80GB/s', '3.5 GB/s', '900MiB/s' -> bytes/s."""
    t = text.strip()
    t = t[:-2] if t.lower().endswith("/s") else t
    return float(parse_bytes(t))


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if abs(n) >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{int(n)} B"


# ---- hardware the user names ---------------------------------------------------------------------
def gpu_from_spec(spec: GpuSpec, index: int = 0) -> GpuInfo:
    # drivers report a little less than the label (ECC, reserved pages): e.g. 32 GB -> 31.8 GiB
    return GpuInfo(
        index=index,
        name=spec.name,
        sm=spec.sm,
        vram_total=int(spec.vram_gb * GiB * 0.985),
        vram_free=None,
        mem_bw=spec.mem_bw_gbs * GB,
        bf16_flops=spec.bf16_tflops * 1e12,
        fp8=spec.fp8,
        pcie_gen=spec.pcie_gen,
        pcie_width=spec.pcie_width,
        source="table",
    )


def with_overrides(
    base: HardwareInfo,
    *,
    gpu: str | None = None,
    no_gpu: bool = False,
    vram: str | None = None,
    ram: str | None = None,
    disk: str | None = None,
    pcie: int | None = None,
    ram_bw: str | None = None,
    gpu_bw: str | None = None,
    disk_bw: str | None = None,
) -> HardwareInfo:
    """Replace probed facts by named ones (`--gpu rtx5090 --ram 60GB`), keeping reasons honest."""
    reasons = list(base.reasons)
    sources = dict(base.links.sources)
    gpus = list(base.gpus)
    links = base.links
    if no_gpu:
        gpus = []
        reasons.append("GPU: none (--no-gpu)")
    elif gpu:
        spec = find_gpu(gpu)
        gpus = [gpu_from_spec(spec)]
        reasons.append(f"GPU: {spec.name} from the built-in table (--gpu {gpu})")
        links = replace(links, gpu_mem=spec.mem_bw_gbs * GB * GPU_BW_EFFICIENCY)
        sources["gpu_mem"] = f"table {spec.mem_bw_gbs:.0f} GB/s x {GPU_BW_EFFICIENCY}"
        rate = pcie_bandwidth(spec.pcie_gen, spec.pcie_width)
        links = replace(links, h2d=rate, d2h=rate)
        sources["h2d"] = sources["d2h"] = f"table PCIe {spec.pcie_gen}.0 x{spec.pcie_width}"
    if vram:
        size = parse_bytes(vram)
        if gpus:
            gpus[0] = replace(gpus[0], vram_total=size, vram_free=None, source="flags")
        else:
            generic = GpuInfo(
                0,
                "GPU (named by --vram)",
                "unknown",
                size,
                None,
                500 * GB,
                50e12,
                False,
                4,
                16,
                source="flags",
            )
            gpus = [generic]
            links = replace(links, gpu_mem=generic.mem_bw * GPU_BW_EFFICIENCY)
            sources["gpu_mem"] = "assumed 500 GB/s (no --gpu given)"
        reasons.append(f"VRAM: {fmt_bytes(size)} (--vram {vram})")
    if pcie and gpus:
        width = gpus[0].pcie_width
        gpus[0] = replace(gpus[0], pcie_gen=pcie)
        rate = pcie_bandwidth(pcie, width)
        links = replace(links, h2d=rate, d2h=rate)
        sources["h2d"] = sources["d2h"] = f"PCIe {pcie}.0 x{width} (--pcie)"
    ram_total, ram_avail = base.ram_total, base.ram_available
    if ram:
        ram_total, ram_avail = parse_bytes(ram), None
        reasons.append(f"RAM: {fmt_bytes(ram_total)} (--ram {ram})")
    disk_free = parse_bytes(disk) if disk else base.disk_free
    if ram_bw:
        links = replace(links, host_mem=parse_rate(ram_bw))
        sources["host_mem"] = f"--ram-bw {ram_bw}"
    if gpu_bw:
        links = replace(links, gpu_mem=parse_rate(gpu_bw))
        sources["gpu_mem"] = f"--gpu-bw {gpu_bw}"
    if disk_bw:
        links = replace(links, disk=parse_rate(disk_bw))
        sources["disk"] = f"--disk-bw {disk_bw}"
    named = bool(gpu or no_gpu or vram or ram)
    return HardwareInfo(
        gpus=tuple(gpus),
        cpu=base.cpu,
        ram_total=ram_total,
        ram_available=ram_avail,
        disk_free=disk_free,
        disk_path=base.disk_path,
        links=replace(links, sources=sources),
        reasons=tuple(reasons),
        probed=base.probed and not named,
    )


def nominal_hardware(gpu: str | None = "rtx5090", ram: str = "64GB",
                     cores: int = 16) -> HardwareInfo:
    """A named machine with default links, for tests, bench dry runs and docs."""
    base = HardwareInfo(
        gpus=(),
        cpu=CpuInfo("unknown CPU", cores, cores * 2, True, False, False),
        ram_total=parse_bytes(ram),
        ram_available=None,
        disk_free=None,
        disk_path=".",
        links=LinkRates(
            0.0,
            DEFAULT_HOST_MEM_BW,
            0.0,
            0.0,
            DEFAULT_DISK_BW,
            {"host_mem": "assumed 60 GB/s", "disk": "assumed 2 GB/s"},
        ),
    )
    return with_overrides(base, gpu=gpu) if gpu else base
