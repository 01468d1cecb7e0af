"""A broken third-party plugin - one that raises, answers with the wrong type or with negative
counts, or declares a hook wrongly - is a one-line ``CostModelError`` naming the plugin, the hook
and what was asked (``costmodel.plugin_calls``); the CLI prints that line and exits 2."""

from __future__ import annotations

import types

import numpy as np
import pytest
from torch import nn

from costmodel import cli, registry
from costmodel.config import StepConfig
from costmodel.costs import Alloc, Flops, OpCost
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plugin_calls import PluginFailure, check_op_cost
from costmodel.plugins import adamw
from costmodel.plugins.conv import conv_module
from costmodel.prediction import predict_config
from costmodel.ranks import predict_ranks

# Small and quick to trace; its first node is the stem convolution.
CONFIG = StepConfig(model="resnet18", batch=2, resolution=64)
CONV = "torch.nn.modules.conv.Conv2d"


def _plugin(name: str, **hooks: object) -> types.ModuleType:
    """A plugin module called ``name`` implementing ``hooks`` (each already marked ``@hookimpl``)."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, function)
    return module


def _conv_plugin(name: str, answer) -> types.ModuleType:
    """An op plugin that answers ``answer(node)`` for every Conv2d and nothing else."""
    @hookimpl
    def costmodel_op_cost(node):
        if node.kind == "call_module" and node.target is nn.Conv2d:
            return answer(node)
        return None

    return _plugin(name, costmodel_op_cost=costmodel_op_cost)


def _failure(manager, config: StepConfig = CONFIG) -> str:
    with pytest.raises(CostModelError) as caught:
        predict_config(config, manager=manager)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _assert_names(message: str, plugin: str, hook: str, *subject: str) -> None:
    assert f"plugin {plugin!r}" in message, message
    assert hook in message, message
    for part in subject:
        assert part in message, message


def test_a_hook_that_raises_is_named_with_its_node():
    manager = registry.create_plugin_manager([_conv_plugin("dividing_plugin", lambda node: 1 // 0)])
    message = _failure(manager)
    _assert_names(message, "dividing_plugin", "costmodel_op_cost", "node 'model_conv1'", CONV,
                  "ZeroDivisionError: integer division or modulo by zero")


def test_an_op_hook_answering_an_int_is_named():
    manager = registry.create_plugin_manager([_conv_plugin("int_plugin", lambda node: 42)])
    message = _failure(manager)
    _assert_names(message, "int_plugin", "costmodel_op_cost", "node 'model_conv1'", CONV, "42", "not OpCost")


def test_negative_flops_are_refused():
    manager = registry.create_plugin_manager([_conv_plugin("negative_flops", lambda node: OpCost(Flops(-5, 3)))])
    message = _failure(manager)
    _assert_names(message, "negative_flops", "costmodel_op_cost", "node 'model_conv1'", CONV,
                  "OpCost.forward.torch is -5", "not a non-negative integer")


def test_negative_bytes_are_refused():
    def answer(node):
        return OpCost(Flops.both(1), forward_allocs=(Alloc(-64, "output"),))

    manager = registry.create_plugin_manager([_conv_plugin("negative_bytes", answer)])
    message = _failure(manager)
    _assert_names(message, "negative_bytes", "costmodel_op_cost", "node 'model_conv1'", CONV,
                  "OpCost.forward_allocs[0].nbytes is -64")


def test_an_optimizer_hook_answering_a_string_is_named_with_its_group():
    @hookimpl
    def costmodel_optimizer_cost(group, step, config):
        return "cheap"

    manager = registry.create_plugin_manager([_plugin("string_optimizer", costmodel_optimizer_cost=costmodel_optimizer_cost)])
    message = _failure(manager)
    _assert_names(message, "string_optimizer", "costmodel_optimizer_cost", "'adamw' parameter group",
                  "method 'fft'", "'cheap'", "not OptimizerCost")


def test_prepare_method_answering_a_list_is_named_with_the_method():
    @hookimpl
    def costmodel_prepare_method(name, model, config):
        return [] if name == "fft" else None

    manager = registry.create_plugin_manager([_plugin("list_method", costmodel_prepare_method=costmodel_prepare_method)])
    message = _failure(manager)
    _assert_names(message, "list_method", "costmodel_prepare_method", "method 'fft'", "not PreparedMethod")


def test_method_names_answering_a_string_is_named():
    @hookimpl
    def costmodel_method_names():
        return "dora_x"

    manager = registry.create_plugin_manager([_plugin("string_names", costmodel_method_names=costmodel_method_names)])
    with pytest.raises(CostModelError) as caught:
        registry.method_names(manager)
    message = str(caught.value)
    assert "\n" not in message
    _assert_names(message, "string_names", "costmodel_method_names", "the method listing", "'dora_x'",
                  "not a tuple or list")
    # An unknown method lists the methods: the same check applies there.
    with pytest.raises(CostModelError, match="string_names"):
        predict_config(CONFIG.replace(method="nonesuch"), manager=manager)


def test_a_hook_with_a_wrong_argument_name_is_one_line():
    @hookimpl
    def costmodel_op_cost(node, settings):
        return None

    with pytest.raises(CostModelError) as caught:
        registry.create_plugin_manager([_plugin("misnamed_argument", costmodel_op_cost=costmodel_op_cost)])
    message = str(caught.value)
    assert "\n" not in message
    _assert_names(message, "misnamed_argument", "costmodel_op_cost", "settings")


def test_the_cli_prints_one_line_and_exits_2(monkeypatch, capsys):
    manager = registry.create_plugin_manager([_conv_plugin("dividing_plugin", lambda node: 1 // 0)])
    monkeypatch.setattr("costmodel.prediction.default_plugin_manager", lambda: manager)
    status = cli.main(["predict", "--model", "resnet18", "--batch", "2", "--resolution", "64"])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("costmodel: error: plugin 'dividing_plugin'")
    assert "internal error" not in err


def test_a_plugins_own_cost_model_error_passes_unchanged():
    def refuse(node):
        raise CostModelError("conv1 cannot take this")

    manager = registry.create_plugin_manager([_conv_plugin("refusing_plugin", refuse)])
    with pytest.raises(CostModelError, match="^conv1 cannot take this$") as caught:
        predict_config(CONFIG, manager=manager)
    assert not isinstance(caught.value, PluginFailure)


def test_later_registered_plugins_are_asked_first_and_named():
    first = _conv_plugin("first_registered", lambda node: -1)
    second = _conv_plugin("second_registered", lambda node: 1 // 0)
    message = _failure(registry.create_plugin_manager([first, second]))
    _assert_names(message, "second_registered", "costmodel_op_cost", "ZeroDivisionError")


def test_tryfirst_and_trylast_are_respected():
    @hookimpl(tryfirst=True)
    def eager(node):
        return 1 // 0 if node.kind == "call_module" and node.target is nn.Conv2d else None

    @hookimpl(trylast=True)
    def late(node):
        return -1

    manager = registry.create_plugin_manager([_plugin("eager", costmodel_op_cost=eager),
                                              _plugin("late", costmodel_op_cost=late)])
    _assert_names(_failure(manager), "eager", "costmodel_op_cost", "ZeroDivisionError")


def test_counts_over_many_ranks_may_be_integer_arrays():
    check_op_cost(OpCost(Flops(np.array([1, 2]), 3), forward_allocs=(Alloc(np.array([0, 8], dtype=np.int64), "output"),),
                         input_grads=(None, np.array([4, 4]))))
    with pytest.raises(Exception, match=r"forward.exact"):
        check_op_cost(OpCost(Flops(1, np.array([1, -2]))))
    with pytest.raises(Exception, match=r"forward.torch"):
        check_op_cost(OpCost(Flops(np.array([1.5, 2.0]), 1)))


# -- many ranks together (costmodel.ranks): a plugin that raises on arrays of sizes is asked rank
# by rank; only a failure at a plain rank is reported, per rank.

def test_an_optimizer_that_branches_on_a_size_is_still_asked_rank_by_rank():
    class BranchingAdamW:
        @hookimpl(tryfirst=True)
        def costmodel_optimizer_cost(self, group, step, config):
            if group.params[0].numel > 0:  # raises on an array of sizes
                return adamw.costmodel_optimizer_cost(group=group, step=step, config=config)
            return None

    manager = registry.create_plugin_manager([BranchingAdamW()])
    config = StepConfig(model="resnet18", method="lora", resolution=64)
    together = predict_ranks(config, [2, 3, 5, 8], manager=manager)
    for rank, prediction in together.items():
        alone = predict_config(config.replace(rank=rank), manager=manager)
        assert (prediction.flops, prediction.memory) == (alone.flops, alone.memory), f"rank {rank}"
        assert "batched" in prediction.details, f"rank {rank}: {prediction.details}"  # still predicted together


def test_a_plugin_that_fails_at_a_plain_rank_is_reported_for_each_rank():
    def answer(node):
        if node.module.out_channels > 0:  # a plain rank passes this; arrays never reach here
            raise RuntimeError("not today")
        return conv_module(node)

    manager = registry.create_plugin_manager([_conv_plugin("grumpy_conv", answer)])
    found = predict_ranks(StepConfig(model="resnet18", method="lora", resolution=64), [2, 3, 5], manager=manager)
    for rank, result in found.items():
        assert isinstance(result, PluginFailure), (rank, result)
        _assert_names(str(result), "grumpy_conv", "costmodel_op_cost", CONV, "RuntimeError: not today")


def test_with_a_hook_wrapper_pluggy_runs_the_call_and_every_implementer_is_named():
    # A wrapper runs around the other implementations and cannot be run alone: pluggy makes the
    # call, and the failure names every plugin that may have caused it.
    @hookimpl(wrapper=True)
    def costmodel_op_cost(node):
        return (yield)

    manager = registry.create_plugin_manager([_plugin("wrapping_plugin", costmodel_op_cost=costmodel_op_cost),
                                              _conv_plugin("int_plugin", lambda node: 42)])
    message = _failure(manager)
    assert message.startswith("one of the plugins 'wrapping_plugin', 'int_plugin', "), message
    assert "costmodel_op_cost for node 'model_conv1'" in message and "42 (int), not OpCost" in message, message
