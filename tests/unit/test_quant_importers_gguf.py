"""GGUF block imports are bit-exact against gguf.quants.dequantize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from spillover.quant import Int4Weight, Int8Weight
from spillover.quant.importers.gguf import import_gguf

Q = GGMLQuantizationType
N, K = 8, 512


def _random_blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random bytes are valid K-quant blocks once the f16 super-scales are finite (no
    Python quantizer)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N * K // block, size), dtype=np.uint8)

    def f16(n: int) -> np.ndarray:
        return rng.uniform(-0.05, 0.05, size=(raw.shape[0], n)).astype(np.float16).view(np.uint8)

    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, 0:4] = f16(2)
    else:  # Q6_K: d is the last two bytes
        raw[:, -2:] = f16(1)
    return raw.reshape(N, K // block * size)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_import_is_bit_exact(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        data = quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    else:
        data = _random_blocks(qtype, rng)
    expected = torch.from_numpy(quants.dequantize(data, qtype)).reshape(N, K)
    fmt = import_gguf(data, qtype, K, act_dtype=torch.float32)
    assert isinstance(fmt, Int4Weight if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else Int8Weight)
    assert torch.equal(fmt.dequantize(), expected)
    x = torch.randn(2, K)
    torch.testing.assert_close(fmt.forward(x), x @ expected.T, rtol=1e-4, atol=1e-4)


def test_stacked_experts_import() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, N, K)).astype(np.float32)
    data = quants.quantize(w, Q.Q4_0)  # [E, N, bytes]
    fmt = import_gguf(data, Q.Q4_0, K, act_dtype=torch.float32)
    assert fmt.stacked and fmt.qweight.shape == (3, N, K // 2)
    expected = torch.from_numpy(quants.dequantize(data, Q.Q4_0)).reshape(3, N, K)
    assert torch.equal(fmt.dequantize(), expected)


def test_unsupported_type_is_a_clear_error() -> None:
    with pytest.raises(NotImplementedError, match="Q2_K"):
        import_gguf(np.zeros((1, 84), dtype=np.uint8), Q.Q2_K, 256)
