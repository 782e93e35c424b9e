"""Checks for user-facing numbers and choices, with messages that name the field.

Shared by the optimizers' constructors, the DeepSpeed JSON mapping and the recipes, so that bad
input fails at construction time and reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any

__all__ = ["check_choice", "check_flag", "check_real"]


def check_real(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the given interval."""
    if value is None and allow_none:
        return
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    allowed = f"a finite number in {interval}" + (" or None" if allow_none else "")
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected {allowed}")


def check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected True or False")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected one of {allowed}")
