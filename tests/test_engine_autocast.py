"""CPU autocast (``StepConfig.autocast``, ``--autocast bf16|fp16``, and a model's own
``torch.autocast("cpu")`` regions): the casts autocast makes, its weight cache, the ops it leaves
alone, against live measurements with real tensors (fake tensors give a mixed-precision batch
norm's statistics the input's dtype, where the CPU kernel keeps float32: the reference refuses
``--fake`` with autocast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import costmodel
from costmodel.cli import main
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import predict_config
from costmodel.validation.measure import measure
from engine_live import assert_matches, measure_module

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 10))


class SharedWeight(nn.Module):
    """One conv weight used twice: autocast casts a trainable weight once (its cache), a frozen
    one at each use."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3) * 0.1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(F.relu(F.conv2d(x, self.weight, padding=1)), self.weight, padding=1)
        return self.fc(y.mean((2, 3)))


class MixedResidual(nn.Module):
    """A bf16 activation (a conv's result under autocast) added to and multiplied by float32
    parameters: type promotion, and autograd casting the gradients back to bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.zeros(8, 1, 1))
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.fc(((h + self.shift) * self.scale + h * self.scale).mean((2, 3)))


class OwnRegion(nn.Module):
    """A model that runs its middle block under its own ``torch.autocast("cpu")`` and returns to
    float32 after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = self.block(x)
        return self.fc(x.float().mean((2, 3)))


@pytest.mark.parametrize("build", [_conv_net, _bn_net, _mlp, SharedWeight], ids=lambda b: b.__name__)
@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_small_networks_under_autocast_equal_the_measurement(build, autocast: str) -> None:
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, autocast=autocast)
    assert_matches(predicted, measure_module(build, batch=2, resolution=8, autocast=AUTOCAST[autocast], fake=False))


@pytest.mark.parametrize("phase, step, accumulate", [("train", 1, 1), ("train", 2, 2), ("evaluate", 1, 1)])
def test_autocast_in_every_phase_and_with_accumulation(phase: str, step: int, accumulate: int) -> None:
    predicted = costmodel.predict(_bn_net(), "fft", batch=2, resolution=8, autocast="bf16", phase=phase, step=step,
                                  accumulate=accumulate)
    measured = measure_module(_bn_net, batch=2, resolution=8, autocast=torch.bfloat16, phase=phase, step=step,
                              accumulate=accumulate, fake=False)
    assert_matches(predicted, measured)


def test_frozen_weights_are_cast_at_every_use_trainable_ones_once() -> None:
    """The weight cache: the shared weight is cast to bf16 once when it trains, at each of its two
    uses when frozen; the measurement agrees on every field either way."""
    def down_casts(prediction: costmodel.Prediction) -> int:
        return sum(node.note == "cast torch.float32 -> torch.bfloat16" for node in prediction.nodes)

    trained = costmodel.predict(SharedWeight(), "fft", batch=2, resolution=8, autocast="bf16")
    frozen = costmodel.predict(SharedWeight(), "bn_head", batch=2, resolution=8, autocast="bf16")  # the head trains
    assert down_casts(frozen) == down_casts(trained) + 1
    assert_matches(frozen, measure_module(SharedWeight, lambda name: name.startswith("fc."), batch=2, resolution=8,
                                          autocast=torch.bfloat16, fake=False))


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_mixed_precision_element_wise_gradients_are_cast_back(autocast: str) -> None:
    """In ``h * scale`` (h in bf16, scale a float32 (8, 1, 1) parameter) autograd's engine casts
    h's gradient and frees its float32 product before it reduces scale's (``validate_outputs``,
    input by input: ``OpCost.input_grad_steps``): every field equal, the peak included."""
    predicted = costmodel.predict(MixedResidual(), "fft", batch=2, resolution=8, autocast=autocast)
    assert_matches(predicted, measure_module(MixedResidual, batch=2, resolution=8, autocast=AUTOCAST[autocast],
                                             fake=False))


def test_a_models_own_cpu_autocast_region_equals_the_measurement() -> None:
    predicted = costmodel.predict(OwnRegion(), "fft", batch=2, resolution=8)
    assert_matches(predicted, measure_module(OwnRegion, batch=2, resolution=8, fake=False))


@pytest.mark.parametrize("model, method, autocast", [
    ("resnet18", "lora", "bf16"),
    pytest.param("mobilenet_v2", "fft", "bf16", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "lora", "fp16", marks=pytest.mark.slow),
    pytest.param("resnet18", "galore", "bf16", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "bn_head", "bf16", marks=pytest.mark.slow),
])
def test_torchvision_under_autocast_equals_the_measurement(model: str, method: str, autocast: str) -> None:
    config = StepConfig(model=model, method=method, batch=2, resolution=32, autocast=autocast,
                        options={"update_proj_gap": 1} if method == "galore" else {})
    assert_matches(predict_config(config), measure(config, fake=False))


class Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,ck->bk", x, self.weight)


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean(1)
        return self.fc(torch.bmm(h, h).flatten(1))


def test_an_op_that_casts_inside_is_refused_by_node() -> None:
    with pytest.raises(CostModelError, match=r"^node 'einsum' .* casts inside it"):
        costmodel.predict(Einsum(), "fft", batch=2, resolution=8, autocast="bf16")


def test_one_activation_twice_in_a_listed_op_is_refused() -> None:
    with pytest.raises(CostModelError, match=r"^node 'bmm' .* twice under torch.autocast"):
        costmodel.predict(Square(), "fft", batch=2, resolution=8, autocast="bf16")


def test_dora_and_fake_measurement_refuse_autocast_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "resnet18", "--method", "dora", "--autocast", "bf16"]) == 2
    assert main(["measure", "--fake", "--model", "resnet18", "--autocast", "bf16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "dora with --autocast" in lines[0] and "--fake" in lines[1]


def test_the_cli_takes_and_checks_autocast(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "resnet18", "--batch", "2", "--resolution", "32", "--autocast", "bf16"]) == 0
    assert "autocast=bf16" in capsys.readouterr().out.splitlines()[0]
    assert main(["predict", "--autocast", "fp32"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--autocast" in err
    with pytest.raises(CostModelError, match="--autocast must be one of bf16, fp16"):
        StepConfig(autocast="fp32")


class ExplicitCasts(nn.Module):
    """A forward that casts by hand (no autocast): ``.half()``, ``.to(dtype)``, ``.float()``, and a
    cast to the tensor's own dtype, which is the tensor itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x).half()).to(torch.bfloat16)
        h = h.to(dtype=torch.bfloat16).float().to(torch.float32)
        return self.fc(h.mean((2, 3)))


def test_explicit_casts_equal_the_measurement() -> None:
    predicted = costmodel.predict(ExplicitCasts(), "fft", batch=2, resolution=8)
    assert_matches(predicted, measure_module(ExplicitCasts, batch=2, resolution=8))
