"""The engine's shortcuts change no number: each is held against the path it short-cuts."""

from __future__ import annotations

import pytest
from torch import fx

from costmodel import trace
from costmodel.config import StepConfig
from costmodel.registry import default_plugin_manager


def _by_name(releases: dict[fx.Node, fx.Node | None]) -> dict[str, str | None]:
    return {node.name: (after.name if after is not None else None) for node, after in releases.items()}


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_parameter_lookup_traces_what_stock_fx_traces(method, monkeypatch):
    """StepTracer finds a parameter's name in a dict; fx's own getattr walks named_parameters()."""
    config = StepConfig(model="resnet18", method=method, rank=3)
    fast = trace.trace_config(config, default_plugin_manager())
    monkeypatch.setattr(trace.StepTracer, "getattr", fx.Tracer.getattr)
    stock = trace.trace_config(config, default_plugin_manager())
    assert fast.graph_module.code == stock.graph_module.code
    assert [n.target for n in fast.graph.nodes] == [n.target for n in stock.graph.nodes]
    assert _by_name(fast.local_releases) == _by_name(stock.local_releases)
    assert [(c.qualname, [a.name for a in c.arguments], c.last_node.name) for c in fast.module_calls] == \
        [(c.qualname, [a.name for a in c.arguments], c.last_node.name) for c in stock.module_calls]
