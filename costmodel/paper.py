"""The seed paper, as data: its methods, models, reference configuration and numeric claims.

Nothing in the engine reads this module; ``costmodel report`` (and the CLI's defaults that follow
the paper) do. Each claim is a plain record (:class:`Claim`): its text and the paper's figure per
model (the citation, as printed), the configurations it compares (a method against a reference
method, at the report's base step or at another step), the quantity (a memory group, a FLOP
convention and phase, or backward FLOPs per forward FLOP; the cost itself or the slope of its law
over the ranks), the comparison (a ratio, ``1 - ratio``, ``ratio - 1`` or the value itself) and
the paper's figure as a numeric range. :func:`evaluate` and :func:`verdict` are the one generic
evaluator of every claim.

The ranges follow the paper's wording: a range as stated (``10-30%`` is 0.10..0.30); a single
figure to its last digit (``22%`` is 0.215..0.225); ``~`` or ``about`` within 25% of the figure
(``~20:1`` is 15..25); ``up to`` at most the figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

PAPER_TITLE = "From LLMs to Edge: Parameter-Efficient Fine-Tuning on Edge Devices"
# The paper's five methods in the paper's order, its models, and the methods of its Figure 5.
PAPER_METHODS: tuple[str, ...] = ("fft", "bn_head", "lora", "dora", "galore")
PAPER_MODELS: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
RANK_METHODS: tuple[str, ...] = ("lora", "dora", "galore")
METHOD_LABELS = {"fft": "FFT", "bn_head": "BN+H", "lora": "LoRA", "dora": "DoRA", "galore": "GaLore"}
MODEL_LABELS = {"mobilenet_v2": "MobileNetV2", "mobilenet_v3_small": "MobileNetV3-S",
                "mobilenet_v3_large": "MobileNetV3-L", "resnet18": "ResNet-18"}

# The paper's reference configuration: the step every claim is made at unless it says otherwise
# (StepConfig's defaults), and the ranks of its rank sweep (Figure 5) and of the measured points.
REFERENCE: dict[str, int] = {"batch": 1, "resolution": 224, "classes": 10, "rank": 4, "step": 2}
REFERENCE_RANKS: tuple[int, ...] = tuple(range(1, 65))
REFERENCE_MEASURE_RANKS: tuple[int, ...] = (1, 16, 64)

# The quantity's variants: (label, memory group or FLOP convention).
MEMORY_VARIANTS: tuple[tuple[str, str], ...] = (("sum of group peaks", "sum_of_group_peaks"), ("peak", "peak"))
OPT_VARIANT: tuple[tuple[str, str], ...] = (("OPT", "OPT"),)
FLOP_VARIANTS: tuple[tuple[str, str], ...] = (("stock", "torch"), ("exact", "exact"))

MEASURES = ("memory", "flops", "backward_per_forward")
STATISTICS = ("value", "slope")
COMPARISONS = ("value", "ratio", "reduction", "overhead")
FORMATS = ("percent", "ratio", "times")
CONFIGURATIONS = ("base", "step", "laws")


@dataclass(frozen=True)
class Figure:
    """The paper's figure for one model: as printed, and as the range of values it allows
    (``low``/``high`` None: the paper gives no number that a single model's value can be held to)."""

    text: str
    low: float | None = None
    high: float | None = None

    @property
    def checkable(self) -> bool:
        return self.low is not None or self.high is not None


def stated(text: str, value: float, digit: float) -> Figure:
    """A single figure, to its last printed digit: ``stated("22%", 0.22, 0.01)`` is 0.215..0.225."""
    return Figure(text, value - digit / 2, value + digit / 2)


def between(text: str, low: float | None, high: float | None) -> Figure:
    return Figure(text, low, high)


def about(text: str, value: float, share: float = 0.25) -> Figure:
    """``~20:1``, ``about 10%``: within ``share`` of the figure."""
    return Figure(text, value * (1 - share), value * (1 + share))


NO_FIGURE = Figure("-")


@dataclass(frozen=True)
class Claim:
    """One numeric claim of the paper, one row of the claims table per model (or one row for all,
    with ``over="mean"``).

    The value of a variant (a memory group or FLOP convention) on a model is, for ``measure``:
    ``memory`` the group's bytes, ``flops`` the convention's FLOPs of ``phase``,
    ``backward_per_forward`` backward over forward FLOPs; of the step of ``method`` (``statistic
    ="value"``, at ``step`` or the base step) or the slope of its law over the ranks (``"slope"``);
    then compared with the same of ``reference``: ``ratio`` a/b, ``reduction`` 1 - a/b,
    ``overhead`` a/b - 1, ``value`` a alone (no reference)."""

    text: str
    quantity: str  # how the table names the quantity: "1 - LoRA/FFT"
    method: str
    measure: str
    variants: tuple[tuple[str, str], ...]
    comparison: str
    fmt: str
    figures: tuple[tuple[str, Figure], ...] = ()  # model -> the paper's figure
    default: Figure = NO_FIGURE  # for a model not in ``figures``
    reference: str | None = None
    phase: str = "total"
    statistic: str = "value"
    step: int | None = None  # None: the report's base step
    over: str = "each"  # "each": one row per model; "mean": one row, the mean over the models
    configuration: str = "base"  # which configuration text the row cites: base, step, laws
    # The configuration's note for ``configuration="step"``: {NAME} replaced by the option
    # ``key`` of ``method`` for each (NAME, method, key) of ``note_options``.
    note: str = ""
    note_options: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, value, allowed in (("measure", self.measure, MEASURES), ("statistic", self.statistic, STATISTICS),
                                     ("comparison", self.comparison, COMPARISONS), ("fmt", self.fmt, FORMATS),
                                     ("configuration", self.configuration, CONFIGURATIONS),
                                     ("over", self.over, ("each", "mean"))):
            if value not in allowed:
                raise ValueError(f"claim {self.text!r}: {name} {value!r} is not one of {', '.join(allowed)}")
        if (self.reference is None) != (self.comparison == "value"):
            raise ValueError(f"claim {self.text!r}: a reference goes with a ratio, reduction or overhead")
        if self.statistic == "slope" and self.measure == "backward_per_forward":
            raise ValueError(f"claim {self.text!r}: a slope is of a memory group or a FLOP total")

    def figure(self, model: str) -> Figure:
        return dict(self.figures).get(model, self.default)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods whose steps the claim compares."""
        return (self.method,) if self.reference is None else (self.method, self.reference)

    def metric(self, variant: str) -> str:
        """The sweep metric whose law a slope claim reads (``costmodel.sweep.metric_names``)."""
        return f"memory.{variant}" if self.measure == "memory" else f"flops.{variant}.{self.phase}"


# --------------------------------------------------------------------------------------------
# The evaluator


class CostLike(Protocol):
    flops: Any
    memory: Any


class LawLike(Protocol):
    slope: float


CostLookup = Callable[[str, str, "int | None"], "CostLike | None"]  # (model, method, step)
LawLookup = Callable[[str, str, str], "LawLike | None"]  # (model, method, metric)


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _measure(claim: Claim, cost: CostLike, variant: str) -> float:
    if claim.measure == "memory":
        return cost.memory[variant]
    if claim.measure == "flops":
        return cost.flops[variant][claim.phase]
    return _div(cost.flops[variant]["backward"], cost.flops[variant]["forward"])


def _one(claim: Claim, model: str, variant: str, cost: CostLookup, law: LawLookup) -> float | None:
    values = []
    for method in claim.methods:
        if claim.statistic == "slope":
            found = law(model, method, claim.metric(variant))
            if found is None:
                return None
            values.append(found.slope)
        else:
            step_cost = cost(model, method, claim.step)
            if step_cost is None:
                return None
            values.append(_measure(claim, step_cost, variant))
    if claim.comparison == "value":
        return values[0]
    ratio = _div(values[0], values[1])
    return {"ratio": ratio, "reduction": 1 - ratio, "overhead": ratio - 1}[claim.comparison]


def evaluate(claim: Claim, model: str | Sequence[str], variant: str, cost: CostLookup,
             law: LawLookup) -> float | None:
    """The claim's value of ``variant`` on ``model`` (``over="mean"``: the mean over the models
    ``model`` lists), from ``cost(model, method, step)`` and ``law(model, method, metric)``, or
    None where one of them is missing."""
    if claim.over == "mean":
        values = [_one(claim, m, variant, cost, law) for m in model]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]
    assert isinstance(model, str)
    return _one(claim, model, variant, cost, law)


def verdict(figure: Figure, value: float | None) -> str | None:
    """Where ``value`` lies against the paper's figure: ``within``, ``below`` or ``above`` its
    range; None when there is no value or the figure gives no range."""
    if value is None or not figure.checkable or math.isnan(value):
        return None
    if figure.low is not None and value < figure.low:
        return "below"
    if figure.high is not None and value > figure.high:
        return "above"
    return "within"


def format_value(claim: Claim, value: float) -> str:
    if claim.fmt == "percent":
        return f"{value:.1%}"
    if claim.fmt == "ratio":
        return f"{value:.2f}:1"
    return f"{value:.2f}x"


# --------------------------------------------------------------------------------------------
# The claims


def _per_model(**figures: Figure) -> tuple[tuple[str, Figure], ...]:
    return tuple(figures.items())


_V3_48 = stated("48%", 0.48, 0.01)
_LOW_RANK_BWD = about("~1.2:1", 1.2)
_FLOP_REDUCTION = _per_model(mobilenet_v3_small=between("80% (up to 95%)", 0.795, 0.955),
                             mobilenet_v3_large=between("80% (up to 95%)", 0.795, 0.955),
                             resnet18=stated("57%", 0.57, 0.01), mobilenet_v2=between("up to 95%", None, 0.955))
_SVD_NOTE = "T={T}: GaLore refreshes its projector with an SVD"
_OPT_AVERAGE = Figure("65% on average")  # a claim about the mean: held to it in the "average" row

CLAIMS: tuple[Claim, ...] = (
    Claim("LoRA peak-memory reduction vs FFT", "1 - LoRA/FFT", "lora", "memory", MEMORY_VARIANTS, "reduction",
          "percent", reference="fft",
          figures=_per_model(mobilenet_v2=stated("22%", 0.22, 0.01), mobilenet_v3_small=_V3_48,
                             mobilenet_v3_large=_V3_48, resnet18=stated("67%", 0.67, 0.01))),
    Claim("DoRA memory overhead vs LoRA", "DoRA/LoRA - 1", "dora", "memory", MEMORY_VARIANTS, "overhead",
          "percent", reference="lora",
          figures=_per_model(mobilenet_v2=between("49-51% (Fig. 1 caption)", 0.49, 0.51),
                             mobilenet_v3_small=stated("29%", 0.29, 0.01), mobilenet_v3_large=stated("29%", 0.29, 0.01),
                             resnet18=stated("58%", 0.58, 0.01))),
    Claim("BN+H peak-memory reduction vs FFT", "1 - BN+H/FFT", "bn_head", "memory", MEMORY_VARIANTS, "reduction",
          "percent", reference="fft",
          figures=_per_model(mobilenet_v2=stated("85%", 0.85, 0.01), mobilenet_v3_small=stated("52%", 0.52, 0.01),
                             mobilenet_v3_large=stated("52%", 0.52, 0.01))),
    Claim("GaLore optimizer-state reduction vs FFT", "1 - GaLore OPT/FFT OPT", "galore", "memory", OPT_VARIANT,
          "reduction", "percent", reference="fft", default=_OPT_AVERAGE),
    Claim("GaLore optimizer-state reduction vs FFT", "mean over the models", "galore", "memory", OPT_VARIANT,
          "reduction", "percent", reference="fft", over="mean",
          default=stated("65% on average", 0.65, 0.01)),
    Claim("GaLore peak-memory reduction vs FFT", "1 - GaLore/FFT", "galore", "memory", MEMORY_VARIANTS, "reduction",
          "percent", reference="fft",
          figures=_per_model(**{m: between("5-10%", 0.05, 0.10)
                                for m in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")})),
    Claim("LoRA optimizer state as a share of GaLore's", "LoRA OPT/GaLore OPT", "lora", "memory", OPT_VARIANT,
          "ratio", "percent", reference="galore", default=about("about 10%", 0.10)),
    Claim("FFT backward:forward FLOPs", "backward/forward", "fft", "backward_per_forward", FLOP_VARIANTS, "value",
          "ratio", figures=_per_model(mobilenet_v2=about("~20:1", 20), mobilenet_v3_small=about("~20:1", 20),
                                      mobilenet_v3_large=about("~20:1", 20), resnet18=about("~2:1", 2))),
    *(Claim(f"{METHOD_LABELS[m]} backward:forward FLOPs", "backward/forward", m, "backward_per_forward",
            FLOP_VARIANTS, "value", "ratio",
            figures=_per_model(mobilenet_v2=_LOW_RANK_BWD, mobilenet_v3_small=_LOW_RANK_BWD,
                               mobilenet_v3_large=_LOW_RANK_BWD))
      for m in ("lora", "dora")),
    *(Claim(f"{METHOD_LABELS[m]} FLOP reduction vs FFT", f"1 - {METHOD_LABELS[m]}/FFT, total of the step", m,
            "flops", FLOP_VARIANTS, "reduction", "percent", reference="fft", figures=_FLOP_REDUCTION)
      for m in ("lora", "dora")),
    Claim("GaLore FLOP overhead vs FFT (SVD step)", "GaLore/FFT - 1, both at step 1", "galore", "flops",
          FLOP_VARIANTS, "overhead", "percent", reference="fft", step=1, configuration="step",
          default=between("10-30%", 0.10, 0.30), note=_SVD_NOTE, note_options=(("T", "galore", "update_proj_gap"),)),
    Claim("GaLore FLOPs against LoRA's", "GaLore/LoRA", "galore", "flops", FLOP_VARIANTS, "ratio", "times",
          reference="lora", default=between("2-20x", 2, 20)),
    Claim("GaLore memory against LoRA's", "GaLore/LoRA", "galore", "memory", MEMORY_VARIANTS, "ratio", "times",
          reference="lora", default=between("1.13-2x", 1.13, 2)),
    *(Claim(f"GaLore FLOP slope against {METHOD_LABELS[r]}'s", f"slope(GaLore)/slope({METHOD_LABELS[r]}), total FLOPs",
            "galore", "flops", FLOP_VARIANTS, "ratio", "times", reference=r, statistic="slope",
            configuration="laws", default=about("~9x", 9))
      for r in ("lora", "dora")),
    *(Claim(f"{METHOD_LABELS[m]} memory slope against GaLore's", f"slope({METHOD_LABELS[m]})/slope(GaLore)", m,
            "memory", MEMORY_VARIANTS, "ratio", "times", reference="galore", statistic="slope",
            configuration="laws", default=between("2-4x", 2, 4))
      for m in ("lora", "dora")),
)


def claim_steps(claims: Sequence[Claim] = CLAIMS) -> dict[int, tuple[str, ...]]:
    """The steps other than the base step that claims compare, each with its methods (the
    paper's order)."""
    steps: dict[int, dict[str, None]] = {}
    for claim in claims:
        if claim.step is not None:
            steps.setdefault(claim.step, {}).update(dict.fromkeys(claim.methods))
    return {step: paper_order(tuple(methods)) for step, methods in steps.items()}


def paper_order(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` with the paper's first, in the paper's order, then the others as given."""
    return tuple(m for m in PAPER_METHODS if m in methods) + tuple(m for m in methods if m not in PAPER_METHODS)

