"""Fuzz: every subcommand and option of the CLI, with good, bad and absurd values, in process.

Each example is one ``costmodel ...`` command line, drawn from a table of every option with values
that are valid, borderline (0, 1, huge) or junk (text, nan, inf, unknown names, bad paths). An
example passes when it ends in one of two ways, within its time bound:

- exit 0: the output is sane. JSON results are checked field by field: every FLOP and byte a
  non-negative integer, each phase total the sum of its phases, ``sum_of_group_peaks`` the sum of
  the groups, and the peak no larger than it and no smaller than any one group.
- exit 2: a refusal, exactly one line on stderr that starts with ``costmodel`` and says ``error:``,
  nothing on stdout, no traceback.

Anything else (exit 1, an internal error, an uncaught exception, a traceback, more than one line,
an example that runs past its bound) fails. The default run draws a few hundred examples; under
``-m slow`` thousands. Each outcome is counted with ``hypothesis.event`` (shown by
``pytest --hypothesis-show-statistics``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from costmodel.cli import main
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, MEMORY_GROUPS, phases_of

# One example's bound: a cold prediction of a new model takes about a second here, a FakeTensorMode
# measurement a few; far past that is a hang.
EXAMPLE_SECONDS = 120


def example_seconds() -> int:
    """The bound on one example's wall time: :data:`EXAMPLE_SECONDS` on a machine with a core per
    runnable process, scaled by how oversubscribed it is now (a load of 6 on 2 cores makes every
    example 3x slower; the bound is there to catch hangs, not a busy machine)."""
    oversubscribed = os.getloadavg()[0] / (os.cpu_count() or 1)
    return int(EXAMPLE_SECONDS * max(1.0, oversubscribed))


class Values:
    """The values of each option. ``clean`` draws only values that should be accepted (the success
    path is then the common one); otherwise borderline, absurd and junk values mix in."""

    def __init__(self, clean: bool, tmp: Path) -> None:
        self.clean = clean
        self.tmp = tmp

    def pick(self, good: list[str], bad: list[str] = (), junk_too: bool = True) -> st.SearchStrategy[str]:
        if self.clean:
            return st.sampled_from(good)
        pools = [st.sampled_from(good)] + ([st.sampled_from(list(bad))] if bad else []) + ([junk] if junk_too else [])
        return st.one_of(*pools)

    def maybe(self, option: str, values: st.SearchStrategy[str], weight: int = 1) -> st.SearchStrategy[list[str]]:
        """``[option, value]`` or nothing (``weight`` times likelier to be there than not)."""
        present = values.map(lambda value: [option, value])
        return st.one_of(st.just([]), *([present] * weight))

    def step_options(self) -> list[st.SearchStrategy[list[str]]]:
        return [
            self.maybe("--model", self.pick(MODELS, BAD_MODELS, junk_too=False)),
            self.maybe("--method", self.pick(METHODS, BAD_METHODS, junk_too=False)),
            self.maybe("--rank", self.pick(SMALL, HUGE)), self.maybe("--alpha", self.pick(FLOATS, BAD_FLOATS)),
            self.maybe("--channels", self.pick(["3"], ["1", "4", *HUGE])),
            self.maybe("--loss", self.pick(["cross_entropy", "mse"], ["nosuch", "", "CrossEntropy"], junk_too=False)),
            self.maybe("--phase", self.pick(["train", "evaluate"], ["eval", "", "TRAIN"], junk_too=False)),
            *self.scenario_options(),
            st.lists(self.pick(OPTIONS, BAD_OPTIONS), max_size=2).map(lambda chosen: [w for o in chosen for w in ("--option", o)]),
            _flag("--json"),
        ]

    def scenario_options(self) -> list[st.SearchStrategy[list[str]]]:
        return [self.maybe("--batch", self.pick(["2", "3", "4"], ["0", "1", "1000000000000", "10000000"])),
                self.maybe("--resolution", self.pick(["32", "48", "64"], ["0", "1", "7", "1000000", "100000"])),
                self.maybe("--classes", self.pick(["2", "10", "100"], HUGE)),
                self.maybe("--step", self.pick(["1", "2", "3"], HUGE)),
                self.maybe("--accumulate", self.pick(["1", "2", "3"], HUGE)),
                self.maybe("--dtype", self.pick(["fp32", "bf16", "fp16"], ["fp64", "", "BF16"], junk_too=False)),
                self.maybe("--checkpoint", self.pick(["layer*", "features.*", "*"], ["nosuch", "[", ""])),
                self.maybe("--galore-update-proj-gap", self.pick(["1", "2", "200"], HUGE))]

    def paths(self) -> st.SearchStrategy[str]:
        return self.pick([str(self.tmp / "out.csv")], [str(self.tmp), "/nonexistent/dir/x.csv", "", str(self.tmp / "sub" / "x")])


MODELS = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]
BAD_MODELS = ["nosuch", "", "resnet18,mobilenet_v3_small", "RESNET18"]
METHODS = ["fft", "bn_head", "lora", "dora", "galore"]
BAD_METHODS = ["adamw", "", "lora,dora", "LORA"]
junk = st.sampled_from(["", "a", "-1", "0", "1e3", "nan", "inf", "-inf", "1.5", " ", "é", "--", "x" * 300])
SMALL = ["1", "2", "3", "4", "8", "16"]
HUGE = ["0", "-5", "64", "10000", "1000000000", str(2**31), "100000000000000000000", "99999999999999999999999"]
FLOATS = ["1", "0.5", "16", "8.0"]
BAD_FLOATS = ["0", "-5", "nan", "inf", "1e400"]
RANKS = ["1-4", "1,2,4", "2-8:2", "4", "1-3,8"]
BAD_RANKS = ["1,2,1000000000", "1-1000000000", "1-20000", "0-4", "4-1", "1-4:0", "a", "1-", ",", ""]
OPTIONS = ["adapt_head=true", "adapt_head=false", 'target_modules=["conv1"]', 'rank_pattern={"layer4.*": 8}',
           'alpha_pattern={"layer.*": 2}', "include_grouped=true"]
BAD_OPTIONS = ["adapt_head=False", "adapt_head=no", "adapt_head=maybe", "target_modules=5", "target_modules=*",
               "target_modules=.*conv.*", 'rank_pattern={"layer4.*": 100000000000000000000000}',
               'rank_pattern={"layer4.*": -1}', 'alpha_pattern={"features.*": "x"}', "exclude_modules=fc",
               "rank_patern=3", "noequals", "=3", "scale=0.25", "k=", "k=nan"]
MEMORY = ["64MiB", "1.5GB", "512KiB", "100B", "1GiB"]
BAD_MEMORY = ["64", "1e400", "1e400MiB", "0B", "-5MiB", "64M", "1e99999B", "inf"]
DEVICES = ["jetson-nano", "raspberry-pi-4-4gb", "jetson-agx-orin-64gb", "this-machine"]
BAD_DEVICES = ["nosuch", "", "/nonexistent/board.json", "Jetson-Nano"]
TASKS = ["digits", "digits-brightness-1", "digits-impulse_noise-5", "digits-unseen"]
BAD_TASKS = ["nosuch", "", "digits-foo-3", "digits-brightness-9", "digits-brightness-0", "digits-brightness", "digits-0to4-contrast-1"]
FLOP_BUDGETS = ["2GFLOP", "500MFLOP", "2e9", "1T"]
BAD_FLOP_BUDGETS = ["1e400", "0", "-1GFLOP", "5MiB", "nan"]


def _flag(option: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [option]])


def _command(name: str, *parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """``name`` and its options (in the table's order: argparse reads them in any order)."""
    return st.tuples(*parts).map(lambda chosen: [name] + [word for part in chosen for word in part])


def _commands(v: Values) -> st.SearchStrategy[list[str]]:
    conventions = v.pick(["torch", "exact"], ["x"], junk_too=False)
    commands = [
        _command("predict", *v.step_options(), v.maybe("--flops", conventions), _flag("--allow-unknown"),
                 v.maybe("--device", v.pick(DEVICES, BAD_DEVICES, junk_too=False))),
        _command("measure", *v.step_options(), _flag("--fake")),
        _command("compare", *v.step_options(), _flag("--fake")),
        _command("sweep", v.maybe("--model", v.pick(MODELS + ["resnet18,squeezenet1_0"], BAD_MODELS, junk_too=False)),
                 v.maybe("--methods", v.pick(METHODS + ["lora,dora"], BAD_METHODS, junk_too=False)),
                 v.maybe("--ranks", v.pick(RANKS, BAD_RANKS), 4),
                 v.maybe("--metrics", v.pick(["flops.exact", "memory.peak", "flops.torch.total,memory"], ["nosuch", ","])),
                 *v.scenario_options(),
                 v.maybe("--measure", v.pick(["1", "2"], ["0", "-1"])) if not v.clean else st.just([]), _flag("--fake"),
                 v.maybe("--csv", v.paths()), v.maybe("--points-csv", v.paths()), _flag("--json"),
                 v.maybe("--jobs", v.pick(["1", "2"], ["0", "-3"]))),
        _command("plan", v.maybe("--model", v.pick(MODELS, BAD_MODELS, junk_too=False)),
                 v.maybe("--memory", v.pick(MEMORY, BAD_MEMORY), 3), v.maybe("--flops", v.pick(FLOP_BUDGETS, BAD_FLOP_BUDGETS)),
                 v.maybe("--memory-metric", v.pick(["peak", "sum_of_group_peaks"], ["x"], junk_too=False)),
                 v.maybe("--flops-convention", conventions),
                 v.maybe("--methods", v.pick(METHODS + ["lora,dora"], BAD_METHODS, junk_too=False)),
                 v.maybe("--ranks", v.pick(RANKS, BAD_RANKS), 4),
                 v.maybe("--sort", v.pick(["capacity", "memory", "flops"], ["x"], junk_too=False)), *v.scenario_options(),
                 v.maybe("--device", v.pick(DEVICES, BAD_DEVICES, junk_too=False)),
                 v.maybe("--maximize", v.pick(["batch", "rank"], ["x", "", "step"], junk_too=False)),
                 _flag("--json"), v.maybe("--jobs", v.pick(["1", "2"], ["0", "a"]))),
        # Always with --out: the default is the repository's own docs/report.
        _command("report", st.just(["--no-measure"]),
                 v.pick([str(v.tmp / "report")], ["", str(v.tmp), "/nonexistent/report", str(v.tmp / "README.md")],
                        junk_too=False).map(lambda out: ["--out", out]),
                 # Always with --models: the default is the paper's four models at 64 ranks, a
                 # report of minutes; one small model keeps an example within its bound.
                 v.pick(MODELS[:1] + ["squeezenet1_0"], BAD_MODELS, junk_too=False).map(lambda m: ["--models", m]),
                 v.maybe("--rank", v.pick(SMALL, HUGE)), v.maybe("--ranks", v.pick(["1-4", "2,4,8"], BAD_RANKS), 4),
                 v.maybe("--measure-ranks", v.pick(RANKS, BAD_RANKS)), *v.scenario_options()),
    ]
    if not v.clean:
        # A real fine-tuning loop, kept to a step or two on a few images: its pretraining (one step
        # on 32 images, cached in the fuzz folder) and an evaluation of 5% of the digits; nothing
        # tracked. Drawn among the unclean examples only (about 1 in 16): a clean run still costs a
        # few seconds, and the refusals are what the fuzz is for.
        commands.append(_command("finetune", st.just(["--no-measure", "--train-size", "32", "--pretrain-size", "32",
                                      "--pretrain-epochs", "1", "--eval-fraction", "0.05"]),
                 v.maybe("--model", v.pick(["mobilenet_v3_small"], BAD_MODELS, junk_too=False)),
                 v.maybe("--method", v.pick(METHODS, BAD_METHODS, junk_too=False)),
                 v.pick(TASKS, BAD_TASKS, junk_too=False).map(lambda task: ["--task", task]),
                 v.pick(["1", "2"], ["0", "-1", "100000000000000000000"]).map(lambda steps: ["--steps", steps]),
                 v.maybe("--batch", v.pick(["16", "32"], ["0", "-2"])),
                 v.maybe("--resolution", v.pick(["16"], ["0", "4", "1000000"])),
                 v.maybe("--eval-every", v.pick(["1", "5"], ["0"])),
                 v.maybe("--rank", v.pick(SMALL[:3], HUGE)),
                 v.maybe("--json", v.paths())))
        commands.append(st.sampled_from([["nosuch"], [], ["predict", "--nosuch"], ["--help"], ["predict", "--help"]]))
    return st.one_of(*commands)


def command_lines(tmp: Path) -> st.SearchStrategy[list[str]]:
    """Half the examples clean (every value one that should be accepted), half not."""
    return st.booleans().flatmap(lambda clean: _commands(Values(clean, tmp)))


def _bounded_measurement(argv: list[str]) -> list[str]:
    """Measuring runs what it measures, which is the reference's nature, not a defect: a real step
    allocates what the step allocates (a batch of 10^7 images takes the machine's memory), and step
    k is measured after running steps 1..k-1 (``--step 64`` runs 63 steps first: minutes). So
    measurements run under FakeTensorMode (which allocates nothing), at a small ``--step`` and with
    few micro-batches (``--accumulate 10000`` runs 10,000 forwards and backwards)."""
    if argv and argv[0] in ("measure", "compare") or "--measure" in argv:
        if "--fake" not in argv:
            argv = argv + ["--fake"]
        small = {"--step": "3", "--accumulate": "2"}
        argv = [word if index == 0 or argv[index - 1] not in small or word not in HUGE else small[argv[index - 1]]
                for index, word in enumerate(argv)]
    return argv


class _Hang(BaseException):
    """Raised by the deadline's alarm; a BaseException so that the CLI's own handlers (which turn
    an Exception into one line) cannot hide it as an internal error."""


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise _Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _deadline(example_seconds()):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def check_step_cost(data: dict[str, Any]) -> None:
    """A StepCost's JSON: non-negative integers that add up."""
    kinds = phases_of(data.get("config", {}).get("phase", "train"))  # plan's candidates: training steps
    for conv in FLOP_CONVENTIONS:
        phases = data["flops"][conv]
        assert set(phases) == {*kinds, "total"}, (conv, sorted(phases))
        for phase in (*kinds, "total"):
            assert isinstance(phases[phase], int) and phases[phase] >= 0, (conv, phase, phases[phase])
        assert phases["total"] == sum(phases[p] for p in kinds)
    memory = data["memory"]
    for name in MEMORY_FIELDS:
        assert isinstance(memory[name], int) and memory[name] >= 0, (name, memory[name])
    assert memory["sum_of_group_peaks"] == sum(memory[g] for g in MEMORY_GROUPS)
    assert max(memory[g] for g in MEMORY_GROUPS) <= memory["peak"] <= memory["sum_of_group_peaks"]
    assert 0 <= data["trainable_params"] <= data["total_params"]


def check_success(argv: list[str], out: str) -> None:
    assert out.strip(), "exit 0 with no output"
    command = argv[0] if argv else ""
    if command == "finetune":
        if "--json" in argv:  # finetune --json FILE: every step predicted, in predict --json's schema
            written = json.loads(Path(argv[argv.index("--json") + 1]).read_text())
            for step in written["steps"]:
                check_step_cost({"config": {"phase": step["phase"]}, **step["predicted"],
                                 "trainable_params": 0, "total_params": 0})
        return
    if "--json" not in argv or command == "report":
        return
    data = json.loads(out)
    if command in ("predict", "measure"):
        check_step_cost(data)
    elif command == "compare":
        check_step_cost(data["predicted"])
        check_step_cost(data["measured"])
    elif command == "sweep":
        for series in data["series"]:
            for point in series["points"]:
                assert all(isinstance(v, int) and v >= 0 for k, v in point.items()), point
    elif command == "plan":
        for candidate in data.get("fitting", []):  # --maximize answers per method instead
            assert candidate["fits"] and all(limit["used"] <= limit["budget"] for limit in candidate["limits"])
            check_step_cost({"flops": candidate["flops"], "memory": candidate["memory"],
                             "trainable_params": candidate["trainable_params"], "total_params": 10**12})


def check_outcome(argv: list[str], code: int, out: str, err: str) -> str:
    """Raises unless the outcome is a sane success or a one-line refusal; returns its kind."""
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if code == 0:
        if argv and argv[-1] == "--help" or "--help" in argv:
            return "help"
        check_success(argv, out)
        return "ok"
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("costmodel") and "error:" in lines[0], (argv, lines[0])
    assert out == "", (argv, out)
    return "refused"


def fuzz_once(argv: list[str]) -> None:
    argv = _bounded_measurement(argv)
    try:
        code, out, err = run_cli(argv)
    except _Hang as hang:
        pytest.fail(f"{argv}: {hang}")
    kind = check_outcome(argv, code, out, err)
    outcome = f"{argv[0] if argv else '(none)'}: {kind}"
    event(outcome)
    print(f"fuzz outcome {outcome}")  # visible with -s: a long run's counts so far


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COSTMODEL_CACHE", str(folder / "cache"))  # finetune's pretrained checkpoints
        yield folder


def _fuzz_test(examples: int):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(data=st.data())
    def run(fuzz_dir: Path, data: st.DataObject) -> None:
        fuzz_once(data.draw(command_lines(fuzz_dir), label="argv"))

    return run


test_cli_fuzz = _fuzz_test(50)  # the default suite's share (about 2.5 of its 15 minutes here); -m slow runs 5,000
test_cli_fuzz_many = pytest.mark.slow(_fuzz_test(5000))


@pytest.mark.parametrize("argv", [
    ["sweep", "--model", "resnet18", "--methods", "lora", "--ranks", "1,2,1000000000", "--metrics", "memory.peak"],
    ["sweep", "--methods", "adamw", "--ranks", "1-20000"],
    ["predict", "--model", "resnet18", "--method", "lora", "--rank", "100000000000000000000"],
    ["predict", "--model", "resnet18", "--batch", "1000000000000", "--resolution", "1000000"],
    ["predict", "--method", "lora", "--option", "target_modules=5"],
    ["predict", "--method", "lora", "--option", "target_modules=*"],
    ["predict", "--method", "lora", "--option", 'alpha_pattern={"features.*": "x"}'],
    ["predict", "--method", "lora", "--option", 'rank_pattern={"features.*": 100000000000000000000000}'],
    ["plan", "--memory", "1e400"], ["plan", "--flops", "1e400"], ["plan", "--memory", "64"],
    ["predict", "--method", "lora", "--alpha", "nan"], ["predict", "--method", "fft", "--rank", "1000000000"],
    ["predict", "--method", "fft", "--alpha", "2"], ["predict", "--method", "dora", "--galore-update-proj-gap", "5"],
    ["plan", "--model", "nosuch", "--memory", "64MiB"],
    ["report", "--out", "", "--no-measure"], ["report", "--out", "unused", "--models", "nosuch", "--no-measure"],
    ["report", "--out", "unused", "--measure-ranks", "a"],
    ["measure", "--model", "resnet18", "--batch", "100000"],  # 2 TB for real: refused before it starts
    ["compare", "--model", "resnet18", "--batch", "100000"],
])
def test_the_defects_found_by_hand(argv: list[str]) -> None:
    """The cases the robustness issue found by hand, each an example of the fuzz's rules."""
    code, out, err = run_cli(argv)
    kind = check_outcome(argv, code, out, err)
    if argv[0] in ("plan", "report", "measure", "compare") or "fft" in argv or "--alpha" in argv or "dora" in argv:
        assert kind == "refused"
