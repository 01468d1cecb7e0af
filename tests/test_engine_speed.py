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


# -- configurations that prepare the same structure share one trace

from costmodel.prediction import clear_cache, predict_config, traced_step  # noqa: E402


def _fields(prediction) -> dict:
    """Every field of a prediction but its wall-clock time."""
    details = dict(prediction.details)
    return {"flops": prediction.flops, "memory": prediction.memory, "trainable": prediction.trainable_params,
            "total": prediction.total_params, "config": prediction.config, "details": details}


def fresh(config: StepConfig):
    clear_cache()
    try:
        return predict_config(config)
    finally:
        clear_cache()


@pytest.mark.parametrize("options", [{}, {"rank_pattern": {"layer4.1.conv2": 7}}])
def test_galore_ranks_share_one_trace_and_predict_what_a_fresh_trace_does(options):
    ranks = (1, 5, 64, 700)  # 700: more than any layer's channels (the projector keeps them all)
    expected = {r: _fields(fresh(StepConfig(model="resnet18", method="galore", rank=r, options=options)))
                for r in ranks}
    clear_cache()
    manager = default_plugin_manager()
    traces = set()
    for r in ranks:
        config = StepConfig(model="resnet18", method="galore", rank=r, options=options)
        assert _fields(predict_config(config)) == expected[r]
        traces.add(id(traced_step(config, manager).graph_module))
    assert len(traces) == 1


def test_ranks_that_change_the_model_do_not_share_a_trace():
    manager = default_plugin_manager()
    clear_cache()
    one, two = (traced_step(StepConfig(model="resnet18", method="lora", rank=r), manager) for r in (2, 3))
    assert one.graph_module is not two.graph_module
    assert _fields(predict_config(StepConfig(model="resnet18", method="lora", rank=3))) == \
        _fields(fresh(StepConfig(model="resnet18", method="lora", rank=3)))


def test_structure_key_tells_apart_what_tracing_sees():
    from torch import nn

    from costmodel.costs import PreparedMethod

    def key(model):
        return trace.structure_key(model, PreparedMethod([]))

    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert key(base) == key(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert key(base) != key(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()))
    assert key(base) != key(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()))
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    frozen[0].weight.requires_grad_(False)
    assert key(base) != key(frozen)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    odd[1].hook = lambda x: x  # an object without a value-like repr: never matched to another
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    other[1].hook = lambda x: x
    assert key(odd) != key(other)
