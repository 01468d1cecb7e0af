"""How much faster a prediction is than a measurement, per model, in one run.

    python benchmarks/speed.py [--models ...] [--method fft] [--batch 1] [--resolution 224] [--no-real]

For each model it times, at the given configuration:

- ``measure real``: the runtime reference on real tensors (``costmodel measure``);
- ``measure fake``: the same under FakeTensorMode (``costmodel measure --fake``);
- ``predict cold``: the first prediction of the model in this process (build on meta, trace,
  propagate shapes on meta tensors, cost, simulate);
- ``predict warm``: a prediction once the structure's shape template exists (what every later
  prediction of the model costs, at any batch and resolution the template accepts).

Then it shows that a warm prediction does not grow with batch or resolution, and what a rank
of a low-rank method costs alone and within a sweep of ranks 1-64 predicted together
(``costmodel.ranks``: one trace, sizes as formulas of the rank, every plugin asked once). Timings
are wall-clock and include Python's noise; the machine's other load shows up as spread between runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from costmodel.config import StepConfig
from costmodel.prediction import clear_cache, predict_config, traced_step
from costmodel.ranks import predict_ranks
from costmodel.registry import default_plugin_manager
from costmodel.shapes import TEMPLATE_AFTER

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def warm_predict_seconds(config: StepConfig, repeat: int = 5) -> float:
    """Median seconds of predicting ``config`` through its structure's shape template."""
    traced = traced_step(config, default_plugin_manager())
    # Teach the structure its shape template: TEMPLATE_AFTER other shapes in the same regime
    # (batch 1 is a regime of its own), then one more, which builds it.
    other_batch = config.batch if config.batch == 1 else config.batch + 1
    for i in range(TEMPLATE_AFTER + 1):
        predict_config(config.replace(batch=other_batch, resolution=config.resolution + 8 * (i + 1)))
    times = []
    for _ in range(repeat):
        traced.shape_cache.pop((config.batch, config.resolution), None)  # served by the template, not the cache
        times.append(timed(lambda: predict_config(config)))
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--method", default="fft")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--no-real", action="store_true", help="skip the (slow) real measurement")
    parser.add_argument("--rank-methods", nargs="+", default=["lora", "dora", "galore"])
    args = parser.parse_args(argv)

    from costmodel.validation.measure import measure

    rows = []
    for model in args.models:
        config = StepConfig(model=model, method=args.method, batch=args.batch, resolution=args.resolution)
        real = float("nan") if args.no_real else timed(lambda: measure(config, fake=False))
        fake = timed(lambda: measure(config, fake=True))
        clear_cache()
        cold = timed(lambda: predict_config(config))
        warm = warm_predict_seconds(config)
        rows.append((model, real, fake, cold, warm))
        print(f"  {model}: done", file=sys.stderr, flush=True)

    print(f"{args.method}, batch={args.batch}, resolution={args.resolution}, step 2")
    print(f"{'model':<20}{'measure real':>14}{'measure fake':>14}{'predict cold':>14}{'predict warm':>14}"
          f"{'fake/cold':>11}{'fake/warm':>11}{'real/warm':>11}")
    for model, real, fake, cold, warm in rows:
        print(f"{model:<20}{real:>13.2f}s{fake:>13.2f}s{cold * 1e3:>12.1f}ms{warm * 1e3:>12.1f}ms"
              f"{fake / cold:>10.0f}x{fake / warm:>10.0f}x{real / warm:>10.0f}x")

    print("\nwarm prediction against batch and resolution (ms):")
    shapes = [(1, 224), (8, 224), (64, 224), (8, 512), (64, 512)]
    print(f"{'model':<20}" + "".join(f"{f'B={b} R={r}':>14}" for b, r in shapes))
    for model in args.models:
        cells = [warm_predict_seconds(StepConfig(model=model, method=args.method, batch=b, resolution=r))
                 for b, r in shapes]
        print(f"{model:<20}" + "".join(f"{seconds * 1e3:>14.1f}" for seconds in cells))

    print("\nprediction against the rank: one rank alone (mean of r=2, 16, 64, each a new structure) and"
          " ranks 1-64 together (costmodel.ranks), per rank; 'fake' is one measurement under"
          " FakeTensorMode at r=4")
    print(f"{'model':<20}{'method':<8}{'alone':>10}{'together':>10}{'alone/together':>16}{'fake':>10}"
          f"{'fake/together':>15}")
    sweep_ranks = range(1, 65)
    sweep_seconds = 0.0
    for model in args.models:
        for method in args.rank_methods:
            base = StepConfig(model=model, method=method, batch=args.batch, resolution=args.resolution)
            clear_cache()
            alone = statistics.mean(timed(lambda: predict_config(base.replace(rank=rank))) for rank in (2, 16, 64))
            clear_cache()
            together = timed(lambda: predict_ranks(base, sweep_ranks))
            sweep_seconds += together
            per_rank = together / len(sweep_ranks)
            fake = timed(lambda: measure(base.replace(rank=4), fake=True))
            print(f"{model:<20}{method:<8}{alone * 1e3:>8.1f}ms{per_rank * 1e3:>8.1f}ms{alone / per_rank:>15.0f}x"
                  f"{fake * 1e3:>8.0f}ms{fake / per_rank:>14.0f}x")
    print(f"{len(args.models) * len(args.rank_methods) * len(sweep_ranks)} predictions (ranks 1-64) together in"
          f" this one process: {sweep_seconds:.2f} s (`costmodel sweep` also spreads them over the CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
