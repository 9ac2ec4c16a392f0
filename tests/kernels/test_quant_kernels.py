"""Triton W4A16/W8A16 and FP8 GEMV and GEMM (kn layout) against the torch references.

On the CPU they run under TRITON_INTERPRET=1; on CUDA (scripts/gpu_check, the device
machine) for real.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from spillover.kernels.ref_quant import fp8_matmul_ref, quant_matmul_kn_ref, quant_matmul_ref  # noqa: E402
from spillover.kernels.triton.fp8_gemv import fp8_gemv  # noqa: E402
from spillover.kernels.triton.quant_gemm import GemmConfig, align_rows, fp8_gemm, quant_gemm  # noqa: E402
from spillover.kernels.triton.quant_gemv import GemvConfig, default_config, quant_gemv  # noqa: E402
from spillover.quant import Fp8BlockWeight, Int4Weight, Int8Weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (bits, group, symmetric)
    (4, 128, True), (4, 32, False), (8, 0, True), (8, 16, True),
]


def _fmt(bits: int, group: int, sym: bool, e: int, n: int, k: int):  # type: ignore[no-untyped-def]
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(bits + group))
    if bits == 4:
        return Int4Weight.pack(w, group, sym, act_dtype=torch.float32).to(DEVICE).to_layout("nk")
    return Int8Weight.pack(w, group or None, act_dtype=torch.float32).to(DEVICE).to_layout("nk")


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("kernel", [quant_gemv, quant_gemm])
@pytest.mark.parametrize("stacked", [False, True])
def test_kernel_matches_reference(bits: int, group: int, sym: bool, kernel, stacked: bool) -> None:  # type: ignore[no-untyped-def]
    e, n, k = (3, 40, 256) if stacked else (1, 40, 256)
    fmt = _fmt(bits, group, sym, e, n, k)
    t = 5 if kernel is quant_gemv else 19
    x = torch.randn(t, k, device=DEVICE)
    ids = torch.randint(0, e, (t,), device=DEVICE) if stacked else None
    kn = fmt.to_layout("kn")
    args = (x, kn.qweight, kn.scales, kn.mins, ids)
    ref = quant_matmul_kn_ref(*args, bits=bits, group_size=fmt.group_size)
    # the kn reference is the storage-layout reference, bit for bit
    assert torch.equal(ref, quant_matmul_ref(x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=bits,
                                             group_size=fmt.group_size))
    out = kernel(*args, bits=bits, group_size=fmt.group_size)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(("group", "sym"), [(128, False), (128, True), (32, False)])
@pytest.mark.parametrize("cfg", [None, GemmConfig(16, 64, 16, 4)], ids=str)
def test_gemm_reads_tiled_words(group: int, sym: bool, cfg: GemmConfig | None) -> None:
    """The grouped GEMM on the tiled layout (`ref_quant.tile_words`, what int4 experts hold on
    Hopper): the same result as on kn words. K = 512 is two 32-word tiles; N = 48 three
    16-channel tiles, so a program's last tiles are masked (by default 32 channels x 32 words a
    step; also 64 x 16)."""
    from spillover.kernels.triton.quant_gemm import default_gemm_config

    assert default_gemm_config(4, 48, 64, 8, tiled=True) == GemmConfig(16, 32, 32, 4)
    fmt = _fmt(4, group, sym, 3, 48, 512)
    kn, tiled = fmt.to_layout("kn"), fmt.to_layout("tiled")
    x = torch.randn(19, 512, device=DEVICE)
    ids = torch.randint(0, 3, (19,), device=DEVICE)
    ref = quant_matmul_kn_ref(x, kn.qweight, kn.scales, kn.mins, ids, bits=4, group_size=group)
    out = quant_gemm(x, tiled.qweight, tiled.scales, tiled.mins, ids, bits=4, group_size=group,
                     config=cfg, tiled=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


def test_gemm_refuses_tiles_it_cannot_read() -> None:
    tiled = _fmt(4, 128, False, 2, 48, 512).to_layout("tiled")
    x = torch.randn(3, 512, device=DEVICE)
    with pytest.raises(ValueError, match="tiled words need"):
        quant_gemm(x, tiled.qweight, tiled.scales, tiled.mins, None, bits=4, group_size=128,
                   config=GemmConfig(16, 40, 16, 4), tiled=True)


# bf16 x only on the GPU: the Triton interpreter's tl.dot takes bf16 operands as raw bits (float16
# and float32 are exact there)
GEMM_X_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("dtype", GEMM_X_DTYPES)
def test_gemm_16bit_activations(bits: int, group: int, sym: bool, dtype: torch.dtype) -> None:
    """The prefill GEMM with 16-bit x (the production case: weights cast to x's dtype for the dot)
    against the float32 reference, within 16-bit rounding, with expert ids."""
    fmt = _fmt(bits, group, sym, 3, 40, 256).to_layout("kn")
    x = torch.randn(19, 256, device=DEVICE).to(dtype)
    ids = torch.randint(0, 3, (19,), device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    ref = quant_matmul_kn_ref(x.float(), *args[1:], bits=bits, group_size=fmt.group_size)
    out = quant_gemm(*args, bits=bits, group_size=fmt.group_size)
    assert out.dtype == dtype
    # the weights are rounded to x's dtype for the dot: float16 measured 4.5e-4 of max
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref, rtol=2 * eps,
                               atol=2 * eps * float(ref.abs().max()))


# Tiles smaller than, equal to and spanning several groups; split-K with its float32 reduction.
GEMV_CONFIGS = [GemvConfig(16, 32, 1, 4), GemvConfig(8, 256, 1, 2), GemvConfig(64, 64, 4, 4),
                GemvConfig(32, 128, 2, 8)]


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=str)
def test_gemv_configs_match_reference(bits: int, group: int, sym: bool, cfg: GemvConfig) -> None:
    fmt = _fmt(bits, group, sym, 3, 40, 256).to_layout("kn")
    x = torch.randn(4, 256, device=DEVICE)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    ref = quant_matmul_kn_ref(*args, bits=bits, group_size=fmt.group_size)
    out = quant_gemv(*args, bits=bits, group_size=fmt.group_size, config=cfg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("cfg", [GEMV_CONFIGS[0], GEMV_CONFIGS[2]], ids=str)
def test_gemv_sparse_rows(bits: int, group: int, sym: bool, cfg: GemvConfig) -> None:
    """Expert -1 (a row another tier serves) comes out zero; an expanded x (row stride 0) reads
    one row for all."""
    fmt = _fmt(bits, group, sym, 3, 40, 256).to_layout("kn")
    x = torch.randn(1, 256, device=DEVICE).expand(4, 256)
    ids = torch.tensor([2, -1, 0, -1], device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins)
    out = quant_gemv(*args, ids, bits=bits, group_size=fmt.group_size, config=cfg, sparse=True)
    ref = quant_matmul_kn_ref(*args, ids.clamp(min=0), bits=bits, group_size=fmt.group_size)
    live = ids >= 0
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))
    torch.testing.assert_close(out[live], ref[live], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("cfg", [None, GemvConfig(8, 64, 2, 4)], ids=str)
def test_fp8_gemv_matches_reference(stacked: bool, cfg: GemvConfig | None) -> None:
    e, n, k = (3, 200, 256) if stacked else (1, 200, 256)  # N not a multiple of the 128 block
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(7))
    fmt = Fp8BlockWeight.pack(w, act_dtype=torch.float32).to(DEVICE)
    x = torch.randn(5, k, device=DEVICE)
    ids = torch.randint(0, e, (5,), device=DEVICE) if stacked else None
    ref = fp8_matmul_ref(x, fmt.weight, fmt.scale, ids)
    torch.testing.assert_close(fp8_gemv(x, fmt.weight, fmt.scale, ids, config=cfg), ref, rtol=1e-4,
                               atol=2e-4)


def _fp8_blocks(e: int, n: int, k: int, block: tuple[int, int],
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [E, N, K], float32 scales [E, N/BN, K/BK]) for a BN x BK block, as
    checkpoints store them."""
    bn, bk = block
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed))
    scale = w.view(e, n // bn, bn, k // bk, bk).abs().amax((2, 4)) / 448.0
    q = (w / scale.repeat_interleave(bn, 1).repeat_interleave(bk, 2)).to(torch.float8_e4m3fn)
    return q.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("block", [(128, 128), (1, 256), (32, 64)], ids=str)
def test_fp8_gemm_matches_reference(stacked: bool, block: tuple[int, int]) -> None:
    """Square 128 blocks with N = 200 (a partial block and a partial 64-channel tile), one scale per
    row (FP8_DYNAMIC) and rectangular blocks; rows routed to experts and padded per expert."""
    e, n, k = (3, 200, 256) if stacked else (1, 200, 256)
    if block == (128, 128):
        fmt = Fp8BlockWeight.pack(torch.randn(e, n, k, generator=torch.Generator().manual_seed(11)),
                                  act_dtype=torch.float32).to(DEVICE)
        weight, scale = fmt.weight, fmt.scale
    else:
        n = 192
        weight, scale = _fp8_blocks(e, n, k, block, 12)
    t = 37
    x = torch.randn(t, k, device=DEVICE)
    ids = torch.randint(0, e, (t,), device=DEVICE) if stacked else None
    ref = fp8_matmul_ref(x, weight, scale, ids, block=block)
    torch.testing.assert_close(fp8_gemm(x, weight, scale, ids, block=block), ref, rtol=1e-4,
                               atol=2e-4)


@pytest.mark.parametrize("cfg", [None, GemvConfig(8, 64, 2, 4)], ids=str)
def test_fp8_gemv_per_channel_scales(cfg: GemvConfig | None) -> None:
    """FP8_DYNAMIC weights: one scale per output row, blocks of 1 x K (a rectangular block)."""
    e, n, k = 3, 40, 256
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(9))
    scale = w.abs().amax(-1, keepdim=True) / 448.0  # [E, N, 1]
    fmt = Fp8BlockWeight((w / scale).to(torch.float8_e4m3fn), scale, (1, k),
                         act_dtype=torch.float32).to(DEVICE)
    assert fmt.meta() == {"format": "fp8_block", "block": k, "block_n": 1, "stacked": True}
    torch.testing.assert_close(fmt.dequantize(), fmt.weight.float() * fmt.scale)
    back = Fp8BlockWeight.from_tensors(fmt.tensors(), fmt.meta(), act_dtype=torch.float32)
    assert back.block_shape == (1, k) and torch.equal(back.dequantize(), fmt.dequantize())
    x = torch.randn(4, k, device=DEVICE)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    ref = fp8_matmul_ref(x, fmt.weight, fmt.scale, ids, block=(1, k))
    out = fp8_gemv(x, fmt.weight, fmt.scale, ids, block=(1, k), config=cfg)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


def test_default_config_divides_k_within_the_unroll_bound() -> None:
    for rows, n, k, bits in [(1, 4096, 4096, 4), (1, 1024, 2048, 4), (10, 2048, 512, 8),
                             (1, 2048, 512, 4), (64, 256, 96, 8), (1, 8192, 8192, 8),
                             (1, 4096, 65536, 4), (1, 4096, 11008, 4)]:
        cfg = default_config(rows, n, k, bits)
        assert k % (cfg.block_k * cfg.split_k) == 0, (rows, n, k, cfg)
        assert k // (cfg.block_k * cfg.split_k) <= 8 and 4 <= cfg.num_warps <= 16, (rows, n, k, cfg)
    # the shapes run without split-K (its cross-program reduction costs more than it
    # saves: docs/kernel_notes.md, "GPU GEMV, fourth session", re-measured by
    # `python bench/quant_gemv.py`); a long K splits rather than unroll past 8 steps
    assert default_config(1, 4096, 4096, 8).split_k == 1
    assert default_config(10, 1024, 2048, 4).split_k == 1
    assert default_config(1, 4096, 65536, 4).split_k > 1


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
def test_gemv_split_starting_inside_a_group(bits: int, group: int, sym: bool) -> None:
    """K = 384 in 2 splits of 192: the second split starts in the middle of a 128-group."""
    fmt = _fmt(bits, group, sym, 2, 24, 384).to_layout("kn")
    x = torch.randn(2, 384, device=DEVICE)
    ids = torch.tensor([1, 0], device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    ref = quant_matmul_kn_ref(*args, bits=bits, group_size=fmt.group_size)
    out = quant_gemv(*args, bits=bits, group_size=fmt.group_size, config=GemvConfig(16, 64, 2, 4))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
@pytest.mark.parametrize("cfg", [GemvConfig(16, 64, 1, 4), GemvConfig(8, 256, 1, 2),
                                 GemvConfig(32, 32, 2, 4)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_16bit_activations(bits: int, group: int, sym: bool, cfg: GemvConfig,
                                dtype: torch.dtype) -> None:
    """16-bit x (the production case): int8 codes biased by 32896, int4 codes by 128 / 2048 / 32768
    by position, with the bias taken off per row; bf16 x read 4 values per load. Within 16-bit
    rounding of the float32 reference (the interpreter truncates on its bf16 store: up to one ulp,
    2^-7 of the value)."""
    fmt = _fmt(bits, group, sym, 3, 40, 256).to_layout("kn")
    x = torch.randn(4, 256, device=DEVICE).to(dtype)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    ref = quant_matmul_kn_ref(x.float(), *args[1:], bits=bits, group_size=fmt.group_size)
    out = quant_gemv(*args, bits=bits, group_size=fmt.group_size, config=cfg)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize(("bits", "group", "sym"),
                         [(4, 128, False), (4, 128, True), (4, 32, False), (8, 16, True)])
@pytest.mark.parametrize("cfg", [GemvConfig(16, 256, 1, 4), GemvConfig(32, 256, 2, 4)], ids=str)
def test_gemv_runs_match_plain_steps(bits: int, group: int, sym: bool, cfg: GemvConfig) -> None:
    """A thread's steps on one run of consecutive word rows (scale and min applied once per
    run) give the per-word result: both within 16-bit rounding of the reference, with and
    without split-K."""
    from spillover.kernels.triton.quant_gemv import runs_fit

    k = 1024 if bits == 4 else 512
    fmt = _fmt(bits, group, sym, 3, 40, k).to_layout("kn")
    x = torch.randn(4, k, device=DEVICE).to(torch.bfloat16)
    ids = torch.tensor([2, 0, 2, 1], device=DEVICE)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
    assert runs_fit(k, bits, group, cfg, biased=True)
    ref = quant_matmul_kn_ref(x.float(), *args[1:], bits=bits, group_size=group)
    for runs in (True, False):
        out = quant_gemv(*args, bits=bits, group_size=group, config=replace(cfg, runs=runs))
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -7,
                                   atol=1e-3 * float(ref.abs().max()))


def test_gemv_runs_refused_where_they_do_not_fit() -> None:
    """Steps within one group (or a step count that does not divide a group's word rows)
    have no runs."""
    from spillover.kernels.triton.quant_gemv import runs_fit

    # a step inside a group
    assert not runs_fit(1024, 4, 128, GemvConfig(16, 64, 1, 4), biased=True)
    # 12 steps, 16 word rows a group
    assert not runs_fit(3072, 4, 128, GemvConfig(16, 256, 1, 4), biased=True)
    # 16 steps: one group's 16 word rows
    assert runs_fit(4096, 4, 128, GemvConfig(16, 256, 1, 4), biased=True)
    # float32 x: exact codes
    assert not runs_fit(2048, 4, 128, GemvConfig(16, 256, 1, 4), biased=False)
    fmt = _fmt(4, 128, False, 1, 16, 1024).to_layout("kn")
    x = torch.randn(1, 1024, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="runs=1"):
        quant_gemv(x, fmt.qweight, fmt.scales, fmt.mins, None, bits=4, group_size=128,
                   config=GemvConfig(16, 64, 1, 4, runs=True))


def test_default_register_caps_only_with_runs() -> None:
    """The int4 caps were measured with runs (docs/kernel_notes.md, "int4 GEMV: runs of word
    rows, register caps, ..."); without runs (float32 x, or steps that do not divide a group)
    the uncapped or 64-register config stays."""
    assert default_config(1, 4096, 4096, 4).max_regs == 48
    assert default_config(1, 4096, 4096, 4, symmetric=True).max_regs == 56
    assert default_config(1, 8192, 8192, 4).max_regs == 64
    assert default_config(10, 1024, 2048, 4).max_regs == 48
    assert default_config(10, 1024, 2048, 4, biased=False).max_regs is None
    assert default_config(1, 4096, 4096, 4, biased=False).max_regs == 64
    assert default_config(1, 4096, 8192, 4, group=32).max_regs == 64  # 8 steps, 4 word rows a group
    assert default_config(1, 4096, 4096, 8).max_regs == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams: needs CUDA")
def test_split_k_on_two_streams_at_once() -> None:
    """Split-K GEMVs launched concurrently on two streams each get their own partials
    and counters."""
    from spillover.kernels.triton.quant_gemv import workspace

    fmt = _fmt(4, 128, False, 1, 256, 4096).to_layout("kn")
    cfg = GemvConfig(16, 512, 4, 4)
    xs = [torch.randn(1, 4096, device=DEVICE).to(torch.bfloat16) for _ in range(2)]
    refs = [quant_matmul_kn_ref(x.float(), fmt.qweight, fmt.scales, fmt.mins, None, bits=4,
                                group_size=128)
            for x in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(20):
        for i, st in enumerate(streams):
            with torch.cuda.stream(st):
                outs[i].append(quant_gemv(xs[i], fmt.qweight, fmt.scales, fmt.mins, None, bits=4,
                                          group_size=128, config=cfg))
    torch.cuda.synchronize()
    for i, st in enumerate(streams):
        for out in outs[i]:
            torch.testing.assert_close(out.float(), refs[i], rtol=2 ** -7,
                                       atol=1e-3 * float(refs[i].abs().max()))
        with torch.cuda.stream(st):
            mine = workspace(xs[i].device, 1, 1)[0]
        # not the default stream's
        assert mine.data_ptr() != workspace(xs[i].device, 1, 1)[0].data_ptr()


def test_align_rows_groups_by_expert() -> None:
    ids = torch.tensor([2, 0, 2, 2, 1])
    rows, eids = align_rows(ids, 5, 2, torch.device("cpu"))
    assert eids.tolist() == [0, 1, 2, 2]
    assert rows.tolist() == [1, 5, 4, 5, 0, 2, 3, 5]


def test_align_rows_worst_case_sizes() -> None:
    """The sync-free (CUDA) grouping: worst-case sizes, the exact grouping as its prefix,
    padding after."""
    ids = torch.tensor([2, 0, 2, 2, 1, 5, 2])
    t, bm, e = 7, 2, 6
    rows, eids = align_rows(ids, t, bm, torch.device("cpu"), num_experts=e)
    nb = -(-(t + min(t, e) * (bm - 1)) // bm)
    assert rows.numel() == nb * bm and eids.numel() == nb
    exact_rows, exact_eids = align_rows(ids, t, bm, torch.device("cpu"))
    assert rows[:exact_rows.numel()].tolist() == exact_rows.tolist()
    assert eids[:exact_eids.numel()].tolist() == exact_eids.tolist()
    assert (rows[exact_rows.numel():] == t).all() and int(eids.max()) < e


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gemm_skips_padding_blocks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst-case grouping's padding-only blocks write nothing and leave the result exact."""
    import spillover.kernels.triton.quant_gemm as qg

    grouped = qg.align_rows
    monkeypatch.setattr(qg, "align_rows", lambda ids, t, bm, dev, num_experts=None:
                        grouped(ids, t, bm, dev, None if ids is None else 3))
    x = torch.randn(19, 256, device=DEVICE)
    ids = torch.tensor([0, 2] * 9 + [2], device=DEVICE)  # expert 1 gets no rows
    if kind == "fp8":
        w8 = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(2))
        fmt8 = Fp8BlockWeight.pack(w8, act_dtype=torch.float32).to(DEVICE)
        ref = fp8_matmul_ref(x, fmt8.weight, fmt8.scale, ids)
        out = fp8_gemm(x, fmt8.weight, fmt8.scale, ids)
    else:
        kn = _fmt(4, 128, False, 3, 40, 256).to_layout("kn")
        args = (x, kn.qweight, kn.scales, kn.mins, ids)
        ref = quant_matmul_kn_ref(*args, bits=4, group_size=128)
        out = quant_gemm(*args, bits=4, group_size=128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


def test_dispatch_uses_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("SPILLOVER_KERNELS", "triton")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    fmt = Int4Weight.pack(w, 32, True, act_dtype=torch.float32).to(DEVICE)
    x = torch.randn(2, 128, device=DEVICE)
    from spillover.kernels.quant_dispatch import choose_kernel

    assert choose_kernel(fmt, x.device, 2)[0] == "triton_gemv"
    torch.testing.assert_close(fmt.forward(x), x @ fmt.dequantize().T, rtol=1e-4, atol=1e-4)
    # prefill rows: the GEMM (on CUDA a dense weight goes bf16 + cuBLAS)
    x = torch.randn(20, 128, device=DEVICE)
    expected = "triton_dequant" if DEVICE == "cuda" else "triton_gemm"
    assert choose_kernel(fmt, x.device, 20)[0] == expected
    torch.testing.assert_close(fmt.forward(x), x @ fmt.dequantize().T, rtol=1e-4, atol=1e-4)


def test_layout_round_trip_and_cuda_move() -> None:
    fmt = _fmt(4, 32, False, 2, 24, 64)
    kn = fmt.to_layout("kn")
    assert kn.qweight.shape == (2, 8, 24) and kn.scales.shape == (2, 2, 24)
    back = kn.to_layout("nk")
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), fmt.tensors().values(),
                                                 strict=True))
    assert torch.equal(kn.dequantize(), fmt.dequantize())
    if DEVICE == "cuda":
        assert fmt.to("cuda").layout == "kn" and fmt.to("cuda").to("cpu").layout == "nk"


def test_fp8_dispatch_uses_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("SPILLOVER_KERNELS", "triton")
    from spillover.kernels.quant_dispatch import choose_fp8_kernel

    fmt = Fp8BlockWeight.pack(torch.randn(2, 64, 128), act_dtype=torch.float32).to(DEVICE)
    assert choose_fp8_kernel(fmt, torch.device(DEVICE), 3)[0] == "triton_fp8_gemv"
    assert choose_fp8_kernel(fmt, torch.device(DEVICE), 9, moe=True)[0] == "triton_fp8_gemm"
    for t in (3, 40):  # GEMV, then GEMM (two experts, 20 rows each)
        x = torch.randn(t, 128, device=DEVICE)
        ids = torch.arange(t, device=DEVICE) % 2
        ref = fp8_matmul_ref(x, fmt.weight, fmt.scale, ids)
        torch.testing.assert_close(fmt.forward_experts(x, ids), ref, rtol=1e-4, atol=2e-4)
    # K = 96 has no 16-word GEMM steps: dequantize + float matmul
    odd = Fp8BlockWeight.pack(torch.randn(1, 64, 96), block=32, act_dtype=torch.float32).to(DEVICE)
    assert choose_fp8_kernel(odd, torch.device(DEVICE), 20)[0] == "fp8_dequant"


def test_dense_weights_with_many_rows_dequantize_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a dense weight past GEMV_MAX_ROWS rows goes to bf16 + cuBLAS, unless its bf16 copy
    would pass DEQUANT_MAX_BYTES; routed experts keep the grouped GEMM at any row count (plain
    Python: no GPU needed)."""
    from spillover.kernels import quant_dispatch as dispatch
    from spillover.kernels.quant_dispatch import GEMV_MAX_ROWS, choose_fp8_kernel, choose_kernel

    cuda = torch.device("cuda")
    dense = Int4Weight.pack(torch.randn(64, 256), 128, False)
    bank = Int4Weight.pack(torch.randn(4, 64, 256), 128, False)
    fp8_dense = Fp8BlockWeight.pack(torch.randn(64, 256))
    fp8_bank = Fp8BlockWeight.pack(torch.randn(4, 64, 256))
    assert choose_kernel(dense, cuda, GEMV_MAX_ROWS + 1)[0] == "triton_dequant"
    assert choose_kernel(bank, cuda, 4096, moe=True)[0] == "triton_gemm"
    assert choose_fp8_kernel(fp8_dense, cuda, GEMV_MAX_ROWS + 1)[0] == "triton_dequant"
    assert choose_fp8_kernel(fp8_bank, cuda, 4096, moe=True)[0] == "triton_fp8_gemm"
    # one byte short of the bf16 copy
    monkeypatch.setattr(dispatch, "DEQUANT_MAX_BYTES", 2 * 64 * 256 - 1)
    assert choose_kernel(dense, cuda, 4096)[0] == "triton_gemm"
    assert choose_fp8_kernel(fp8_dense, cuda, 4096)[0] == "triton_fp8_gemm"


@pytest.mark.skipif(DEVICE != "cuda", reason="the bf16 + cuBLAS route is taken on CUDA only")
@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
def test_dense_many_rows_on_cuda_match_reference(kind: str) -> None:
    """GEMV rows, then bf16 + cuBLAS rows, through the format's forward with bf16 x."""
    from spillover.kernels.quant_dispatch import GEMV_MAX_ROWS

    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(5)) * 0.05
    packed = {"fp8": Fp8BlockWeight.pack, "int8": Int8Weight.pack,
              "int4": lambda w: Int4Weight.pack(w, 128, False)}[kind](w)
    fmt = packed.to("cuda")
    for rows in (GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 512, device="cuda").to(torch.bfloat16)
        ref = x.float() @ fmt.dequantize().float().T
        torch.testing.assert_close(fmt.forward(x).float(), ref, rtol=2e-2,
                                   atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize(("bits", "group", "sym"), [*CASES, (8, 64, True)])
def test_triton_dequant_kn_matches_reference(bits: int, group: int, sym: bool) -> None:
    """Each expert of a kn bank, N = 72 and K = 320 not multiples of the 32 x 32-word tile."""
    from spillover.kernels.ref_quant import dequant_kn_ref
    from spillover.kernels.triton.dequant import dequant_kn

    k = 320 if bits == 8 and group in (0, 64) else 256
    fmt = _fmt(bits, group, sym, 3, 72, k).to_layout("kn")
    for e in (0, 2):
        args = (fmt.qweight, fmt.scales, fmt.mins, e)
        ref = dequant_kn_ref(*args, bits=bits, group_size=fmt.group_size)
        torch.testing.assert_close(dequant_kn(*args, bits=bits, group_size=fmt.group_size,
                                              out_dtype=torch.float32),
                                   ref, rtol=1e-6, atol=1e-6)
        out16 = dequant_kn(*args, bits=bits, group_size=fmt.group_size)
        assert out16.dtype == torch.bfloat16
        torch.testing.assert_close(out16.float(), ref, rtol=2 ** -7, atol=1e-6)  # one bf16 step


@pytest.mark.parametrize("block", [(128, 128), (1, 384), (32, 64)], ids=str)
def test_triton_dequant_fp8_matches_reference(block: tuple[int, int]) -> None:
    from spillover.kernels.ref_quant import dequant_fp8_block_ref
    from spillover.kernels.triton.dequant import dequant_fp8

    if block == (128, 128):  # N = 200: a partial row block
        w = torch.randn(200, 384, generator=torch.Generator().manual_seed(3))
        fmt = Fp8BlockWeight.pack(w).to(DEVICE)
        weight, scale = fmt.weight, fmt.scale
    else:
        weight, scale = _fp8_blocks(1, 96, 384, block, 4)
        weight, scale = weight[0], scale[0]
    ref = dequant_fp8_block_ref(weight, scale, block)
    torch.testing.assert_close(dequant_fp8(weight, scale, block, torch.float32), ref, rtol=1e-6,
                               atol=1e-6)
    # one bf16 step
    torch.testing.assert_close(dequant_fp8(weight, scale, block).float(), ref, rtol=2 ** -7,
                               atol=1e-6)
