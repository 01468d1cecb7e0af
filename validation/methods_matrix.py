"""The LoRA / DoRA / GaLore acceptance matrix: every prediction held against a live measurement.

    python -m costmodel.validation.methods_matrix [--models ...] [--methods lora dora galore]
        [--ranks 1 4 16 64] [--shapes 1x224 8x32] [--steps 1 2] [--gaps 200 1] [--real]

For every configuration (GaLore also with each update_proj_gap T in ``--gaps``; T = 1 runs an SVD
on every step) it predicts the step (``costmodel.prediction.predict_config``) and measures it
(``costmodel.validation.measure.measure``, under FakeTensorMode unless ``--real``: the same
numbers, far faster), prints one line per configuration, then the worst error of each field for
each method against the acceptance bars: FLOPs equal per phase in both conventions; PARAM,
BUFFER, GRAD, ACT, TEMP, OPT, OTH and the peak equal to the byte. Exits with status 1 if any bar
is broken.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from costmodel.config import StepConfig
from costmodel.result import FLOP_CONVENTIONS, PHASES, StepCost, relative_error

MODELS: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
METHODS: tuple[str, ...] = ("lora", "dora", "galore")
# The README's claim: every group and the peak equal to the byte.
MEMORY_BARS: dict[str, float] = {"PARAM": 0.0, "BUFFER": 0.0, "GRAD": 0.0, "OPT": 0.0, "OTH": 0.0,
                                 "ACT": 0.0, "peak": 0.0, "TEMP": 0.0}
FLOP_FIELDS: tuple[str, ...] = tuple(f"{conv} {phase}" for conv in FLOP_CONVENTIONS for phase in PHASES)


@dataclass(frozen=True)
class Errors:
    """One configuration's errors: FLOP differences (predicted - measured) and memory relative errors."""

    config: StepConfig
    flops: dict[str, int]
    memory: dict[str, float]
    trainable: int  # predicted - measured trainable parameters

    def broken(self) -> list[str]:
        bad = [f"{field} {diff:+,}" for field, diff in self.flops.items() if diff]
        bad += [f"{group} {error:.3%}" for group, error in self.memory.items() if error > MEMORY_BARS[group]]
        if self.trainable:
            bad.append(f"trainable {self.trainable:+,}")
        return bad


def errors(predicted: StepCost, measured: StepCost) -> Errors:
    flops = {f"{conv} {phase}": predicted.flops[conv][phase] - measured.flops[conv][phase]
             for conv in FLOP_CONVENTIONS for phase in PHASES}
    memory = {group: relative_error(predicted.memory[group], measured.memory[group]) for group in MEMORY_BARS}
    return Errors(predicted.config, flops, memory, predicted.trainable_params - measured.trainable_params)


def configurations(models: Sequence[str], methods: Sequence[str], ranks: Sequence[int],
                   shapes: Sequence[tuple[int, int]], steps: Sequence[int],
                   gaps: Sequence[int]) -> Iterator[StepConfig]:
    for model, method, rank, (batch, resolution), step in itertools.product(models, methods, ranks, shapes, steps):
        for gap in (gaps if method == "galore" else (None,)):
            yield StepConfig(model=model, method=method, rank=rank, batch=batch, resolution=resolution, step=step,
                             options={} if gap is None else {"update_proj_gap": gap})


def describe(config: StepConfig) -> str:
    text = (f"{config.model} {config.method} r={config.rank} B={config.batch} R={config.resolution} "
            f"k={config.step}")
    return text + (f" T={config.options.get('update_proj_gap', 200)}" if config.method == "galore" else "")


def summary(results: list[Errors]) -> str:
    """Per method, the worst error of each field and the configuration where it occurs."""
    lines = []
    for method in dict.fromkeys(e.config.method for e in results):
        rows = [e for e in results if e.config.method == method]
        lines += ["", f"== {method}: worst error per field over {len(rows)} configurations",
                  f"{'field':<20}{'worst':>16}  {'bar':>6}  where"]
        for field in FLOP_FIELDS:
            worst = max(rows, key=lambda e: abs(e.flops[field]))
            lines.append(f"{'FLOPs ' + field:<20}{worst.flops[field]:>+16,}  {'0':>6}  {describe(worst.config)}")
        for group, bar in MEMORY_BARS.items():
            worst = max(rows, key=lambda e: e.memory[group])
            lines.append(f"{group:<20}{worst.memory[group]:>16.4%}  {bar:>6.0%}  {describe(worst.config)}")
        worst = max(rows, key=lambda e: abs(e.trainable))
        lines.append(f"{'trainable params':<20}{worst.trainable:>+16,}  {'0':>6}  {describe(worst.config)}")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    batch, _, resolution = text.partition("x")
    return int(batch), int(resolution)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.validation.methods_matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(1, 224), (8, 32)], metavar="BxR")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gaps", nargs="+", type=int, default=[200, 1], help="GaLore's update_proj_gap values")
    parser.add_argument("--real", action="store_true", help="measure with real tensors instead of FakeTensorMode")
    args = parser.parse_args(argv)

    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    results: list[Errors] = []
    started = time.perf_counter()
    for config in configurations(args.models, args.methods, args.ranks, args.shapes, args.steps, args.gaps):
        t0 = time.perf_counter()
        predicted = predict_config(config)
        t1 = time.perf_counter()
        measured = measure(config, fake=not args.real)
        t2 = time.perf_counter()
        result = errors(predicted, measured)
        results.append(result)
        broken = result.broken()
        worst_act = max(result.memory["ACT"], result.memory["peak"])
        print(f"{describe(config):<52} {'OK' if not broken else 'BROKEN: ' + '; '.join(broken)}"
              f"  (ACT/peak {worst_act:.3%}, TEMP {result.memory['TEMP']:.3%}; "
              f"predict {t1 - t0:.2f}s, measure {t2 - t1:.1f}s)", flush=True)
    print(summary(results))
    failures = [r for r in results if r.broken()]
    print(f"\n{len(results)} configurations, {len(failures)} outside the bars, "
          f"{time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
