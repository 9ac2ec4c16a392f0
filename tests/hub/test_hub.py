"""Hub ids against a local fake hub (tests/hub/fake_hub.py, HF_ENDPOINT): plan from metadata,
refuse what cannot fit before any weight is fetched, download only the needed files, resume an
interrupted download, work offline from the cache, pick a GGUF repo's file from the plan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spillover.cli.main import main
from spillover.llm import LLM
from spillover.weights.hub import HubOptions, ModelDoesNotFitError, fetch_hub_model
from spillover.weights.resolve import demo_model_path
from tests.hub.fake_hub import FakeHub, HubFile

TINY = "tiny-org/tiny-llama"
BIG = "big-org/Llama-3.1-70B"
GGUF = "gguf-org/smol-GGUF"
DECOYS = {"pytorch_model.bin": b"pickle", "original/consolidated.00.pth": b"pth",
          "consolidated.safetensors": b"dup", "README.md": b"# tiny", "onnx/model.onnx": b"onnx"}
# a 70B dense config: ~140 GB in bf16, ~35 GB in int4
BIG_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    folder = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture
def hub(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    fake = FakeHub()
    fake.add_folder(TINY, tiny_folder, DECOYS)
    # a header-only checkpoint: the listing declares 141 GB, the server holds none of it
    fake.repos[BIG] = {"config.json": HubFile(json.dumps(BIG_CONFIG).encode()),
                       "model.safetensors": HubFile(b"", size=141_000_000_000)}
    demo = demo_model_path().read_bytes()
    fake.repos[GGUF] = {"smol-Q4_1.gguf": HubFile(demo),
                        # far larger than any test machine: skipped without reading its header
                        "smol-Q8_0.gguf": HubFile(demo[: 1 << 20], size=10**13),
                        "README.md": HubFile(b"# gguf")}
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these once, at import: point them at the fake hub and a fresh cache
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # bytes reach the file in chunks of this size: the real 10 MiB would swallow a tiny file's
    # first half, so that nothing were left to resume from
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path / "spillover-cache"))
    yield fake
    fake.stop()


def _weight_reads(fake: FakeHub, suffix: str) -> list[str | None]:
    """Range headers of the GETs of `suffix` files beyond a header read (bytes=0-...)."""
    return [s.range for s in fake.gets(suffix)
            if not (s.range and s.range.startswith("bytes=0-"))]


def test_hub_id_downloads_needed_files_and_resumes(hub: FakeHub, tiny_folder: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hub.drop_once.add("model.safetensors")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    llm = LLM(TINY, device="cpu")
    local = LLM(str(tiny_folder), device="cpu")
    ids = [1, 5, 9, 3]
    torch.testing.assert_close(llm.forward_logits(ids), local.forward_logits(ids))
    assert llm.source.repo_id == TINY and llm.source.kind == "hf"
    assert "models--tiny-org--tiny-llama" in str(llm.source.path)
    # the first GET was cut half-way; huggingface_hub resumed it with a ranged request
    size = (tiny_folder / "model.safetensors").stat().st_size
    reads = _weight_reads(hub, "model.safetensors")
    assert reads[0] is None and len(reads) == 2
    assert reads[1] is not None and reads[1].startswith("bytes=")
    assert 0 < int(reads[1].removeprefix("bytes=").split("-")[0]) < size
    fetched = {s.file for s in hub.gets() if s.repo == TINY}
    assert not fetched & set(DECOYS), "duplicates and sub-folders must not be downloaded"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= fetched
    assert all(x.auth == "Bearer hf_test_token" for x in hub.seen), "HF_TOKEN on every request"


def test_convert_takes_a_hub_id(hub: FakeHub, tmp_path: Path) -> None:
    from spillover.weights.store import is_store

    out = tmp_path / "store"
    assert main(["convert", TINY, str(out), "--quant", "int8", "--no-progress"]) == 0
    assert is_store(out)
    assert main(["convert", "./local-folder-that-is-not-there", str(out), "--revision",
                 "main"]) == 2


def test_offline_loads_the_cached_snapshot_without_a_request(
        hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    kind, first = fetch_hub_model(TINY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.seen)
    assert fetch_hub_model(TINY) == (kind, first)
    assert len(hub.seen) == n, "offline must not contact the hub"
    with pytest.raises(RuntimeError, match="not in the cache"):
        fetch_hub_model("other-org/never-downloaded")
    # a GGUF repo: the file downloaded before, found from the cached file list
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fetch_hub_model(GGUF, HubOptions(gguf_file="smol-Q4_1.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.seen)
    kind, path = fetch_hub_model(GGUF)
    assert (kind, path.name) == ("gguf", "smol-Q4_1.gguf") and len(hub.seen) == n


def test_model_that_cannot_fit_is_refused_before_any_weight(hub: FakeHub) -> None:
    with pytest.raises(ModelDoesNotFitError) as e:
        LLM(BIG, device="cpu", cpu_memory="16GB")
    msg = str(e.value)
    assert "does not fit" in msg and "Nothing was downloaded" in msg
    assert "What would make it fit" in msg and "spillover plan" in msg
    assert _weight_reads(hub, ".safetensors") == [], "no weight bytes may be fetched"
    # the same through the command line: exit code 2 and the planner's answer
    assert main(["generate", BIG, "--device", "cpu", "--cpu-memory", "16GB",
                 "--prompt", "hi"]) == 2
    assert _weight_reads(hub, ".safetensors") == []


def test_plan_reads_the_hub_and_bad_input_is_clear(
        hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--no-gpu", "--ram", "64GB", "--json"]
    assert main(["plan", TINY, *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["params"]["total"] > 0
    assert main(["plan", BIG, "--quant", "bf16", *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["suggestions"]
    assert main(["plan", TINY, "--revision", "no-such-branch", *argv]) == 2
    assert "RevisionNotFound" in capsys.readouterr().out
    assert main(["plan", "nobody/nothing", *argv]) == 2
    assert "could not read 'nobody/nothing'" in capsys.readouterr().out
    assert _weight_reads(hub, ".safetensors") == []
    with pytest.raises(ValueError, match="hub ids"):
        LLM(None, device="cpu", revision="main")


def test_gguf_repo_plans_from_the_header_and_picks_what_fits(
        hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", GGUF, "--no-gpu", "--ram", "64GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True
    assert any("smol-Q4_1.gguf" in r for r in out["reasons"])
    size = len(hub.repos[GGUF]["smol-Q4_1.gguf"].data)
    # only header reads so far: ranged, and far from the whole file
    for s in hub.gets(".gguf"):
        assert s.range and s.range.startswith("bytes=0-")
        assert int(s.range.split("-")[1]) < size // 4
    assert "smol-Q8_0.gguf" not in {s.file for s in hub.gets()}, "too big: header never read"
    assert main(["plan", GGUF, "--gguf-file", "nope.gguf", "--json"]) == 2
    assert "smol-Q4_1.gguf" in capsys.readouterr().out

    from spillover.hw.info import with_overrides
    from spillover.hw.probe import probe

    hw = with_overrides(probe(use_cache=False), no_gpu=True, ram="64GB")
    kind, path = fetch_hub_model(GGUF, HubOptions(hardware=hw))
    assert kind == "gguf" and path.name == "smol-Q4_1.gguf" and path.stat().st_size == size


def test_what_loads_whole_on_the_gpu_must_fit_there() -> None:
    from spillover.hw.info import with_overrides
    from spillover.hw.probe import probe
    from spillover.plan.source import resolve
    from spillover.weights.hub import fit_plan, refusal, runnable

    hw = with_overrides(probe(use_cache=False), gpu="rtx5090", ram="60GB")
    dense = fit_plan(resolve("Qwen/Qwen3-32B"), hw, "auto", None)  # 65 GB of bf16
    assert dense.verdict == "gpu+ram" and not runnable(dense, tiered=True)
    assert "--gpu-memory" in refusal("Qwen/Qwen3-32B", dense)
    moe = fit_plan(resolve("Qwen/Qwen3-30B-A3B"), hw, "auto", None)
    assert moe.verdict == "gpu+ram"
    assert runnable(moe, tiered=True) and not runnable(moe, tiered=False)
    small = fit_plan(resolve("Qwen/Qwen3-8B"), hw, "auto", None)
    assert small.verdict == "gpu" and runnable(small, tiered=False)
