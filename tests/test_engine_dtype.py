"""The step's precision (``StepConfig.dtype``, ``--dtype fp32|bf16|fp16``): parameters, buffers,
images and a floating target in it, the optimizer state as the optimizer keeps it; predicted equal
to the reference's measurement (FakeTensorMode here, real CPU kernels in the validation script)."""

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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _net(dtype: torch.dtype):
    def build() -> nn.Module:  # made in ``dtype`` (a fake module cannot be cast with ``.to``)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=dtype), nn.BatchNorm2d(8, dtype=dtype), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, dtype=dtype), nn.Flatten(), nn.Linear(8 * 6 * 6, 10, dtype=dtype))
    return build


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("step", [1, 2])
def test_a_module_in_reduced_precision_equals_the_measurement(name: str, loss: str, step: int) -> None:
    build = _net(DTYPES[name])
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, step=step, loss=loss, dtype=name)
    # Real kernels for MSE: its CPU kernel keeps the 0-d loss in a storage of numel(input)
    # elements, where a fake one has one (validation/measure.py); the plugin models the CPU's.
    assert_matches(predicted, measure_module(build, batch=2, resolution=8, step=step, loss=loss,
                                             dtype=DTYPES[name], fake=loss != "mse"))


def test_reduced_precision_with_sgd_and_accumulation_equals_the_measurement() -> None:
    build = _net(torch.bfloat16)
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, dtype="bf16", accumulate=2,
                                  optimizer="sgd", optimizer_options={"momentum": 0.9})
    measured = measure_module(build, batch=2, resolution=8, dtype=torch.bfloat16, accumulate=2,
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
    assert_matches(predicted, measured)


@pytest.mark.parametrize("model, method, dtype, step", [
    ("resnet18", "lora", "bf16", 2),
    ("resnet18", "galore", "bf16", 2),  # the SVD on a float32 copy, the projector cast back
    pytest.param("mobilenet_v2", "dora", "fp16", 1, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "galore", "fp16", 1, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "bn_head", "bf16", 2, marks=pytest.mark.slow),
])
def test_torchvision_in_reduced_precision_equals_the_measurement(model: str, method: str, dtype: str,
                                                                 step: int) -> None:
    config = StepConfig(model=model, method=method, batch=2, resolution=32, step=step, dtype=dtype,
                        options={"update_proj_gap": 1} if method == "galore" else {})
    assert_matches(predict_config(config), measure(config, fake=True))


def test_half_precision_halves_what_scales_with_the_element_size() -> None:
    """fft on a network without batch norm: every float tensor halves, the optimizer's 4-byte
    ``step`` counters (one per parameter) and the int64 labels do not."""
    build = lambda dtype: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).to(dtype)
    full = costmodel.predict(build(torch.float32), "fft", batch=2, resolution=8)
    half = costmodel.predict(build(torch.bfloat16), "fft", batch=2, resolution=8, dtype="bf16")
    assert half.flops == full.flops
    for group in ("PARAM", "GRAD", "ACT", "TEMP"):
        assert 2 * half.memory[group] == full.memory[group], group
    counters = 4 * 4  # four parameters' step tensors
    assert 2 * (half.memory["OPT"] - counters) == full.memory["OPT"] - counters
    labels = 2 * 8
    assert 2 * (half.memory["OTH"] - labels) == full.memory["OTH"] - labels


def test_a_module_not_in_the_steps_precision_is_refused_naming_a_tensor() -> None:
    with pytest.raises(CostModelError, match=r"parameter '0.weight' is torch.bfloat16 .* pass dtype='bf16'"):
        costmodel.predict(_net(torch.bfloat16)(), "fft", batch=2, resolution=8)
    mixed = _net(torch.float32)()
    mixed[3].to(torch.bfloat16)
    with pytest.raises(CostModelError, match=r"parameter '3.weight' is torch.bfloat16 .* mixing precisions"):
        costmodel.predict(mixed, "fft", batch=2, resolution=8)


def test_the_cli_takes_and_checks_the_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "resnet18", "--batch", "2", "--resolution", "32", "--dtype", "bf16"]) == 0
    assert "dtype=bf16" in capsys.readouterr().out.splitlines()[0]
    assert main(["predict", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--dtype" in err
    with pytest.raises(CostModelError, match="--dtype must be one of fp32, bf16, fp16"):
        StepConfig(dtype="float64")
