"""The optimizers the paper compares, their LR schedules, and DeepSpeed JSON optimizers.

``--optimizer`` names the paper's four runs:

============  ==========  ======================================================
name          core class  default schedule
============  ==========  ======================================================
tvlars        TVLARS      none: phi(t) inside the optimizer decays the LR
wa-lars       LARS        linear warm-up then cosine (``schedules.warmup_cosine``)
nowa-lars     LARS        polynomial decay (``schedules.polynomial_decay``)
lamb          LAMB        linear warm-up then cosine
============  ==========  ======================================================

TVLARS' decay is described over the run by default: ``--delay-epochs`` becomes a fraction of
``--epochs`` and ``--final-factor`` is phi at the last step (``schedules.TVLARSSchedule``), so
the default behaviour is the same at every global batch size. ``--lmbda`` selects the paper's
per-step description instead (the delay then becomes optimizer steps). The warm-up's epochs
become optimizer steps.

The LR schedule is applied by ``LRController``, which writes ``base_lr * factor(step)`` into the
param groups before each optimizer step: the LR is then a pure function of the step (a resume
needs nothing else), and it also reaches an optimizer that DeepSpeed built from its JSON (a
DeepSpeed ZeRO wrapper is not a ``torch.optim.Optimizer``, so ``LambdaLR`` cannot hold it, and
accelerate's scheduler wrapper would step once per process).

With a DeepSpeed config whose JSON has an ``"optimizer"`` section, DeepSpeed builds the optimizer
(``"type": "TVLARS"`` resolves through ``torch.optim``): ``deepspeed_json_optimizer`` checks the
type against ``--optimizer`` and fills its ``"auto"`` params, and the recipe hands accelerate a
``DummyOptim``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..optimizers import TVLARS, LayerwiseOptimizer
from ..registry import create_optimizer
from ..schedules import TVLARSPhi, polynomial_decay, warmup_cosine
from .config import LAMB_LR_RANGE, ConfigError, check_number, default_lr, option_value

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "LRController",
    "OptimizerConfig",
    "build_optimizer",
    "current_phi",
    "deepspeed_json_optimizer",
    "find_layerwise",
    "fixed_over_run",
    "lr_factor",
    "lr_warnings",
]

#: --optimizer -> (core class name, default schedule)
OPTIMIZERS: dict[str, tuple[str, str]] = {
    "tvlars": ("TVLARS", "none"),
    "wa-lars": ("LARS", "warmup-cosine"),
    "nowa-lars": ("LARS", "poly"),
    "lamb": ("LAMB", "warmup-cosine"),
}
SCHEDULES = ("auto", "none", "warmup-cosine", "poly")
#: Options whose None means "not given": the value the run then uses. Not given is told apart
#: from the default, so that an option the run would ignore can be refused (``_check_used``).
#: TVLARS' phi takes its defaults from ``schedules.TVLARSPhi``.
DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "eta": 1e-3,
    "trust_denominator": "combined",
    "alpha": TVLARSPhi.DEFAULT_ALPHA,
    "gamma_min": TVLARSPhi.DEFAULT_GAMMA_MIN,
    "warmup_epochs": 10.0,
    "poly_power": 2.0,
}
#: Options of some optimizers only -> (field, the core optimizers that read it): TVLARS' phi,
#: and the LARS family's momentum and trust ratio (LAMB has Adam moments instead).
_OPTIMIZER_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "--lmbda": ("lmbda", ("TVLARS",)),
    "--delay-epochs": ("delay_epochs", ("TVLARS",)),
    "--final-factor": ("final_factor", ("TVLARS",)),
    "--alpha": ("alpha", ("TVLARS",)),
    "--gamma-min": ("gamma_min", ("TVLARS",)),
    "--momentum": ("momentum", ("TVLARS", "LARS")),
    "--eta": ("eta", ("TVLARS", "LARS")),
    "--trust-denominator": ("trust_denominator", ("TVLARS", "LARS")),
}
#: Schedule options -> (field, the schedule that reads it).
_SCHEDULE_ONLY = {
    "--warmup-epochs": ("warmup_epochs", "warmup-cosine"),
    "--poly-power": ("poly_power", "poly"),
}
#: Numeric options -> (field, bounds for ``check_real``): checked when the config is built, before
#: the accelerator, the data or the model exist. TVLARS' phi: the bounds of ``TVLARSPhi``;
#: --final-factor's range depends on --alpha and --gamma-min (``OptimizerConfig``).
_BOUNDS: dict[str, tuple[str, dict[str, Any]]] = {
    "--lr": ("lr", dict(low=0.0)),
    "--weight-decay": ("weight_decay", dict(low=0.0)),
    "--momentum": ("momentum", dict(low=0.0, high=1.0, high_open=True)),
    "--eta": ("eta", dict(low=0.0, low_open=True)),
    "--lmbda": ("lmbda", TVLARSPhi.BOUNDS["lmbda"]),
    "--delay-epochs": ("delay_epochs", dict(low=0.0)),
    "--final-factor": ("final_factor", {}),
    "--alpha": ("alpha", TVLARSPhi.BOUNDS["alpha"]),
    "--gamma-min": ("gamma_min", TVLARSPhi.BOUNDS["gamma_min"]),
    "--warmup-epochs": ("warmup_epochs", dict(low=0.0)),
    "--poly-power": ("poly_power", dict(low=0.0, low_open=True)),
}
#: DeepSpeed JSON "type" -> core class name (our LAMB is "LayerwiseLAMB" in a JSON).
_JSON_TYPES = {"tvlars": "TVLARS", "lars": "LARS", "layerwiselamb": "LAMB"}


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "tvlars"
    lr: float = 2.0
    weight_decay: float = 5e-4
    momentum: float | None = None  # None: not given; DEFAULTS' value from __post_init__ on
    eta: float | None = None
    lmbda: float | None = None  # per step; None: the decay is described over the run
    delay_epochs: float | None = None  # None: TVLARSPhi.DEFAULT_DELAY_FRACTION of the run
    final_factor: float | None = None  # None: TVLARSPhi.DEFAULT_FINAL_FACTOR (over the run)
    alpha: float | None = None  # None: not given; DEFAULTS' value from __post_init__ on
    gamma_min: float | None = None
    schedule: str = "auto"
    warmup_epochs: float | None = None
    poly_power: float | None = None
    trust_denominator: str | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"invalid --optimizer={self.name!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"invalid --schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        for option, (name, bounds) in _BOUNDS.items():
            if getattr(self, name) is not None:  # None: not given, a default resolved below
                check_number(option, getattr(self, name), **bounds)
        self._check_used()
        for name, value in DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: set once, here
        if self.lmbda is not None and self.final_factor is not None:
            raise ConfigError(
                f"--lmbda={self.lmbda:g} (per optimizer step) and --final-factor="
                f"{self.final_factor:g} (over the run) both describe TVLARS' decay; give one"
            )
        low, top = TVLARSPhi.final_factor_range(self.alpha, self.gamma_min)
        over_run = self.core_name == "TVLARS" and self.lmbda is None
        if over_run and not low < self.resolved_final_factor < top:
            given = "" if self.final_factor is not None else " (the default)"
            raise ConfigError(
                f"invalid --final-factor={self.resolved_final_factor:g}{given}; expected a "
                f"number in ({low:g}, {top:g}): above --gamma-min and below TVLARS' "
                "factor at the delay, 1/(--alpha + 1) + --gamma-min"
            )

    def _check_used(self) -> None:
        """Refuse an option this optimizer and schedule would silently ignore."""
        for option, (name, cores) in _OPTIMIZER_ONLY.items():
            value = getattr(self, name)
            if value is not None and self.core_name not in cores:
                users = [n for n, (core, _) in OPTIMIZERS.items() if core in cores]
                raise ConfigError(
                    f"{option_value(option, value)} is used by --optimizer {'/'.join(users)} only; "
                    f"--optimizer={self.name} ignores it: drop it"
                )
        for option, (name, schedule) in _SCHEDULE_ONLY.items():
            if getattr(self, name) is not None and self.resolved_schedule != schedule:
                users = [n for n, (_, s) in OPTIMIZERS.items() if s == schedule]
                raise ConfigError(
                    f"{option_value(option, getattr(self, name))} is used by the {schedule} LR schedule "
                    f"only (--schedule {schedule}, the default of --optimizer "
                    f"{'/'.join(users)}); this run's schedule is {self.resolved_schedule} "
                    f"(--optimizer={self.name}, --schedule={self.schedule}): drop it"
                )

    @property
    def resolved_final_factor(self) -> float:
        return TVLARSPhi.DEFAULT_FINAL_FACTOR if self.final_factor is None else self.final_factor

    @property
    def core_name(self) -> str:
        return OPTIMIZERS[self.name][0]

    @property
    def resolved_schedule(self) -> str:
        return OPTIMIZERS[self.name][1] if self.schedule == "auto" else self.schedule

    def kwargs(self, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
        """Constructor arguments of the core optimizer, for a run of ``total_steps`` optimizer
        steps: TVLARS' decay over the run (``total_steps``, ``delay_fraction``,
        ``final_factor``), or per step with ``--lmbda`` (``lmbda``, ``delay_steps``)."""
        common = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.core_name == "LAMB":
            return common
        common.update(
            momentum=self.momentum, eta=self.eta, trust_denominator=self.trust_denominator
        )
        if self.core_name != "TVLARS":
            return common
        common.update(alpha=self.alpha, gamma_min=self.gamma_min)
        if self.lmbda is not None:
            delay = self.delay_epochs
            delay_steps = (
                TVLARSPhi.DEFAULT_DELAY_FRACTION * total_steps
                if delay is None
                else delay * steps_per_epoch
            )
            return common | dict(lmbda=self.lmbda, delay_steps=delay_steps)
        if self.delay_epochs is None:
            fraction = TVLARSPhi.DEFAULT_DELAY_FRACTION
        else:
            fraction = self.delay_epochs * steps_per_epoch / total_steps
        if fraction >= 1:
            raise ConfigError(
                f"--delay-epochs={self.delay_epochs:g} is not shorter than the run "
                f"({total_steps} steps = {total_steps / steps_per_epoch:g} epochs); TVLARS' "
                "decay must be centred inside it: lower --delay-epochs (or raise --epochs)"
            )
        return common | dict(
            total_steps=total_steps,
            delay_fraction=fraction,
            final_factor=self.resolved_final_factor,
        )


def lr_warnings(cfg: OptimizerConfig, global_batch: int) -> list[str]:
    """Warnings about an LR that runs but is unlikely to be meant: LAMB at the LARS family's
    scale (the paper ran LAMB at 1-19, which is why it collapses in the paper's Table 1)."""
    low, high = LAMB_LR_RANGE
    if cfg.core_name != "LAMB" or cfg.lr <= high:
        return []
    return [
        f"warning: --optimizer={cfg.name} with --lr={cfg.lr:g}: LAMB's LR is the relative change "
        "of each layer per step (its trust ratio has no eta), so LRs of the LARS family's scale "
        f"make it diverge; LAMB is usually run at {low:g} to {high:g} (without --lr this run "
        f"would use {default_lr(global_batch, cfg.name):g}, the LARS LR for "
        f"--global-batch-size={global_batch} x eta / (1 - momentum))"
    ]


def build_optimizer(
    cfg: OptimizerConfig,
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    steps_per_epoch: int,
    total_steps: int,
) -> LayerwiseOptimizer:
    """The core optimizer over named parameters (names show up in the per-layer telemetry)."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    kwargs = cfg.kwargs(steps_per_epoch, total_steps)
    try:
        return create_optimizer(cfg.core_name, params, **kwargs)
    except ValueError as exc:  # the optimizer's own check names the argument
        raise ConfigError(f"--optimizer={cfg.name}: {exc}") from None


def fixed_over_run(
    cfg: OptimizerConfig, steps_per_epoch: int, total_steps: int, epochs: float
) -> dict[str, Any]:
    """What fixes the optimizer and its LR schedule for a whole run, by the option that sets it:
    the values the run uses (defaults resolved; None for an option of TVLARS' decay that the
    run's description of it does not use). A checkpoint records it, and a resume refuses a
    change: the optimizer's param groups (TVLARS' total_steps, lmbda, ...) come from the
    checkpoint while the LR schedules are built anew from the command line."""
    fixed: dict[str, Any] = {
        "--optimizer": cfg.name,
        "--epochs": epochs,
        "--lr": cfg.lr,
        "--weight-decay": cfg.weight_decay,
        "--schedule": cfg.resolved_schedule,
    }
    if cfg.core_name != "LAMB":
        fixed.update(
            {
                "--momentum": cfg.momentum,
                "--eta": cfg.eta,
                "--trust-denominator": cfg.trust_denominator,
            }
        )
    if cfg.core_name == "TVLARS":
        delay = cfg.delay_epochs
        fixed.update(
            {
                "--alpha": cfg.alpha,
                "--gamma-min": cfg.gamma_min,
                "--lmbda": cfg.lmbda,
                "--final-factor": cfg.resolved_final_factor if cfg.lmbda is None else None,
                "--delay-epochs": (
                    TVLARSPhi.DEFAULT_DELAY_FRACTION * total_steps / steps_per_epoch
                    if delay is None
                    else delay
                ),
            }
        )
    for option, (name, schedule) in _SCHEDULE_ONLY.items():
        if cfg.resolved_schedule == schedule:
            fixed[option] = getattr(cfg, name)
    return fixed


def lr_factor(
    cfg: OptimizerConfig, steps_per_epoch: int, total_steps: int
) -> Callable[[int], float]:
    """``step -> factor`` multiplying the base LR."""
    schedule = cfg.resolved_schedule
    if schedule == "none":
        return lambda step: 1.0
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    try:
        if schedule == "warmup-cosine":
            return warmup_cosine(max(0, warmup), total_steps)
        return polynomial_decay(total_steps, power=cfg.poly_power)
    except ValueError as exc:
        raise ConfigError(f"--schedule={schedule}: {exc}") from None


class LRController:
    """Sets ``lr = initial_lr * factor(step)`` in every param group before a step."""

    def __init__(self, optimizer: Any, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        # Captured once, before a checkpoint is loaded (which restores the scheduled lr).
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def apply(self, step: int) -> float:
        factor = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]


def find_layerwise(optimizer: Any) -> LayerwiseOptimizer | None:
    """Our optimizer inside accelerate's / DeepSpeed's wrappers (None for e.g. SGD)."""
    for _ in range(6):
        if isinstance(optimizer, LayerwiseOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def current_phi(optimizer: LayerwiseOptimizer, group: int = 0) -> float | None:
    """TVLARS' factor phi(t) of param group ``group`` at the last step taken, phi(0) before the
    first (host float; None for other optimizers).

    Group 0 by default: the recipes build one group, and every group steps (or skips)
    together, so groups differ only if they were given different decay options; pass
    ``group`` to read another."""
    if not isinstance(optimizer, TVLARS):
        return None
    settings = optimizer.param_groups[group]
    taken = float(settings.get("step", 0))  # the counter exists from the first step on
    return float(TVLARSPhi.in_use(settings)(max(taken - 1, 0.0)))


_DECAY_KEYS = ("lmbda", "delay_steps", "total_steps", "delay_fraction", "final_factor")


def _json_decay(
    params: dict[str, Any], ours: dict[str, Any], total_steps: int, notes: list[str]
) -> None:
    """Settle which description of TVLARS' decay the JSON optimizer gets (see
    ``deepspeed_json_optimizer``); ``ours`` loses the command line's when the JSON's wins."""
    used = [k for k in _DECAY_KEYS if k in ours]
    theirs = {
        k: params[k] for k in _DECAY_KEYS if k not in ours and params.get(k, "auto") != "auto"
    }
    if theirs:
        for key in used:
            ours.pop(key)
        if params.get("total_steps") == "auto" and not {"lmbda", "delay_steps"} & set(theirs):
            params["total_steps"] = total_steps
        given = ", ".join(f"{k}={v!r}" for k, v in theirs.items())
        notes.append(
            f"DeepSpeed config describes TVLARS' decay with {given}; the command line's "
            f'{", ".join(used)} are not used (the JSON wins; drop those keys or write "auto" '
            "to take the command line)"
        )
    for key in _DECAY_KEYS:
        if key not in ours and params.get(key) == "auto":
            del params[key]


def deepspeed_json_optimizer(
    ds_config: dict[str, Any], cfg: OptimizerConfig, steps_per_epoch: int, total_steps: int
) -> list[str] | None:
    """Check and complete a DeepSpeed JSON ``"optimizer"``; None when the JSON has none.

    The JSON type must be the core class of ``--optimizer``; ``"auto"`` params the recipe
    knows (momentum, eta, total_steps, delay_fraction, final_factor, ...) are filled from the
    command line, and accelerate fills ``lr`` / ``weight_decay`` from the ``DummyOptim``.
    Explicit JSON values win; the returned notes name those that differ from the command line,
    and a ``gradient_clipping`` > 0.

    TVLARS' decay is described either per step (``lmbda``, ``delay_steps``) or over the run
    (``total_steps``, ``delay_fraction``, ``final_factor``). ``"auto"`` keys of the description
    the command line does not use are dropped; if the JSON gives explicit values for that
    other description, it wins as a whole (``"total_steps": "auto"`` is still filled).
    """
    section = ds_config.get("optimizer")
    if not section:
        return None
    json_type = str(section.get("type", ""))
    core = _JSON_TYPES.get(json_type.lower())
    if core is None:
        raise ConfigError(
            f"DeepSpeed config optimizer type={json_type!r}: this recipe runs TVLARS, LARS or "
            "LayerwiseLAMB; use one of those, or drop the JSON optimizer section"
        )
    if core != cfg.core_name:
        raise ConfigError(
            f"DeepSpeed config optimizer type={json_type!r} does not match "
            f"--optimizer={cfg.name} ({cfg.core_name}); make them agree"
        )
    params = section.setdefault("params", {})
    notes = []
    ours = cfg.kwargs(steps_per_epoch, total_steps)
    if core == "TVLARS":
        _json_decay(params, ours, total_steps, notes)
    for key, value in ours.items():
        if key in ("lr", "weight_decay"):
            params.setdefault(key, "auto")  # accelerate fills these from the DummyOptim
        elif key not in params or params[key] == "auto":
            params[key] = value
        if params[key] != "auto" and params[key] != value:
            notes.append(
                f"DeepSpeed config sets {key}={params[key]!r}; the command line gives {value!r} "
                '(the JSON wins; write "auto" there to take the command line)'
            )
    # The completed params, as the optimizer DeepSpeed builds will get them (lr / weight_decay
    # from the command line), checked now rather than inside deepspeed.initialize.
    from .. import deepspeed as tds

    spelled = next(n for n in tds.JSON_TYPES if n.lower() == json_type.lower())
    filled = {
        k: getattr(cfg, k) if k in ("lr", "weight_decay") and v == "auto" else v
        for k, v in params.items()
    }
    try:
        tds.optimizer_kwargs(spelled, filled)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # accelerate turns "auto" into 1.0, and clipping rescales the gradients the trust ratio
    # sees (its weight-decay term does not shrink with them): off unless the JSON asks.
    clipping = ds_config.setdefault("gradient_clipping", "auto")
    if clipping == "auto":
        ds_config["gradient_clipping"] = 0.0
    elif not isinstance(clipping, (int, float)) or isinstance(clipping, bool) or clipping < 0:
        raise ConfigError(
            f"DeepSpeed config: invalid gradient_clipping={clipping!r}; expected a number >= 0 "
            '(0 = off) or "auto"'
        )
    elif clipping > 0:
        notes.append(
            f"warning: DeepSpeed config sets gradient_clipping={clipping}: when the global "
            f"gradient norm exceeds {clipping}, every gradient is scaled down before "
            f"{cfg.core_name} sees it, while the weight-decay term wd*w is not, so the trust "
            "ratios eta*||w||/||g + wd*w|| of all layers shift (towards eta/wd) on those steps; "
            'set "gradient_clipping": 0 unless you mean it'
        )
    return notes
