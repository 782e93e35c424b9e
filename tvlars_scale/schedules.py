"""Learning-rate schedules for the baselines, TVLARS' factor over a run, and the square-root
scaling rule.

Each baseline factory returns a function ``step -> factor`` for
``torch.optim.lr_scheduler.LambdaLR`` (the factor multiplies the group's initial LR). TVLARS
needs no scheduler: its factor phi(t) (``tvlars_scale.tvlars_factor``) lives inside the
optimizer.

- ``TVLARSSchedule``: phi(t) described over a run (total steps, the delay as a fraction of
  it, the factor reached at the end), mapped onto the paper's per-step ``lmbda`` and
  ``delay_steps``; the same description gives the same phi at every batch size.
- ``warmup_cosine``: linear warm-up from 0, then cosine to ``final_factor`` (WA-LARS).
- ``polynomial_decay``: (1 - t/T)^power down to ``final_factor`` (NOWA-LARS, MLPerf style),
  with an optional warm-up.
- ``sqrt_scaled_lr``: lr = base_lr * sqrt(batch / base_batch) (Krizhevsky 2014).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

from torch import Tensor

from .functional import tvlars_factor
from .validation import check_real

__all__ = [
    "TVLARSSchedule",
    "polynomial_decay",
    "sqrt_scaled_lr",
    "tvlars_factor",
    "warmup_cosine",
]

#: What ``TVLARSSchedule`` (and ``TVLARS(total_steps=...)``) assume when not told: the paper's
#: delay of 10 of 100 epochs, and phi ending at 1/20 of the value it has at the start (alpha=1).
DEFAULT_DELAY_FRACTION = 0.1
DEFAULT_FINAL_FACTOR = 0.05


@dataclass(frozen=True)
class TVLARSSchedule:
    r"""TVLARS' factor phi(t) described over a run of ``total_steps`` optimizer steps.

    The paper's factor (Eq. 8, ``tvlars_factor``) counts optimizer steps::

        phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min

    so a given ``lmbda`` decays 32x faster per epoch at batch 512 than at 16K. This describes
    the same curve by where it sits in the run, and maps it back (no new rule)::

        delay_steps = delay_fraction * total_steps
        lmbda       = ln(1 / (final_factor - gamma_min) - alpha) / (total_steps - delay_steps)

    Then phi(delay_steps) = 1/(alpha + 1) + gamma_min, phi(total_steps) = ``final_factor``, and
    phi at a fraction f of the run, ``lmbda * (f*T - delay_steps)``, depends on f alone: the
    same at every batch size. Past ``total_steps`` phi keeps decaying towards ``gamma_min``.
    It is a pure function of the step, which ``TVLARS`` keeps in its ``state_dict``.

    ``TVLARS(params, total_steps=..., delay_fraction=..., final_factor=...)`` builds this from
    the optimizer's ``alpha`` and ``gamma_min`` (also from a DeepSpeed JSON's params).

    Args:
        total_steps: optimizer steps of the run (epochs x steps per epoch), an integer in
            [1, 2**24] (the float32 step counter counts exactly up to 2**24).
        delay_fraction: where the decay is centred, as a fraction of the run in [0, 1)
            (the paper's delay d_e in epochs, divided by the epochs). Default 0.1.
        final_factor: phi at ``total_steps``, in (gamma_min, gamma_min + 1/(alpha + 1)): above
            phi's floor and below its value at the delay. Default 0.05.
        alpha, gamma_min: as for ``TVLARS`` (alpha >= 0, gamma_min >= 0).

    Raises:
        ValueError: naming the argument, its value and what is allowed; also when
            ``final_factor`` lies within rounding of either end of its interval (the decay
            would round to none or to an infinite one), and when phi(0) overflows float32
            (``alpha = 0`` with a long delay).

    Example::

        >>> s = TVLARSSchedule(total_steps=1000, delay_fraction=0.1, final_factor=0.05)
        >>> s.delay_steps, round(s.lmbda, 6), round(s(1000), 6)
        (100.0, 0.003272, 0.05)
    """

    total_steps: int
    delay_fraction: float = DEFAULT_DELAY_FRACTION
    final_factor: float = DEFAULT_FINAL_FACTOR
    alpha: float = 1.0
    gamma_min: float = 0.0

    def __post_init__(self) -> None:
        check_schedule("TVLARSSchedule", **self.__dict__)
        # Python numbers from here on (numpy scalars would reach a state_dict and fail
        # ``torch.load(weights_only=True)``; float32 ones would round lmbda).
        object.__setattr__(self, "total_steps", int(self.total_steps))
        for name in ("delay_fraction", "final_factor", "alpha", "gamma_min"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def delay_steps(self) -> float:
        """The decay's centre in optimizer steps (``TVLARS``' ``delay_steps``)."""
        return self.delay_fraction * self.total_steps

    @property
    def lmbda(self) -> float:
        """The decay coefficient per optimizer step (``TVLARS``' ``lmbda``)."""
        return _lmbda(**self.__dict__)

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """phi(step), ``step`` counting optimizer steps already taken (a number or a tensor)."""
        return tvlars_factor(step, self.lmbda, self.delay_steps, self.alpha, self.gamma_min)


def check_schedule(
    owner: str,
    total_steps: int,
    delay_fraction: float,
    final_factor: float,
    alpha: float,
    gamma_min: float,
) -> None:
    """Raise ``ValueError`` (prefixed ``owner:``) unless the arguments describe a decay."""
    if (
        not isinstance(total_steps, Integral)
        or isinstance(total_steps, bool)
        or not 1 <= total_steps <= MAX_TOTAL_STEPS
    ):
        raise ValueError(
            f"{owner}: invalid total_steps={total_steps!r}; expected an integer in [1, 2**24] "
            "(the optimizer steps of the run; the step counter is a float32 tensor, as in "
            "torch's optimizers, and counts exactly up to 2**24)"
        )
    check_real(owner, "delay_fraction", delay_fraction, low=0.0, high=1.0, high_open=True)
    check_real(owner, "alpha", alpha, low=0.0)
    check_real(owner, "gamma_min", gamma_min, low=0.0)
    top = gamma_min + 1.0 / (alpha + 1.0)
    allowed = (
        f"expected a number in ({gamma_min:g}, {top:g}): above gamma_min={gamma_min:g} (phi's "
        f"floor) and below 1/(alpha + 1) + gamma_min = {top:g} (phi at the delay, with "
        f"alpha={alpha:g})"
    )
    real = isinstance(final_factor, Real) and not isinstance(final_factor, bool)
    if not (real and gamma_min < final_factor < top):
        raise ValueError(f"{owner}: invalid final_factor={final_factor!r}; {allowed}")
    # So close to either end that the decay rounds to no decay, or to an infinite one.
    lmbda = _lmbda(total_steps, delay_fraction, final_factor, alpha, gamma_min)
    if not (math.isfinite(lmbda) and lmbda > 0.0):
        raise ValueError(
            f"{owner}: invalid final_factor={final_factor!r}; it gives the decay coefficient "
            f"lmbda={lmbda!r} in float64, which must be finite and > 0: {allowed}, not within "
            "rounding of either end"
        )

    check_start(owner, lmbda, delay_fraction * total_steps, alpha)


def check_start(owner: str, lmbda: float, delay_steps: float, alpha: float) -> None:
    """Raise ``ValueError`` unless phi(0), phi's largest value, fits the float32 the step
    computes it in (with alpha = 0 nothing bounds it: phi(0) = exp(lmbda * delay_steps))."""
    exponent = -lmbda * delay_steps
    denominator = alpha + (math.exp(exponent) if exponent < 80.0 else math.inf)
    if denominator < FLOAT32_TINY:
        raise ValueError(
            f"{owner}: invalid alpha={alpha!r} with lmbda={lmbda!r} and delay_steps="
            f"{delay_steps!r}: phi(0) = 1/(alpha + exp(-lmbda * delay_steps)) + gamma_min = "
            f"1/{denominator:.3g} overflows float32; expected alpha > 0 (phi <= 1/alpha + "
            "gamma_min) or a shorter delay"
        )


#: The smallest normal float32: 1 / FLOAT32_TINY is finite in float32.
FLOAT32_TINY = 2.0**-126
#: The longest run ``check_schedule`` accepts: a float32 step counter stops counting there.
MAX_TOTAL_STEPS = 2**24


def _lmbda(
    total_steps: int, delay_fraction: float, final_factor: float, alpha: float, gamma_min: float
) -> float:
    """phi reaches ``final_factor`` at ``total_steps`` (the mapping in ``TVLARSSchedule``)."""
    ratio = 1.0 / (float(final_factor) - float(gamma_min)) - float(alpha)
    decay_steps = int(total_steps) - float(delay_fraction) * int(total_steps)
    return math.log(ratio) / decay_steps if ratio > 0.0 else math.nan


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
