"""The budget planner: which methods and ranks fit a memory and/or FLOP budget.

Every method the predictor can cost is predicted at every rank asked for; a candidate fits when
each given limit holds. The fitting ones are listed best first, and every excluded one says which
limit it breaks and by how much (or why it could not be costed at all).

With a device (``Budget.for_device``, ``costmodel plan --device``) the memory budget is the device's
usable memory (``costmodel.devices``); a ``--memory`` beside it is refused, since two sources of
one limit leave unclear which one holds (a device file with its own ``usable_bytes`` gives a
tighter one). :func:`maximize` finds, per method, the largest batch size, resolution or rank
that meets the budget, by exponential search and bisection over predictions.

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

from costmodel.config import MAX_INT, StepConfig
from costmodel.devices import DeviceProfile, fit_of, resolve_device
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_GROUPS, StepCost, format_table, setup_label
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
    # The device whose usable memory ``memory`` is (``for_device``), for the header and the JSON.
    device: DeviceProfile | None = None

    @classmethod
    def for_device(cls, device: "str | DeviceProfile", flops: int | None = None, memory_metric: str = "peak",
                   flop_convention: str = "exact") -> "Budget":
        """The memory budget of ``device`` (an id, a profile file or a profile): its usable bytes."""
        profile = resolve_device(device)
        return cls(memory=profile.usable, flops=flops, memory_metric=memory_metric,
                   flop_convention=flop_convention, device=profile)

    def __post_init__(self) -> None:
        if self.memory is None and self.flops is None:
            raise CostModelError("give a budget: --memory (e.g. 64MiB), --device (e.g. jetson-nano) and/or --flops (e.g. 2GFLOP)")
        if self.memory_metric not in MEMORY_METRICS:
            raise CostModelError(f"--memory-metric must be one of {', '.join(MEMORY_METRICS)}, got {self.memory_metric!r}")
        if self.flop_convention not in FLOP_CONVENTIONS:
            raise CostModelError(f"--flops-convention must be one of {', '.join(FLOP_CONVENTIONS)}, got {self.flop_convention!r}")

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory ({self.memory_metric}) <= {format_bytes(self.memory)}"
                         + ("" if self.device is None else f" (on {self.device.describe()})"))
        if self.flops is not None:
            parts.append(f"FLOPs ({self.flop_convention}, total) <= {format_flops(self.flops)}")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"memory": self.memory, "memory_metric": self.memory_metric,
                                "flops": self.flops, "flop_convention": self.flop_convention}
        if self.device is not None:
            data["device"] = {"id": self.device.id, "name": self.device.name, "kind": self.device.kind,
                              "memory_bytes": self.device.capacity, "usable_bytes": self.device.usable}
        return data

    def notes(self) -> list[str]:
        """What a reader of the plan must know about the budget (a CUDA device's allocator)."""
        if self.device is not None and self.device.kind == "cuda":
            return [f"note: {fit_of(0, self.device).notes[0]}"]
        return []

    def limits(self, cost: StepCost) -> list["Limit"]:
        limits = []
        if self.memory is not None:  # a device's budget is the same limit: its usable memory
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
            "budget": self.budget.to_dict(),
            "order": self.sort,
            "fitting": [c.to_dict() for c in self.fitting],
            "excluded": [c.to_dict() for c in self.excluded],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        c = self.base
        lines = [f"{c.model}, batch={c.batch}, resolution={c.resolution}, classes={c.classes}, step={c.step}"
                 f"{setup_label(c)}; budget: {self.budget.describe()}", ""]
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
        lines += self.budget.notes()
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


def closest(candidates: Sequence[Candidate]) -> Candidate | None:
    """Of candidates that do not fit, the one that comes closest: the smallest worst overrun
    (as a share of its limit)."""
    costed = [c for c in candidates if c.cost is not None and c.limits]
    if not costed:
        return None
    return min(costed, key=lambda c: max(-limit.margin / limit.budget for limit in c.limits))


def nothing_fits(plan_result: Plan) -> CostModelError:
    """The refusal of a budget that no candidate meets, naming the one that came closest."""
    near = closest(plan_result.excluded)
    if near is None:
        return CostModelError(f"nothing could be costed within {plan_result.budget.describe()}")
    return CostModelError(f"nothing fits {plan_result.budget.describe()}; closest: {near.label}: {near.reason()}")


# -- the largest batch size, resolution or rank that fits

VARIABLES: tuple[str, ...] = ("batch", "resolution", "rank")
# Values tried, doubling from 1, to find the smallest one the predictor accepts (a batch of 1
# under batch norm on a 1x1 map, a resolution too small for the model's strides are refused):
# 1, 2, 4, ... 1024. A method refused at all of them is reported as not predictable.
SMALLEST_PROBES = 11


@dataclass
class Maximum:
    """The largest ``variable`` at which ``method`` meets the budget (``value``), with its cost.

    ``value`` None: not even ``smallest`` (the smallest value that predicts) fits; ``cost`` and
    ``limits`` are then those of ``smallest``, saying by how much it is over. ``rank_independent``:
    the method's cost does not depend on the rank (``variable == "rank"``), so there is no largest
    rank, only whether it fits. ``capped``: every value up to the largest accepted (2**31 - 1)
    fits. ``predictions``: how many predictions the search took."""

    method: str
    variable: str
    value: int | None = None
    smallest: int | None = None
    cost: StepCost | None = None
    limits: list[Limit] = field(default_factory=list)
    refused: str | None = None
    rank_independent: bool = False
    capped: bool = False
    predictions: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.refused is None and (self.value is not None or (self.rank_independent and bool(self.limits)
                                                                    and all(l.fits for l in self.limits)))

    @property
    def breakdown(self) -> dict[str, int]:
        """The memory groups (and peak) at ``value`` (or at ``smallest`` when nothing fits)."""
        return {} if self.cost is None else {name: self.cost.memory[name] for name in (*MEMORY_GROUPS, "peak")}

    def describe(self) -> str:
        if self.refused is not None:
            return f"{self.method}: not predicted: {self.refused}"
        over = "; ".join(limit.describe() for limit in self.limits if not limit.fits)
        if self.rank_independent:
            verdict = "fits" if self.fits else f"does not fit: {over}"
            return f"{self.method}: its cost does not depend on the rank; {verdict}"
        if self.value is None:
            return f"{self.method}: nothing fits, not even {self.variable}={self.smallest}: {over}"
        capped = f" (every {self.variable} up to {MAX_INT} fits)" if self.capped else ""
        return f"{self.method}: largest {self.variable} {self.value}{capped}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "variable": self.variable, "value": self.value, "fits": self.fits,
                "smallest": self.smallest, "rank_independent": self.rank_independent, "capped": self.capped,
                "refused": self.refused, "predictions": self.predictions, "notes": self.notes,
                "limits": [limit.to_dict() for limit in self.limits],
                "memory": None if self.cost is None else self.cost.memory,
                "trainable_params": None if self.cost is None else self.cost.trainable_params,
                "flops": None if self.cost is None else self.cost.flops}


def _takes_rank(method: str) -> bool:
    """Whether ``method``'s plugin declares that it uses the rank (undeclared: it does)."""
    from costmodel.options import method_options
    from costmodel.registry import default_plugin_manager

    declared = method_options(default_plugin_manager(), method)
    return True if declared is None else bool(declared.takes_rank)


def largest_fitting(config: StepConfig, variable: str, budget: Budget, predictor: Predictor) -> Maximum:
    """The largest ``variable`` (batch, resolution or rank) of ``config`` that meets ``budget``.

    The budget's costs grow with each of the three (more images, larger images, larger adapters),
    so the values that fit are the ones below a threshold, found without scanning: first the
    smallest value that predicts (doubling from 1 over the values the predictor refuses, then
    bisecting between the last refused and the first accepted), then doubling while the value
    fits, then bisecting between the last that fits and the first that does not. A value refused
    above the smallest (a rank a layer cannot take) counts as one that does not fit, with a note.
    A handful of predictions (about 2 log2 of the answer)."""
    if variable not in VARIABLES:
        raise CostModelError(f"--maximize must be one of {', '.join(VARIABLES)}, got {variable!r}")
    result = Maximum(method=config.method, variable=variable)
    answers: dict[int, StepCost | CostModelError] = {}

    def at(value: int) -> StepCost | CostModelError:
        if value not in answers:
            result.predictions += 1
            try:
                answers[value] = predictor(config.replace(**{variable: value}))
            except CostModelError as error:
                answers[value] = error
        return answers[value]

    def meets(value: int) -> bool:
        answer = at(value)
        if isinstance(answer, CostModelError):
            result.notes.append(f"{variable}={value} not predicted ({answer}); taken as not fitting")
            return False
        return all(limit.fits for limit in budget.limits(answer))

    if variable == "rank" and not _takes_rank(config.method):
        result.rank_independent = True
        answer = at(config.rank)
        if isinstance(answer, CostModelError):
            result.refused = str(answer)
        else:
            result.cost, result.limits = answer, budget.limits(answer)
        return result
    # The smallest value that predicts.
    refused_below, accepted = 0, None
    for exponent in range(SMALLEST_PROBES):
        if not isinstance(at(2**exponent), CostModelError):
            accepted = 2**exponent
            break
        refused_below = 2**exponent
    if accepted is None:
        result.refused = str(at(refused_below))
        return result
    while accepted - refused_below > 1:
        middle = (accepted + refused_below) // 2
        if isinstance(at(middle), CostModelError):
            refused_below = middle
        else:
            accepted = middle
    result.smallest = accepted
    if not meets(accepted):
        cost = at(accepted)
        result.cost, result.limits = cost, budget.limits(cost)  # type: ignore[arg-type]
        return result
    # Doubling while it fits, then bisection.
    fitting, failing = accepted, None
    while failing is None:
        if fitting == MAX_INT:
            result.capped = True
            break
        candidate = min(fitting * 2, MAX_INT)
        if meets(candidate):
            fitting = candidate
        else:
            failing = candidate
    while failing is not None and failing - fitting > 1:
        middle = (fitting + failing) // 2
        if meets(middle):
            fitting = middle
        else:
            failing = middle
    cost = at(fitting)
    result.value, result.cost, result.limits = fitting, cost, budget.limits(cost)  # type: ignore[arg-type]
    return result


def maximize(config: StepConfig, device: "str | DeviceProfile | Budget", variable: str,
             predictor: Predictor | None = None) -> Maximum:
    """The largest ``variable`` ("batch", "resolution" or "rank") at which ``config`` (its method,
    and its other sizes) fits ``device`` (an id, a profile file, a profile, or a :class:`Budget`),
    with the memory group breakdown there. ``Maximum.value`` is None when not even the smallest
    value fits. ``predictor``: the analytic engine unless given (one configuration a call)."""
    from costmodel.sweep import default_predictor

    budget = device if isinstance(device, Budget) else Budget.for_device(device)
    return largest_fitting(config, variable, budget, predictor or default_predictor())


@dataclass
class MaximumPlan:
    """:func:`maximize` for every method of a plan."""

    base: StepConfig
    budget: Budget
    variable: str
    maxima: list[Maximum]

    def to_dict(self) -> dict[str, Any]:
        config = self.base.to_dict()
        config.pop("method")
        config.pop(self.variable)
        return {"config": config, "budget": self.budget.to_dict(), "maximize": self.variable,
                "methods": [m.to_dict() for m in self.maxima]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        c = self.base
        fixed = {"batch": f"batch={c.batch}", "resolution": f"resolution={c.resolution}",
                 "rank": f"rank={c.rank} (methods that take one)"}
        setting = ", ".join(text for name, text in fixed.items() if name != self.variable)
        lines = [f"{c.model}, {setting}, classes={c.classes}, step={c.step}; budget: {self.budget.describe()}", "",
                 f"the largest {self.variable} that fits, per method (memory in MiB at that {self.variable}):"]
        rows = []
        for m in self.maxima:
            if m.cost is None or not m.fits:
                continue
            margins = ", ".join(f"{format_bytes(l.margin) if l.name.startswith('memory') else format_flops(l.margin)} "
                                f"({l.margin / l.budget:.1%}) to spare" for l in m.limits)
            value = "any" if m.rank_independent else f"{m.value}{'+' if m.capped else ''}"
            rows.append([m.method, value, *(f"{m.cost.memory[g] / 2**20:,.1f}" for g in (*MEMORY_GROUPS, "peak")),
                         margins, str(m.predictions)])
        if rows:
            lines += ["  " + line for line in format_table(
                ["method", self.variable, *MEMORY_GROUPS, "peak", "margin", "predictions"], rows, last_left=False)]
        others = [m for m in self.maxima if m.cost is None or not m.fits]
        if others:
            lines += ["", f"{len(others)} with nothing that fits:" if rows else "nothing fits:"]
            lines += [f"  {m.describe()}" for m in others]
        lines += self.budget.notes()
        return "\n".join(lines)


def maximize_methods(base: StepConfig, budget: Budget, variable: str, predictor: Predictor,
                     methods: Sequence[str] | None = None, progress: bool = True) -> MaximumPlan:
    """:func:`largest_fitting` for each method (every registered one when ``methods`` is None)."""
    from costmodel.sweep import registered_methods

    if variable not in VARIABLES:
        raise CostModelError(f"--maximize must be one of {', '.join(VARIABLES)}, got {variable!r}")
    names = list(registered_methods() if methods is None else methods)
    maxima = []
    with progress_bar(len(names), "searching", progress, unit="method") as bar:
        for method in names:
            maxima.append(largest_fitting(base.replace(method=method), variable, budget, predictor))
            bar.update()
    return MaximumPlan(base=base, budget=budget, variable=variable, maxima=maxima)


def no_maximum(result: MaximumPlan) -> CostModelError:
    """The refusal of a budget that no method meets at any value, naming what came closest."""
    costed = [m for m in result.maxima if m.cost is not None and m.limits]
    if not costed:
        return CostModelError(f"no method could be predicted: "
                              + "; ".join(m.describe() for m in result.maxima))
    near = min(costed, key=lambda m: max(-limit.margin / limit.budget for limit in m.limits))
    return CostModelError(f"nothing fits {result.budget.describe()}; closest: {near.describe()}")
