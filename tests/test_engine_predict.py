"""Predictions of the reference models against the live runtime reference (a fast representative
subset of the acceptance matrix; ``validation/accuracy_matrix.py`` runs all of it), the public API,
the coverage rules, and the command line's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from costmodel import cli, registry
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import Prediction, predict, predict_config
from costmodel.validation.measure import measure
from engine_live import assert_matches


@pytest.mark.parametrize("model, method, batch, resolution, step", [
    ("mobilenet_v2", "fft", 8, 32, 2),
    ("mobilenet_v2", "bn_head", 8, 32, 2),
    ("resnet18", "fft", 8, 32, 2),
    ("resnet18", "bn_head", 8, 32, 2),
    ("mobilenet_v3_small", "fft", 4, 64, 1),
])
def test_prediction_matches_the_live_measurement(model, method, batch, resolution, step):
    config = StepConfig(model=model, method=method, batch=batch, resolution=resolution, step=step)
    predicted = predict_config(config)
    measured = measure(config, fake=True)
    assert_matches(predicted, measured)
    assert predicted.trainable_params == measured.trainable_params
    assert predicted.total_params == measured.total_params


def test_predicting_imports_no_runtime_tool():
    code = (
        "import sys\n"
        "from costmodel.config import StepConfig\n"
        "from costmodel.prediction import predict_config\n"
        "for method in ('fft', 'bn_head'):\n"
        "    predict_config(StepConfig(model='mobilenet_v3_small', method=method, batch=2, resolution=32))\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('torch.utils.flop_counter', 'torch.distributed._tools',"
        " 'costmodel.validation')))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_module_is_predicted_like_its_name_and_left_untouched():
    model = torchvision.models.resnet18(num_classes=10)
    before = model.conv1.weight.detach().clone()
    by_module = predict(model, "bn_head", batch=2, resolution=32)
    by_name = predict("resnet18", "bn_head", batch=2, resolution=32)
    assert isinstance(by_module, Prediction)
    assert by_module.flops == by_name.flops and by_module.memory == by_name.memory
    assert all(p.requires_grad for p in model.parameters()) and torch.equal(model.conv1.weight, before)
    assert by_module.config.model == "ResNet"


class Cumulative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.cumsum(x, dim=1), 1), 1))


def test_an_op_no_plugin_covers_is_an_error_naming_op_and_node():
    with pytest.raises(CostModelError, match=r"no plugin covers op torch\.cumsum at node 'cumsum'"):
        predict(Cumulative(), batch=2, resolution=8)


def test_allow_unknown_reports_the_coverage():
    prediction = predict(Cumulative(), batch=2, resolution=8, allow_unknown=True)
    coverage = prediction.coverage
    assert coverage["unknown"] == [{"node": "cumsum", "label": "cumsum", "op": "torch.cumsum"}]
    assert coverage["covered"] == coverage["nodes"] - 1 and 0 < coverage["share"] < 1
    assert prediction.to_dict()["coverage"]["share"] == coverage["share"]
    assert "plugin coverage:" in prediction.render()


def test_allow_unknown_on_the_command_line(monkeypatch, capsys):
    manager = registry.create_plugin_manager()
    manager.set_blocked("pooling")  # without the pooling plugin resnet18's pools are not covered
    monkeypatch.setattr("costmodel.prediction.default_plugin_manager", lambda: manager)
    args = ["predict", "--model", "resnet18", "--batch", "2", "--resolution", "32"]
    assert cli.main(args) == 2
    assert "no plugin covers op torch.nn.modules.pooling.MaxPool2d at node 'model_maxpool'" in capsys.readouterr().err
    assert cli.main(args + ["--allow-unknown", "--json"]) == 0
    coverage = json.loads(capsys.readouterr().out)["coverage"]
    assert [gap["label"] for gap in coverage["unknown"]] == ["maxpool", "avgpool"]
    assert coverage["share"] == pytest.approx((coverage["nodes"] - 2) / coverage["nodes"])


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["--method", "qlora"], "unknown method 'qlora'; methods provided by plugins: bn_head, dora, fft"),
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--method", "lora", "--rank", "0"], "--rank must be an integer >= 1"),
    (["--method", "fft", "--rank", "8"], "--rank: method fft takes no rank"),
    (["--model", "resnet18", "--batch", "1", "--resolution", "32"], "more than 1 value per channel"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert cli.main(["predict", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("costmodel: error: ") and message in lines[0]


def test_the_installed_command_exits_2_on_bad_input():
    result = subprocess.run([sys.executable, "-m", "costmodel", "predict", "--model", "nope"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unknown model 'nope'" in result.stderr


def test_a_closed_pipe_is_no_error() -> None:
    """`costmodel predict ... | true`: a reader that leaves before the output is written is not
    reported as an error (the write meets a closed pipe)."""
    result = subprocess.run(["sh", "-c", "costmodel predict --model resnet18 --batch 2 --resolution 32 | true"],
                            capture_output=True, text=True, timeout=300)
    assert result.stderr == ""


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_an_uncovered_node_gives_a_marked_lower_bound_not_a_cut_gradient(method):
    """Without the pooling plugin, resnet18's max pool (after the stem) is not covered. The
    gradient must still reach the stem: every parameter keeps its gradient and optimizer state,
    the stem's backward runs, and every figure is at most the covered prediction's - and says it
    is a lower bound."""
    manager = registry.create_plugin_manager()
    manager.set_blocked("pooling")
    config = StepConfig(model="resnet18", method=method, batch=2, resolution=32)
    bound = predict_config(config, allow_unknown=True, manager=manager)
    exact = predict_config(config)
    assert bound.lower_bound and not exact.lower_bound
    assert bound.to_dict()["lower_bound"] is True and "LOWER BOUND" in bound.render()
    assert bound.trainable_params == exact.trainable_params
    for name in ("GRAD", "OPT", "PARAM"):
        assert bound.memory[name] == exact.memory[name], name
    for name, value in bound.memory.items():
        assert value <= exact.memory[name], name
    for conv in ("torch", "exact"):
        for phase, value in bound.flops[conv].items():
            assert value <= exact.flops[conv][phase], (conv, phase)
    # Only the pools' own arithmetic is missing: the stock counter counts none of it.
    assert bound.flops["torch"] == exact.flops["torch"]
    # The stem before the pool still runs its backward (its parameters' gradients say so too).
    assert [n.ran_backward for n in bound.nodes if n.name.startswith("model_conv1")] == \
        [n.ran_backward for n in exact.nodes if n.name.startswith("model_conv1")]
    assert any(n.ran_backward for n in bound.nodes if n.name.startswith("model_conv1"))
