"""The paper's claims as data (``costmodel.paper``) and their one generic evaluator, on small
hand-made costs and laws whose values follow in closed form; the report's claims table built from
them. No torch, no engine: these take well under a second."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from costmodel import paper
from costmodel.paper import (CLAIMS, FLOP_VARIANTS, MEMORY_VARIANTS, Claim, Figure, about, between, claim_steps,
                             evaluate, format_value, paper_order, stated, verdict)


def cost(memory: dict[str, float] | None = None, forward: float = 0, backward: float = 0) -> SimpleNamespace:
    phases = {"forward": forward, "backward": backward, "optimizer": 0, "total": forward + backward}
    return SimpleNamespace(memory=memory or {}, flops={"torch": dict(phases), "exact": dict(phases)})


@dataclass
class Slope:
    slope: float


# Two models; on each, FFT holds 100 bytes of peak, LoRA 25 and 40 (1 - 25/100 = 75%, 1 - 40/100 = 60%).
COSTS = {
    ("a", "fft", None): cost({"peak": 100, "sum_of_group_peaks": 200}, forward=10, backward=30),
    ("a", "lora", None): cost({"peak": 25, "sum_of_group_peaks": 150}, forward=10, backward=12),
    ("b", "fft", None): cost({"peak": 100, "sum_of_group_peaks": 100}, forward=4, backward=8),
    ("b", "lora", None): cost({"peak": 40, "sum_of_group_peaks": 20}, forward=4, backward=5),
    ("a", "fft", 1): cost(forward=10, backward=30),
    ("a", "galore", 1): cost(forward=12, backward=33),
}
LAWS = {("a", "galore", "flops.torch.total"): Slope(90.0), ("a", "lora", "flops.torch.total"): Slope(10.0),
        ("a", "lora", "memory.peak"): Slope(6.0), ("a", "galore", "memory.peak"): Slope(2.0)}


def lookup_cost(model: str, method: str, step: int | None) -> SimpleNamespace | None:
    return COSTS.get((model, method, step))


def lookup_law(model: str, method: str, metric: str) -> Slope | None:
    return LAWS.get((model, method, metric))


def claim(**fields: object) -> Claim:
    defaults: dict[str, object] = dict(text="t", quantity="q", method="lora", measure="memory",
                                       variants=MEMORY_VARIANTS, comparison="reduction", fmt="percent",
                                       reference="fft")
    return Claim(**{**defaults, **fields})  # type: ignore[arg-type]


def test_reduction_overhead_and_ratio_of_two_methods() -> None:
    c = claim()
    assert evaluate(c, "a", "peak", lookup_cost, lookup_law) == pytest.approx(0.75)
    assert evaluate(c, "a", "sum_of_group_peaks", lookup_cost, lookup_law) == pytest.approx(0.25)
    assert evaluate(c, "b", "peak", lookup_cost, lookup_law) == pytest.approx(0.60)
    assert evaluate(claim(comparison="ratio"), "b", "peak", lookup_cost, lookup_law) == pytest.approx(0.40)
    assert evaluate(claim(comparison="overhead", method="fft", reference="lora"), "a", "peak",
                    lookup_cost, lookup_law) == pytest.approx(3.0)


def test_mean_over_the_models() -> None:
    # (0.75 + 0.60) / 2
    assert evaluate(claim(over="mean"), ("a", "b"), "peak", lookup_cost, lookup_law) == pytest.approx(0.675)
    assert evaluate(claim(over="mean"), ("a", "b", "c"), "peak", lookup_cost, lookup_law) is None


def test_backward_per_forward_of_one_method_and_a_claim_at_another_step() -> None:
    c = claim(method="fft", reference=None, measure="backward_per_forward", variants=FLOP_VARIANTS,
              comparison="value", fmt="ratio")
    assert evaluate(c, "a", "torch", lookup_cost, lookup_law) == pytest.approx(3.0)
    assert evaluate(c, "b", "exact", lookup_cost, lookup_law) == pytest.approx(2.0)
    svd = claim(method="galore", measure="flops", variants=FLOP_VARIANTS, comparison="overhead", step=1)
    assert evaluate(svd, "a", "torch", lookup_cost, lookup_law) == pytest.approx(45 / 40 - 1)
    assert evaluate(svd, "b", "torch", lookup_cost, lookup_law) is None  # b has no step 1: missing, not guessed


def test_slope_ratio_reads_the_laws() -> None:
    flops = claim(method="galore", reference="lora", measure="flops", variants=FLOP_VARIANTS, comparison="ratio",
                  statistic="slope", fmt="times")
    assert evaluate(flops, "a", "torch", lookup_cost, lookup_law) == pytest.approx(9.0)
    assert evaluate(flops, "a", "exact", lookup_cost, lookup_law) is None
    memory = claim(reference="galore", comparison="ratio", statistic="slope", fmt="times")
    assert evaluate(memory, "a", "peak", lookup_cost, lookup_law) == pytest.approx(3.0)


def test_verdicts_against_the_papers_ranges() -> None:
    assert verdict(stated("22%", 0.22, 0.01), 0.2249) == "within"
    assert verdict(stated("22%", 0.22, 0.01), 0.226) == "above"
    assert verdict(between("10-30%", 0.10, 0.30), 0.05) == "below"
    assert verdict(between("up to 95%", None, 0.955), -0.5) == "within"
    assert verdict(about("~20:1", 20), 15.0) == "within" and verdict(about("~20:1", 20), 14.9) == "below"
    assert verdict(Figure("65% on average"), 0.1) is None  # no range for one model
    assert verdict(stated("22%", 0.22, 0.01), None) is None
    assert verdict(stated("22%", 0.22, 0.01), math.nan) is None
    assert format_value(claim(), 0.6321) == "63.2%"
    assert format_value(claim(fmt="ratio"), 2) == "2.00:1" and format_value(claim(fmt="times"), 9) == "9.00x"


def test_a_claim_that_contradicts_itself_is_refused() -> None:
    with pytest.raises(ValueError, match="comparison"):
        claim(comparison="bigger")
    with pytest.raises(ValueError, match="reference"):
        claim(reference=None)
    with pytest.raises(ValueError, match="slope"):
        claim(measure="backward_per_forward", statistic="slope", variants=FLOP_VARIANTS)


def test_the_papers_claims_table() -> None:
    assert len(CLAIMS) == 19
    assert all(m in paper.PAPER_METHODS for c in CLAIMS for m in c.methods)
    assert claim_steps() == {1: ("fft", "galore")}
    lora = CLAIMS[0]
    assert lora.figure("resnet18").text == "67%" and lora.figure("nope").text == "-"
    assert verdict(lora.figure("resnet18"), 0.67) == "within"
    assert paper_order(["bn_head", "dora", "fft", "galore", "lora", "mine"]) == paper.PAPER_METHODS + ("mine",)


def test_report_rows_say_where_each_value_lies(tmp_path) -> None:
    from costmodel import report
    from costmodel.config import StepConfig

    class Fixed(report.Source):
        def __init__(self, name: str):
            super().__init__(name, None)

        def get(self, config: StepConfig):
            return COSTS.get((config.model, config.method, None if config.step == 2 else config.step))

    data = report.ReportData(base=StepConfig(), models=("a", "b"), ranks=(1, 2), measure_ranks=(),
                             sources={"predicted": Fixed("predicted"), "measured": report.Source("measured", None)})
    c = claim(text="LoRA saves", figures=(("a", stated("75%", 0.75, 0.01)),), variants=(("peak", "peak"),))
    rows = report.claim_rows(c, data)
    assert [(r.model, r.paper, r.predicted, r.measured, r.versus_paper) for r in rows] == [
        ("a", "75%", "75.0%", "not yet measured", "predicted within"),
        ("b", "-", "60.0%", "not yet measured", ""),
    ]
    mean = report.claim_rows(claim(over="mean", default=stated("70%", 0.70, 0.01)), data)
    assert len(mean) == 1 and mean[0].model == "average"
    assert mean[0].predicted == "52.5% (sum of group peaks) / 67.5% (peak)"  # (0.25 + 0.8) / 2, (0.75 + 0.6) / 2
    assert mean[0].versus_paper == "predicted below / below"
