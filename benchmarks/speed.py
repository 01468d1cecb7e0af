"""How much faster a prediction is than a measurement, per model, in one run.

    python benchmarks/speed.py [--models ...] [--method fft] [--batch 1] [--resolution 224] [--no-real]
    python benchmarks/speed.py --quick          # a short smoke run of everything (a few minutes)
    python benchmarks/speed.py --goals-only     # only the speed goals of issue 14

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

Last, it measures every speed goal of issue 14 in this one run and prints a summary table (goal,
measured, met or not). Each fresh-process figure runs in its own subprocess (this script, called
with ``--child``) so that no cache of this process helps it:

- (a) cold: the first prediction of a model in a fresh process, against ``measure --fake`` of the
  same configuration in another fresh process (both timed around the call, after the imports,
  which are reported apart: torch's Python meta kernels import ``torch._dynamo`` on first use, so
  the child imports it first, for the prediction and the measurement alike);
- (b) warm: the same configuration predicted again in that process (median of repeats);
- (c) ``costmodel predict`` from the shell against ``python -c "import torch"`` (interleaved runs,
  medians);
- (d) prediction time over batch, resolution and rank for one model (each point a shape or rank
  the process has not predicted before) and its max/min ratio;
- (e) a model too big to build: convnext_large at B=256, R=512, fft, in a fresh process: the
  prediction's wall time and the process's peak RSS;
- (f) a design-space sweep (models x methods x ranks x batch x resolution) through
  ``costmodel.ranks.predict_many`` (one per model and method, as ``costmodel sweep`` does) in one
  fresh process, one CPU: N configurations timed and the
  time for 10,000 extrapolated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from costmodel.config import StepConfig
from costmodel.prediction import clear_cache, predict_config, traced_step
from costmodel.ranks import predict_many, predict_ranks
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child(json.loads(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--method", default="fft")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--no-real", action="store_true", help="skip the (slow) real measurement")
    parser.add_argument("--rank-methods", nargs="+", default=["lora", "dora", "galore"])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run: one model, no real measurement, fewer points and repetitions")
    parser.add_argument("--goals-only", action="store_true", help="only the speed goals (skip the tables above them)")
    args = parser.parse_args(argv)
    if args.quick:
        if args.models == list(MODELS):
            args.models = ["mobilenet_v2"]
        args.no_real = True  # and no measurement under FakeTensorMode in the tables: the goals measure it
        args.rank_methods = args.rank_methods[:1]
    if not args.goals_only:
        details(args)
    goals(quick=args.quick)
    return 0


def details(args: argparse.Namespace) -> None:
    """The per-model tables: measurement against prediction, warm prediction over shapes, ranks."""

    from costmodel.validation.measure import measure

    rows = []
    for model in args.models:
        config = StepConfig(model=model, method=args.method, batch=args.batch, resolution=args.resolution)
        real = float("nan") if args.no_real else timed(lambda: measure(config, fake=False))
        fake = float("nan") if args.quick else timed(lambda: measure(config, fake=True))
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
    shapes = [(1, 224), (64, 512)] if args.quick else [(1, 224), (8, 224), (64, 224), (8, 512), (64, 512)]
    print(f"{'model':<20}" + "".join(f"{f'B={b} R={r}':>14}" for b, r in shapes))
    for model in args.models:
        cells = [warm_predict_seconds(StepConfig(model=model, method=args.method, batch=b, resolution=r))
                 for b, r in shapes]
        print(f"{model:<20}" + "".join(f"{seconds * 1e3:>14.1f}" for seconds in cells))

    sweep_ranks = range(1, 17) if args.quick else range(1, 65)
    print(f"\nprediction against the rank: one rank alone (mean of r=2, 16, 64, each a new structure) and"
          f" ranks {sweep_ranks.start}-{sweep_ranks.stop - 1} together (costmodel.ranks), per rank; 'fake' is one"
          f" measurement under FakeTensorMode at r=4{' (skipped with --quick)' if args.quick else ''}")
    print(f"{'model':<20}{'method':<8}{'alone':>10}{'together':>10}{'alone/together':>16}{'fake':>10}"
          f"{'fake/together':>15}")
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
            fake = float("nan") if args.quick else timed(lambda: measure(base.replace(rank=4), fake=True))
            print(f"{model:<20}{method:<8}{alone * 1e3:>8.1f}ms{per_rank * 1e3:>8.1f}ms{alone / per_rank:>15.0f}x"
                  f"{fake * 1e3:>8.0f}ms{fake / per_rank:>14.0f}x")
    print(f"{len(args.models) * len(args.rank_methods) * len(sweep_ranks)} predictions (ranks {sweep_ranks.start}-"
          f"{sweep_ranks.stop - 1}) together in"
          f" this one process: {sweep_seconds:.2f} s (`costmodel sweep` also spreads them over the CPUs)")


# ---------------------------------------------------------------------------------------------
# The speed goals of issue 14, each measured in this run


def _warm_up_imports(measuring: bool = False) -> float:
    """Import what a prediction (or a measurement) needs, in this fresh process; seconds taken.

    ``torch._dynamo`` is imported by torch itself the first time one of its Python meta kernels or
    dispatch modes runs (``torch._compile._disable_dynamo``); importing it here keeps that one-off
    cost out of both timed calls alike."""
    started = time.perf_counter()
    import torch._dynamo  # noqa: F401
    import torchvision  # noqa: F401

    import costmodel.prediction  # noqa: F401
    import costmodel.ranks  # noqa: F401

    default_plugin_manager()
    if measuring:
        import importlib
        import importlib.util

        import costmodel.validation.measure  # noqa: F401

        for name in ("peft", "galore_torch"):  # the reference's own libraries, imported when first used
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
    return time.perf_counter() - started


def _child(job: dict) -> int:
    """One fresh-process measurement, printed as one JSON line (``--child JOB``)."""
    kind = job["kind"]
    imports = _warm_up_imports(measuring=kind == "measure_fake")
    out: dict[str, object] = {"imports": imports}
    if kind == "predict":
        config = StepConfig(**job["config"])
        out["cold"] = timed(lambda: predict_config(config))
        out["warm"] = statistics.median(timed(lambda: predict_config(config)) for _ in range(job.get("repeat", 20)))
    elif kind == "measure_fake":
        from costmodel.validation.measure import measure

        config = StepConfig(**job["config"])
        out["fake"] = timed(lambda: measure(config, fake=True))
    elif kind == "sweep":
        out.update(_sweep_configurations(job))
    else:
        raise SystemExit(f"unknown child job {kind!r}")
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(out))
    return 0


def _sweep_configurations(job: dict) -> dict[str, object]:
    """Every (model, method) over every batch, resolution and rank, as ``costmodel sweep`` predicts
    them: one ``predict_many`` per model and method."""
    ranks = list(range(1, job["ranks"] + 1))
    count = failed = 0
    started = time.perf_counter()
    for model in job["models"]:
        for method in job["methods"]:
            points = [(b, r, k) for b in job["batches"] for r in job["resolutions"] for k in ranks]
            answers = predict_many(StepConfig(model=model, method=method), points)
            count += len(answers)
            failed += sum(1 for answer in answers.values() if isinstance(answer, Exception))
    return {"seconds": time.perf_counter() - started, "configurations": count, "refused": failed}


def _run_child(job: dict) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {job['kind']} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _config_dict(model: str, method: str, rank: int = 4, batch: int = 1, resolution: int = 224) -> dict:
    return {"model": model, "method": method, "rank": rank, "batch": batch, "resolution": resolution}


def shell_ratio(repeat: int) -> tuple[float, float, list[float], list[float]]:
    """Medians of ``costmodel predict ...`` and ``python -c "import torch"`` from the shell, interleaved."""
    script = os.path.join(os.path.dirname(sys.executable), "costmodel")
    predict = [script, "predict", "--model", "resnet18", "--method", "lora", "--rank", "4"]
    if not os.path.exists(script):
        predict = [sys.executable, "-m", "costmodel"] + predict[1:]
    torch_only = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"predict": [], "torch": []}
    for _ in range(repeat):
        for name, command in (("torch", torch_only), ("predict", predict)):
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["predict"]), statistics.median(times["torch"]), times["predict"], times["torch"]


def flatness(model: str, method: str, quick: bool) -> float:
    """Prediction time over batch, resolution and rank (each point new to the process); max/min."""
    batches = (1, 16, 256) if quick else (1, 4, 16, 64, 256)
    resolutions = (32, 224, 512) if quick else (32, 64, 128, 224, 384, 512)
    ranks = (1, 8, 64) if quick else (1, 2, 4, 8, 16, 32, 64)
    base = StepConfig(model=model, method=method, rank=3, batch=8, resolution=224)  # 3: not a rank of the table
    clear_cache()
    # Teach the structure its shapes (as warm_predict_seconds does): a template per regime.
    for batch, resolution in [(1, 200), (1, 208), (1, 216), (1, 232), (2, 200), (3, 208), (5, 216), (6, 232)]:
        predict_config(base.replace(batch=batch, resolution=resolution))
    traced = traced_step(base, default_plugin_manager())

    def point(config: StepConfig) -> float:
        predict_config(config)  # the first time may build a template for a new regime (e.g. R=32's 1x1 stage)
        samples = []
        for _ in range(3):
            traced.shape_cache.pop((config.batch, config.resolution), None)
            samples.append(timed(lambda: predict_config(config)))
        return statistics.median(samples)

    rows = [("batch", b, point(base.replace(batch=b))) for b in batches]
    rows += [("resolution", r, point(base.replace(resolution=r))) for r in resolutions]
    # A rank is a new structure (new adapter shapes): each rank's figure is its first prediction in
    # this process, a trace of its own.
    rows += [("rank", r, timed(lambda: predict_config(base.replace(rank=r)))) for r in ranks]
    print(f"\n(d) prediction time against batch, resolution and rank: {model} {method}, base B=8 R=224 r=3; each"
          f" batch/resolution point not in the shape cache (served by a shape template), median of 3; each"
          f" rank its first prediction in the process (a new structure, traced)")
    for dimension in ("batch", "resolution", "rank"):
        cells = [(value, seconds) for name, value, seconds in rows if name == dimension]
        print(f"  {dimension:<11}" + "".join(f"{value:>5}:{seconds * 1e3:>7.1f}ms" for value, seconds in cells)
              + f"   max/min {max(s for _, s in cells) / min(s for _, s in cells):.1f}x")
    ratios = {name: max(s for n, _, s in rows if n == name) / min(s for n, _, s in rows if n == name)
              for name in ("batch", "resolution", "rank")}
    return max(ratios.values())


def goals(quick: bool = False) -> None:
    """Measure every speed goal of issue 14 in this run and print the summary table."""
    summary: list[tuple[str, str, str, bool]] = []
    print("\n== speed goals (issue 14) ==", flush=True)

    # (a) and (b): cold and warm predictions in fresh processes against measure --fake.
    cases = [("mobilenet_v2", "lora")] if quick else [("mobilenet_v2", "lora"), ("resnet18", "lora"), ("resnet18", "fft")]
    print("(a, b) fresh process per figure, B=1 R=224 r=4; imports done before each timed call")
    print(f"  {'model':<14}{'method':<8}{'imports':>9}{'predict cold':>14}{'predict warm':>14}{'measure fake':>14}"
          f"{'fake/cold':>11}{'fake/warm':>11}")
    colds, warms = [], []
    for model, method in cases:
        config = _config_dict(model, method)
        predicted = _run_child({"kind": "predict", "config": config})
        fake = _run_child({"kind": "measure_fake", "config": config})["fake"]
        colds.append(fake / predicted["cold"])
        warms.append(fake / predicted["warm"])
        print(f"  {model:<14}{method:<8}{predicted['imports']:>8.2f}s{predicted['cold'] * 1e3:>12.0f}ms"
              f"{predicted['warm'] * 1e3:>12.2f}ms{fake:>13.2f}s{colds[-1]:>10.0f}x{warms[-1]:>10.0f}x", flush=True)
    summary.append(("(a) cold prediction vs measure --fake", ">= 100x", f"{min(colds):.0f}x (worst case)", min(colds) >= 100))
    summary.append(("(b) warm prediction vs measure --fake", ">= 1000x", f"{min(warms):.0f}x (worst case)", min(warms) >= 1000))

    # (c) the CLI from the shell.
    repeat = 3 if quick else 5
    predict, torch_only, predict_runs, torch_runs = shell_ratio(repeat)
    print(f"\n(c) `costmodel predict --model resnet18 --method lora --rank 4` vs `python -c \"import torch\"`,"
          f" {repeat} interleaved runs each: medians {predict:.2f} s vs {torch_only:.2f} s"
          f" (runs: {' '.join(f'{t:.2f}' for t in predict_runs)} | {' '.join(f'{t:.2f}' for t in torch_runs)})",
          flush=True)
    summary.append(("(c) `costmodel predict` vs `import torch`", "<= 1.5x", f"{predict / torch_only:.2f}x",
                    predict / torch_only <= 1.5))

    # (d) flat in batch, resolution and rank.
    spread = flatness("mobilenet_v2", "lora", quick)
    summary.append(("(d) prediction time over B, R, rank", "flat", f"max/min {spread:.1f}x (flat: <= 2x)", spread <= 2.0))

    # (e) a model too big to build.
    big = _run_child({"kind": "predict", "config": _config_dict("convnext_large", "fft", batch=256, resolution=512),
                      "repeat": 3})
    print(f"\n(e) convnext_large fft B=256 R=512 in a fresh process: prediction {big['cold']:.2f} s"
          f" (imports before it {big['imports']:.2f} s), peak RSS of the process {big['peak_rss'] / 2**20:.0f} MiB",
          flush=True)
    summary.append(("(e) convnext_large B=256 R=512: time", "< 1 s", f"{big['cold']:.2f} s", big["cold"] < 1))
    summary.append(("(e) convnext_large B=256 R=512: peak RSS", "< 1 GB", f"{big['peak_rss'] / 1e9:.2f} GB",
                    big["peak_rss"] < 1e9))

    # (f) a design-space sweep, extrapolated to 10,000 configurations.
    job = {"kind": "sweep", "models": ["mobilenet_v2"] if quick else ["mobilenet_v2", "resnet18"],
           "methods": ["lora", "dora"],
           "ranks": 8 if quick else 16, "batches": [1, 32] if quick else [1, 8, 64],
           "resolutions": [224] if quick else [128, 224, 320]}
    swept = _run_child(job)
    rate = swept["configurations"] / swept["seconds"]
    print(f"\n(f) sweep {len(job['models'])} models x {len(job['methods'])} methods x {job['ranks']} ranks x"
          f" batch {job['batches']} x resolution {job['resolutions']} = {swept['configurations']} configurations"
          f" ({swept['refused']} refused) in {swept['seconds']:.1f} s in one fresh process on one CPU:"
          f" {rate:.0f}/s, 10,000 extrapolated: {10_000 / rate:.0f} s", flush=True)
    summary.append(("(f) sweep of 10,000 configurations", "< 60 s",
                    f"{10_000 / rate:.0f} s (extrapolated from {swept['configurations']})", 10_000 / rate < 60))

    print("\nsummary")
    print(f"  {'goal':<44}{'target':>10}  {'measured':<34}met")
    for goal, target, measured, met in summary:
        print(f"  {goal:<44}{target:>10}  {measured:<34}{'yes' if met else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
