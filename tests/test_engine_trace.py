"""Tracing and the per-node records: in-place operators, leaf modules, gradients needed, aliasing,
eager liveness, and the errors a model that cannot be traced gets."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import PreparedMethod
from costmodel.errors import CostModelError
from costmodel.graph import build_step_graph
from costmodel.registry import default_plugin_manager
from costmodel.shapes import concrete
from costmodel.trace import meta_copy, propagate, trace_config, trace_model


def step_graph(config: StepConfig):
    traced = trace_config(config, default_plugin_manager())
    return build_step_graph(traced, concrete(traced, config.batch, config.resolution))


def test_augmented_assignment_is_traced_in_place():
    graph = step_graph(StepConfig(model="resnet18", batch=2, resolution=32))
    iadds = [r for r in graph if r.op.target is operator.iadd]
    assert len(iadds) == 8  # one `out += identity` per BasicBlock
    for record in iadds:
        assert record.op.outputs[0].storage == record.op.inputs[0].storage
        assert record.fresh_outputs == ()


def test_views_share_their_input_storage():
    graph = step_graph(StepConfig(model="resnet18", batch=2, resolution=32))
    (flatten,) = [r for r in graph if r.label == "flatten"]
    assert flatten.op.outputs[0].storage == flatten.op.inputs[0].storage
    assert flatten.op.outputs[0].shape == (2, 512)


def test_gradients_needed_follow_the_trainable_set():
    graph = step_graph(StepConfig(model="mobilenet_v2", method="bn_head", batch=2, resolution=32))
    by_label = {r.label: r for r in graph}
    first_conv = by_label["features.0.0"]
    assert not first_conv.op.records_autograd
    assert not any(p.trainable for p in first_conv.op.params.values())
    head = by_label["classifier.1"]
    assert head.op.records_autograd and head.op.needs_input_grad == (False,)
    assert {p.name for p in head.op.params.values() if p.trainable} == {"classifier.1.weight", "classifier.1.bias"}
    fft = {r.label: r for r in step_graph(StepConfig(model="mobilenet_v2", batch=2, resolution=32))}
    assert fft["features.0.0"].op.needs_input_grad == (False,)  # the images never need a gradient
    assert fft["features.0.1"].op.needs_input_grad == (True,)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = Block()
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_module_call_keeps_its_arguments_alive_until_it_returns():
    traced = trace_model(meta_copy(Net()), PreparedMethod([]))
    graph = build_step_graph(traced, concrete(traced, 2, 8))
    index = {r.label: r.index for r in graph}
    stem_output = graph.records[index["stem"]].output_values[0]
    released = [i for i, values in graph.released_after.items() if stem_output in values]
    # Block.forward's caller holds x until block.second has run, although block.first is its last user.
    assert released == [index["block.second"]]


def test_leaf_modules_of_a_method_stay_whole():
    traced = trace_model(meta_copy(Net()), PreparedMethod([], leaf_modules=(Block,)))
    modules = [str(n.target) for n in traced.graph.nodes if n.op == "call_module"]
    assert "model.block" in modules and "model.block.first" not in modules


def test_meta_copy_leaves_the_users_model_alone():
    model = Net()
    model.head.weight.requires_grad_(False)
    copy = meta_copy(model)
    assert copy.stem.weight.device.type == "meta" and not copy.head.weight.requires_grad
    assert model.stem.weight.device.type == "cpu" and model.stem.weight.abs().sum() > 0
    copy.stem.weight.requires_grad_(False)
    assert model.stem.weight.requires_grad


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_an_untraceable_model_is_a_clear_error():
    with pytest.raises(CostModelError, match="cannot trace DataDependent with torch.fx"):
        trace_model(meta_copy(DataDependent()), PreparedMethod([]))


def test_an_impossible_shape_is_a_clear_error():
    traced = trace_model(meta_copy(nn.Sequential(nn.Conv2d(3, 4, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                 nn.Linear(4, 10))), PreparedMethod([]))
    with pytest.raises(CostModelError, match="shape propagation failed.*resolution=2"):
        propagate(traced, 2, 2)  # a 5x5 kernel on 2x2 images
    # Batch norm in training mode needs more than one value per channel (resnet18's last stage is 1x1 here).
    with pytest.raises(CostModelError, match="more than 1 value per channel"):
        step_graph(StepConfig(model="resnet18", batch=1, resolution=32))
