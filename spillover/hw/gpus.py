"""Known GPUs, so a plan can be made for hardware that is not in this machine.

Datasheet peaks (BF16 dense tensor TFLOPS with FP32 accumulation, no sparsity) and practical
host-link rates per PCIe generation. How the planner uses them: docs/planning.md, "1. Inputs".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    key: str  # canonical short id, e.g. "rtx5090"
    name: str
    vram_gb: float  # label capacity, GB = 1e9 bytes (what vendors print)
    mem_bw_gbs: float  # datasheet peak
    bf16_tflops: float
    sm: str
    pcie_gen: int
    pcie_width: int
    fp8: bool
    fp4: bool
    aliases: tuple[str, ...] = ()


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("rtx3060", "NVIDIA GeForce RTX 3060 12GB", 12, 360, 25.5, "sm_86", 4, 16, False, False),
    GpuSpec("rtx3090", "NVIDIA GeForce RTX 3090", 24, 936, 71, "sm_86", 4, 16, False, False),
    GpuSpec("rtx4060ti", "NVIDIA GeForce RTX 4060 Ti 16GB",
            16, 288, 44.1, "sm_89", 4, 8, True, False),
    GpuSpec("rtx4070tisuper", "NVIDIA GeForce RTX 4070 Ti SUPER",
            16, 672, 88.2, "sm_89", 4, 16, True, False),
    GpuSpec("rtx4080", "NVIDIA GeForce RTX 4080", 16, 716.8, 97.5, "sm_89", 4, 16, True, False),
    GpuSpec("rtx4090", "NVIDIA GeForce RTX 4090", 24, 1008, 165.2, "sm_89", 4, 16, True, False),
    GpuSpec("rtx5070ti", "NVIDIA GeForce RTX 5070 Ti", 16, 896, 87.9, "sm_120", 5, 16, True, True),
    GpuSpec("rtx5080", "NVIDIA GeForce RTX 5080", 16, 960, 112.6, "sm_120", 5, 16, True, True),
    GpuSpec("rtx5090", "NVIDIA GeForce RTX 5090", 32, 1792, 209.5, "sm_120", 5, 16, True, True),
    GpuSpec("a6000", "NVIDIA RTX A6000",
            48, 768, 154.8, "sm_86", 4, 16, False, False, ("rtxa6000",)),
    GpuSpec("rtx6000ada", "NVIDIA RTX 6000 Ada Generation",
            48, 960, 364.2, "sm_89", 4, 16, True, False),
    GpuSpec("rtxpro6000", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
            96, 1792, 504, "sm_120", 5, 16, True, True, ("rtxpro6000blackwell", "pro6000")),
    GpuSpec("l4", "NVIDIA L4", 24, 300, 121, "sm_89", 4, 16, True, False),
    GpuSpec("l40s", "NVIDIA L40S", 48, 864, 362, "sm_89", 4, 16, True, False),
    GpuSpec("a100-40gb", "NVIDIA A100-SXM4-40GB",
            40, 1555, 312, "sm_80", 4, 16, False, False, ("a10040",)),
    GpuSpec("a100-80gb", "NVIDIA A100-SXM4-80GB",
            80, 2039, 312, "sm_80", 4, 16, False, False, ("a100", "a10080")),
    GpuSpec("a100-80gb-pcie", "NVIDIA A100 80GB PCIe", 80, 1935, 312, "sm_80", 4, 16, False, False),
    GpuSpec("h100-pcie", "NVIDIA H100 PCIe", 80, 2000, 756, "sm_90", 5, 16, True, False),
    GpuSpec("h100-sxm", "NVIDIA H100 80GB HBM3",
            80, 3350, 989, "sm_90", 5, 16, True, False, ("h100", "h100sxm5")),
    GpuSpec("h200", "NVIDIA H200", 141, 4800, 989, "sm_90", 5, 16, True, False, ("h200sxm",)),
    GpuSpec("b200", "NVIDIA B200", 180, 8000, 2250, "sm_100", 5, 16, True, True),
)

# Practical pinned host<->device rate per direction for an x16 link; narrower links scale.
PCIE_X16_GBS = {3: 12.5, 4: 25.0, 5: 54.0, 6: 100.0}


def pcie_bandwidth(gen: int, width: int = 16) -> float:
    """Practical pinned copy rate in bytes/s for a PCIe link."""
    per_x16 = PCIE_X16_GBS.get(gen, PCIE_X16_GBS[4])
    return per_x16 * GB * max(1, width) / 16


def _norm(s: str) -> str:
    s = s.lower()
    for word in ("nvidia", "geforce", "generation", "edition", "workstation"):
        s = s.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", s)


class UnknownGpuError(ValueError):
    pass


def find_gpu(query: str) -> GpuSpec:
    """Resolve a user-typed name ('rtx5090', '4090', 'RTX PRO 6000', 'H100') to one table row."""
    q = _norm(query)
    if not q:
        raise UnknownGpuError("empty GPU name")
    for g in GPUS:
        if q == _norm(g.key) or q in (_norm(a) for a in g.aliases) or q == _norm(g.name):
            return g
    # "4090" or "5090" alone: match on the model number, preferring the shortest key
    hits = [g for g in GPUS if q in _norm(g.key) or q in _norm(g.name)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        best = min(hits, key=lambda g: len(g.key))
        if all(_norm(best.key) in _norm(h.key) for h in hits):
            return best
        names = ", ".join(h.key for h in hits)
        raise UnknownGpuError(f"GPU name {query!r} is ambiguous: {names}")
    known = ", ".join(g.key for g in GPUS)
    raise UnknownGpuError(f"unknown GPU {query!r}; known: {known} (or give --vram and --gpu-bw)")


def match_gpu_name(nvml_name: str) -> GpuSpec | None:
    """Best table row for a name reported by the driver, for bandwidth/TFLOPS the driver
    does not give."""
    n = _norm(nvml_name)
    best: GpuSpec | None = None
    best_len = 0
    for g in GPUS:
        for cand in (g.name, g.key, *g.aliases):
            c = _norm(cand)
            if c and c in n and len(c) > best_len:
                best, best_len = g, len(c)
    return best
