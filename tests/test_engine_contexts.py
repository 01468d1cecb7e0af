"""A forward that changes what autograd or the kernels do through a context fx does not record
(another device's autocast, no_grad, custom autograd Functions, saved-tensor hooks other than a checkpointed
module call's) is refused by node, never predicted as a plain fp32 step (issue 11: "no silent
wrong numbers")."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import costmodel
from costmodel.errors import CostModelError


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad * 2


def _region(kind: str):
    """A context (or call) around the block's second conv, by kind."""

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if kind == "checkpoint":  # of a function: modelled only for a module (test_engine_checkpoint)
            return checkpoint(lambda t: block(t), x, use_reentrant=False)
        if kind == "reentrant":
            return checkpoint(block, x, use_reentrant=True)
        if kind == "function":
            return _Double.apply(block(x))
        if kind == "xpu_autocast":  # CPU autocast is modelled (test_engine_autocast)
            with torch.autocast("xpu", dtype=torch.bfloat16):
                return block(x).float()
        if kind == "no_grad":
            with torch.no_grad():
                return block(x)
        if kind == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                return block(x)
        return block(x)

    return run


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 10)
        self.run = _region(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.run(self.block, self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kind, says", [
    ("checkpoint", "saved-tensor hooks"), ("save_on_cpu", "saved-tensor hooks"),
    ("reentrant", "gradients disabled"), ("function", "gradients disabled"), ("no_grad", "gradients disabled"),
    ("xpu_autocast", "torch.autocast('xpu', dtype=torch.bfloat16)"),
])
def test_unmodelled_context_is_refused_by_node(kind: str, says: str) -> None:
    with pytest.raises(CostModelError, match=r"^node '\w+' ") as refused:
        costmodel.predict(Net(kind), "fft", batch=2, resolution=8)
    assert says in str(refused.value)


def test_plain_forward_predicts_whatever_the_callers_grad_mode() -> None:
    """The caller's ``torch.no_grad()`` is not the forward's: the trace turns gradients on."""
    expected = costmodel.predict(Net("plain"), "fft", batch=2, resolution=8)
    with torch.no_grad():
        under = costmodel.predict(Net("plain"), "fft", batch=2, resolution=8)
    assert under.memory == expected.memory and under.flops == expected.flops
