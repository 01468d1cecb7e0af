"""Layer and group normalisation against torch 2.14.1 on CPU.

Each rule is observed as in ``tests/test_op_plugins.py`` (one real op: a logging dispatch mode for
the aten ops and storages, ``saved_tensors_hooks`` for what autograd saves, stock
``FlopCounterMode`` and the reference's exact counter for the FLOPs), and the closed-form counts of
docs/flop-convention.md ("Layer and group normalisation") are written out. Every op here is inside
the exact convention: the reference's counter must have counted it. A small CNN with group norm
and a channels-last layer norm (torchvision's ``LayerNorm2d``, as in ConvNeXt) is predicted through
the Python API and held against a fake-tensor measurement of the same step, every field equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d

import test_op_plugins
from costmodel.costs import Alloc, SavedRef
from costmodel.plugins import normalization
from test_op_plugins import check, freeze, grad, nograd, plugin_cost, run_function, run_module


@pytest.fixture(autouse=True)
def with_normalization_plugin(monkeypatch):
    """``test_op_plugins.plugin_cost`` asks its own list of plugin modules; add this one (and so
    also check that no other plugin answers the same nodes)."""
    monkeypatch.setattr(test_op_plugins, "PLUGIN_MODULES", test_op_plugins.PLUGIN_MODULES + (normalization,))


def closed_forward(e: int, r: int, w: bool, b: bool) -> int:
    """E*(6 + w + b) + 5*R."""
    return e * (6 + w + b) + 5 * r


def closed_backward(e: int, r: int, w: bool, g_i: bool, g_w: bool, g_b: bool) -> int:
    """g_i*(E*(9 + w) + 4*R) + 4*E*g_w + E*g_b."""
    return g_i * (e * (9 + w) + 4 * r) + 4 * e * g_w + e * g_b


# ---------------------------------------------------------------------------------------------
# Layer norm


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("trainable,input_grad", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("normalized", [(5,), (4, 5)])
def test_layer_norm_module(affine, bias, trainable, input_grad, normalized):
    m = nn.LayerNorm(normalized, elementwise_affine=affine, bias=bias)
    if not trainable:
        freeze(m)
    x = grad(2, 3, 4, 5) if input_grad else nograd(2, 3, 4, 5)
    obs = run_module(m, x)
    cost = check(obs)
    e, r = 120, 120 // (5 if normalized == (5,) else 20)
    has_w, has_b = affine, affine and bias
    assert obs.forward_ops.count("aten.native_layer_norm") == 1
    assert cost.forward.torch == cost.backward.torch == 0
    assert cost.forward.exact == closed_forward(e, r, has_w, has_b)
    records = input_grad or (trainable and affine)
    # out, then mean and rstd (R float32 values each), kept for backward only when autograd records
    assert cost.forward_allocs == (Alloc(480, "output"), Alloc(4 * r, "saved" if records else "transient"),
                                   Alloc(4 * r, "saved" if records else "transient"))
    if records:
        assert cost.saved == (SavedRef("input", 0),)
        need_w, need_b = trainable and has_w, trainable and has_b
        assert cost.backward.exact == closed_backward(e, r, has_w, input_grad, need_w, need_b)
        assert obs.backward_ops.count("aten.native_layer_norm_backward") == 1
        assert cost.param_grads == {name: p.numel() * 4 for name, p in m.named_parameters() if p.requires_grad}


def test_layer_norm_functional():
    # ConvNeXt's LayerNorm2d: F.layer_norm on a channels-last permute (a non-contiguous input)
    x = grad(2, 6, 3, 3).permute(0, 2, 3, 1)
    cost = check(run_function(F.layer_norm, x, (6,), grad(6), grad(6), 1e-6))
    assert cost.forward.exact == closed_forward(108, 18, True, True)
    assert cost.backward.exact == closed_backward(108, 18, True, True, True, True)
    # weight and bias are node inputs: both saved, each with a gradient of its own size
    assert {ref.index for ref in cost.saved} == {0, 1, 2} and cost.input_grads == (432, 24, 24)
    check(run_function(F.layer_norm, nograd(3, 4), [4], grad(4)))
    check(run_function(F.layer_norm, grad(3, 4), [4], None, nograd(4)))
    check(run_function(F.layer_norm, grad(2, 3, 4), (3, 4)))
    check(run_function(F.layer_norm, grad(3, 4), [4], weight=nograd(4), bias=grad(4), eps=1e-3))
    check(run_function(torch.layer_norm, grad(3, 4), [4], grad(4), grad(4)))
    check(run_function(F.layer_norm, grad(3, 4).double(), [4], grad(4).double(), None))
    check(run_function(F.layer_norm, grad(3, 4).bfloat16(), [4], grad(4).bfloat16(), None))


def test_layer_norm_without_autograd_frees_its_statistics():
    obs = run_module(freeze(nn.LayerNorm(4)), nograd(3, 4))
    cost = check(obs)
    assert [a.lifetime for a in cost.forward_allocs] == ["output", "transient", "transient"]
    assert cost.backward.exact == 0 and not cost.saved


def test_torchvision_layer_norm2d_is_traced_through_to_the_functional_rule():
    from costmodel.trace import StepTracer

    graph = StepTracer().trace(LayerNorm2d(6))
    targets = [node.target for node in graph.nodes if node.op in ("call_function", "call_method")]
    assert targets == ["permute", F.layer_norm, "permute"]


# ---------------------------------------------------------------------------------------------
# Group norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("trainable,input_grad", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("groups,shape", [(3, (2, 6, 4, 4)), (1, (2, 6, 3)), (6, (3, 6)), (2, (1, 4, 2, 2, 2))])
def test_group_norm_module(affine, trainable, input_grad, groups, shape):
    m = nn.GroupNorm(groups, shape[1], affine=affine)
    if not trainable:
        freeze(m)
    x = grad(*shape) if input_grad else nograd(*shape)
    obs = run_module(m, x)
    cost = check(obs)
    e, r = x.numel(), shape[0] * groups
    assert obs.forward_ops.count("aten.native_group_norm") == 1
    assert cost.forward.torch == cost.backward.torch == 0
    assert cost.forward.exact == closed_forward(e, r, affine, affine)
    records = input_grad or (trainable and affine)
    kind = "saved" if records else "transient"
    assert cost.forward_allocs == (Alloc(4 * e, "output"), Alloc(4 * r, kind), Alloc(4 * r, kind))
    if records:
        need = trainable and affine
        assert cost.backward.exact == closed_backward(e, r, affine, input_grad, need, need)
        assert cost.param_grads == ({"weight": 4 * shape[1], "bias": 4 * shape[1]} if need else {})


def test_group_norm_bias_only_trainable():
    m = freeze(nn.GroupNorm(2, 4), "weight")
    cost = check(run_module(m, nograd(2, 4, 3, 3)))
    assert cost.backward.exact == 72 and cost.param_grads == {"bias": 16}


def test_group_norm_functional():
    cost = check(run_function(F.group_norm, grad(2, 6, 3, 3), 3, grad(6), grad(6)))
    # the weight is saved, the bias is not; each gets its own gradient
    assert {ref.index for ref in cost.saved} == {0, 1} and cost.input_grads == (432, 24, 24)
    check(run_function(F.group_norm, nograd(2, 6, 3, 3), 2, grad(6), None, 1e-3))
    check(run_function(F.group_norm, grad(2, 6, 3, 3), 6))
    check(run_function(F.group_norm, grad(2, 6, 3, 3), num_groups=2, weight=nograd(6), bias=grad(6)))
    check(run_function(torch.group_norm, grad(2, 4, 3), 2, grad(4), grad(4)))
    check(run_function(F.group_norm, grad(2, 4, 3).half(), 2, None, None))


# ---------------------------------------------------------------------------------------------
# Outside the model: a coverage gap, never a guess


def test_mixed_precision_norms_answer_none():
    """CPU keeps float32 statistics for a bfloat16 input with float32 parameters; FakeTensorMode and
    meta give bfloat16: the bytes depend on the mode, so the rule refuses."""
    x = torch.randn(2, 4, 3, 3).bfloat16().requires_grad_()
    assert plugin_cost(run_module(nn.GroupNorm(2, 4), x).node) is None
    assert plugin_cost(run_module(nn.LayerNorm(3), x).node) is None
    assert plugin_cost(run_function(F.layer_norm, x, (3,), grad(3)).node) is None


# ---------------------------------------------------------------------------------------------
# A custom CNN through the Python API, predicted == measured


class NormNet(nn.Module):
    """Conv-GroupNorm-ReLU, a depthwise conv with a frozen-or-trainable affine group norm, a
    channels-last layer norm (torchvision's LayerNorm2d: permute, F.layer_norm, permute), a layer
    norm without affine parameters on the pooled features, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), LayerNorm2d(8),
                                   nn.Conv2d(8, 16, 1), nn.GroupNorm(4, 16, affine=False), nn.ReLU())
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.head(self.norm(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


@pytest.mark.parametrize("method,trainable", [("fft", lambda name: True),
                                              ("bn_head", lambda name: name.startswith("head."))])
def test_norm_net_predicted_equals_measured(method, trainable):
    import costmodel
    from engine_live import measure_module

    predicted = costmodel.predict(NormNet(), method, batch=2, resolution=16)
    measured = measure_module(NormNet, trainable, batch=2, resolution=16)
    assert predicted.flops == measured["flops"]
    assert predicted.memory == measured["memory"]  # every group, peak included, to the byte


@pytest.mark.parametrize("make", [lambda: torch.randn(2, 4, 8, 8), lambda: torch.randn(2, 8, 8, 4).permute(0, 3, 1, 2),
                                  lambda: torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)])
def test_group_norm_propagates_the_cpu_kernels_layout(make) -> None:
    """CPU's group norm keeps a channels-last input's layout, the meta kernel does not."""
    from costmodel.plugins.normalization import group_norm_in_cpu_layout

    x = make()
    meta = x.to("meta")
    assert group_norm_in_cpu_layout(F.group_norm(meta, 2), meta).stride() == F.group_norm(x, 2).stride()
