"""The rules every section's settings are checked by (server, limits, exporter, webhooks, each detector's).

Every error is one line, ``dotted.key: rule, got value`` (``detectors.rank_stalled.floor_seconds: must be a
positive number, got -1``), raised as ``ConfigError`` (a ``ValueError``): ``trainhealth serve`` prints it and
exits 2 at start, and a reload answers it and keeps the running settings.

A component's ``Settings.__post_init__`` checks its own ranges with the rules below, naming keys relative to
its own section (``rank_stalled.floor_seconds``); ``build()`` first checks each value's type against the
dataclass's annotations where the class's own rules did not already refuse the value (no silent coercion:
``"5"`` is not a number, ``5.5`` is not an integer), and re-roots messages at the full dotted section
(``detectors.rank_stalled``, ``webhooks[1]``).

This module imports nothing of trainhealth: each detector's settings (beside the detector) use it, and
``load.py`` reads the detectors' catalogue, so config and the detectors depend on each other only through it.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad setting; the message names the dotted key, the rule and the value, on one line."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(section: str, name: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{section}.{name}: {rule}, got {value!r}")


def positive(settings: Any, section: str, *names: str) -> None:
    """Each named setting is a finite number > 0."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or value <= 0:
            raise _fail(section, name, "must be a positive number", value)


def at_least(settings: Any, section: str, minimum: float, *names: str) -> None:
    """Each named setting is a finite number >= ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or value < minimum:
            raise _fail(section, name, f"must be a number >= {minimum:g}", value)


def above(settings: Any, section: str, minimum: float, *names: str) -> None:
    """Each named setting is a finite number > ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or value <= minimum:
            raise _fail(section, name, f"must be a number > {minimum:g}", value)


def fraction(settings: Any, section: str, *names: str) -> None:
    """Each named setting is a number in (0, 1]."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or not 0 < value <= 1:
            raise _fail(section, name, "must be a number in (0, 1]", value)


def whole(settings: Any, section: str, *names: str, minimum: int = 0, maximum: int | None = None) -> None:
    """Each named setting is an int >= ``minimum`` (and <= ``maximum``)."""
    for name in names:
        value = getattr(settings, name)
        if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
                or (maximum is not None and value > maximum)):
            rule = f"must be an integer >= {minimum}" if maximum is None else \
                f"must be an integer {minimum}-{maximum}"
            raise _fail(section, name, rule, value)


_ORDERS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def ordered(settings: Any, section: str, name: str, order: str, limit: float, named: str = "",
            spec: str = "") -> None:
    """The named setting is ``order`` (``">"``, ``">="``, ``"<"`` or ``"<="``) ``limit``: a constant
    (``factor: must be >= 1``) or what another setting makes it, which ``named`` then names
    (``ceiling_seconds: must be >= floor_seconds (180.0)``); ``spec`` formats the limit (``"g"``: 10 for 10.0).
    Only the order: check both settings' types and ranges first, with the rules above."""
    value = getattr(settings, name)
    if not _ORDERS[order](value, limit):
        shown = f"{limit:{spec}}" if not named else f"{named} ({limit:{spec}})"
        raise _fail(section, name, f"must be {order} {shown}", value)


def flag(settings: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, bool):
            raise _fail(section, name, "must be true or false", value)


def one_of(settings: Any, section: str, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(settings, name)
    if value not in choices:
        raise _fail(section, name, f"must be one of {', '.join(choices)}", value)


def url(settings: Any, section: str, name: str) -> None:
    """An http(s) URL with a host."""
    value = getattr(settings, name)
    if not is_url(value):
        raise _fail(section, name, "must be an http(s) URL", redacted(value))


def redacted(value: Any) -> Any:
    """A URL as messages and logs may show it: ``user:password@`` and the query's values hidden."""
    if not isinstance(value, str):
        return value
    value = re.sub(r"(?<=://)[^/?#@]*@", "***@", value)
    base, sep, query = value.partition("?")
    return base + sep + re.sub(r"=[^&#]*", "=***", query)


def is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and len(value.split("/")[2]) > 0


# -- types, from the dataclass annotations ---------------------------------------------------------
def _type_rule(hint: Any) -> tuple[str, Any] | None:
    """(rule for the message, predicate) for an annotation; None: anything goes."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _type_rule(args[0]) if len(args) == 1 else None
        if inner is None:
            return None
        return inner[0], (lambda v, p=inner[1]: v is None or p(v))
    if hint is bool:
        return "must be true or false", lambda v: isinstance(v, bool)
    if hint is int:
        return "must be an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return "must be a number", _number
    if hint is str:
        return "must be a string", lambda v: isinstance(v, str)
    if origin in (list, tuple) and typing.get_args(hint)[:1] == (str,):
        return "must be a list of strings", lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(x, str) for x in v)
    return None


def check_types(cls: type, section: str, values: Mapping[str, Any]) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        rule = _type_rule(hints.get(key))
        if rule is not None and not rule[1](value):
            raise _fail(section, key, rule[0], value)


def _rooted(message: str, section: str) -> str:
    """``rank_stalled.factor: ...`` raised by a component -> ``detectors.rank_stalled.factor: ...``."""
    key, sep, rule = message.partition(": ")
    if not sep or " " in key:
        return f"{section}: {message}"
    if key == section or key.startswith(section + "."):
        return message
    tail = key.split(".", 1)[1] if "." in key else key
    return f"{section}.{tail}: {rule}"


def build(cls: type, section: str, values: Any) -> Any:
    """A settings dataclass from one TOML table: unknown and missing keys, the class's own rules, types."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: must be a table, got {values!r:.80}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{section}.{f.name}: required, missing")
    try:
        built = cls(**values)
    except ValueError as exc:  # the class's own rule, which knows the range too ("a positive number")
        raise ConfigError(_rooted(str(exc).replace("\n", " "), section)) from None
    except TypeError as exc:  # a value of the wrong type that the class's rules did not expect
        check_types(cls, section, values)
        raise ConfigError(f"{section}: {exc}") from None
    check_types(cls, section, values)  # a wrong type that the class's rules let through
    return built
