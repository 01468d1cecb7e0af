"""Op plugins against what torch 2.14.1 really does on CPU, one tiny op at a time.

For each case the op runs for real once, observed three ways:
- a logging ``TorchDispatchMode`` sees every aten op of forward and backward and the storages
  they create (a result whose storage is an input's is an alias, not an allocation); weak
  references tell, after the forward, which new storages are outputs, which autograd kept
  (saved) and which are already gone (transient);
- ``torch.autograd.graph.saved_tensors_hooks`` sees what autograd saves (an input, an output, a
  parameter, or a new tensor);
- stock ``FlopCounterMode`` gives the ``torch`` convention's count of each phase; the runtime
  reference's exact counter (``costmodel.validation.flops``) gives the ``exact`` one.
The plugin's answer for the same node, built from shapes alone, must equal all of it. Closed-form
counts written out in the tests catch convention slips that a shared formula would hide.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from costmodel.costs import Alloc, OpCost, OpNode, ParamMeta, SavedRef, TensorMeta
from costmodel.plugins import batchnorm, conv, dropout, elementwise, linear, loss, pooling, shape, softmax, svd

PLUGIN_MODULES = (conv, linear, batchnorm, elementwise, pooling, shape, dropout, loss, svd, softmax)


# ---------------------------------------------------------------------------------------------
# Observation of one real op


def storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class AllocationLog(TorchDispatchMode):
    """Every aten op that runs, and every storage it creates (outputs not aliasing an input).

    Holds only weak references, so that liveness can be read afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.new: list[tuple[int, int, StorageWeakRef]] = []  # (storage id, nbytes, weak ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(str(func.overloadpacket))
        known = {storage_id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and storage_id(t) not in known and t.untyped_storage().nbytes() > 0:
                storage = t.untyped_storage()
                self.new.append((storage_id(t), storage.nbytes(), StorageWeakRef(storage)))
        return out


def exact_counter() -> contextlib.AbstractContextManager:
    """The runtime reference's exact-convention counter (a no-op context while it does not exist)."""
    try:
        from costmodel.validation.flops import make_counter
    except ImportError:
        return contextlib.nullcontext()
    return make_counter("exact")


REFERENCE_EXISTS = not isinstance(exact_counter(), contextlib.nullcontext)


def exact_total(counter: Any) -> int | None:
    """The exact count, or None when the reference has none: no counter yet, or an op outside the
    convention (then the plugin's exact count is a proposal, checked against closed forms only)."""
    if not hasattr(counter, "uncovered") or counter.uncovered:
        return None
    return counter.get_total_flops()


@dataclass
class Observed:
    node: OpNode
    forward_torch: int
    backward_torch: int
    forward_exact: int | None
    backward_exact: int | None
    forward_allocs: list[Alloc]
    saved_storages: set[int]
    saved_new_bytes: list[int]
    input_grads: tuple[int | None, ...]
    param_grads: dict[str, int]
    backward_transients: list[int]
    forward_ops: list[str] = field(default_factory=list)
    backward_ops: list[str] = field(default_factory=list)


def meta_of(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), t.dtype, t.requires_grad, storage_id(t), t.untyped_storage().nbytes())


def observe(kind: str, target: Any, fn: Callable, args: tuple, kwargs: dict | None = None,
            module: nn.Module | None = None) -> Observed:
    """Run ``fn(*args, **kwargs)`` once for real and record what it did.

    Tensors in ``args`` that require grad are leaves; the op receives a clone of each (so that
    in-place ops are legal, as inside a network), and gradients are taken with respect to the
    leaves: the clone passes the gradient through untouched."""
    kwargs = kwargs or {}
    leaves: dict[int, torch.Tensor] = {}

    def as_op_input(x):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            inner = x.clone()
            leaves[id(inner)] = x
            return inner
        return x

    args, kwargs = tree_map(as_op_input, (args, kwargs))
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    input_metas = [meta_of(t) for t in inputs]
    meta_by_id = {id(t): m for t, m in zip(inputs, input_metas)}
    node_args, node_kwargs = tree_map(lambda x: meta_by_id.get(id(x), x) if isinstance(x, torch.Tensor) else x,
                                      (args, kwargs))
    params: dict[str, ParamMeta] = {}
    param_tensors: dict[str, torch.Tensor] = {}
    if module is not None:
        for name, p in module.named_parameters(recurse=False):
            params[name] = ParamMeta(name, tuple(p.shape), p.dtype, p.requires_grad)
            param_tensors[name] = p
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                params[name] = ParamMeta(name, tuple(b.shape), b.dtype, False, is_buffer=True)

    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    log = AllocationLog()
    counter, exact = FlopCounterMode(display=False), exact_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with counter, exact, log:
            result = fn(*args, **kwargs)
    forward_exact = exact_total(exact)
    outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
    output_metas = [meta_of(t) for t in outputs]
    out_storages = [storage_id(t) for t in outputs]
    forward_allocs = []
    for sid, nbytes, ref in log.new:
        if sid in out_storages:
            forward_allocs.append(Alloc(nbytes, "output", out_storages.index(sid)))
        elif not ref.expired():
            forward_allocs.append(Alloc(nbytes, "saved"))
        else:
            forward_allocs.append(Alloc(nbytes, "transient"))
    io_storages = {m.storage for m in input_metas} | set(out_storages)
    param_storages = {storage_id(p) for p in (module.parameters(recurse=False) if module else ())}
    param_storages |= {storage_id(b) for b in (module.buffers(recurse=False) if module else ()) if b is not None}
    saved_storages = {storage_id(t) for t in saved if storage_id(t) in io_storages}
    saved_new = list({storage_id(t): t.untyped_storage().nbytes() for t in saved
                      if storage_id(t) not in io_storages | param_storages and t.untyped_storage().nbytes()}.values())
    needs = tuple(m.requires_grad for m in input_metas)  # before the op: an in-place op may change it
    node = OpNode(name="op", kind=kind, target=target, args=node_args, kwargs=node_kwargs,
                  inputs=tuple(input_metas), outputs=tuple(output_metas), needs_input_grad=needs,
                  module=module, params=params)

    input_grads: list[int | None] = [None] * len(inputs)
    param_grads: dict[str, int] = {}
    backward_transients: list[int] = []
    backward_torch, backward_exact = 0, None
    blog = AllocationLog()
    trainable = {n: p for n, p in param_tensors.items() if p.requires_grad}
    if outputs and outputs[0].requires_grad:
        grad_out = torch.ones_like(outputs[0])
        wrt_inputs = [i for i, need in enumerate(needs) if need]
        wrt = [leaves.get(id(inputs[i]), inputs[i]) for i in wrt_inputs] + list(trainable.values())
        bcounter, bexact = FlopCounterMode(display=False), exact_counter()
        with bcounter, bexact, blog:
            grads = torch.autograd.grad(outputs[0], wrt, grad_out, allow_unused=True)
        backward_exact = exact_total(bexact)
        backward_torch = bcounter.get_total_flops()
        new_in_backward = {sid: nbytes for sid, nbytes, _ in blog.new}
        grad_storages = set()
        for slot, gradient in zip(wrt_inputs + list(trainable), grads):
            if gradient is None:
                continue
            sid = storage_id(gradient)
            grad_storages.add(sid)
            nbytes = new_in_backward.get(sid, 0)
            assert nbytes or sid == storage_id(grad_out), "a gradient that is neither new nor the incoming one"
            if isinstance(slot, int):
                input_grads[slot] = nbytes
            else:
                param_grads[slot] = nbytes
        backward_transients = [nbytes for sid, nbytes, _ in blog.new if sid not in grad_storages]
    return Observed(node=node, forward_torch=counter.get_total_flops(), backward_torch=backward_torch,
                    forward_exact=forward_exact, backward_exact=backward_exact, forward_allocs=forward_allocs,
                    saved_storages=saved_storages, saved_new_bytes=saved_new, input_grads=tuple(input_grads),
                    param_grads=param_grads, backward_transients=backward_transients,
                    forward_ops=log.ops, backward_ops=blog.ops)


def plugin_cost(node: OpNode) -> OpCost | None:
    """The first plugin module that answers (they cover disjoint targets)."""
    answers = [m.TABLE.cost(node) for m in PLUGIN_MODULES]
    answers = [a for a in answers if a is not None]
    assert len(answers) <= 1, f"two plugins answer {node.target}"
    return answers[0] if answers else None


def saved_storage_ids(node: OpNode, cost: OpCost) -> set[int]:
    metas = {"input": node.inputs, "output": node.outputs}
    return {metas[ref.of][ref.index].storage for ref in cost.saved}


def check(obs: Observed, in_convention: bool = True) -> OpCost:
    """The plugin's answer for the observed node equals the observation in every respect.

    ``in_convention``: every aten op the node runs has a row in docs/flop-convention.md, so the
    reference's exact counter must have counted it (once that counter exists)."""
    node = obs.node
    if in_convention and REFERENCE_EXISTS:
        assert obs.forward_exact is not None, f"ops outside the exact convention: {obs.forward_ops}"
        assert obs.backward_exact is not None or not obs.backward_ops, f"outside: {obs.backward_ops}"
    cost = plugin_cost(node)
    assert cost is not None, f"no plugin answers {node.kind} {node.target}"
    where = f"{node.kind} {getattr(node.target, '__name__', node.target)}; ops {obs.forward_ops} / {obs.backward_ops}"
    assert cost.forward.torch == obs.forward_torch, where
    assert cost.backward.torch == obs.backward_torch, where
    if obs.forward_exact is not None:
        assert cost.forward.exact == obs.forward_exact, where
        assert cost.backward.exact == obs.backward_exact or (obs.backward_exact is None and cost.backward.exact == 0), where
    assert list(cost.forward_allocs) == obs.forward_allocs, where
    assert saved_storage_ids(node, cost) == obs.saved_storages, where
    assert sorted(a.nbytes for a in cost.forward_allocs if a.lifetime == "saved") == sorted(obs.saved_new_bytes), where
    if node.records_autograd and node.outputs and node.outputs[0].requires_grad:
        assert tuple(cost.input_grads) == obs.input_grads, where
        assert cost.param_grads == obs.param_grads, where
        # The backward's own temporaries, and the intermediate tensors of gradients made in steps
        # (a product before its sum to a broadcast operand's shape: OpCost.input_grad_steps).
        intermediates = [n for steps in cost.input_grad_steps.values() for n in steps[:-1] if n]
        predicted = sorted([a.nbytes for a in cost.backward_allocs] + intermediates)
        assert predicted == sorted(obs.backward_transients), where
        assert all(a.lifetime == "transient" for a in cost.backward_allocs), where
    else:
        assert cost.backward.torch == cost.backward.exact == 0, where
        assert not cost.saved and not cost.param_grads and not cost.backward_allocs, where
    return cost


def grad(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


def nograd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def run_module(module: nn.Module, *args: Any) -> Observed:
    return observe("call_module", type(module), module, args, module=module)


def run_function(fn: Callable, *args: Any, **kwargs: Any) -> Observed:
    return observe("call_function", fn, fn, args, kwargs)


def run_method(name: str, *args: Any, **kwargs: Any) -> Observed:
    return observe("call_method", name, lambda self, *a, **k: getattr(self, name)(*a, **k), args, kwargs)


def freeze(module: nn.Module, *names: str) -> nn.Module:
    for name in names or [n for n, _ in module.named_parameters()]:
        getattr(module, name).requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------
# Convolution


def conv_closed_form(n, c_in, c_out, groups, k, h_out, w_out):
    """2 * multiply-adds per output element (C_in/groups * k*k) times outputs."""
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * k * k


@pytest.mark.parametrize("c_in,c_out,groups,bias", [(4, 6, 1, False), (4, 6, 1, True), (4, 4, 4, False),
                                                    (4, 8, 2, True), (6, 6, 3, False)])
@pytest.mark.parametrize("trainable,input_grad", [(True, True), (True, False), (False, True)])
def test_conv2d_module(c_in, c_out, groups, bias, trainable, input_grad):
    m = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=groups, bias=bias)
    if not trainable:
        freeze(m)
    x = grad(2, c_in, 7, 7) if input_grad else nograd(2, c_in, 7, 7)
    cost = check(run_module(m, x))
    f = conv_closed_form(2, c_in, c_out, groups, 3, 4, 4)
    out_numel = 2 * c_out * 4 * 4
    assert cost.forward.torch == f and cost.forward.exact == f + bias * out_numel
    need_w = trainable
    assert cost.backward.torch == input_grad * f + need_w * groups * f
    assert cost.backward.exact == input_grad * f + need_w * f + (need_w and bias) * out_numel


def test_conv_without_autograd_saves_nothing():
    m = freeze(nn.Conv2d(3, 4, 3))
    cost = check(run_module(m, nograd(1, 3, 5, 5)))
    assert cost.backward == cost.backward.__class__() and not cost.saved


def test_depthwise_weight_gradient_is_overcounted_groups_times_in_torch_convention():
    m = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    freeze(m)
    m.weight.requires_grad_(True)
    cost = check(run_module(m, nograd(1, 32, 8, 8)))
    assert cost.backward.torch == 32 * cost.backward.exact == 32 * conv_closed_form(1, 32, 32, 32, 3, 8, 8)


@pytest.mark.parametrize("module", [nn.Conv1d(4, 6, 3, groups=2, bias=True), nn.Conv3d(2, 4, 2, bias=False)])
def test_conv1d_conv3d_modules(module):
    x = grad(2, module.in_channels, *(5,) * (module.weight.dim() - 2))
    check(run_module(module, x))


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv2d_functional(with_bias):
    w = grad(6, 2, 3, 3)
    b = grad(6) if with_bias else None
    check(run_function(F.conv2d, grad(2, 4, 6, 6), w, b, 1, 1, 1, 2))
    check(run_function(F.conv2d, nograd(2, 4, 6, 6), w, bias=b, groups=2))


def test_conv_outside_the_model_answers_none():
    for module in (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 2, padding="same")):
        obs = run_module(module, grad(1, 2, 5, 5))
        assert conv.TABLE.cost(obs.node) is None
    obs = run_module(nn.ConvTranspose2d(2, 2, 3), grad(1, 2, 5, 5))
    assert plugin_cost(obs.node) is None


# ---------------------------------------------------------------------------------------------
# Registration


def test_every_op_plugin_is_registered_through_the_costmodel_entry_point_group():
    import importlib.metadata

    import pluggy

    from costmodel import hookspecs

    registered = {entry.value: entry for entry in importlib.metadata.entry_points(group="costmodel")}
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module in PLUGIN_MODULES:
        assert module.__name__ in registered, f"{module.__name__} lacks an entry point in pyproject.toml"
        manager.register(registered[module.__name__].load(), name=registered[module.__name__].name)
    manager.check_pending()
    obs = run_module(nn.Conv2d(2, 3, 1), grad(1, 2, 2, 2))
    assert manager.hook.costmodel_op_cost(node=obs.node) == plugin_cost(obs.node)


# ---------------------------------------------------------------------------------------------
# Linear and matrix products


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("trainable,input_grad", [(True, True), (True, False), (False, True)])
def test_linear_module(bias, x_shape, trainable, input_grad):
    m = nn.Linear(4, 5, bias=bias)
    if not trainable:
        freeze(m)
    x = grad(*x_shape) if input_grad else nograd(*x_shape)
    # A 1-d input without bias runs unsqueeze/mm/squeeze_: squeeze_ has no row in the convention yet.
    cost = check(run_module(m, x), in_convention=bias or len(x_shape) > 1)
    rows = math.prod(x_shape) // 4
    assert cost.forward.torch == 2 * rows * 4 * 5
    assert cost.forward.exact == 2 * rows * 4 * 5 + bias * rows * 5
    assert cost.backward.torch == (input_grad + trainable) * 2 * rows * 4 * 5
    assert cost.backward.exact == cost.backward.torch + (trainable and bias) * rows * 5


def test_linear_bias_only_trainable():
    m = freeze(nn.Linear(4, 5), "weight")
    cost = check(run_module(m, nograd(3, 4)))
    assert cost.backward == cost.backward.__class__(torch=0, exact=15) and not cost.saved


def test_linear_functional_and_products():
    check(run_function(F.linear, grad(3, 4), grad(5, 4), grad(5)))
    check(run_function(F.linear, nograd(3, 4), grad(5, 4)))
    check(run_function(torch.mm, grad(3, 4), nograd(4, 5)))
    check(run_function(torch.mm, grad(3, 4), grad(4, 5)))
    check(run_method("mm", nograd(3, 4), grad(4, 5)))
    check(run_function(torch.bmm, grad(2, 3, 4), grad(2, 4, 5)))
    check(run_function(torch.addmm, grad(5), grad(3, 4), grad(4, 5)))
    check(run_function(torch.addmm, grad(3, 5), nograd(3, 4), grad(4, 5)))
    check(run_function(torch.matmul, grad(3, 4), grad(4, 5)))
    check(run_function(torch.matmul, grad(2, 3, 4), grad(4, 5)))
    check(run_function(operator.matmul, grad(2, 2, 3, 4), nograd(2, 2, 4, 5)))
    check(run_method("matmul", grad(2, 3, 4), grad(2, 4, 5)))


def test_products_outside_the_model_answer_none():
    assert plugin_cost(run_function(torch.matmul, grad(4), grad(4, 5)).node) is None
    assert plugin_cost(run_function(torch.matmul, grad(2, 3, 4), grad(1, 4, 5)).node) is None
    assert plugin_cost(run_function(torch.addmm, grad(5), grad(3, 4), grad(4, 5), beta=2).node) is None


# ---------------------------------------------------------------------------------------------
# Batch normalisation


@pytest.mark.parametrize("affine_trainable,input_grad", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm2d(affine_trainable, input_grad, train):
    m = nn.BatchNorm2d(4).train(train)
    if not affine_trainable:
        freeze(m)
    x = grad(2, 4, 3, 3) if input_grad else nograd(2, 4, 3, 3)
    cost = check(run_module(m, x))
    e, c = 72, 4
    assert cost.forward.torch == cost.backward.torch == 0
    assert cost.forward.exact == (e * 8 + c * 12 if train else e * 4 + 3 * c)
    if train and affine_trainable and input_grad:
        assert cost.backward.exact == e * 9 + c * 6
    if train and not affine_trainable and input_grad:  # BN+H: frozen affine, gradient through the input
        assert cost.backward.exact == e * 9 + c * 5 and not cost.param_grads


@pytest.mark.parametrize("module,shape", [(nn.BatchNorm1d(3), (4, 3)), (nn.BatchNorm1d(3, affine=False), (2, 3, 5)),
                                          (nn.BatchNorm2d(3, track_running_stats=False), (2, 3, 2, 2)),
                                          (nn.BatchNorm3d(2, momentum=None), (2, 2, 2, 2, 2))])
def test_batch_norm_variants(module, shape):
    check(run_module(module.train(), grad(*shape)))


@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                                     (torch.float64, torch.float64)])
@pytest.mark.parametrize("affine,running", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_norm_statistics_take_the_layer_dtype(layer_dtype, input_dtype, affine, running):
    m = nn.BatchNorm2d(3, affine=affine, track_running_stats=running).to(layer_dtype)
    check(run_module(m, torch.randn(2, 3, 2, 2, dtype=input_dtype).requires_grad_()))


def test_batch_norm_functional():
    rm, rv = torch.zeros(3), torch.ones(3)
    check(run_function(F.batch_norm, grad(2, 3, 4), rm, rv, grad(3), grad(3), True))
    check(run_function(F.batch_norm, grad(2, 3, 4), rm, rv, nograd(3), None, training=True))
    check(run_function(F.batch_norm, nograd(2, 3, 4), None, None, grad(3), grad(3), True))
    check(run_function(F.batch_norm, grad(2, 3, 4), rm, rv, grad(3), grad(3), False))
    check(run_function(F.batch_norm, grad(2, 3, 4).half(), rm, rv, None, None, True))


# ---------------------------------------------------------------------------------------------
# Element-wise ops

# (module, exact forward k, exact backward k, in the convention)
ACTIVATION_MODULES = [
    (lambda inplace: nn.ReLU(inplace=inplace), 1, 1, True),
    (lambda inplace: nn.ReLU6(inplace=inplace), 2, 2, True),
    (lambda inplace: nn.Hardtanh(-2.0, 3.0, inplace=inplace), 2, 2, True),
    (lambda inplace: nn.Hardswish(inplace=inplace), 5, 6, True),
    (lambda inplace: nn.Hardsigmoid(inplace=inplace), 4, 3, True),
    (lambda inplace: nn.SiLU(inplace=inplace), 5, 9, False),
    (lambda inplace: nn.Sigmoid(), 4, 3, False),
]


@pytest.mark.parametrize("make,k_forward,k_backward,in_convention", ACTIVATION_MODULES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_activation_modules(make, k_forward, k_backward, in_convention, inplace, input_grad):
    x = grad(2, 3, 2) if input_grad else nograd(2, 3, 2)
    cost = check(run_module(make(inplace), x), in_convention=in_convention)
    assert cost.forward == cost.forward.__class__(torch=0, exact=k_forward * 12)
    assert cost.backward.exact == input_grad * k_backward * 12


def test_inplace_hardswish_keeps_a_clone_of_its_input_but_inplace_relu_does_not():
    cost = check(run_module(nn.Hardswish(inplace=True), grad(2, 5)))
    assert cost.forward_allocs == (Alloc(40, "saved"),) and not cost.saved
    cost = check(run_module(nn.ReLU(inplace=True), grad(2, 5)))
    assert cost.forward_allocs == () and cost.saved == (SavedRef("output", 0),)


@pytest.mark.parametrize("fn,args,in_convention", [
    (F.relu, (True,), True), (torch.relu, (), True), (torch.relu_, (), True), (F.relu6, (True,), True),
    (F.hardtanh, (-2.0, 2.0, True), True), (F.hardtanh_, (), True), (F.hardswish, (True,), True),
    (F.hardsigmoid, (), True), (F.silu, (True,), True), (torch.sigmoid, (), True), (F.sigmoid, (), True),
    (torch.sigmoid_, (), True),
])
def test_activation_functions(fn, args, in_convention):
    check(run_function(fn, grad(3, 4), *args), in_convention=in_convention)
    check(run_function(fn, nograd(3, 4), *args), in_convention=in_convention)


@pytest.mark.parametrize("name,in_convention", [("relu", True), ("relu_", True), ("sigmoid", True),
                                                ("sigmoid_", True)])
def test_activation_methods(name, in_convention):
    check(run_method(name, grad(3, 4)), in_convention=in_convention)


@pytest.mark.parametrize("fn,a,b", [
    (operator.add, (2, 3, 4, 4), (2, 3, 4, 4)),
    (operator.add, (2, 3, 4, 4), (2, 3, 1, 1)),
    (operator.add, (3, 1), (2, 1, 4)),
    (operator.iadd, (2, 3, 4, 4), (2, 3, 4, 4)),
    (operator.iadd, (2, 3, 4, 4), (3, 1, 1)),
    (torch.add, (2, 3), (3,)),
    (operator.sub, (2, 3), (3,)),
    (operator.isub, (2, 3), (2, 3)),
    (torch.sub, (3,), (2, 3)),
    (operator.mul, (2, 3, 1, 1), (2, 3, 4, 4)),  # squeeze-excitation: scale * input
    (operator.mul, (2, 3), (2, 3)),
    (operator.imul, (2, 3, 4), (2, 3, 1)),
    (torch.mul, (3, 1), (1, 4)),
])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)])
def test_binary_ops(fn, a, b, needs):
    x = grad(*a) if needs[0] else nograd(*a)
    y = grad(*b) if needs[1] else nograd(*b)
    cost = check(run_function(fn, x, y))
    out = torch.broadcast_shapes(a, b)
    assert cost.forward.exact == math.prod(out) and cost.forward.torch == 0


def test_binary_ops_with_scalars_alpha_and_methods():
    check(run_function(torch.add, grad(2, 3), grad(3), alpha=2))
    check(run_function(torch.add, grad(2, 3), grad(2, 3), alpha=0.5))
    check(run_function(operator.add, grad(2, 3), 1.0))
    check(run_function(operator.sub, 1.0, grad(2, 3)))  # rsub
    check(run_function(operator.mul, 2.0, grad(2, 3)))
    check(run_function(operator.imul, grad(2, 3), 3.0))
    check(run_method("add_", grad(2, 3), grad(3), alpha=2))
    check(run_method("mul_", grad(2, 3), grad(2, 3)))
    check(run_method("mul", nograd(2, 3), grad(1, 3)))
    check(run_method("sub_", grad(2, 3), 1))
    cost = check(run_function(operator.add, torch.arange(6), torch.arange(6)))
    assert cost.forward.exact == 0  # integer arithmetic is not floating-point work


def test_add_traced_out_of_place_but_run_in_place_is_costed_in_place():
    """``out += identity`` traces to ``operator.add`` under a stock tracer; when shape propagation
    shows the result in the input's storage, the plugin follows the storage."""
    obs = run_function(operator.iadd, grad(2, 3), grad(2, 3))
    obs.node.target = operator.add
    cost = plugin_cost(obs.node)
    assert cost.forward_allocs == () and cost.input_grads == (0, 0)


# ---------------------------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("input_grad", [True, False])
def test_max_pool(input_grad):
    x = grad(2, 3, 9, 9) if input_grad else nograd(2, 3, 9, 9)
    cost = check(run_module(nn.MaxPool2d(3, 2, 1), x))  # resnet's stem pool
    assert cost.forward.exact == 2 * 3 * 5 * 5 * 9 and cost.backward.exact == input_grad * 2 * 3 * 5 * 5
    assert cost.forward_allocs[1] == Alloc(2 * 3 * 5 * 5 * 8, "saved" if input_grad else "transient")
    check(run_module(nn.MaxPool2d((2, 3), ceil_mode=True), x))
    check(run_function(F.max_pool2d, x, 2))
    check(run_function(F.max_pool2d, x, [3], 1, 1, 2))


@pytest.mark.parametrize("input_grad", [True, False])
def test_global_average_pool_is_a_mean(input_grad):
    x = grad(2, 3, 5, 4) if input_grad else nograd(2, 3, 5, 4)
    for node_obs in (run_module(nn.AdaptiveAvgPool2d(1), x), run_module(nn.AdaptiveAvgPool2d((1, 1)), x),
                     run_function(F.adaptive_avg_pool2d, x, 1)):
        cost = check(node_obs)
        assert cost.forward.exact == 120 + 6 and cost.backward.exact == input_grad * 120 and not cost.saved


@pytest.mark.parametrize("input_grad", [True, False])
def test_average_pools_are_means_per_window(input_grad):
    x = grad(2, 3, 7, 5) if input_grad else nograd(2, 3, 7, 5)
    cost = check(run_module(nn.AdaptiveAvgPool2d((3, 2)), x))
    # windows along 7 -> 3: [0,3) [2,5) [4,7): 9 elements; along 5 -> 2: [0,3) [2,5): 6 elements
    assert cost.forward.exact == 6 * 9 * 6 + 6 * 3 * 2
    cost = check(run_module(nn.AvgPool2d(2), x))
    assert cost.forward.exact == 2 * 3 * 3 * 2 * 5
    check(run_function(F.avg_pool2d, x, (3, 2), 1, 1))
    check(run_module(nn.AdaptiveAvgPool2d(7), grad(1, 2, 7, 7)))


@pytest.mark.parametrize("input_grad", [True, False])
def test_nearest_upsampling_copies_forward_and_sums_backward(input_grad):
    """GhostNetV2's gate: ``F.interpolate(mode="nearest")``, 0 FLOPs forward, ``numel(out)`` adds
    backward, nothing saved, one input-sized gradient."""
    x = grad(2, 3, 4, 5) if input_grad else nograd(2, 3, 4, 5)
    cost = check(run_function(F.interpolate, x, size=(8, 10), mode="nearest"))
    assert cost.forward.exact == 0 and cost.backward.exact == input_grad * 2 * 3 * 8 * 10 and not cost.saved
    assert list(cost.forward_allocs) == [Alloc(2 * 3 * 8 * 10 * 4, "output", 0)]
    check(run_function(F.interpolate, x, scale_factor=2.0))
    check(run_function(F.interpolate, x, size=(7, 3), mode="nearest"))  # uneven: some sources copied more often


def test_interpolation_outside_the_rule_answers_none():
    assert plugin_cost(run_function(F.interpolate, grad(1, 2, 4, 4), scale_factor=2.0, mode="bilinear").node) is None
    assert plugin_cost(run_function(F.interpolate, grad(1, 2, 4), scale_factor=2.0).node) is None


def test_pools_outside_the_model_answer_none():
    assert plugin_cost(run_module(nn.MaxPool2d(2, return_indices=True), grad(1, 2, 4, 4)).node) is None
    assert plugin_cost(run_module(nn.MaxPool1d(2), grad(1, 2, 4)).node) is None
    assert plugin_cost(run_module(nn.AdaptiveMaxPool2d(1), grad(1, 2, 4, 4)).node) is None


# ---------------------------------------------------------------------------------------------
# Shape ops


@pytest.mark.parametrize("input_grad", [True, False])
def test_views_and_reshapes(input_grad):
    x = grad(2, 3, 1, 1) if input_grad else nograd(2, 3, 1, 1)
    for obs in (run_function(torch.flatten, x, 1), run_module(nn.Flatten(), x), run_method("view", x, 2, -1),
                run_method("reshape", x, 6), run_function(torch.reshape, x, (3, 2)), run_method("flatten", x),
                run_method("contiguous", x), run_method("squeeze", x), run_method("unsqueeze", x, 0),
                run_method("permute", x, 1, 0, 2, 3), run_method("transpose", x, 0, 1)):
        cost = check(obs)
        assert cost.forward == cost.forward.__class__() and cost.forward_allocs == ()


def test_reshape_of_a_non_contiguous_input_copies():
    x = torch.randn(3, 2).t().requires_grad_()
    cost = check(run_method("reshape", x, 6))
    assert cost.forward_allocs == (Alloc(24, "output", 0),)
    cost = check(run_method("contiguous", x))
    assert cost.forward_allocs == (Alloc(24, "output", 0),)


def test_cat_identity_and_metadata_nodes():
    check(run_function(torch.cat, [grad(2, 3), nograd(2, 2), grad(2, 1)], 1))
    check(run_function(torch.cat, (grad(2, 3), grad(1, 3))))
    check(run_module(nn.Identity(), grad(2, 3)))
    for obs in (run_method("size", grad(2, 3), 0), run_function(getattr, grad(2, 3), "shape"),
                run_method("dim", grad(2, 3))):
        cost = check(obs)
        assert cost.forward == cost.forward.__class__() and cost.input_grads == (None,)


def test_advanced_indexing_into_a_tensor_answers_none():
    """Basic indexing and expand are covered (tests/test_op_shapes.py); indexing with a tensor or a
    list (a gather, whose backward scatters) is not."""
    assert plugin_cost(run_function(operator.getitem, grad(4, 3), torch.tensor([0, 2])).node) is None
    assert plugin_cost(run_function(operator.getitem, grad(4, 3), [0, 2]).node) is None


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_dropout_in_train_mode_keeps_an_input_sized_float_mask(inplace, input_grad):
    x = grad(3, 5) if input_grad else nograd(3, 5)
    cost = check(run_module(nn.Dropout(0.2, inplace=inplace).train(), x))
    assert cost.forward.exact == 30 and cost.backward.exact == input_grad * 15
    assert cost.forward_allocs[0] == Alloc(60, "saved" if input_grad else "transient")
    assert len(cost.forward_allocs) == 2 - inplace


def test_dropout_off_returns_its_input():
    for obs in (run_module(nn.Dropout(0.2).eval(), grad(3, 5)), run_module(nn.Dropout(0.0), grad(3, 5)),
                run_function(F.dropout, grad(3, 5), 0.5, False)):
        cost = check(obs)
        assert cost.forward_allocs == () and cost.input_grads == (0,)
    check(run_function(F.dropout, grad(3, 5), 0.3))
    check(run_function(F.dropout, grad(3, 5), p=0.3, inplace=True))


def test_dropout_variants_outside_the_model_answer_none():
    assert plugin_cost(run_module(nn.Dropout(1.0), grad(3, 5)).node) is None
    assert plugin_cost(run_module(nn.Dropout2d(0.2), grad(1, 3, 2, 2)).node) is None


# ---------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_cross_entropy(reduction, input_grad):
    logits = grad(4, 10) if input_grad else nograd(4, 10)
    target = torch.randint(0, 10, (4,))
    cost = check(run_module(nn.CrossEntropyLoss(reduction=reduction), logits, target))
    mean = reduction == "mean"
    assert cost.forward == cost.forward.__class__(torch=0, exact=5 * 40 + 4 + 4 + mean)
    assert cost.backward.exact == input_grad * (4 + mean + 4 * 40)
    assert [a.nbytes for a in cost.forward_allocs] == [160, 4, 4]
    check(run_function(F.cross_entropy, logits, target, reduction=reduction))


def test_cross_entropy_variants_outside_the_model_answer_none():
    logits, target = grad(4, 10), torch.randint(0, 10, (4,))
    assert plugin_cost(run_module(nn.CrossEntropyLoss(label_smoothing=0.1), logits, target).node) is None
    assert plugin_cost(run_module(nn.CrossEntropyLoss(weight=torch.ones(10)), logits, target).node) is None
    assert plugin_cost(run_module(nn.CrossEntropyLoss(reduction="none"), logits, target).node) is None
    assert plugin_cost(run_function(F.cross_entropy, logits, torch.rand(4, 10)).node) is None


# ---------------------------------------------------------------------------------------------
# SVD (GaLore's projector refresh)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (2, 5, 3)])
@pytest.mark.parametrize("full_matrices", [False, True])
def test_svd(shape, full_matrices):
    a = nograd(*shape)
    cost = check(run_function(torch.linalg.svd, a, full_matrices=full_matrices))
    u, s, vh = torch.linalg.svd(a, full_matrices=full_matrices)
    *batch, m, n = shape
    assert [x.nbytes for x in cost.forward_allocs] == [u.nbytes, s.nbytes, vh.nbytes]
    assert svd.svd_output_bytes(m, n, a.dtype, full_matrices=full_matrices, batch=math.prod(batch)) == \
        (u.nbytes, s.nbytes, vh.nbytes)
    l, k = max(m, n), min(m, n)
    per_matrix = 4 * l * l * k + 8 * l * k * k + 9 * k**3 if full_matrices else 14 * l * k * k + 8 * k**3
    assert cost.forward == cost.forward.__class__(torch=0, exact=math.prod(batch) * per_matrix)


def test_svd_outside_the_model_answers_none():
    assert plugin_cost(run_function(torch.linalg.svd, grad(4, 3), full_matrices=False).node) is None
    assert plugin_cost(run_function(torch.linalg.svdvals, nograd(6, 4)).node) is None
    assert svd.svd_flops(6, 4, compute_uv=False) == (12 * 6 * 16 - 4 * 64) // 3


# ---------------------------------------------------------------------------------------------
# Every node of the paper's models, each observed on its own


class EachNodeObserved(torch.fx.Interpreter):
    """Runs a traced training step on real tiny tensors; before each op node runs, the same op is
    observed in isolation (on copies of its real inputs, with their ``requires_grad``) and the
    plugins' answer is checked against it."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.checked: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = tree_map(lambda x: x.detach().clone().requires_grad_(x.requires_grad)
                                    if isinstance(x, torch.Tensor) else x, (args, kwargs))
            if n.op == "call_module":
                module = self.fetch_attr(n.target)
                obs = observe(n.op, type(module), module, args, kwargs, module=module)
            elif n.op == "call_function":
                obs = observe(n.op, n.target, n.target, args, kwargs)
            else:
                obs = observe(n.op, n.target, lambda self_, *a, **k: getattr(self_, n.target)(*a, **k), args, kwargs)
            check(obs)
            target = type(self.fetch_attr(n.target)) if n.op == "call_module" else n.target
            self.checked.append(f"{n.op}:{getattr(target, '__name__', target)}")
        return super().run_node(n)


def observe_every_node(model_name: str, method: str) -> list[str]:
    from costmodel.models import build_model, head_name
    from costmodel.trace import StepTracer, TrainingStep

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10)
    if method == "bn_head":
        model.requires_grad_(False)
        getattr(model, head_name(model)).requires_grad_(True)
    step = TrainingStep(model, nn.CrossEntropyLoss())
    graph_module = torch.fx.GraphModule(step, StepTracer().trace(step))
    interpreter = EachNodeObserved(graph_module)
    interpreter.run(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    return interpreter.checked


@pytest.mark.parametrize("method", ["fft", "bn_head"])
@pytest.mark.parametrize("model_name", ["mobilenet_v3_small", "resnet18",
                                        pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                        pytest.param("mobilenet_v3_large", marks=pytest.mark.slow)])
def test_every_node_of_the_paper_models(model_name, method):
    checked = observe_every_node(model_name, method)
    assert "call_module:CrossEntropyLoss" in checked
    if model_name == "resnet18":
        assert "call_function:iadd" in checked and "call_module:MaxPool2d" in checked
    if model_name == "mobilenet_v3_small":
        assert {"call_function:mul", "call_function:iadd", "call_module:Hardswish", "call_module:Dropout"} <= set(checked)


@pytest.mark.parametrize("x_shape, permute, weight_shape, groups, channels_last_weight", [
    ((2, 4, 8, 8), None, (4, 4, 3, 3), 1, False),
    ((2, 8, 8, 4), (0, 3, 1, 2), (4, 4, 3, 3), 1, False),   # ConvNeXt's permute back: channels-last
    ((2, 6, 6, 4), (0, 3, 1, 2), (4, 1, 3, 3), 4, False),   # depthwise on it
    ((2, 8, 8, 2), (0, 3, 1, 2), (2, 2, 1, 1), 1, False),   # a token grid reshaped to an image
    ((2, 4, 8, 8), None, (4, 4, 3, 3), 1, True),            # a channels-last weight
    ((2, 4, 8, 8), (0, 1, 3, 2), (4, 4, 3, 3), 1, False),   # transposed H/W: not channels-last
])
def test_convolution_propagates_the_cpu_kernels_layout(x_shape, permute, weight_shape, groups,
                                                        channels_last_weight) -> None:
    """Shape propagation of a convolution writes its result in the layout CPU's kernel does
    (channels-last for a channels-last input or weight), where the meta kernel writes it
    contiguous: a later flatten is then a copy on CPU and must be one in the prediction."""
    from costmodel.plugins.conv import in_cpu_layout

    x = torch.randn(x_shape)
    x = x.permute(permute) if permute else x
    weight = torch.randn(weight_shape)
    if channels_last_weight:
        weight = weight.to(memory_format=torch.channels_last)
    cpu = F.conv2d(x, weight, groups=groups, padding=1)
    meta_x, meta_w = x.to("meta"), weight.to("meta")
    assert in_cpu_layout(F.conv2d(meta_x, meta_w, groups=groups, padding=1), meta_x, meta_w).stride() == cpu.stride()
