"""The model helpers the engine and the reference share: the classification head, found by
structure."""

from __future__ import annotations

import pytest
from torch import nn

from costmodel.errors import CostModelError
from costmodel.models import available_models, head_name, meta_model

# What torchvision's authors call the head of their classifiers.
NAMED_HEADS = ("fc", "classifier", "heads", "head")


# One model per torchvision family (their heads: fc, classifier, heads, head).
FAMILIES = ("resnet18", "mobilenet_v3_small", "vit_b_32", "swin_t", "maxvit_t", "googlenet", "inception_v3",
            "densenet121", "squeezenet1_0", "regnet_x_400mf", "shufflenet_v2_x0_5", "convnext_tiny")


def _check_heads(names) -> None:
    for name in names:
        model = meta_model(name)
        children = [n for n, _ in model.named_children()]
        # The first child so named, as the reference always took it.
        assert head_name(model) == next(n for n in NAMED_HEADS if n in children), name


def test_a_torchvision_classifiers_head_is_the_child_its_authors_named_so():
    _check_heads(FAMILIES)


@pytest.mark.slow
def test_every_torchvision_classifiers_head_is_the_child_its_authors_named_so():
    assert len(available_models()) == 80
    _check_heads(available_models())


def test_a_model_of_ones_own_has_a_head_by_structure():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 10),
                          nn.Softmax(dim=1))
    assert head_name(model) == "3"


def test_a_model_without_parameters_has_no_head():
    with pytest.raises(CostModelError, match="no child module holds parameters"):
        head_name(nn.Sequential(nn.ReLU()))
