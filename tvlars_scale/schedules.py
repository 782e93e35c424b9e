"""Learning-rate schedules for the baselines, TVLARS' factor over a run, and the square-root
scaling rule.

Each baseline factory returns a function ``step -> factor`` for
``torch.optim.lr_scheduler.LambdaLR`` (the factor multiplies the group's initial LR). TVLARS
needs no scheduler: its factor phi(t) (``tvlars_scale.tvlars_factor``) lives inside the
optimizer.

- ``TVLARSPhi``: TVLARS' decay as a param group describes it, per step or over the run,
  resolved and validated; the optimizer and the recipes read its defaults and bounds.
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
from dataclasses import InitVar, dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

from torch import Tensor

from .functional import tvlars_factor
from .validation import check_real

__all__ = [
    "TVLARSPhi",
    "TVLARSSchedule",
    "polynomial_decay",
    "sqrt_scaled_lr",
    "tvlars_factor",
    "warmup_cosine",
]

#: What ``TVLARSSchedule`` (and ``TVLARSPhi``, ``TVLARS(total_steps=...)``) assume when not told: the paper's
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

    ``TVLARSPhi`` (and so ``TVLARS(params, total_steps=..., delay_fraction=...,
    final_factor=...)``, also from a DeepSpeed JSON's params) builds this with its ``alpha`` and
    ``gamma_min``.

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


@dataclass(frozen=True, kw_only=True)
class TVLARSPhi:
    r"""TVLARS' decay phi(t), as one param group of ``TVLARS`` describes it: resolved and checked.

    ::

        phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min

    (``tvlars_factor``, the one formula), with ``alpha`` and ``gamma_min`` and the decay given
    one of two ways:

    - **per step** (the paper's): ``lmbda`` and ``delay_steps`` count optimizer steps (defaults
      ``DEFAULT_LMBDA`` = 1e-3 and 0). ``total_steps``, ``delay_fraction`` and ``final_factor``
      stay None.
    - **over the run** (``total_steps`` set, ``over_run``): ``total_steps``, ``delay_fraction``
      and ``final_factor`` (defaults 0.1 and 0.05), mapped onto ``lmbda`` and ``delay_steps`` by
      ``TVLARSSchedule``. Values given for those two as well must agree with the derived ones
      (up to rounding).

    Building one resolves the description: missing values take their defaults, ``lmbda`` and
    ``delay_steps`` are always set (derived over the run), and the numbers are stored as Python
    numbers (numpy ones would fail ``torch.load(weights_only=True)`` of a state_dict). A
    description over the run replaced with ``dataclasses.replace`` must pass ``lmbda=None,
    delay_steps=None`` so that they are derived again.

    ``TVLARS`` resolves each param group's description with ``from_group`` and writes it back
    into the group with ``store`` (the step reads ``lmbda``, ``delay_steps``, ``alpha`` and
    ``gamma_min`` there); the recipes take their defaults and bounds from here.

    Args (keyword only):
        lmbda, delay_steps: the description per step: the decay coefficient per optimizer step
            (>= 0) and the decay's centre in optimizer steps (may be negative).
        total_steps, delay_fraction, final_factor: the description over the run, as for
            ``TVLARSSchedule``; ``delay_fraction`` and ``final_factor`` need ``total_steps``.
        alpha: >= 0; phi(-inf) = 1/alpha + gamma_min. Default 1.
        gamma_min: phi's floor, >= 0. Default 0.
        owner: the name that starts error messages (``"TVLARS"`` for the optimizer's groups).
        preset: TVLARS' ``preset`` (None by default). A preset fixes ``delay_steps``, so it
            refuses a description over the run.

    Raises:
        ValueError: ``"{owner}: ..."``, naming the argument, its value and what is allowed; also
            for ``delay_fraction``/``final_factor`` without ``total_steps``, for ``lmbda``/
            ``delay_steps`` that contradict ``total_steps`` (beyond rounding), for ``preset``
            with ``total_steps``, and for a phi(0) that overflows float32 (``alpha = 0`` with a
            long delay).

    Example::

        >>> phi = TVLARSPhi(total_steps=1000)
        >>> phi.over_run, phi.delay_steps, round(phi.lmbda, 6), round(phi(1000), 6)
        (True, 100.0, 0.003272, 0.05)
        >>> per_step = TVLARSPhi(lmbda=0.01)
        >>> per_step.over_run, per_step.delay_steps, per_step(0)
        (False, 0, 0.5)
    """

    #: The description per step, and the one over the run: the param group keys of each.
    PER_STEP = ("lmbda", "delay_steps")
    OVER_RUN = ("total_steps", "delay_fraction", "final_factor")
    #: Every param group key of the description.
    FIELDS = (*OVER_RUN, "alpha", "gamma_min", *PER_STEP)
    DEFAULT_LMBDA = 1e-3
    DEFAULT_DELAY_STEPS = 0
    DEFAULT_DELAY_FRACTION = DEFAULT_DELAY_FRACTION
    DEFAULT_FINAL_FACTOR = DEFAULT_FINAL_FACTOR
    DEFAULT_ALPHA = 1.0
    DEFAULT_GAMMA_MIN = 0.0
    #: ``validation.check_real``'s bounds of the numbers that depend on no other; those of
    #: ``total_steps`` and ``final_factor`` are in ``check_schedule`` (``final_factor_range``).
    BOUNDS: ClassVar[dict[str, dict[str, Any]]] = {
        "lmbda": dict(low=0.0),
        "delay_steps": {},
        "delay_fraction": dict(low=0.0, high=1.0, high_open=True),
        "alpha": dict(low=0.0),
        "gamma_min": dict(low=0.0),
    }

    lmbda: float | None = None
    delay_steps: float | None = None
    total_steps: int | None = None
    delay_fraction: float | None = None
    final_factor: float | None = None
    alpha: float = DEFAULT_ALPHA
    gamma_min: float = DEFAULT_GAMMA_MIN
    owner: InitVar[str] = "TVLARSPhi"
    preset: InitVar[str | None] = None

    def __post_init__(self, owner: str, preset: str | None) -> None:
        given = {name: getattr(self, name) for name in self.FIELDS}
        for name, value in _resolve_phi(owner, preset, **given).items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @classmethod
    def resolve(cls, owner: str, /, *, preset: str | None = None, **description: Any) -> TVLARSPhi:
        """The description given as keywords (the fields), resolved, with errors prefixed
        ``owner:``: ``TVLARSPhi.resolve("TVLARS", total_steps=1000)``."""
        return cls(**description, owner=owner, preset=preset)

    @staticmethod
    def described_by(group: dict[str, Any]) -> dict[str, Any]:
        """The description a ``TVLARS`` param group holds now, as it holds it (an edit made in
        ``param_groups`` since its last step not resolved yet)."""
        return {name: group[name] for name in TVLARSPhi.FIELDS}

    @classmethod
    def from_group(
        cls, group: dict[str, Any], owner: str = "TVLARS", *, derive: tuple[str, ...] = ()
    ) -> TVLARSPhi:
        """The description a ``TVLARS`` param group holds (with its ``preset``), resolved. The
        fields named in ``derive`` are taken as not given: derived again, not checked."""
        description = cls.described_by(group)
        description.update(dict.fromkeys(derive))
        return cls(**description, owner=owner, preset=group.get("preset"))

    @classmethod
    def in_use(cls, group: dict[str, Any]) -> TVLARSPhi:
        """The decay a ``TVLARS`` param group's steps use, described per step: its stored
        ``lmbda``, ``delay_steps``, ``alpha`` and ``gamma_min``, as its last step (or
        construction) resolved them. An edit of ``param_groups`` shows from the next step on."""
        names = (*cls.PER_STEP, "alpha", "gamma_min")
        return cls(**{name: group[name] for name in names}, owner="TVLARS")

    def store(self, group: dict[str, Any]) -> None:
        """Write the resolved description into a ``TVLARS`` param group (every key of
        ``FIELDS``)."""
        for name in self.FIELDS:
            group[name] = getattr(self, name)

    @property
    def over_run(self) -> bool:
        """Whether the decay is described over the run (``total_steps`` set)."""
        return self.total_steps is not None

    @staticmethod
    def final_factor_range(alpha: float, gamma_min: float) -> tuple[float, float]:
        """The open interval ``final_factor`` must lie in: above phi's floor ``gamma_min`` and
        below phi at the delay, 1/(alpha + 1) + gamma_min."""
        return gamma_min, gamma_min + 1.0 / (alpha + 1.0)

    def __call__(self, step: float | Tensor) -> float | Tensor:
        """phi(step), ``step`` counting optimizer steps already taken (a number or a tensor,
        then on its device with no host sync)."""
        return tvlars_factor(step, self.lmbda, self.delay_steps, self.alpha, self.gamma_min)


def _resolve_phi(
    owner: str,
    preset: str | None,
    *,
    lmbda: Any,
    delay_steps: Any,
    total_steps: Any,
    delay_fraction: Any,
    final_factor: Any,
    alpha: Any,
    gamma_min: Any,
) -> dict[str, Any]:
    """``TVLARSPhi``'s fields from a description given either way, refusing a mixture that
    disagrees (see ``TVLARSPhi``)."""
    bounds = TVLARSPhi.BOUNDS
    check_real(owner, "alpha", alpha, **bounds["alpha"])
    check_real(owner, "gamma_min", gamma_min, **bounds["gamma_min"])
    if total_steps is None:
        for name, value in (("delay_fraction", delay_fraction), ("final_factor", final_factor)):
            if value is not None:
                raise ValueError(
                    f"{owner}: {name}={value!r} describes phi over a run and needs "
                    "total_steps (the run's optimizer steps); give total_steps too, or describe "
                    "the decay per step with lmbda and delay_steps"
                )
        if lmbda is None:
            lmbda = TVLARSPhi.DEFAULT_LMBDA
        if delay_steps is None:
            delay_steps = TVLARSPhi.DEFAULT_DELAY_STEPS
    else:
        if preset is not None:
            raise ValueError(
                f"{owner}: preset={preset!r} fixes delay_steps and takes the per-step lmbda; it "
                f"cannot be combined with total_steps={total_steps!r}. Drop the preset or "
                "total_steps."
            )
        described = dict(
            total_steps=total_steps,
            delay_fraction=DEFAULT_DELAY_FRACTION if delay_fraction is None else delay_fraction,
            final_factor=DEFAULT_FINAL_FACTOR if final_factor is None else final_factor,
        )
        check_schedule(owner, **described, alpha=alpha, gamma_min=gamma_min)
        schedule = TVLARSSchedule(**described, alpha=alpha, gamma_min=gamma_min)
        for name, given in (("lmbda", lmbda), ("delay_steps", delay_steps)):
            derived = getattr(schedule, name)
            # Agreement up to rounding: the caller may have computed the value in another order.
            if given is not None and not (
                isinstance(given, Real)
                and math.isclose(given, derived, rel_tol=1e-9, abs_tol=1e-12)
            ):
                over_run = ", ".join(f"{k}={v!r}" for k, v in described.items())
                raise ValueError(
                    f"{owner}: {name}={given!r} contradicts {over_run}, which give "
                    f"{name}={derived!r}. Describe the decay one way: lmbda and delay_steps (per "
                    "optimizer step) or total_steps, delay_fraction and final_factor (over the "
                    "run)."
                )
        # As Python numbers, derived from the run
        total_steps, delay_fraction, final_factor = (
            schedule.total_steps,
            schedule.delay_fraction,
            schedule.final_factor,
        )
        lmbda, delay_steps = schedule.lmbda, schedule.delay_steps
    check_real(owner, "lmbda", lmbda, **bounds["lmbda"])
    check_real(owner, "delay_steps", delay_steps, **bounds["delay_steps"])
    check_start(owner, lmbda, delay_steps, alpha)
    resolved = dict(
        lmbda=lmbda,
        delay_steps=delay_steps,
        total_steps=total_steps,
        delay_fraction=delay_fraction,
        final_factor=final_factor,
        alpha=alpha,
        gamma_min=gamma_min,
    )
    for name in ("alpha", "gamma_min", *TVLARSPhi.PER_STEP):
        # Python numbers: numpy ones would fail ``torch.load(weights_only=True)`` of a state_dict
        if type(resolved[name]) not in (int, float):
            resolved[name] = float(resolved[name])
    return resolved


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
    for name, value in (
        ("delay_fraction", delay_fraction),
        ("alpha", alpha),
        ("gamma_min", gamma_min),
    ):
        check_real(owner, name, value, **TVLARSPhi.BOUNDS[name])
    _, top = TVLARSPhi.final_factor_range(alpha, gamma_min)
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
    """Linear warm-up over ``warmup_steps``, then cosine annealing to ``final_factor``.

    Returns ``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``: (step + 1) /
    warmup_steps during the warm-up, then from 1 down to ``final_factor`` at ``total_steps``
    (and after). Raises ``ValueError`` unless the steps are integers with total_steps >= 1
    and 0 <= warmup_steps <= total_steps, and 0 <= final_factor <= 1.
    """
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
    """(1 - t/T)^power decay to ``final_factor`` after an optional linear warm-up.

    Returns ``step -> factor`` for ``LambdaLR``; t counts the steps after the warm-up and T
    is ``total_steps - warmup_steps``. Raises ``ValueError`` unless power > 0, 0 <=
    final_factor <= 1 and the steps are as for ``warmup_cosine``.
    """
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
    """The square-root scaling rule: base_lr * sqrt(batch_size / base_batch_size).

    E.g. the LR of batch 4096 from 2.0 at batch 512: ``sqrt_scaled_lr(2.0, 4096, 512)`` =
    5.66. Raises ``ValueError`` unless base_lr >= 0 and both batch sizes are > 0.
    """
    check_real("sqrt_scaled_lr", "base_lr", base_lr, low=0.0)
    check_real("sqrt_scaled_lr", "batch_size", batch_size, low=0.0, low_open=True)
    check_real("sqrt_scaled_lr", "base_batch_size", base_batch_size, low=0.0, low_open=True)
    return base_lr * math.sqrt(batch_size / base_batch_size)
