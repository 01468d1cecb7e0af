"""Which layers a low-rank method touches, at which rank: shared by the LoRA/DoRA and GaLore plugins.

The rules follow the pinned peft 0.21.2 so that a prediction and the runtime reference pick the
same layers:

- the default targets are the model's ``nn.Conv2d`` and ``nn.Linear`` layers outside the head
  (for LoRA/DoRA only convolutions with ``groups == 1``: peft refuses a rank-``r`` adapter on a
  grouped convolution unless ``r % groups == 0``);
- ``rank_pattern`` / ``alpha_pattern`` map a key to a per-layer rank / alpha exactly as peft's
  ``get_pattern_key`` does: the first key ``k`` (in the mapping's order) for which
  ``re.match(rf"(.*\\.)?({k})$", name)`` holds wins; a layer no key matches keeps the default;
- ``target_modules`` / ``exclude_modules`` follow ``LoraConfig``: a string is a regular expression
  that must match the whole qualified name, a list holds names that match exactly or as a
  ``.``-separated suffix.

Options (``StepConfig.options``), all optional, declared in :data:`TARGET_OPTIONS` (the methods
declare them through ``costmodel_method_options``; the engine checks and coerces them before the
plugin runs, so the functions here read ready values):

``rank_pattern`` (dict), ``alpha_pattern`` (dict), ``target_modules`` (str | list),
``exclude_modules`` (str | list), ``include_grouped`` (bool: also target grouped convolutions
whose rank is a multiple of ``groups``; LoRA/DoRA only), ``adapt_head`` (bool: treat the head's
layers like the others instead of training the head in full; default false).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from costmodel.costs import OptionSpec
from costmodel.errors import CostModelError
from costmodel.models import head_name

TARGET_OPTIONS: dict[str, OptionSpec] = {
    "rank_pattern": OptionSpec("int_pattern", "per-layer rank: {layer-name regex: rank}, the first matching key wins"),
    "alpha_pattern": OptionSpec("float_pattern", "per-layer lora_alpha: {layer-name regex: alpha}"),
    "target_modules": OptionSpec("regex_or_names", "the layers to adapt: a regex over the whole qualified "
                                                   "name, or a list of names (exact or as a suffix)"),
    "exclude_modules": OptionSpec("regex_or_names", "layers never to adapt, written as target_modules"),
    "include_grouped": OptionSpec("bool", "also adapt grouped convolutions whose rank is a multiple of groups"),
    "adapt_head": OptionSpec("bool", "treat the head's layers like the others instead of training the head "
                                     "in full (default false)"),
}
KNOWN_OPTIONS: frozenset[str] = frozenset(TARGET_OPTIONS)


@dataclass(frozen=True)
class Target:
    """One layer a method adapts or projects: its qualified name, the module, its rank and alpha."""

    name: str
    module: nn.Module
    rank: int
    alpha: float


def pattern_key(pattern_keys: Iterable[str], name: str) -> str:
    """peft 0.21.2 ``get_pattern_key``: the first key matching ``name`` as a suffix regex, else ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _matches(spec: str | Sequence[str], name: str) -> bool:
    """``LoraConfig.target_modules`` semantics: a regex over the whole name, or exact / suffix names."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in spec)


def head_module_names(model: nn.Module) -> set[str]:
    """The qualified names of the head and everything inside it."""
    head = head_name(model)
    return {name for name, _ in model.named_modules() if name == head or name.startswith(head + ".")}


def select_targets(
    model: nn.Module,
    rank: int,
    alpha: float,
    options: Mapping[str, Any],
    *,
    grouped: str,
) -> list[Target]:
    """The layers to adapt, in ``named_modules`` order, each with its rank and alpha.

    ``grouped`` says what to do with grouped convolutions by default: ``"all"`` (GaLore projects
    them like any weight), ``"divisible"`` (LoRA/DoRA: none unless ``include_grouped``, then those
    whose rank is a multiple of ``groups``). A layer that is explicitly targeted (through
    ``target_modules``) or given a rank by ``rank_pattern`` and cannot take its rank is an error
    naming the layer. ``options`` are as ``costmodel.options`` coerced them (``TARGET_OPTIONS``).
    """
    rank_pattern: Mapping[str, int] = options.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, float] = options.get("alpha_pattern") or {}
    target_spec = options.get("target_modules")
    exclude_spec = options.get("exclude_modules")
    include_grouped: bool = options.get("include_grouped", False)
    adapt_head: bool = options.get("adapt_head", False)
    head = set() if adapt_head else head_module_names(model)

    targets: list[Target] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            # peft refuses any matched module it cannot adapt, a container of layers included.
            if target_spec is not None and name and _matches(target_spec, name):
                raise CostModelError(
                    f"layer {name!r} ({type(module).__name__}) matches target_modules but is neither "
                    f"an nn.Conv2d nor an nn.Linear")
            continue
        if exclude_spec is not None and _matches(exclude_spec, name):
            continue
        explicit = target_spec is not None and _matches(target_spec, name)
        if target_spec is not None and not explicit:
            continue
        if target_spec is None and name in head:
            continue
        key = pattern_key(rank_pattern.keys(), name)
        layer_rank = rank_pattern.get(key, rank)
        layer_alpha = float(alpha_pattern.get(pattern_key(alpha_pattern.keys(), name), alpha))
        groups = getattr(module, "groups", 1)
        if groups > 1 and grouped == "divisible":
            if not (explicit or include_grouped):
                continue
            if layer_rank % groups != 0:
                # Named on purpose (a target or a rank_pattern key equal to the name): refuse, as
                # peft does; reached only through include_grouped: leave the layer alone.
                if explicit or (key == name and key in rank_pattern):
                    raise CostModelError(
                        f"layer {name!r} is a grouped convolution (groups={groups}) and cannot take "
                        f"rank {layer_rank}: peft needs the rank to be a multiple of groups")
                continue
        targets.append(Target(name, module, layer_rank, layer_alpha))
    if target_spec is not None and not targets:
        raise CostModelError(f"option target_modules={target_spec!r} matches no nn.Conv2d or nn.Linear layer")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
