"""Rank-scaling laws, the budget planner and their CLI, on a synthetic predictor with known costs.

The synthetic predictor stands in for the engine so that every expected number here follows
from its closed-form costs (no torch, no measurement: these tests take well under a second).
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from costmodel import cli, sweep
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.paper import PAPER_METHODS
from costmodel.plan import Budget, parse_flops, parse_memory, plan
from costmodel.result import MEMORY_GROUPS, StepCost, phase_flops
from costmodel.sweep import evenly_spread, fit_law, parse_ranks

# method: (trainable params a + b*r, GRAD/OPT bytes a + b*r, forward FLOPs a + b*r, rank-dependent)
SYNTHETIC_METHODS = {
    "fft": (1000, 0, 4000, 0, 100_000, 0),
    "bn_head": (10, 0, 40, 0, 100_000, 0),
    "lora": (10, 20, 40, 80, 100_000, 500),
    "dora": (10, 30, 40, 120, 100_000, 700),
    "galore": (1000, 0, 4000, 0, 100_000, 4500),
}
ACT = 600


@pytest.fixture(autouse=True)
def _paper_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic predictor knows the paper's five methods, whatever plugins are installed."""
    monkeypatch.setattr(sweep, "registered_methods", lambda: PAPER_METHODS)


def synthetic_cost(config: StepConfig) -> StepCost:
    """Known costs: everything linear in the rank except the true peak, which is the larger of
    the backward's (ACT + GRAD + PARAM) and the optimizer's (GRAD + 2*OPT + PARAM) totals, so
    that it switches phase at a known rank for LoRA and DoRA."""
    if config.method not in SYNTHETIC_METHODS:
        raise CostModelError(f"unknown method {config.method!r}")
    p0, p1, g0, g1, f0, f1 = SYNTHETIC_METHODS[config.method]
    r = config.rank
    trainable = p0 + p1 * r
    grad = g0 + g1 * r
    memory = {"PARAM": 4000 + 4 * p1 * r, "BUFFER": 100, "GRAD": grad, "ACT": ACT * config.batch,
              "TEMP": 50, "OPT": 2 * grad, "OTH": 8}
    memory["peak"] = memory["PARAM"] + memory["BUFFER"] + max(ACT * config.batch + grad, grad + 2 * grad)
    memory["sum_of_group_peaks"] = sum(memory[g] for g in MEMORY_GROUPS)
    forward = (f0 + f1 * r) * config.batch
    flops = {"torch": phase_flops(forward, 2 * forward, 0), "exact": phase_flops(forward, 2 * forward, 11 * trainable)}
    return StepCost(config=config, source="predict", flops=flops, memory=memory,
                    trainable_params=trainable, total_params=1000 + trainable, seconds=0.0)


# ---------------------------------------------------------------------------------- laws


def test_law_recovers_a_known_line_exactly() -> None:
    ranks = list(range(1, 65))
    law = fit_law(ranks, [123_456 + 789 * r for r in ranks], "memory.GRAD")
    assert law.shape == "linear"
    assert law.slope == pytest.approx(789, abs=1e-9)
    assert law.intercept == pytest.approx(123_456, abs=1e-6)
    assert law.r_squared == pytest.approx(1.0)
    assert law.max_residual < 1e-6
    assert law(10) == pytest.approx(123_456 + 7890)


def test_constant_cost_is_called_constant() -> None:
    law = fit_law([1, 2, 4, 8], [5, 5, 5, 5], "flops.exact.total")
    assert (law.shape, law.slope, law.intercept, law.max_residual) == ("constant", 0.0, 5.0, 0.0)


def test_peak_that_changes_phase_is_reported_piecewise_with_its_break() -> None:
    # max(1000 + 10 r, 700 + 40 r): the second line takes over from r = 11 (r = 10 gives a tie).
    ranks = np.arange(1, 65)
    values = np.maximum(1000 + 10 * ranks, 700 + 40 * ranks)
    law = fit_law(ranks, values, "memory.peak")
    assert law.shape == "piecewise linear"
    before, after = law.segments
    assert (before.slope, after.slope) == (pytest.approx(10), pytest.approx(40))
    assert after.first_rank in (10, 11)  # at the tie either line is exact
    assert law.max_residual > 50  # the single line does miss: the verdict is not hidden
    assert "piecewise" not in fit_law(ranks, 1000 + 10 * ranks, "memory.peak").shape


def test_saturating_cost_is_non_linear_with_both_local_slopes() -> None:
    # A projection rank capped by small layers: slope 12 up to r=16, 4 up to r=40, then flat.
    ranks = np.arange(1, 65)
    values = 1000 + 8 * np.minimum(ranks, 16) + 4 * np.minimum(ranks, 40)
    law = fit_law(ranks, values, "memory.OPT")
    assert law.shape == "non-linear"
    assert "local slope 12 B/rank" in law.note and ", 0 at r=63..64" in law.note
    assert law.r_squared < 0.9


def test_nearly_linear_names_its_largest_deviation() -> None:
    ranks = np.arange(1, 65)
    values = 1_000_000 + 1000 * ranks + (ranks % 3 == 0) * 40  # 40 B wobble on a 63,000 B change
    law = fit_law(ranks, values, "memory.peak")
    assert law.shape == "nearly linear"
    assert law.slope == pytest.approx(1000, rel=1e-3)
    assert "largest deviation" in law.note


def test_two_ranks_are_untested_and_one_rank_is_an_error() -> None:
    assert fit_law([1, 64], [3, 900]).shape == "untested"
    with pytest.raises(CostModelError, match="at least two"):
        fit_law([4], [10])


def test_parse_ranks() -> None:
    assert parse_ranks("1-4") == (1, 2, 3, 4)
    assert parse_ranks("1,2,4-16:4,64") == (1, 2, 4, 8, 12, 16, 64)
    assert parse_ranks("8, 1 ,8") == (1, 8)
    for bad in ("", "0-4", "4-1", "a", "1-64:0", "1--3"):
        with pytest.raises(CostModelError, match="--ranks"):
            parse_ranks(bad)


def test_evenly_spread_keeps_both_ends() -> None:
    assert evenly_spread(tuple(range(1, 65)), 4) == (1, 22, 43, 64)
    assert evenly_spread((1, 2, 3), 9) == (1, 2, 3)


def test_sweep_on_the_synthetic_predictor_finds_the_known_laws() -> None:
    ranks = parse_ranks("1-64")
    result = sweep.sweep(["m"], ["fft", "lora", "dora", "galore"], ranks, synthetic_cost, progress=False)
    lora = result.find("m", "lora").laws
    assert lora["memory.GRAD"].slope == pytest.approx(80) and lora["memory.GRAD"].shape == "linear"
    assert lora["flops.torch.total"].slope == pytest.approx(3 * 500)
    assert lora["flops.exact.optimizer"].slope == pytest.approx(11 * 20)
    assert lora["trainable_params"].slope == pytest.approx(20)
    # LoRA's peak: 4100 + 80 r + max(640 + 80 r, 120 + 240 r); the optimizer's wins from r = 4.
    assert lora["memory.peak"].shape == "piecewise linear"
    assert lora["memory.peak"].segments[1].first_rank == 4
    assert [s.slope for s in lora["memory.peak"].segments] == [pytest.approx(160), pytest.approx(320)]
    assert result.find("m", "fft").rank_independent
    assert result.find("m", "fft").laws["memory.peak"].shape == "constant"
    galore = result.find("m", "galore").laws
    assert galore["flops.torch.total"].slope / lora["flops.torch.total"].slope == pytest.approx(9)


def test_sweep_outputs_json_and_csv() -> None:
    result = sweep.sweep(["m"], ["lora"], (1, 2, 3, 4), synthetic_cost, metrics=("memory.GRAD",), progress=False)
    data = json.loads(result.to_json())
    assert data["series"][0]["laws"]["memory.GRAD"]["slope"] == pytest.approx(80)
    assert [p["memory.GRAD"] for p in data["series"][0]["points"]] == [120, 200, 280, 360]
    rows = list(csv.DictReader(io.StringIO(result.laws_csv())))
    assert rows[0]["metric"] == "memory.GRAD" and float(rows[0]["intercept"]) == pytest.approx(40)
    assert "lora" in result.render() and "laws fitted" in result.render()


def test_sweep_defaults_to_the_methods_the_predictor_can_cost() -> None:
    def lora_only(config: StepConfig) -> StepCost:
        if config.method != "lora":
            raise CostModelError(f"method {config.method!r} is not predicted yet")
        return synthetic_cost(config)

    result = sweep.sweep(["m"], None, (1, 2, 3), lora_only, progress=False)
    assert [s.method for s in result.series] == ["lora"]
    assert set(result.refused_methods) == {"fft", "bn_head", "dora", "galore"}
    with pytest.raises(CostModelError, match="no rank could be predicted"):
        sweep.sweep(["m"], ["dora"], (1, 2), lora_only, progress=False)


def test_sweep_over_batch_sizes_and_resolutions_fits_one_law_each() -> None:
    result = sweep.sweep(["m"], ["lora"], (1, 2, 3), synthetic_cost, metrics=("memory.ACT", "flops.torch.forward"),
                         progress=False, batches=(1, 2), resolutions=(64, 96))
    assert [(s.batch, s.resolution) for s in result.series] == [(1, 64), (1, 96), (2, 64), (2, 96)]
    # forward = (100000 + 500 r) * batch; ACT = 600 * batch
    laws = result.find("m", "lora", 2, 96).laws
    assert laws["flops.torch.forward"].slope == pytest.approx(1000)
    assert laws["flops.torch.forward"].intercept == pytest.approx(200_000)
    assert laws["memory.ACT"].shape == "constant" and laws["memory.ACT"].intercept == pytest.approx(1200)
    points = list(csv.DictReader(io.StringIO(result.points_csv())))
    assert len(points) == 12 and list(points[0])[:5] == ["model", "method", "batch", "resolution", "rank"]
    assert {(p["batch"], p["resolution"]) for p in points} == {("1", "64"), ("1", "96"), ("2", "64"), ("2", "96")}
    assert points[-1]["flops.torch.forward"] == str(2 * (100_000 + 500 * 3))
    laws_rows = list(csv.DictReader(io.StringIO(result.laws_csv())))
    assert len(laws_rows) == 8 and laws_rows[-1]["batch"] == "2" and laws_rows[-1]["resolution"] == "96"
    data = json.loads(result.to_json())
    assert data["batches"] == [1, 2] and data["resolutions"] == [64, 96]
    assert [(s["batch"], s["resolution"]) for s in data["series"]] == [(1, 64), (1, 96), (2, 64), (2, 96)]
    text = result.render()
    assert "batch=1,2, resolution=64,96" in text and "m / lora / batch=2, resolution=96" in text
    with pytest.raises(CostModelError, match="--batch"):
        sweep.sweep(["m"], ["lora"], (1, 2), synthetic_cost, progress=False, batches=(0,))


def test_batch_and_resolution_ranges_share_the_rank_parser() -> None:
    assert parse_ranks("1,2,4-8", "--batch", "batch size") == (1, 2, 4, 5, 6, 7, 8)
    assert parse_ranks("64,96-128:32", "--resolution", "resolution") == (64, 96, 128)
    with pytest.raises(CostModelError, match=r"--batch: '0' is not a range of batch sizes >= 1"):
        parse_ranks("0", "--batch", "batch size")
    with pytest.raises(CostModelError, match="more than 10,000 resolutions"):
        parse_ranks("1-20000", "--resolution", "resolution")
    with pytest.raises(CostModelError, match="1,000,000"):
        sweep.check_sweep_size(2, 5, 64, 100, 100)


def test_jobs_run_in_any_order_with_the_same_results() -> None:
    # The methods whose plugins declare they take a rank go first; otherwise the order given.
    assert sweep.schedule([("m", "fft", 1, 64), ("m", "lora", 1, 64), ("m", "bn_head", 1, 64), ("m", "galore", 1, 64),
                           ("m", "mine", 1, 64)]) == [("m", "lora", 1, 64), ("m", "galore", 1, 64),
                                                      ("m", "mine", 1, 64), ("m", "fft", 1, 64), ("m", "bn_head", 1, 64)]
    one = sweep.sweep(["m"], ["fft", "dora", "lora"], (1, 2, 3), synthetic_cost, progress=False, batches=(1, 2))
    two = sweep.sweep(["m"], ["fft", "dora", "lora"], (1, 2, 3), synthetic_cost, progress=False, batches=(1, 2),
                      workers=2)
    assert one.points_csv() == two.points_csv() and one.laws_csv() == two.laws_csv()


def test_check_laws_reports_law_and_prediction_error_against_measurements() -> None:
    result = sweep.sweep(["m"], ["lora"], tuple(range(1, 17)), synthetic_cost, metrics=("memory.peak", "memory.GRAD"),
                         progress=False)

    def measured(config: StepConfig) -> StepCost:  # the "measurement" is 25% above the prediction
        cost = synthetic_cost(config)
        cost.memory = {k: v * 5 // 4 for k, v in cost.memory.items()}
        return cost

    sweep.check_laws(result, 3, measured, progress=False)
    assert sorted({c.rank for c in result.checks}) == [1, 9, 16]
    grad = [c for c in result.checks if c.metric == "memory.GRAD"]
    assert [c.law_error for c in grad] == [pytest.approx(0.25 / 1.25)] * 3
    peak = [c for c in result.checks if c.metric == "memory.peak"]
    assert max(c.law_error for c in peak) > max(c.prediction_error for c in peak)  # the kink costs the line


# ---------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, expected", [
    ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000), ("512 kib", 512 * 1024), ("1048576B", 1048576),
    ("2e3B", 2000), ("0.5GiB", 2**29),
])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("2GFLOP", 2 * 10**9), ("500 MFLOPs", 5 * 10**8), ("1.5T", 1.5e12), ("2e9", 2 * 10**9), ("7kflops", 7000),
])
def test_parse_flops(text: str, expected: int) -> None:
    assert parse_flops(text) == expected


@pytest.mark.parametrize("bad", ["64M", "lots", "-3MiB", "0B", "64 MiBs", ""])
def test_parse_memory_refuses_unclear_budgets(bad: str) -> None:
    with pytest.raises(CostModelError, match="--memory"):
        parse_memory(bad)


@pytest.mark.parametrize("bad", ["2GB", "fast", "0", "2 G FLOP"])
def test_parse_flops_refuses_unclear_budgets(bad: str) -> None:
    with pytest.raises(CostModelError, match="--flops"):
        parse_flops(bad)


def test_budget_needs_a_limit() -> None:
    with pytest.raises(CostModelError, match="give a budget"):
        Budget()


# ---------------------------------------------------------------------------------- planner


def _peak(method: str, rank: int) -> int:
    return synthetic_cost(StepConfig(method=method, rank=rank)).memory["peak"]


def test_plan_on_a_budget_with_a_known_answer() -> None:
    # peaks: fft 4100 + 3*4000 = 16100, bn_head 4100 + 640 = 4740,
    # lora 4100 + 80 r + max(640 + 80 r, 120 + 240 r), dora 4100 + 120 r + max(640 + 120 r, 120 + 360 r),
    # galore 16100. A 6000-byte budget admits bn_head, lora up to r = 5 (5820 B) and dora up to r = 3 (5660 B).
    assert _peak("lora", 5) == 5820 and _peak("lora", 6) == 6140
    assert _peak("dora", 3) == 5660 and _peak("dora", 4) == 6140
    result = plan(StepConfig(model="m"), Budget(memory=6000), synthetic_cost, parse_ranks("1-8"), progress=False)
    labels = [c.label for c in result.fitting]
    # most trainable parameters first (lora 10 + 20 r, dora 10 + 30 r), the higher rank on a tie
    assert labels == ["lora r=5", "dora r=3", "lora r=4", "lora r=3", "dora r=2", "lora r=2", "dora r=1",
                      "lora r=1", "bn_head"]
    assert result.fitting[0].limits[0].margin == 180
    excluded = {c.label: c for c in result.excluded}
    # galore's FLOPs depend on the rank, so each of its ranks is a candidate of its own
    assert set(excluded) == {"fft", "lora r=6", "lora r=7", "lora r=8", "dora r=4", "dora r=5",
                             "dora r=6", "dora r=7", "dora r=8"} | {f"galore r={r}" for r in range(1, 9)}
    assert excluded["fft"].reason() == "memory (peak) 15.7 KiB exceeds the budget by 9.86 KiB (168.3% of 5.86 KiB)"
    assert excluded["lora r=6"].limits[0].margin == -140
    text = result.render()
    assert "9 fit" in text and "lora r=6-8: memory (peak) over by 140 B (2.3%) at r=6 to 780 B (13.0%) at r=8" in text and "galore r=1-8: memory (peak) over by" in text


def test_plan_flop_budget_and_sort_orders() -> None:
    # exact total FLOPs: 3 * 100_000 + 3 * 500 r + 11 (10 + 20 r) for lora; a 310,000 budget admits r <= 5.
    result = plan(StepConfig(model="m"), Budget(flops=310_000), synthetic_cost, parse_ranks("1-8"),
                  methods=["lora", "fft"], sort="flops", progress=False)
    assert [c.label for c in result.fitting] == ["lora r=1", "lora r=2", "lora r=3", "lora r=4", "lora r=5"]
    assert "FLOPs (exact)" in {c.label: c for c in result.excluded}["fft"].reason()


def test_plan_lists_methods_the_predictor_refuses() -> None:
    def no_dora(config: StepConfig) -> StepCost:
        if config.method == "dora":
            raise CostModelError("method 'dora' is not predicted yet")
        return synthetic_cost(config)

    result = plan(StepConfig(model="m"), Budget(memory=10**9), no_dora, (1, 2), progress=False)
    assert {c.label: c.reason() for c in result.excluded} == {"dora": "not predicted: method 'dora' is not predicted yet"}
    assert len(result.fitting) == 6  # fft, bn_head, lora and galore at ranks 1 and 2


# ---------------------------------------------------------------------------------- CLI


@pytest.fixture
def synthetic_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "default_predictor", lambda: synthetic_cost)


def test_cli_plan_and_sweep_run_on_the_injected_predictor(synthetic_cli: None, capsys: pytest.CaptureFixture[str],
                                                          tmp_path) -> None:
    # The CLI takes torchvision's names only (checked before any prediction); the synthetic cost
    # ignores the model.
    assert cli.main(["plan", "--model", "resnet18", "--memory", "6000B", "--ranks", "1-8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fitting"][0]["method"] == "lora" and data["fitting"][0]["rank"] == 5
    csv_path = tmp_path / "laws.csv"
    assert cli.main(["sweep", "--model", "resnet18", "--methods", "lora", "--ranks", "1-8", "--metrics", "memory.GRAD",
                     "--csv", str(csv_path)]) == 0
    assert "memory.GRAD" in capsys.readouterr().out
    assert "memory.GRAD" in csv_path.read_text()


def test_cli_sweep_over_batch_and_resolution_ranges(synthetic_cli: None, capsys: pytest.CaptureFixture[str],
                                                   tmp_path) -> None:
    points = tmp_path / "points.csv"
    assert cli.main(["sweep", "--model", "resnet18", "--methods", "lora,fft", "--ranks", "1-3", "--batch", "1,2,4-8",
                     "--resolution", "64,96-128:32", "--metrics", "memory.ACT", "--json", "--points-csv", str(points),
                     "--jobs", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batches"] == [1, 2, 4, 5, 6, 7, 8] and data["resolutions"] == [64, 96, 128]
    assert len(data["series"]) == 2 * 7 * 3
    rows = list(csv.DictReader(io.StringIO(points.read_text())))
    assert len(rows) == 2 * 7 * 3 * 3 and rows[-1]["batch"] == "8" and rows[-1]["resolution"] == "128"
    assert rows[-1]["memory.ACT"] == str(ACT * 8)


def test_sweep_progress_bar_goes_to_stderr_only(synthetic_cli: None, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import sys

    monkeypatch.setattr(sweep, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a person watching the terminal
    points = tmp_path / "points.csv"
    assert cli.main(["sweep", "--model", "resnet18", "--methods", "lora", "--ranks", "1-4", "--batch", "1-3",
                     "--metrics", "memory.GRAD", "--json", "--points-csv", str(points), "--jobs", "1"]) == 0
    captured = capsys.readouterr()
    assert "predicting" in captured.err and "%|" in captured.err  # the bar, on stderr
    assert "predicting" not in captured.out and "\r" not in captured.out
    assert len(json.loads(captured.out)["series"]) == 3  # stdout is the JSON alone
    assert "\r" not in points.read_text() and "predicting" not in points.read_text()


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "m"], "give a budget"),
    (["plan", "--model", "m", "--memory", "64M"], "ambiguous|unknown unit"),
    (["plan", "--model", "m", "--flops", "many"], "--flops"),
    (["sweep", "--ranks", "0-3"], "--ranks"),
    (["sweep", "--metrics", "nonsense"], "--metrics"),
    (["sweep", "--measure", "0"], "--measure"),
    (["plan", "--model", "resnet18", "--memory", "64"], "has no unit"),
    (["plan", "--model", "m", "--memory", "64MiB"], "--model: unknown model 'm'"),
    (["sweep", "--model", "resnet18", "--methods", "lora", "--ranks", "1-2", "--csv", "/nonexistent/dir/x.csv"], "cannot write"),
    (["sweep", "--model", "resnet18", "--methods", "nope", "--ranks", "1-2"], "--methods: unknown method 'nope'"),
    (["plan", "--model", "m", "--memory", "1MiB", "--batch", "0"], "--batch"),
    (["sweep", "--model", "resnet18", "--batch", "0"], "--batch: '0' is not a range of batch sizes"),
    (["sweep", "--model", "resnet18", "--batch", "two"], "--batch: cannot read 'two'"),
    (["sweep", "--model", "resnet18", "--resolution", "128-64"], "--resolution"),
    (["sweep", "--model", "resnet18", "--ranks", "1-10000", "--batch", "1-1000"], "more than 1,000,000"),
])
def test_cli_bad_input_is_one_line_and_exit_2(synthetic_cli: None, capsys: pytest.CaptureFixture[str],
                                              argv: list[str], message: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("costmodel: error: ") and err.count("\n") == 1
    import re

    assert re.search(message, err)


# ---------------------------------------------------------------------------------- report


def test_report_says_what_is_missing_instead_of_inventing_it(tmp_path) -> None:
    from costmodel import report

    def no_dora(config: StepConfig) -> StepCost:
        if config.method == "dora":
            raise CostModelError("method 'dora' is not predicted yet")
        return synthetic_cost(config)

    def unavailable() -> None:
        raise ImportError("No module named 'costmodel.validation.measure'")

    written = report.generate(tmp_path, models=("resnet18",), ranks=(1, 2, 3, 4), measure_ranks=(1, 4),
                              predictor=lambda: no_dora, measurer=unavailable, progress=False)
    assert {p.name for p in written} == {"figure1_memory.png", "figure2_flops.png", "figure5_rank.png",
                                         "README.md", "data.json"}
    assert all(p.stat().st_size > 0 for p in written)
    text = (tmp_path / "README.md").read_text()
    assert f"`costmodel report --out {tmp_path} --models resnet18 --ranks 1-4 --measure-ranks 1,4`" in text
    assert "method 'dora' is not predicted yet" in text and "No module named" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| LoRA peak-memory")}
    lora_row = next(iter(rows.values()))
    # 1 - lora/fft of the synthetic costs at r=4: sum of group peaks 1 - 6158/16758, peak 1 - 5500/16100
    assert "63.3% (sum of group peaks) / 65.8% (peak) | not yet measured" in lora_row
    dora_row = next(line for line in text.splitlines() if line.startswith("| DoRA memory overhead"))
    assert "not yet predicted | not yet measured" in dora_row
    data = json.loads((tmp_path / "data.json").read_text())
    assert data["missing"]["measured"] and not data["measured"]


@pytest.mark.slow  # two plans over 5 methods x 64 ranks: 30 s
def test_plan_takes_the_setup_options_as_the_readme_says(capsys: pytest.CaptureFixture[str]) -> None:
    """README: resnet18 at B=4, R=64 in 64 MiB: 27 fit in fp32 (LoRA up to r=26, bn_head); 193 with
    bf16 weights and every stage checkpointed (GaLore and DoRA up to r=64)."""
    base = ["plan", "--model", "resnet18", "--memory", "64MiB", "--batch", "4", "--resolution", "64"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain[2].startswith("27 fit") and plain[2].endswith("lora r=26, bn_head")
    assert cli.main(base + ["--dtype", "bf16", "--checkpoint", "layer*"]) == 0
    setup = capsys.readouterr().out.splitlines()
    assert "dtype=bf16, checkpoint=layer*" in setup[0]
    assert setup[2].startswith("193 fit") and "galore r=64, dora r=64" in setup[2]
