"""Device profiles, and whether one predicted step fits a device's memory.

A profile is data: how much memory a device has, how much of it a training step can use, and the
figures a roofline needs (peak FLOP/s per dtype, memory bandwidth), each with its ``source`` - the
datasheet it comes from, or the derivation or estimate it is - so that nobody has to trust a bare
number. They come from three places, looked up by id in this order:

1. a plugin's ``costmodel_device_profiles`` hook (``costmodel.hookspecs``): a plugin may add a
   device or replace a built-in one of the same id, as a plugin's op rule overrides a built-in one;
2. the package's own ``device_profiles.json`` (Raspberry Pi 4 and 5, Jetson Nano, Orin Nano,
   AGX Orin);
3. ``this-machine``, measured when asked for (``/proc/meminfo``, ``os.cpu_count()``).

Wherever a device id is accepted, a path to a JSON file holding one profile of the same schema is
too (``--device ./my_board.json``). Each figure is ``{"value": ..., "source": "..."}``;
``usable_bytes`` may instead be given as ``usable_fraction`` (of ``memory_bytes``). A profile that
is missing a field, has an unknown one (a typo would otherwise be ignored) or a figure that is not
positive is refused in one line naming the field.

Only ``peak_flops`` and ``memory_bandwidth`` may hold ``null`` (with a source saying why): a
figure that cannot be known (this machine's bandwidth) is better absent than invented. Memory
figures never may: they decide whether a step fits.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.plugin_calls import BadAnswer, HookContract, ask_every
from costmodel.result import StepCost
from costmodel.sweep import format_bytes

PROFILES_RESOURCE = "device_profiles.json"
THIS_MACHINE = "this-machine"
DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda")
# The fields of a profile: the required ones, and the two ways to say what is usable.
REQUIRED_FIELDS: tuple[str, ...] = ("id", "name", "kind", "memory_bytes", "peak_flops", "memory_bandwidth")
USABLE_FIELDS: tuple[str, ...] = ("usable_bytes", "usable_fraction")
OPTIONAL_FIELDS: tuple[str, ...] = ("about",)
# On a CUDA device the prediction counts the tensors' bytes; PyTorch's caching allocator reserves
# memory in blocks and keeps freed blocks cached, so what the process holds is more.
CUDA_NOTE = ("on a cuda device this is the tensors' bytes: the CUDA caching allocator's reserve "
             "(rounding to blocks, cached free blocks) comes on top")


@dataclass(frozen=True)
class Figure:
    """One number of a profile and where it comes from. ``value`` None: not known (``source`` says why)."""

    value: float | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source}


@dataclass(frozen=True)
class DeviceProfile:
    """A device a step may run on: its memory (capacity and what a step can use) and its roofline
    figures. ``origin`` says where the profile came from (built in, a plugin, a file, run time)."""

    id: str
    name: str
    kind: str
    memory_bytes: Figure
    usable_bytes: Figure
    peak_flops: dict[str, Figure]
    memory_bandwidth: Figure
    origin: str = "built in"
    about: str = ""

    @property
    def capacity(self) -> int:
        return int(self.memory_bytes.value)  # type: ignore[arg-type]  # memory figures are never None

    @property
    def usable(self) -> int:
        return int(self.usable_bytes.value)  # type: ignore[arg-type]

    def describe(self) -> str:
        """``NVIDIA Jetson Nano (4 GB) (4 GiB, 3.2 GiB usable)``."""
        return f"{self.name} ({format_bytes(self.capacity)}, {format_bytes(self.usable)} usable)"

    def figures(self) -> dict[str, Figure]:
        """Every figure by its dotted field name (``peak_flops.fp32``), for listings and checks."""
        found = {"memory_bytes": self.memory_bytes, "usable_bytes": self.usable_bytes,
                 "memory_bandwidth": self.memory_bandwidth}
        found.update({f"peak_flops.{dtype}": figure for dtype, figure in self.peak_flops.items()})
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "origin": self.origin,
                "memory_bytes": self.memory_bytes.to_dict(), "usable_bytes": self.usable_bytes.to_dict(),
                "peak_flops": {dtype: figure.to_dict() for dtype, figure in self.peak_flops.items()},
                "memory_bandwidth": self.memory_bandwidth.to_dict()}


# -- reading a profile: every refusal names the profile and the field

def _figure(data: Mapping[str, Any], key: str, where: str, *, may_be_unknown: bool = False,
            at_most_one: bool = False) -> Figure:
    """``data[key]`` as a :class:`Figure`: an object with a positive ``value`` and a non-empty ``source``."""
    if key not in data:
        raise CostModelError(f"device profile {where}: field {key!r} is missing")
    entry = data[key]
    if not isinstance(entry, Mapping):
        raise CostModelError(f"device profile {where}: {key} must be an object "
                             f'{{"value": ..., "source": "..."}}, got {entry!r}')
    unknown = sorted(set(entry) - {"value", "source"})
    if unknown:
        raise CostModelError(f"device profile {where}: {key} has unknown field {unknown[0]!r} (a figure has value and source)")
    for part in ("value", "source"):
        if part not in entry:
            raise CostModelError(f"device profile {where}: field '{key}.{part}' is missing")
    source = entry["source"]
    if not isinstance(source, str) or not source.strip():
        raise CostModelError(f"device profile {where}: {key}.source must say where the figure comes from, got {source!r}")
    value = entry["value"]
    if value is None and may_be_unknown:
        return Figure(None, source)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0 or (at_most_one and value > 1)):
        bound = "in (0, 1]" if at_most_one else "> 0"
        raise CostModelError(f"device profile {where}: {key}.value must be a finite number {bound}, got {value!r}")
    return Figure(value, source)


def profile_from_dict(data: Any, where: str, origin: str) -> DeviceProfile:
    """A checked :class:`DeviceProfile` from its JSON form (``where`` names it in refusals)."""
    if not isinstance(data, Mapping):
        raise CostModelError(f"device profile {where or 'given'}: a profile is a JSON object, got {type(data).__name__}")
    if not where:
        where = repr(data["id"]) if isinstance(data.get("id"), str) else "given"
    allowed = set(REQUIRED_FIELDS) | set(USABLE_FIELDS) | set(OPTIONAL_FIELDS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CostModelError(f"device profile {where}: unknown field {unknown[0]!r}; a profile has "
                             f"{', '.join(REQUIRED_FIELDS)} and one of {' or '.join(USABLE_FIELDS)}")
    for key in ("id", "name", "kind"):
        if key not in data:
            raise CostModelError(f"device profile {where}: field {key!r} is missing")
        if not isinstance(data[key], str) or not data[key].strip():
            raise CostModelError(f"device profile {where}: {key} must be a non-empty string, got {data[key]!r}")
    if data["kind"] not in DEVICE_KINDS:
        raise CostModelError(f"device profile {where}: kind must be one of {', '.join(DEVICE_KINDS)}, got {data['kind']!r}")
    memory = _figure(data, "memory_bytes", where)
    given = [key for key in USABLE_FIELDS if key in data]
    if len(given) != 1:
        raise CostModelError(f"device profile {where}: give exactly one of usable_bytes, usable_fraction "
                             f"(what a step can use, and why), got {len(given)}")
    if given[0] == "usable_bytes":
        usable = _figure(data, "usable_bytes", where)
        if usable.value > memory.value:  # type: ignore[operator]
            raise CostModelError(f"device profile {where}: usable_bytes.value ({usable.value:,}) is more than "
                                 f"memory_bytes.value ({memory.value:,})")
    else:
        fraction = _figure(data, "usable_fraction", where, at_most_one=True)
        usable = Figure(math.floor(memory.value * fraction.value),  # type: ignore[operator]
                        f"{fraction.value:g} of memory_bytes: {fraction.source}")
    flops = data.get("peak_flops")
    if not isinstance(flops, Mapping) or not flops:
        raise CostModelError(f"device profile {where}: peak_flops must be an object of dtype -> figure "
                             f'(e.g. {{"fp32": {{"value": 4.8e10, "source": "..."}}}}), got {flops!r}')
    if "fp32" not in flops:
        raise CostModelError(f"device profile {where}: field 'peak_flops.fp32' is missing")
    peak = {str(dtype): _figure(flops, dtype, f"{where} (peak_flops)", may_be_unknown=True) for dtype in flops}
    bandwidth = _figure(data, "memory_bandwidth", where, may_be_unknown=True)
    return DeviceProfile(id=data["id"], name=data["name"], kind=data["kind"], memory_bytes=memory,
                         usable_bytes=usable, peak_flops=peak, memory_bandwidth=bandwidth, origin=origin,
                         about=str(data.get("about", "")))


# -- where profiles come from

@lru_cache(maxsize=1)
def builtin_profiles() -> tuple[DeviceProfile, ...]:
    """The package's own profiles (``device_profiles.json``), read once per process."""
    text = importlib.resources.files("costmodel").joinpath(PROFILES_RESOURCE).read_text(encoding="utf-8")
    data = json.loads(text)
    return tuple(profile_from_dict(entry, f"{entry.get('id', index)!r} ({PROFILES_RESOURCE})", "built in")
                 for index, entry in enumerate(data["profiles"]))


def _check_plugin_profiles(answer: Any) -> None:
    """The hook's contract: a list of profiles, each valid (a plugin's bad profile names the plugin)."""
    if not isinstance(answer, (list, tuple)):
        raise BadAnswer(f"the answer is a {type(answer).__name__}, not a list of profile dicts")
    for index, entry in enumerate(answer):
        try:
            profile_from_dict(entry, f"{entry.get('id', index)!r}" if isinstance(entry, Mapping) else str(index),
                              "a plugin")
        except CostModelError as error:
            raise BadAnswer(str(error)) from None


DEVICE_PROFILES = HookContract("costmodel_device_profiles", lambda kwargs: "the device profiles",
                               _check_plugin_profiles)


def plugin_profiles(manager: pluggy.PluginManager | None = None) -> tuple[DeviceProfile, ...]:
    """The profiles plugins add (``costmodel_device_profiles``), in the order pluggy asks them
    (the last registered first): where two give one id, the first answer wins."""
    from costmodel.registry import default_plugin_manager

    manager = manager or default_plugin_manager()
    found: list[DeviceProfile] = []
    for answer in ask_every(manager, DEVICE_PROFILES):
        found += [profile_from_dict(entry, f"{entry['id']!r} (a plugin)", "a plugin") for entry in answer]
    return tuple(found)


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` in bytes (its figures are in kB, meaning KiB)."""
    found: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    found[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        return {}
    return found


def this_machine_profile(meminfo_path: str = "/proc/meminfo") -> DeviceProfile:
    """The machine this runs on, measured now: its RAM from ``/proc/meminfo`` (usable: MemAvailable,
    the kernel's estimate of what can be allocated without swapping, so it changes from run to
    run), a CPU device. Its peak FLOP/s and bandwidth are not known (no datasheet for an arbitrary
    machine); give a profile file for a roofline."""
    info = _meminfo(meminfo_path)
    if "MemTotal" not in info:
        raise CostModelError(f"device {THIS_MACHINE!r}: cannot read the memory size from {meminfo_path} "
                             f"(Linux only); give a profile file instead")
    total = info["MemTotal"]
    available = min(info.get("MemAvailable", info.get("MemFree", total)), total)
    cores = os.cpu_count() or 1
    unknown_flops = (f"not known: {cores} CPU core(s) (os.cpu_count()), but neither their clock nor "
                     f"their vector width is measured here; give a profile file with your CPU's figure")
    return DeviceProfile(
        id=THIS_MACHINE, name=f"this machine ({cores} CPU cores)", kind="cpu",
        memory_bytes=Figure(total, f"MemTotal in {meminfo_path}, read at run time"),
        usable_bytes=Figure(max(available, 1), f"MemAvailable in {meminfo_path} at run time: the kernel's "
                            f"estimate of what can be allocated without swapping (changes from run to run)"),
        peak_flops={"fp32": Figure(None, unknown_flops)},
        memory_bandwidth=Figure(None, "not known: not measured here; give a profile file with your memory's figure"),
        origin="run time")


def known_profiles(manager: pluggy.PluginManager | None = None) -> dict[str, DeviceProfile]:
    """Every profile by id: the plugins' first, then the built-in ones they do not replace (and
    ``this-machine``, which is measured only when asked for, is not here: see :func:`known_ids`)."""
    found: dict[str, DeviceProfile] = {}
    for profile in plugin_profiles(manager) + builtin_profiles():
        found.setdefault(profile.id, profile)
    return found


def known_ids(manager: pluggy.PluginManager | None = None) -> list[str]:
    """Every device id a name may be: the plugins' and built-in ones, and ``this-machine``."""
    return [*known_profiles(manager), THIS_MACHINE]


def looks_like_path(spec: str) -> bool:
    """A ``--device`` value naming a file rather than a device id (ids are lowercase-hyphen words)."""
    return spec.endswith(".json") or os.sep in spec or (os.altsep is not None and os.altsep in spec) or os.path.isfile(spec)


def load_profile_file(path: str) -> DeviceProfile:
    """One profile from a JSON file (the schema of ``device_profiles.json``'s entries)."""
    if not os.path.exists(path):
        raise CostModelError(f"no device profile file {path}")
    if os.path.isdir(path):
        raise CostModelError(f"{path} is a directory, not a device profile file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise CostModelError(f"{path} is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CostModelError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    return profile_from_dict(data, path, f"file {path}")


def resolve_device(device: "str | DeviceProfile | Mapping[str, Any]",
                   manager: pluggy.PluginManager | None = None) -> DeviceProfile:
    """A profile from an id (``jetson-nano``), a path to a JSON profile, a profile's dict, or a
    profile. An unknown id is refused in one line listing the known ones."""
    if isinstance(device, DeviceProfile):
        return device
    if isinstance(device, Mapping):
        return profile_from_dict(device, "", "given")
    if not isinstance(device, str) or not device.strip():
        raise CostModelError(f"a device is an id, a profile file or a profile, got {device!r}")
    if looks_like_path(device):
        return load_profile_file(device)
    if device == THIS_MACHINE:
        return this_machine_profile()
    profiles = known_profiles(manager)
    if device not in profiles:
        raise CostModelError(f"unknown device {device!r}; known devices: {', '.join(known_ids(manager))} "
                             f"(or a path to a JSON profile file)")
    return profiles[device]


# -- does a step fit

@dataclass(frozen=True)
class Fit:
    """Whether a step's predicted ``peak`` fits a device's usable memory, and by how much
    (``margin_bytes``: what is left, negative when over)."""

    id: str
    name: str
    kind: str
    memory_bytes: int
    usable_bytes: int
    peak_bytes: int
    fits: bool
    margin_bytes: int
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """``fits in NVIDIA Jetson Nano (4 GB) (4 GiB, 3.2 GiB usable): peak 1.23 GiB, 1.97 GiB to spare``."""
        device = f"{self.name} ({format_bytes(self.memory_bytes)}, {format_bytes(self.usable_bytes)} usable)"
        if self.fits:
            text = f"fits in {device}: peak {format_bytes(self.peak_bytes)}, {format_bytes(self.margin_bytes)} to spare"
        else:
            text = f"does not fit in {device}: peak {format_bytes(self.peak_bytes)}, {format_bytes(-self.margin_bytes)} over"
        return "; ".join((text, *self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "kind": self.kind, "memory_bytes": self.memory_bytes,
                "usable_bytes": self.usable_bytes, "peak_bytes": self.peak_bytes, "fits": self.fits,
                "margin_bytes": self.margin_bytes, "notes": list(self.notes)}


def fit_of(peak_bytes: int, profile: DeviceProfile) -> Fit:
    """How ``peak_bytes`` sits in ``profile``'s usable memory."""
    notes = (CUDA_NOTE,) if profile.kind == "cuda" else ()
    margin = profile.usable - int(peak_bytes)
    return Fit(id=profile.id, name=profile.name, kind=profile.kind, memory_bytes=profile.capacity,
               usable_bytes=profile.usable, peak_bytes=int(peak_bytes), fits=margin >= 0, margin_bytes=margin,
               notes=notes)


def fits(config_or_prediction: StepConfig | StepCost, device: "str | DeviceProfile | Mapping[str, Any]", *,
         manager: pluggy.PluginManager | None = None) -> Fit:
    """Whether a step fits ``device`` (an id, a profile file, a profile): its predicted ``peak``
    (the true simultaneous peak) against the device's usable memory. A :class:`StepConfig` is
    predicted first; a prediction (or a measurement) is taken as it is."""
    profile = resolve_device(device, manager)
    if isinstance(config_or_prediction, StepConfig):
        from costmodel.prediction import predict_config

        config_or_prediction = predict_config(config_or_prediction, manager=manager)
    if not isinstance(config_or_prediction, StepCost):
        raise CostModelError(f"fits() takes a StepConfig or a prediction, not {type(config_or_prediction).__name__}")
    return fit_of(config_or_prediction.memory["peak"], profile)
