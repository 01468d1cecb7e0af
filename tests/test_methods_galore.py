"""The GaLore method plugin and the GaLoreAdamW optimizer plugin against galore-torch 1.0 run for real.

- The plugin's single parameter group lists the reference optimizer's parameters in the order its
  step visits them, with exactly the reference's low-rank set.
- One ``optimizer.step()`` on a small model with every kind of weight (a conv whose matrix is wide,
  one that is tall, a depthwise conv, a Linear, biases, batch norm, the head), measured with the
  runtime reference's tracker and counters: OPT's maximum to the byte and the step's FLOPs in both
  conventions, on the first step, on refresh steps and on steps between refreshes.
- Whole models: the prediction equals the live measurement.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import OptimizerCost
from costmodel.models import build_model
from costmodel.plugins.galore_adamw import galore_step, low_rank_moment_shape, projector_storage_numel
from costmodel.plugins.method_galore import galore_param_group
from costmodel.validation.flops import PhaseFlops
from costmodel.validation.memory import GroupPeakMemTracker
from costmodel.validation.methods import apply_method


class AllKinds(nn.Module):
    """Every shape of weight GaLore meets: (out, in*k*k) wide and tall, depthwise, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(8, 16, 3)  # 16 x 72: left projector (U), moments r x 72
        self.bn = nn.BatchNorm2d(16)
        self.tall = nn.Conv2d(64, 8, 1, bias=False)  # 8 x 64: left
        self.pointwise = nn.Conv2d(12, 48, 1)  # 48 x 12: right projector (Vh), moments 48 x r
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)  # 16 x 9: right
        self.linear = nn.Linear(40, 24)  # 24 x 40: left
        self.fc = nn.Linear(24, 10)  # the head: a plain group


def opt_maximum(cost: OptimizerCost, step: int) -> int:
    """OPT's maximum as the engine replays the events: state first (steps > 1), a snapshot per allocation."""
    current = cost.state_bytes if step > 1 else 0
    maximum = current
    for event in cost.events:
        current += event.nbytes
        if event.nbytes > 0:
            maximum = max(maximum, current)
    assert current == cost.state_bytes  # every temporary is freed, the state persists
    return maximum


def measure_step(rank: int, gap: int, step: int) -> tuple[int, dict[str, int]]:
    torch.manual_seed(0)
    model = AllKinds()
    optimizer = apply_method(model, "galore", rank=rank, update_proj_gap=gap).optimizer

    def new_gradients() -> None:
        for p in model.parameters():
            p.grad = torch.randn_like(p)

    for _ in range(step - 1):
        new_gradients()
        optimizer.step()
    new_gradients()
    tracker = GroupPeakMemTracker()
    tracker.track_external(model, optimizer)
    flops = PhaseFlops()
    with tracker, flops.phase("optimizer"):
        optimizer.step()
    return tracker.memory()["OPT"], {c: flops.counts[c].get("optimizer", 0) for c in flops.conventions}


def predict_step(rank: int, gap: int, step: int) -> tuple[int, dict[str, int]]:
    config = StepConfig(method="galore", rank=rank, options={"update_proj_gap": gap})
    group = galore_param_group(AllKinds().to("meta"), config)
    cost = galore_step(group.params, group.options["low_rank"], step)
    return opt_maximum(cost, step), {"torch": cost.flops.torch, "exact": cost.flops.exact}


def test_the_group_is_the_reference_optimizer_in_visiting_order() -> None:
    for name in ("mobilenet_v3_small", "resnet18"):
        reference = apply_method(build_model(name, device="meta"), "galore", rank=4)
        names = {id(p): n for n, p in reference.model.named_parameters()}
        visited = [names[id(p)] for g in reference.optimizer.param_groups for p in g["params"]]
        group = galore_param_group(build_model(name, device="meta"), StepConfig(model=name, method="galore"))
        assert [p.name for p in group.params] == visited
        assert sorted(group.options["low_rank"]) == sorted(reference.details["low_rank"])
        assert all(p.trainable for p in group.params)


@pytest.mark.parametrize("rank,gap,step", [
    (rank, gap, step) for rank, (gap, step) in itertools.product(
        (1, 4, 64),  # 64 exceeds every min(m, n) here: the projector keeps the whole factor
        ((1, 1), (1, 2), (200, 2), (2, 3)))])  # first step; a refresh, no refresh, a refresh after one
def test_one_optimizer_step_equals_galore_torch(rank: int, gap: int, step: int) -> None:
    assert predict_step(rank, gap, step) == measure_step(rank, gap, step)


def test_projected_shapes() -> None:
    assert low_rank_moment_shape((16, 8, 3, 3), 4) == (4, 72)  # wide: left, r x n
    assert low_rank_moment_shape((48, 12, 1, 1), 4) == (48, 4)  # tall: right, m x r
    assert low_rank_moment_shape((16, 1, 3, 3), 64) == (16, 9)  # the rank is capped at min(m, n)
    assert projector_storage_numel((48, 12, 1, 1), 4) == 12 * 12  # the projector keeps all of Vh
    assert projector_storage_numel((16, 8, 3, 3), 4) == 16 * 16  # ... or all of U


# ---------------------------------------------------------------------------------------------
# Whole models: the prediction against the live measurement

FAST = [("mobilenet_v2", 4, 2, 200),  # a step between refreshes
        ("resnet18", 1, 2, 1),  # T = 1: an SVD on every step
        ("mobilenet_v2", 1, 1, 200)]  # the first step: state and projectors created
FULL = [(model_name, rank, step, gap) for model_name, rank, step, gap in itertools.product(
    ("mobilenet_v2", "resnet18"), (1, 4), (1, 2), (200, 1)) if (model_name, rank, step, gap) not in FAST]


@pytest.mark.parametrize("model_name,rank,step,gap", FAST)
def test_prediction_equals_measurement(model_name: str, rank: int, step: int, gap: int) -> None:
    from engine_live import assert_matches

    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    config = StepConfig(model=model_name, method="galore", rank=rank, batch=8, resolution=32, step=step,
                        options={"update_proj_gap": gap})
    predicted, measured = predict_config(config), measure(config, fake=True)
    assert_matches(predicted, measured)
    assert predicted.trainable_params == measured.trainable_params == measured.total_params


@pytest.mark.slow
@pytest.mark.parametrize("model_name,rank,step,gap", FULL)
def test_prediction_equals_measurement_full(model_name: str, rank: int, step: int, gap: int) -> None:
    test_prediction_equals_measurement(model_name, rank, step, gap)
