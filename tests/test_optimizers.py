"""The optimizer choice (``StepConfig.optimizer``, ``--optimizer``, ``--optimizer-option``): each
optimizer plugin's rule (adamw, adam, sgd: torch's single-tensor CPU path, and ``foreach=True``)
held against a live measurement of the same step, FLOP for FLOP and byte for byte, and the
one-line refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import costmodel
from costmodel import cli
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import predict_config
from engine_live import assert_matches, measure_module

TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
    "adafactor": torch.optim.Adafactor}


class SmallNet(nn.Module):
    """A conv, a batch norm and a linear head: parameters of four sizes for the optimizer's
    temporaries to overlap on (a previous parameter's temporary alive beside the next one's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {}),
    ("adam", {"weight_decay": 0.01}),
    ("adam", {"weight_decay": 0.01, "decoupled_weight_decay": True}),
    ("adamw", {"weight_decay": 0.0}),
    # foreach=True: the multi-tensor path (torch's default on a GPU), same FLOPs, list temporaries
    ("adamw", {"foreach": True}),
    ("adam", {"foreach": True, "weight_decay": 0.01}),
    ("sgd", {"foreach": True, "weight_decay": 0.01}),
    ("sgd", {"foreach": True, "momentum": 0.9, "weight_decay": 0.01}),
    ("sgd", {"foreach": True, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]


def predicted_small(name: str, options: dict[str, Any], step: int) -> costmodel.Prediction:
    return costmodel.predict(SmallNet(), "fft", batch=2, resolution=8, step=step, optimizer=name,
                             optimizer_options=options)


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_each_optimizer_rule_equals_the_measured_step(name, options, step):
    measured = measure_module(SmallNet, batch=2, resolution=8, step=step,
                              optimizer=lambda ps: TORCH_OPTIMIZERS[name](ps, lr=1e-3, **options))
    assert_matches(predicted_small(name, options, step), measured)


# Adafactor reads ``param.norm(2).item()``: only real tensors can run it (fake ones have no values).
ADAFACTOR_CASES: list[dict[str, Any]] = [{}, {"weight_decay": 0.1}, {"foreach": True},
                                         {"foreach": True, "weight_decay": 0.1, "eps": [1e-30, 1e-3]}]


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("options", ADAFACTOR_CASES, ids=[str(o) for o in ADAFACTOR_CASES])
def test_adafactor_equals_the_measured_step_with_real_tensors(options, step):
    """SmallNet's parameters alternate matrices (a 4-D conv weight: factored over its last two
    dimensions, batched over the first two) and vectors, so a matrix's ``row_mean`` outlives the
    vectors after it, and each ``var_estimate`` stays alive through ``update`` until the next."""
    measured = measure_module(SmallNet, batch=2, resolution=8, step=step, fake=False,
                              optimizer=lambda ps: torch.optim.Adafactor(ps, lr=1e-3, **options))
    predicted = predicted_small("adafactor", options, step)
    assert_matches(predicted, measured)
    conv, fc = (4, 3, 3, 3), (10, 4)  # factored moments: rows + columns, per leading index
    factored = (4 * 3 * (3 + 3) + (10 + 4)) * 4
    vectors = (4 + 4 + 4 + 10) * 4
    assert predicted.memory["OPT"] >= factored + vectors + 6 * 4


def test_adafactor_on_mobilenet_v2_lora_equals_the_reference():
    from costmodel.validation.measure import measure

    config = StepConfig(model="mobilenet_v2", method="lora", rank=4, batch=2, resolution=32, optimizer="adafactor")
    assert_matches(predict_config(config), measure(config))


def test_a_fake_measurement_of_adafactor_is_refused_in_one_line(capsys):
    err = refusal(["measure", "--model", "mobilenet_v2", "--method", "lora", "--batch", "2", "--resolution", "32", "--fake",
                   "--optimizer", "adafactor"], capsys)
    assert "--fake" in err and "value" in err


class WideNet(SmallNet):
    """SmallNet with a 4,800-element conv weight: one tensor past bitsandbytes' 8-bit threshold
    (``min_8bit_size`` 4,096), the rest below it (float32 moments)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 20, padding=10)  # 4 * 3 * 20 * 20 = 4,800 weights


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.0, "betas": [0.0, 0.99]}, {"min_8bit_size": 16}],
                         ids=["defaults", "no-decay-beta1-0", "all-8bit"])
def test_adamw8bit_equals_the_measured_step_with_its_kernels_in_view(options, step):
    """bitsandbytes' AdamW8bit on CPU: the reference runs its CPU kernels' torch ops in view of
    the tracker and the counters (costmodel.validation.optimizers); the rule equals them. The
    kernel's float32 copies of the moments are OPT beyond the 8-bit state."""
    import bitsandbytes

    from costmodel.validation.optimizers import kernels_in_view

    measured = measure_module(WideNet, batch=2, resolution=8, step=step, fake=False,
                              optimizer=lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-3, **options))
    predicted = costmodel.predict(WideNet(), "fft", batch=2, resolution=8, step=step, optimizer="adamw8bit",
                                  optimizer_options=options)
    assert_matches(predicted, measured)
    conv = 4 * 3 * 20 * 20
    assert predicted.memory["OPT"] > 2 * conv + 2048 + 4 * conv  # the moments, the maps, float32 copies
    assert kernels_in_view(torch.optim.AdamW([nn.Parameter(torch.ones(1))])).__class__.__name__ == "nullcontext"


def test_adamw8bit_is_measured_with_real_tensors_only(capsys):
    err = refusal(["measure", "--model", "mobilenet_v2", "--method", "lora", "--batch", "2", "--resolution", "32",
                   "--fake", "--optimizer", "adamw8bit"], capsys)
    assert "--fake" in err and "real tensors" in err


def test_adams_l2_gradient_is_a_temporary_with_real_tensors_too():
    """Adam's ``grad.add(p, alpha=wd)`` is a new tensor: the OPT maximum grows by it, and real
    tensors (not fake ones) allocate exactly what the rule says."""
    options = {"weight_decay": 0.01}
    measured = measure_module(SmallNet, batch=2, resolution=8, step=2, fake=False,
                              optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3, **options))
    with_decay = predicted_small("adam", options, 2)
    assert_matches(with_decay, measured)
    assert with_decay.memory["OPT"] > predicted_small("adam", {}, 2).memory["OPT"]


def test_foreach_keeps_a_square_root_of_every_moment_with_real_tensors():
    """``_foreach_sqrt`` allocates one temporary per parameter, all alive together: the OPT
    maximum is the state plus every parameter once more (the single-tensor loop: at most three
    tensors more), equal to a real-tensor measurement."""
    measured = measure_module(SmallNet, batch=2, resolution=8, step=2, fake=False,
                              optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
    foreach = predicted_small("adamw", {"foreach": True}, 2)
    assert_matches(foreach, measured)
    tensors = list(SmallNet().parameters())
    params = sum(p.numel() * p.element_size() for p in tensors)
    assert foreach.memory["OPT"] == 2 * params + 4 * len(tensors) + params  # moments, steps, square roots


def test_foreach_groups_tensors_by_dtype_as_torch_does():
    """peft keeps LoRA's adapters in float32 on a bfloat16 base, so the trained tensors have two
    dtypes: ``_multi_tensor_adam`` runs once per dtype group, the first group's square roots
    alive until the second's exist."""
    from costmodel.validation.measure import measure

    config = StepConfig(model="mobilenet_v2", method="lora", rank=4, batch=2, resolution=32, dtype="bf16",
                        optimizer_options={"foreach": True}, step=2)
    predicted = predict_config(config)
    assert_matches(predicted, measure(config, fake=True))
    assert "foreach" in " ".join(predicted.details["optimizer"])


def test_lora_with_sgd_momentum_on_resnet18_equals_the_reference():
    from costmodel.validation.measure import measure

    config = StepConfig(model="resnet18", method="lora", rank=4, batch=2, resolution=32, optimizer="sgd",
                        optimizer_options={"momentum": 0.9})
    assert_matches(predict_config(config), measure(config, fake=True))


def test_the_reference_builds_the_configured_optimizer():
    from costmodel.validation.methods import apply_config

    config = StepConfig(model="fft_probe", method="fft", optimizer="sgd",
                        optimizer_options={"momentum": 0.9, "nesterov": True})
    optimizer = apply_config(SmallNet(), config).optimizer
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True
    assert optimizer.param_groups[0]["lr"] == config.lr


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``costmodel ARGV`` prints on stderr, exiting 2."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_galore_refuses_another_optimizer(capsys):
    err = refusal(["predict", "--model", "resnet18", "--method", "galore", "--resolution", "32",
                   "--optimizer", "sgd"], capsys)
    assert "--optimizer sgd" in err and "GaLoreAdamW" in err


def test_an_unknown_optimizer_is_refused_naming_the_flag(capsys):
    err = refusal(["predict", "--model", "resnet18", "--resolution", "32", "--optimizer", "lion"], capsys)
    assert "--optimizer" in err and "'lion'" in err


def test_an_unmodelled_option_is_refused_naming_it(capsys):
    err = refusal(["predict", "--model", "resnet18", "--resolution", "32", "--optimizer", "sgd",
                   "--optimizer-option", "fused=true"], capsys)
    assert "--optimizer-option fused" in err and "single-tensor" in err


def test_scenario_commands_take_the_optimizer_too(capsys):
    err = refusal(["plan", "--model", "resnet18", "--memory", "64MiB", "--optimizer", "adam",
                   "--optimizer-option", "amsgrad=true"],
                  capsys)
    assert "--optimizer-option amsgrad" in err


@pytest.mark.parametrize(("name", "options", "named"), [
    ("sgd", {"momentom": 0.9}, "momentom"),
    ("adam", {"maximize": True}, "maximize"),
    ("adamw", {"fused": True}, "fused"),
    ("adafactor", {"eps": 0.001}, "eps"),
    ("adafactor", {"maximize": True}, "maximize"),
    ("adamw8bit", {"is_paged": True}, "is_paged"),
    ("adamw8bit", {"optim_bits": 8}, "optim_bits"),
    ("sgd", {"momentum": "high"}, "momentum"),
    ("sgd", {"nesterov": True}, "nesterov"),
])
def test_the_python_api_refuses_in_one_line(name, options, named):
    with pytest.raises(CostModelError, match=f"--optimizer-option {named}") as refused:
        predicted_small(name, options, 2)
    assert "\n" not in str(refused.value)


def test_the_learning_rate_is_not_an_optimizer_option():
    with pytest.raises(CostModelError, match="lr"):
        StepConfig(optimizer="sgd", optimizer_options={"lr": 0.1})
