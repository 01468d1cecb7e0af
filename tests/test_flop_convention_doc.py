"""The FLOP convention lives in three places, kept in step here: the op plugins (their handle
tables), the reference's exact-convention formula table (``costmodel.validation.flops``,
independent of the plugins) and ``docs/flop-convention.md``.

The document's machine-checked convention (stated at its top): every op the reference's table
defines is named in backticks by its packet, ``aten.convolution`` (possibly followed by an
overload or arguments: ``aten.add.Tensor``, ``aten.mm(a, b)``); every Python op a plugin's handle
table registers is named in backticks in the section "Python ops the op plugins cost", as
:func:`python_name` spells it (``nn.Conv2d``, ``F.conv2d``, ``torch.add``, ``Tensor.view``,
``operator.iadd``, ``len``).
"""

from __future__ import annotations

import builtins
import importlib.metadata
import operator
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision.ops
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable
from costmodel.validation.flops import EXACT_FLOP_FORMULAS, register_bitsandbytes_formulas

# bitsandbytes' rows join the table when the reference builds an 8-bit optimizer; here, always.
import bitsandbytes  # noqa: E402,F401  (defines torch.ops.bitsandbytes)

register_bitsandbytes_formulas()

DOC = Path(__file__).resolve().parent.parent / "docs" / "flop-convention.md"
PLUGIN_SECTION = "## Python ops the op plugins cost"

# Where a public name for a registered callable is looked for, in this order.
NAMESPACES: tuple[tuple[str, Any], ...] = (
    ("F.", F), ("torch.", torch), ("torch.linalg.", torch.linalg), ("operator.", operator),
    ("torchvision.ops.", torchvision.ops), ("", builtins),
)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _spans(text: str) -> list[str]:
    """The contents of every inline code span (single backticks; spans may wrap lines)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def _plugin_section(text: str) -> str:
    start = text.index(PLUGIN_SECTION)
    end = text.find("\n## ", start + len(PLUGIN_SECTION))
    return text[start:] if end < 0 else text[start:end]


def documented_packets(text: str) -> set[str]:
    """Packets the document names: a code span that starts with ``namespace.op`` followed by the
    span's end, an overload (``.Tensor``) or arguments (``(``)."""
    found = set()
    for span in _spans(text):
        match = re.match(r"((?:aten|prim|profiler|bitsandbytes)\.[A-Za-z_][A-Za-z0-9_]*)(?:$|[.(])", span)
        if match:
            found.add(match.group(1))
    return found


def python_name(kind: str, target: Any) -> str:
    """A registered ``(kind, target)`` as the document names it."""
    if kind == "call_method":
        return f"Tensor.{target}"
    if kind == "call_module":
        if getattr(nn, target.__name__, None) is target:
            return f"nn.{target.__name__}"
        if getattr(torchvision.ops, target.__name__, None) is target:
            return f"torchvision.ops.{target.__name__}"
        return f"{target.__module__}.{target.__qualname__}"
    name = getattr(target, "__name__", "")
    for prefix, namespace in NAMESPACES:
        if name and getattr(namespace, name, None) is target:
            return prefix + name
    for prefix, namespace in NAMESPACES:
        aliases = sorted(key for key, value in vars(namespace).items() if value is target and not key.startswith("_"))
        if aliases:
            return prefix + aliases[0]
    return f"{target.__module__}.{name}"


def plugin_tables() -> dict[str, HandleTable]:
    """Every handle table of the registered plugins (entry-point group ``costmodel``), by plugin."""
    tables = {}
    for entry in importlib.metadata.entry_points(group="costmodel"):
        module = entry.load()
        for attribute, value in vars(module).items():
            if isinstance(value, HandleTable):
                tables[f"{entry.name}.{attribute}"] = value
    return tables


def test_the_document_states_its_convention_at_the_top():
    head = _doc()[:3000]
    assert "tests/test_flop_convention_doc.py" in head and "`aten.convolution`" in head, \
        "docs/flop-convention.md must say at its top how ops are named for this test"


def test_every_op_of_the_reference_table_is_documented():
    packets = {str(packet) for packet in EXACT_FLOP_FORMULAS}
    assert len(packets) > 100  # the table as a whole, not an empty import
    missing = sorted(packets - documented_packets(_doc()))
    assert not missing, f"ops with an exact formula but not in docs/flop-convention.md: {missing}"


def test_every_documented_exact_op_has_a_formula_in_the_reference():
    """The other direction, within the exact convention's part of the document: a packet named
    there that the reference does not define is a stale or misspelt name."""
    text = _doc()
    exact = text[text.index("## `exact`"):]
    exact = exact.replace(_plugin_section(text), "") if PLUGIN_SECTION in exact else exact
    defined = {str(packet) for packet in EXACT_FLOP_FORMULAS}
    unknown = sorted(documented_packets(exact) - defined)
    assert not unknown, f"docs/flop-convention.md names ops the reference has no formula for: {unknown}"


def test_there_are_handle_tables_to_check():
    tables = plugin_tables()
    assert {"conv.TABLE", "linear.TABLE", "elementwise.TABLE", "shape.TABLE"} <= set(tables), sorted(tables)
    assert all(table.registered() for table in tables.values())


@pytest.mark.parametrize("table_name", sorted(plugin_tables()))
def test_every_python_op_a_plugin_registers_is_documented(table_name):
    table = plugin_tables()[table_name]
    documented = set(_spans(_plugin_section(_doc())))
    missing = sorted({python_name(kind, target) for kind, target in table.registered()} - documented)
    assert not missing, (f"{table_name} registers ops missing from the section {PLUGIN_SECTION!r} of "
                         f"docs/flop-convention.md: {missing}")


def test_python_names_are_public_where_torch_has_one():
    assert python_name("call_function", F.conv2d) == "F.conv2d"
    assert python_name("call_function", F.max_pool2d) == "F.max_pool2d"
    assert python_name("call_function", torch.add) == "torch.add"
    assert python_name("call_function", operator.iadd) == "operator.iadd"
    assert python_name("call_function", torch.linalg.svd) == "torch.linalg.svd"
    assert python_name("call_function", len) == "len"
    assert python_name("call_module", nn.Conv2d) == "nn.Conv2d"
    assert python_name("call_method", "view") == "Tensor.view"
