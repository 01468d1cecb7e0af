"""Rank-scaling laws: predict a step's cost over many ranks and fit ``cost = a + b * rank``.

Every metric of a :class:`StepCost` (FLOPs per phase in both conventions, each memory group,
the peak, trainable parameters) gets its own least-squares line and a verdict
on whether a line describes it at all. A cost that really is ``max`` of two lines (a peak that
moves from one phase to another as the rank grows) or that bends (a projection rank capped by a
small layer) is reported as such, with the break or the local slopes, instead of a misleading
slope.

A sweep covers models x methods x ranks x batch sizes x resolutions: one law over the ranks for
each model, method, batch size and resolution. The methods are the caller's, or every method the
installed plugins declare; nothing here knows a method or the paper by name.

The predictor is a parameter (any callable ``StepConfig -> StepCost``), so that the laws can be
fitted on the analytic engine, on the runtime reference, or on a synthetic cost in tests.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from costmodel.config import MAX_INT, StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, PHASES, StepCost, format_table

Predictor = Callable[[StepConfig], StepCost]
# A sweep's job: (model, method), at the base step's batch and resolution, or (model, method,
# batch, resolution).
Job = tuple

# A law counts as exact when no residual exceeds half a unit (the costs are integers) plus
# floating-point noise on values of up to ~1e12.
_EXACT_ABSOLUTE = 0.5
_EXACT_RELATIVE = 1e-9
# "Nearly" linear: the line misses by at most this share of the cost's rank-driven change.
_NEARLY_SHARE_OF_SPAN = 0.01
_MIN_SEGMENT_POINTS = 3


# --------------------------------------------------------------------------------------------
# Metrics and units


def metric_names() -> tuple[str, ...]:
    """Every metric a sweep fits, in a stable order."""
    names = [f"flops.{conv}.{phase}" for conv in FLOP_CONVENTIONS for phase in PHASES + ("total",)]
    names += [f"memory.{name}" for name in MEMORY_FIELDS]
    names.append("trainable_params")
    return tuple(names)


def cost_metrics(cost: StepCost) -> dict[str, int]:
    """A step's cost flattened to ``{metric name: integer}`` (see :func:`metric_names`)."""
    values: dict[str, int] = {}
    for conv in FLOP_CONVENTIONS:
        for phase in PHASES + ("total",):
            values[f"flops.{conv}.{phase}"] = int(cost.flops[conv][phase])
    for name in MEMORY_FIELDS:
        values[f"memory.{name}"] = int(cost.memory[name])
    values["trainable_params"] = int(cost.trainable_params)
    return values


def select_metrics(prefixes: str | None) -> tuple[str, ...]:
    """Metrics whose names start with one of the comma-separated ``prefixes`` (all if None)."""
    names = metric_names()
    if prefixes is None:
        return names
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    chosen = tuple(n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in wanted))
    if not chosen:
        raise CostModelError(f"--metrics {prefixes!r} matches no metric; metrics are: {', '.join(names)}")
    return chosen


def metric_unit(metric: str) -> str:
    if metric.startswith("flops."):
        return "FLOP"
    if metric.startswith("memory."):
        return "B"
    return "params"


def format_bytes(value: float) -> str:
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{sign}{value / size:.3g} {unit}" if value / size < 100 else f"{sign}{value / size:,.1f} {unit}"
    return f"{sign}{value:,.0f} B"


def format_flops(value: float) -> str:
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= size:
            return f"{sign}{value / size:.4g} {unit}"
    return f"{sign}{value:,.0f} FLOP"


def format_count(value: float, unit: str) -> str:
    """A plain count: ``12,810 params``, ``-3.5 params``."""
    text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.4g}"
    return f"{text} {unit}"


def format_quantity(metric: str, value: float) -> str:
    """``value`` of ``metric`` in readable units (bytes in KiB/MiB, FLOPs in MFLOP/GFLOP,
    parameters as a count)."""
    unit = metric_unit(metric)
    if unit == "B":
        return format_bytes(value)
    if unit == "FLOP":
        return format_flops(value)
    return format_count(value, unit)


def format_slope(metric: str, value: float) -> str:
    """A law's slope in the metric's readable units per rank: ``15.18 MFLOP/rank``."""
    return f"{format_quantity(metric, value)}/rank"


# --------------------------------------------------------------------------------------------
# Ranks and methods


# A sweep predicts every rank it is given: past this many the answer is a table nobody reads and
# the work grows without bound (``--ranks 1-1000000000``), so more is refused before any work.
MAX_RANKS = 10_000


def parse_ranks(text: str, option: str = "--ranks", noun: str = "rank") -> tuple[int, ...]:
    """``"1-64"``, ``"1,2,4,8"``, ``"1-64:4"`` (every 4th), or a mix: ``"1,2,4-16:4,64"``.

    The count of values is found from the ranges before any is expanded, so a huge range is refused
    at once (at most :data:`MAX_RANKS`); a value that no configuration can take is refused by
    :class:`StepConfig`'s bound. The same ranges give batch sizes and resolutions (``noun`` names
    the values in messages: ``parse_ranks("1,2,4-8", "--batch", "batch size")``)."""
    ranks: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            span, _, step_text = part.partition(":")
            step = int(step_text) if step_text else 1
            first_text, dash, last_text = span.partition("-")
            first = int(first_text)
            last = int(last_text) if dash else first
        except ValueError:
            raise CostModelError(
                f"{option}: cannot read {part!r}; write {noun}s as 1-64, 1,2,4,8 or 1-64:4") from None
        if first < 1 or last < first or step < 1:
            raise CostModelError(f"{option}: {part!r} is not a range of {noun}s >= 1 (first <= last, step >= 1)")
        if last > MAX_INT:
            raise CostModelError(f"{option}: {noun} {last} is above the largest {noun} a step can take ({MAX_INT:,})")
        span_ranks = range(first, last + 1, step)
        # Counted before expanding, and the set never holds more than twice the bound.
        if len(span_ranks) > MAX_RANKS or len(ranks) + len(span_ranks) > 2 * MAX_RANKS:
            raise _too_many(option, text, noun)
        ranks.update(span_ranks)
        if len(ranks) > MAX_RANKS:
            raise _too_many(option, text, noun)
    if not ranks:
        raise CostModelError(f"{option}: no {noun} given")
    return tuple(sorted(ranks))


def _too_many(option: str, text: str, noun: str = "rank") -> CostModelError:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return CostModelError(f"{option}: {shown!r} asks for more than {MAX_RANKS:,} {noun}s; "
                          f"take every k-th {noun} instead (e.g. 1-100000:100)")


# The most predictions one sweep is allowed (models x methods x ranks x batch sizes x
# resolutions), refused before any work: each range alone is bounded, their product is not.
MAX_PREDICTIONS = 1_000_000


def check_sweep_size(models: int, methods: int, ranks: int, batches: int = 1, resolutions: int = 1) -> int:
    """The count of predictions a sweep asks for, refused above :data:`MAX_PREDICTIONS`."""
    total = models * methods * ranks * batches * resolutions
    if total > MAX_PREDICTIONS:
        raise CostModelError(
            f"the sweep asks for {total:,} predictions ({models} model(s) x {methods} method(s) x {ranks} rank(s) x "
            f"{batches} batch size(s) x {resolutions} resolution(s)), more than {MAX_PREDICTIONS:,}; "
            "take every k-th value of a range instead (e.g. --ranks 1-64:8)")
    return total


def parse_names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise CostModelError(f"{option}: no name given")
    return names


def registered_methods() -> tuple[str, ...]:
    """Every method name the installed plugins declare (``costmodel_method_names``), in the
    registry's order (sorted by name)."""
    from costmodel.registry import default_plugin_manager, method_names

    return tuple(method_names(default_plugin_manager()))


def _takes_rank(method: str) -> bool:
    """What the method's plugin declares (``MethodOptions.takes_rank``); a method no plugin
    declares is taken to use the rank, as the engine does."""
    from costmodel.options import method_options
    from costmodel.registry import default_plugin_manager

    declared = method_options(default_plugin_manager(), method)
    return True if declared is None else bool(declared.takes_rank)


def schedule(jobs: Sequence[Job]) -> list[Job]:
    """The order the processes of :func:`predict_all` take the jobs in, the longest first so that
    they end together: the methods that take a rank (their plugins say so) before those that do
    not (one prediction serves all ranks of those: the engine drops an unused rank), otherwise in
    the order given. Only the order of the work: the results are the same in any order."""
    takes = {method: _takes_rank(method) for method in dict.fromkeys(job[1] for job in jobs)}
    return sorted(jobs, key=lambda job: not takes[job[1]])


def supported_methods(predictor: Predictor, base: StepConfig,
                      candidates: Iterable[str] | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The candidate methods the predictor can cost on ``base`` (one probe each), and for every
    other one the predictor's reason."""
    supported: list[str] = []
    refused: dict[str, str] = {}
    for method in registered_methods() if candidates is None else candidates:
        try:
            predictor(base.replace(method=method))
        except CostModelError as error:
            refused[method] = str(error)
        except (ImportError, NotImplementedError) as error:  # a predictor not built that far yet
            refused[method] = f"{type(error).__name__}: {error}"
        else:
            supported.append(method)
    return tuple(supported), refused


class EnginePredictor:
    """The analytic engine as a predictor: one configuration (a call), or one configuration at many
    ranks together (:meth:`ranks`, ``costmodel.ranks.predict_ranks``: the same numbers, found in a
    fraction of the time)."""

    def __call__(self, config: StepConfig) -> StepCost:
        from costmodel.prediction import predict_config

        return predict_config(config)

    def ranks(self, config: StepConfig, ranks: Sequence[int]) -> dict[int, StepCost | CostModelError]:
        from costmodel.ranks import predict_ranks

        return predict_ranks(config, ranks)

    def points(self, config: StepConfig, points: Sequence[tuple[int, int, int]]
               ) -> dict[tuple[int, int, int], StepCost | CostModelError]:
        """``config`` at many (batch, resolution, rank) together (``costmodel.ranks.predict_many``)."""
        from costmodel.ranks import predict_many

        return predict_many(config, points)


def default_predictor() -> Predictor:
    """The analytic engine (its modules loaded only when it is first asked)."""
    return EnginePredictor()


def default_measurer(fake: bool = False) -> Predictor:
    """The runtime reference, loaded only when asked for."""
    from costmodel.validation.measure import check_fits_in_memory, measure

    def measure_checked(config: StepConfig) -> StepCost:
        check_fits_in_memory(config, fake)
        return measure(config, fake=fake)

    return measure_checked


class _NoProgress:
    def update(self, count: float = 1) -> None:
        pass

    def set_description_str(self, description: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# Seconds of work before a progress bar appears (a quick sweep shows none).
PROGRESS_DELAY = 2.0


def progress_bar(total: float, description: str, enabled: bool = True, unit: str = "step",
                 bar_format: str | None = None) -> Any:
    """A tqdm bar on stderr (never stdout: the tables, CSV and JSON stay clean) that appears only
    once the work has taken more than :data:`PROGRESS_DELAY` seconds and clears itself when done.
    Only on a terminal: written to a file or a pipe (``2>&1``), the carriage returns that redraw a
    bar would leave its text in front of the output."""
    import shutil
    import sys

    if not enabled or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    # A terminal that reports no size (a pseudo-terminal never sized) would get no bar from tqdm
    # (0 rows hide it): shutil falls back to $COLUMNS/$LINES or 80 x 24 there.
    size = shutil.get_terminal_size()
    return tqdm(total=total, desc=description, unit=unit, delay=PROGRESS_DELAY, leave=False,
                bar_format=bar_format, file=sys.stderr, ncols=size.columns, nrows=size.lines)


# --------------------------------------------------------------------------------------------
# The law


@dataclass(frozen=True)
class Segment:
    """One straight piece of a piecewise-linear cost: ``intercept + slope * rank`` on [first, last]."""

    first_rank: int
    last_rank: int
    slope: float
    intercept: float


@dataclass(frozen=True)
class Law:
    """The least-squares line ``cost = intercept + slope * rank`` of one metric, and how well it
    describes the cost.

    ``shape`` is one of:
    - ``constant``: the cost does not depend on the rank;
    - ``linear``: every point is on the line (to the unit);
    - ``piecewise linear``: two lines, each exact, meeting at ``segments[1].first_rank``;
    - ``nearly linear``: the line misses by at most 1% of the cost's change over the ranks;
    - ``non-linear``: none of these; ``note`` gives the local slopes at both ends;
    - ``untested``: fewer than three ranks, so any line fits.
    """

    metric: str
    slope: float
    intercept: float
    r_squared: float
    max_residual: float  # the largest |cost - law| over the fitted ranks, in the metric's unit
    max_residual_rank: int
    max_relative_residual: float  # that residual as a share of the cost at that rank
    shape: str
    note: str = ""
    segments: tuple[Segment, ...] = ()
    ranks: tuple[int, ...] = field(default=(), repr=False)

    def __call__(self, rank: float) -> float:
        return self.intercept + self.slope * rank

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["first_rank"], data["last_rank"] = (self.ranks[0], self.ranks[-1]) if self.ranks else (None, None)
        del data["ranks"]
        return data


def _share(fraction: float) -> str:
    """A small share written with enough digits to be non-zero: 0.0052%, 1.3%, 33%."""
    return f"{fraction:.2g}" if fraction == 0 else f"{fraction * 100:.2g}%"


def _exact_tolerance(values: np.ndarray) -> float:
    return _EXACT_ABSOLUTE + _EXACT_RELATIVE * float(np.max(np.abs(values)))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """slope, intercept, R^2 of the least-squares line, from centred sums (as scipy's linregress
    computes them; numpy alone, so that a sweep loads no scipy)."""
    if np.ptp(y) == 0:
        return 0.0, float(y[0]), 1.0
    dx, dy = x - x.mean(), y - y.mean()
    sxx, sxy, syy = float(dx @ dx), float(dx @ dy), float(dy @ dy)
    slope = sxy / sxx
    r = min(1.0, max(-1.0, sxy / float(np.sqrt(sxx * syy))))
    return slope, float(y.mean() - slope * x.mean()), r * r


def _best_single_break(x: np.ndarray, y: np.ndarray) -> tuple[Segment, Segment, float] | None:
    """The split into two least-squares lines with the smallest total squared error, found over
    every split at once from prefix sums (on standardised data, so the sums stay well
    conditioned); the chosen split is then refitted exactly. Returns the segments and the
    largest residual, or None with too few points."""
    n = len(x)
    if n < 2 * _MIN_SEGMENT_POINTS:
        return None
    xs = (x - x.mean()) / x.std()
    ys = (y - y.mean()) / y.std()

    def prefix(values: np.ndarray) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum(values)))

    count, sx, sy = prefix(np.ones(n)), prefix(xs), prefix(ys)
    sxx, sxy, syy = prefix(xs * xs), prefix(xs * ys), prefix(ys * ys)

    def squared_error(lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
        m = count[hi] - count[lo]
        vx = sx[hi] - sx[lo]
        vy = sy[hi] - sy[lo]
        var_x = (sxx[hi] - sxx[lo]) - vx * vx / m
        cov = (sxy[hi] - sxy[lo]) - vx * vy / m
        var_y = (syy[hi] - syy[lo]) - vy * vy / m
        return var_y - np.divide(cov * cov, var_x, out=np.zeros_like(cov), where=var_x > 0)

    splits = np.arange(_MIN_SEGMENT_POINTS, n - _MIN_SEGMENT_POINTS + 1)
    k = int(splits[np.argmin(squared_error(0, splits) + squared_error(splits, n))])
    segments = []
    worst = 0.0
    for part in (slice(0, k), slice(k, n)):
        slope, intercept, _ = _line(x[part], y[part])
        worst = max(worst, float(np.max(np.abs(y[part] - (intercept + slope * x[part])))))
        segments.append(Segment(int(x[part][0]), int(x[part][-1]), slope, intercept))
    return segments[0], segments[1], worst


def fit_law(ranks: Sequence[int], values: Sequence[float], metric: str = "") -> Law:
    """Fit ``values = intercept + slope * ranks`` and say how linear the cost really is."""
    x = np.asarray(ranks, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(x) != len(y) or len(x) < 2:
        raise CostModelError(f"a law for {metric or 'a metric'} needs at least two ranks with a cost")
    if np.ptp(x) == 0:
        raise CostModelError(f"a law for {metric or 'a metric'} needs at least two different ranks")
    slope, intercept, r_squared = _line(x, y)
    residuals = y - (intercept + slope * x)
    worst = int(np.argmax(np.abs(residuals)))
    max_residual = float(abs(residuals[worst]))
    relative = max_residual / abs(y[worst]) if y[worst] else (0.0 if max_residual == 0 else math.inf)
    common = dict(metric=metric, slope=slope, intercept=intercept, r_squared=r_squared,
                  max_residual=max_residual, max_residual_rank=int(x[worst]),
                  max_relative_residual=relative, ranks=tuple(int(r) for r in x))
    unit = metric_unit(metric)

    if np.ptp(y) == 0:
        return Law(**common, shape="constant")
    if len(x) < 3:
        return Law(**common, shape="untested", note="two ranks: any line passes through them")
    tolerance = _exact_tolerance(y)
    if max_residual <= tolerance:
        return Law(**common, shape="linear")

    span = float(np.ptp(y))
    piecewise = _best_single_break(x, y)
    if piecewise is not None:
        left, right, piece_residual = piecewise
        described = (f"slope {left.slope:,.6g} {unit}/rank up to r={left.last_rank}, "
                     f"{right.slope:,.6g} {unit}/rank from r={right.first_rank}")
        if piece_residual <= tolerance:
            return Law(**common, shape="piecewise linear", note=f"two exact lines: {described}",
                       segments=(left, right))
    if max_residual <= _NEARLY_SHARE_OF_SPAN * span:
        return Law(**common, shape="nearly linear",
                   note=f"largest deviation {_share(max_residual / span)} of the change over the ranks, at r={int(x[worst])}")
    if piecewise is not None and piece_residual <= _NEARLY_SHARE_OF_SPAN * span:
        return Law(**common, shape="piecewise linear",
                   note=f"two nearly exact lines (largest deviation {_share(piece_residual / span)} of the change): {described}",
                   segments=(left, right))
    first_slope = (y[1] - y[0]) / (x[1] - x[0])
    last_slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
    return Law(**common, shape="non-linear",
               note=(f"local slope {first_slope:,.6g} {unit}/rank at r={int(x[0])}..{int(x[1])}, "
                     f"{last_slope:,.6g} at r={int(x[-2])}..{int(x[-1])}; the line misses by up to "
                     f"{_share(max_residual / span)} of the change over the ranks"))


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Series:
    """One model and method (at one batch size and resolution) over the swept ranks: the cost at
    each rank the predictor could cost, the fitted laws, and the ranks it refused (with its
    reason)."""

    model: str
    method: str
    batch: int | None = None
    resolution: int | None = None
    ranks: list[int] = field(default_factory=list)
    costs: list[StepCost] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    laws: dict[str, Law] = field(default_factory=dict)

    def values(self, metric: str) -> list[int]:
        return [cost_metrics(cost)[metric] for cost in self.costs]

    @property
    def rank_independent(self) -> bool:
        """True when every rank gave the same cost (FFT and BN+H ignore the rank)."""
        first = cost_metrics(self.costs[0]) if self.costs else {}
        return all(cost_metrics(c) == first for c in self.costs[1:])


@dataclass(frozen=True)
class LawCheck:
    """A law and the direct prediction held against one measurement of the runtime reference."""

    model: str
    method: str
    metric: str
    rank: int
    measured: int
    predicted: int
    law: float
    batch: int | None = None
    resolution: int | None = None

    @property
    def law_error(self) -> float:
        return _relative(self.law, self.measured)

    @property
    def prediction_error(self) -> float:
        return _relative(self.predicted, self.measured)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "law_error": self.law_error, "prediction_error": self.prediction_error}


def _relative(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return abs(value - reference) / abs(reference)


@dataclass
class SweepResult:
    base: StepConfig
    ranks: tuple[int, ...]
    metrics: tuple[str, ...]
    series: list[Series]
    refused_methods: dict[str, str] = field(default_factory=dict)
    predict_seconds: float = 0.0
    fit_seconds: float = 0.0
    checks: list[LawCheck] = field(default_factory=list)
    measure_seconds: float = 0.0
    workers: int = 1  # processes the predictions ran in
    batches: tuple[int, ...] = ()  # the swept batch sizes (empty: the base step's)
    resolutions: tuple[int, ...] = ()  # the swept resolutions (empty: the base step's)

    def __post_init__(self) -> None:
        self.batches = tuple(self.batches) or (self.base.batch,)
        self.resolutions = tuple(self.resolutions) or (self.base.resolution,)

    def find(self, model: str, method: str, batch: int | None = None, resolution: int | None = None) -> Series:
        """The series of ``model`` and ``method`` (at ``batch`` and ``resolution``: needed only
        where several were swept)."""
        for series in self.series:
            if (series.model, series.method) == (model, method) and batch in (None, series.batch) \
                    and resolution in (None, series.resolution):
                return series
        raise KeyError((model, method, batch, resolution))

    @property
    def _varied(self) -> bool:
        """True when several batch sizes or resolutions were swept (each block then names its own)."""
        return len(self.batches) > 1 or len(self.resolutions) > 1

    @property
    def predictions(self) -> int:
        return sum(len(s.costs) + len(s.refused) for s in self.series)

    def timing_line(self) -> str:
        laws = sum(len(s.laws) for s in self.series)
        per = self.predict_seconds / max(self.predictions, 1)
        processes = f" in {self.workers} processes" if self.workers > 1 else ""
        line = (f"{self.predictions} predictions{processes} in {self.predict_seconds:.2f} s ({per * 1e3:.1f} ms each), "
                f"{laws} laws fitted in {self.fit_seconds:.3f} s; total {self.predict_seconds + self.fit_seconds:.2f} s")
        if self.checks:
            line += f"; measurements took {self.measure_seconds:.1f} s"
        return line

    def worst_checks(self) -> dict[tuple[Any, ...], tuple[LawCheck, LawCheck]]:
        """Per (model, method, batch, resolution, metric): the check with the largest law error
        and the one with the largest prediction error."""
        worst: dict[tuple[Any, ...], tuple[LawCheck, LawCheck]] = {}
        for check in self.checks:
            key = (check.model, check.method, check.batch, check.resolution, check.metric)
            law_worst, prediction_worst = worst.get(key, (check, check))
            worst[key] = (check if check.law_error >= law_worst.law_error else law_worst,
                          check if check.prediction_error >= prediction_worst.prediction_error else prediction_worst)
        return worst

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict()
        for name in ("model", "method", "rank"):
            base.pop(name)
        return {
            "base_config": base,
            "ranks": list(self.ranks),
            "batches": list(self.batches),
            "resolutions": list(self.resolutions),
            "metrics": list(self.metrics),
            "refused_methods": self.refused_methods,
            "series": [
                {
                    "model": s.model,
                    "method": s.method,
                    "batch": s.batch,
                    "resolution": s.resolution,
                    "rank_independent": s.rank_independent,
                    "refused_ranks": {str(r): why for r, why in s.refused.items()},
                    "points": [{"rank": r, **{m: cost_metrics(c)[m] for m in self.metrics}}
                               for r, c in zip(s.ranks, s.costs)],
                    "laws": {m: law.to_dict() for m, law in s.laws.items()},
                }
                for s in self.series
            ],
            "checks": [check.to_dict() for check in self.checks],
            "timing": {"predictions": self.predictions, "processes": self.workers,
                       "predict_seconds": self.predict_seconds,
                       "fit_seconds": self.fit_seconds, "measure_seconds": self.measure_seconds},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    def laws_csv(self) -> str:
        """One row per model, method and metric: the law and, where measured, its worst errors."""
        worst = self.worst_checks()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "method", "batch", "resolution", "metric", "slope", "intercept", "r_squared", "max_residual",
                         "max_residual_rank", "max_relative_residual", "shape", "note",
                         "break_rank", "slope_before_break", "slope_after_break",
                         "measured_ranks", "max_law_error_vs_measured", "max_prediction_error_vs_measured"])
        for s in self.series:
            for metric, law in s.laws.items():
                brk = law.segments[1].first_rank if law.segments else ""
                before = law.segments[0].slope if law.segments else ""
                after = law.segments[1].slope if law.segments else ""
                key = (s.model, s.method, s.batch, s.resolution, metric)
                checks = [c for c in self.checks if (c.model, c.method, c.batch, c.resolution, c.metric) == key]
                law_worst, prediction_worst = worst.get(key, (None, None))
                writer.writerow([s.model, s.method, s.batch, s.resolution, metric, law.slope, law.intercept, law.r_squared,
                                 law.max_residual, law.max_residual_rank, law.max_relative_residual,
                                 law.shape, law.note, brk, before, after,
                                 " ".join(str(c.rank) for c in checks),
                                 law_worst.law_error if law_worst else "",
                                 prediction_worst.prediction_error if prediction_worst else ""])
        return out.getvalue()

    def points_csv(self) -> str:
        """One row per model, method, batch size, resolution and rank with every metric."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "method", "batch", "resolution", "rank", *self.metrics])
        for s in self.series:
            for rank, cost in zip(s.ranks, s.costs):
                values = cost_metrics(cost)
                writer.writerow([s.model, s.method, s.batch, s.resolution, rank, *(values[m] for m in self.metrics)])
        return out.getvalue()

    def render(self) -> str:
        """A readable table of the laws, one block per model and method."""
        worst = self.worst_checks()
        c = self.base
        lines = [f"rank-scaling laws cost = a + b*rank over ranks {format_ranks(self.ranks)} "
                 f"(batch={format_ranks(self.batches)}, resolution={format_ranks(self.resolutions)}, "
                 f"classes={c.classes}, step={c.step})"]
        for method, why in self.refused_methods.items():
            lines.append(f"  not predicted: {method}: {why}")
        header = ["metric", "slope b", "intercept a", "R^2", "max residual", "shape"]
        if self.checks:
            header.append("| law vs measured, prediction vs measured (worst)")
        for s in self.series:
            where = f" / batch={s.batch}, resolution={s.resolution}" if self._varied else ""
            lines += ["", f"{s.model} / {s.method}{where}" + (" (the rank changes nothing)" if s.rank_independent else "")]
            for rank, why in s.refused.items():
                lines.append(f"  r={rank} not predicted: {why}")
            if not s.laws:
                continue
            rows = []
            for metric, law in s.laws.items():
                residual = f"{format_quantity(metric, law.max_residual)} at r={law.max_residual_rank}"
                row = [metric, format_slope(metric, law.slope), format_quantity(metric, law.intercept),
                       f"{law.r_squared:.6f}", residual, law.shape + (f" ({law.note})" if law.note else "")]
                key = (s.model, s.method, s.batch, s.resolution, metric)
                if key in worst:
                    law_worst, prediction_worst = worst[key]
                    row.append(f"| {law_worst.law_error:.3%} at r={law_worst.rank}, "
                               f"{prediction_worst.prediction_error:.3%} at r={prediction_worst.rank}")
                elif self.checks:
                    row.append("")
                rows.append(row)
            lines += ["  " + line for line in format_table(header, rows, last_left=True)]
        lines += ["", self.timing_line()]
        return "\n".join(lines)


def format_ranks(ranks: Sequence[int]) -> str:
    """Sorted, distinct ranks as ``parse_ranks`` reads them: ``1-64`` or ``1,2,4``."""
    if not ranks:
        return "none"
    # Consecutive ranks (sorted, distinct) are exactly those whose span equals their count.
    if len(ranks) > 2 and ranks[-1] - ranks[0] + 1 == len(ranks):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def predict_series(base: StepConfig, model: str, method: str, ranks: Sequence[int],
                   predictor: Predictor, progress: Callable[..., Any] | None = None) -> Series:
    """The predictor's cost of ``method`` on ``model`` at every rank; a rank it refuses
    (``CostModelError``, e.g. a rank a layer cannot take) is recorded with its reason; ranks that
    are all refused alike are refused at once (:func:`first_answer`)."""
    together = getattr(predictor, "ranks", None)
    if together is not None:  # a predictor of many ranks at once refuses alike ranks itself, at once
        answers = together(base.replace(model=model, method=method), ranks)
        if progress is not None:
            progress(len(ranks))
        return _series(base, model, method, ranks, answers)
    from costmodel.prediction import first_answer

    first, refused_alike = first_answer(lambda rank: predictor(base.replace(model=model, method=method, rank=rank)),
                                        ranks)
    if refused_alike:
        if progress is not None:
            progress(len(ranks))
        return _series(base, model, method, ranks, {rank: first for rank in ranks})
    answers = {ranks[0]: first}
    if progress is not None:
        progress()
    for rank in ranks[1:]:
        try:
            answers[rank] = predictor(base.replace(model=model, method=method, rank=rank))
        except CostModelError as error:
            answers[rank] = error
        if progress is not None:
            progress()
    return _series(base, model, method, ranks, answers)


def _series(base: StepConfig, model: str, method: str, ranks: Sequence[int],
            answers: dict[int, StepCost | CostModelError]) -> Series:
    series = Series(model=model, method=method, batch=base.batch, resolution=base.resolution)
    for rank in ranks:
        answer = answers[rank]
        if isinstance(answer, CostModelError):
            series.refused[rank] = str(answer)
        else:
            series.ranks.append(rank)
            series.costs.append(answer)
    return series


# The predictor and settings a forked worker of predict_all() uses (inherited through fork).
_WORKER: tuple[Predictor, StepConfig, tuple[int, ...]] | None = None


def _job_base(base: StepConfig, job: Job) -> StepConfig:
    """The base step of a job: ``base`` at the job's batch size and resolution, if it names them."""
    return base if len(job) == 2 else base.replace(batch=job[2], resolution=job[3])


def _tasks(jobs: Sequence[Job]) -> list[tuple[Job, ...]]:
    """The jobs of one model and method together, in :func:`schedule`'s order: a predictor of many
    configurations at once (``points``) predicts all their batch sizes, resolutions and ranks in
    one go."""
    tasks: dict[tuple[str, str], list[Job]] = {}
    for job in schedule(jobs):
        tasks.setdefault((job[0], job[1]), []).append(job)
    return [tuple(task) for task in tasks.values()]


def _predict_task(base: StepConfig, task: tuple[Job, ...], ranks: Sequence[int], predictor: Predictor,
                  progress: Callable[..., Any] | None = None) -> dict[Job, Series]:
    together = getattr(predictor, "points", None)
    if together is None or len(task) == 1:
        return {job: predict_series(_job_base(base, job), job[0], job[1], ranks, predictor, progress) for job in task}
    model, method = task[0][:2]
    answers = together(base.replace(model=model, method=method),
                       [(job[2], job[3], rank) for job in task for rank in ranks])
    if progress is not None:
        progress(len(task) * len(ranks))
    return {job: _series(_job_base(base, job), model, method, ranks,
                         {rank: answers[(job[2], job[3], rank)] for rank in ranks}) for job in task}


def _predict_in_worker(task: tuple[Job, ...]) -> dict[Job, Series]:
    assert _WORKER is not None
    predictor, base, ranks = _WORKER
    return _predict_task(base, task, ranks, predictor)


def default_workers() -> int:
    """Processes a sweep uses: one per CPU this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def processes(workers: int, jobs: int) -> int:
    """How many processes :func:`predict_all` runs ``jobs`` jobs in (forking where the platform can)."""
    import multiprocessing

    return max(1, min(workers, jobs)) if "fork" in multiprocessing.get_all_start_methods() else 1


def predict_all(base: StepConfig, jobs: Sequence[Job], ranks: Sequence[int], predictor: Predictor,
                progress: Callable[[int], Any] | None = None, workers: int = 1) -> dict[Job, Series]:
    """Every job, ``(model, method)`` or ``(model, method, batch, resolution)``, over ``ranks``:
    the jobs of one model and method as one task (:func:`_tasks`: every batch size, resolution and
    rank of it predicted together where the predictor can). With ``workers > 1`` the tasks run in
    that many forked processes (each a copy of this one, imports and caches included), longest
    first (:func:`schedule`)."""
    global _WORKER
    import multiprocessing

    tasks = _tasks(jobs)
    workers = processes(workers, len(tasks))
    found: dict[Job, Series] = {}
    if workers == 1:
        for task in tasks:
            found.update(_predict_task(base, task, ranks, predictor, progress))
        return {job: found[job] for job in jobs}
    _WORKER = (predictor, base, tuple(ranks))
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for series in pool.imap_unordered(_predict_in_worker, tasks):
                found.update(series)
                if progress is not None:
                    progress(len(series) * len(ranks))
    finally:
        _WORKER = None
    return {job: found[job] for job in jobs}


def fit_series(series: Series, metrics: Sequence[str]) -> None:
    """Fill ``series.laws`` (nothing when fewer than two ranks could be costed)."""
    if len(series.ranks) < 2:
        return
    table = [cost_metrics(cost) for cost in series.costs]
    series.laws = {m: fit_law(series.ranks, [row[m] for row in table], m) for m in metrics}


def evenly_spread(ranks: Sequence[int], count: int) -> tuple[int, ...]:
    """``count`` of ``ranks``, spread evenly and always including the first and the last."""
    if count < 1:
        raise CostModelError(f"--measure must be >= 1, got {count}")
    if count >= len(ranks):
        return tuple(ranks)
    indices = np.unique(np.round(np.linspace(0, len(ranks) - 1, count)).astype(int))
    return tuple(int(ranks[i]) for i in indices)


def sweep(models: Sequence[str], methods: Sequence[str] | None, ranks: Sequence[int],
          predictor: Predictor, base: StepConfig | None = None,
          metrics: Sequence[str] | None = None, progress: bool = True, workers: int = 1,
          batches: Sequence[int] | None = None, resolutions: Sequence[int] | None = None,
          candidates: Sequence[str] | None = None) -> SweepResult:
    """Predict every model, method, batch size and resolution over ``ranks`` and fit one law per
    metric (per model, method, batch size and resolution).

    ``methods=None``: every method of ``candidates`` (default: every method the installed plugins
    declare, :func:`registered_methods`) that the predictor can cost, the others listed with the
    predictor's reason; a method named explicitly that the predictor cannot cost is an error.
    ``batches``/``resolutions``: the batch sizes and resolutions to sweep (default: the base
    step's). Every configuration is checked before the first prediction. ``workers``: processes
    to predict in (see :func:`predict_all`). ``progress``: a bar on stderr (a terminal only)."""
    base = base or StepConfig()
    metrics = tuple(metrics or metric_names())
    batches = tuple(batches or (base.batch,))
    resolutions = tuple(resolutions or (base.resolution,))
    for batch in batches:  # StepConfig refuses what no step can take, before any work
        base.replace(batch=batch)
    for resolution in resolutions:
        base.replace(resolution=resolution)
    check_sweep_size(len(models), len(methods or candidates or registered_methods()), len(ranks),
                     len(batches), len(resolutions))
    started = time.perf_counter()
    refused_methods: dict[str, str] = {}
    if methods is None:
        methods, refused_methods = supported_methods(predictor, base.replace(model=models[0], rank=ranks[0]),
                                                     candidates)
        if not methods:
            raise CostModelError("the predictor can cost none of the methods: "
                                 + "; ".join(f"{m}: {why}" for m, why in refused_methods.items()))
    jobs = [(model, method, batch, resolution) for model in models for method in methods
            for batch in batches for resolution in resolutions]
    with progress_bar(len(jobs) * len(ranks), "predicting", progress, unit="prediction") as bar:
        found = predict_all(base, jobs, ranks, predictor, bar.update, workers)
    series = [found[job] for job in jobs]
    for s in series:
        if not s.costs:
            reasons = sorted(set(s.refused.values()))
            where = f" (batch={s.batch}, resolution={s.resolution})" if len(jobs) > len(models) * len(methods) else ""
            raise CostModelError(f"{s.model} / {s.method}{where}: no rank could be predicted: {'; '.join(reasons)}")
    predicted = time.perf_counter()
    for s in series:
        fit_series(s, metrics)
    fitted = time.perf_counter()
    return SweepResult(base=base, ranks=tuple(ranks), metrics=metrics, series=series,
                       refused_methods=refused_methods, predict_seconds=predicted - started,
                       fit_seconds=fitted - predicted, workers=processes(workers, len(_tasks(jobs))),
                       batches=batches, resolutions=resolutions)


def check_laws(result: SweepResult, count: int, measurer: Predictor, progress: bool = True) -> SweepResult:
    """Measure ``count`` of the swept ranks (spread evenly) for every rank-dependent series and
    hold both the law and the direct prediction against each measurement."""
    started = time.perf_counter()
    chosen = evenly_spread(result.ranks, count)
    jobs = [(s, r) for s in result.series if s.laws and not s.rank_independent for r in chosen if r in s.ranks]
    # A rank-independent method is measured once (any rank gives the same step).
    jobs += [(s, s.ranks[0]) for s in result.series if s.laws and s.rank_independent]
    with progress_bar(len(jobs), "measuring", progress) as bar:
        for s, rank in jobs:
            config = result.base.replace(model=s.model, method=s.method, rank=rank)
            config = _job_base(config, (s.model, s.method, s.batch or config.batch,
                                        s.resolution or config.resolution))
            measured = cost_metrics(measurer(config))
            predicted = cost_metrics(s.costs[s.ranks.index(rank)])
            for metric, law in s.laws.items():
                result.checks.append(LawCheck(s.model, s.method, metric, rank, measured[metric],
                                              predicted[metric], law(rank), s.batch, s.resolution))
            bar.update()
    result.measure_seconds = time.perf_counter() - started
    return result
