"""The accuracy study's analysis (validation/study.py) on synthetic results: no fine-tuning runs here.

Each synthetic run has FinetuneResult.to_dict()'s schema, with accuracies crafted so that every
claim's verdict is known in advance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from costmodel.validation import study
from costmodel.validation.study import (DOES_NOT_HOLD, HARD_TASKS, HOLDS, INCONCLUSIVE, LIGHT_TASK, MAIN_TASKS,
                                        RANK_MODEL, RANK_TASKS, RANKS, evaluate_claims, prediction_check,
                                        summarise_run, write_report)

MEMORY = {"PARAM": 100, "BUFFER": 10, "GRAD": 50, "ACT": 400, "TEMP": 20, "OPT": 200, "OTH": 0, "peak": 700,
          "sum_of_group_peaks": 780}


def _cost(flops: int, peak: int) -> dict[str, Any]:
    return {"flops": {"torch": {"forward": flops // 3, "backward": flops - flops // 3, "optimizer": 0, "total": flops},
                      "exact": {"forward": flops // 3, "backward": flops - flops // 3, "optimizer": 0,
                                "total": flops}},
            "memory": {**MEMORY, "peak": peak}}


def make_result(model: str, method: str, task: str, seed: int, accuracies: list[float], rank: int = 4,
                measured: bool = True, wrong_peak: bool = False, eval_every: int = 15) -> dict[str, Any]:
    """One run: a first, steady and partial training step, an evaluation after each ``eval_every``
    steps with the given accuracies; measured equal to predicted unless ``wrong_peak``."""
    flops = {"fft": 9_000, "bn_head": 3_000, "lora": 4_000, "dora": 5_000, "galore": 10_000}[method] * 1000
    steps = []
    kinds = ["first", "steady", "partial"]
    for index, kind in enumerate(kinds, 1):
        predicted = _cost(flops, 700 + index)
        steps.append({"step": index, "phase": "train", "batch": 32 if kind != "partial" else 30, "kind": kind,
                      "predicted": predicted, "measured": json.loads(json.dumps(predicted)) if measured else None,
                      "seconds": 0.1, "tracked": measured})
    for point, _ in enumerate(accuracies, 1):
        predicted = _cost(flops // 3, 500)
        steps.append({"step": point * eval_every, "phase": "evaluate", "batch": 32, "kind": "evaluate",
                      "predicted": predicted, "measured": json.loads(json.dumps(predicted)) if measured else None,
                      "seconds": 0.1, "tracked": measured})
    if wrong_peak:
        steps[1]["measured"]["memory"]["peak"] += 7
    classes = 5 if task == "digits-unseen" else 10
    return {"config": {"model": model, "method": method, "task": task, "rank": rank, "seed": seed,
                       "steps": len(accuracies) * eval_every, "batch": 32, "resolution": 32, "lr": 0.01,
                       "eval_every": eval_every, "classes": classes, "train_images": 1438, "eval_images": 359,
                       "total_steps": len(accuracies) * eval_every},
            "steps": steps,
            "accuracy": [{"epoch": 1, "step": (i + 1) * eval_every, "train_loss": 1.0, "eval_accuracy": a,
                          "eval_loss": 1.0} for i, a in enumerate(accuracies)],
            "seconds": 1.0}


def curve_to(final: float, reach_at: int = 2, points: int = 6) -> list[float]:
    """An accuracy curve that climbs to ``final`` at point ``reach_at`` and stays there."""
    return [final * min(1.0, 0.5 + 0.5 * (i + 1) / reach_at) for i in range(points)]


def synthetic_study(final: Callable[[str, str, str, int, int], float],
                    reach: Callable[[str, str, str], int] = lambda model, method, task: 2,
                    models: tuple[str, ...] = ("mobilenet_v2", "resnet18"), seeds: tuple[int, ...] = (0, 1)
                    ) -> list[dict[str, Any]]:
    """The study's matrix (main and rank runs) with crafted final accuracies, as summaries."""
    results = []
    for model in models:
        for method in study.METHODS:
            for task in MAIN_TASKS:
                for seed in seeds:
                    results.append(make_result(model, method, task, seed,
                                               curve_to(final(model, method, task, 4, seed), reach(model, method, task)),
                                               measured=seed == 0))
    for method in study.RANKED_METHODS:
        for rank in RANKS:
            if rank == 4:
                continue
            for task in RANK_TASKS:
                results.append(make_result(RANK_MODEL, method, task, 0, curve_to(final(RANK_MODEL, method, task, rank, 0)),
                                           rank=rank, measured=False))
    return [summarise_run(result) for result in results]


def jitter(seed: int) -> float:
    return 0.003 if seed else -0.003  # two seeds 0.6 points apart: a margin of 2 * 0.42 = 0.85 points


def paper_like(model: str, method: str, task: str, rank: int, seed: int) -> float:
    """The paper's picture: GaLore steady near FFT, LoRA/DoRA 15 points down on hard shifts, BN+H
    near FFT on brightness only, DoRA equal to LoRA, rank 16 best for LoRA."""
    base = {LIGHT_TASK: 0.95, HARD_TASKS[0]: 0.85, HARD_TASKS[1]: 0.88, "digits-unseen": 0.90}[task]
    hard = task in HARD_TASKS
    gap = {"fft": 0.0, "galore": -0.01, "lora": -0.15 if hard else -0.02, "dora": -0.15 if hard else -0.02,
           "bn_head": -0.01 if task == LIGHT_TASK else -0.30}[method]
    if method in ("lora", "dora") and rank != 4:
        gap += {1: -0.10, 16: 0.02, 64: -0.05}[rank]
    if method == "galore" and rank != 4:
        gap += {1: 0.0, 16: -0.02, 64: -0.04}[rank]
    return base + gap + jitter(seed)


def verdicts(summaries: list[dict[str, Any]]) -> dict[str, str]:
    claims, _ = evaluate_claims(summaries)
    return {claim.name: claim.verdict for claim in claims}


def test_summarise_run_takes_the_steady_step_and_counts_kinds() -> None:
    summary = summarise_run(make_result("mobilenet_v2", "lora", LIGHT_TASK, 0, [0.5, 0.8, 0.9]))
    assert summary["cost"]["flops_per_step"] == 4_000_000
    assert summary["cost"]["peak_memory"] == 703  # the largest peak over the training steps
    assert summary["cost"]["memory"]["peak"] == 702  # the steady step's
    assert summary["final_accuracy"] == 0.9 and summary["best_accuracy"] == 0.9
    assert summary["check"]["measured"] == {"first": 1, "steady": 1, "partial": 1, "evaluate": 3}
    assert set(summary["check"]["worst"].values()) == {0.0}
    assert "memory.peak" in summary["check"]["worst"] and "flops.exact.total" in summary["check"]["worst"]
    assert len(json.dumps(summary)) < 3000  # a summary, not a per-step dump


def test_a_differing_measurement_is_an_error_and_names_the_run() -> None:
    runs = [summarise_run(make_result("resnet18", "dora", LIGHT_TASK, 1, [0.9], wrong_peak=True)),
            summarise_run(make_result("resnet18", "fft", LIGHT_TASK, 1, [0.9], measured=False))]
    check = prediction_check(runs)
    assert check["worst"]["memory.peak"] == pytest.approx(7 / 705, rel=0.01)  # finetune.relative_error's scale
    assert check["worst"]["flops.torch.total"] == 0
    assert check["measured_runs"] == 1 and check["planned"]["evaluate"] == 2 and check["measured"]["evaluate"] == 1
    assert not check["all_equal"]
    assert check["offending"][0]["run"] == "resnet18 dora r4 digits-brightness-3 seed 1"
    assert "memory.peak predicted 702 measured 709" in check["offending"][0]["mismatches"][0]


def test_steps_to_converge_is_the_first_evaluation_at_95_percent_of_the_best() -> None:
    assert study.steps_to_converge([[15, 0.5], [30, 0.85], [45, 0.9], [60, 0.88]]) == 45
    assert study.steps_to_converge([[15, 0.5], [30, 0.86], [45, 0.9]], share=0.9) == 30


def test_the_papers_picture_gives_the_papers_verdicts() -> None:
    summaries = synthetic_study(paper_like, reach=lambda model, method, task: 4 if method in ("lora", "dora") else 2)
    found = verdicts(summaries)
    assert found == {
        "GaLore is the most consistent across tasks": HOLDS,
        "GaLore is comparable to FFT": HOLDS,
        "LoRA and DoRA lose accuracy on hard shifts": HOLDS,
        "BN+H is adequate on a light shift": HOLDS,
        "LoRA, DoRA and GaLore beat BN+H beyond the light shift": HOLDS,
        "DoRA is no better than LoRA": HOLDS,
        "A higher rank is not always better": HOLDS,
        "At a low rank GaLore beats LoRA/DoRA on a hard shift": HOLDS,
        "LoRA needs about twice GaLore's iterations": HOLDS,
    }
    _, noise = evaluate_claims(summaries)
    assert noise["pooled_seed_std"] == pytest.approx(0.006 / 2 ** 0.5)
    assert noise["margin"] == pytest.approx(max(2 * 0.006 / 2 ** 0.5, 2 / 359))


def test_the_opposite_picture_gives_the_opposite_verdicts() -> None:
    def opposite(model: str, method: str, task: str, rank: int, seed: int) -> float:
        # LoRA steady and equal to FFT, GaLore swinging by task, DoRA 5 points above LoRA, BN+H
        # 20 points down on brightness, every method rising with rank, LoRA converging first.
        swing = {LIGHT_TASK: 0.0, HARD_TASKS[0]: -0.20, HARD_TASKS[1]: -0.10, "digits-unseen": 0.05}[task]
        gap = {"fft": 0.0, "lora": 0.0, "dora": 0.05, "galore": swing, "bn_head": -0.20}[method]
        if method in study.RANKED_METHODS:
            gap += {1: -0.09, 4: 0.0, 16: 0.04, 64: 0.08}[rank] if method != "galore" else \
                {1: -0.30, 4: 0.0, 16: 0.04, 64: 0.08}[rank]
        return 0.8 + gap + jitter(seed)

    found = verdicts(synthetic_study(opposite, reach=lambda model, method, task: 1 if method == "lora" else 3))
    assert found["GaLore is the most consistent across tasks"] == DOES_NOT_HOLD
    assert found["LoRA and DoRA lose accuracy on hard shifts"] == DOES_NOT_HOLD
    assert found["BN+H is adequate on a light shift"] == DOES_NOT_HOLD
    assert found["DoRA is no better than LoRA"] == DOES_NOT_HOLD
    assert found["A higher rank is not always better"] == DOES_NOT_HOLD
    assert found["At a low rank GaLore beats LoRA/DoRA on a hard shift"] == DOES_NOT_HOLD
    assert found["LoRA needs about twice GaLore's iterations"] == DOES_NOT_HOLD


def test_differences_within_the_seed_noise_are_inconclusive() -> None:
    def noisy(model: str, method: str, task: str, rank: int, seed: int) -> float:
        # seeds 8 points apart (margin about 11 points); LoRA/DoRA 3 points below on hard shifts
        hard = method in ("lora", "dora") and task in HARD_TASKS
        return 0.8 - (0.03 if hard else 0.0) + (0.04 if seed else -0.04)

    found = verdicts(synthetic_study(noisy))
    assert found["LoRA and DoRA lose accuracy on hard shifts"] == INCONCLUSIVE
    assert found["At a low rank GaLore beats LoRA/DoRA on a hard shift"] == INCONCLUSIVE
    assert found["A higher rank is not always better"] == INCONCLUSIVE  # flat within noise


def test_one_seed_assumes_the_fallback_margin() -> None:
    summaries = synthetic_study(paper_like, seeds=(3,))
    claims, noise = evaluate_claims(summaries)
    assert noise["pooled_seed_std"] is None and noise["margin"] == study.FALLBACK_MARGIN
    assert noise["seeds"] == [0, 3]  # the rank runs are seed 0 here
    assert all(claim.evidence for claim in claims)


def test_a_missing_method_leaves_its_claims_without_evidence() -> None:
    summaries = [summary for summary in synthetic_study(paper_like) if summary["config"]["method"] != "galore"]
    claims, _ = evaluate_claims(summaries)
    by_name = {claim.name: claim for claim in claims}
    assert by_name["GaLore is the most consistent across tasks"].verdict == INCONCLUSIVE
    assert by_name["GaLore is the most consistent across tasks"].evidence == []
    assert by_name["DoRA is no better than LoRA"].verdict == HOLDS


def test_the_report_folder_holds_readme_figures_and_one_small_json(tmp_path: Path) -> None:
    summaries = synthetic_study(paper_like, models=("mobilenet_v2",))  # one row of panels: faster to draw
    summaries.append({"spec": {"model": "resnet18", "method": "lora", "task": LIGHT_TASK, "seed": 5},
                      "error": "training step 1 (batch 32) cannot be predicted: boom"})
    out = tmp_path / "report"
    document = write_report(summaries, out, {"command": "python -m costmodel.validation.study", "jobs": 2,
                                             "wall_seconds": 60.0})
    names = sorted(path.name for path in out.iterdir())
    assert names == ["README.md", "figure3_flops.png", "figure3_memory.png", "figure4_rank.png", "study.json",
                     "training_curves.png"]
    assert sum(path.stat().st_size for path in out.iterdir()) < 1_000_000
    readme = (out / "README.md").read_text(encoding="utf-8")
    for needle in ("## The paper's claims at this scale", "| GaLore is the most consistent across tasks | **holds** |",
                   "## Prediction check", "| refresh | 0 | 0 |", "| evaluate | ", "Every measured field equals",
                   "## Failed runs", "boom", "![figure4_rank.png](figure4_rank.png)", "one image of 359 is 0.28"):
        assert needle in readme, needle
    assert document["prediction_check"]["all_equal"]
    saved = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert len(saved["runs"]) == len(summaries) and saved["claims"][0]["verdict"] == HOLDS


def test_from_summary_redraws_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    small = [summarise_run(make_result("mobilenet_v2", method, LIGHT_TASK, 0, [0.5, 0.9])) for method in ("fft", "lora")]
    write_report(small, first, {"jobs": 2})
    assert study.main(["--from-summary", str(first / "study.json"), "--out", str(second)]) == 0
    assert (second / "README.md").read_text(encoding="utf-8") == (first / "README.md").read_text(encoding="utf-8")
    assert "redrawn" in capsys.readouterr().out


def test_the_plan_runs_each_configuration_once() -> None:
    specs = study.plan_study([0, 1])
    keys = [(s.model, s.method, s.task, s.rank, s.seed) for s in specs]
    assert len(keys) == len(set(keys))
    assert {s.seed for s in specs if s.model == "resnet18"} == {0}
    assert {s.seed for s in specs if s.model == "mobilenet_v2"} == {0, 1}
    rank_four = [s for s in specs if s.model == RANK_MODEL and s.method == "lora" and s.task == LIGHT_TASK and s.seed == 0]
    assert sorted(s.rank for s in rank_four) == list(RANKS)
    assert all(s.measure for s in specs if s.seed == 0 and s.task == HARD_TASKS[0] and s.rank == 4)
    assert len(study.pretraining_jobs(specs)) == 6  # 2 models x 2 sources, MobileNetV2 with 2 seeds
    assert 20 * 60 < study.estimate_seconds(specs, 2) < 90 * 60  # the docstring's estimate, about 68 min
    quick = study.plan_study([0], quick=True)
    assert len(quick) == 2 and all(s.steps == study.QUICK_STEPS and s.measure for s in quick)


@pytest.mark.parametrize("arguments, message", [
    (["--jobs", "0"], "--jobs: a positive integer"),
    (["--jobs", "two"], "--jobs: a positive integer"),
    (["--seeds", "0,x"], "--seeds:"),
    (["--seeds", "1,1"], "--seeds: distinct"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--out", ""], "--out: the path is empty"),
])
def test_bad_input_is_one_line_and_status_2(arguments: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert study.main([*arguments, "--plan"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert study.main(["--out", str(out), "--plan"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--out:" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert study.main(["--out", str(locked / "report"), "--plan"]) == 2
    assert "permission denied" in capsys.readouterr().err


def test_a_bad_summary_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert study.main(["--from-summary", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
