"""The engine's design rules, checked: no module imports another's private names, a prediction
never changes the cached objects it shares, and nothing switches process-wide state."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import pytest

from costmodel.config import StepConfig
from costmodel.prediction import traced_step
from costmodel.ranks import predict_ranks
from costmodel.registry import default_plugin_manager
from costmodel.trace import altered_copy, state_key, structure_key

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("costmodel", "plugins", "validation", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py"))


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("costmodel"):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                      for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names():
    assert SOURCES
    assert [hit for path in SOURCES for hit in _private_imports(path)] == []


def _fingerprint(model) -> tuple:
    """Every module's attributes (containers aside), parameters and buffers, by identity and value."""
    return tuple((name, type(m), state_key({k: v for k, v in vars(m).items()
                                             if k not in ("_parameters", "_buffers", "_modules")}),
                  tuple((k, id(t)) for k, t in m._parameters.items()), tuple((k, id(t)) for k, t in m._buffers.items()),
                  tuple((k, id(c)) for k, c in m._modules.items()))
                 for name, m in model.named_modules(remove_duplicate=False))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_predicting_many_ranks_leaves_the_cached_model_as_it_was_and_gc_on(method, monkeypatch):
    """Ranks predicted together run and cost the rank-dependent nodes at other sizes through copies
    of their modules (``trace.altered_copy``), never by rewriting the cached, shared traced model,
    and leave Python's garbage collector alone."""
    config = StepConfig(model="resnet18", method=method, resolution=64)
    manager = default_plugin_manager()
    probe = traced_step(config.replace(rank=3), manager)  # the trace predict_ranks probes with
    before = _fingerprint(probe.model), structure_key(probe.model, probe.prepared)

    def refuse() -> None:
        raise AssertionError("gc.disable() called: process-wide state")

    monkeypatch.setattr(gc, "disable", refuse)
    together = predict_ranks(config, [2, 3, 5])
    assert all("batched" in p.details for p in together.values())
    assert [n.as_dict() for n in together[5].nodes]  # the details are there, computed from copies too
    assert (_fingerprint(probe.model), structure_key(probe.model, probe.prepared)) == before
    assert gc.isenabled()


def test_altered_copy_changes_only_the_copy():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Conv2d(1, 4, 1)))
    before = _fingerprint(model)
    weight = nn.Parameter(torch.zeros(8, 1, 1, 1))
    copy = altered_copy(model, {"1.0.weight": weight}, {("1.0", "out_channels"): 8})
    assert copy[1][0].weight is weight and copy[1][0].out_channels == 8
    assert copy[0] is model[0]  # off the path to a change: shared
    assert _fingerprint(model) == before and model[1][0].out_channels == 4
    assert altered_copy(model, {}, {}) is model
