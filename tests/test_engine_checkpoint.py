"""Activation checkpointing (``StepConfig.checkpoint``, ``--checkpoint PATTERN``): the outermost
modules whose name matches run as ``torch.utils.checkpoint.checkpoint(module, *args,
use_reentrant=False)``. Predicted equal to the reference's measurement of that wrapping
(``validation.measure.CheckpointedCall``), FLOPs of the recomputation and every byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import costmodel
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import check_checkpointed, checkpointed_modules
from costmodel.prediction import predict_config
from costmodel.validation.measure import measure
from engine_live import assert_matches, measure_module


class Block(nn.Module):
    def __init__(self, channels: int, last: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.last = {"relu": nn.ReLU(inplace=True), "relu6": nn.ReLU6(inplace=True), "bn": nn.Identity(),
                     "add": nn.Identity()}[last]
        self.add = last == "add"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last(self.bn(self.conv(x)))
        return out + x if self.add else out


def _net(last: str):
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8, last), Block(8, last), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    return build


@pytest.mark.parametrize("last", ["relu", "relu6", "bn", "add"])  # where the recomputation stops
@pytest.mark.parametrize("pattern", ["1", "[12]"])
def test_checkpointed_blocks_equal_the_measurement(last: str, pattern: str) -> None:
    build = _net(last)
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, checkpoint=pattern)
    assert_matches(predicted, measure_module(build, batch=2, resolution=8, checkpoint=pattern))


class OwnCheckpoints(nn.Module):
    """A model that calls ``torch.utils.checkpoint`` on its blocks in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8, "relu"), Block(8, "add")])
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("step", [1, 2])
def test_a_models_own_checkpoint_calls_are_modelled_like_the_option(step: int) -> None:
    predicted = costmodel.predict(OwnCheckpoints(), "fft", batch=2, resolution=8, step=step)
    assert_matches(predicted, measure_module(OwnCheckpoints, batch=2, resolution=8, step=step))
    with pytest.raises(CostModelError, match="nested"):  # the option around the model's own call
        costmodel.predict(OwnCheckpoints(), "fft", batch=2, resolution=8, checkpoint="blocks.*")
    with pytest.raises(CostModelError, match=r"the forward never calls blocks; .* 'blocks\.\*'"):
        costmodel.predict(OwnCheckpoints(), "fft", batch=2, resolution=8, checkpoint="blocks")


def test_checkpointing_with_accumulation_and_bf16_equals_the_measurement() -> None:
    build = lambda: _net("relu")().to(torch.bfloat16)  # noqa: E731 (real tensors: .to is fine)
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, checkpoint="[12]", accumulate=2,
                                  dtype="bf16", step=1)
    assert_matches(predicted, measure_module(build, batch=2, resolution=8, checkpoint="[12]", accumulate=2,
                                             dtype=torch.bfloat16, step=1, fake=False))


@pytest.mark.parametrize("model, method, pattern", [
    ("resnet18", "lora", "layer*"),
    ("mobilenet_v2", "fft", "features.*"),
    pytest.param("resnet18", "galore", "layer*", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", "fft", "features.*", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "dora", "features.1*", marks=pytest.mark.slow),
])
def test_checkpointed_torchvision_equals_the_measurement(model: str, method: str, pattern: str) -> None:
    config = StepConfig(model=model, method=method, batch=2, resolution=32, checkpoint=pattern,
                        options={"update_proj_gap": 1} if method == "galore" else {})
    assert_matches(predict_config(config), measure(config, fake=True))


def test_checkpointing_trades_activations_for_recomputation() -> None:
    """Checkpointing every block of resnet18: less ACT and peak, the same forward and
    optimizer FLOPs, a backward larger by at most one forward (the recomputation stops at the
    last saved tensor of each region), and an evaluation pass unchanged."""
    plain = costmodel.predict("resnet18", "fft", batch=4, resolution=64)
    checkpointed = costmodel.predict("resnet18", "fft", batch=4, resolution=64, checkpoint="layer*")
    assert checkpointed.memory["ACT"] < plain.memory["ACT"] and checkpointed.memory["peak"] <= plain.memory["peak"]
    for convention in ("torch", "exact"):
        p, c = plain.flops[convention], checkpointed.flops[convention]
        assert c["forward"] == p["forward"] and c["optimizer"] == p["optimizer"]
        assert p["backward"] < c["backward"] <= p["backward"] + p["forward"]
    evaluate = {"phase": "evaluate", "batch": 4, "resolution": 64}
    assert (costmodel.predict("resnet18", "fft", checkpoint="layer*", **evaluate).memory
            == costmodel.predict("resnet18", "fft", **evaluate).memory)


def test_the_pattern_names_outermost_modules_and_must_match() -> None:
    model = _net("relu")()
    assert [name for name, _ in checkpointed_modules(model, "*")] == [str(i) for i in range(6)]
    assert [name for name, _ in checkpointed_modules(model, "1*")] == ["1"]
    with pytest.raises(CostModelError, match=r"--checkpoint 'block\*' matches no module of .* top-level modules: 0, 1"):
        checkpointed_modules(model, "block*")
    named = checkpointed_modules(model, "1")
    model[1] = nn.Identity()  # as a method that swaps a module for a new one would
    with pytest.raises(CostModelError, match="the method replaced 1; checkpoint a module that contains it"):
        check_checkpointed(model, named)


def test_checkpointing_an_adapted_layer_checkpoints_its_base_layer() -> None:
    """peft keeps the original conv inside its LoRA layer (``base_layer``): checkpointing
    ``conv1`` under LoRA checkpoints the frozen base conv, in the engine as in the reference."""
    config = StepConfig(model="resnet18", method="lora", batch=2, resolution=32, checkpoint="conv1")
    assert_matches(predict_config(config), measure(config, fake=True))
