"""The plugin registry: entry points, registration order (third parties override built-ins),
start-up validation, and broken plugins named in the error."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

from costmodel import registry
from costmodel.config import StepConfig
from costmodel.costs import Flops, OpCost
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.prediction import predict_config

BUILTINS = {"adamw", "sgd", "method_fft", "method_bn_head", "conv", "linear", "batchnorm", "elementwise",
            "pooling", "shape", "dropout", "loss"}


def test_builtins_come_through_the_entry_point_group():
    names = {name for name, _ in registry.default_plugin_manager().list_name_plugin()}
    assert BUILTINS <= names
    assert {"fft", "bn_head"} <= set(registry.method_names(registry.default_plugin_manager()))


def _fake_distribution_plugin(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, dist: str = "thirdparty"):
    """Make ``module`` appear as entry point ``module.__name__`` of distribution ``dist``."""
    monkeypatch.setitem(sys.modules, module.__name__, module)
    distribution = types.SimpleNamespace(name=dist)
    entry = importlib.metadata.EntryPoint(module.__name__, module.__name__, registry.ENTRY_POINT_GROUP)
    entry = types.SimpleNamespace(name=entry.name, value=entry.value, dist=distribution, load=entry.load)
    real = registry._discover
    # Listed first: the registry must still register it after the built-ins.
    monkeypatch.setattr(registry, "_discover", lambda: [entry, *real()])


def test_a_third_party_plugin_is_asked_before_the_builtins(monkeypatch):
    module = types.ModuleType("aaa_thirdparty_conv")

    @hookimpl
    def costmodel_op_cost(node):
        if node.kind == "call_module" and node.target.__name__ == "Conv2d":
            return OpCost(forward=Flops.both(1))
        return None

    module.costmodel_op_cost = costmodel_op_cost
    _fake_distribution_plugin(monkeypatch, module)
    manager = registry.create_plugin_manager()
    assert [name for name, _ in manager.list_name_plugin()][-1] == "aaa_thirdparty_conv"
    prediction = predict_config(StepConfig(model="resnet18", batch=2, resolution=32), manager=manager)
    conv_nodes = [n for n in prediction.nodes if n.op.endswith("Conv2d")]
    assert conv_nodes and all(n.forward == Flops.both(1) for n in conv_nodes)


def test_a_plugin_that_fails_to_import_is_named(monkeypatch):
    module = types.ModuleType("broken_plugin")
    _fake_distribution_plugin(monkeypatch, module)
    discover = registry._discover

    def load():
        raise ImportError("no module x")

    def failing():
        return [types.SimpleNamespace(name=e.name, value="broken_plugin:nothing", dist=e.dist, load=load)
                if e.name == "broken_plugin" else e for e in discover()]

    monkeypatch.setattr(registry, "_discover", failing)
    with pytest.raises(CostModelError, match="broken_plugin.*failed to load.*no module x"):
        registry.create_plugin_manager()


def test_a_misspelt_hook_is_caught_at_start_up():
    module = types.ModuleType("typo_plugin")

    @hookimpl
    def costmodel_op_costs(node):  # one letter too many
        return None

    module.costmodel_op_costs = costmodel_op_costs
    with pytest.raises(CostModelError, match="typo_plugin"):
        registry.create_plugin_manager([module])


def test_a_hook_with_a_wrong_argument_is_caught_at_registration():
    module = types.ModuleType("bad_signature_plugin")

    @hookimpl
    def costmodel_op_cost(node, config):  # the op hook takes the node alone: config is refused
        return None

    module.costmodel_op_cost = costmodel_op_cost
    with pytest.raises(CostModelError, match="bad_signature_plugin"):
        registry.create_plugin_manager([module])
