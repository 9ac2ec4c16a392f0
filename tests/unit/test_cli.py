"""The command line: one parser, one `--quant` vocabulary, `python -m spillover` = `spillover`."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spillover.cli.main import build_parser
from spillover.quant import QUANT_CHOICES, normalize_quant


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _quant_action(parser: argparse.ArgumentParser) -> argparse.Action | None:
    return next((a for a in parser._actions if "--quant" in a.option_strings), None)


def test_every_quant_flag_offers_quant_choices() -> None:
    commands = _subcommands(build_parser())
    with_quant = {name for name, p in commands.items() if _quant_action(p) is not None}
    assert {"generate", "chat", "serve", "plan", "convert", "profile"} <= with_quant
    for name in with_quant:
        action = _quant_action(commands[name])
        assert action is not None and tuple(action.choices or ()) == QUANT_CHOICES, name


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_model_commands_share_model_args(command: str) -> None:
    extra = ["--prompt", "hi"] if command == "generate" else []
    args = build_parser().parse_args([command, "m", *extra])
    assert (args.model, args.device, args.dtype, args.quant) == ("m", "auto", "auto", "auto")
    args = build_parser().parse_args([command, "m", "--quant", "none", "--device", "cpu", *extra])
    assert (args.quant, args.device) == ("bf16", "cpu")  # a legacy spelling still parses


def test_defaults_and_legacy_spellings_on_the_command_line() -> None:
    parser = build_parser()
    assert parser.parse_args(["plan", "qwen3-8b"]).quant == "auto"
    assert parser.parse_args(["convert", "src", "out"]).quant == "int4"
    assert parser.parse_args(["convert", "src", "out", "--quant", "keep"]).quant == "auto"
    assert parser.parse_args(["plan", "qwen3-8b", "--quant", "BF16"]).quant == "bf16"


def test_junk_quant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--prompt", "hi", "--quant", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "quant must be one of" in err and "int3" in err


def test_normalize_quant() -> None:
    for choice in QUANT_CHOICES:
        assert normalize_quant(choice) == choice
    assert normalize_quant(None) == "auto"
    assert normalize_quant("keep") == "auto"
    assert normalize_quant("none") == "bf16"
    assert normalize_quant(" Int4 ") == "int4"
    for junk in ("int3", "", "fp8_block", "q4_k"):
        with pytest.raises(ValueError, match="quant must be one of auto, bf16"):
            normalize_quant(junk)


def test_api_quant_arguments_take_the_same_vocabulary() -> None:
    import torch

    from spillover.plan.formats import scheme_for
    from spillover.weights.build import load_policy
    from spillover.weights.convert import QUANTS

    assert set(QUANTS) <= set(QUANT_CHOICES)
    assert scheme_for("none") == scheme_for("bf16")
    assert scheme_for("int4-experts").experts.name == "int4"
    policy = load_policy("int4-experts", 32, torch.float32)
    assert policy.format_for("model.layers.0.mlp.experts.w13")[0] == "int4"
    assert policy.format_for("model.layers.0.self_attn.o_proj")[0] == "int8"
    with pytest.raises(ValueError, match="quant must be one of"):
        load_policy("native", 32, torch.float32)


def test_int4_experts_loads_int4_experts_over_int8_layers(tmp_path: Path) -> None:
    """The plan's int4-experts scheme loads too: routed experts int4, the other matrices int8."""
    import torch

    from spillover.weights.build import load_for_llm
    from spillover.weights.resolve import load_config, resolve_model
    from tests.models.tiny import save_hf

    save_hf("qwen3_moe-norm", tmp_path)
    src = resolve_model(str(tmp_path))
    _, record = load_for_llm(src, load_config(src), torch.device("cpu"), torch.float32,
                             "int4-experts", 32)
    experts = {n: r for n, r in record.items() if ".experts." in n}
    assert experts and all(r.startswith("int4") for r in experts.values()), experts
    assert record["model.layers.0.self_attn.o_proj"].startswith("int8")


def test_convert_rejects_choices_it_cannot_write() -> None:
    from spillover.weights.convert import convert

    with pytest.raises(ValueError, match="convert --quant must be one of auto, int8, int4"):
        convert("/no/such/src", "/no/such/out", "fp8")


def test_python_m_spillover_lists_the_console_script_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "spillover", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = re.search(r"\{([a-z,-]+)\}", proc.stdout)
    assert listed is not None, proc.stdout
    assert listed.group(1).split(",") == list(_subcommands(build_parser()))
