"""Many ranks predicted together (``costmodel.ranks``) give, rank for rank, what a prediction of
that rank alone gives; and where the shortcut's conditions fail, it steps aside."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import ParamGroup, PreparedMethod, differ, smaller
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.memory import MixedSizes, is_positive, is_zero
from costmodel.plugins.method_fft import trainable_metas
from costmodel.prediction import predict_config
from costmodel.ranks import Affine, _NotShared, predict_many, predict_ranks
from costmodel.registry import create_plugin_manager
from costmodel.validation.measure import measure

from engine_live import assert_matches


def _fields(prediction) -> dict:
    """Every field of a prediction but its wall-clock time and whether it was predicted together:
    the numbers, and the details (per-node breakdown, timeline, coverage, the method's and the
    optimizer's notes)."""
    return {"flops": prediction.flops, "memory": prediction.memory, "trainable": prediction.trainable_params,
            "total": prediction.total_params, "config": prediction.config,
            "nodes": [n.as_dict() for n in prediction.nodes], "timeline": [s.as_dict() for s in prediction.timeline],
            "coverage": prediction.coverage, "method": prediction.details["method"],
            "optimizer": prediction.details["optimizer"]}


def _batched(prediction) -> bool:
    return "batched" in prediction.details


def assert_same_as_one_by_one(config: StepConfig, ranks, manager=None, *, batched: bool = True) -> dict:
    together = predict_ranks(config, ranks, manager=manager)
    assert list(together) == list(dict.fromkeys(ranks))
    for rank, prediction in together.items():
        alone = predict_config(config.replace(rank=rank), manager=manager)
        assert _fields(prediction) == _fields(alone), f"rank {rank}"
        assert _batched(prediction) == batched, f"rank {rank}: {prediction.details}"
    return together


@pytest.mark.parametrize("method", ["lora", "dora", "galore"])
def test_resnet18_ranks_together_equal_each_rank_alone(method):
    assert_same_as_one_by_one(StepConfig(model="resnet18", method=method), [1, 2, 3, 5, 8, 13])


def test_depthwise_model_with_linear_adapters_dora_together_equal_each_rank_alone():
    """MobileNetV3: depthwise and squeeze-excitation convolutions, and (adapt_head) DoRA on the
    classifier's Linear layers, whose mirror runs ``eye`` and two matmuls."""
    config = StepConfig(model="mobilenet_v3_small", method="dora", batch=2, resolution=64,
                        options={"adapt_head": True})
    assert_same_as_one_by_one(config, [1, 2, 4, 7, 16])


def test_ranks_together_equal_a_live_measurement():
    config = StepConfig(model="resnet18", method="lora", resolution=64)
    together = predict_ranks(config, [1, 3, 6, 9])
    assert all(_batched(p) for p in together.values())
    assert_matches(together[6], measure(config.replace(rank=6), fake=True))


def test_a_scaling_that_changes_with_the_rank_is_predicted_rank_by_rank():
    """alpha fixed: LoRA's scaling alpha / rank is a number baked into the traced graph, so the
    ranks do not share one graph: the LoRA plugin makes no promise."""
    assert_same_as_one_by_one(StepConfig(model="resnet18", method="lora", options={"alpha": 16.0}, resolution=64),
                              [2, 3, 4, 5], batched=False)


def test_a_rank_the_method_refuses_is_reported_with_its_reason():
    """A grouped convolution takes a rank only if it is a multiple of its groups (peft)."""
    config = StepConfig(model="mobilenet_v2", method="lora", resolution=64,
                        options={"target_modules": ["features.2.conv.1.0"]})  # depthwise, groups=144
    together = predict_ranks(config, [144, 1, 288, 5])
    assert isinstance(together[1], CostModelError) and "multiple of groups" in str(together[1])
    assert isinstance(together[5], CostModelError)
    assert _fields(together[288]) == _fields(predict_config(config.replace(rank=288)))


class _BranchingConv:
    """An op plugin that branches on a size (a plain ``if``): it cannot answer for many ranks at
    once, so the engine asks it rank by rank; the numbers must not change."""

    @hookimpl
    def costmodel_op_cost(self, node):
        if node.kind == "call_module" and isinstance(node.module, nn.Conv2d) and node.module.out_channels < 10:
            from costmodel.plugins.conv import conv_module

            cost = conv_module(node)
            if cost is not None and node.outputs[0].shape[1] > 4:  # raises on an array of sizes
                cost.note += " (wide)"
            return cost
        return None


def test_a_plugin_that_branches_on_a_size_is_asked_rank_by_rank():
    manager = create_plugin_manager([_BranchingConv()])
    assert_same_as_one_by_one(StepConfig(model="resnet18", method="lora", resolution=64), [1, 2, 5, 9, 12],
                              manager)


class _SquareAdapter(nn.Module):
    """A toy adapter whose width is rank**2: not affine in the rank."""

    def __init__(self, base: nn.Linear, width: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, width, bias=False, device=base.weight.device)
        self.up = nn.Linear(width, base.out_features, bias=False, device=base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class _SquareMethod:
    """Promises sizes affine in the rank but breaks the promise: the probes must catch it."""

    @hookimpl
    def costmodel_method_names(self):
        return ["square"]

    @hookimpl
    def costmodel_prepare_method(self, name, model, config):
        if name != "square":
            return None
        for param in model.parameters():
            param.requires_grad_(False)
        model.fc = _SquareAdapter(model.fc, config.rank ** 2)
        return PreparedMethod([ParamGroup("adamw", trainable_metas(model), {"lr": config.lr})], affine_in_rank=True)


def test_a_broken_affine_promise_is_caught_and_each_rank_predicted_alone():
    manager = create_plugin_manager([_SquareMethod()])
    assert_same_as_one_by_one(StepConfig(model="resnet18", method="square", resolution=64), [1, 2, 3, 4, 6],
                              manager, batched=False)


def test_the_affine_sizes_of_the_probes():
    line = Affine.through([(4, 9), (2, 5), (16, 33)])  # 2r + 1
    assert line is not None and line.at(10) == 21
    assert Affine.through([(4, 16), (2, 4), (8, 64)]) is None  # r**2
    half = Affine.through([(4, 2), (2, 1), (8, 4)])  # r / 2
    assert half is not None and half.at(6) == 3
    with pytest.raises(_NotShared):
        half.at(5)


def test_size_helpers_work_on_ints_and_arrays_of_ranks():
    ranks = np.array([1, 5, 9])
    assert smaller(3, 7) == 3 and smaller(7, 3) == 3
    assert smaller(ranks, 6).tolist() == [1, 5, 6]
    assert differ(ranks, np.array([1, 5, 9])) is False and differ(ranks, 5) is True and differ(2, 3) is True
    assert is_zero(np.zeros(3, dtype=np.int64)) and not is_zero(ranks) and is_positive(ranks)
    with pytest.raises(MixedSizes):
        is_zero(ranks - 1)
    with pytest.raises(MixedSizes):
        is_positive(ranks - 5)


def test_two_ranks_are_predicted_together_with_probes_beyond_them():
    """Fewer than three ranks >= 2 asked for: the method is prepared at the next ranks up too, only
    to check that its sizes are affine in the rank."""
    config = StepConfig(model="resnet18", method="lora", resolution=64)
    assert_same_as_one_by_one(config, [1, 2])


# -- many configurations at once: batch, resolution and rank, one mechanism

def assert_points_same_as_one_by_one(config: StepConfig, points) -> dict:
    together = predict_many(config, points)
    assert list(together) == list(dict.fromkeys(points))
    for (batch, resolution, rank), prediction in together.items():
        alone = predict_config(config.replace(batch=batch, resolution=resolution, rank=rank))
        assert _fields(prediction) == _fields(alone), (batch, resolution, rank)
    return together


@pytest.mark.parametrize("model, method", [("resnet18", "lora"), ("mobilenet_v3_small", "fft")])
def test_a_grid_of_batch_resolution_and_rank_together_equals_each_alone(model, method):
    """One symbolic run over (batch, resolution, rank) for the whole graph: each point's numbers
    and details equal its own prediction (a batch of 1 and rank 1 get templates of their own)."""
    points = [(b, r, k) for b in (1, 3) for r in (64, 96) for k in (1, 5)]
    together = assert_points_same_as_one_by_one(StepConfig(model=model, method=method), points)
    # A batch of 1 may alias differently (a view where a larger batch copies): predicted alone
    # there if so; every other point together.
    assert all(_batched(p) for (b, _, _), p in together.items() if b > 1)


def test_a_grid_equals_a_live_measurement():
    config = StepConfig(model="resnet18", method="dora")
    together = predict_many(config, [(2, 64, 3), (3, 96, 5)])
    for (batch, resolution, rank), prediction in together.items():
        assert _batched(prediction)
        assert_matches(prediction, measure(config.replace(batch=batch, resolution=resolution, rank=rank), fake=True))


def test_a_sweep_in_two_processes_equals_one_in_this_process():
    from costmodel import sweep
    from costmodel.sweep import cost_metrics

    base = StepConfig(resolution=64)
    args = (["resnet18"], ["lora", "galore"], (1, 2, 3, 4), sweep.default_predictor(), base)
    here = sweep.sweep(*args, progress=False, workers=1)
    forked = sweep.sweep(*args, progress=False, workers=2)
    for a, b in zip(here.series, forked.series):
        assert (a.model, a.method, a.ranks) == (b.model, b.method, b.ranks)
        assert [cost_metrics(c) for c in a.costs] == [cost_metrics(c) for c in b.costs]
        assert all(_batched(c) for c in b.costs)
        assert {m: (law.slope, law.intercept, law.shape) for m, law in a.laws.items()} == \
            {m: (law.slope, law.intercept, law.shape) for m, law in b.laws.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18"])
@pytest.mark.parametrize("method", ["lora", "dora", "galore"])
def test_the_paper_sweep_together_equals_each_rank_alone(model, method):
    """The issue's sweep, ranks 1-64 at the paper's 224x224, batch 1: every rank batched, and equal."""
    assert_same_as_one_by_one(StepConfig(model=model, method=method), range(1, 65))


def test_plan_on_the_engine_in_two_processes_lists_what_each_prediction_says():
    from costmodel import sweep
    from costmodel.plan import Budget, plan

    base = StepConfig(model="resnet18", resolution=64)
    result = plan(base, Budget(memory=10**12), sweep.default_predictor(), (1, 2, 3, 4), ["fft", "lora", "dora"],
                  progress=False, workers=2)
    by_label = {(c.method, c.rank): c for c in result.fitting}
    assert ("fft", None) in by_label and not result.excluded  # FFT ignores the rank: one candidate
    for method, rank in (("lora", 1), ("lora", 4), ("dora", 3)):
        alone = predict_config(base.replace(method=method, rank=rank))
        assert _fields(by_label[(method, rank)].cost) == _fields(alone)
