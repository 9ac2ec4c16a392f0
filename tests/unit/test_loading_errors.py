"""Bad checkpoints and bad model arguments get clear errors that name the file and the tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spillover.config import UnsupportedArchitectureError
from spillover.weights.loader import WeightLoadError
from spillover.weights.resolve import demo_model_path, load_config, load_model, resolve_model
from tests.models.tiny import save_hf


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    save_hf("qwen3", folder)
    return folder


def _copy(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors if tensors is not None else load_file(str(src / "model.safetensors")),
              str(dst / "model.safetensors"))
    return dst


def _load(folder: Path) -> None:
    src = resolve_model(str(folder))
    load_model(src, load_config(src), torch.device("cpu"), torch.float32)


def test_good_checkpoint_loads(good: Path) -> None:
    _load(good)


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="model not found: /no/such/model"):
        resolve_model("/no/such/model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                      "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError,
                       match="'gpt2'.*llama, qwen2, qwen3, qwen3_moe, qwen3_next"):
        load_config(resolve_model(str(tmp_path)))


def test_missing_tensor_is_named(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(WeightLoadError,
                       match=r"missing tensors for: model\.layers\.1\.mlp\.down_proj\.weight"):
        _load(_copy(good, tmp_path / "m", tensors))


def test_misshaped_tensor_names_file_and_tensor(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(WeightLoadError,
                       match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj"
                             r"\.weight has shape \(3, 64\), expected"):
        _load(_copy(good, tmp_path / "m", tensors))


def test_unexpected_tensor_is_named(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(WeightLoadError,
                       match=r"unexpected tensor model\.layers\.0\.mystery\.weight"):
        _load(_copy(good, tmp_path / "m", tensors))


def test_truncated_safetensors_names_file(good: Path, tmp_path: Path) -> None:
    bad = _copy(good, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=r"model\.safetensors"):
        _load(bad)


def test_nan_tensor_is_named(good: Path, tmp_path: Path) -> None:
    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    with pytest.raises(WeightLoadError, match=r"tensor model\.norm\.weight contains NaN"):
        _load(_copy(good, tmp_path / "m", tensors))


def test_truncated_gguf_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(demo_model_path().read_bytes()[:1_000_000])
    with pytest.raises(WeightLoadError, match="broken.gguf"):
        load_config(resolve_model(str(bad)))


def test_cli_reports_errors_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "spillover.cli.main", "generate", "/no/such/model",
                           "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: model not found: /no/such/model" in proc.stderr
    assert "Traceback" not in proc.stderr
