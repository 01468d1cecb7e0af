"""A third-party op, checkable end to end: a plugin adds a custom op's cost rule
(``costmodel_op_cost``) and its rows of the reference's exact FLOP convention
(``costmodel_exact_flop_formulas``), so that the prediction is held against a live measurement as
the built-in ops are (issue 10: "third-party ops must be checkable")."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import costmodel
from costmodel.authoring import HandleTable, new_output, numel
from costmodel.costs import Flops, OpCost, OpNode, SavedRef
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.registry import default_plugin_manager
from engine_live import assert_matches, measure_module


@torch.library.custom_op("costmodel_example::scaled_square", mutates_args=())
def scaled_square(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * x * x``: 2 FLOPs an element."""
    return x * x * scale


@scaled_square.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("costmodel_example::scaled_square_backward", mutates_args=())
def scaled_square_backward(grad: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``grad * 2 * scale * x``: 3 FLOPs an element."""
    return grad * (2 * scale) * x


@scaled_square_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    return torch.ops.costmodel_example.scaled_square_backward(grad, ctx.saved_tensors[0], ctx.scale), None


scaled_square.register_autograd(_backward, setup_context=_setup)


class ScaledSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.costmodel_example.scaled_square(x, 0.5)


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ScaledSquare(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def _plugin(formulas: dict, name: str = "costmodel_example_plugin") -> types.ModuleType:
    """The example plugin: the op's rule and its exact-convention rows."""
    table = HandleTable()

    @table.register("call_function", torch.ops.costmodel_example.scaled_square,
                    torch.ops.costmodel_example.scaled_square.default)
    def scaled_square_cost(node: OpNode) -> OpCost:
        """Forward 2 FLOPs an element, its output new, its input saved; backward 3 an element
        (``scaled_square_backward``), one input-sized gradient. The stock counter counts neither."""
        x = node.inputs[0]
        cost = OpCost(forward=Flops(torch=0, exact=2 * numel(x.shape)), forward_allocs=new_output(node),
                      note="scaled square")
        if node.records_autograd:
            cost.backward = Flops(torch=0, exact=3 * numel(x.shape))
            cost.saved = (SavedRef("input", 0),)
            cost.input_grads = (x.nbytes,)
        return cost

    plugin = types.ModuleType(name)
    plugin.costmodel_op_cost = hookimpl(lambda node: table.cost(node))
    plugin.costmodel_exact_flop_formulas = hookimpl(lambda: formulas)
    return plugin


FORMULAS = {
    torch.ops.costmodel_example.scaled_square: lambda x, scale, out_val=None: 2 * x.numel(),
    torch.ops.costmodel_example.scaled_square_backward.default: lambda grad, x, scale, out_val=None: 3 * x.numel(),
}


@pytest.fixture
def registered():
    """Register a plugin in the default manager (the one the reference reads) for one test."""
    manager = default_plugin_manager()
    plugins = []

    def register(plugin: types.ModuleType) -> None:
        manager.register(plugin, name=plugin.__name__)
        plugins.append(plugin)

    yield register
    for plugin in plugins:
        manager.unregister(plugin)
    costmodel.prediction.clear_cache()


@pytest.mark.parametrize("fake", [True, False])
def test_a_plugins_op_is_predicted_and_measured_alike(registered, fake: bool) -> None:
    registered(_plugin(FORMULAS))
    predicted = costmodel.predict(build(), "fft", batch=2, resolution=8, manager=default_plugin_manager())
    assert_matches(predicted, measure_module(build, batch=2, resolution=8, fake=fake))
    assert predicted.flops["exact"]["forward"] > predicted.flops["torch"]["forward"]


def test_without_the_rows_the_reference_refuses_the_op() -> None:
    with pytest.raises(CostModelError, match="costmodel_example.scaled_square"):
        measure_module(build, batch=2, resolution=8)


def test_a_row_for_a_built_in_op_is_refused(registered) -> None:
    registered(_plugin({torch.ops.aten.mm: lambda *args, out_val=None: 0}))
    with pytest.raises(CostModelError, match=r"gives an exact FLOP formula for aten.mm, which the convention's own"):
        measure_module(build, batch=2, resolution=8)


def test_one_op_from_two_plugins_is_refused(registered) -> None:
    registered(_plugin(FORMULAS))
    registered(_plugin(FORMULAS, name="another_plugin"))
    with pytest.raises(CostModelError, match=r"both give an exact FLOP formula for costmodel_example.scaled_square"):
        measure_module(build, batch=2, resolution=8)
