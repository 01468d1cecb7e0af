"""``costmodel measure``: the JSON schema, and one clear line with exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest

from costmodel.cli import main
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, PHASES


def test_measure_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["measure", "--model", "resnet18", "--method", "bn_head", "--batch", "2", "--resolution", "32",
                 "--fake", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "measure"
    assert result["config"]["model"] == "resnet18" and result["config"]["method"] == "bn_head"
    assert set(result["flops"]) == set(FLOP_CONVENTIONS)
    for conv in FLOP_CONVENTIONS:
        assert set(result["flops"][conv]) == set(PHASES) | {"total"}
    assert set(result["memory"]) == set(MEMORY_FIELDS)
    assert result["trainable_params"] == 512 * 10 + 10


def test_measure_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--model", "resnet18", "--method", "bn_head", "--batch", "2", "--resolution", "32",
                 "--fake"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 5,130" in out and "sum_of_group_peaks" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "no_such_net"], "unknown model 'no_such_net'"),
        (["--method", "no_such_method"], "unknown method 'no_such_method'"),
        (["--method", "lora", "--rank", "0"], "--rank must be an integer >= 1"),
        (["--model", "mobilenet_v2", "--batch", "1", "--resolution", "32"], "more than one value per channel"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(arguments: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["measure", "--fake", "--resolution", "64", "--batch", "2", *arguments])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costmodel: error:") and message in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("command", ["measure", "compare"])
@pytest.mark.parametrize("option, message", [
    ("rank_patern={\"layer4.*\": 8}", "does not know the option(s) 'rank_patern'"),
    ("adapt_head", "--option expects KEY=VALUE"),
])
def test_bad_option_is_one_line_and_exit_2(command: str, option: str, message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main([command, "--model", "resnet18", "--method", "lora", "--batch", "2", "--resolution", "32", "--fake",
                 "--option", option])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costmodel: error:") and message in lines[0]


def test_measure_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``--option`` parses as predict's does (JSON values) and reaches the measured step."""
    assert main(["measure", "--model", "resnet18", "--method", "lora", "--batch", "2", "--resolution", "32", "--fake",
                 "--json", "--option", 'target_modules=["fc"]', "--option", "adapt_head=true"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["options"] == {"target_modules": ["fc"], "adapt_head": True}
    assert result["trainable_params"] == 4 * 512 + 10 * 4  # only fc's adapters: lora_A 4 x 512, lora_B 10 x 4
