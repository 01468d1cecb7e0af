"""Closed-form FLOP counts of single layers in both conventions (docs/flop-convention.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from costmodel.errors import CostModelError
from costmodel.validation.flops import PhaseFlops, count_flops


def forward_and_backward(module: nn.Module, x: torch.Tensor, convention: str) -> tuple[int, int]:
    """FLOPs of module(x) and of its backward from a given gradient (no loss op involved)."""
    forward = count_flops(lambda: module(x), convention)
    module.zero_grad(set_to_none=True)  # an existing .grad would add an accumulation
    x.grad = None
    y = module(x)
    grad = torch.ones_like(y)
    backward = count_flops(lambda: y.backward(grad), convention)
    return forward, backward


@pytest.mark.parametrize(
    "c_in, c_out, groups, bias, input_grad",
    [
        (8, 16, 1, True, True),     # standard convolution with bias
        (16, 16, 16, False, True),  # depthwise
        (16, 24, 4, False, True),   # grouped
        (3, 8, 1, False, False),    # first layer: no gradient for the input
    ],
)
def test_conv2d(c_in: int, c_out: int, groups: int, bias: bool, input_grad: bool) -> None:
    conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=groups, bias=bias)
    x = torch.randn(2, c_in, 11, 11, requires_grad=input_grad)
    out_numel = 2 * c_out * 6 * 6
    macs = 2 * out_numel * (c_in // groups) * 9  # each output: a dot product of length C_in/groups*3*3

    forward, backward = forward_and_backward(conv, x, "exact")
    assert forward == macs + (out_numel if bias else 0)
    assert backward == macs * input_grad + macs + (out_numel if bias else 0)

    forward, backward = forward_and_backward(conv, x, "torch")
    assert forward == macs
    # Stock FlopCounterMode: the weight gradient is counted with the full C_in, `groups` times too high.
    assert backward == macs * input_grad + macs * groups


def test_depthwise_stock_overcount_matches_known_figure() -> None:
    """FACTS.md: Conv2d(32, 32, 3, groups=32) over 1x32x112x112, weight gradient 231,211,008 vs 7,225,344."""
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(1, 32, 112, 112)  # no input gradient: the backward is the weight gradient only
    assert forward_and_backward(conv, x, "torch")[1] == 231_211_008
    assert forward_and_backward(conv, x, "exact")[1] == 7_225_344


@pytest.mark.parametrize("input_grad", [True, False])
def test_linear(input_grad: bool) -> None:
    linear = nn.Linear(20, 7)
    x = torch.randn(5, 20, requires_grad=input_grad)
    product = 2 * 5 * 20 * 7

    forward, backward = forward_and_backward(linear, x, "exact")
    assert forward == product + 5 * 7  # addmm: the product and the bias add
    # grad_input mm (if needed), grad_weight mm, grad_bias = sum over the batch
    assert backward == product * input_grad + product + 5 * 7

    forward, backward = forward_and_backward(linear, x, "torch")
    assert forward == product
    assert backward == product * input_grad + product


@pytest.mark.parametrize("affine_grad, input_grad", [(True, True), (False, True), (True, False)])
def test_batch_norm_training(affine_grad: bool, input_grad: bool) -> None:
    bn = nn.BatchNorm2d(6).train()
    bn.requires_grad_(affine_grad)
    x = torch.randn(4, 6, 5, 5, requires_grad=input_grad)
    numel, channels = x.numel(), 6

    forward, backward = forward_and_backward(bn, x, "exact")
    # per element: mean 1, variance 3, normalise 2, scale 1, shift 1; per channel: mean and
    # variance divides 2, invstd 3, running statistics 3 + 4. num_batches_tracked += 1 is int64: 0.
    assert forward == 8 * numel + 12 * channels
    g_i, g_w = int(input_grad), int(affine_grad)
    per_element = int(g_i or g_w) + 3 * int(g_i or g_w) + 5 * g_i  # sum_dy, dot, grad_input
    per_channel = g_w + g_i * 5  # grad_weight; grad_input's per-channel factors
    assert backward == per_element * numel + per_channel * channels

    assert forward_and_backward(bn, x, "torch") == (0, 0)


def test_batch_norm_eval() -> None:
    bn = nn.BatchNorm2d(6).eval()
    x = torch.randn(4, 6, 5, 5)
    assert count_flops(lambda: bn(x), "exact") == 4 * x.numel() + 3 * 6


def test_cross_entropy() -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    criterion = nn.CrossEntropyLoss()
    # _log_softmax 5 per element + 1 log per row; nll_loss N + 1 (mean)
    assert count_flops(lambda: criterion(logits, labels), "exact") == 5 * 30 + 3 + 3 + 1
    loss = criterion(logits, labels)
    # ones_like 0, nll_loss_backward N + 1, _log_softmax_backward_data 4 per element
    assert count_flops(loss.backward, "exact") == 3 + 1 + 4 * 30


def test_adamw_step_is_14n_plus_1_per_tensor() -> None:
    weight = nn.Parameter(torch.randn(7, 3))
    bias = nn.Parameter(torch.randn(7))
    optimizer = torch.optim.AdamW([weight, bias], lr=1e-3)
    for _ in range(2):  # the second step: state exists
        optimizer.zero_grad(set_to_none=True)
        (weight.sum() + bias.sum()).backward()
        flops = count_flops(optimizer.step, "exact")
    assert flops == (14 * 21 + 1) + (14 * 7 + 1)
    assert count_flops(optimizer.step, "torch") == 0


@pytest.mark.parametrize("m, n", [(6, 4), (4, 9)])
def test_thin_svd_golub_van_loan(m: int, n: int) -> None:
    a = torch.randn(m, n)
    long, short = max(m, n), min(m, n)
    assert count_flops(lambda: torch.linalg.svd(a, full_matrices=False), "exact") == 14 * long * short**2 + 8 * short**3
    assert count_flops(lambda: torch.linalg.svd(a, full_matrices=False), "torch") == 0


def test_elementwise_and_pooling() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert count_flops(lambda: nn.functional.hardswish(x), "exact") == 5 * x.numel()
    assert count_flops(lambda: nn.functional.relu6(x), "exact") == 2 * x.numel()
    assert count_flops(lambda: x.mean((2, 3)), "exact") == x.numel() + 6
    assert count_flops(lambda: torch.add(x, x, alpha=2.0), "exact") == 2 * x.numel()
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    assert count_flops(lambda: pool(x), "exact") == 2 * 3 * 4 * 4 * 9


def test_uncovered_op_is_an_error_not_a_zero() -> None:
    x = torch.randn(4)
    with pytest.raises(CostModelError, match="cumsum"):  # an op the exact convention has no row for
        count_flops(lambda: torch.cumsum(x, 0), "exact")


def test_phases_are_counted_separately() -> None:
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    phases = PhaseFlops()
    with phases.phase("forward"):
        y = linear(x)
    with phases.phase("backward"):
        y.backward(torch.ones_like(y))
    assert phases.counts["torch"] == {"forward": 2 * 2 * 4 * 3, "backward": 2 * 2 * 4 * 3}
    assert phases.counts["exact"] == {"forward": 2 * 2 * 4 * 3 + 6, "backward": 2 * 2 * 4 * 3 + 6}
