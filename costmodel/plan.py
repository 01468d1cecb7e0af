"""The budget planner: which methods and ranks fit a memory and/or FLOP budget.

Every method the predictor can cost is predicted at every rank asked for; a candidate fits when
each given limit holds. The fitting ones are listed best first, and every excluded one says which
limit it breaks and by how much (or why it could not be costed at all).

"Best" is by default the most trainable parameters (the most the step can learn), then the higher
rank (a method whose cost ignores the rank updates at full rank), then the least memory, then the
fewest FLOPs; ``sort="memory"`` or ``sort="flops"`` puts the cheapest first.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, StepCost
from costmodel.sweep import (Predictor, format_bytes, format_flops, predict_all, predict_series, progress_bar,
                             supported_methods)

MEMORY_METRICS: tuple[str, ...] = ("peak", "sum_of_group_peaks")
SORT_ORDERS: tuple[str, ...] = ("capacity", "memory", "flops")

_MEMORY_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_FLOP_PREFIXES: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?"
# Budgets beyond any device: 1 EiB of memory, 10^24 FLOPs (a zettaFLOP-scale step) are refused as
# typing errors rather than carried into arithmetic that overflows a float.
MAX_MEMORY = 2**60
MAX_FLOPS = 10**24


def _split(text: str, option: str) -> tuple[Fraction, str]:
    """The number (exact: a Fraction, so ``1e400`` cannot overflow a float) and the unit text."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z]*)\s*", text)
    if not match:
        raise CostModelError(f"{option}: cannot read {text!r} as a number with a unit")
    mantissa, exponent, unit = match.groups()
    if exponent is not None and len(exponent.lstrip("+-")) > 3:  # 10**(10**9) would never finish
        raise CostModelError(f"{option}: the exponent of {text!r} is out of range")
    return Fraction(mantissa) * Fraction(10) ** int(exponent or 0), unit


def parse_memory(text: str) -> int:
    """Bytes from ``"64MiB"``, ``"1.5GB"``, ``"512 KiB"``, ``"1048576B"``.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; the unit is required (a bare
    ``64`` could mean bytes or MiB, and a wrong guess gives a plan that looks right), and a bare
    K/M/G is refused as ambiguous."""
    value, unit = _split(text, "--memory")
    if not unit:
        raise CostModelError(f"--memory: {text!r} has no unit; write e.g. {text.strip()}MiB, {text.strip()}MB or {text.strip()}B")
    if unit.lower() not in _MEMORY_UNITS:
        raise CostModelError(
            f"--memory: unknown unit {unit!r} in {text!r}; use B, KB, MB, GB, TB (powers of 1000) "
            f"or KiB, MiB, GiB, TiB (powers of 1024)")
    size = round(value * _MEMORY_UNITS[unit.lower()])
    if size < 1:
        raise CostModelError(f"--memory: the budget must be at least one byte, got {text!r}")
    if size > MAX_MEMORY:
        raise CostModelError(f"--memory: {text!r} is more memory than any device has (at most 1 EiB)")
    return size


def parse_flops(text: str) -> int:
    """FLOPs from ``"2GFLOP"``, ``"500 MFLOPs"``, ``"1.2T"``, ``"2e9"``."""
    value, unit = _split(text, "--flops")
    prefix = re.sub(r"(?i)flops?$", "", unit).lower()
    if prefix not in _FLOP_PREFIXES:
        raise CostModelError(
            f"--flops: unknown unit {unit!r} in {text!r}; write e.g. 2GFLOP, 500MFLOP, 1.5T or 2e9")
    count = round(value * _FLOP_PREFIXES[prefix])
    if count < 1:
        raise CostModelError(f"--flops: the budget must be at least one FLOP, got {text!r}")
    if count > MAX_FLOPS:
        raise CostModelError(f"--flops: {text!r} is more than any step costs (at most 1e24 FLOP)")
    return count


@dataclass(frozen=True)
class Budget:
    """At most ``memory`` bytes of ``memory[memory_metric]`` and at most ``flops`` FLOPs of the
    step's total in ``flop_convention``; None leaves that side unlimited."""

    memory: int | None = None
    flops: int | None = None
    memory_metric: str = "peak"
    flop_convention: str = "exact"

    def __post_init__(self) -> None:
        if self.memory is None and self.flops is None:
            raise CostModelError("give a budget: --memory (e.g. 64MiB) and/or --flops (e.g. 2GFLOP)")
        if self.memory_metric not in MEMORY_METRICS:
            raise CostModelError(f"--memory-metric must be one of {', '.join(MEMORY_METRICS)}, got {self.memory_metric!r}")
        if self.flop_convention not in FLOP_CONVENTIONS:
            raise CostModelError(f"--flops-convention must be one of {', '.join(FLOP_CONVENTIONS)}, got {self.flop_convention!r}")

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory ({self.memory_metric}) <= {format_bytes(self.memory)}")
        if self.flops is not None:
            parts.append(f"FLOPs ({self.flop_convention}, total) <= {format_flops(self.flops)}")
        return " and ".join(parts)

    def limits(self, cost: StepCost) -> list["Limit"]:
        limits = []
        if self.memory is not None:
            limits.append(Limit(f"memory ({self.memory_metric})", cost.memory[self.memory_metric], self.memory))
        if self.flops is not None:
            limits.append(Limit(f"FLOPs ({self.flop_convention})", cost.flops[self.flop_convention]["total"], self.flops))
        return limits


@dataclass(frozen=True)
class Limit:
    """One limit of the budget applied to one candidate."""

    name: str
    used: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.used <= self.budget

    @property
    def margin(self) -> int:
        """What is left (negative: how far over)."""
        return self.budget - self.used

    def _format(self, value: float) -> str:
        return format_bytes(value) if self.name.startswith("memory") else format_flops(value)

    def describe(self) -> str:
        verb = "leaves" if self.fits else "exceeds the budget by"
        return (f"{self.name} {self._format(self.used)} {verb} {self._format(abs(self.margin))} "
                f"({abs(self.margin) / self.budget:.1%} of {self._format(self.budget)})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "used": self.used, "budget": self.budget, "margin": self.margin, "fits": self.fits}


@dataclass
class Candidate:
    """One method at one rank (``rank=None``: the method's cost does not depend on the rank)."""

    method: str
    rank: int | None
    cost: StepCost | None = None
    limits: list[Limit] = field(default_factory=list)
    refused: str | None = None  # why the predictor could not cost it

    @property
    def fits(self) -> bool:
        return self.refused is None and all(limit.fits for limit in self.limits)

    @property
    def label(self) -> str:
        return self.method if self.rank is None else f"{self.method} r={self.rank}"

    def reason(self) -> str:
        if self.refused is not None:
            return f"not predicted: {self.refused}"
        return "; ".join(limit.describe() for limit in self.limits if not limit.fits or self.fits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "rank": self.rank, "fits": self.fits, "reason": self.reason(),
            "limits": [limit.to_dict() for limit in self.limits],
            "trainable_params": self.cost.trainable_params if self.cost else None,
            "memory": self.cost.memory if self.cost else None,
            "flops": self.cost.flops if self.cost else None,
        }


@dataclass
class Plan:
    base: StepConfig
    budget: Budget
    sort: str
    fitting: list[Candidate]
    excluded: list[Candidate]

    def to_dict(self) -> dict[str, Any]:
        config = self.base.to_dict()
        for name in ("method", "rank"):
            config.pop(name)
        return {
            "config": config,
            "budget": {"memory": self.budget.memory, "memory_metric": self.budget.memory_metric,
                       "flops": self.budget.flops, "flop_convention": self.budget.flop_convention},
            "order": self.sort,
            "fitting": [c.to_dict() for c in self.fitting],
            "excluded": [c.to_dict() for c in self.excluded],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        c = self.base
        lines = [f"{c.model}, batch={c.batch}, resolution={c.resolution}, classes={c.classes}, step={c.step}; "
                 f"budget: {self.budget.describe()}", ""]
        if self.fitting:
            best_by_method: dict[str, Candidate] = {}
            for candidate in self.fitting:
                best_by_method.setdefault(candidate.method, candidate)
            lines.append(f"{len(self.fitting)} fit, best first ({_ORDER_TEXT[self.sort]}); "
                         f"the best of each method: " + ", ".join(x.label for x in best_by_method.values()))
            lines.append(f"  {'method':<12}{'rank':>6}{'trainable':>14}" +
                         "".join(f"{limit.name:>26}{'margin':>22}" for limit in self.fitting[0].limits))
            for candidate in self.fitting:
                row = (f"  {candidate.method:<12}{'-' if candidate.rank is None else candidate.rank:>6}"
                       f"{candidate.cost.trainable_params:>14,}")
                for limit in candidate.limits:
                    row += (f"{limit._format(limit.used):>26}"
                            f"{limit._format(limit.margin) + f' ({limit.margin / limit.budget:.1%})':>22}")
                lines.append(row)
        else:
            lines.append("nothing fits")
        if self.excluded:
            lines += ["", f"{len(self.excluded)} excluded:"]
            lines += [f"  {text}" for text in _grouped_reasons(self.excluded)]
        return "\n".join(lines)


_ORDER_TEXT = {
    "capacity": "most trainable parameters, then highest rank, then least memory, then fewest FLOPs",
    "memory": "least memory first",
    "flops": "fewest FLOPs first",
}


def _grouped_reasons(excluded: Sequence[Candidate]) -> list[str]:
    """Runs of consecutive ranks of one method excluded by the same limits, in one line each."""
    lines: list[str] = []
    run: list[Candidate] = []

    def key(candidate: Candidate) -> tuple[Any, ...]:
        return (candidate.method, candidate.refused, tuple(l.name for l in candidate.limits if not l.fits))

    def flush() -> None:
        if not run:
            return
        first, last = run[0], run[-1]
        if len(run) == 1:
            lines.append(f"{first.label}: {first.reason()}")
        elif first.refused is not None:
            lines.append(f"{first.method} r={first.rank}-{last.rank}: {first.reason()}")
        else:
            overs = []
            for a, b in zip(first.limits, last.limits):
                if not a.fits:
                    overs.append(f"{a.name} over by {a._format(-a.margin)} ({-a.margin / a.budget:.1%}) at r={first.rank} "
                                 f"to {b._format(-b.margin)} ({-b.margin / b.budget:.1%}) at r={last.rank}")
            lines.append(f"{first.method} r={first.rank}-{last.rank}: " + "; ".join(overs))
        run.clear()

    for candidate in excluded:
        if run and (key(candidate) != key(run[-1]) or candidate.rank is None or run[-1].rank is None):
            flush()
        run.append(candidate)
    flush()
    return lines


def _sort_key(sort: str, budget: Budget) -> Any:
    def memory(c: Candidate) -> int:
        return c.cost.memory[budget.memory_metric]

    def flops(c: Candidate) -> int:
        return c.cost.flops[budget.flop_convention]["total"]

    def rank(c: Candidate) -> float:
        # A method whose cost ignores the rank (FFT, BN+H) updates its weights at full rank.
        return math.inf if c.rank is None else c.rank

    if sort == "capacity":
        return lambda c: (-c.cost.trainable_params, -rank(c), memory(c), flops(c))
    if sort == "memory":
        return lambda c: (memory(c), flops(c), -c.cost.trainable_params)
    if sort == "flops":
        return lambda c: (flops(c), memory(c), -c.cost.trainable_params)
    raise CostModelError(f"--sort must be one of {', '.join(SORT_ORDERS)}, got {sort!r}")


def plan(base: StepConfig, budget: Budget, predictor: Predictor, ranks: Sequence[int],
         methods: Sequence[str] | None = None, sort: str = "capacity", progress: bool = True,
         workers: int = 1) -> Plan:
    """Every method (all the predictor can cost when ``methods`` is None) at every rank, split
    into those that fit ``budget`` (best first, see ``sort``) and those that do not (in method
    and rank order, each with its reason). ``workers``: processes to predict in, for a predictor
    of many ranks at once (``sweep.predict_all``)."""
    key = _sort_key(sort, budget)
    candidates: list[Candidate] = []
    if methods is None:
        methods, refused = supported_methods(predictor, base.replace(rank=ranks[0]))
        candidates += [Candidate(method, None, refused=why) for method, why in refused.items()]
    with progress_bar(len(methods) * len(ranks), "predicting", progress) as bar:
        # A predictor of many ranks at once is asked every method at all ranks (the methods
        # spread over ``workers`` processes). One of one rank at a time is asked the smallest,
        # middle and largest rank first: a method that costs the same at all three (FFT, BN+H
        # ignore the rank) is taken as rank-independent and costed once.
        together = {}
        if hasattr(predictor, "ranks"):
            together = predict_all(base, [(base.model, m) for m in methods], ranks, predictor, bar.update, workers)
        for method in methods:
            probe = list(ranks) if together else sorted({ranks[0], ranks[len(ranks) // 2], ranks[-1]})
            series = together.get((base.model, method)) or predict_series(base, base.model, method, probe,
                                                                          predictor, bar.update)
            if len(probe) > 1 and series.rank_independent and not series.refused:
                candidates.append(Candidate(method, None, series.costs[0], budget.limits(series.costs[0])))
                bar.update(len(ranks) - len(probe))
                continue
            rest = [r for r in ranks if r not in probe]
            if rest:
                more = predict_series(base, base.model, method, rest, predictor, bar.update)
                series.refused.update(more.refused)
                series.ranks += more.ranks
                series.costs += more.costs
            if not series.costs:
                reasons = sorted(set(series.refused.values()))
                candidates.append(Candidate(method, None, refused="; ".join(reasons)))
                continue
            for rank in ranks:
                if rank in series.refused:
                    candidates.append(Candidate(method, rank, refused=series.refused[rank]))
                else:
                    cost = series.costs[series.ranks.index(rank)]
                    candidates.append(Candidate(method, rank, cost, budget.limits(cost)))
    if not any(c.cost is not None for c in candidates):
        raise CostModelError("the predictor could cost no method: "
                             + "; ".join(f"{c.label}: {c.refused}" for c in candidates))
    fitting = sorted((c for c in candidates if c.fits), key=key)
    excluded = [c for c in candidates if not c.fits]
    return Plan(base=base, budget=budget, sort=sort, fitting=fitting, excluded=excluded)
