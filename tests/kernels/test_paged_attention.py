"""Triton paged-attention decode against its torch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from spillover.kernels.ref import paged_attention_decode as reference  # noqa: E402
from spillover.kernels.triton.paged_attention import paged_attention_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("hq", "hkv", "d", "bs"),
                         [(4, 2, 16, 4), (6, 2, 24, 8), (3, 3, 32, 16), (8, 1, 64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 3, 8])
def test_decode_kernel_matches_reference(hq: int, hkv: int, d: int, bs: int,
                                         dtype: torch.dtype, splits: int | None) -> None:
    g = torch.Generator().manual_seed(hq * 100 + d)
    lens = [1, bs, bs + 1, 3 * bs - 2, 5]
    num_blocks = 24
    # Each sequence gets distinct, shuffled blocks so that a wrong table lookup shows.
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[at : at + nb])
        at += nb
    width = max(len(t) for t in tables) + 1  # one spare column of padding everywhere
    bt = torch.full((len(lens), width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    k = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    cl = torch.tensor(lens, dtype=torch.int32)
    scale = d**-0.5
    expected = reference(q.float(), k.float(), v.float(), bt, cl, scale)
    got = paged_attention_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), bt.to(DEVICE),
                                 cl.to(DEVICE), scale, splits=splits)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (got.float().cpu() - expected).abs().max().item() <= tol


def test_reference_matches_dense_attention() -> None:
    """The reference itself against plain softmax attention on contiguous K/V."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs, n_ctx = 4, 2, 8, 4, 10
    k = torch.randn(3, bs, hkv, d, generator=g)
    v = torch.randn(3, bs, hkv, d, generator=g)
    q = torch.randn(1, hq, d, generator=g)
    bt = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    got = reference(q, k, v, bt, torch.tensor([n_ctx], dtype=torch.int32), 0.5)
    kk = k[[2, 0, 1]].reshape(-1, hkv, d)[:n_ctx].repeat_interleave(hq // hkv, dim=1)  # [C, Hq, D]
    vv = v[[2, 0, 1]].reshape(-1, hkv, d)[:n_ctx].repeat_interleave(hq // hkv, dim=1)
    w = torch.softmax(torch.einsum("hd,chd->hc", q[0], kk) * 0.5, dim=-1)
    assert torch.allclose(got[0], torch.einsum("hc,chd->hd", w, vv), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a CUDA device")
@pytest.mark.parametrize(("hq", "hkv", "d"), [(9, 3, 64), (16, 2, 128), (32, 8, 128)])
def test_decode_kernel_real_shapes_cuda(hq: int, hkv: int, d: int) -> None:
    g = torch.Generator().manual_seed(hq)
    bs, n = 16, 24
    lens = torch.randint(1, 1500, (n,), generator=g)
    width = int(-(-lens.max() // bs))
    num_blocks = n * width + 7  # every table row gets distinct blocks, scattered over the pool
    bt = torch.randperm(num_blocks, generator=g)[: n * width].view(n, width).to(torch.int32)
    k = torch.randn(num_blocks, bs, hkv, d, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(num_blocks, bs, hkv, d, generator=g).to("cuda", torch.bfloat16)
    q = torch.randn(n, hq, d, generator=g).to("cuda", torch.bfloat16)
    args = (bt.cuda(), lens.to(torch.int32).cuda(), d**-0.5)
    expected = reference(q.float(), k.float(), v.float(), *args)
    for splits in (None, 1, 16):
        got = paged_attention_decode(q, k, v, *args, splits=splits)
        assert (got.float() - expected).abs().max().item() <= 2e-2
