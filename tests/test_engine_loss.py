"""The loss is part of the configuration (``StepConfig.loss``, ``--loss``): a plugin describes it
(``costmodel_loss``: the criterion module, the target's shape and dtype), the engine traces the step
with it, and the runtime reference builds the same criterion and target from its own table.

``nn.MSELoss`` is predicted as a real CPU step measures it. Under ``FakeTensorMode`` the measurement
differs in one known way: the CPU kernel leaves the 0-d loss in a storage of ``numel(logits)``
elements, the fake (meta) kernel in one of a single element (``costmodel/plugins/loss.py``), so a
fake measurement counts ``(E - 1) * 4`` bytes less wherever the loss is alive, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import costmodel
from costmodel import registry
from costmodel.config import StepConfig
from costmodel.costs import LossSpec
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plugin_calls import PluginFailure, loss_names, loss_spec
from costmodel.plugins import loss as loss_plugin
from costmodel.prediction import predict_config, traced_step
from costmodel.registry import default_plugin_manager
from costmodel.result import MEMORY_FIELDS
from costmodel.validation.measure import LOSSES, loss_of, measure
from engine_live import assert_matches, measure_module
from test_engine_shapes import check_template
from test_op_plugins import check, grad, nograd, plugin_cost, run_module


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def _assert_fake_short_by_the_loss_storage(predicted, fake_memory, logits_numel: int) -> None:
    """Every group equal, or short by exactly the loss storage's ``E - 1`` extra elements."""
    extra = (logits_numel - 1) * 4
    differences = {field: predicted.memory[field] - fake_memory[field] for field in MEMORY_FIELDS}
    assert set(differences.values()) <= {0, extra}, differences
    assert differences["peak"] in (0, extra)


# ---------------------------------------------------------------------------------------------
# The whole step, predicted as measured


def test_mse_on_a_small_cnn_is_predicted_as_measured():
    predicted = costmodel.predict(_cnn(), "fft", loss="mse", batch=2, resolution=8)
    assert predicted.config.loss == "mse"
    assert_matches(predicted, measure_module(_cnn, batch=2, resolution=8, loss="mse", fake=False))
    fake = measure_module(_cnn, batch=2, resolution=8, loss="mse", fake=True)
    assert fake["flops"] == predicted.flops
    _assert_fake_short_by_the_loss_storage(predicted, fake["memory"], 2 * 10)


def test_mse_with_a_frozen_body_is_predicted_as_measured():
    """bn_head on a model of one's own trains its head alone (the Linear, ``"5"``)."""
    predicted = costmodel.predict(_cnn(), "bn_head", loss="mse", batch=2, resolution=8)
    assert_matches(predicted, measure_module(_cnn, lambda name: name.startswith("5."), batch=2,
                                             resolution=8, loss="mse", fake=False))


def test_mse_on_mobilenet_v3_small_is_predicted_as_measured():
    config = StepConfig(model="mobilenet_v3_small", method="fft", batch=2, resolution=64, loss="mse")
    predicted = predict_config(config)
    assert_matches(predicted, measure(config))
    fake = measure(config, fake=True)
    assert fake.flops == predicted.flops
    _assert_fake_short_by_the_loss_storage(predicted, fake.memory, 2 * 10)


def test_the_target_is_part_of_the_step():
    """The same model under both losses: the same forward up to the loss, a float (B, classes)
    target in OTH instead of int64 (B,) labels; the structure cache keeps the two apart."""
    base = StepConfig(model="mobilenet_v3_small", batch=2, resolution=64, classes=7)
    ce, mse = predict_config(base), predict_config(base.replace(loss="mse"))
    assert mse.memory["OTH"] - ce.memory["OTH"] == 2 * 7 * 4 - 2 * 8
    assert ce.flops["torch"] == mse.flops["torch"]
    assert traced_step(base, default_plugin_manager()).step_module.criterion.__class__ is nn.CrossEntropyLoss
    assert traced_step(base.replace(loss="mse"), default_plugin_manager()).step_module.criterion.__class__ is nn.MSELoss


def test_mse_shape_templates_equal_concrete_propagation():
    """The target's shape is a function of a symbolic batch in a shape template."""
    traced = traced_step(StepConfig(model="resnet18", loss="mse"), default_plugin_manager())
    assert check_template(traced, 4, 96) == [(2, 64), (4, 96), (3, 100), (16, 224), (5, 33)]


# ---------------------------------------------------------------------------------------------
# The MSELoss rule, one op against what torch does (tests/test_op_plugins.py's harness)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_mse_loss_rule(reduction, input_grad):
    x = grad(4, 10) if input_grad else nograd(4, 10)
    cost = check(run_module(nn.MSELoss(reduction=reduction), x, torch.randn(4, 10)))
    mean = reduction == "mean"
    assert cost.forward.torch == 0 and cost.forward.exact == 3 * 40 + mean
    assert cost.backward.torch == 0 and cost.backward.exact == input_grad * 3 * 40
    assert [(a.nbytes, a.lifetime) for a in cost.forward_allocs] == [(160, "output")]  # the 0-d loss, 40 floats
    assert cost.input_grads == ((160, None) if input_grad else ())


def test_mse_backward_saves_the_input_and_the_target_themselves():
    x, target = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    logits = x * 2
    loss = nn.MSELoss()(logits, target)
    assert type(loss.grad_fn).__name__ == "MseLossBackward0"
    assert loss.grad_fn._saved_self is logits or loss.grad_fn._saved_self.data_ptr() == logits.data_ptr()
    assert loss.grad_fn._saved_target.data_ptr() == target.data_ptr()
    assert loss.untyped_storage().nbytes() == 15 * 4  # what the rule's forward allocation says


def test_mse_variants_outside_the_model_answer_none():
    x = grad(4, 10)
    assert plugin_cost(run_module(nn.MSELoss(reduction="none"), x, torch.randn(4, 10)).node) is None
    assert plugin_cost(run_module(nn.MSELoss(), x, torch.randn(4, 10, dtype=torch.float64)).node) is None
    assert plugin_cost(run_module(nn.MSELoss(), x, grad(4, 10)).node) is None
    with pytest.warns(UserWarning):  # torch warns about the broadcast
        assert plugin_cost(run_module(nn.MSELoss(), x, torch.randn(1, 10)).node) is None


# ---------------------------------------------------------------------------------------------
# Names, errors and plugins


def test_the_known_losses():
    assert loss_names(default_plugin_manager()) == ["cross_entropy", "mse"] == sorted(LOSSES)
    spec = loss_spec(default_plugin_manager(), "mse")
    assert isinstance(spec.criterion(), nn.MSELoss) and spec.target_dtype is torch.float32
    assert spec.target_shape(3, 7) == (3, 7) and loss_spec(default_plugin_manager(), "cross_entropy").target_shape(3, 7) == (3,)
    assert isinstance(loss_of("mse")[0](), nn.MSELoss)


def test_an_unknown_loss_is_one_line_listing_the_known_ones():
    for call in (lambda: costmodel.predict(_cnn(), "fft", loss="nosuch", batch=2, resolution=8),
                 lambda: predict_config(StepConfig(model="resnet18", loss="nosuch"))):
        with pytest.raises(CostModelError) as caught:
            call()
        assert str(caught.value) == "unknown loss 'nosuch'; losses provided by plugins: cross_entropy, mse"
    with pytest.raises(CostModelError, match="^--loss must be a non-empty loss name, got ''$"):
        StepConfig(loss="")
    with pytest.raises(CostModelError, match="^unknown loss 'nosuch'; the runtime reference measures: "):
        measure(StepConfig(model="resnet18", loss="nosuch"), fake=True)


def _loss_plugin(name: str, answer) -> types.ModuleType:
    @hookimpl
    def costmodel_loss(name):
        return answer(name)

    module = types.ModuleType(name)
    module.costmodel_loss = costmodel_loss
    return module


@pytest.mark.parametrize("answer,problem", [
    (lambda name: "mse", "not LossSpec"),
    (lambda name: LossSpec(nn.MSELoss, lambda b, c: (b, c), "float32"), "LossSpec.target_dtype"),
    (lambda name: LossSpec(lambda: 1 // 0, lambda b, c: (b,), torch.int64), "ZeroDivisionError"),
    (lambda name: LossSpec(nn.MSELoss, lambda b, c: b, torch.float32), "not a tuple or list"),
    (lambda name: LossSpec(nn.MSELoss, lambda b, c: (b, 0), torch.float32), "not an integer >= 1"),
    (lambda name: {}[name], "KeyError"),
])
def test_a_plugin_answering_the_loss_hook_wrongly_is_one_line_naming_it(answer, problem):
    manager = registry.create_plugin_manager([_loss_plugin("broken_loss", answer)])
    with pytest.raises(PluginFailure) as caught:
        predict_config(StepConfig(model="resnet18", batch=2, resolution=32), manager=manager)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("plugin 'broken_loss' failed in costmodel_loss for loss 'cross_entropy': ")
    assert problem in message, message


def test_a_plugin_can_add_a_loss():
    """A third-party loss: the engine needs no change (the op rules cost its criterion's node)."""
    summed = LossSpec(lambda: nn.MSELoss(reduction="sum"), loss_plugin.like_logits, torch.float32)
    manager = registry.create_plugin_manager([_loss_plugin("summed", lambda name: summed if name == "mse_sum" else None)])
    config = StepConfig(model="mobilenet_v3_small", batch=2, resolution=64)
    mean, total = (predict_config(config.replace(loss=name), manager=manager) for name in ("mse", "mse_sum"))
    assert mean.flops["exact"]["forward"] - total.flops["exact"]["forward"] == 1  # the mean's divide
    assert mean.memory == total.memory


# ---------------------------------------------------------------------------------------------
# From the shell


def _shell(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "costmodel", *args], capture_output=True, text=True, timeout=300)


def test_the_cli_predicts_with_a_loss():
    done = _shell("predict", "--model", "resnet18", "--loss", "mse", "--json")
    assert done.returncode == 0, done.stderr
    assert '"loss": "mse"' in done.stdout


def test_the_cli_refuses_an_unknown_loss_in_one_line():
    done = _shell("predict", "--model", "resnet18", "--loss", "nosuch")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("costmodel: error: --loss: unknown loss 'nosuch'; losses provided by plugins: "
                           "cross_entropy, mse\n")
