"""Smooth activations (sigmoid, SiLU, tanh, GELU) and stochastic depth against torch 2.14.1 on CPU.

Each rule is observed as in ``tests/test_op_plugins.py`` (one real op: a logging dispatch mode
for the aten ops and storages, ``saved_tensors_hooks`` for what autograd saves, stock
``FlopCounterMode`` and the reference's exact counter for the FLOPs), and the closed-form counts
of docs/flop-convention.md ("Smooth activations") are written out. Here every op is inside the
exact convention: the reference's counter must have counted it. One model-level test holds the
prediction for EfficientNet-B0 (SiLU, sigmoid gates, stochastic depth) against a fake-tensor
measurement on every field.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from costmodel.costs import Alloc, SavedRef
from costmodel.validation.flops import count_flops
from test_op_plugins import check, grad, nograd, plugin_cost, run_function, run_method, run_module

# ---------------------------------------------------------------------------------------------
# The reference's formulas, on their own

# (aten op as a callable, exact FLOPs per element) for every row of the section
REFERENCE_ROWS = [
    (torch.sigmoid, 4), (torch.sigmoid_, 4), (F.silu, 5), (lambda x: F.silu(x, inplace=True), 5),
    (torch.tanh, 5), (torch.tanh_, 5), (F.gelu, 5), (lambda x: F.gelu(x, approximate="tanh"), 13),
    (lambda x: torch._C._nn.gelu_(x, approximate="tanh"), 13),
    (lambda x: torch.ops.aten.sigmoid_backward(x, x), 3), (lambda x: torch.ops.aten.tanh_backward(x, x), 3),
    (lambda x: torch.ops.aten.silu_backward(x, x), 9),
    (lambda x: torch.ops.aten.gelu_backward(x, x), 11),
    (lambda x: torch.ops.aten.gelu_backward(x, x, approximate="tanh"), 22),
]


@pytest.mark.parametrize("op,k", REFERENCE_ROWS)
def test_reference_formulas_per_element(op, k):
    x = torch.randn(3, 4)
    assert count_flops(lambda: op(x.clone()), "exact") == k * 12
    assert count_flops(lambda: op(x.clone()), "torch") == 0
    assert count_flops(lambda: op(x.clone().half()), "exact") == k * 12  # any floating dtype


def test_silu_backward_runs_whole_under_the_counters_and_its_decomposition_counts_the_same():
    """The counters keep silu_backward whole (its decomposition allocates five input-sized
    temporaries the fused CPU kernel does not); the decomposition's own ops add up to the row's 9."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from costmodel.validation.flops import make_counter

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, g = torch.randn(2, 5), torch.randn(2, 5)
    below = Ops()
    with below, make_counter("torch"), make_counter("exact") as exact:
        torch.ops.aten.silu_backward(g, x)
    assert below.ops == ["aten.silu_backward"] and exact.get_total_flops() == 9 * 10
    decomposed = make_counter("exact")
    with decomposed:
        torch.ops.aten.silu_backward.default.decompose(g, x)
    assert decomposed.get_total_flops() == 9 * 10 and not decomposed.uncovered


# ---------------------------------------------------------------------------------------------
# Activation rules

# (module factory, exact forward k, exact backward k, in-place flag exists, backward reads the output)
SMOOTH_MODULES = [
    (lambda inplace: nn.SiLU(inplace=inplace), 5, 9, True, False),
    (lambda inplace: nn.Sigmoid(), 4, 3, False, True),
    (lambda inplace: nn.Tanh(), 5, 3, False, True),
    (lambda inplace: nn.GELU(), 5, 11, False, False),
    (lambda inplace: nn.GELU(approximate="tanh"), 13, 22, False, False),
]


@pytest.mark.parametrize("make,k_forward,k_backward,reads_output,inplace", [
    (make, k_forward, k_backward, reads_output, inplace)
    for make, k_forward, k_backward, has_inplace, reads_output in SMOOTH_MODULES
    for inplace in ((False, True) if has_inplace else (False,))])
@pytest.mark.parametrize("input_grad", [True, False])
def test_smooth_activation_modules(make, k_forward, k_backward, reads_output, inplace, input_grad):
    x = grad(2, 3, 2) if input_grad else nograd(2, 3, 2)
    cost = check(run_module(make(inplace), x))
    assert cost.forward.torch == 0 and cost.forward.exact == k_forward * 12
    assert cost.backward.torch == 0 and cost.backward.exact == input_grad * k_backward * 12
    if input_grad:
        expected_saved = (SavedRef("output", 0),) if reads_output else (() if inplace else (SavedRef("input", 0),))
        assert cost.saved == expected_saved
        assert cost.input_grads == (48,)


@pytest.mark.parametrize("fn,kwargs,k_forward,k_backward", [
    (torch.tanh, {}, 5, 3), (F.tanh, {}, 5, 3), (torch.tanh_, {}, 5, 3),
    (F.gelu, {}, 5, 11), (F.gelu, {"approximate": "none"}, 5, 11), (F.gelu, {"approximate": "tanh"}, 13, 22),
    (torch._C._nn.gelu_, {}, 5, 11), (torch._C._nn.gelu_, {"approximate": "tanh"}, 13, 22),
    (torch.sigmoid, {}, 4, 3), (torch.sigmoid_, {}, 4, 3), (F.silu, {}, 5, 9), (F.silu, {"inplace": True}, 5, 9),
])
def test_smooth_activation_functions(fn, kwargs, k_forward, k_backward):
    cost = check(run_function(fn, grad(3, 4), **kwargs))
    assert cost.forward.exact == k_forward * 12 and cost.backward.exact == k_backward * 12
    check(run_function(fn, nograd(3, 4), **kwargs))


@pytest.mark.parametrize("name,inplace", [("tanh", False), ("tanh_", True), ("sigmoid", False), ("sigmoid_", True)])
def test_tanh_and_sigmoid_methods_need_no_clone_in_place(name, inplace):
    cost = check(run_method(name, grad(3, 4)))
    assert cost.saved == (SavedRef("output", 0),)
    assert cost.forward_allocs == (() if inplace else (Alloc(48, "output", 0),))


def test_inplace_gelu_and_silu_keep_a_clone_of_their_input():
    for obs in (run_function(torch._C._nn.gelu_, grad(2, 5)), run_function(F.silu, grad(2, 5), inplace=True)):
        cost = check(obs)
        assert cost.forward_allocs == (Alloc(40, "saved"),) and not cost.saved


def test_gelu_with_an_unknown_approximation_answers_none():
    obs = run_module(nn.GELU(), grad(2, 3))
    obs.node.module = nn.GELU()
    obs.node.module.approximate = "erf"  # torch itself would refuse it
    assert plugin_cost(obs.node) is None


# ---------------------------------------------------------------------------------------------
# Stochastic depth


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("p", [0.2, 1.0])
@pytest.mark.parametrize("input_grad", [True, False])
def test_stochastic_depth_in_training(mode, p, input_grad):
    x = grad(2, 3, 4, 4) if input_grad else nograd(2, 3, 4, 4)
    obs = run_function(stochastic_depth, x, p, mode, True)
    assert obs.forward_ops == ["aten.empty", "aten.bernoulli_"] + ["aten.div_"] * (p < 1) + ["aten.mul"]
    cost = check(obs)
    noise = 2 if mode == "row" else 1
    assert cost.forward.torch == 0 and cost.forward.exact == noise * (p < 1) + 96
    assert cost.backward.exact == input_grad * 96
    # The mask first (kept for mul's backward when autograd records the op), then the output.
    assert cost.forward_allocs == (Alloc(4 * noise, "saved" if input_grad else "transient"), Alloc(384, "output", 0))
    assert not cost.saved


def test_stochastic_depth_module_and_keywords():
    check(run_module(StochasticDepth(0.3, "row").train(), grad(3, 2, 2, 2)))
    check(run_function(stochastic_depth, grad(3, 5), p=0.5, mode="batch"))
    check(run_function(stochastic_depth, grad(3, 5).double(), 0.5, "row", training=True))


def test_stochastic_depth_off_returns_its_input():
    for obs in (run_function(stochastic_depth, grad(2, 3, 2, 2), 0.2, "row", False),
                run_function(stochastic_depth, grad(2, 3, 2, 2), 0.0, "batch", True),
                run_module(StochasticDepth(0.2, "row").eval(), grad(2, 3, 2, 2))):
        cost = check(obs)
        assert obs.forward_ops == [] and cost.forward_allocs == () and cost.input_grads == (0,)


def test_stochastic_depth_arguments_it_rejects_answer_none():
    obs = run_function(stochastic_depth, grad(2, 3), 0.2, "row", True)
    obs.node.args = (obs.node.args[0], 0.2, "column", True)
    assert plugin_cost(obs.node) is None
    obs.node.args = (obs.node.args[0], 1.5, "row", True)
    assert plugin_cost(obs.node) is None


# ---------------------------------------------------------------------------------------------
# A whole model: EfficientNet-B0 (SiLU in place, sigmoid gates, stochastic depth in every block)


@pytest.mark.parametrize("method,rank", [("fft", 4), ("lora", 4)])
def test_efficientnet_b0_predicted_equals_measured(method, rank):
    from costmodel.config import StepConfig
    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    # Resolution 64: at 32 the step's peak (LoRA) falls in the backward of the classifier's in-place
    # dropout on the flattened pool output, where autograd's CopySlices (an in-place op on a view)
    # allocates two more view-sized temporaries than the engine models (it cannot tell a view).
    config = StepConfig(model="efficientnet_b0", method=method, rank=rank, batch=2, resolution=64)
    predicted, measured = predict_config(config), measure(config, fake=True)
    assert predicted.flops == measured.flops
    assert predicted.memory == measured.memory
    assert predicted.trainable_params == measured.trainable_params


# ---------------------------------------------------------------------------------------------
# Softmax and log-softmax over a dim (costmodel.plugins.softmax)

SOFTMAXES = [
    (lambda x: run_module(nn.Softmax(dim=-1), x), 5, 0),
    (lambda x: run_module(nn.LogSoftmax(dim=1), x), 5, 1),
    (lambda x: run_function(F.softmax, x, dim=-1), 5, 0),
    (lambda x: run_function(torch.softmax, x, 1), 5, 0),
    (lambda x: run_method("softmax", x, -1), 5, 0),
    (lambda x: run_method("log_softmax", x, dim=-1), 5, 1),
]


@pytest.mark.parametrize("observe,k,per_row", SOFTMAXES)
@pytest.mark.parametrize("needs_grad", [True, False])
def test_softmax_rules_equal_the_live_op(observe, k, per_row, needs_grad):
    """The output saved for backward, one input-sized gradient, ``5*E`` (``+ R`` for log-softmax)
    forward and ``4*E`` backward in the exact convention, 0 in the stock one."""
    x = grad(2, 3, 4) if needs_grad else nograd(2, 3, 4)
    obs = observe(x)
    cost = check(obs)
    rows = 2 * 3 if obs.node.kind != "call_module" or obs.node.module.dim == -1 else 2 * 4
    assert cost.forward.exact == k * 24 + per_row * rows and cost.forward.torch == 0
    if needs_grad:
        assert cost.saved == (SavedRef("output", 0),) and cost.backward.exact == 4 * 24
