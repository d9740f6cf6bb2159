"""Checks for detector Settings dataclasses; errors name the key and the bad value."""

from __future__ import annotations

import math
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(settings: Any, section: str, *names: str) -> None:
    """Each named setting is a finite number > 0."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or value <= 0:
            raise ValueError(f"{section}.{name}: must be a number > 0, got {value!r}")


def fraction(settings: Any, section: str, *names: str) -> None:
    """Each named setting is a number in (0, 1]."""
    for name in names:
        value = getattr(settings, name)
        if not _number(value) or not 0 < value <= 1:
            raise ValueError(f"{section}.{name}: must be a number in (0, 1], got {value!r}")


def whole(settings: Any, section: str, *names: str, minimum: int = 0) -> None:
    """Each named setting is an int >= ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{section}.{name}: must be an integer >= {minimum}, got {value!r}")


def flag(settings: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, bool):
            raise ValueError(f"{section}.{name}: must be true or false, got {value!r}")
