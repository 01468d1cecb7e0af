"""``costmodel``: predict (analytically) or measure (for real) one fine-tuning step."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from costmodel.config import AUTOCAST_DTYPES, DTYPES, QUANTIZE_TYPES, STEP_KINDS, TRAINING, StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, StepCost, render_comparison


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refusal is one line (``costmodel predict: error: argument --rank: ...``)
    without the usage block, exit status 2, like every other refusal of the CLI."""

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    defaults = StepConfig()
    parser.add_argument("--model", default=defaults.model, help="torchvision model name (default: %(default)s)")
    parser.add_argument("--method", default=defaults.method, help="fft, bn_head, lora, dora, galore, or a plugin's method (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=None, help=f"adapter / projection rank, for methods that take one (default: {defaults.rank})")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA lora_alpha, short for --option alpha=ALPHA (default: the rank)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="number of classes (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=defaults.channels, help="image channels: 3 for RGB, 1 for grey-scale, ... (default: %(default)s)")
    parser.add_argument("--loss", default=defaults.loss, metavar="NAME", help="the training loss: cross_entropy (integer labels), mse (a target shaped like the logits), or a plugin's (default: %(default)s)")
    parser.add_argument("--step", type=int, default=defaults.step, help="which training step is costed; step 1 creates optimizer state (default: %(default)s)")
    parser.add_argument("--phase", default=defaults.phase, choices=STEP_KINDS, help="train: training step --step (forward, backward, optimizer); evaluate: the evaluation pass after --step training steps (0: before any), the forward and loss in eval mode under torch.no_grad() (default: %(default)s)")
    parser.add_argument("--galore-update-proj-gap", type=int, default=None, help="GaLore's T: an SVD on step k when (k-1) %% T == 0, short for --option update_proj_gap=T (default: 200)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option, VALUE as JSON or a string; repeatable. LoRA/DoRA/GaLore: "
                             "rank_pattern='{\"layer4.*\": 8}', alpha_pattern, target_modules, exclude_modules, "
                             "include_grouped=true, adapt_head=true; LoRA/DoRA alpha=16; GaLore update_proj_gap=50, "
                             "scale=0.5")
    add_setup_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_setup_options(parser: argparse.ArgumentParser) -> None:
    """How the step trains (``--dtype``, ``--autocast``, ``--checkpoint``, ``--accumulate``, ``--optimizer``,
    ``--optimizer-option``), for one step, a scenario and a fine-tuning run alike."""
    parser.add_argument("--dtype", default=StepConfig.dtype, choices=tuple(DTYPES),
                        help="the step's precision: the model is cast with model.to(dtype) before the method is "
                             "applied, the images are in it, the optimizer state follows the parameters "
                             "(default: %(default)s)")
    parser.add_argument("--autocast", default=StepConfig.autocast, choices=AUTOCAST_DTYPES,
                        help="mixed precision: the forward and the loss under torch.autocast('cpu', dtype=...): the "
                             "ops on autocast's lists cast their inputs (convolutions and matrix products to bf16/fp16, "
                             "the losses to fp32), the parameters stay in --dtype (default: none)")
    parser.add_argument("--quantize", default=StepConfig.quantize, choices=QUANTIZE_TYPES,
                        help="a quantized frozen base (QLoRA): every frozen Linear outside the head as bitsandbytes' "
                             "Linear4bit of this type (blocks of 64, nested statistics), LoRA's adapters on top "
                             "(default: none)")
    parser.add_argument("--checkpoint", default=StepConfig.checkpoint, metavar="PATTERN",
                        help="activation checkpointing of the outermost modules whose qualified name matches the "
                             "fnmatch PATTERN (layer* -> ResNet's layer1..layer4): torch.utils.checkpoint.checkpoint("
                             "module, *args, use_reentrant=False), recomputed in backward (default: none)")
    parser.add_argument("--accumulate", type=int, default=StepConfig.accumulate, metavar="N",
                        help="gradient accumulation: N micro-batches of --batch images per optimizer step, each "
                             "forward, loss / N and backward, gradients adding up in .grad (default: %(default)s)")
    parser.add_argument("--optimizer", default=None, metavar="NAME",
                        help="the optimizer: adamw, adam, sgd, adafactor (torch.optim: its single-tensor CPU path, or "
                             "with --optimizer-option foreach=true the multi-tensor one), adamw8bit (bitsandbytes' "
                             "8-bit AdamW, its CPU kernels), or a plugin's, for every method but GaLore, which keeps "
                             "its own (default: " + StepConfig().optimizer + ")")
    parser.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE",
                        help="an optimizer keyword besides the learning rate, VALUE as JSON or a string; repeatable: "
                             "momentum=0.9, nesterov=true, weight_decay=0.01, betas='[0.9, 0.99]', eps=1e-6")


def _method_options(pairs: Sequence[str] | None, flag: str = "--option") -> dict[str, object]:
    """``--option KEY=VALUE`` pairs (or those of ``flag``: ``--optimizer-option``); a VALUE that
    parses as JSON is taken as such, else as a string."""
    import json

    options: dict[str, object] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CostModelError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _config(args: argparse.Namespace) -> StepConfig:
    from costmodel.options import check_method_arguments
    from costmodel.registry import default_plugin_manager

    _check_models([args.model], "--model")
    _check_methods([args.method], "--method")
    _check_loss(args.loss)
    # An explicit --rank for a method that takes none is refused (it would be silently ignored), and
    # so is a shorthand for an option the method does not declare (--alpha for fft).
    options = check_method_arguments(default_plugin_manager(), args.method, args.rank is not None,
                                     _method_options(args.option), _shorthands(args))
    defaults = StepConfig()
    config = StepConfig(
        model=args.model, method=args.method, rank=defaults.rank if args.rank is None else args.rank,
        batch=args.batch, resolution=args.resolution, classes=args.classes, step=args.step, phase=args.phase,
        channels=args.channels, loss=args.loss, options=options, **setup_fields(args),
    )
    check_optimizer(config)
    return config


def setup_fields(args: argparse.Namespace) -> dict[str, object]:
    """The StepConfig fields of :func:`add_setup_options`' flags (``optimizer``,
    ``optimizer_options``, ``accumulate``, ``dtype``, ``autocast``, ``quantize``, ``checkpoint``; the defaults
    where not given)."""
    fields: dict[str, object] = {"optimizer_options": _method_options(args.optimizer_option, "--optimizer-option"),
                                 "accumulate": args.accumulate, "dtype": args.dtype, "autocast": args.autocast,
                                 "quantize": args.quantize, "checkpoint": args.checkpoint}
    if args.optimizer is not None:
        fields["optimizer"] = args.optimizer
    return fields


def check_optimizer(config: StepConfig) -> None:
    """Refuse, before any work, an optimizer no plugin costs or options its plugin refuses: the
    plugins are asked to cost one step over a probe group of one float32 element with
    ``config.lr`` and ``config.optimizer_options`` (what a method's group carries); a plugin
    checks its options before anything else, and answers None for a name it does not know.
    A method with its own optimizer (GaLore) refuses ``--optimizer`` itself, when it prepares."""
    import torch

    from costmodel.costs import ParamGroup, ParamMeta
    from costmodel.plugin_calls import OPTIMIZER_COST, ask_first
    from costmodel.registry import default_plugin_manager

    probe = ParamGroup(config.optimizer, [ParamMeta("probe", (1,), torch.float32, True)],
                       {"lr": config.lr, **config.optimizer_options})
    if ask_first(default_plugin_manager(), OPTIMIZER_COST, group=probe, step=1, config=config) is None:
        from costmodel.registry import optimizer_names

        raise CostModelError(f"--optimizer: no optimizer plugin covers {config.optimizer!r}; optimizers the plugins "
                             f"cost: {', '.join(optimizer_names(default_plugin_manager()))} (the default is "
                             f"{StepConfig().optimizer!r})")


# The flags that are short for a method option: flag's argparse destination -> (option key, flag).
OPTION_SHORTHANDS: dict[str, tuple[str, str]] = {
    "alpha": ("alpha", "--alpha"), "galore_update_proj_gap": ("update_proj_gap", "--galore-update-proj-gap"),
}


def _shorthands(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """The shorthand flags given explicitly: option key -> (flag, value)."""
    return {key: (flag, getattr(args, dest)) for dest, (key, flag) in OPTION_SHORTHANDS.items()
            if getattr(args, dest, None) is not None}


# -- what can be checked before any work: names, paths, counts

def _check_models(names: Sequence[str], option: str) -> tuple[str, ...]:
    from costmodel.models import check_model_names

    return check_model_names(names, option)


def _check_methods(names: Sequence[str], option: str) -> tuple[str, ...]:
    """Each name a method some registered plugin provides."""
    from costmodel.registry import default_plugin_manager, method_names

    known = method_names(default_plugin_manager())
    for name in names:
        if name not in known:
            raise CostModelError(f"{option}: unknown method {name!r}; methods provided by plugins: {', '.join(known)}")
    return tuple(names)


def _check_loss(name: str) -> None:
    """A loss some registered plugin describes (``costmodel_loss``)."""
    from costmodel.plugin_calls import loss_spec
    from costmodel.registry import default_plugin_manager

    try:
        loss_spec(default_plugin_manager(), name)
    except CostModelError as error:
        raise CostModelError(f"--loss: {error}") from None


def check_writable(path: str | None, option: str) -> None:
    """``path`` can be written as a file: not empty, not a directory, in a directory that exists and
    may be written (checked before the work whose result it will hold; nothing is created yet)."""
    if path is None:
        return
    if not path.strip():
        raise CostModelError(f"{option}: the path is empty")
    if os.path.isdir(path):
        raise CostModelError(f"{option}: {path} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CostModelError(f"{option}: cannot write {path}: no directory {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CostModelError(f"{option}: cannot write {path}: permission denied")


# The optional installs (pyproject.toml's extras) and a module each that proves it is there.
_EXTRAS: dict[str, tuple[str, ...]] = {"validate": ("peft", "galore_torch", "sklearn"), "report": ("matplotlib",)}


def _require(extra: str, what: str) -> None:
    """Refuse, in one line, a command whose optional install is missing (before any work)."""
    import importlib.util

    missing = [name for name in _EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise CostModelError(f"{what} needs the {extra!r} extra ({', '.join(missing)} not installed): "
                             f"pip install 'costmodel[{extra}]'")


def _workers(jobs: int | None) -> int:
    from costmodel.sweep import default_workers

    if jobs is None:
        return default_workers()
    if jobs < 1:
        raise CostModelError(f"--jobs must be >= 1, got {jobs}")
    return jobs


def _print(cost: StepCost, args: argparse.Namespace, conventions: tuple[str, ...] = FLOP_CONVENTIONS) -> None:
    print(cost.to_json() if args.json else cost.render(conventions))


def _measure(args: argparse.Namespace) -> int:
    _require("validate", "measuring (the runtime reference)")
    from costmodel.validation.measure import check_fits_in_memory, measure  # loaded only when asked for

    config = _config(args)
    check_fits_in_memory(config, args.fake)
    _print(measure(config, fake=args.fake), args)
    return 0


def _device(spec: str | None):  # -> DeviceProfile | None (costmodel.devices loads only when asked for)
    """The ``--device`` profile (an id or a JSON file), refused in one line before any work."""
    if spec is None:
        return None
    from costmodel.devices import resolve_device

    try:
        return resolve_device(spec)
    except CostModelError as error:
        raise CostModelError(f"--device: {error}") from None


def _predict(args: argparse.Namespace) -> int:
    from costmodel.prediction import predict_config

    config = _config(args)
    device = _device(args.device)
    prediction = predict_config(config, allow_unknown=args.allow_unknown)
    conventions = FLOP_CONVENTIONS if args.flops is None else (args.flops,)
    if device is None:
        _print(prediction, args, conventions)
        return 0
    from costmodel.devices import fit_of

    fit = fit_of(prediction.memory["peak"], device)
    if args.json:
        import json

        print(json.dumps({**prediction.to_dict(), "device": fit.to_dict()}, indent=2))
    else:
        print(prediction.render(conventions))
        print("")
        print(fit.describe())
    return 0


def _compare(args: argparse.Namespace) -> int:
    _require("validate", "compare (the runtime reference)")
    from costmodel.prediction import predict_config
    from costmodel.validation.measure import check_fits_in_memory, measure

    config = _config(args)
    predicted = predict_config(config)
    check_fits_in_memory(config, args.fake, predicted)
    # The measurement runs the step for real and can take a while: say so, where a person watches.
    if sys.stderr.isatty():
        what = (f"{config.step} real step(s)" if config.phase == TRAINING
                else f"{config.step} real step(s) and an evaluation")
        print(f"predicted in {predicted.seconds * 1e3:.0f} ms; measuring {what}"
              f"{' under FakeTensorMode' if args.fake else ''}...", end="", file=sys.stderr, flush=True)
    try:
        measured = measure(config, fake=args.fake)
    finally:
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)  # the status line, cleared
    if args.json:
        import json

        print(json.dumps({"predicted": predicted.to_dict(), "measured": measured.to_dict()}, indent=2))
    else:
        print(render_comparison(predicted, measured))
    return 0


def _add_scenario_options(parser: argparse.ArgumentParser) -> None:
    """The step options that sweep, plan and report share (the model, method and rank vary)."""
    defaults = StepConfig()
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="number of classes (default: %(default)s)")
    parser.add_argument("--step", type=int, default=defaults.step, help="which training step is costed (default: %(default)s)")
    parser.add_argument("--galore-update-proj-gap", type=int, default=None, help="GaLore's T, for the GaLore predictions (default: 200)")
    add_setup_options(parser)


def _scenario(args: argparse.Namespace) -> StepConfig:
    """The base step of sweep, plan and report: a shorthand flag's option goes to every method that
    declares it (``StepConfig.shared_options``: T to GaLore) and is ignored by the others."""
    from costmodel.config import check_int

    shared: dict[str, object] = {}
    if args.galore_update_proj_gap is not None:
        shared["update_proj_gap"] = check_int(args.galore_update_proj_gap, "--galore-update-proj-gap")
    config = StepConfig(batch=args.batch, resolution=args.resolution, classes=args.classes, step=args.step,
                        shared_options=shared, **setup_fields(args))
    check_optimizer(config)
    return config


def _write_text(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise CostModelError(f"{option}: cannot write {path}: {error.strerror}") from None


def _sweep(args: argparse.Namespace) -> int:
    from costmodel import sweep
    from costmodel.paper import paper_order

    # Everything that can be refused is refused here, before the first prediction.
    batches = sweep.parse_ranks(args.batch, "--batch", "batch size")
    resolutions = sweep.parse_ranks(args.resolution, "--resolution", "resolution")
    base = _scenario(argparse.Namespace(**{**vars(args), "batch": batches[0], "resolution": resolutions[0]}))
    models = _check_models(sweep.parse_names(args.model, "--model"), "--model")
    methods = None if args.methods is None else _check_methods(sweep.parse_names(args.methods, "--methods"), "--methods")
    # Without --methods: every method the installed plugins declare (those the predictor cannot
    # cost are listed as such), the paper's five first in the paper's order as before.
    candidates = paper_order(sweep.registered_methods()) if methods is None else None
    ranks = sweep.parse_ranks(args.ranks)
    sweep.check_sweep_size(len(models), len(methods or candidates or ()), len(ranks), len(batches), len(resolutions))
    metrics = sweep.select_metrics(args.metrics)
    if args.measure is not None:
        sweep.evenly_spread(ranks, args.measure)
        _require("validate", "--measure (the runtime reference)")
    check_writable(args.csv, "--csv")
    check_writable(args.points_csv, "--points-csv")
    workers = _workers(args.jobs)
    result = sweep.sweep(models, methods, ranks, sweep.default_predictor(), base, metrics, workers=workers,
                         batches=batches, resolutions=resolutions, candidates=candidates)
    if args.measure is not None:
        sweep.check_laws(result, args.measure, sweep.default_measurer(fake=args.fake))
    if args.csv:
        _write_text(args.csv, result.laws_csv(), "--csv")
    if args.points_csv:
        _write_text(args.points_csv, result.points_csv(), "--points-csv")
    print(result.to_json() if args.json else result.render())
    if args.json:
        print(result.timing_line(), file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from costmodel import plan, sweep

    if args.device is not None and args.memory is not None:
        raise CostModelError("--memory and --device both set the memory budget: give one (a device profile "
                             "file with its own usable_bytes sets a tighter one)")
    device = _device(args.device)
    budget = plan.Budget(
        memory=device.usable if device is not None else None if args.memory is None else plan.parse_memory(args.memory),
        flops=None if args.flops is None else plan.parse_flops(args.flops),
        memory_metric=args.memory_metric, flop_convention=args.flops_convention, device=device,
    )
    base = _scenario(args).replace(model=_check_models([args.model], "--model")[0])
    methods = None if args.methods is None else _check_methods(sweep.parse_names(args.methods, "--methods"), "--methods")
    if args.maximize is not None:
        from costmodel.config import check_int

        base = base.replace(rank=check_int(args.rank, "--rank"))
        result = plan.maximize_methods(base, budget, args.maximize, sweep.default_predictor(), methods)
        if not any(m.fits for m in result.maxima):
            raise plan.no_maximum(result)
        print(result.to_json() if args.json else result.render())
        return 0
    ranks = sweep.parse_ranks(args.ranks)
    workers = _workers(args.jobs)
    result = plan.plan(base, budget, sweep.default_predictor(), ranks, methods, sort=args.sort, workers=workers)
    if device is not None and not result.fitting:  # "which method fits on that device": none does
        raise plan.nothing_fits(result)
    print(result.to_json() if args.json else result.render())
    return 0


def _report(args: argparse.Namespace) -> int:
    _require("report", "report (its figures)")
    if not args.no_measure:
        _require("validate", "report's measured columns (the runtime reference; --no-measure skips them)")
    from costmodel import report

    base = _scenario(args).replace(rank=args.rank)
    request = report.parse_request(args.out, args.models, args.ranks, None if args.no_measure else args.measure_ranks)
    written = report.generate(request.out, models=request.models, ranks=request.ranks,
                              measure_ranks=request.measure_ranks, base=base, fake=args.fake)
    for path in written:
        print(path)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    _require("validate", "finetune (a real fine-tuning loop)")
    from costmodel.validation.finetune import run_command  # peft and the tracker load only when asked for

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="costmodel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="predict one step's FLOPs and memory analytically")
    _add_step_options(predict)
    predict.add_argument("--flops", choices=FLOP_CONVENTIONS, default=None, help="show only this FLOP convention in the table")
    predict.add_argument("--allow-unknown", action="store_true", help="instead of failing at an op no plugin covers, give a lower bound (marked as such) and the coverage")
    predict.add_argument("--device", default=None, metavar="NAME|FILE", help="also say whether the step's peak fits this device's usable memory: a device id (jetson-nano, raspberry-pi-5-8gb, this-machine, ...) or a JSON profile file")
    predict.set_defaults(run=_predict)

    measure = commands.add_parser("measure", help="run one step for real and measure it (FlopCounterMode, MemTracker)")
    _add_step_options(measure)
    measure.add_argument("--fake", action="store_true", help="measure under FakeTensorMode (same numbers, far faster at large batch)")
    measure.set_defaults(run=_measure)

    compare = commands.add_parser("compare", help="predict, then measure the same step, and show both side by side")
    _add_step_options(compare)
    compare.add_argument("--fake", action="store_true", help="measure under FakeTensorMode")
    compare.set_defaults(run=_compare)

    # conflict_handler: sweep's --batch and --resolution (ranges) replace the scenario's single values.
    sweep = commands.add_parser("sweep", help="predict over ranks (and batch sizes, resolutions) and fit a linear "
                                "law cost = a + b*rank per metric", conflict_handler="resolve")
    sweep.add_argument("--model", default=StepConfig().model, help="model name, or several comma-separated (default: %(default)s)")
    sweep.add_argument("--methods", default=None, help="comma-separated methods (default: every method the installed plugins declare that the predictor can cost, the paper's first)")
    sweep.add_argument("--ranks", default="1-64", help="ranks: 1-64, 1,2,4,8 or 1-64:4 (default: %(default)s)")
    sweep.add_argument("--metrics", default=None, help="only metrics starting with these comma-separated prefixes, e.g. flops.exact,memory.peak")
    _add_scenario_options(sweep)
    sweep.add_argument("--batch", default=str(StepConfig().batch), help="batch sizes, as ranges like --ranks: 1,2,4-8 "
                       "(default: %(default)s); one law over the ranks per batch size")
    sweep.add_argument("--resolution", default=str(StepConfig().resolution), help="image sides in pixels, as ranges "
                       "like --ranks: 64,96-128:32 (default: %(default)s); one law over the ranks per resolution")
    sweep.add_argument("--measure", type=int, default=None, metavar="K", help="also measure K of the ranks (spread evenly) and report the laws' error on them")
    sweep.add_argument("--fake", action="store_true", help="with --measure: measure under FakeTensorMode")
    sweep.add_argument("--csv", default=None, metavar="PATH", help="write the laws as CSV (one row per model, method, batch size, resolution and metric)")
    sweep.add_argument("--points-csv", default=None, metavar="PATH", help="write every predicted point as CSV")
    sweep.add_argument("--json", action="store_true", help="print the points, laws and checks as one JSON object")
    sweep.add_argument("--jobs", type=int, default=None, metavar="N", help="processes to predict in (default: one per CPU)")
    sweep.set_defaults(run=_sweep)

    plan = commands.add_parser("plan", help="every method and rank that fits a memory and/or FLOP budget, best first")
    plan.add_argument("--model", default=StepConfig().model, help="torchvision model name (default: %(default)s)")
    plan.add_argument("--memory", default=None, help="memory budget, e.g. 64MiB, 1.5GB, 512KiB")
    plan.add_argument("--flops", default=None, help="FLOP budget for one step, e.g. 2GFLOP, 500MFLOP, 2e9")
    plan.add_argument("--device", default=None, metavar="NAME|FILE", help="memory budget: this device's usable memory (a device id such as jetson-nano, or a JSON profile file); not with --memory")
    plan.add_argument("--maximize", default=None, choices=("batch", "resolution", "rank"), help="per method, the largest batch size, resolution or rank that fits the budget (the other two as given; --batch or --resolution is then ignored for the one maximized), found by bisection")
    plan.add_argument("--rank", type=int, default=StepConfig().rank, help="with --maximize batch or resolution: the rank of the methods that take one (default: %(default)s)")
    plan.add_argument("--memory-metric", default="peak", choices=("peak", "sum_of_group_peaks"), help="which memory figure the budget limits (default: %(default)s, the true simultaneous peak)")
    plan.add_argument("--flops-convention", default="exact", choices=FLOP_CONVENTIONS, help="which FLOP convention the budget limits (default: %(default)s)")
    plan.add_argument("--methods", default=None, help="comma-separated methods (default: every method the predictor can cost)")
    plan.add_argument("--ranks", default="1-64", help="ranks to consider (default: %(default)s)")
    plan.add_argument("--sort", default="capacity", choices=("capacity", "memory", "flops"), help="best first by: most trainable parameters, least memory, or fewest FLOPs (default: %(default)s)")
    _add_scenario_options(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--jobs", type=int, default=None, metavar="N", help="processes to predict in (default: one per CPU)")
    plan.set_defaults(run=_plan)

    report = commands.add_parser("report", help="regenerate the paper's figures and claims table, predicted beside measured")
    report.add_argument("--out", default="docs/report", help="output directory (default: %(default)s)")
    report.add_argument("--models", default="mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large,resnet18", help="comma-separated models (default: %(default)s)")
    report.add_argument("--rank", type=int, default=StepConfig().rank, help="rank of Figures 1 and 2 and the claims (default: %(default)s)")
    report.add_argument("--ranks", default="1-64", help="ranks of Figure 5's predictions and laws (default: %(default)s)")
    report.add_argument("--measure-ranks", default="1,16,64", help="ranks measured for Figure 5, besides --rank (default: %(default)s)")
    report.add_argument("--no-measure", action="store_true", help="predictions only (measured columns say so)")
    report.add_argument("--fake", action="store_true", help="measure under FakeTensorMode")
    _add_scenario_options(report)
    report.set_defaults(run=_report)

    # The options live beside the loop (validation/finetune.py, which imports nothing heavy at the top).
    from costmodel.validation.finetune import add_arguments as add_finetune_arguments

    finetune = commands.add_parser("finetune", help="fine-tune for real on a digit task, every step held against its prediction")
    add_finetune_arguments(finetune)
    finetune.set_defaults(run=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a refusal argparse has already printed in one line
        return done.code if isinstance(done.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CostModelError as error:
        print(f"costmodel: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`costmodel predict | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("COSTMODEL_DEBUG"):
            traceback.print_exc()
        print(f"costmodel: internal error: {type(error).__name__}: {error} "
              f"(set COSTMODEL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
