"""Shape templates: one symbolic propagation per structure, evaluated per batch and resolution, must
give exactly what a concrete propagation gives wherever its guards accept the shape."""

from __future__ import annotations

from costmodel.config import StepConfig
from costmodel.costs import PreparedMethod
from costmodel.prediction import predict_config, traced_step
from costmodel.registry import default_plugin_manager
from costmodel.shapes import TEMPLATE_AFTER, ShapeTemplate, concrete, shape_facts
from costmodel.trace import meta_copy, trace_model
from test_engine_memory import TinyNet

SHAPES = [(2, 64), (4, 96), (3, 100), (16, 224), (5, 33), (8, 32), (2, 31), (1, 224), (1, 97)]


def check_template(traced, batch, resolution):
    template = ShapeTemplate.build(traced, batch, resolution)
    assert template is not None and template.applies(batch, resolution)
    accepted = []
    for b, r in SHAPES:
        if template.applies(b, r):
            assert template.evaluate(b, r) == concrete(traced, b, r), (b, r)
            accepted.append((b, r))
    return accepted


def test_resnet_templates_equal_concrete_propagation_in_their_regimes():
    traced = traced_step(StepConfig(model="resnet18"), default_plugin_manager())
    # Larger batches with a last stage larger than 1x1 (resolution >= 33) share one template...
    assert check_template(traced, 4, 96) == [(2, 64), (4, 96), (3, 100), (16, 224), (5, 33)]
    # ... a 1x1 last stage is another regime, and batch 1 (a specialised size) a third.
    assert check_template(traced, 8, 32) == [(8, 32), (2, 31)]
    assert check_template(traced, 1, 224) == [(1, 224), (1, 97)]


def test_a_custom_model_template_equals_concrete_propagation():
    traced = trace_model(meta_copy(TinyNet()), PreparedMethod([]))
    assert (3, 100) in check_template(traced, 2, 64)


def test_predictions_switch_to_a_template_after_a_few_shapes():
    config = StepConfig(model="resnet18", method="bn_head")
    traced = traced_step(config, default_plugin_manager())
    traced.shape_cache.clear()
    traced.shape_templates.clear()
    traced.concrete_shapes = traced.template_attempts = 0
    shapes = [(2, 40 + 8 * i) for i in range(TEMPLATE_AFTER + 2)]
    for b, r in shapes:
        predict_config(config.replace(batch=b, resolution=r))
    assert traced.concrete_shapes == TEMPLATE_AFTER and len(traced.shape_templates) == 1
    for b, r in shapes[TEMPLATE_AFTER:]:  # served by the template, equal to what propagation gives
        assert traced.shape_templates[0].applies(b, r)
        assert shape_facts(traced, b, r) == concrete(traced, b, r)
