"""Launch configurations of the int and FP8 decode GEMVs (`quant_gemv.py`, `fp8_gemv.py`): the
tile, split and warp choice per shape, its checks, and the split-K workspace they share.
Importing this module needs no GPU (the configs are plain arithmetic on shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
import triton

_WORKSPACE: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partial sums, int32 arrival counters) for split-K, grown on demand and reused.

    Counters start at 0 and every launch leaves them at 0. One pair per (device, stream): launches
    on one stream run in order, so they can share it; two streams could interleave their programs.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    ws, cnt = _WORKSPACE.get((device, stream), (None, None))
    if ws is None or cnt is None or ws.numel() < partials or cnt.numel() < tiles:
        ws = torch.empty(max(partials, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
        _WORKSPACE[(device, stream)] = (ws, cnt)
    return ws, cnt


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    pdl: bool | None = None  # programmatic dependent launch; None: wherever the GPU has it
    max_regs: int | None = None  # ptxas register cap (more programs resident per SM)
    # a thread's steps on consecutive word rows of one group; None: where they fit
    runs: bool | None = None

    def __str__(self) -> str:
        pdl = "" if self.pdl is None else f" pdl={int(self.pdl)}"
        regs = "" if self.max_regs is None else f" maxnreg={self.max_regs}"
        runs = "" if self.runs is None else f" runs={int(self.runs)}"
        return (f"BLOCK_N={self.block_n} BLOCK_K={self.block_k} SPLIT_K={self.split_k} "
                f"warps={self.num_warps}{pdl}{regs}{runs}")


TARGET_PROGRAMS = 1024  # FP8: ~8 per SM on a 132-SM H100/H200 (python bench/quant_gemv.py)
MAX_STEPS = 16  # the int kernel unrolls its K loop: a bound on code size and compile time


@cache  # pure in its ints, and called for every quantized matmul of a decode step
def default_config(rows: int, n: int, k: int, bits: int, fp8: bool = False, symmetric: bool = False,
                   group: int = 128, biased: bool = True) -> GemvConfig:
    """Tile, split, warps and register cap for `rows` rows of an [N, K] weight (fitted to sweeps
    on an H200 and an H100 with programmatic dependent launch, bench/quant_gemv.py).

    int (kn layout): a program covers its outputs' whole K range (no split-K, whose cross-program
    reduction costs more than it saves) in up to 8 unrolled steps of 1024 codes for one row, 512 for
    several; 16 output channels, 32 where that still leaves 256 programs (int8) or for one row of
    N >= 8192 (int4). Warps: one row, so that each thread loads 8 words (int8) or 4 (int4) a step,
    4-16; several rows, 8. Register caps (ptxas schedules differently under each; figures in
    docs/kernel_notes.md): at 16 warps 64, so two programs fit an SM; int4 where runs fit
    (`runs_fit`: `group`, and `biased` for 16-bit x) one row 48 (asymmetric, 16 channels), 56
    (symmetric) or 64 (32 channels), several rows 48.
    FP8 (nk layout): 64 x 128, split-K while the grid stays within TARGET_PROGRAMS.
    """
    if not fp8:
        if bits == 8:
            block_n = 32 if rows * triton.cdiv(n, 32) >= 256 else 16
        else:
            block_n = 32 if rows == 1 and n >= 8192 else 16
        block_k = 1024 if rows == 1 else 512
        while block_k > 16 and k % block_k:
            block_k //= 2
        # split the fewest ways that leave at most 8 steps (any divisor: K = 43 x 256)
        steps = k // block_k
        split = next(d for d in range(1, steps + 1) if steps % d == 0 and steps // d <= 8)
        words = block_k * bits // 32 * block_n
        warps = max(4, min(16, words // (32 * (8 if bits == 8 else 4)))) if rows == 1 else 8
        cfg = GemvConfig(block_n, block_k, split, warps, max_regs=64 if warps >= 16 else None)
        if bits == 4 and runs_fit(k, bits, group, cfg, biased):
            if rows > 1:
                return replace(cfg, max_regs=48)
            if warps >= 16:
                return replace(cfg, max_regs=64 if block_n > 16 else (56 if symmetric else 48))
        return cfg
    block_n, block_k = 64, 128
    while block_k > 16 and k % block_k:
        block_k //= 2
    split = 1
    tiles = rows * triton.cdiv(n, block_n)
    while split < 8 and tiles * split * 2 <= TARGET_PROGRAMS and k % (block_k * split * 2) == 0 \
            and k // (split * 2) >= 2 * block_k:
        split *= 2
    return GemvConfig(block_n, block_k, split, 4)


def _check(k: int, vals: int, group: int, cfg: GemvConfig) -> None:
    if k % (cfg.block_k * cfg.split_k) or cfg.block_k % vals:
        raise ValueError(f"K={k} is not a multiple of BLOCK_K x SPLIT_K = {cfg.block_k} "
                         f"x {cfg.split_k}")
    if cfg.block_k > group and cfg.block_k % group:
        raise ValueError(f"BLOCK_K={cfg.block_k} must be a multiple of the group "
                         f"{group} when larger")
    if cfg.block_k < group and group % cfg.block_k:
        raise ValueError(f"BLOCK_K={cfg.block_k} must divide the group {group} when smaller")


def runs_fit(k: int, bits: int, group: int, cfg: GemvConfig, biased: bool) -> bool:
    """Whether each thread row's NSTEPS word rows can be one run inside a quantization group:
    steps of several groups (else the scale is per step anyway), and the steps divide a
    group's word rows."""
    steps = k // (cfg.block_k * cfg.split_k)
    return biased and cfg.block_k > group and (group * bits // 32) % steps == 0
