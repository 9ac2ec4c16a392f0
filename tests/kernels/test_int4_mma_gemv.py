"""The tensor-core int4 GEMV against the torch reference, and when the dispatcher picks it.

The kernel is inline PTX (mma.sync, shuffles), which the Triton interpreter cannot run: its numeric
tests need a CUDA GPU (sm_80+; the device machine, scripts/gpu_check). Its limits and the dispatch
rule are plain Python and run everywhere.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from spillover.kernels.quant_dispatch import int4_mma_fits  # noqa: E402
from spillover.kernels.ref_quant import quant_matmul_kn_ref  # noqa: E402
from spillover.kernels.triton.int4_mma_gemv import (  # noqa: E402
    MmaConfig,
    default_mma_config,
    int4_mma_gemv,
    unsupported,
)
from spillover.quant import Int4Weight  # noqa: E402

HAS_MMA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _kn(e: int, n: int, k: int, group: int, sym: bool, device: str = "cpu",
        layout: str = "kn") -> Int4Weight:
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(e + n + k + group)) * 0.02
    return Int4Weight.pack(w, group, sym, act_dtype=torch.bfloat16).to(device).to_layout(layout)


@pytest.mark.skipif(not HAS_MMA, reason="inline PTX mma.sync: needs a CUDA GPU with sm_80+")
@pytest.mark.parametrize(("e", "n", "k", "t"),
                         [(1, 40, 256, 1), (6, 1024, 2048, 5), (6, 2048, 512, 3)])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("config", [MmaConfig(x_l1=False), MmaConfig(x_l1=True),
                                    MmaConfig(x_l1=True, max_regs=48),
                                    MmaConfig(x_l1=False, max_regs=48)],
                         ids=["x:shfl", "x:L1", "x:L1-48regs", "x:shfl-48regs"])
@pytest.mark.parametrize("layout", ["kn", "tiled"])
def test_matches_reference(e: int, n: int, k: int, t: int, group: int, sym: bool, config: MmaConfig,
                           layout: str) -> None:
    """Within bf16 rounding of the float32 reference, with and without expert ids, on kn and tiled
    words; N = 40 leaves a partial 16-channel tile (kn only: tiles are whole). A wrong lane mapping
    would come out as NaN (the kernel's guard)."""
    if layout == "tiled" and n % 16:
        n = 48
    fmt = _kn(e, n, k, group, sym, "cuda", layout)
    x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
    for ids in (None, torch.randint(0, e, (t,), device="cuda", dtype=torch.int32)):
        args = (x, fmt.qweight, fmt.scales, fmt.mins, ids)
        ref = quant_matmul_kn_ref(x.float(), *args[1:], bits=4, group_size=group,
                                  tiled=layout == "tiled")
        out = int4_mma_gemv(*args, bits=4, group_size=group, tiled=layout == "tiled", config=config)
        assert out.dtype == torch.bfloat16 and out.shape == (t, n)
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -7,
                                   atol=1e-3 * float(ref.abs().max()))


@pytest.mark.skipif(not HAS_MMA, reason="inline PTX mma.sync: needs a CUDA GPU with sm_80+")
@pytest.mark.parametrize("layout", ["kn", "tiled"])
def test_sparse_rows_and_an_expanded_x(layout: str) -> None:
    """One token's row expanded over its experts (row stride 0, read in place) and sparse rows:
    expert -1 gives zeros, the others what the reference gives."""
    fmt = _kn(6, 1024, 2048, 128, False, "cuda", layout)
    x = torch.randn(1, 2048, device="cuda").to(torch.bfloat16).expand(5, 2048)
    ids = torch.tensor([3, -1, 0, 5, -1], device="cuda", dtype=torch.int32)
    args = (x, fmt.qweight, fmt.scales, fmt.mins)
    out = int4_mma_gemv(*args, ids, bits=4, group_size=128, tiled=layout == "tiled", sparse=True)
    live = ids >= 0
    ref = quant_matmul_kn_ref(x.float(), *args[1:], ids.clamp(min=0), bits=4, group_size=128,
                              tiled=layout == "tiled")
    assert torch.equal(out[~live].float(), torch.zeros_like(ref[~live]))
    torch.testing.assert_close(out[live].float(), ref[live], rtol=2 ** -7,
                               atol=1e-3 * float(ref.abs().max()))


@pytest.mark.skipif(not HAS_MMA, reason="inline PTX mma.sync: needs a CUDA GPU with sm_80+")
def test_unaligned_x_view() -> None:
    """x as a view that starts 2 bytes in: copied to an aligned buffer, same result."""
    fmt = _kn(3, 64, 512, 128, False, "cuda")
    base = torch.randn(2 * 512 + 1, device="cuda").to(torch.bfloat16)
    x = base[1:].view(2, 512)
    args = (x, fmt.qweight, fmt.scales, fmt.mins, None)
    ref = quant_matmul_kn_ref(x.float(), *args[1:], bits=4, group_size=128)
    torch.testing.assert_close(int4_mma_gemv(*args, bits=4, group_size=128).float(), ref,
                               rtol=2 ** -7, atol=1e-3 * float(ref.abs().max()))


def test_limits() -> None:
    assert unsupported(4, 128, 2048, torch.bfloat16) is None
    assert unsupported(4, 32, 256, torch.bfloat16) is None
    assert "int8" in str(unsupported(8, 128, 2048, torch.bfloat16))
    assert "float16" in str(unsupported(4, 128, 2048, torch.float16))
    assert "group 16" in str(unsupported(4, 16, 2048, torch.bfloat16))
    assert "K=384" in str(unsupported(4, 128, 384, torch.bfloat16))
    assert "K=16384" in str(unsupported(4, 128, 16384, torch.bfloat16))
    # 3 warps: Triton needs powers of two
    assert "K=768" in str(unsupported(4, 128, 768, torch.bfloat16))
    with pytest.raises(ValueError, match="unsupported"):
        int4_mma_gemv(torch.zeros(1, 384, dtype=torch.bfloat16),
                      torch.zeros(1, 48, 16, dtype=torch.int32),
                      torch.zeros(1, 3, 16), None, None, bits=4, group_size=128)


def test_dispatch_rule() -> None:
    """Only g128 int4 experts on sm_90 at the K run there (where it measured faster)."""
    asym, sym = _kn(2, 32, 512, 128, False), _kn(2, 32, 512, 128, True)
    assert int4_mma_fits(asym, (9, 0), moe=True)
    assert int4_mma_fits(_kn(2, 32, 2048, 128, False), (9, 0), moe=True)
    assert not int4_mma_fits(_kn(2, 32, 1024, 128, False), (9, 0), moe=True)  # not run on a GPU yet
    assert not int4_mma_fits(_kn(2, 32, 512, 32, False), (9, 0), moe=True)
    assert not int4_mma_fits(asym, (9, 0), moe=False)  # dense: the CUDA-core GEMV measured faster
    assert int4_mma_fits(sym, (9, 0), moe=True)
    assert not int4_mma_fits(sym, (9, 0), moe=False)
    assert not int4_mma_fits(asym, (8, 0), moe=True)  # not measured there
    assert not int4_mma_fits(asym, (12, 0), moe=True)
    # K not a multiple of 256
    assert not int4_mma_fits(_kn(2, 32, 384, 128, False), (9, 0), moe=True)
    f32 = Int4Weight.pack(torch.randn(2, 32, 512), 128, False, act_dtype=torch.float32)
    f32 = f32.to_layout("kn")
    assert not int4_mma_fits(f32, (9, 0), moe=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the dispatcher picks the tensor-core GEMV on sm_90 only")
@pytest.mark.parametrize(("n", "k"), [(1024, 2048), (2048, 512)])  # Qwen3-Next's w13 and w2
@pytest.mark.parametrize("sym", [False, True])
def test_dispatcher_sends_experts_to_it(n: int, k: int, sym: bool) -> None:
    """The integrated path: a stacked g128 int4 bank moved to Hopper holds tiled words; 10 rows
    of picked experts take the tensor-core GEMV, 1400 rows (past SYNC_FREE_ROWS: counted) the
    grouped GEMM."""
    from spillover.kernels.quant_dispatch import SYNC_FREE_ROWS, busiest_expert_rows, choose_kernel

    w = torch.randn(16, n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
    fmt = Int4Weight.pack(w, 128, sym, act_dtype=torch.bfloat16).to("cuda")
    assert fmt.layout == "tiled"
    kn = fmt.to_layout("kn")
    for t, kernel in ((10, "triton_int4_mma_gemv"), (SYNC_FREE_ROWS + 120, "triton_gemm")):
        x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
        ids = torch.randint(0, 16, (t,), device="cuda")
        rows = busiest_expert_rows(x, ids)  # what quant_matmul asks the dispatcher with
        assert choose_kernel(fmt, torch.device("cuda"), rows, moe=True)[0] == kernel
        ref = quant_matmul_kn_ref(x.float(), kn.qweight, kn.scales, kn.mins, ids, bits=4,
                                  group_size=128)
        out = fmt.forward_experts(x, ids)
        torch.testing.assert_close(out.float(), ref, rtol=2 ** -7,
                                   atol=2e-3 * float(ref.abs().max()))


def test_default_config() -> None:
    """The measured choices: tiled words x by shuffles under a 48-register cap; on kn words
    symmetric int4 x from L1 under a 48-register cap, asymmetric uncapped, x from L1 only
    at K >= 1024."""
    for sym in (False, True):
        for k in (512, 2048):
            assert default_mma_config(sym, k, tiled=True) == MmaConfig(x_l1=False, max_regs=48)
    assert default_mma_config(True, 512) == MmaConfig(x_l1=True, max_regs=48)
    assert default_mma_config(False, 2048) == MmaConfig(x_l1=True)
    assert default_mma_config(False, 512) == MmaConfig(x_l1=False)
