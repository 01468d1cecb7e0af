"""The evaluation pass (``StepConfig.phase == "evaluate"``): the forward and loss in eval mode under
``torch.no_grad()``, beside the parameters, buffers, the last step's gradients and the optimizer's
state; predicted analytically and held against the reference's live measurement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from costmodel import predict
from costmodel.cli import main
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import predict_config
from costmodel.ranks import predict_many
from costmodel.validation.measure import measure
from engine_live import assert_matches, measure_module

CASES = [  # model, method, training steps before, batch, resolution: each kind of state beside the pass
    ("mobilenet_v3_small", "fft", 0, 2, 32),    # before any training: no gradients, no optimizer state
    ("resnet18", "galore", 1, 2, 32),           # GaLore's projectors in the state after step 1
    # The rest under -m slow (the default suite's budget): the finetune tests hold every method's
    # evaluations against the measurement too.
    pytest.param("mobilenet_v3_small", "lora", 2, 2, 32, marks=pytest.mark.slow),  # dropout in the head
    pytest.param("mobilenet_v2", "dora", 2, 1, 64, marks=pytest.mark.slow),  # one image (2x2 at the end)
    pytest.param("resnet18", "bn_head", 3, 3, 32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("model", "method", "step", "batch", "resolution"), CASES)
def test_evaluation_equals_measurement(model: str, method: str, step: int, batch: int, resolution: int) -> None:
    config = StepConfig(model=model, method=method, batch=batch, resolution=resolution, step=step, phase="evaluate")
    predicted = predict_config(config)
    measured = measure(config, fake=True)
    assert_matches(predicted, measured)
    assert predicted.trainable_params == measured.trainable_params
    assert set(predicted.flops["exact"]) == {"evaluate", "total"}


class SmallNet(nn.Module):
    """Batch norm, module and functional dropout and a weight used twice: what eval mode changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.norm(self.conv(x))))
        x = nn.functional.dropout(x.mean((2, 3)), 0.2, training=self.training)
        return self.fc(x) + self.fc(x)


@pytest.mark.parametrize("step", [0, 2])
def test_custom_module_evaluation_equals_measurement(step: int) -> None:
    predicted = predict(SmallNet(), "fft", batch=3, resolution=8, step=step, phase="evaluate")
    assert_matches(predicted, measure_module(SmallNet, batch=3, resolution=8, step=step, phase="evaluate"))


def test_evaluation_is_the_forward_without_autograd() -> None:
    """A model without batch norm or dropout runs the same forward in eval mode: the evaluation's
    FLOPs are the training step's forward FLOPs, and no tensor is saved or made in a backward."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    train = predict(model, "fft", batch=2, resolution=8)
    evaluation = predict(model, "fft", batch=2, resolution=8, phase="evaluate")
    for convention in ("torch", "exact"):
        assert evaluation.flops[convention]["evaluate"] == train.flops[convention]["forward"]
    assert evaluation.memory["TEMP"] == 0
    assert evaluation.memory["GRAD"] == train.memory["GRAD"]  # last step's gradients, alive beside it
    assert {snapshot.phase for snapshot in evaluation.timeline} == {"entry", "evaluate"}
    assert all(not node.ran_backward for node in evaluation.nodes)


def test_evaluation_of_one_image_where_training_needs_two() -> None:
    """Batch norm cannot train on one value per channel (mobilenet_v2 at 32 pixels ends 1x1), but
    an evaluation of one image is fine: it is predicted, with the gradients and state training at
    any batch leaves (they have the parameters' sizes)."""
    one = predict("mobilenet_v2", "lora", batch=1, resolution=32, step=2, phase="evaluate")
    two = predict("mobilenet_v2", "lora", batch=2, resolution=32, step=2, phase="evaluate")
    assert (one.memory["GRAD"], one.memory["OPT"]) == (two.memory["GRAD"], two.memory["OPT"]) != (0, 0)


def test_evaluation_step_numbers() -> None:
    StepConfig(phase="evaluate", step=0)  # before any training step
    for bad in (dict(phase="evaluate", step=-1), dict(phase="train", step=0), dict(phase="eval")):
        with pytest.raises(CostModelError):
            StepConfig(**bad)


def test_evaluation_through_predict_many_equals_one_by_one() -> None:
    config = StepConfig(model="resnet18", method="lora", resolution=32, step=1, phase="evaluate")
    found = predict_many(config, [(1, 32, 2), (2, 32, 4)])
    for (batch, resolution, rank), answer in found.items():
        alone = predict_config(config.replace(batch=batch, resolution=resolution, rank=rank))
        assert answer.flops == alone.flops and answer.memory == alone.memory


def test_cli_phase(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "resnet18", "--phase", "evaluate", "--step", "0", "--resolution", "32"]) == 0
    assert "evaluate after 0 training steps" in capsys.readouterr().out
    assert main(["predict", "--phase", "eval"]) == 2
    assert main(["predict", "--phase", "train", "--step", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
