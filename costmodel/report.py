"""The paper's figures and numeric claims, regenerated: predicted beside measured.

``costmodel report --out docs/report`` writes
- ``figure1_memory.png``: each memory group's peak per method and model, stacked (the paper's
  Figure 1), with the true simultaneous peak marked;
- ``figure2_flops.png``: forward, backward and optimizer FLOPs per method and model, in the stock
  FlopCounterMode convention and in the exact one, side by side (the paper's Figure 2; the
  stock counter's grouped-convolution overcount is the difference between the rows);
- ``figure5_rank.png``: cost against rank for LoRA, DoRA and GaLore with the fitted laws (the
  paper's Figure 5);
- ``README.md``: the claims table (each numeric claim of the paper beside our predicted and
  measured figures, with the configuration), the numbers behind the figures, and what is missing;
- ``data.json``: every number used.

Whatever the predictor or the runtime reference cannot provide yet is written as "not yet
predicted" / "not yet measured" with the reason, never filled in.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_GROUPS, PHASES, StepCost
from costmodel.sweep import (PAPER_METHODS, Law, Predictor, Series, default_measurer, default_predictor,
                             fit_series, format_quantity, progress_bar)

PAPER_MODELS: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
RANK_METHODS: tuple[str, ...] = ("lora", "dora", "galore")
METHOD_LABELS = {"fft": "FFT", "bn_head": "BN+H", "lora": "LoRA", "dora": "DoRA", "galore": "GaLore"}
MODEL_LABELS = {"mobilenet_v2": "MobileNetV2", "mobilenet_v3_small": "MobileNetV3-S",
                "mobilenet_v3_large": "MobileNetV3-L", "resnet18": "ResNet-18"}
FIGURE5_METRICS: tuple[tuple[str, str], ...] = (
    ("flops.torch.total", "FLOPs, stock counter (GFLOP)"),
    ("flops.exact.total", "FLOPs, exact (GFLOP)"),
    ("memory.sum_of_group_peaks", "sum of group peaks (MiB)"),
    ("memory.peak", "true peak (MiB)"),
)
SOURCES = ("predicted", "measured")
MISSING = {"predicted": "not yet predicted", "measured": "not yet measured"}


def _label(name: str, labels: dict[str, str]) -> str:
    return labels.get(name, name)


# --------------------------------------------------------------------------------------------
# Collecting the numbers


class Source:
    """The predictor or the runtime reference, asked once per configuration; what it cannot
    cost is remembered with its reason instead of being guessed."""

    def __init__(self, name: str, load: Callable[[], Predictor] | None):
        self.name = name
        self.costs: dict[str, StepCost] = {}
        self.missing: dict[str, tuple[StepConfig, str]] = {}
        self.seconds = 0.0
        self._function: Predictor | None = None
        self._unavailable: str | None = None
        if load is None:
            self._unavailable = "not asked for (--no-measure)"
        else:
            try:
                self._function = load()
            except ImportError as error:
                self._unavailable = f"{error} (not built yet)"

    def get(self, config: StepConfig) -> StepCost | None:
        key = _key(config)
        if key in self.costs:
            return self.costs[key]
        if key in self.missing:
            return None
        if self._function is None:
            self.missing[key] = (config, str(self._unavailable))
            return None
        started = time.perf_counter()
        try:
            self.costs[key] = self._function(config)
        except Exception as error:  # recorded and shown in the report: a gap, not a number
            reason = str(error) if isinstance(error, CostModelError) else f"{type(error).__name__}: {error}"
            self.missing[key] = (config, reason.splitlines()[0] if reason else type(error).__name__)
            return None
        finally:
            self.seconds += time.perf_counter() - started
        return self.costs[key]

    def prefetch(self, base: StepConfig, ranks: Sequence[int]) -> None:
        """Cost ``base`` at all ``ranks`` in one go where the source can (a predictor with
        ``ranks``, e.g. the engine's ``predict_ranks``); later ``get`` calls find the answers."""
        together = getattr(self._function, "ranks", None)
        if together is None or not ranks:
            return
        started = time.perf_counter()
        try:
            answers = together(base, ranks)
        except Exception:  # left to get(), one configuration at a time, which records the reason
            return
        finally:
            self.seconds += time.perf_counter() - started
        for rank, answer in answers.items():
            config = base.replace(rank=rank)
            if isinstance(answer, CostModelError):
                self.missing[_key(config)] = (config, str(answer).splitlines()[0])
            else:
                self.costs[_key(config)] = answer

    def summary(self) -> str:
        return (f"{self.name}: {len(self.costs)} configurations in {self.seconds:.1f} s"
                + (f", {len(self.missing)} missing" if self.missing else ""))


def _key(config: StepConfig) -> str:
    # StepConfig holds a dict (options), so it cannot be a dictionary key itself.
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@dataclass
class ReportData:
    base: StepConfig
    models: tuple[str, ...]
    ranks: tuple[int, ...]
    measure_ranks: tuple[int, ...]
    sources: dict[str, Source]
    # (source, model, method) -> the cost over ranks with its laws
    rank_series: dict[tuple[str, str, str], Series] = field(default_factory=dict)

    def cost(self, source: str, model: str, method: str, step: int | None = None,
             rank: int | None = None) -> StepCost | None:
        config = self.base.replace(model=model, method=method, step=step or self.base.step,
                                   rank=rank or self.base.rank)
        return self.sources[source].get(config)

    def law(self, source: str, model: str, method: str, metric: str) -> Law | None:
        series = self.rank_series.get((source, model, method))
        return series.laws.get(metric) if series else None


def collect(base: StepConfig, models: Sequence[str], ranks: Sequence[int], measure_ranks: Sequence[int],
            predictor: Source, measurer: Source, progress: bool = True) -> ReportData:
    data = ReportData(base=base, models=tuple(models), ranks=tuple(ranks), measure_ranks=tuple(measure_ranks),
                      sources={"predicted": predictor, "measured": measurer})
    # Figures 1 and 2 and most claims: every method at the base rank and step; GaLore's SVD claim
    # needs step 1 of T=200 (an SVD refresh) against FFT's step 1.
    point_jobs = [(m, method, base.step) for m in models for method in PAPER_METHODS]
    point_jobs += [(m, method, 1) for m in models for method in ("fft", "galore") if base.step != 1]
    jobs: list[tuple[str, str, str, int, int]] = []
    # Rank `base.rank` is measured for Figure 1 anyway, so Figure 5's measured points include it.
    measure_ranks = tuple(sorted({*measure_ranks, base.rank})) if measure_ranks else ()
    data.measure_ranks = measure_ranks
    for source, rank_list in (("predicted", ranks), ("measured", measure_ranks)):
        jobs += [(source, m, method, step, base.rank) for m, method, step in point_jobs]
        jobs += [(source, m, method, base.step, r) for m in models for method in RANK_METHODS for r in rank_list]
    with progress_bar(len(jobs), "report", progress) as bar:
        for model in models:
            for method in RANK_METHODS:
                predictor.prefetch(base.replace(model=model, method=method), ranks)
        for source, model, method, step, rank in jobs:
            data.cost(source, model, method, step, rank)
            bar.update()
    for source, rank_list in (("predicted", ranks), ("measured", measure_ranks)):
        for model in models:
            for method in RANK_METHODS:
                series = Series(model=model, method=method)
                for rank in rank_list:
                    cost = data.cost(source, model, method, rank=rank)
                    if cost is not None:
                        series.ranks.append(rank)
                        series.costs.append(cost)
                fit_series(series, [metric for metric, _ in FIGURE5_METRICS] + ["memory.OPT", "trainable_params"])
                data.rank_series[(source, model, method)] = series
    return data


# --------------------------------------------------------------------------------------------
# Claims


@dataclass
class ClaimRow:
    claim: str
    paper: str
    model: str
    quantity: str
    predicted: str
    measured: str
    configuration: str


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _ratio(value: float) -> str:
    return f"{value:.2f}:1"


def _times(value: float) -> str:
    return f"{value:.2f}x"


def _safe_div(a: float, b: float) -> float:
    return a / b if b else math.nan


Metric = Callable[[StepCost], float]


def _memory(field_name: str) -> Metric:
    return lambda cost: cost.memory[field_name]


def _flops(convention: str, phase: str = "total") -> Metric:
    return lambda cost: cost.flops[convention][phase]


def _bwd_fwd(convention: str) -> Metric:
    return lambda cost: _safe_div(cost.flops[convention]["backward"], cost.flops[convention]["forward"])


MEMORY_VARIANTS: tuple[tuple[str, str], ...] = (("sum of group peaks", "sum_of_group_peaks"), ("peak", "peak"))
FLOP_VARIANTS: tuple[tuple[str, str], ...] = (("stock", "torch"), ("exact", "exact"))


class ClaimTable:
    """Builds the rows: each cell computed from the collected costs, or says what is missing."""

    def __init__(self, data: ReportData):
        self.data = data
        self.rows: list[ClaimRow] = []
        b = data.base
        self.config = f"B={b.batch}, {b.resolution}x{b.resolution}, r={b.rank}, {b.classes} classes, step {b.step}"

    def _cells(self, compute: Callable[[str], str | None]) -> tuple[str, str]:
        return tuple(compute(source) or MISSING[source] for source in SOURCES)  # type: ignore[return-value]

    def compare(self, claim: str, paper: str, model: str, quantity: str, variants: Sequence[tuple[str, str]],
                value: Callable[[str, str, str], float | None], fmt: Callable[[float], str],
                configuration: str | None = None) -> None:
        """One row; each cell lists ``value(source, model, variant)`` for every variant."""
        def cell(source: str) -> str | None:
            parts = []
            for label, variant in variants:
                v = value(source, model, variant)
                if v is None:
                    return None
                parts.append(f"{fmt(v)} ({label})" if len(variants) > 1 else fmt(v))
            return " / ".join(parts)

        predicted, measured = self._cells(cell)
        self.rows.append(ClaimRow(claim, paper, _label(model, MODEL_LABELS), quantity, predicted, measured,
                                  configuration or self.config))

    # value helpers ---------------------------------------------------------------------

    def relative(self, method: str, reference: str, metric: Callable[[str], Metric], kind: str,
                 step: int | None = None) -> Callable[[str, str, str], float | None]:
        """method/reference as a ``ratio``, ``1 - ratio`` (a ``reduction``) or ``ratio - 1`` (an ``overhead``)."""
        def value(source: str, model: str, variant: str) -> float | None:
            a = self.data.cost(source, model, method, step)
            b = self.data.cost(source, model, reference, step)
            if a is None or b is None:
                return None
            ratio = _safe_div(metric(variant)(a), metric(variant)(b))
            return {"ratio": ratio, "reduction": 1 - ratio, "overhead": ratio - 1}[kind]
        return value

    def single(self, method: str, metric: Callable[[str], Metric]) -> Callable[[str, str, str], float | None]:
        def value(source: str, model: str, variant: str) -> float | None:
            cost = self.data.cost(source, model, method)
            return None if cost is None else metric(variant)(cost)
        return value

    def slope_ratio(self, method: str, reference: str, metric: Callable[[str], str]) -> Callable[[str, str, str], float | None]:
        def value(source: str, model: str, variant: str) -> float | None:
            a = self.data.law(source, model, method, metric(variant))
            b = self.data.law(source, model, reference, metric(variant))
            if a is None or b is None:
                return None
            return _safe_div(a.slope, b.slope)
        return value


def build_claims(data: ReportData) -> list[ClaimRow]:
    t = ClaimTable(data)
    mem: Callable[[str], Metric] = _memory
    flops: Callable[[str], Metric] = _flops

    def for_models(expected: dict[str, str], default: str = "-") -> list[tuple[str, str]]:
        return [(m, expected.get(m, default)) for m in data.models]

    v3 = {"mobilenet_v3_small": "48%", "mobilenet_v3_large": "48%"}
    for model, paper in for_models({"mobilenet_v2": "22%", **v3, "resnet18": "67%"}):
        t.compare("LoRA peak-memory reduction vs FFT", paper, model, "1 - LoRA/FFT", MEMORY_VARIANTS,
                  t.relative("lora", "fft", mem, "reduction"), _percent)
    for model, paper in for_models({"mobilenet_v2": "49-51% (Fig. 1 caption)", "mobilenet_v3_small": "29%",
                                    "mobilenet_v3_large": "29%", "resnet18": "58%"}):
        t.compare("DoRA memory overhead vs LoRA", paper, model, "DoRA/LoRA - 1", MEMORY_VARIANTS,
                  t.relative("dora", "lora", mem, "overhead"), _percent)
    for model, paper in for_models({"mobilenet_v2": "85%", "mobilenet_v3_small": "52%", "mobilenet_v3_large": "52%"}):
        t.compare("BN+H peak-memory reduction vs FFT", paper, model, "1 - BN+H/FFT", MEMORY_VARIANTS,
                  t.relative("bn_head", "fft", mem, "reduction"), _percent)
    opt_reduction = t.relative("galore", "fft", lambda _: _memory("OPT"), "reduction")
    for model, paper in for_models({}, "65% on average"):
        t.compare("GaLore optimizer-state reduction vs FFT", paper, model, "1 - GaLore OPT/FFT OPT",
                  (("OPT", "OPT"),), opt_reduction, _percent)

    def average_opt(source: str, _model: str, _variant: str) -> float | None:
        values = [opt_reduction(source, m, "OPT") for m in data.models]
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    t.compare("GaLore optimizer-state reduction vs FFT", "65% on average", "average", "mean over the models",
              (("OPT", "OPT"),), average_opt, _percent)
    for model, paper in for_models({"mobilenet_v2": "5-10%", "mobilenet_v3_small": "5-10%",
                                    "mobilenet_v3_large": "5-10%"}):
        t.compare("GaLore peak-memory reduction vs FFT", paper, model, "1 - GaLore/FFT", MEMORY_VARIANTS,
                  t.relative("galore", "fft", mem, "reduction"), _percent)
    for model, paper in for_models({}, "about 10%"):
        t.compare("LoRA optimizer state as a share of GaLore's", paper, model, "LoRA OPT/GaLore OPT",
                  (("OPT", "OPT"),), t.relative("lora", "galore", lambda _: _memory("OPT"), "ratio"), _percent)
    for model, paper in for_models({"mobilenet_v2": "~20:1", "mobilenet_v3_small": "~20:1",
                                    "mobilenet_v3_large": "~20:1", "resnet18": "~2:1"}):
        t.compare("FFT backward:forward FLOPs", paper, model, "backward/forward", FLOP_VARIANTS,
                  t.single("fft", _bwd_fwd), _ratio)
    for method in ("lora", "dora"):
        for model, paper in for_models({"mobilenet_v2": "~1.2:1", "mobilenet_v3_small": "~1.2:1",
                                        "mobilenet_v3_large": "~1.2:1"}):
            t.compare(f"{METHOD_LABELS[method]} backward:forward FLOPs", paper, model, "backward/forward",
                      FLOP_VARIANTS, t.single(method, _bwd_fwd), _ratio)
    for method in ("lora", "dora"):
        for model, paper in for_models({"mobilenet_v3_small": "80% (up to 95%)", "mobilenet_v3_large": "80% (up to 95%)",
                                        "resnet18": "57%", "mobilenet_v2": "up to 95%"}):
            t.compare(f"{METHOD_LABELS[method]} FLOP reduction vs FFT", paper, model,
                      f"1 - {METHOD_LABELS[method]}/FFT, total of the step", FLOP_VARIANTS,
                      t.relative(method, "fft", flops, "reduction"), _percent)
    b = data.base
    svd_config = (f"B={b.batch}, {b.resolution}x{b.resolution}, r={b.rank}, {b.classes} classes, "
                  f"step 1 (T={b.galore_update_proj_gap}: GaLore refreshes its projector with an SVD)")
    for model, paper in for_models({}, "10-30%"):
        t.compare("GaLore FLOP overhead vs FFT (SVD step)", paper, model, "GaLore/FFT - 1, both at step 1",
                  FLOP_VARIANTS, t.relative("galore", "fft", flops, "overhead", step=1), _percent, svd_config)
    for model, paper in for_models({}, "2-20x"):
        t.compare("GaLore FLOPs against LoRA's", paper, model, "GaLore/LoRA", FLOP_VARIANTS,
                  t.relative("galore", "lora", flops, "ratio"), _times)
    for model, paper in for_models({}, "1.13-2x"):
        t.compare("GaLore memory against LoRA's", paper, model, "GaLore/LoRA", MEMORY_VARIANTS,
                  t.relative("galore", "lora", mem, "ratio"), _times)
    law_config = (f"B={b.batch}, {b.resolution}x{b.resolution}, {b.classes} classes, step {b.step}; laws over ranks "
                  f"{_ranks_text(data.ranks)} (predicted), {_ranks_text(data.measure_ranks)} (measured)")
    for reference in ("lora", "dora"):
        for model, paper in for_models({}, "~9x"):
            t.compare(f"GaLore FLOP slope against {METHOD_LABELS[reference]}'s", paper, model,
                      f"slope(GaLore)/slope({METHOD_LABELS[reference]}), total FLOPs", FLOP_VARIANTS,
                      t.slope_ratio("galore", reference, lambda conv: f"flops.{conv}.total"), _times, law_config)
    for method in ("lora", "dora"):
        for model, paper in for_models({}, "2-4x"):
            t.compare(f"{METHOD_LABELS[method]} memory slope against GaLore's", paper, model,
                      f"slope({METHOD_LABELS[method]})/slope(GaLore)", MEMORY_VARIANTS,
                      t.slope_ratio(method, "galore", lambda f: f"memory.{f}"), _times, law_config)
    return t.rows


def _ranks_text(ranks: Sequence[int]) -> str:
    if not ranks:
        return "none"
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


# --------------------------------------------------------------------------------------------
# Figures

GROUP_COLORS = {"PARAM": "#4c72b0", "BUFFER": "#8c8c8c", "GRAD": "#dd8452", "ACT": "#55a868",
                "TEMP": "#c44e52", "OPT": "#8172b3", "OTH": "#937860"}
PHASE_COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868"}
METHOD_COLORS = {"lora": "#4c72b0", "dora": "#dd8452", "galore": "#55a868"}
MEASURED_HATCH = "///"


def _bar_pair(ax: Any, x: float, width: float, stacks: dict[str, tuple[StepCost | None, Callable[[StepCost], dict[str, float]]]],
              colors: dict[str, str], marker: Callable[[StepCost], float] | None = None) -> None:
    for offset, source in ((-width / 2, "predicted"), (width / 2, "measured")):
        cost, parts = stacks[source]
        if cost is None:
            ax.text(x + offset, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="#555555")
            continue
        bottom = 0.0
        for name, value in parts(cost).items():
            ax.bar(x + offset, value, width * 0.95, bottom=bottom, color=colors[name], edgecolor="white" if source == "predicted" else "black",
                   linewidth=0.3, hatch=None if source == "predicted" else MEASURED_HATCH)
            bottom += value
        if marker is not None:
            ax.plot([x + offset - width * 0.45, x + offset + width * 0.45], [marker(cost)] * 2, color="black", linewidth=1.5)


def _save(fig: Any, path: Path, title: str, rect: tuple[float, float, float, float], dpi: int) -> None:
    """Title the figure, fit it inside ``rect`` and write it as an optimised PNG."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi, pil_kwargs={"optimize": True})
    plt.close(fig)


def figure_memory(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(data.models), figsize=(4.2 * len(data.models), 4.2), squeeze=False)
    width = 0.38
    for ax, model in zip(axes[0], data.models):
        for i, method in enumerate(PAPER_METHODS):
            stacks = {s: (data.cost(s, model, method), lambda c: {g: c.memory[g] / 2**20 for g in MEMORY_GROUPS})
                      for s in SOURCES}
            _bar_pair(ax, i, width, stacks, GROUP_COLORS, marker=lambda c: c.memory["peak"] / 2**20)
        ax.set_xticks(range(len(PAPER_METHODS)), [METHOD_LABELS[m] for m in PAPER_METHODS])
        ax.set_title(_label(model, MODEL_LABELS))
        ax.set_ylabel("MiB (group peaks, stacked)")
    handles = [Patch(color=GROUP_COLORS[g], label=g) for g in MEMORY_GROUPS]
    handles += [Patch(facecolor="white", edgecolor="black", label="left: predicted"),
                Patch(facecolor="white", edgecolor="black", hatch=MEASURED_HATCH, label="right: measured"),
                Line2D([], [], color="black", linewidth=1.5, label="true simultaneous peak")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 2 * len(data.models) + 1), fontsize=8,
               frameon=False)
    b = data.base
    _save(fig, path, f"Figure 1: peak memory per group (stacked = the paper's total) - B={b.batch}, "
                     f"{b.resolution}x{b.resolution}, r={b.rank}, step {b.step}", rect=(0, 0.12, 1, 0.95), dpi=80)


def figure_flops(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(2, len(data.models), figsize=(4.2 * len(data.models), 7.5), squeeze=False, sharey="col")
    width = 0.38
    titles = {"torch": "stock FlopCounterMode", "exact": "exact"}
    for row, convention in enumerate(FLOP_CONVENTIONS):
        for ax, model in zip(axes[row], data.models):
            for i, method in enumerate(PAPER_METHODS):
                stacks = {s: (data.cost(s, model, method),
                              lambda c, conv=convention: {p: c.flops[conv][p] / 1e9 for p in PHASES}) for s in SOURCES}
                _bar_pair(ax, i, width, stacks, PHASE_COLORS)
            ax.set_xticks(range(len(PAPER_METHODS)), [METHOD_LABELS[m] for m in PAPER_METHODS])
            ax.set_title(f"{_label(model, MODEL_LABELS)} - {titles[convention]}")
            ax.set_ylabel("GFLOP")
    handles = [Patch(color=PHASE_COLORS[p], label=p) for p in PHASES]
    handles += [Patch(facecolor="white", edgecolor="black", label="left: predicted"),
                Patch(facecolor="white", edgecolor="black", hatch=MEASURED_HATCH, label="right: measured")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    b = data.base
    _save(fig, path, f"Figure 2: FLOPs per phase - B={b.batch}, {b.resolution}x{b.resolution}, r={b.rank}, "
                     f"step {b.step}\ntop: stock FlopCounterMode (counts a grouped conv's weight gradient 'groups' "
                     "times); bottom: exact", rect=(0, 0.04, 1, 0.94), dpi=80)


def figure_rank(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data.models), len(FIGURE5_METRICS),
                             figsize=(4.0 * len(FIGURE5_METRICS), 3.0 * len(data.models)), squeeze=False)
    for row, model in enumerate(data.models):
        for col, (metric, label) in enumerate(FIGURE5_METRICS):
            ax = axes[row][col]
            scale = 1e9 if metric.startswith("flops") else 2**20
            gaps = []
            for method in RANK_METHODS:
                color = METHOD_COLORS[method]
                predicted = data.rank_series[("predicted", model, method)]
                measured = data.rank_series[("measured", model, method)]
                name = METHOD_LABELS[method]
                if predicted.costs:
                    ax.plot(predicted.ranks, [v / scale for v in predicted.values(metric)], ".", markersize=2.5, color=color)
                    law = predicted.laws.get(metric)
                    if law is not None:
                        ends = [predicted.ranks[0], predicted.ranks[-1]]
                        ax.plot(ends, [law(r) / scale for r in ends], "--", linewidth=1, color=color,
                                label=f"{name}: {format_quantity(metric, law.slope)}/rank ({law.shape})")
                else:
                    gaps.append(f"{name}: not yet predicted")
                if measured.costs:
                    ax.plot(measured.ranks, [v / scale for v in measured.values(metric)], "o", markersize=6,
                            markerfacecolor="none", color=color)
                elif data.measure_ranks:
                    gaps.append(f"{name}: not yet measured")
            if gaps:
                ax.text(0.02, 0.98, "\n".join(gaps), transform=ax.transAxes, va="top", fontsize=7, color="#aa0000")
            ax.set_title(f"{_label(model, MODEL_LABELS)}: {label}", fontsize=9)
            ax.set_xlabel("rank")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="lower right")
    b = data.base
    _save(fig, path, f"Figure 5: cost against rank - dots predicted, dashed the fitted law, circles measured - "
                     f"B={b.batch}, {b.resolution}x{b.resolution}, step {b.step}", rect=(0, 0, 1, 0.97), dpi=70)


# --------------------------------------------------------------------------------------------
# Markdown


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def _gflop(value: float) -> str:
    return f"{value / 1e9:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def numbers_table(data: ReportData) -> list[str]:
    """The numbers behind Figures 1 and 2, predicted / measured."""
    columns: list[tuple[str, Callable[[StepCost], str]]] = [
        ("sum of group peaks MiB", lambda c: _mib(c.memory["sum_of_group_peaks"])),
        ("peak MiB", lambda c: _mib(c.memory["peak"])),
        ("ACT MiB", lambda c: _mib(c.memory["ACT"])),
        ("GRAD MiB", lambda c: _mib(c.memory["GRAD"])),
        ("OPT MiB", lambda c: _mib(c.memory["OPT"])),
        ("stock GFLOP", lambda c: _gflop(c.flops["torch"]["total"])),
        ("exact GFLOP", lambda c: _gflop(c.flops["exact"]["total"])),
        ("bwd:fwd stock", lambda c: f"{_safe_div(c.flops['torch']['backward'], c.flops['torch']['forward']):.2f}"),
        ("bwd:fwd exact", lambda c: f"{_safe_div(c.flops['exact']['backward'], c.flops['exact']['forward']):.2f}"),
        ("trainable", lambda c: f"{c.trainable_params:,}"),
    ]
    rows = []
    for model in data.models:
        for method in PAPER_METHODS:
            costs = {s: data.cost(s, model, method) for s in SOURCES}
            row = [_label(model, MODEL_LABELS), METHOD_LABELS[method]]
            for _, get in columns:
                row.append(" / ".join(get(costs[s]) if costs[s] is not None else "n/a" for s in SOURCES))
            rows.append(row)
    return _table(["model", "method", *(name for name, _ in columns)], rows)


def laws_table(data: ReportData) -> list[str]:
    rows = []
    for model in data.models:
        for method in RANK_METHODS:
            for metric, label in FIGURE5_METRICS:
                cells = []
                for source in SOURCES:
                    law = data.law(source, model, method, metric)
                    if law is None:
                        n = len(data.rank_series[(source, model, method)].costs)
                        cells.append(MISSING[source] if n == 0 else f"{n} rank(s): no law")
                        continue
                    unit = "FLOP" if metric.startswith("flops") else "B"
                    cells.append(f"{law.slope:,.0f} {unit}/rank + {law.intercept:,.0f}; {law.shape}")
                predicted_law = data.law("predicted", model, method, metric)
                note = predicted_law.note if predicted_law else ""
                rows.append([_label(model, MODEL_LABELS), METHOD_LABELS[method], label.split(" (")[0], *cells, note])
    return _table(["model", "method", "metric", "law (predicted)", "law (measured)", "note on the predicted law"], rows)


def _config_label(config: StepConfig) -> str:
    rank = f" r={config.rank}" if config.method in RANK_METHODS else ""
    return f"{config.model}/{config.method}{rank}/step {config.step}"


def missing_lines(data: ReportData) -> list[str]:
    lines = []
    for source in SOURCES:
        by_reason: dict[str, list[str]] = {}
        for config, reason in data.sources[source].missing.values():
            by_reason.setdefault(reason, []).append(_config_label(config))
        for reason, configs in sorted(by_reason.items()):
            shown = ", ".join(configs[:6]) + (f" and {len(configs) - 6} more" if len(configs) > 6 else "")
            lines.append(f"- **{MISSING[source]}** ({len(configs)} configuration(s): {shown}): {reason}")
    return lines


def regenerate_command(out: str | Path, models: Sequence[str], ranks: Sequence[int], measure_ranks: Sequence[int],
                       base: StepConfig, fake: bool) -> str:
    """The ``costmodel report`` command line that writes this report again (defaults left out)."""
    parts = ["costmodel", "report", "--out", str(out)]
    if tuple(models) != PAPER_MODELS:
        parts += ["--models", ",".join(models)]
    if tuple(ranks) != tuple(range(1, 65)):
        parts += ["--ranks", _ranks_text(ranks)]
    if not measure_ranks:
        parts.append("--no-measure")
    elif tuple(measure_ranks) != (1, 16, 64):
        parts += ["--measure-ranks", _ranks_text(measure_ranks)]
    if fake:
        parts.append("--fake")
    defaults = StepConfig()
    for name in ("rank", "batch", "resolution", "classes", "step", "galore_update_proj_gap"):
        if getattr(base, name) != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(getattr(base, name))]
    return " ".join(parts)


def markdown(data: ReportData, claims: Sequence[ClaimRow], figures: dict[str, str], command: str) -> str:
    b = data.base
    lines = [
        "# The paper's figures and claims, predicted and measured",
        "",
        "Generated by `" + command + "` (this whole directory; nothing here is edited by hand).",
        "Paper: *From LLMs to Edge: Parameter-Efficient Fine-Tuning on Edge Devices* "
        "(`/work/shared/paper/from-llms-to-edge.txt`).",
        "",
        f"Configuration unless a row says otherwise: batch {b.batch}, {b.resolution}x{b.resolution} images, "
        f"{b.classes} classes, rank {b.rank} (LoRA/DoRA alpha = rank, GaLore scale {b.galore_scale}, "
        f"T = {b.galore_update_proj_gap}, proj_type std), AdamW lr {b.lr}, measured step {b.step} "
        "(step 1 creates the optimizer state). Models: torchvision, weights=None.",
        "",
        "- *predicted*: `costmodel predict` (analytic, nothing runs); *measured*: `costmodel measure` "
        "(the runtime reference: peft / galore-torch applied for real, FlopCounterMode and MemTracker"
        + (", here under FakeTensorMode: `--fake`, the same numbers as a real run, faster)." if "--fake" in command
           else ")."),
        "- Memory: the paper's \"total peak memory\" is the **sum of group peaks** (each MemTracker group's "
        "maximum, whenever it occurs); the **peak** is the true simultaneous maximum. Both are shown.",
        "- FLOPs: **stock** is what torch's FlopCounterMode counts (only matmul/conv; it counts the weight "
        "gradient of a grouped convolution `groups` times too high, the paper's convention); **exact** is "
        "every arithmetic op, with correct grouped-convolution gradients.",
        "- The paper does not say which MobileNetV3 it used: both the small and the large one are reported.",
        "",
    ]
    missing = missing_lines(data)
    if missing:
        lines += ["## Not yet available", "",
                  "These cells say \"not yet predicted\" / \"not yet measured\" (or n/a in figures) "
                  "instead of a number; regenerate with the command above once they exist.", "", *missing, ""]
    lines += ["## Claims", ""]
    lines += _table(["claim", "paper", "model", "quantity", "predicted", "measured", "configuration"],
                    [[r.claim, r.paper, r.model, r.quantity, r.predicted, r.measured, r.configuration] for r in claims])
    lines += ["", "## Figure 1: peak memory per group", "", f"![Figure 1]({figures['figure1']})", "",
              "## Figure 2: FLOPs per phase, stock and exact", "", f"![Figure 2]({figures['figure2']})", "",
              "## Figure 5: cost against rank, with the fitted laws", "", f"![Figure 5]({figures['figure5']})", "",
              f"## Numbers at rank {b.rank} (predicted / measured)", ""]
    lines += numbers_table(data)
    lines += ["", "## Rank-scaling laws (cost = intercept + slope x rank)", ""]
    lines += laws_table(data)
    lines.append("")
    return "\n".join(lines)


def _data_json(data: ReportData) -> dict[str, Any]:
    """The raw numbers behind the report (the laws and claims are in README.md); the predicted
    rank sweeps only as the metrics Figure 5 draws (all of them would be most of a megabyte)."""
    def costs(source: str) -> list[dict[str, Any]]:
        kept = list(data.sources[source].costs.values())
        if source == "predicted":  # only the base rank of the sweeps; in collect()'s job order
            kept = sorted((c for c in kept if c.config.rank == data.base.rank or c.config.method not in RANK_METHODS),
                          key=lambda c: (c.config.step != data.base.step, data.models.index(c.config.model),
                                         PAPER_METHODS.index(c.config.method)))
        return [cost.to_dict() for cost in kept]

    def missing(source: str) -> dict[str, list[str]]:
        by_reason: dict[str, list[str]] = {}
        for config, why in data.sources[source].missing.values():
            by_reason.setdefault(why, []).append(_config_label(config))
        return by_reason

    return {
        "base_config": data.base.to_dict(),
        "models": list(data.models),
        "predicted": costs("predicted"),
        "measured": costs("measured"),
        "predicted_over_ranks": [
            {"model": model, "method": method, "ranks": series.ranks,
             **{metric: series.values(metric) for metric, _ in FIGURE5_METRICS}}
            for (source, model, method), series in data.rank_series.items() if source == "predicted"],
        "missing": {source: missing(source) for source in SOURCES},
    }


def generate(out: str | Path, models: Sequence[str] = PAPER_MODELS, ranks: Sequence[int] = tuple(range(1, 65)),
             measure_ranks: Sequence[int] = (1, 16, 64), base: StepConfig | None = None, fake: bool = False,
             predictor: Callable[[], Predictor] | None = default_predictor,
             measurer: Callable[[], Predictor] | None = None, progress: bool = True) -> list[Path]:
    """Collect, draw and write the report into ``out``; returns the files written.

    ``predictor``/``measurer`` load the callables (the engine and the runtime reference by
    default); with an empty ``measure_ranks`` nothing is measured."""
    import matplotlib

    matplotlib.use("Agg")
    base = base or StepConfig()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CostModelError(f"--out: cannot create {out}: {error.strerror}") from None
    if measurer is None and measure_ranks:
        measurer = lambda: default_measurer(fake=fake)  # noqa: E731
    data = collect(base, models, ranks, measure_ranks, Source("predicted", predictor),
                   Source("measured", measurer if measure_ranks else None), progress)
    claims = build_claims(data)
    figures = {"figure1": "figure1_memory.png", "figure2": "figure2_flops.png", "figure5": "figure5_rank.png"}
    figure_memory(data, out / figures["figure1"])
    figure_flops(data, out / figures["figure2"])
    figure_rank(data, out / figures["figure5"])
    for source in data.sources.values():
        print(source.summary(), file=sys.stderr)
    command = regenerate_command(out, models, ranks, measure_ranks, base, fake)
    (out / "README.md").write_text(markdown(data, claims, figures, command), encoding="utf-8")
    (out / "data.json").write_text(json.dumps(_data_json(data), separators=(",", ":"), allow_nan=True), encoding="utf-8")
    return [out / name for name in (*figures.values(), "README.md", "data.json")]
