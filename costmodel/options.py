"""Checking a method's arguments before the method plugin runs: its options and whether it takes a rank.

Method plugins declare what they take (``costmodel_method_options`` -> :class:`MethodOptions`, each
option an :class:`OptionSpec` of one kind); this module is the one place that holds a given value
against its declaration. The engine's ``prepare_method`` calls :func:`checked_config` before every
``costmodel_prepare_method``, so the Python API is as safe as the CLI; the CLI calls
:func:`check_method_arguments` first to refuse an explicit ``--rank`` for a method that takes none
and to turn the shorthand flags (``--alpha``, ``--galore-update-proj-gap``) into options.

A method's hyper-parameters are options like any other (LoRA/DoRA ``alpha``, GaLore
``update_proj_gap`` and ``scale``), their defaults in the plugin's declaration
(``OptionSpec.default``): the plugin receives its options completed with them, while the user's
``StepConfig`` keeps only what was given (so its JSON shows what the user asked for). A base step
whose method varies (sweep, plan, report) carries ``StepConfig.shared_options``, which reach only
the methods that declare them.

Values arrive typed (the Python API) or from ``--option KEY=VALUE`` (parsed as JSON, else kept as a
string), so each kind accepts the spellings a user types: a bool from ``true``/``False``/``yes``/
``no``/``1``/``0`` as well as JSON booleans; an integer or number from a numeric string too. Every
refusal is one line: ``--option KEY (method M): what is wrong, got VALUE``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from costmodel.config import MAX_INT, StepConfig, is_valid_int, is_valid_positive
from costmodel.costs import OPTION_KINDS, MethodOptions, OptionSpec
from costmodel.errors import CostModelError
from costmodel.plugin_calls import BadAnswer, HookContract, ask_first
from costmodel.registry import method_names

TRUE_WORDS = frozenset({"true", "yes", "1"})
FALSE_WORDS = frozenset({"false", "no", "0"})


class _Refused(ValueError):
    """A value not of its kind: ``expected`` says what was (the caller adds which option and the
    value); with ``quoted`` it is the whole complaint, naming the offending part itself (a pattern
    names its bad entry)."""

    def __init__(self, expected: str, quoted: bool = False) -> None:
        super().__init__(expected)
        self.expected = expected
        self.quoted = quoted


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    # JSON 1/0 (``--option adapt_head=1``) and the words a user types, in any case (Python's False).
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise _Refused(OPTION_KINDS["bool"])


def _int(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _Refused(OPTION_KINDS["int"]) from None
    # A float such as 8.0 is refused too: a rank of 8.5 is a mistake, not something to round.
    if not is_valid_int(value):
        raise _Refused(f"{OPTION_KINDS['int']} and <= {MAX_INT} (2**31 - 1)")
    return value


def _float(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Refused(OPTION_KINDS["float"]) from None
    if not is_valid_positive(value):
        raise _Refused(OPTION_KINDS["float"])
    return float(value)


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused(OPTION_KINDS["regex"])
    try:
        re.compile(value)
    except re.error as error:
        raise _Refused(f"a regular expression ({error})") from None
    # The string, not the compiled pattern: peft (the runtime reference) and the JSON output take strings.
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Refused(OPTION_KINDS["names"])
    return list(value)


def _regex_or_names(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return _regex(value)
    if isinstance(value, (list, tuple)):
        return _names(value)
    raise _Refused(OPTION_KINDS["regex_or_names"])


def _pattern(of: Callable[[Any], Any], kind: str) -> Callable[[Any], dict[str, Any]]:
    def coerce(value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _Refused(OPTION_KINDS[kind])
        coerced: dict[str, Any] = {}
        for key, item in value.items():
            try:
                _regex(key)
            except _Refused as refused:
                raise _Refused(f"key {key!r} is not {refused.expected}", quoted=True) from None
            try:
                coerced[key] = of(item)
            except _Refused as refused:
                raise _Refused(f"the value for key {key!r} must be {refused.expected}, got {item!r}",
                               quoted=True) from None
        return coerced  # in the given order: the first matching key wins (peft's get_pattern_key)

    return coerce


COERCE: dict[str, Callable[[Any], Any]] = {
    "bool": _bool, "int": _int, "float": _float, "regex": _regex, "names": _names,
    "regex_or_names": _regex_or_names, "int_pattern": _pattern(_int, "int_pattern"),
    "float_pattern": _pattern(_float, "float_pattern"),
}
assert set(COERCE) == set(OPTION_KINDS), "every declared kind has a coercion"


def coerce_option(method: str, key: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` coerced to ``spec.kind``, or a one-line CostModelError naming ``--option key``."""
    try:
        return COERCE[spec.kind](value)
    except _Refused as refused:
        problem = refused.expected if refused.quoted else f"expected {refused.expected}, got {value!r}"
        raise CostModelError(f"--option {key} (method {method}): {problem}") from None


def coerce_options(method: str, declared: MethodOptions, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``options`` checked against ``declared`` and coerced, in the given order.

    A key ``declared`` does not list is refused, naming it and listing the method's options (a typo
    must not silently change nothing)."""
    unknown = [key for key in options if key not in declared.options]
    if unknown:
        given = ", ".join(f"--option {key}" for key in unknown)
        if not declared.options:
            raise CostModelError(f"{given}: method {method!r} takes no options")
        raise CostModelError(
            f"{given}: method {method!r} does not know the option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(declared.options))}")
    return {key: coerce_option(method, key, declared.options[key], value) for key, value in options.items()}


def _check_method_options(answer: Any) -> None:
    """A MethodOptions whose every option is an OptionSpec with a default of its kind (or None):
    a plugin's declaration, checked once."""
    if not isinstance(answer, MethodOptions):
        raise BadAnswer(f"the answer is {type(answer).__name__}, not costmodel.costs.MethodOptions")
    for key, spec in answer.options.items():
        if not isinstance(key, str) or not isinstance(spec, OptionSpec):
            raise BadAnswer(f"option {key!r} is declared as {type(spec).__name__}, not costmodel.costs.OptionSpec")
        if spec.default is not None:
            try:
                COERCE[spec.kind](spec.default)
            except _Refused as refused:
                raise BadAnswer(f"option {key!r} has the default {spec.default!r}, not {refused.expected}") from None


# Asked through costmodel.plugin_calls like every hook: a plugin that raises or declares nonsense is
# a one-line error naming it.
METHOD_OPTIONS = HookContract("costmodel_method_options", lambda kwargs: f"method {kwargs['name']!r}",
                              _check_method_options)


def method_options(manager: pluggy.PluginManager, method: str) -> MethodOptions | None:
    """What ``method`` declares it takes, or None when no plugin declares it."""
    return ask_first(manager, METHOD_OPTIONS, name=method)


def unknown_method(manager: pluggy.PluginManager, method: str) -> CostModelError:
    """The refusal of a method no plugin provides."""
    known = ", ".join(method_names(manager)) or "none registered"
    return CostModelError(f"unknown method {method!r}; methods provided by plugins: {known}")


def check_method_arguments(manager: pluggy.PluginManager, method: str, rank_given: bool,
                           options: Mapping[str, Any],
                           shorthands: Mapping[str, tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The CLI's check of ``--method``, ``--rank``, ``--option`` and the options' shorthand flags
    (``shorthands``: option key -> (the flag, its value), only those given explicitly: ``--alpha 8``
    is ``{"alpha": ("--alpha", 8.0)}``) before a step is configured.

    Returns ``options`` coerced to their declared kinds, with the shorthands' values added under
    their keys. Raises a one-line CostModelError for an unknown method, an explicit rank
    (``rank_given``) for a method that takes none, a shorthand for an option the method does not
    declare (``--alpha`` for fft: ``--alpha: method fft does not use it``), a shorthand's value not
    of its kind (``--alpha must be a finite number > 0, got nan``), a shorthand and an ``--option``
    of the same key with different values, an undeclared option or a value not of its kind. A
    method provided by a plugin that declares nothing gets its options (and shorthands) back
    unchanged (its plugin checks them).
    """
    declared = method_options(manager, method)
    shorthands = dict(shorthands or {})
    if declared is None:
        if method not in method_names(manager):
            raise unknown_method(manager, method)
        return {**options, **{key: value for key, (_, value) in shorthands.items() if key not in options}}
    if rank_given and not declared.takes_rank:
        raise CostModelError(f"--rank: method {method} takes no rank")
    for key, (flag, _) in shorthands.items():
        if key not in declared.options:
            raise CostModelError(f"{flag}: method {method} does not use it")
    coerced = coerce_options(method, declared, options)
    for key, (flag, value) in shorthands.items():
        try:
            value = COERCE[declared.options[key].kind](value)
        except _Refused as refused:
            raise CostModelError(f"{flag} must be {refused.expected}, got {value!r}") from None
        if key in coerced and coerced[key] != value:
            raise CostModelError(f"{flag} {value!r} and --option {key}={coerced[key]!r} disagree: give one")
        coerced[key] = value
    return coerced


def resolved_options(method: str, declared: MethodOptions, config: StepConfig) -> dict[str, Any]:
    """The options ``method`` runs with under ``config``: ``config.shared_options`` that ``method``
    declares, overridden by ``config.options``, coerced to their kinds, then every declared default
    of an option not given (an option whose default is None stays absent)."""
    given = {key: value for key, value in config.shared_options.items() if key in declared.options}
    given.update(config.options)
    options = coerce_options(method, declared, given)
    for key, spec in declared.options.items():
        if key not in options and spec.default is not None:
            options[key] = spec.default
    return options


def checked_config(manager: pluggy.PluginManager, config: StepConfig) -> tuple[StepConfig, MethodOptions | None]:
    """``config`` as ``config.method``'s plugin receives it: its options checked, coerced and
    completed with the declared defaults (:func:`resolved_options`; the shared options merged in),
    the same ``config`` when nothing changes; and the method's declaration (None when it makes
    none: then the options go to the plugin as given and the shared options are ignored)."""
    declared = method_options(manager, config.method)
    if declared is None:
        return config, None
    if not config.options and not config.shared_options and all(
            spec.default is None for spec in declared.options.values()):
        return config, declared
    # Always the coerced copy: a value equal but not identical (1 == True) must still arrive coerced.
    return config.replace(options=resolved_options(config.method, declared, config), shared_options={}), declared


def option_value(manager: pluggy.PluginManager, config: StepConfig, key: str) -> Any:
    """The value of option ``key`` that ``config.method`` runs with (given, shared or its declared
    default; None when absent or the method declares no such option)."""
    declared = method_options(manager, config.method)
    if declared is None or key not in declared.options:
        return None
    return resolved_options(config.method, declared, config).get(key)
