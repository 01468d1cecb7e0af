"""One walk over the engine's nested results: flatten to leaves and a structure, and back.

A prediction of many ranks at once compares, stacks and instantiates nested values (plugin
answers, parameter groups, module attributes): dicts, lists, tuples and dataclasses of ints,
strings, flags and arrays. Every such operation is a function of the leaves, given that the
structures agree; :func:`flatten` and :func:`unflatten` are the one walk they share.

A dataclass field named ``note`` is free text (a plugin's explanation, which may name sizes): it
is not a leaf and not part of the structure's identity, and :func:`unflatten` restores the notes
of the value that was flattened.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

NOTE = "note"


@functools.cache
def _fields(kind: type) -> tuple[tuple[str, ...], bool]:
    """A dataclass's field names other than ``note``, and whether it has a ``note``."""
    names = tuple(f.name for f in dataclasses.fields(kind))
    return tuple(n for n in names if n != NOTE), NOTE in names


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, tuple) and not hasattr(value, "_fields"))


@dataclasses.dataclass(frozen=True)
class Structure:
    """The containers around a value's leaves, comparable and hashable. ``shape`` says what each
    level is; ``prototypes`` (dataclass instances, in walk order: the notes and any field
    :func:`unflatten` must not rebuild) is left out of comparisons."""

    shape: Any
    prototypes: tuple[Any, ...] = dataclasses.field(compare=False, hash=False, repr=False)


def flatten(value: Any, leaf_types: tuple[type, ...] = ()) -> tuple[list[Any], Structure]:
    """The leaves of ``value`` in walk order, and its structure. Containers are dicts, lists,
    plain tuples and dataclass instances other than ``leaf_types``; anything else (ints, strings,
    arrays, tensors, namedtuples) is a leaf."""
    leaves: list[Any] = []
    prototypes: list[Any] = []

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            return (type(item), tuple(item), tuple(walk(v) for v in item.values()))
        if _is_sequence(item):
            return (type(item), len(item), tuple(walk(v) for v in item))
        if dataclasses.is_dataclass(item) and not isinstance(item, (type, *leaf_types)):
            names, _ = _fields(type(item))
            prototypes.append(item)
            return (type(item), names, tuple(walk(getattr(item, n)) for n in names))
        leaves.append(item)
        return None

    return leaves, Structure(walk(value), tuple(prototypes))


def unflatten(structure: Structure, leaves: Sequence[Any]) -> Any:
    """The value of ``structure`` with these leaves (dataclasses rebuilt from their prototypes,
    notes included)."""
    values = iter(leaves)
    prototypes = iter(structure.prototypes)

    def build(shape: Any) -> Any:
        if shape is None:
            return next(values)
        kind, keys, children = shape
        if dataclasses.is_dataclass(kind):
            prototype = next(prototypes)
            return dataclasses.replace(prototype, **{n: build(c) for n, c in zip(keys, children)})
        if issubclass(kind, dict):
            return kind((k, build(c)) for k, c in zip(keys, children))
        return kind(build(c) for c in children)

    return build(structure.shape)


def notes(value: Any) -> list[str]:
    """The ``note`` of every dataclass in ``value``, in walk order."""
    _, structure = flatten(value)
    return [getattr(p, NOTE) for p in structure.prototypes if _fields(type(p))[1]]
