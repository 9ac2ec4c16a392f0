"""`spillover deploy`: the engine, split and budgets come from the same planner as `spillover plan`
(issue 22's three cases: Qwen3-Next-80B-A3B on one RTX 5090 + 60 GB, on 4 x H100, on one H100 in
int4). CPU only, catalog configs, no network."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from spillover.cli.main import main
from spillover.deploy import FILES, DeployError, advise_gpus, choose, compose, write_deployment
from spillover.deploy.engines import VLLM_MEMORY_FRACTION
from spillover.hw.info import HardwareInfo, nominal_hardware, with_overrides
from spillover.plan.advice import make_plan
from spillover.plan.memory import Limits, plan_memory
from spillover.plan.parallel import plan_parallel, shard_bill
from spillover.plan.source import ModelSource, resolve

NEXT = "qwen3-next-80b"


@pytest.fixture(autouse=True)
def _restore_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--offline` sets HF_HUB_OFFLINE for the whole process: undo it after each test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def src() -> ModelSource:
    return resolve(NEXT, allow_hub=False)


def test_rtx5090_60gb_is_spillover_with_the_plans_budgets(src: ModelSource) -> None:
    hw = nominal_hardware("rtx5090", "60GB")
    d = choose(src, hw, Limits())
    plan = make_plan(src.name, src.config, src.inventory, hw, Limits(), "auto")
    assert d.engine == "spillover" and d.parallel is None
    assert d.plan.verdict == "gpu+ram"  # 72 GiB of experts: most of them in pinned RAM
    assert (d.plan.gpu_budget, d.plan.host_budget) == (plan.gpu_budget, plan.host_budget)
    assert d.plan.expert_slots_per_layer == plan.expert_slots_per_layer > 0
    assert d.command.value("--quant") == plan.scheme.name
    gpu_total, ram_total = d.command.value("--gpu-memory"), d.command.value("--cpu-memory")
    assert gpu_total is not None and ram_total is not None
    # the server re-plans from the totals it is given: the same budgets and expert slots
    again = with_overrides(hw, vram=f"{gpu_total}B", ram=f"{ram_total}B")
    replanned = plan_memory(src.name, src.config, src.inventory, plan.scheme, again, Limits())
    assert replanned.gpu_budget == plan.gpu_budget
    assert replanned.host_budget == plan.host_budget
    assert replanned.expert_slots_per_layer == plan.expert_slots_per_layer


def test_4x_h100_is_vllm_with_the_smallest_tp_that_fits(src: ModelSource) -> None:
    hw = nominal_hardware("h100", "256GB")
    d = choose(src, hw, Limits(), gpus=4)
    par = d.parallel
    assert d.engine == "vllm" and par is not None and d.image.startswith("vllm/vllm-openai:v")
    assert d.plan.scheme.name == "bf16"  # best quality first; vLLM loads the checkpoint as is
    assert d.command.value("--tensor-parallel-size") == str(par.tp)
    # 148 GiB of bf16 weights: half of them per GPU is more than 0.9 x 80 GB, a quarter is not
    assert par.tp == 4 and not plan_parallel(d.plan, hw, 2, memory_fraction=0.9).fits
    assert "--quantization" not in d.command.argv
    assert "--enable-expert-parallel" in d.command.argv  # 512 experts, 512 wide: 128 under TP4


@pytest.mark.parametrize("model, gpu, bound", [
    (NEXT, "h100", False),  # 12 KiB of KV a token per GPU: the model's own maximum fits
    ("meta-llama/Llama-3.1-70B-Instruct", "l40s", True),  # 35 GB of weights on 48 GB cards
])
def test_max_model_len_is_what_the_kv_budget_allows(model: str, gpu: str, bound: bool) -> None:
    src = resolve(model, allow_hub=False)
    hw = nominal_hardware(gpu, "256GB")
    d = choose(src, hw, Limits(), gpus=4)
    par = d.parallel
    assert d.engine == "vllm" and par is not None
    max_len = int(d.command.value("--max-model-len") or 0)
    assert max_len == par.max_context > 0
    b = shard_bill(d.plan, par.tp)
    budget = VLLM_MEMORY_FRACTION * hw.gpus[0].vram_total
    used = b.weights + b.activations + b.runtime + b.state_bytes_per_sequence
    room_tokens = int((budget - used) // b.kv_bytes_per_token)
    assert max_len == min(src.config.max_position, room_tokens // 16 * 16)
    assert used + max_len * b.kv_bytes_per_token <= budget
    assert (max_len < src.config.max_position) == bound
    assert float(d.command.value("--gpu-memory-utilization") or 0) == VLLM_MEMORY_FRACTION


def test_fp8_on_4x_h100_fits_two_gpus_and_replicates(src: ModelSource) -> None:
    d = choose(src, nominal_hardware("h100", "256GB"), Limits(), gpus=4, quant="fp8")
    assert d.parallel is not None and d.parallel.tp == 2 and d.parallel.dp == 2
    assert d.command.value("--quantization") == "fp8"  # vLLM's online FP8 of a bf16 checkpoint
    assert d.command.value("--data-parallel-size") == "2"


def test_1x_h100_int4_is_spillover_all_in_vram(src: ModelSource) -> None:
    d = choose(src, nominal_hardware("h100", "128GB"), Limits(), quant="int4")
    assert d.engine == "spillover" and d.plan.verdict == "gpu"
    assert d.plan.scheme.name == "int4" and d.command.value("--quant") == "int4"
    assert d.plan.tier_total("host") == 0 and d.plan.tier_total("disk") == 0
    assert d.plan.expert_slots_per_layer == src.config.num_experts


def test_sglang_gets_its_own_flags_and_fraction(src: ModelSource) -> None:
    d = choose(src, nominal_hardware("h100", "256GB"), Limits(), gpus=4, engine="sglang")
    assert d.engine == "sglang" and d.image.startswith("lmsysorg/sglang:v")
    assert d.command.argv[:3] == ("python3", "-m", "sglang.launch_server")
    assert d.command.value("--tp-size") == "4" and d.command.value("--ep-size") == "4"
    assert d.command.value("--mem-fraction-static") == "0.85"
    assert int(d.command.value("--context-length") or 0) == d.parallel.max_context  # type: ignore


def test_multi_node_vllm_is_ray_with_tp_per_node_and_pp_across(src: ModelSource) -> None:
    d = choose(src, nominal_hardware("h100", "256GB"), Limits(), gpus=2, nodes=2, engine="vllm")
    assert d.parallel is not None and (d.parallel.tp, d.parallel.pp) == (2, 2)
    assert d.command.value("--distributed-executor-backend") == "ray"
    assert d.command.value("--pipeline-parallel-size") == "2"
    services = compose(d)["services"]
    assert set(services) == {"head", "worker"}
    assert services["head"]["profiles"] == ["head"] and services["worker"]["profiles"] == ["worker"]
    assert "ray start --head" in services["head"]["entrypoint"][2]
    assert "--address=${HEAD_ADDR" in services["worker"]["entrypoint"][2]
    assert services["head"]["network_mode"] == "host" and "ports" not in services["head"]


def test_multi_node_sglang_ranks_come_from_the_environment(src: ModelSource) -> None:
    d = choose(src, nominal_hardware("h100", "256GB"), Limits(), gpus=2, nodes=2,
               engine="sglang")
    assert d.command.value("--nnodes") == "2" and d.command.value("--tp-size") == "4"
    assert d.command.value("--node-rank", ) == "${NODE_RANK:?set NODE_RANK}"
    assert (d.command.value("--dist-init-addr") or "").startswith("${HEAD_ADDR")


def test_what_cannot_be_served_says_how_many_gpus_would(src: ModelSource) -> None:
    big = resolve("Qwen/Qwen3-235B-A22B", allow_hub=False)
    hw = nominal_hardware("h100", "32GB")  # int4 on one H100 + 32 GB would spill to disk
    with pytest.raises(DeployError) as e:
        choose(big, hw, Limits(), gpus=2)
    need = advise_gpus(big, hw, Limits())
    # fp8 on 4 GPUs (59 GB each) beats bf16 on 8: the fewest GPUs first
    assert need is not None and need[0] == 4 and need[1].tp == 4
    assert "4 x NVIDIA H100" in str(e.value) and "--gpus 4" in str(e.value)
    assert "disk" in str(e.value)  # why one GPU + RAM does not do


@pytest.mark.parametrize("kw, words", [
    ({"engine": "spillover", "nodes": 2}, "--nodes needs"),
    ({"engine": "vllm", "gpus": 4, "quant": "int4"}, "not a format vLLM or SGLang"),
    ({"engine": "turbo"}, "--engine"),
])
def test_impossible_requests_are_refused(src: ModelSource, kw: dict, words: str) -> None:
    with pytest.raises(DeployError, match=words):
        choose(src, nominal_hardware("h100", "256GB"), Limits(), **kw)


def test_without_a_gpu_there_is_nothing_to_deploy(src: ModelSource) -> None:
    hw: HardwareInfo = nominal_hardware(None, "256GB")
    with pytest.raises(DeployError, match="needs a GPU"):
        choose(src, hw, Limits())


def test_a_local_folder_is_mounted_read_only(tmp_path: Path, src: ModelSource) -> None:
    folder = tmp_path / "my-model"
    local = replace(src, kind="folder", name="my-model")
    d = choose(local, nominal_hardware("rtx5090", "60GB"), Limits(), model_arg=str(folder))
    assert d.model_mount == (str(folder.resolve()), "/models/my-model")
    assert d.command.argv[2] == "/models/my-model"
    vols = compose(d)["services"]["server"]["volumes"]
    assert f"{folder.resolve()}:/models/my-model:ro" in vols


def test_cli_writes_the_three_files_and_keeps_existing_ones(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    args = ["deploy", NEXT, "--gpu", "h100", "--gpus", "4", "--ram", "256GB", "--offline",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    readme = (tmp_path / "README.md").read_text()
    assert "tensor parallel 4" in readme and "## The bill" in readme
    assert "## Predicted speed" in readme and "## Placement" in readme
    assert "vllm/vllm-openai" in (tmp_path / "compose.yaml").read_text()
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_write_deployment_readme_names_the_budgets(tmp_path: Path, src: ModelSource) -> None:
    d = choose(src, nominal_hardware("rtx5090", "60GB"), Limits())
    write_deployment(d, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "pinned RAM" in text and "--gpu-memory" in text and "tok/s" in text


def test_plan_names_the_fewest_gpus_when_one_is_not_enough(
        capsys: pytest.CaptureFixture) -> None:
    import json

    args = ["plan", "Qwen/Qwen3-235B-A22B", "--gpu", "h100", "--ram", "32GB", "--offline",
            "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"]
    assert any("not enough even with RAM: 4 x NVIDIA H100" in s and "tensor parallel 4" in s
               for s in out["suggestions"])


def test_plan_with_gpus_shows_the_split(capsys: pytest.CaptureFixture) -> None:
    import json

    assert main(["plan", NEXT, "--gpu", "h100", "--gpus", "4", "--offline", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(s.startswith("on 4 x NVIDIA H100 80GB HBM3: vLLM tensor parallel 4 (bf16")
               for s in out["suggestions"])
    assert main(["plan", NEXT, "--gpu", "h100", "--gpus", "0", "--offline", "--json"]) == 2


def test_the_readme_plan_line_reproduces_the_budgets(src: ModelSource, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import json
    import shlex

    from spillover.deploy.readme import _plan_command

    d = choose(src, nominal_hardware("rtx5090", "60GB"), Limits())
    line = _plan_command(d.plan)
    write_deployment(d, tmp_path)
    assert line in (tmp_path / "README.md").read_text()
    assert main([*shlex.split(line)[1:], "--offline", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budgets"] == {"gpu": d.plan.gpu_budget, "host": d.plan.host_budget}
    assert out["expert_slots_per_layer"] == d.plan.expert_slots_per_layer
    assert out["quant"] == d.plan.scheme.name


@pytest.mark.parametrize("qconfig, expected", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
      "version": "gemm"}, "awq_marlin"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
     "gptq_marlin"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False},
     "gptq"),  # asymmetric: the plain GPTQ kernels
    ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
      "weight_block_size": [128, 128]}, "fp8"),
])
def test_a_pre_quantised_checkpoint_keeps_its_method(tmp_path: Path, qconfig: dict,
                                                     expected: str) -> None:
    import json

    from spillover.catalog import CONFIGS

    folder = tmp_path / "Qwen3-8B-quantised"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({**CONFIGS["Qwen/Qwen3-8B"], "quantization_config": qconfig}))
    src = resolve(str(folder), allow_hub=False)
    assert src.scheme is not None  # the plan sizes the checkpoint's own format
    for engine in ("vllm", "sglang"):
        d = choose(src, nominal_hardware("rtx4090", "64GB"), Limits(), gpus=2, engine=engine,
                   model_arg=str(folder))
        assert d.quantization == expected == d.command.value("--quantization")
        assert d.plan.scheme == src.scheme
        assert d.model_mount == (str(folder.resolve()), "/models/Qwen3-8B-quantised")


def test_the_readme_deploy_examples_do_what_their_comments_say(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Deploy", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    examples = [(lines[i - 1], line) for i, line in enumerate(lines)
                if line.startswith("spillover deploy ")]
    assert len(examples) == 3
    for i, (comment, line) in enumerate(examples):
        engine = comment.split(":", 1)[1].split(",")[0].strip().split()[0].lower()
        argv = shlex.split(line)[1:]
        argv[argv.index("--out") + 1] = str(tmp_path / str(i))
        assert main([*argv, "--offline"]) == 0
        assert capsys.readouterr().out.startswith(f"{engine}:"), line


def test_a_gguf_file_stays_with_spillover_on_many_gpus() -> None:
    from spillover.weights.resolve import demo_model_path

    path = demo_model_path()
    src = resolve(str(path), allow_hub=False)
    d = choose(src, nominal_hardware("h100", "64GB"), Limits(context=2048), gpus=2,
               model_arg=str(path))
    assert d.engine == "spillover" and d.why[0].startswith("not vLLM or SGLang: a GGUF")
    assert d.served_name == path.name  # as `spillover serve FILE` names it
    assert d.model_mount == (str(path.resolve()), f"/models/{path.name}")
    with pytest.raises(DeployError, match="GGUF"):
        choose(src, nominal_hardware("h100", "64GB"), Limits(context=2048), gpus=2,
               engine="vllm", model_arg=str(path))
