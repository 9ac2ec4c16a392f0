"""The tiled word layout of int4 experts (`ref_quant.tile_words`): exact round trips through every
layout, the reference on it, and when a CUDA move picks it (`dispatch.gpu_layout`). Plain torch:
runs everywhere."""

from __future__ import annotations

import pytest
import torch

from spillover.kernels import quant_dispatch as dispatch
from spillover.kernels.ref_quant import (
    quant_matmul_kn_ref,
    tile_words,
    tiled_word_offset,
    untile_words,
)
from spillover.quant import Int4Weight, Int8Weight


def _int4(e: int | None, n: int, k: int, sym: bool = False,
          act: torch.dtype = torch.bfloat16) -> Int4Weight:
    """Stacked [e, n, k] experts, or a dense [n, k] weight for e = None."""
    w = torch.randn(*([e] if e else []), n, k,
                    generator=torch.Generator().manual_seed(n + k)) * 0.02
    return Int4Weight.pack(w, 128, sym, act_dtype=act)


def test_tile_words_places_every_word_at_its_offset() -> None:
    e, kw, n = 2, 64, 48
    words = torch.randint(-(2**31), 2**31 - 1, (e, kw, n), dtype=torch.int32)
    tiled = tile_words(words)
    assert tiled.shape == words.shape and torch.equal(untile_words(tiled), words)
    off = tiled_word_offset(torch.arange(kw)[:, None], torch.arange(n)[None, :], kw)
    # a permutation
    assert isinstance(off, torch.Tensor) and sorted(off.flatten().tolist()) == list(range(kw * n))
    assert torch.equal(tiled.view(e, -1)[:, off.flatten()].view(e, kw, n), words)
    # a warp's step: lane 4 g + t holds word row t of channels 2 g, 2 g + 1 in 8 contiguous bytes
    assert tiled_word_offset(3, 16 + 5, kw) == 1 * kw * 16 + 2 * 8 + 3 * 2 + 1


def test_tile_words_refuses_partial_tiles() -> None:
    with pytest.raises(AssertionError, match="tiled layout"):
        tile_words(torch.zeros(1, 48, 16, dtype=torch.int32))
    with pytest.raises(AssertionError, match="tiled layout"):
        tile_words(torch.zeros(1, 32, 24, dtype=torch.int32))


@pytest.mark.parametrize("sym", [False, True])
def test_layout_round_trips_are_exact(sym: bool) -> None:
    fmt = _int4(3, 32, 512, sym)
    tiled = fmt.to_layout("tiled")
    assert tiled.layout == "tiled"
    assert tiled.qweight.shape == (3, 64, 32) and tiled.scales.shape == (3, 4, 32)
    assert (tiled.out_features, tiled.in_features) == (32, 512)
    for start in (fmt, fmt.to_layout("kn")):
        assert torch.equal(start.to_layout("tiled").qweight, tiled.qweight)
    for back in (tiled.to_layout("nk"), tiled.to_layout("kn").to_layout("nk")):
        assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(),
                                                     fmt.tensors().values(), strict=True))
    assert torch.equal(tiled.dequantize(), fmt.dequantize())
    assert tiled.tensors().keys() == fmt.tensors().keys()  # what a store writes: the nk layout
    assert tiled.nbytes == fmt.nbytes == fmt.to_layout("kn").nbytes


def test_reference_on_tiled_words() -> None:
    fmt = _int4(3, 32, 512).to_layout("kn")
    tiled = fmt.to_layout("tiled")
    x = torch.randn(5, 512)
    ids = torch.tensor([2, 0, 1, 2, 2])
    a = quant_matmul_kn_ref(x, fmt.qweight, fmt.scales, fmt.mins, ids, bits=4, group_size=128)
    b = quant_matmul_kn_ref(x, tiled.qweight, tiled.scales, tiled.mins, ids, bits=4, group_size=128,
                            tiled=True)
    assert torch.equal(a, b)


def test_gpu_layout_is_tiled_only_where_the_tensor_core_gemv_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    assert dispatch.gpu_layout(_int4(4, 1024, 2048), cuda) == "tiled"  # Qwen3-Next's w13
    assert dispatch.gpu_layout(_int4(4, 2048, 512, sym=True), cuda) == "tiled"  # w2, GPTQ-style
    assert dispatch.gpu_layout(_int4(None, 1024, 2048), cuda) == "kn"  # dense: the CUDA-core GEMV
    assert dispatch.gpu_layout(_int4(4, 40, 512), cuda) == "kn"  # N not whole 16-channel tiles
    assert dispatch.gpu_layout(_int4(4, 32, 1024), cuda) == "kn"  # K not measured
    assert dispatch.gpu_layout(_int4(4, 32, 512, act=torch.float16), cuda) == "kn"
    int8 = Int8Weight.pack(torch.randn(4, 32, 512), None, act_dtype=torch.bfloat16)
    assert dispatch.gpu_layout(int8, cuda) == "kn"
    monkeypatch.setattr(dispatch, "_capability", lambda device: (12, 0))
    assert dispatch.gpu_layout(_int4(4, 1024, 2048), cuda) == "kn"  # not run on sm_120 yet


def test_tiled_weight_never_reaches_a_kernel_that_reads_kn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiled weight on the CPU (only made by hand) with Triton forced: a clear error, not
    wrong numbers."""
    if not dispatch.has_triton():
        pytest.skip("triton is not installed")
    # routes the CPU to Triton; the error comes before any launch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPILLOVER_KERNELS", "triton")
    tiled = _int4(3, 32, 512).to_layout("tiled")
    with pytest.raises(RuntimeError, match="tiled layout"):
        tiled.forward_experts(torch.randn(2, 512, dtype=torch.bfloat16), torch.tensor([0, 1]))
