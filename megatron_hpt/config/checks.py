"""Field checks for config dataclasses' ``__post_init__``: each raises ``ValueError``
naming the field and its value ("lr must be a finite number, got nan").

Each config calls them explicitly for its own fields, so a config reads as the
list of its rules. ``finite_floats`` is the one generic rule: no float field of a
config may be NaN or infinite (JSON and YAML let both through, and a NaN passes
every ``<`` and ``>`` comparison), except the fields a config names as allowed to
be infinite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def _values(obj: Any, names: tuple[str, ...]):
    for name in names:
        yield name, getattr(obj, name)


def finite_floats(obj: Any, *, allow_inf: tuple[str, ...] = ()) -> None:
    """Every float in ``obj``'s fields (also inside tuples) is finite; ``allow_inf`` fields may be +-inf."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in _flatten(items):
            if isinstance(item, float) and not math.isfinite(item):
                if math.isinf(item) and field.name in allow_inf:
                    continue
                raise ValueError(f"{field.name} must be a finite number, got {value!r}")


def _flatten(items):
    for item in items:
        if isinstance(item, tuple):
            yield from _flatten(item)
        else:
            yield item


def positive(obj: Any, *names: str) -> None:
    """Each named field is > 0 (None is allowed: optional fields check their value when set)."""
    for name, value in _values(obj, names):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def non_negative(obj: Any, *names: str) -> None:
    """Each named field is >= 0 (or None)."""
    for name, value in _values(obj, names):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def at_least(obj: Any, minimum: int | float, *names: str) -> None:
    """Each named field is >= ``minimum`` (or None)."""
    for name, value in _values(obj, names):
        if value is not None and not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def within(obj: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """The field lies in the interval (brackets as given); None is allowed."""
    value = getattr(obj, name)
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def not_empty(obj: Any, *names: str) -> None:
    """Each named string field is non-empty and not just spaces (None is allowed)."""
    for name, value in _values(obj, names):
        if value is not None and not str(value).strip():
            raise ValueError(f"{name} must not be empty, got {value!r}")
