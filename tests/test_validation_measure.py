"""The runtime reference on whole models: real properties of the measured step, fake == real."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import build_model
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, MEMORY_GROUPS, PHASES, StepCost
from costmodel.validation.flops import svd_flop_count
from costmodel.validation.measure import measure
from costmodel.validation.methods import METHODS, low_rank_weights

# Small enough for the default suite; batch 2 because batch norm in training needs more than one
# value per channel and these models end at 1 x 1 at resolution 32.
BATCH, RESOLUTION = 2, 32
MODELS = ("mobilenet_v2", "resnet18")


@lru_cache(maxsize=None)
def measured(model: str, method: str, fake: bool = False, update_proj_gap: int | None = None,
             **changes: int) -> StepCost:
    options = {} if update_proj_gap is None else {"update_proj_gap": update_proj_gap}  # GaLore's T
    return measure(StepConfig(model=model, method=method, batch=BATCH, resolution=RESOLUTION, options=options,
                              **changes), fake=fake)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", MODELS)
def test_measured_step_is_consistent(model: str, method: str) -> None:
    cost = measured(model, method)
    assert set(cost.flops) == set(FLOP_CONVENTIONS) and set(cost.memory) == set(MEMORY_FIELDS)
    for conv in FLOP_CONVENTIONS:
        assert cost.flops[conv]["total"] == sum(cost.flops[conv][phase] for phase in PHASES)
        assert cost.flops[conv]["forward"] > 0
    # the exact convention counts everything the stock one does, plus batch norm, element-wise...
    assert cost.flops["exact"]["forward"] > cost.flops["torch"]["forward"]

    reference = build_model(model)
    parameter_bytes = sum(4 * p.numel() for p in reference.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in reference.buffers())
    adapter_bytes = 4 * (cost.total_params - sum(p.numel() for p in reference.parameters()))
    memory = cost.memory
    assert memory["PARAM"] == parameter_bytes + adapter_bytes == 4 * cost.total_params
    assert memory["BUFFER"] == buffer_bytes
    assert memory["GRAD"] == 4 * cost.trainable_params
    assert memory["OTH"] == 4 * BATCH * 3 * RESOLUTION**2 + 8 * BATCH  # images float32, labels int64
    assert memory["OPT"] >= 8 * cost.trainable_params if method != "galore" else memory["OPT"] > 0
    assert memory["ACT"] > 0 and memory["TEMP"] > 0
    assert memory["sum_of_group_peaks"] == sum(memory[group] for group in MEMORY_GROUPS)
    assert memory["PARAM"] + memory["BUFFER"] + memory["OTH"] < memory["peak"] <= memory["sum_of_group_peaks"]


@pytest.mark.parametrize("model", MODELS)
def test_head_only_is_cheaper_than_full_fine_tuning(model: str) -> None:
    fft, bn_head = measured(model, "fft"), measured(model, "bn_head")
    assert bn_head.memory["ACT"] < fft.memory["ACT"]
    assert bn_head.memory["GRAD"] < fft.memory["GRAD"] and bn_head.memory["OPT"] < fft.memory["OPT"]
    for conv in FLOP_CONVENTIONS:
        assert bn_head.flops[conv]["forward"] == fft.flops[conv]["forward"]
        assert bn_head.flops[conv]["backward"] < fft.flops[conv]["backward"] / 100


def test_backward_forward_ratios() -> None:
    """Stock counting inflates depthwise backward (the paper's ~20:1); exact stays near 2."""
    mobilenet, resnet = measured("mobilenet_v2", "fft").flops, measured("resnet18", "fft").flops
    assert mobilenet["torch"]["backward"] / mobilenet["torch"]["forward"] > 10
    assert 1.5 < mobilenet["exact"]["backward"] / mobilenet["exact"]["forward"] < 2.5
    for conv in FLOP_CONVENTIONS:  # no grouped convolutions: both conventions near 2
        assert 1.5 < resnet[conv]["backward"] / resnet[conv]["forward"] < 2.5


@pytest.mark.parametrize("model, method", [("mobilenet_v2", "dora"), ("resnet18", "galore")])
def test_fake_equals_real(model: str, method: str) -> None:
    real, fake = measured(model, method), measured(model, method, fake=True)
    assert fake.details["fake"] and not real.details["fake"]
    assert fake.flops == real.flops
    assert fake.memory == real.memory
    assert (fake.trainable_params, fake.total_params) == (real.trainable_params, real.total_params)


def test_galore_refresh_step_adds_the_svd() -> None:
    """With T = 1 step 2 refreshes every projector: exactly one thin SVD per low-rank weight more."""
    model, rank = "resnet18", 4
    plain, refresh = measured(model, "galore", fake=True), measured(model, "galore", fake=True, update_proj_gap=1)
    svd = unused_product = 0
    parameters = dict(build_model(model).named_parameters())
    for name in low_rank_weights(build_model(model)):
        shape = parameters[name].shape
        m, n = shape[0], math.prod(shape[1:])
        kept = min(rank, m, n)
        svd += svd_flop_count(m, n, full_matrices=False, compute_uv=True)
        # galore's get_orthogonal_matrix also multiplies the unused factor by diag(S[:r])
        unused_product += 2 * m * kept * kept if m >= n else 2 * kept * kept * n
    assert refresh.flops["exact"]["optimizer"] - plain.flops["exact"]["optimizer"] == svd + unused_product
    assert refresh.flops["torch"]["optimizer"] - plain.flops["torch"]["optimizer"] == unused_product
    assert refresh.flops["exact"]["forward"] == plain.flops["exact"]["forward"]


def test_batch_norm_with_one_value_per_channel_is_bad_input() -> None:
    with pytest.raises(CostModelError, match="more than one value per channel"):
        measure(StepConfig(model="mobilenet_v2", method="bn_head", batch=1, resolution=32), fake=True)


def test_lora_measures_adapters_and_head_as_trainable() -> None:
    lora = measured("resnet18", "lora")
    base = build_model("resnet18")
    adapters = lora.total_params - sum(p.numel() for p in base.parameters())
    assert adapters > 0
    assert lora.trainable_params == adapters + sum(p.numel() for p in base.fc.parameters())


# Method options measured live (B=8, R=32, fake) against the prediction, at the method issue's bars.
OPTION_CASES = {
    "lora-rank-alpha-patterns-exclude": ("resnet18", "lora", 4, 1, {
        "rank_pattern": {"layer4.*": 8, "conv1": 2}, "alpha_pattern": {"layer3.*": 2},
        "exclude_modules": ["downsample.0"]}),
    "dora-adapted-head-regex-targets": ("resnet18", "dora", 4, 2, {  # DoRA on a Linear: eye
        "adapt_head": True, "target_modules": r"layer4\..*conv\d|fc"}),
    "galore-rank-pattern-refresh": ("resnet18", "galore", 4, 2, {
        "rank_pattern": {"layer4.*": 8}, "exclude_modules": ["conv1"], "adapt_head": True}),
}
SLOW_OPTION_CASES = {
    "lora-grouped-convolutions": ("mobilenet_v3_small", "lora", 16, 2, {"include_grouped": True}),  # groups=16
    "dora-adapted-head": ("mobilenet_v3_small", "dora", 4, 1, {"adapt_head": True}),
    "galore-rank-pattern": ("mobilenet_v3_small", "galore", 2, 2, {"rank_pattern": {"features.1.*": 1}}),
}


@pytest.mark.filterwarnings("ignore:Module is None")  # MemTracker on a model that peft rewired
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_prediction_equals_measurement(case: str) -> None:
    from engine_live import assert_matches

    from costmodel.prediction import predict_config

    model, method, rank, step, options = {**OPTION_CASES, **SLOW_OPTION_CASES}[case]
    # T = 1 for GaLore (an SVD every step); the other methods ignore the shared option.
    config = StepConfig(model=model, method=method, rank=rank, batch=8, resolution=32, step=step,
                        shared_options={"update_proj_gap": 1}, options=options)
    predicted, measured_cost = predict_config(config), measure(config, fake=True)
    assert_matches(predicted, measured_cost)
    assert predicted.trainable_params == measured_cost.trainable_params
    default = measure(config.replace(options={}), fake=True)
    assert measured_cost.flops != default.flops  # the options reached the measured step


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("case", list(SLOW_OPTION_CASES))
def test_options_prediction_equals_measurement_more(case: str) -> None:
    test_options_prediction_equals_measurement(case)
