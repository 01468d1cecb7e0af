"""Gradient accumulation (``StepConfig.accumulate``, ``--accumulate N``): N micro-batches of
``--batch`` images, ``loss / N`` and ``backward()`` each, then one optimizer step. Predicted equal
to the reference's measurement of the same loop (``validation.measure.tracked_train_step``), and
to closed forms in N."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costmodel
from costmodel.cli import main
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import predict_config
from costmodel.validation.measure import measure
from engine_live import assert_matches, measure_module


class SharedWeightNet(nn.Module):
    """Batch norm, a conv weight shared by two convs, an in-place residual add and dropout: the
    wiring where accumulation meets autograd's own accumulation of a parameter used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(self.bn(x)))
        skip = x
        x = self.b(torch.relu(self.a(x)))
        x += skip
        return self.fc(self.drop(x.mean((2, 3))))


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


@pytest.mark.parametrize("accumulate", [1, 2, 3])
@pytest.mark.parametrize("step", [1, 2])
def test_accumulated_step_of_a_custom_module_equals_the_measurement(accumulate: int, step: int) -> None:
    predicted = costmodel.predict(SharedWeightNet(), "fft", batch=2, resolution=8, step=step, accumulate=accumulate)
    assert_matches(predicted, measure_module(SharedWeightNet, batch=2, resolution=8, step=step, accumulate=accumulate))


def test_accumulation_with_sgd_momentum_equals_the_measurement() -> None:
    predicted = costmodel.predict(SharedWeightNet(), "fft", batch=2, resolution=8, accumulate=2,
                                  optimizer="sgd", optimizer_options={"momentum": 0.9})
    assert_matches(predicted, measure_module(SharedWeightNet, batch=2, resolution=8, accumulate=2, optimizer=_sgd))


@pytest.mark.parametrize("step", [0, 2])
def test_evaluation_after_accumulated_steps_equals_the_measurement(step: int) -> None:
    predicted = costmodel.predict(SharedWeightNet(), "fft", batch=2, resolution=8, step=step, accumulate=3,
                                  phase="evaluate")
    assert_matches(predicted, measure_module(SharedWeightNet, batch=2, resolution=8, step=step, accumulate=3,
                                             phase="evaluate"))


@pytest.mark.parametrize("model, method, accumulate, step", [
    ("mobilenet_v2", "lora", 2, 2),
    ("resnet18", "galore", 4, 1),
    pytest.param("mobilenet_v2", "dora", 3, 1, marks=pytest.mark.slow),
    pytest.param("resnet18", "bn_head", 2, 2, marks=pytest.mark.slow),
    pytest.param("resnet18", "fft", 4, 2, marks=pytest.mark.slow),
])
def test_accumulated_torchvision_step_equals_the_measurement(model: str, method: str, accumulate: int,
                                                             step: int) -> None:
    config = StepConfig(model=model, method=method, batch=2, resolution=32, step=step, accumulate=accumulate,
                        options={"update_proj_gap": 1} if method == "galore" else {})
    assert_matches(predict_config(config), measure(config, fake=True))


def test_accumulation_in_closed_form() -> None:
    """N micro-batches: N forwards (each with the loss's division) and backwards, and from the
    second on one add per element of every gradient into its ``.grad`` (exact convention only);
    the optimizer step once; the inputs N micro-batches'; every other group as in micro-batch two,
    the same for any N >= 2 (which is why two are simulated whatever N)."""
    one, two, many = (costmodel.predict(SharedWeightNet(), "fft", batch=2, resolution=8, accumulate=n)
                      for n in (1, 2, 2**20))
    trained = one.trainable_params
    for convention, division in (("torch", 0), ("exact", 1)):  # loss / N: one divide of a 0-d tensor
        added = trained if convention == "exact" else 0
        forward, backward = two.flops[convention]["forward"] // 2, (two.flops[convention]["backward"] - added) // 2
        assert forward == one.flops[convention]["forward"] + division
        assert backward >= one.flops[convention]["backward"]
        flops = many.flops[convention]
        assert flops["forward"] == 2**20 * forward
        assert flops["backward"] == 2**20 * backward + (2**20 - 1) * added
        assert flops["optimizer"] == one.flops[convention]["optimizer"]
    for n, predicted in ((2, two), (2**20, many)):
        assert predicted.memory["OTH"] == n * one.memory["OTH"]
        for group in ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT"):
            assert predicted.memory[group] == two.memory[group], group
    assert two.memory["GRAD"] > one.memory["GRAD"]  # .grad is held while micro-batch two computes its own
    assert sum(node.backward.exact for node in many.nodes) == many.flops["exact"]["backward"]


def test_a_weight_shared_by_two_modules_is_one_parameter() -> None:
    """One ``.grad`` for the shared weight, both convs' gradients added into autograd's buffer
    first (issue 10: GRAD was 78% too high, the backward's accumulation FLOPs missing)."""
    predicted = costmodel.predict(SharedWeightNet(), "fft", batch=2, resolution=8, step=1)
    unique = sum(p.numel() for p in SharedWeightNet().parameters())
    assert predicted.trainable_params == unique
    assert predicted.memory["GRAD"] == 4 * unique


def test_accumulation_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CostModelError, match="accumulate must be an integer >= 1"):
        StepConfig(accumulate=0)
    assert main(["predict", "--batch", "100000", "--accumulate", "100000"]) == 2
    assert "--batch x --accumulate" in capsys.readouterr().err
    assert main(["predict", "--model", "resnet18", "--batch", "2", "--resolution", "32", "--accumulate", "4"]) == 0
    assert "accumulate=4" in capsys.readouterr().out.splitlines()[0]
