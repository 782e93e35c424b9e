"""torchtitan: TVLARS, LARS or LAMB named in a torchtitan job's optimizer config.

torchtitan (>= 0.3) builds the optimizer from ``Trainer.Config.optimizer``, an
``OptimizersContainer.Config`` whose ``ParamGroupConfig`` entries name an optimizer from a closed
set (Adam, AdamW, DistMuon). ``LayerwiseOptimizersContainer`` is the container for ours: its
``Config`` has the same fields, with ``optimizer_name`` one of ``"TVLARS"``, ``"LARS"``,
``"LAMB"`` and that optimizer's arguments in ``optimizer_kwargs``. ``layerwise_config`` writes the
usual one-group config. In a torchtitan config registry::

    from torchtitan.components.optimizer import ParamGroupConfig
    from tvlars_scale.torchtitan import LayerwiseOptimizersContainer, layerwise_config

    config.optimizer = layerwise_config("TVLARS", lr=4.0, total_steps=config.training.steps)
    # or per group, first matching pattern wins (as in torchtitan):
    config.optimizer = LayerwiseOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r"tok_embeddings\\.", optimizer_name="TVLARS",
                             optimizer_kwargs={"lr": 4.0, "weight_decay": 0.0}),
            ParamGroupConfig(pattern=r".*", optimizer_name="TVLARS",
                             optimizer_kwargs={"lr": 4.0, "weight_decay": 5e-4}),
        ],
    )

The trainer then calls ``config.optimizer.build(model_parts=...)`` as for its own optimizers.
Where this container differs from torchtitan's:

- **One optimizer per rank**, over every model part the rank holds (its pipeline stages,
  virtual stages included), with a param group per part and pattern. Each training step is then
  one ``step()`` per rank, and every stage takes the same apply / skip / no-op decision
  (docs/design.md, section 5); one optimizer per part would pair a rank's first stage with
  another rank's first stage. The state dict is torchtitan's flat one, keyed by parameter name
  (``state.<fqn>.momentum_buffer``, ``param_groups.<fqn>.lr``), as with one optimizer per part.
- **One optimizer name per config**: the groups name the same optimizer, so that one decision
  covers every layer (a NaN in a layer another optimizer steps would not skip this one's step).
- ``implementation``: ``"fused"`` (torchtitan's default) builds ours with ``fused=True`` (the
  step compiled, docs/fused.md); ``"foreach"`` and ``"for-loop"`` the eager step, which has one
  implementation (multi-tensor, torch's fused SGD/Adam kernels). A group's own ``fused`` or
  ``foreach`` in ``optimizer_kwargs`` is honoured when every group resolves to the same
  ``fused``. ``"fused_opt_states_bf16"`` (bfloat16 Adam moments) is refused: our state keeps its
  parameter's dtype.
- ``optimizer_factory_kwargs_by_name[name]`` may give the run options ``decide_on_host`` and
  ``model_group`` (default: every rank of the job, the one model torchtitan trains).

Anything else is refused when the config is made, naming the field, its value and what is
allowed. torchtitan's checkpoint creates optimizer state by a step with zero gradients and
``lr = 0``; here a step whose gradients are all exactly zero is a no-op (no weight decay, no
counter), so it changes nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .optim import LAMB, LARS, TVLARS, LayerwiseOptimizer
from .validation import check_choice, check_flag

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
except ImportError as exc:  # absent, or before 0.3 (no ParamGroupConfig)
    raise ImportError(
        "tvlars_scale.torchtitan needs torchtitan >= 0.3 (Python >= 3.11): "
        'pip install -e ".[torchtitan]"'
    ) from exc

__all__ = ["IMPLEMENTATIONS", "OPTIMIZERS", "LayerwiseOptimizersContainer", "layerwise_config"]

OWNER = "LayerwiseOptimizersContainer"
#: The names a ``ParamGroupConfig.optimizer_name`` may take here.
OPTIMIZERS: dict[str, type[LayerwiseOptimizer]] = {"TVLARS": TVLARS, "LARS": LARS, "LAMB": LAMB}
#: torchtitan's ``implementation`` -> our ``fused`` (compile the step).
IMPLEMENTATIONS = {"fused": True, "foreach": False, "for-loop": False}
#: Options of the run, not of a param group (``optimizer_factory_kwargs_by_name``).
RUN_OPTIONS = ("decide_on_host", "model_group")
#: torchtitan's per-group overrides of ``implementation``.
IMPL_KEYS = ("fused", "foreach")


class LayerwiseOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` for TVLARS, LARS and LAMB: one optimizer over all of
    this rank's model parts (the module docstring says why and what else differs).

    Args:
        config: the ``Config``: torchtitan's fields, with ``optimizer_name`` one of ``"TVLARS"``,
            ``"LARS"``, ``"LAMB"``, the same in every param group.
        model_parts: the model parts this rank trains (torchtitan's ``model_parts``).

    Raises:
        ValueError: an unknown or mixed optimizer name, an argument the optimizer does not take
            (naming it, its value and the allowed ones), an ``implementation`` that does not map,
            groups that disagree on ``fused``, or no param groups.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """torchtitan's optimizer config, checked when made for what this container takes."""

        def __post_init__(self) -> None:
            if self.param_groups:  # else set later (refused at build if still empty)
                _resolve(self)

    optimizers: list[LayerwiseOptimizer]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        cls, fused = _resolve(config)  # again: a config's fields may be set after it is made
        groups = []
        for part in model_parts:  # torchtitan's matching: first pattern wins, names kept
            by_name, _ = self._build_param_groups(part, config.param_groups, {})
            groups += by_name[cls.__name__]
        for group in groups:  # a group's own flags, resolved into ``fused`` above
            for key in IMPL_KEYS:
                group.pop(key, None)
        run_options = config.optimizer_factory_kwargs_by_name.get(cls.__name__, {})
        self.optimizers = [cls(groups, fused=fused, **run_options)]
        self.model_parts = model_parts
        params = [p for group in groups for p in group["params"]]
        self._validate_params(params)
        self._post_init(params)


def layerwise_config(
    name: str = "TVLARS", *, implementation: str = "fused", **optimizer_kwargs: Any
) -> LayerwiseOptimizersContainer.Config:
    """A config with one param group over every parameter, as torchtitan's ``default_adamw``.

    Args:
        name: ``"TVLARS"``, ``"LARS"`` or ``"LAMB"``.
        implementation: torchtitan's ``"fused"`` (``fused=True``: the step compiled),
            ``"foreach"`` or ``"for-loop"`` (the eager step).
        optimizer_kwargs: the optimizer's arguments (``lr``, ``weight_decay``, ...).

    Example::

        config.optimizer = layerwise_config("LAMB", lr=2e-3, weight_decay=0.01)
    """
    group = ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs=optimizer_kwargs)
    return LayerwiseOptimizersContainer.Config(param_groups=[group], implementation=implementation)


def _resolve(config: OptimizersContainer.Config) -> tuple[type[LayerwiseOptimizer], bool]:
    """The optimizer class and its ``fused`` for ``config``; ``ValueError`` for anything else."""
    if not config.param_groups:
        raise ValueError(
            f"{OWNER}: param_groups is empty; expected at least one ParamGroupConfig naming "
            f"one of {', '.join(map(repr, OPTIMIZERS))} (layerwise_config(name, lr=...) makes "
            "a catch-all one)"
        )
    first = config.param_groups[0]
    for where, group in _described(config):
        check_choice(f"{OWNER}: {where}", "optimizer_name", group.optimizer_name, OPTIMIZERS)
        if group.optimizer_name != first.optimizer_name:
            raise ValueError(
                f"{OWNER}: {where} names optimizer_name={group.optimizer_name!r}, "
                f"param_groups[0] {first.optimizer_name!r}; expected one optimizer for every "
                "group, so that one skip decision covers every layer (per-group settings go "
                "in optimizer_kwargs)"
            )
    cls = OPTIMIZERS[first.optimizer_name]
    _check_run_options(config.optimizer_factory_kwargs_by_name, cls.__name__)
    if config.implementation not in IMPLEMENTATIONS:
        why = " (bfloat16 Adam moments; our state keeps its parameter's dtype)"
        raise ValueError(
            f"{OWNER}: invalid implementation={config.implementation!r}"
            f"{why if config.implementation == 'fused_opt_states_bf16' else ''}; expected one "
            f"of {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    choices = {}
    for where, group in _described(config):
        _check_arguments(cls, where, group.optimizer_kwargs)
        choices[where] = _fused(where, config.implementation, group.optimizer_kwargs)
    if len(set(choices.values())) > 1:
        raise ValueError(
            f"{OWNER}: the groups resolve to different fused values "
            f"({', '.join(f'{w}: fused={f}' for w, f in choices.items())}); expected one: "
            f"{cls.__name__} is compiled (fused=True) or not as a whole, so set implementation "
            "(or a group's fused/foreach) alike for every group"
        )
    return cls, next(iter(choices.values()))


def _described(config: OptimizersContainer.Config) -> list[tuple[str, ParamGroupConfig]]:
    return [
        (f"param_groups[{i}] (pattern {group.pattern!r})", group)
        for i, group in enumerate(config.param_groups)
    ]


def _check_arguments(cls: type[LayerwiseOptimizer], where: str, kwargs: dict[str, Any]) -> None:
    """Refuse an argument ``cls`` does not take per group (torch's optimizers keep unknown group
    keys silently: a misspelt ``weight_decay`` would train without decay), then the values, as
    the optimizer checks them."""
    run = ("params", "fused", *RUN_OPTIONS)
    allowed = [n for n in inspect.signature(cls).parameters if n not in run] + list(IMPL_KEYS)
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(
                f"{OWNER}: {where}: invalid optimizer_kwargs key {key!r} (value {value!r}); "
                f"{cls.__name__} takes {', '.join(allowed)}"
                + (" (run options go in optimizer_factory_kwargs_by_name)" if key in run else "")
            )
    for key in IMPL_KEYS:
        if key in kwargs:
            check_flag(f"{OWNER}: {where}", key, kwargs[key])
    arguments = {k: v for k, v in kwargs.items() if k not in IMPL_KEYS}
    try:  # the optimizer's own checks, on a stand-in parameter
        cls([torch.zeros(1, requires_grad=True)], **arguments)
    except ValueError as exc:
        raise ValueError(f"{OWNER}: {where}: {exc}") from None


def _fused(where: str, implementation: str, kwargs: dict[str, Any]) -> bool:
    """Our ``fused`` for one group: torchtitan's ``implementation``, or the group's own flags."""
    fused = kwargs.get("fused", implementation == "fused")
    foreach = kwargs.get("foreach", implementation == "foreach")
    if fused and foreach:
        raise ValueError(
            f"{OWNER}: {where} resolves to fused=True and foreach=True; expected at most one "
            "(as torch's optimizers)"
        )
    return fused


def _check_run_options(by_name: dict[str, dict[str, Any]], name: str) -> None:
    for key, options in by_name.items():
        if key != name:
            raise ValueError(
                f"{OWNER}: invalid optimizer_factory_kwargs_by_name key {key!r}; expected "
                f"{name!r}, the optimizer the param groups name"
            )
        for option, value in options.items():
            if option not in RUN_OPTIONS:
                raise ValueError(
                    f"{OWNER}: invalid optimizer_factory_kwargs_by_name[{key!r}] key {option!r} "
                    f"(value {value!r}); expected {' or '.join(RUN_OPTIONS)} (implementation "
                    "sets fused; hyperparameters go in a ParamGroupConfig's optimizer_kwargs)"
                )
        if options.get("decide_on_host") is not None:
            check_flag(OWNER, "decide_on_host", options["decide_on_host"])
