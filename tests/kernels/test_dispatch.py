"""The one dispatch point (`spillover.kernels`): one override variable, choices resolved once per
shape class and logged once with their reason. Plain torch on the CPU; no GPU, no Triton needed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from spillover import kernels
from spillover.kernels import quant_dispatch as dispatch
from spillover.kernels.context import AttentionCache, ForwardContext
from spillover.quant import Fp8BlockWeight, Int4Weight


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SPILLOVER_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU takes its own kernels
    kernels.reset()
    yield
    kernels.reset()


def _reasons(op: str) -> dict[str, str]:
    """impl -> reason for every shape class of `op` chosen so far."""
    return {impl: why for (o, _, impl), why in kernels.choices().items() if o == op}


def _int4() -> Int4Weight:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    return Int4Weight.pack(w, 32, True, act_dtype=torch.bfloat16)


def _attention() -> torch.Tensor:
    """A 3-token prefill of one sequence through `kernels.paged_attention` (CPU)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, h, 8, generator=g) for h in (4, 2, 2))
    cache = AttentionCache(torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))
    ctx = ForwardContext(positions=torch.arange(3), query_lens=[3], context_lens=[3],
                         slot_mapping=torch.arange(3))
    return kernels.paged_attention(q, k, v, cache, ctx, 8**-0.5)


def test_ref_forces_the_reference_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _int4()
    x = torch.randn(2, 128).bfloat16()
    want = x.float() @ fmt.dequantize().float().T
    torch.testing.assert_close(fmt.forward(x).float(), want, rtol=2e-2, atol=2e-2)
    assert ("quant_matmul", "cpu_int4pack") in kernels.chosen()  # unforced: torch's CPU int4 op

    monkeypatch.setenv("SPILLOVER_KERNELS", "ref")
    torch.testing.assert_close(fmt.forward(x).float(), want, rtol=2e-2, atol=2e-2)
    assert _reasons("quant_matmul")["ref"] == "forced by SPILLOVER_KERNELS=ref"
    forced = ("ref", "forced by SPILLOVER_KERNELS=ref")
    assert dispatch.choose_kernel(fmt, torch.device("cuda"), 2) == forced
    fp8 = Fp8BlockWeight.pack(torch.randn(64, 128))
    assert dispatch.choose_fp8_kernel(fp8, torch.device("cuda"), 2)[0] == "fp8_dequant"

    out = _attention()
    assert out.shape == (3, 4, 8)
    assert _reasons("paged_attention") == {"torch-sdpa": "forced by SPILLOVER_KERNELS=ref"}
    kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert _reasons("rms_norm") == {"torch": "forced by SPILLOVER_KERNELS=ref"}


def test_ref_overrides_the_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choices CUDA would make (Triton decode attention, fla), and what `ref` makes of them."""
    monkeypatch.setattr(kernels, "has_triton", lambda: True)
    monkeypatch.setattr(kernels, "has_fla", lambda: True)
    assert kernels._pick_attention(cuda=True, decode_ready=True)[0] == "triton-decode"
    assert kernels._pick_gated_delta_rule(True, torch.bfloat16)[0] == "fla"
    monkeypatch.setenv("SPILLOVER_KERNELS", "ref")
    forced = ("torch-sdpa", "forced by SPILLOVER_KERNELS=ref")
    assert kernels._pick_attention(cuda=True, decode_ready=True) == forced
    assert kernels._pick_gated_delta_rule(True, torch.bfloat16)[0] == "torch-recurrent"


def test_cpu_forces_the_cpu_op_at_any_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _int4()
    assert dispatch.choose_kernel(fmt, torch.device("cpu"), 20)[0] == "ref"
    monkeypatch.setenv("SPILLOVER_KERNELS", "cpu")
    kernel, why = dispatch.choose_kernel(fmt, torch.device("cpu"), 20)
    assert kernel == "cpu_int4pack" and "SPILLOVER_KERNELS=cpu" in why
    x = torch.randn(20, 128).bfloat16()
    torch.testing.assert_close(fmt.forward(x).float(), x.float() @ fmt.dequantize().float().T,
                               rtol=2e-2, atol=2e-2)


def test_each_choice_is_logged_once_per_shape_class(caplog: pytest.LogCaptureFixture) -> None:
    fmt = _int4()
    with caplog.at_level(logging.INFO, logger="spillover.kernels"):
        for rows in (1, 2, 3, 4, 1):  # one shape class: <= CPU_WOQ_MAX_ROWS rows
            fmt.forward(torch.randn(rows, 128).bfloat16())
        for rows in (6, 7):  # the next: a float matmul of the dequantized weight
            fmt.forward(torch.randn(rows, 128).bfloat16())
        for _ in range(3):
            kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    quant = [r.getMessage() for r in caplog.records if "quant_matmul" in r.getMessage()]
    assert len(quant) == 2, quant
    assert "int4 g32 32x128 bfloat16 cpu rows<=4 dense] -> cpu_int4pack" in quant[0]
    assert "rows<=8 dense] -> ref" in quant[1] and "dequantize + float matmul" in quant[1]
    assert sum("rms_norm" in r.getMessage() for r in caplog.records) == 1


def test_a_shape_class_is_resolved_once() -> None:
    calls: list[int] = []

    def pick() -> tuple[str, str]:
        calls.append(1)
        return "impl", "why"

    assert [kernels.resolve("op", ("cls", 1), pick) for _ in range(3)] == ["impl"] * 3
    assert len(calls) == 1
    kernels.resolve("op", ("cls", 2), pick)
    assert len(calls) == 2


@pytest.mark.parametrize("value", ["fast", "torch", "reference"])
def test_an_unknown_value_is_an_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLOVER_KERNELS", value)
    with pytest.raises(ValueError, match=f"SPILLOVER_KERNELS='{value}' is not understood: use ref"):
        kernels.kernels_mode()
    with pytest.raises(ValueError, match="SPILLOVER_KERNELS"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="SPILLOVER_KERNELS"):
        _int4().forward(torch.randn(2, 128).bfloat16())


@pytest.mark.parametrize("value", ["", "auto", "REF", " triton "])
def test_known_values(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLOVER_KERNELS", value)
    assert kernels.kernels_mode() == value.strip().lower().replace("auto", "")
