"""Predicted tokens/s from the bytes each link moves per token (docs/planning.md, "4. Speed").

Decode: t = Σ_links bytes / rate + t_fixed (links do not overlap in a step; how close that comes:
docs/planning.md, "8. How well it predicts", re-measured by `python bench/plan_vs_measured.py`).
Prefill: a chunk of T tokens streams the non-resident weights once while the GPU computes, so the
GPU and PCIe terms overlap (double-buffered layerwise prefill): t = max(compute, HBM, PCIe) + disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spillover.hw.info import HardwareInfo

GPU_FLOPS_EFFICIENCY = 0.5  # achieved/peak for bf16 GEMMs of prefill chunk shapes
CPU_FLOPS_EFFICIENCY = 0.3
# Launches, sync, sampling and Python per decode step and per layer (about ten ops a layer), as
# they cost with CUDA graphs or fused kernels; an eager step costs more (docs/planning.md,
# "8. How well it predicts"; `python bench/plan_vs_measured.py` measures the fixed term).
STEP_OVERHEAD_S = 0.4e-3
LAYER_OVERHEAD_S = 25e-6
# Without a GPU, eager steps: per-layer Python, small ops and attention cost far more than a
# fused GPU layer. Defaults when `spillover probe --measure` has not measured this machine
# (LinkRates.cpu_step_s / cpu_layer_s, from an engine decode of a small synthetic model:
# spillover.bench.overhead); measured on a 2-core AMD EPYC VM.
CPU_STEP_OVERHEAD_S = 3e-3
CPU_LAYER_OVERHEAD_S = 0.8e-3
# CPU float GEMV reads below the streaming-sum rate that `host_mem` measures (LinkRates.cpu_gemv
# when measured)
CPU_GEMV_EFFICIENCY = 0.75


@dataclass(frozen=True)
class Traffic:
    """Bytes one decode token reads from each place, and what a prefill chunk must move."""

    gpu_bytes: float  # weights + KV + state read from VRAM
    # bytes in RAM touched (CPU computes them or they cross PCIe); all, without GPU
    host_bytes: float
    disk_bytes: float  # weights only on disk touched
    host_stream_bytes_per_chunk: float  # host-resident weights a prefill chunk streams to the GPU
    disk_bytes_per_chunk: float
    flops_per_token: float  # prefill compute per prompt token
    num_layers: int


@dataclass(frozen=True)
class Prediction:
    decode_tok_s: float
    prefill_tok_s: float
    decode_ms_by_link: dict[str, float] = field(default_factory=dict)
    prefill_ms_by_link: dict[str, float] = field(default_factory=dict)  # per chunk
    host_path: str = "cpu"  # how host-resident experts are computed at decode: cpu | pcie
    prefill_chunk_tokens: int = 0
    notes: tuple[str, ...] = ()


def predict(traffic: Traffic, hw: HardwareInfo, chunk_tokens: int) -> Prediction:
    links = hw.links
    has_gpu = hw.gpu is not None
    notes: list[str] = []
    # Host-resident weights at decode: computed by the CPU (reads DRAM) or copied to a GPU slot
    # (crosses PCIe), whichever link is faster on this machine (docs/architecture.md,
    # "Tiered experts").
    if has_gpu and links.h2d > links.host_mem:
        host_path, host_rate = "pcie", links.h2d
    else:
        host_path, host_rate = "cpu", links.host_mem
    dec: dict[str, float] = {}
    if has_gpu:
        dec["gpu_mem"] = traffic.gpu_bytes / links.gpu_mem * 1e3
    if not has_gpu:  # the CPU computes every layer: its matrix-vector products read the weights
        host_rate = links.cpu_gemv or links.host_mem * CPU_GEMV_EFFICIENCY
    if traffic.host_bytes:
        dec["pcie" if host_path == "pcie" else "host_mem"] = traffic.host_bytes / host_rate * 1e3
    if traffic.disk_bytes:
        dec["disk"] = traffic.disk_bytes / links.disk * 1e3
    if has_gpu:
        fixed = STEP_OVERHEAD_S + LAYER_OVERHEAD_S * traffic.num_layers
    else:
        fixed = ((links.cpu_step_s or CPU_STEP_OVERHEAD_S)
                 + (links.cpu_layer_s or CPU_LAYER_OVERHEAD_S) * traffic.num_layers)
    dec["fixed"] = fixed * 1e3
    decode_s = sum(dec.values()) / 1e3

    t = max(1, chunk_tokens)
    pre: dict[str, float] = {}
    if has_gpu:
        gpu = hw.gpus[0]
        flops = gpu.bf16_flops * GPU_FLOPS_EFFICIENCY
        pre["gpu_compute"] = t * traffic.flops_per_token / flops * 1e3
        pre["gpu_mem"] = traffic.gpu_bytes / links.gpu_mem * 1e3
        if traffic.host_stream_bytes_per_chunk:
            pre["pcie"] = traffic.host_stream_bytes_per_chunk / links.h2d * 1e3
        overlapped = max(pre.values())
    else:
        flops = hw.cpu.fp32_flops * CPU_FLOPS_EFFICIENCY
        pre["cpu_compute"] = t * traffic.flops_per_token / flops * 1e3
        pre["host_mem"] = traffic.host_bytes / links.host_mem * 1e3
        overlapped = max(pre.values())
        notes.append("no GPU: prefill is CPU compute bound")
    if traffic.disk_bytes_per_chunk:
        pre["disk"] = traffic.disk_bytes_per_chunk / links.disk * 1e3
    pre["fixed"] = dec["fixed"]
    chunk_s = (overlapped + pre.get("disk", 0.0) + pre["fixed"]) / 1e3
    return Prediction(
        decode_tok_s=1.0 / decode_s if decode_s > 0 else 0.0,
        prefill_tok_s=t / chunk_s if chunk_s > 0 else 0.0,
        decode_ms_by_link=dec,
        prefill_ms_by_link=pre,
        host_path=host_path,
        prefill_chunk_tokens=t,
        notes=tuple(notes),
    )
