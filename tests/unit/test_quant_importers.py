"""GPTQ / AWQ / compressed-tensors / FP8-block layouts, generated in each format, vs
torch dequant."""

from __future__ import annotations

import pytest
import torch

from spillover.kernels.ref_quant import dequant_fp8_block_ref
from spillover.quant.importers.awq import ORDER, import_awq
from spillover.quant.importers.compressed_tensors import import_compressed_tensors
from spillover.quant.importers.fp8_block import import_fp8_block
from spillover.quant.importers.gptq import ActOrderNotSupported, import_gptq

N, K, G = 32, 256, 64
GEN = torch.Generator().manual_seed(0)


def _pack_nibbles(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, 8C] codes -> int32 [R, C]; nibble slot i of word j holds column 8j + order[i]."""
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)[:, :, list(order)]
    word = sum(c[:, :, i] << (4 * i) for i in range(8))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement into int32


def _case(asym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 16, (K, N), generator=GEN)
    z = torch.randint(0, 16, (K // G, N), generator=GEN) if asym else torch.full((K // G, N), 8)
    s = (torch.rand(K // G, N, generator=GEN) * 0.02 + 0.001).half()
    return q, z, s


def _dequant(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w[n, k] = s[g, n] * (q[k, n] - z[g, n])   (returned as [N, K])."""
    g = torch.arange(K) // G
    return (s.float()[g] * (q - z[g]).float()).T


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq(asym: bool, version: str) -> None:
    q, z, s = _case(asym)
    stored_z = z - 1 if version == "gptq" else z
    qweight = _pack_nibbles(q.T.contiguous()).T.contiguous()  # [K/8, N]
    qzeros = _pack_nibbles(stored_z & 15)  # [K/G, N/8]
    fmt = import_gptq(qweight, qzeros, s, torch.arange(K) // G, checkpoint_format=version,
                      act_dtype=torch.float32)
    assert fmt.symmetric == (not asym)
    assert torch.equal(fmt.dequantize(), _dequant(q, z, s))


def test_gptq_act_order_is_refused() -> None:
    q, z, s = _case(False)
    qweight = _pack_nibbles(q.T.contiguous()).T.contiguous()
    g_idx = (torch.arange(K) // G)[torch.randperm(K, generator=GEN)]
    with pytest.raises(ActOrderNotSupported, match="act-order"):
        import_gptq(qweight, _pack_nibbles(z - 1), s, g_idx)


def test_awq_gemm() -> None:
    q, z, s = _case(True)
    fmt = import_awq(_pack_nibbles(q, ORDER), _pack_nibbles(z, ORDER), s, act_dtype=torch.float32)
    assert torch.equal(fmt.dequantize(), _dequant(q, z, s))


@pytest.mark.parametrize("asym", [False, True])
def test_compressed_tensors_pack_quantized(asym: bool) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                                  reason="compressed-tensors not installed")
    q = torch.randint(-8, 8, (N, K), generator=GEN)
    scale = (torch.rand(N, K // G, generator=GEN) * 0.02 + 0.001).bfloat16()
    zp = torch.randint(-8, 8, (N, K // G), generator=GEN) if asym else None
    packed = helpers.pack_to_int32(q.to(torch.int8), 4)
    zp_packed = None
    if zp is not None:
        zp_packed = helpers.pack_to_int32(zp.to(torch.int8), 4, packed_dim=0)
    fmt = import_compressed_tensors(packed, scale, zp_packed, act_dtype=torch.float32)
    unpacked = helpers.unpack_from_int32(packed, 4, torch.Size((N, K)))
    assert torch.equal(unpacked.long(), q)  # the library agrees with our reading of its layout
    zeros = zp if zp is not None else torch.zeros_like(scale, dtype=torch.long)
    zfull = zeros.repeat_interleave(G, 1)
    expected = (q - zfull).float() * scale.float().repeat_interleave(G, 1)
    assert torch.equal(fmt.dequantize(), expected)


def test_fp8_block_kept_as_fp8() -> None:
    w = (torch.randn(300, 260, generator=GEN) * 10).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 3, generator=GEN)
    fmt = import_fp8_block(w, scale_inv, act_dtype=torch.float32)
    assert fmt.weight.data_ptr() == w.data_ptr()  # no copy, no float trip
    per_weight = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    expected = w.float() * per_weight
    assert torch.equal(fmt.dequantize(), expected)
    assert torch.equal(dequant_fp8_block_ref(w, scale_inv), expected)
    with pytest.raises(ValueError, match="blocks"):
        import_fp8_block(w, torch.rand(2, 3))
