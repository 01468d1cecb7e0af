"""Shape ops and reductions against torch 2.14.1 on CPU.

Each rule is observed as in ``tests/test_op_plugins.py`` (one real op: a logging dispatch mode for
the aten ops and storages, ``saved_tensors_hooks`` for what autograd saves, stock
``FlopCounterMode`` and the reference's exact counter for the FLOPs), and the closed-form counts of
docs/flop-convention.md ("Shape ops and reductions") are written out. Every op here is inside the
exact convention: the reference's counter must have counted it. ``chunk``/``split`` return several
tensors, so their backward is observed here with a gradient for every piece (``observe`` sends one
to the first output only). MNASNet and ShuffleNetV2 are predicted and held against a fake-tensor
measurement of the same step, every field equal.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import test_op_plugins
from costmodel.config import StepConfig
from costmodel.costs import Alloc, Flops
from costmodel.plugins import reduction, shape
from costmodel.validation.flops import SHAPE_ZERO_FLOP_OPS, count_flops, make_counter
from test_op_plugins import AllocationLog, check, grad, nograd, plugin_cost, run_function, run_method


@pytest.fixture(autouse=True)
def with_reduction_plugin(monkeypatch):
    """``test_op_plugins.plugin_cost`` asks its own list of plugin modules; add the reductions (and
    so also check that no other plugin answers the same nodes)."""
    if reduction not in test_op_plugins.PLUGIN_MODULES:
        monkeypatch.setattr(test_op_plugins, "PLUGIN_MODULES", test_op_plugins.PLUGIN_MODULES + (reduction,))


NO_FLOPS = Flops()


# ---------------------------------------------------------------------------------------------
# The reference's rows


@pytest.mark.parametrize("op", [
    lambda x: torch.ops.aten.select_backward(x[0], x.shape, 0, 0),
    lambda x: torch.ops.aten.slice_backward(x[1:], x.shape, 0, 1, x.shape[0], 1),
    lambda x: torch.roll(x, 1, 0),
    lambda x: torch.constant_pad_nd(x, (1, 2)),
])
def test_reference_counts_indexing_backward_roll_and_padding_as_zero(op):
    x = torch.randn(3, 4)
    assert count_flops(lambda: op(x), "exact") == 0  # covered: an uncovered op raises
    assert len(SHAPE_ZERO_FLOP_OPS) == 4


def test_reference_mean_and_sum_rows():
    x = torch.randn(2, 3, 4, 5)
    assert count_flops(lambda: x.mean([2, 3]), "exact") == 120 + 6
    assert count_flops(lambda: x.sum(1, keepdim=True), "exact") == 120
    assert count_flops(lambda: x.mean(), "exact") == 121


# ---------------------------------------------------------------------------------------------
# Views and permutations


VIEWS = [
    (run_function, torch.transpose, (1, 2)), (run_function, torch.swapaxes, (0, 3)),
    (run_function, torch.swapdims, (1, 2)), (run_function, torch.permute, ((0, 2, 3, 1),)),
    (run_function, torch.squeeze, ()), (run_function, torch.unsqueeze, (1,)),
    (run_method, "permute", (0, 2, 3, 1)), (run_method, "permute", ((3, 2, 1, 0),)),
    (run_method, "transpose", (-1, -2)), (run_method, "swapaxes", (1, 3)), (run_method, "swapdims", (0, 1)),
    (run_method, "view", (2, 3, 20)), (run_method, "reshape", (-1,)), (run_method, "flatten", (2,)),
    (run_method, "contiguous", ()),
]


@pytest.mark.parametrize("runner,target,args", VIEWS)
@pytest.mark.parametrize("input_grad", [True, False])
def test_views_allocate_nothing_and_view_the_gradient_back(runner, target, args, input_grad):
    x = grad(2, 3, 4, 5) if input_grad else nograd(2, 3, 4, 5)
    obs = runner(target, x, *args)
    cost = check(obs)
    assert cost.forward == cost.backward == NO_FLOPS and cost.forward_allocs == () and not cost.saved
    assert cost.input_grads == ((0,) if input_grad else ())


def test_torch_t_and_method_t():
    for obs in (run_function(torch.t, grad(3, 4)), run_method("t", grad(3, 4))):
        assert check(obs).input_grads == (0,)


@pytest.mark.parametrize("name,args", [("contiguous", ()), ("reshape", (2, -1)), ("flatten", (1,))])
def test_copy_of_a_permuted_input_allocates_the_output_and_passes_the_gradient(name, args):
    x = grad(2, 3, 4).permute(0, 2, 1)
    obs = run_method(name, x, *args)
    cost = check(obs)
    assert "aten.clone" in obs.forward_ops
    assert cost.forward_allocs == (Alloc(96, "output", 0),) and cost.input_grads == (0,)


def test_shufflenet_channel_shuffle_step_by_step():
    """``x.view(b, g, c // g, h, w)``, ``torch.transpose(x, 1, 2).contiguous()``, ``x.view(b, c, h, w)``
    as ShuffleNetV2 runs them, each node observed on its own."""
    x = grad(2, 8, 3, 3)
    v1 = check(run_method("view", x, 2, 2, 4, 3, 3))
    t = check(run_function(torch.transpose, grad(2, 2, 4, 3, 3), 1, 2))
    c_obs = run_method("contiguous", torch.randn(2, 2, 4, 3, 3).transpose(1, 2).requires_grad_())
    c = check(c_obs)
    v2 = check(run_method("view", grad(2, 4, 2, 3, 3), 2, 8, 3, 3))
    assert [cost.forward_allocs for cost in (v1, t, c, v2)] == [(), (), (Alloc(576, "output", 0),), ()]
    assert all(cost.forward == cost.backward == NO_FLOPS for cost in (v1, t, c, v2))


def test_view_backward_copies_a_permuted_gradient_which_the_node_alone_cannot_see():
    """The limit stated in plugins/shape.py: the first ``view`` of the channel shuffle receives the
    transposed (non-contiguous) gradient and its ``reshape`` copies it (``clone``); the rule says 0
    new bytes, true for a contiguous gradient (what ``observe`` sends). The models' predictions stay
    equal to the measurement on every field (below): this copy never sets a maximum there."""
    x = grad(2, 8, 3, 3)
    y = x.view(2, 2, 4, 3, 3).transpose(1, 2).contiguous().view(2, 8, 3, 3)
    grad_out, log = torch.ones_like(y), AllocationLog()
    with log:
        torch.autograd.grad(y, x, grad_out)
    assert log.ops == ["aten.view", "aten.transpose", "aten.clone", "aten._unsafe_view"]


# ---------------------------------------------------------------------------------------------
# expand


@pytest.mark.parametrize("x_shape,sizes", [((2, 1, 3), (2, 4, 3)), ((3,), (2, 4, 3)), ((1, 3), (5, 2, 3)),
                                           ((2, 4, 3), (2, 4, 3)), ((2, 1, 3), (-1, 4, -1))])
@pytest.mark.parametrize("input_grad", [True, False])
def test_expand(x_shape, sizes, input_grad):
    x = grad(*x_shape) if input_grad else nograd(*x_shape)
    cost = check(run_method("expand", x, *sizes))
    out_shape = torch.empty(x_shape).expand(*sizes).shape
    reduced = tuple(out_shape) != tuple(x_shape)
    assert cost.forward == NO_FLOPS and cost.forward_allocs == ()
    if input_grad:
        assert cost.backward == Flops(torch=0, exact=math.prod(out_shape) * reduced)
        assert cost.input_grads == (x.nbytes if reduced else 0,)


def test_expand_as():
    check(run_method("expand_as", grad(2, 1, 3), nograd(2, 5, 3)))


# ---------------------------------------------------------------------------------------------
# chunk and split: views forward, a cat backward


def observe_every_piece(fn, x: torch.Tensor) -> tuple[list[str], list[int], int, int]:
    """Backward of a multi-output op with a gradient for every piece: (aten ops, new storages'
    bytes, torch FLOPs, exact FLOPs)."""
    leaf = x.detach().clone().requires_grad_()
    pieces = fn(leaf)
    log, counter, exact = AllocationLog(), FlopCounterMode(display=False), make_counter("exact")
    grads_out = [torch.ones_like(p) for p in pieces]
    with counter, exact, log:  # autograd.grad: no AccumulateGrad into the leaf
        torch.autograd.grad(list(pieces), leaf, grads_out)
    assert not exact.uncovered
    return log.ops, [nbytes for _, nbytes, _ in log.new], counter.get_total_flops(), exact.get_total_flops()


CHUNKS = [
    (run_method, "chunk", (2,), {"dim": 1}, lambda t: t.chunk(2, dim=1)),
    (run_method, "chunk", (3,), {}, lambda t: t.chunk(3)),  # 4 rows: pieces of 2, 2
    (run_function, torch.chunk, (2, 1), {}, lambda t: torch.chunk(t, 2, 1)),
    (run_method, "split", (1,), {"dim": 1}, lambda t: t.split(1, dim=1)),
    (run_method, "split", ([1, 2],), {"dim": 1}, lambda t: t.split([1, 2], dim=1)),
    (run_function, torch.split, (3, 2), {}, lambda t: torch.split(t, 3, 2)),
    (run_method, "split_with_sizes", ([3, 1],), {}, lambda t: t.split_with_sizes([3, 1])),
    (run_method, "unbind", (1,), {}, lambda t: t.unbind(1)),  # timm's Attention: q, k, v = qkv.unbind(0)
    (run_function, torch.unbind, (0,), {}, lambda t: torch.unbind(t, 0)),
]


@pytest.mark.parametrize("runner,target,args,kwargs,fn", CHUNKS)
@pytest.mark.parametrize("input_grad", [True, False])
def test_chunk_and_split(runner, target, args, kwargs, fn, input_grad):
    x = grad(4, 3, 5) if input_grad else nograd(4, 3, 5)
    obs = runner(target, x, *args, **kwargs)
    cost = plugin_cost(obs.node)
    assert cost is not None and len(obs.node.outputs) > 1 or target == "chunk" and args == (3,)
    # forward: views only, nothing saved (checked against the observation)
    assert obs.forward_allocs == [] and not obs.saved_storages and not obs.saved_new_bytes
    assert cost.forward_allocs == () and not cost.saved and cost.forward == NO_FLOPS
    assert obs.forward_torch == 0 and obs.forward_exact == 0
    if not input_grad:
        assert not cost.input_grads
        return
    ops, new, flops_torch, flops_exact = observe_every_piece(fn, x)
    joined = "aten.stack" if target in ("unbind", torch.unbind) else "aten.cat"  # UnbindBackward0 stacks
    assert ops == [joined] and new == [x.nbytes] and flops_torch == flops_exact == 0
    assert cost.input_grads == (x.nbytes,) and cost.backward == NO_FLOPS and cost.backward_allocs == ()


def test_a_piece_without_gradient_gets_zeros_first():
    """The assumption stated in plugins/shape.py: with every piece receiving a gradient (ShuffleNet),
    the backward is one ``cat``; a piece that receives none is first filled with ``zeros``."""
    leaf = grad(2, 4, 3)
    first, _ = leaf.chunk(2, dim=1)
    grad_out, log = torch.ones_like(first), AllocationLog()
    with log:
        torch.autograd.grad(first, leaf, grad_out)
    assert log.ops[:2] == ["aten.zeros", "aten.cat"]


def test_selecting_a_piece_of_a_tuple_runs_nothing():
    pieces = grad(2, 4, 3).chunk(2, dim=1)
    obs = run_function(operator.getitem, pieces, 1)
    cost = check(obs)
    assert obs.forward_ops == [] and cost.forward_allocs == () and cost.input_grads == (None, 0)
    assert check(run_function(operator.getitem, pieces, slice(0, 1))).input_grads == (0, None)


# ---------------------------------------------------------------------------------------------
# cat


def test_cat_along_channels():
    cost = check(run_function(torch.cat, (grad(2, 3, 2, 2), grad(2, 5, 2, 2)), dim=1))
    assert cost.forward_allocs == (Alloc(2 * 8 * 4 * 4, "output", 0),) and cost.input_grads == (0, 0)
    check(run_function(torch.cat, [nograd(2, 3), grad(2, 1)], -1))
    check(run_function(torch.concat, [grad(1, 3), grad(2, 3)]))


# ---------------------------------------------------------------------------------------------
# Indexing into a tensor

BASIC_INDICES = [
    ((slice(None), 1), 1), (1, 1), ((Ellipsis, 0), 1), ((slice(None), slice(1, 3)), 1),
    ((slice(None), slice(-4, None)), 1), ((slice(None), slice(None, None, 2)), 1),
    ((0, slice(None), Ellipsis), 1), ((None, slice(None), 0), 1), (-1, 1),
    ((Ellipsis, None), 0), (None, 0), (slice(None), 1), (slice(0, 100), 1), ((slice(None),), 0),
    ((slice(None), slice(None)), 0), ((slice(None), None), 0),
    ((slice(0, 100),), 0), ((slice(None), slice(0, 4)), 0), (Ellipsis, 0),
]


@pytest.mark.parametrize("index,copies", BASIC_INDICES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_basic_indexing_is_a_view_with_a_zero_filled_gradient(index, copies, input_grad):
    x = grad(2, 4, 3, 3) if input_grad else nograd(2, 4, 3, 3)
    obs = run_function(operator.getitem, x, index)
    cost = check(obs)
    assert cost.forward == cost.backward == NO_FLOPS and cost.forward_allocs == ()
    assert sum(op in ("aten.select", "aten.slice") for op in obs.forward_ops) == copies
    if input_grad:
        assert cost.input_grads == (x.nbytes if copies else 0,)
        assert any(op.endswith("_backward") for op in obs.backward_ops) == bool(copies)


@pytest.mark.parametrize("index", [
    (slice(None), slice(1, 3), 0),  # two view ops: two zero-filled gradients, one after the other
    (slice(None), slice(None, None, 2), slice(1, None)),
    torch.tensor([0, 1]), [0, 1], True, (slice(None), torch.tensor([True, False, True, False])),
])
def test_indexing_outside_the_rule_answers_none(index):
    assert plugin_cost(run_function(operator.getitem, grad(2, 4, 3, 3), index).node) is None


# ---------------------------------------------------------------------------------------------
# roll and constant padding


@pytest.mark.parametrize("input_grad", [True, False])
def test_roll(input_grad):
    x = grad(2, 3, 4, 4) if input_grad else nograd(2, 3, 4, 4)
    for obs in (run_function(torch.roll, x, (1, -2), (2, 3)), run_method("roll", x, 2, 1),
                run_function(torch.roll, x, 3)):
        cost = check(obs)
        assert cost.forward_allocs == (Alloc(x.nbytes, "output", 0),)
        assert cost.input_grads == ((x.nbytes,) if input_grad else ())


@pytest.mark.parametrize("pads", [(1, 1), (1, 2, 0, 3), (-1, 1), (0, 0, 1, 1, 2, 0)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_constant_pad(pads, input_grad):
    x = grad(2, 3, 4, 4) if input_grad else nograd(2, 3, 4, 4)
    obs = run_function(F.pad, x, pads)
    cost = check(obs)
    out = F.pad(x.detach(), pads)
    assert cost.forward_allocs == (Alloc(out.nbytes, "output", 0),) and cost.forward == NO_FLOPS
    assert cost.input_grads == ((x.nbytes,) if input_grad else ())
    check(run_function(F.pad, x, pads, "constant", 0.5))
    check(run_function(F.pad, x, pads, value=-1.0))


def test_other_padding_modes_answer_none():
    assert plugin_cost(run_function(F.pad, grad(1, 2, 4, 4), (1, 1, 1, 1), mode="reflect").node) is None
    assert plugin_cost(run_function(F.pad, grad(1, 2, 4, 4), (1, 1, 1, 1), "replicate").node) is None


# ---------------------------------------------------------------------------------------------
# Nodes without tensors


@pytest.mark.parametrize("fn,args", [
    (operator.floordiv, (116, 2)), (operator.mul, (2, 58)), (operator.eq, (4, 4)), (operator.mod, (7, 7)),
    (operator.add, (1, 2)), (operator.sub, (5, 2)), (operator.truediv, (6, 4)), (operator.neg, (3,)),
    (operator.lt, (1, 2)), (torch._assert, (True, "H % window == 0")),
])
def test_shape_arithmetic_is_free(fn, args):
    obs = run_function(fn, *args)
    cost = check(obs)
    assert obs.forward_ops == [] and cost.forward == NO_FLOPS and cost.forward_allocs == ()


def test_sizes_and_shapes_are_free():
    x = grad(2, 3, 4)
    for obs in (run_method("size", x), run_method("size", x, -1), run_function(getattr, x, "shape"),
                run_function(operator.getitem, torch.Size((2, 3)), 1), run_function(len, x),
                run_method("numel", x), run_method("dim", x)):
        cost = check(obs)
        assert cost.forward == NO_FLOPS and cost.forward_allocs == ()


def test_tensor_arithmetic_is_not_the_shape_rule():
    obs = run_function(operator.mul, grad(2, 3), 2.0)
    assert shape.TABLE.cost(obs.node) is None and plugin_cost(obs.node) is not None
    obs = run_function(operator.floordiv, nograd(2, 3), 2)
    assert shape.TABLE.cost(obs.node) is None


# ---------------------------------------------------------------------------------------------
# Reductions


REDUCTIONS = [
    (((2, 3),), {}), (([2, 3],), {}), ((2,), {"keepdim": True}), ((-1,), {}), ((), {}), (((0, 2),), {"keepdim": True}),
    ((), {"dim": 1}),
]


@pytest.mark.parametrize("args,kwargs", REDUCTIONS)
@pytest.mark.parametrize("name", ["mean", "sum"])
@pytest.mark.parametrize("form", ["method", "function"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_mean_and_sum(args, kwargs, name, form, input_grad):
    x = grad(2, 3, 4, 5) if input_grad else nograd(2, 3, 4, 5)
    obs = run_method(name, x, *args, **kwargs) if form == "method" else \
        run_function(getattr(torch, name), x, *args, **kwargs)
    cost = check(obs)
    e, out = 120, obs.node.outputs[0]
    is_mean = name == "mean"
    assert cost.forward == Flops(torch=0, exact=e + is_mean * out.numel)
    assert cost.forward_allocs == (Alloc(out.nbytes, "output", 0),) and not cost.saved
    if input_grad:
        assert cost.backward == Flops(torch=0, exact=is_mean * e)
        assert cost.input_grads == (x.nbytes if is_mean else 0,)


def test_global_average_pool_as_mnasnet_and_shufflenet_write_it():
    cost = check(run_method("mean", grad(2, 1024, 2, 2), [2, 3]))
    assert cost.forward.exact == 2 * 1024 * 4 + 2 * 1024 and cost.backward.exact == 2 * 1024 * 4


def test_reductions_outside_the_rule_answer_none():
    assert plugin_cost(run_method("sum", grad(2, 3), 1, dtype=torch.float64).node) is None
    assert plugin_cost(run_function(torch.mean, grad(2, 3), 0, dtype=torch.float64).node) is None


def test_integer_sum_counts_as_the_reference_does():
    check(run_method("sum", torch.arange(6).view(2, 3), 1))


# ---------------------------------------------------------------------------------------------
# Whole models: every field predicted equal to the fake-tensor measurement


@pytest.mark.parametrize("model", ["shufflenet_v2_x0_5", "mnasnet0_5"])
@pytest.mark.parametrize("method", ["fft", "lora"])
def test_model_predicted_equals_measured(model, method):
    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    config = StepConfig(model=model, method=method, rank=4, batch=2, resolution=64)
    predicted, measured = predict_config(config), measure(config, fake=True)
    assert predicted.flops == measured.flops
    assert predicted.memory == measured.memory
    assert predicted.trainable_params == measured.trainable_params
