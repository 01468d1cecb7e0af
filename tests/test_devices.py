"""Device profiles (``costmodel.devices``), ``fits``, ``plan --device`` and ``--maximize``.

Every prediction here is a small one (MobileNetV3-Small or ResNet-18 at 32x32), so the file stays
fast on a busy machine. The maximize tests have known answers: the peaks at b and b+1 are
predicted directly, and a device whose usable memory lies between them must give b.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import costmodel
from costmodel import cli, devices
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plan import Budget, maximize
from costmodel.prediction import predict_config
from costmodel.registry import create_plugin_manager
from costmodel.result import MEMORY_GROUPS

# Batch 1 at 32x32 is refused (batch norm on a 1x1 map): the searches must find 2 as the smallest.
SMALL = StepConfig(model="mobilenet_v3_small", method="lora", rank=4, batch=2, resolution=32)
RESNET = StepConfig(model="resnet18", method="lora", rank=4, batch=2, resolution=32)
BUILTIN_IDS = {"raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb",
               "jetson-nano", "jetson-orin-nano-8gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb"}


def profile_dict(usable: int, memory: int = 2**32, **changes: Any) -> dict[str, Any]:
    """A valid profile in the file schema, with ``changes`` applied (None removes a field)."""
    data: dict[str, Any] = {
        "id": "test-board", "name": "Test board", "kind": "cpu",
        "memory_bytes": {"value": memory, "source": "made up for a test"},
        "usable_bytes": {"value": usable, "source": "made up for a test"},
        "peak_flops": {"fp32": {"value": 1e10, "source": "made up"}},
        "memory_bandwidth": {"value": 1e10, "source": "made up"},
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write(tmp_path: Path, data: Any, name: str = "board.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def peaks() -> dict[tuple[str, int], int]:
    """The peaks the known answers are built from, predicted directly (one by one)."""
    found = {}
    for batch in (2, 5, 6):
        found[("batch", batch)] = predict_config(SMALL.replace(batch=batch)).memory["peak"]
    for rank in (5, 6):
        found[("rank", rank)] = predict_config(RESNET.replace(rank=rank)).memory["peak"]
    return found


# -- profiles

def test_builtin_profiles_load_and_every_figure_has_a_source() -> None:
    profiles = devices.known_profiles()
    assert BUILTIN_IDS <= set(profiles)
    for profile in profiles.values():
        assert profile.kind in devices.DEVICE_KINDS and profile.name
        assert 0 < profile.usable <= profile.capacity
        assert "fp32" in profile.peak_flops
        for name, figure in profile.figures().items():
            assert figure.value is not None and figure.value > 0, (profile.id, name)
            assert len(figure.source) > 20, (profile.id, name, figure.source)
    # Derived figures say so; the Jetsons are CUDA devices and share their memory with the CPU.
    assert "derivation" in profiles["raspberry-pi-5-8gb"].peak_flops["fp32"].source
    assert "estimate" in profiles["jetson-nano"].usable_bytes.source
    assert {profiles[i].kind for i in BUILTIN_IDS if i.startswith("jetson")} == {"cuda"}


def test_this_machine_is_read_at_run_time(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:    6000000 kB\n")
    profile = devices.this_machine_profile(str(meminfo))
    assert (profile.capacity, profile.usable, profile.kind) == (8000000 * 1024, 6000000 * 1024, "cpu")
    assert profile.memory_bandwidth.value is None and "not known" in profile.memory_bandwidth.source
    assert devices.resolve_device("this-machine").usable > 0  # the real one
    with pytest.raises(CostModelError, match="cannot read the memory size"):
        devices.this_machine_profile(str(tmp_path / "missing"))


def test_a_user_file_and_a_usable_fraction(tmp_path: Path) -> None:
    path = write(tmp_path, profile_dict(2**30))
    assert devices.resolve_device(path).usable == 2**30
    fraction = profile_dict(0, usable_bytes=None, usable_fraction={"value": 0.75, "source": "the OS takes a quarter"})
    profile = devices.resolve_device(write(tmp_path, fraction, "fraction.json"))
    assert profile.usable == 3 * 2**30 and "the OS takes a quarter" in profile.usable_bytes.source


@pytest.mark.parametrize(("changes", "expected"), [
    ({"memory_bytes": None}, "field 'memory_bytes' is missing"),
    ({"name": None}, "field 'name' is missing"),
    ({"memory_bandwidth": {"value": 1e9}}, "field 'memory_bandwidth.source' is missing"),
    ({"memory_bytes": {"value": 0, "source": "x"}}, "memory_bytes.value must be a finite number > 0"),
    ({"usable_bytes": {"value": -5, "source": "x"}}, "usable_bytes.value must be a finite number > 0"),
    ({"usable_bytes": {"value": 2**40, "source": "x"}}, "is more than memory_bytes"),
    ({"peak_flops": {"fp16": {"value": 1, "source": "x"}}}, "field 'peak_flops.fp32' is missing"),
    ({"peak_flops": {"fp32": {"value": "fast", "source": "x"}}}, "fp32.value must be a finite number > 0"),
    ({"kind": "tpu"}, "kind must be one of cpu, cuda"),
    ({"usable_byte": {"value": 1, "source": "x"}}, "unknown field 'usable_byte'"),
    ({"usable_bytes": None}, "give exactly one of usable_bytes, usable_fraction"),
])
def test_bad_profiles_are_refused_naming_the_field(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(CostModelError, match=expected.replace("(", r"\(").replace(")", r"\)")) as refused:
        devices.resolve_device(write(tmp_path, profile_dict(2**30, **changes)))
    assert "\n" not in str(refused.value)


def test_bad_names_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CostModelError, match="unknown device 'jetson-nanoo'; known devices: .*jetson-nano.*this-machine"):
        devices.resolve_device("jetson-nanoo")
    with pytest.raises(CostModelError, match="no device profile file"):
        devices.resolve_device(str(tmp_path / "missing.json"))
    with pytest.raises(CostModelError, match="is not JSON: .* at line 1"):
        devices.resolve_device(write(tmp_path, "{not json"))
    with pytest.raises(CostModelError, match="a profile is a JSON object"):
        devices.resolve_device(write(tmp_path, [1, 2]))


def test_plugins_add_and_replace_profiles() -> None:
    class Boards:
        @hookimpl
        def costmodel_device_profiles(self) -> list[dict[str, Any]]:
            return [profile_dict(2**30), profile_dict(2**29, id="jetson-nano", name="my Nano", kind="cuda")]

    manager = create_plugin_manager([Boards()])
    found = devices.known_profiles(manager)
    assert found["test-board"].usable == 2**30
    assert found["jetson-nano"].name == "my Nano"  # a plugin's profile replaces the built-in one
    assert devices.resolve_device("test-board", manager).origin == "a plugin"

    class Broken:
        @hookimpl
        def costmodel_device_profiles(self) -> list[dict[str, Any]]:
            return [profile_dict(2**30, memory_bytes=None)]

    with pytest.raises(CostModelError, match="costmodel_device_profiles.*field 'memory_bytes' is missing"):
        devices.known_profiles(create_plugin_manager([Broken()]))


# -- fits

def test_fits_agrees_with_the_prediction_peak(peaks: dict[tuple[str, int], int]) -> None:
    peak = peaks[("batch", 2)]
    prediction = predict_config(SMALL)
    assert prediction.memory["peak"] == peak
    exact = costmodel.fits(prediction, profile_dict(peak))
    assert (exact.fits, exact.peak_bytes, exact.margin_bytes, exact.usable_bytes) == (True, peak, 0, peak)
    over = costmodel.fits(SMALL, profile_dict(peak - 1))  # a config is predicted first
    assert (over.fits, over.margin_bytes) == (False, -1)
    nano = costmodel.fits(prediction, "jetson-nano")
    assert nano.fits and nano.margin_bytes == nano.usable_bytes - peak
    assert nano.describe().startswith("fits in NVIDIA Jetson Nano 4GB (4 GiB, 3.2 GiB usable): peak ")
    assert "caching allocator" in nano.describe()  # a cuda device: the allocator's reserve is extra
    assert set(nano.to_dict()) >= {"name", "usable_bytes", "peak_bytes", "fits", "margin_bytes"}


# -- maximize: known answers

def test_maximize_batch_has_the_known_answer(peaks: dict[tuple[str, int], int]) -> None:
    between = (peaks[("batch", 5)] + peaks[("batch", 6)]) // 2
    assert peaks[("batch", 5)] < between < peaks[("batch", 6)]
    found = costmodel.maximize(SMALL, profile_dict(between), "batch")
    assert (found.value, found.smallest, found.fits) == (5, 2, True)  # batch 1 is refused at 32x32
    assert found.cost.memory["peak"] == peaks[("batch", 5)]
    assert set(found.breakdown) == {*MEMORY_GROUPS, "peak"}
    # 1 (refused), 2, 4, 8, 6, 5: a search, not a scan.
    assert found.predictions <= 8


def test_maximize_rank_has_the_known_answer(peaks: dict[tuple[str, int], int]) -> None:
    between = (peaks[("rank", 5)] + peaks[("rank", 6)]) // 2
    found = maximize(RESNET, profile_dict(between), "rank")
    assert (found.value, found.smallest) == (5, 1)
    assert found.cost.memory["peak"] == peaks[("rank", 5)] and found.predictions <= 6


def test_maximize_when_nothing_fits_says_by_how_much(peaks: dict[tuple[str, int], int]) -> None:
    found = maximize(SMALL, profile_dict(peaks[("batch", 2)] - 1000), "batch")
    assert (found.value, found.smallest, found.fits) == (None, 2, False)
    assert found.limits[0].margin == -1000
    assert "nothing fits, not even batch=2" in found.describe() and "exceeds the budget by 1,000 B" in found.describe()


def test_maximize_rank_of_a_method_that_ignores_it() -> None:
    found = maximize(SMALL.replace(method="fft"), Budget(memory=2**40), "rank")
    assert found.rank_independent and found.fits and found.predictions == 1


# -- the CLI

def test_cli_predict_with_a_device(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   peaks: dict[tuple[str, int], int]) -> None:
    argv = ["predict", "--model", "mobilenet_v3_small", "--method", "lora", "--batch", "2", "--resolution", "32"]
    assert cli.main(argv + ["--device", write(tmp_path, profile_dict(peaks[("batch", 2)] + 2**20))]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fits in Test board (4 GiB, ") and last.endswith("1 MiB to spare")
    assert cli.main(argv + ["--device", "raspberry-pi-4-4gb", "--json"]) == 0
    device = json.loads(capsys.readouterr().out)["device"]
    assert device["fits"] and device["peak_bytes"] == peaks[("batch", 2)]
    assert device["margin_bytes"] == device["usable_bytes"] - device["peak_bytes"]


@pytest.mark.parametrize("argv", [
    ["predict", "--device", "nosuch-board"],
    ["predict", "--device", "/nonexistent/board.json"],
    ["plan", "--device", "jetson-nano", "--memory", "1GiB"],
    ["plan", "--model", "mobilenet_v3_small", "--resolution", "32", "--methods", "fft",
     "--maximize", "batch", "--memory", "1MiB"],
])
def test_cli_bad_device_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("costmodel: error: ")


def test_cli_plan_maximize_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 peaks: dict[tuple[str, int], int]) -> None:
    board = write(tmp_path, profile_dict((peaks[("batch", 5)] + peaks[("batch", 6)]) // 2))
    argv = ["plan", "--model", "mobilenet_v3_small", "--resolution", "32", "--methods", "lora", "--rank", "4",
            "--maximize", "batch", "--device", board]
    assert cli.main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["device"]["id"] == "test-board"
    assert [(m["method"], m["value"]) for m in data["methods"]] == [("lora", 5)]
    assert cli.main(argv) == 0
    assert re.search(r"^\s+lora\s+5\s", capsys.readouterr().out, re.MULTILINE)
