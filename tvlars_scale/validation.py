"""Checks for user-facing numbers and choices, with messages that name the field.

Shared by the optimizers' constructors, the DeepSpeed JSON mapping and the recipes, so that bad
input fails at construction time and reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any

from torch import Tensor

__all__ = ["check_choice", "check_flag", "check_lr", "check_real"]


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


def check_lr(owner: str, value: Any) -> None:
    """A learning rate: a finite number >= 0, or a one-element floating tensor holding one.

    A tensor lr is what compiled training loops and LR schedulers on a tensor lr use
    (``torch.optim.SGD`` accepts the same). Its value is read once, here, at construction.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{owner}: invalid lr=tensor of shape {tuple(value.shape)} and dtype "
                f"{value.dtype}; expected a number or a one-element floating tensor"
            )
        check_real(owner, "lr", value.item(), low=0.0)
        return
    check_real(owner, "lr", value, low=0.0)


def check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected True or False")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected one of {allowed}")
