"""The engine on small custom models, held against a live measurement of the same step: wiring the
four reference models do not exercise (a value used three times, a parameter used directly in a
functional op, broadcasting, dropout), steps 1 and 2, and both optimizer plugins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from costmodel.costs import ParamGroup, ParamMeta, PreparedMethod
from costmodel.hookspecs import hookimpl
from costmodel.memory import GROUP_INDEX
from costmodel.prediction import predict
from costmodel.registry import create_plugin_manager
from engine_live import assert_matches, measure_module


class TinyNet(nn.Module):
    """Conv-BN-ReLU stem, a residual block with ``+=``, a value with three consumers, a squeeze-
    excitation style broadcast product, max pooling, a functional convolution on a parameter of its
    own, dropout and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                    nn.ReLU6(inplace=True))
        self.gate = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Parameter(torch.randn(16, 8, 1, 1) * 0.1)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.branch(x)
        y += x  # x is used by the branch, here, and by the gate: three gradients meet
        scale = self.gate(F.adaptive_avg_pool2d(x, 1))
        y = self.pool(y * scale)
        y = F.conv2d(y, self.mix)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def head_only(name: str) -> bool:
    return name.startswith("head.")


@pytest.mark.parametrize("method, step", [("fft", 2), ("fft", 1), ("bn_head", 2)])
def test_tiny_net_matches_the_live_measurement(method, step):
    predicted = predict(TinyNet(), method, batch=2, resolution=8, step=step)
    measured = measure_module(TinyNet, head_only if method == "bn_head" else (lambda name: True),
                              batch=2, resolution=8, step=step)
    assert_matches(predicted, measured)
    assert predicted.memory == measured["memory"]  # and here every byte agrees


def test_breakdown_and_timeline_add_up():
    predicted = predict(TinyNet(), "fft", batch=2, resolution=8)
    assert sum(n.forward.exact for n in predicted.nodes) == predicted.flops["exact"]["forward"]
    assert sum(n.backward.torch for n in predicted.nodes) == predicted.flops["torch"]["backward"]
    assert sum(n.backward.exact for n in predicted.nodes) == predicted.flops["exact"]["backward"]
    for group, index in GROUP_INDEX.items():
        assert max(s.groups[index] for s in predicted.timeline) == predicted.memory[group]
    assert max(s.total for s in predicted.timeline) == predicted.memory["peak"]
    phases = [s.phase for s in predicted.timeline]
    assert phases[0] == "entry" and phases[-1] == "optimizer" and "backward" in phases


class SgdMethod:
    """A test-only method: every parameter trained by ``torch.optim.SGD`` with these options."""

    def __init__(self, **options) -> None:
        self.options = options

    @hookimpl
    def costmodel_method_names(self):
        return ["sgd_test"]

    @hookimpl
    def costmodel_prepare_method(self, name, model, config):
        if name != "sgd_test":
            return None
        params = [ParamMeta(n, tuple(p.shape), p.dtype, True) for n, p in model.named_parameters()]
        return PreparedMethod([ParamGroup("sgd", params, {"lr": config.lr, **self.options})])


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
                                     {"weight_decay": 1e-4}])
@pytest.mark.parametrize("step", [1, 2])
def test_sgd_plugin_matches_the_live_measurement(options, step):
    manager = create_plugin_manager([SgdMethod(**options)])
    predicted = predict(TinyNet(), "sgd_test", batch=2, resolution=8, step=step, manager=manager)
    measured = measure_module(TinyNet, batch=2, resolution=8, step=step,
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3, **options))
    assert predicted.flops == measured["flops"]
    assert predicted.memory == measured["memory"]


class IdentityBeforeBranch(nn.Module):
    """``nn.Identity`` returns its input itself (no autograd node): the gradient the residual add
    sends to ``identity`` goes straight to ``y``, where the branch's gradient meets it while the
    branch's weight gradient is still TEMP (findings F2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1, stride=2, bias=False)
        self.identity = nn.Identity()
        self.branch = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        identity = self.identity(y)
        out = self.branch(y.contiguous()) + identity  # contiguous() on a contiguous tensor is y itself too
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class SharedWeights(nn.Module):
    """One module applied twice and one parameter used twice by a functional convolution: each
    parameter's gradients meet in its AccumulateGrad's input buffer (``old + new``, TEMP) and reach
    ``.grad`` once, after the last of them (findings F4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1, stride=2, bias=False)
        self.block = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.mix = nn.Parameter(torch.randn(2, 2, 3, 3) * 0.1)
        self.fc = nn.Linear(2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        y = self.block(y) + self.block(y)
        z = F.conv2d(F.relu(y), self.mix, padding=1)
        z = F.conv2d(F.relu(z), self.mix, padding=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class IdleParameters(nn.Module):
    """A trainable module never called and one whose output is dropped: no gradient reaches their
    parameters, so ``.grad`` stays None, AdamW keeps no state for them and does no work (F3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1, stride=2, bias=False)
        self.unused = nn.Linear(3, 3)
        self.dropped = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        self.dropped(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("build", [IdentityBeforeBranch, SharedWeights, IdleParameters])
@pytest.mark.parametrize("step", [1, 2])
def test_gradient_routing_matches_the_live_measurement(build, step):
    predicted = predict(build(), "fft", batch=2, resolution=8, step=step)
    measured = measure_module(build, batch=2, resolution=8, step=step)
    assert predicted.flops == measured["flops"]
    assert predicted.memory == measured["memory"]


class InPlaceOnView(nn.Module):
    """An in-place op on a view (``flatten``/``view``/basic indexing of a conv output): autograd
    rebases the view's history, and the backward runs the op's own backward inside ``CopySlices``:
    a regenerated ``AsStridedBackward0`` scatters the gradient into zeros of the base's storage, then
    a base-sized ``result``, a clone of the gradient's slice for the op's backward, and the op's
    gradient copied back into ``result``, which is the base's gradient (property test, in-place
    dropout after ``torch.flatten``). The conv output is large and the rest small, so the CopySlices
    allocations are the step's peak."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 1)
        self.act = {"dropout": nn.Dropout(0.5, inplace=True), "relu": nn.ReLU(inplace=True),
                    "hardswish": nn.Hardswish(inplace=True)}.get(kind, nn.Identity())
        self.shift = nn.Parameter(torch.zeros(128))
        self.fc = nn.Linear(64 if kind == "slice" else 128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.kind == "slice":  # a view of part of the base: its gradient is still base-sized
            return self.fc(x[:, :4].relu_().flatten(1))
        if self.kind == "add_":  # an in-place op whose backward passes the gradient (the clone) on
            v = x.view(x.size(0), -1)
            v += self.shift
            return self.fc(v)
        return self.fc(self.act(torch.flatten(x, 1)))


@pytest.mark.parametrize("kind", ["dropout", "relu", "hardswish", "add_", "slice"])
@pytest.mark.parametrize("fake", [True, False])
def test_in_place_op_on_a_view_matches_the_live_measurement(kind, fake):
    predicted = predict(InPlaceOnView(kind), "fft", batch=2, resolution=4, classes=2)
    measured = measure_module(lambda: InPlaceOnView(kind), batch=2, resolution=4, classes=2, fake=fake)
    assert_matches(predicted, measured)
    labels = [s.label for s in predicted.timeline if s.phase == "backward"]
    assert labels.count("copy_slices") == 1  # the conv's output is not a view: unchanged there
