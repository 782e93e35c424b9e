"""Learning-rate schedules for the baselines, and the square-root scaling rule.

Each factory returns a function ``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``
(the factor multiplies the group's initial LR). TVLARS itself needs no scheduler: its factor
phi(t) is ``tvlars_scale.tvlars_factor`` and lives inside the optimizer.

- ``warmup_cosine``: linear warm-up from 0, then cosine to ``final_factor`` (WA-LARS).
- ``polynomial_decay``: (1 - t/T)^power down to ``final_factor`` (NOWA-LARS, MLPerf style),
  with an optional warm-up.
- ``sqrt_scaled_lr``: lr = base_lr * sqrt(batch / base_batch) (Krizhevsky 2014).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .functional import tvlars_factor
from .validation import check_real

__all__ = ["polynomial_decay", "sqrt_scaled_lr", "tvlars_factor", "warmup_cosine"]


def _check_steps(owner: str, warmup_steps: int, total_steps: int) -> None:
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}: invalid {name}={value!r}; expected an integer >= 0")
    if total_steps < 1:
        raise ValueError(f"{owner}: invalid total_steps={total_steps!r}; expected an integer >= 1")
    if warmup_steps > total_steps:
        raise ValueError(
            f"{owner}: warmup_steps={warmup_steps} exceeds total_steps={total_steps}; "
            "expected warmup_steps <= total_steps"
        )


def warmup_cosine(
    warmup_steps: int, total_steps: int, final_factor: float = 0.0
) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then cosine annealing to ``final_factor``."""
    _check_steps("warmup_cosine", warmup_steps, total_steps)
    check_real("warmup_cosine", "final_factor", final_factor, low=0.0, high=1.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def polynomial_decay(
    total_steps: int, power: float = 2.0, final_factor: float = 0.0, warmup_steps: int = 0
) -> Callable[[int], float]:
    """(1 - t/T)^power decay to ``final_factor`` after an optional linear warm-up."""
    _check_steps("polynomial_decay", warmup_steps, total_steps)
    check_real("polynomial_decay", "power", power, low=0.0, low_open=True)
    check_real("polynomial_decay", "final_factor", final_factor, low=0.0, high=1.0)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        remaining = max(0.0, 1.0 - (step - warmup_steps) / span)
        return final_factor + (1.0 - final_factor) * remaining**power

    return factor


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The square-root scaling rule: base_lr * sqrt(batch_size / base_batch_size)."""
    check_real("sqrt_scaled_lr", "base_lr", base_lr, low=0.0)
    check_real("sqrt_scaled_lr", "batch_size", batch_size, low=0.0, low_open=True)
    check_real("sqrt_scaled_lr", "base_batch_size", base_batch_size, low=0.0, low_open=True)
    return base_lr * math.sqrt(batch_size / base_batch_size)
