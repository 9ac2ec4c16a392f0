"""The Triton kernels that replace a layer's glue ops (Gated DeltaNet's regrouping, q/k norm +
rotary, attention's output gate, the K/V cache write, the MoE sum and the shared expert's
gated add) against their torch references (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from spillover.kernels import ref  # noqa: E402
from spillover.kernels.context import AttentionCache  # noqa: E402
from spillover.kernels.triton import activation, gdn_split, moe_combine, rope  # noqa: E402
from spillover.kernels.triton.paged_attention import write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOL[want.dtype]
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("hk,dk,r,dv", [(2, 16, 2, 16), (3, 8, 1, 24), (16, 128, 2, 128)])
def test_gdn_split_moves_every_element(t: int, hk: int, dk: int, r: int, dv: int) -> None:
    qkvz = _randn(t, hk * (2 * dk + 2 * r * dv), seed=t + hk, dtype=torch.bfloat16)
    ba = _randn(t, hk * 2 * r, seed=7, dtype=torch.bfloat16)
    got = gdn_split.gdn_split(qkvz, ba, hk, dk, r, dv)
    want = ref.gdn_split(qkvz, ba, hk, dk, r, dv)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g.cpu(), w.cpu())  # a pure move: bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,offset", [(True, 0.0), (True, 1.0), (False, 0.0)])
@pytest.mark.parametrize("d,rd", [(16, 4), (32, 32), (256, 64)])
def test_qk_norm_rope(dtype: torch.dtype, norm: bool, offset: float, d: int, rd: int) -> None:
    t, hq, hk = 3, 4, 2
    qg = _randn(t, hq, 2 * d, seed=d, dtype=dtype)
    q = qg[..., :d]  # a strided view, as gated attention hands it over
    k = _randn(t, hk, d, seed=d + 1, dtype=dtype)
    qw = _randn(d, seed=3, dtype=dtype) * 0.1 + (1.0 - offset) if norm else None
    kw = _randn(d, seed=4, dtype=dtype) * 0.1 + (1.0 - offset) if norm else None
    pos = torch.tensor([0, 5, 17], dtype=torch.float32, device=DEVICE)
    freqs = torch.outer(pos, 1.0 / (1e4 ** (torch.arange(0, rd, 2, device=DEVICE) / rd)))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
    got = rope.qk_norm_rope(q, k, qw, kw, 1e-6, offset, cos, sin)
    want = ref.qk_norm_rope(q, k, qw, kw, 1e-6, offset, cos, sin)
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_mul_reads_a_strided_gate(dtype: torch.dtype) -> None:
    x = _randn(3, 4, 40, seed=1, dtype=dtype)
    gate = _randn(3, 4, 80, seed=2, dtype=dtype)[..., 40:]
    _close(activation.sigmoid_mul(x, gate), ref.sigmoid_mul(x, gate))


def test_write_kv_fills_the_slots() -> None:
    blocks, bs, hkv, d = 4, 8, 2, 16
    kc = torch.zeros(blocks, bs, hkv, d, device=DEVICE)
    vc = torch.zeros_like(kc)
    kr, vr = kc.clone(), vc.clone()
    kv = _randn(3, hkv, 2 * d, seed=5)
    k, v = kv[..., :d], kv[..., d:]  # views into one projection's output
    slots = torch.tensor([3, 17, 30], device=DEVICE)
    write_kv(kc, vc, k, v, slots)
    ref.write_kv(AttentionCache(kr, vr), k, v, slots)
    assert torch.equal(kc.cpu(), kr.cpu()) and torch.equal(vc.cpu(), vr.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,h", [(1, 10, 2048), (5, 2, 48), (2, 3, 1500)])
def test_moe_sum(dtype: torch.dtype, t: int, k: int, h: int) -> None:
    y = _randn(t, k, h, seed=h, dtype=dtype)
    w = torch.softmax(_randn(t, k, seed=k), -1).to(dtype)
    _close(moe_combine.moe_sum(y, w), ref.moe_sum(y, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_combine(dtype: torch.dtype) -> None:
    routed, shared = _randn(3, 200, seed=1, dtype=dtype), _randn(3, 200, seed=2, dtype=dtype)
    logits = _randn(3, 201, seed=3, dtype=dtype)
    gate = logits[:, 200:]  # the router's extra column, as a fused router would hand it over
    _close(moe_combine.shared_combine(routed, shared, gate),
           ref.shared_combine(routed, shared, gate))
