"""The plugin registry: one ``pluggy.PluginManager`` that every cost rule reaches the engine through.

Plugins are found through the ``costmodel`` entry-point group, built-in ones (the ``costmodel``
distribution's own ``costmodel.plugins``) exactly as a third-party package's. Built-ins are
registered first: pluggy asks the most recently registered implementation first, so a third-party
plugin's answer to a ``firstresult`` hook overrides a built-in rule for the same node.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from functools import lru_cache
from types import ModuleType

import pluggy

from costmodel import hookspecs
from costmodel.errors import CostModelError
from costmodel.plugin_calls import METHOD_NAMES, OPTIMIZER_NAMES, ask_every, one_line

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
# The distribution whose entry points are the built-in plugins.
BUILTIN_DISTRIBUTION = "costmodel"


def _discover() -> list[importlib.metadata.EntryPoint]:
    """Every installed entry point of the ``costmodel`` group."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points, built-ins first, each part in name order (a stable registration order)."""
    found = _discover()

    def is_builtin(entry: importlib.metadata.EntryPoint) -> bool:
        return entry.dist is not None and entry.dist.name == BUILTIN_DISTRIBUTION

    return sorted(found, key=lambda entry: (not is_builtin(entry), entry.name))


def _register(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        manager.register(plugin, name=name)
    except Exception as error:  # pluggy raises ValueError / PluginValidationError
        # pluggy's PluginValidationError spans lines (plugin, definition, problem); the CLI prints one.
        raise CostModelError(one_line(f"plugin {name!r} cannot be registered: {error}")) from None


def create_plugin_manager(extra_plugins: Iterable[object] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager: the hookspecs, then every entry point of the ``costmodel`` group (built-ins
    first), then ``extra_plugins`` (asked before all others), then ``check_pending()``.

    A plugin that fails to import or implements a hook that does not exist (a misspelt name, a
    wrong argument) is a ``CostModelError`` naming it.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    if entry_points:
        for entry in _entry_points():
            try:
                plugin = entry.load()
            except Exception as error:
                raise CostModelError(one_line(
                    f"plugin {entry.name!r} ({entry.value}) failed to load: {type(error).__name__}: {error}"
                )) from None
            _register(manager, plugin, entry.name)
    for plugin in extra_plugins:
        name = plugin.__name__ if isinstance(plugin, ModuleType) else f"{type(plugin).__name__}@{id(plugin):x}"
        _register(manager, plugin, name)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        name = manager.get_name(error.plugin) or repr(error.plugin)
        raise CostModelError(one_line(f"plugin {name!r} implements a hook that does not exist: {error}")) from None
    return manager


@lru_cache(maxsize=1)
def default_plugin_manager() -> pluggy.PluginManager:
    """The manager that predictions use unless given another one (built once per process)."""
    manager = create_plugin_manager()
    if not manager.get_plugins():
        raise CostModelError(
            "no costmodel plugins are registered; reinstall the package (pip install -e .) "
            "so that its entry points are recorded")
    return manager


def optimizer_names(manager: pluggy.PluginManager) -> list[str]:
    """Every optimizer some plugin costs, sorted (``costmodel_optimizer_names``)."""
    return sorted({name for names in ask_every(manager, OPTIMIZER_NAMES) for name in names})


def method_names(manager: pluggy.PluginManager) -> list[str]:
    """Every fine-tuning method some plugin provides, sorted; a plugin that answers anything but a
    list of names is a ``CostModelError`` naming it (``costmodel.plugin_calls``)."""
    return sorted({name for names in ask_every(manager, METHOD_NAMES) for name in names})
