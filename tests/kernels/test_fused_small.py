"""The small fused Triton kernels (RMSNorm, residual add + RMSNorm, gated RMSNorm, MoE router,
SwiGLU activation) against their torch references (TRITON_INTERPRET=1 on the CPU), and the
dispatch that sends the layers to them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from spillover import LLM, kernels  # noqa: E402
from spillover.kernels import ref  # noqa: E402
from spillover.kernels.triton import activation, norms, routing  # noqa: E402
from tests.models.tiny import save_hf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol): 16-bit results may land one rounding step apart (fp32 sums in another order)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32,
           scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOL[want.dtype] if want.dtype in TOL else TOL[torch.float32]
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("cols", [48, 200, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(rows: int, cols: int, dtype: torch.dtype, offset: float) -> None:
    x = _randn(rows, cols, seed=cols + rows, dtype=dtype, scale=3.0)
    w = _randn(cols, seed=1, dtype=dtype) * 0.1 + (1.0 - offset)
    _close(norms.rms_norm(x, w, 1e-6, offset), ref.rms_norm(x, w, 1e-6, offset))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("cols", [48, 200, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm(rows: int, cols: int, dtype: torch.dtype, offset: float) -> None:
    x = _randn(rows, cols, seed=cols, dtype=dtype)
    residual = _randn(rows, cols, seed=cols + 1, dtype=dtype, scale=4.0)
    w = _randn(cols, seed=2, dtype=dtype) * 0.1 + (1.0 - offset)
    normed, total = norms.add_rms_norm(x, residual, w, 1e-6, offset)
    want_normed, want_total = ref.add_rms_norm(x, residual, w, 1e-6, offset)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even)
        _close(total, want_total)
    else:  # one correctly rounded add either way
        assert torch.equal(total.cpu(), want_total.cpu())
    _close(normed, want_normed)


def test_rms_norm_leading_dims_and_weight_promotion() -> None:
    """q/k norms pass [T, H, D]; an fp32 weight on bf16 activations promotes as torch does."""
    x = _randn(3, 4, 48, seed=3, dtype=torch.bfloat16)
    w = _randn(48, seed=4)
    got, want = norms.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32 and got.shape == x.shape
    # x̂ was rounded to bf16 before the fp32 weight scaled it
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=TOL[torch.bfloat16][0],
                               atol=TOL[torch.bfloat16][1])
    strided = _randn(5, 96, seed=5)[:, :48]  # rows one stride apart, not contiguous
    _close(norms.rms_norm(strided, w, 1e-6, 1.0), ref.rms_norm(strided, w, 1e-6, 1.0))


@pytest.mark.parametrize(("rows", "heads", "dim"), [(1, 4, 16), (5, 3, 48), (2, 2, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_gated_rms_norm(rows: int, heads: int, dim: int, dtype: torch.dtype,
                        weight_fp32: bool) -> None:
    x = _randn(rows, heads, dim, seed=dim, dtype=dtype)
    # z as GatedDeltaNet has it: a slice of a wider projection
    z = _randn(rows, heads, 2 * dim, seed=dim + 1, dtype=dtype, scale=2.0)[..., dim:]
    w = _randn(dim, seed=6, dtype=torch.float32 if weight_fp32 else dtype) * 0.2 + 1.0
    _close(norms.gated_rms_norm(x, z, w, 1e-6), ref.gated_rms_norm(x, z, w, 1e-6))


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize(("experts", "k"), [(8, 1), (8, 2), (48, 8), (200, 10), (512, 10),
                                            (512, 16), (128, 16)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_topk_fp32(rows: int, experts: int, k: int, renormalize: bool) -> None:
    logits = _randn(rows, experts, seed=experts * k + rows, scale=2.0)
    weights, ids = routing.route_topk(logits, k, renormalize, torch.float32)
    want_w, want_ids = ref.route_topk(logits, k, renormalize, torch.float32)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), want_ids.cpu())
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.cpu(), want_w.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("experts", [48, 200])
def test_route_topk_16bit(dtype: torch.dtype, experts: int) -> None:
    """16-bit router logits (distinct values: a tie's order is torch's to choose) and weights."""
    g = torch.Generator().manual_seed(experts)
    # distinct multiples of 1/32 below 8: exact in both 16-bit formats
    logits = torch.stack([torch.randperm(experts, generator=g) for _ in range(3)]) / 32 - 3
    logits = logits.to(dtype).to(DEVICE)
    weights, ids = routing.route_topk(logits, 8, True, dtype)
    want_w, want_ids = ref.route_topk(logits, 8, True, dtype)
    assert torch.equal(ids.cpu(), want_ids.cpu())
    _close(weights, want_w)


def test_route_topk_ties_go_to_the_lower_index() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0, -1.0, 0.5]], device=DEVICE)
    weights, ids = routing.route_topk(logits, 5, False, torch.float32)
    assert ids.cpu().tolist() == [[1, 3, 5, 2, 4]]
    assert weights[0, 0].item() == weights[0, 2].item()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("inter", [24, 100, 1024, 1100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = _randn(rows, 2 * inter, seed=inter + rows, dtype=dtype, scale=3.0)
    _close(activation.silu_mul(gate_up), ref.silu_mul(gate_up))


def test_silu_mul_leading_dims_and_row_stride() -> None:
    gate_up = _randn(2, 3, 96, seed=7)
    _close(activation.silu_mul(gate_up), ref.silu_mul(gate_up))
    wide = _randn(4, 200, seed=8)[:, :96]
    _close(activation.silu_mul(wide), ref.silu_mul(wide))


FUSED_OPS = {"rms_norm", "add_rms_norm", "route_topk", "silu_mul", "moe_sum", "qk_norm_rope"}
NEXT_OPS = {"gated_rms_norm", "gdn_split", "sigmoid_mul"}  # Qwen3-Next only (its shared
# expert runs in the bank: shared_combine serves a shared expert of another width)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_moe-norm"])
def test_tiny_model_through_the_fused_kernels(name: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers call the fused ops and get what the references give (one prefill), with the
    fused ops dispatched to Triton whatever the device (its interpreter on the CPU)."""
    save_hf(name, tmp_path)
    llm = LLM(model=str(tmp_path), device=DEVICE, dtype="float32")
    ids = torch.randint(0, 128, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.delenv("SPILLOVER_KERNELS", raising=False)
    kernels.reset()
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_pick_fused", lambda cuda, dtype: ("triton", "test"))
        fused = llm.forward_logits(ids)
    used = {op for op, impl in kernels.chosen() if impl == "triton"}
    assert used == FUSED_OPS | (NEXT_OPS if "next" in name else set())
    kernels.reset()
    monkeypatch.setenv("SPILLOVER_KERNELS", "ref")
    want = llm.forward_logits(ids)
    assert "triton" not in {impl for _, impl in kernels.chosen()}
    kernels.reset()
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)


def test_cpu_without_override_keeps_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPILLOVER_KERNELS", raising=False)
    kernels.reset()
    x = torch.randn(2, 48)
    kernels.rms_norm(x, torch.ones(48), 1e-6)
    kernels.route_topk(x, 2, True, torch.float32)
    kernels.silu_mul(x)
    assert kernels._pick_fused(False, torch.float32) == ("torch", "torch ops (CPU tensors)")
    assert {impl for op, impl in kernels.chosen()} == {"torch"}
    kernels.reset()


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_topk_with_a_shared_expert_column(renormalize: bool) -> None:
    logits = _randn(5, 33, seed=9, scale=2.0)  # 32 experts, then the shared expert's gate logit
    got = routing.route_topk(logits, 4, renormalize, torch.bfloat16, shared=True)
    want = ref.route_topk(logits, 4, renormalize, torch.bfloat16, shared=True)
    assert torch.equal(got[1].cpu(), want[1].cpu()) and got[1][:, -1].eq(32).all()
    _close(got[0], want[0])
