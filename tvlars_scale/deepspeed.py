"""DeepSpeed integration: ``"optimizer": {"type": "TVLARS"}`` in a DeepSpeed JSON, exact norms
under every ZeRO stage, and checks for the JSON itself.

How the pieces fit:

- ``import tvlars_scale`` puts ``TVLARS``, ``LARS`` and ``LayerwiseLAMB`` (plus aliases) on
  ``torch.optim``, where DeepSpeed looks up a JSON optimizer type it does not know
  (``registry``). The JSON ``"params"`` are passed to the constructor as keyword arguments.
  DeepSpeed keeps any spelling of "lamb" for its own FusedLamb, hence ``"LayerwiseLAMB"``.
- Under ZeRO the optimizer holds DeepSpeed's flat fp32 partitions, not the parameters. The layout
  adapter (``layouts.deepspeed_zero``) maps them back to layers using the ZeRO wrapper's
  bookkeeping. It finds the wrapper by itself (DeepSpeed is the caller of ``step()``);
  ``bind(engine)`` records it explicitly.
- ``check_config`` validates a config's TVLARS/LARS/LayerwiseLAMB section before DeepSpeed sees
  it; ``load_config`` reads a JSON (e.g. from ``ds_configs/``) and fills its ``"auto"`` values
  for use without accelerate.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .layouts.deepspeed_zero import bind_wrapper
from .optimizers import LARS, TVLARS, LayerwiseOptimizer
from .registry import TORCH_OPTIM_NAMES

__all__ = ["JSON_TYPES", "bind", "check_config", "load_config", "optimizer_kwargs"]

#: JSON ``"type"`` values that DeepSpeed resolves to our optimizers (case-sensitive).
JSON_TYPES: dict[str, type[LayerwiseOptimizer]] = {
    name: cls for name, cls in TORCH_OPTIM_NAMES.items() if name.lower() != "lamb"
}

# DeepSpeed lower-cases these names and builds its own optimizers (runtime/config.py; the
# 1-bit ones up to 0.19.0).
_RESERVED = (
    *("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon"),
    *("onebitadam", "onebitlamb", "zerooneadam"),
)

_AUTO_HINT = (
    "accelerate fills optimizer.params.lr and weight_decay from accelerate.utils.DummyOptim; "
    "with deepspeed.initialize, use tvlars_scale.deepspeed.load_config(path, {key}=...)"
)


def bind(engine: Any) -> None:
    """Tell ``tvlars_scale`` which DeepSpeed wrapper steps the engine's optimizer.

    Not needed when training goes through ``engine.step()`` (the layouts find the wrapper by
    themselves); use it when the basic optimizer is stepped some other way. Call once after
    ``deepspeed.initialize`` (and after ``accelerator.prepare``).
    """
    basic = getattr(engine, "basic_optimizer", None)
    if not isinstance(basic, LayerwiseOptimizer):
        raise TypeError(
            "tvlars_scale.deepspeed.bind(engine): the engine's optimizer is "
            f"{type(basic).__name__}, not a tvlars_scale optimizer. Set "
            '"optimizer": {"type": "TVLARS"} (or "LARS", "LayerwiseLAMB") in the DeepSpeed config, '
            "or pass a tvlars_scale optimizer to deepspeed.initialize."
        )
    wrapper = engine.optimizer if engine.optimizer is not basic else None
    bind_wrapper(basic, wrapper, engine)


def optimizer_kwargs(type_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keyword arguments for a JSON ``"optimizer"`` section, validated.

    Raises ``ValueError`` naming the offending key: unknown keys (with the allowed ones),
    ``max_grad_norm`` (DeepSpeed rejects it: use the top-level ``gradient_clipping``), values
    still ``"auto"``, missing required keys, and any value the constructor refuses.
    """
    cls = JSON_TYPES.get(type_name)
    if cls is None:
        raise ValueError(
            f"DeepSpeed config: optimizer.type={type_name!r} is not a tvlars_scale optimizer; "
            f"expected one of {', '.join(JSON_TYPES)}"
        )
    signature = inspect.signature(cls.__init__)
    accepted = [n for n in signature.parameters if n not in ("self", "params")]
    if "max_grad_norm" in params:
        raise ValueError(
            f"DeepSpeed config: optimizer.params.max_grad_norm is not supported (DeepSpeed rejects "
            'it); use the top-level "gradient_clipping" instead, and note that it changes '
            f"{type_name}'s trust ratios (0 disables it)"
        )
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"DeepSpeed config: unknown key optimizer.params.{key}{hint} for {type_name}; "
                f"expected keys: {', '.join(accepted)}"
            )
    for key, value in params.items():
        if isinstance(value, str) and value == "auto":
            raise ValueError(
                f"DeepSpeed config: optimizer.params.{key} is still 'auto'; "
                + _AUTO_HINT.format(key=key)
            )
    required = [n for n in accepted if signature.parameters[n].default is inspect.Parameter.empty]
    for key in required:
        if key not in params:
            raise ValueError(
                f"DeepSpeed config: optimizer.params.{key} is required for {type_name}"
            )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    # The constructor's own checks name the field ("TVLARS: invalid lr=nan; expected ...").
    cls([torch.zeros(1, requires_grad=True)], **kwargs)
    return kwargs


def check_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Validate a DeepSpeed config (a dict or a JSON path) that uses one of our optimizers.

    Checks the optimizer section (``optimizer_kwargs``), that ZeRO stages > 0 allow an
    "untested" optimizer, and warns when ``gradient_clipping`` is missing (DeepSpeed's default
    is 1.0) or positive with TVLARS/LARS, which changes trust ratios. Configs for other
    optimizers pass through unchanged. Returns the config as a dict.
    """
    config = _read(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    section = config.get("optimizer")
    if not section:
        return config
    type_name = section.get("type")
    if not isinstance(type_name, str):
        raise ValueError(f"DeepSpeed config: invalid optimizer.type={type_name!r}")
    if type_name.lower() in _RESERVED:
        if type_name.lower() == "lamb":
            warnings.warn(
                f"DeepSpeed maps optimizer.type={type_name!r} to its own FusedLamb, whose trust "
                "ratios are per ZeRO partition, not per layer. For tvlars_scale's LAMB write "
                '"type": "LayerwiseLAMB".',
                UserWarning,
                stacklevel=2,
            )
        return config
    if type_name not in JSON_TYPES:
        spelled = next((n for n in JSON_TYPES if n.lower() == type_name.lower()), None)
        if spelled is None:
            return config  # some other torch.optim optimizer: not ours to check
        raise ValueError(
            f"DeepSpeed config: optimizer.type={type_name!r}; DeepSpeed looks names up "
            f"case-sensitively, write {spelled!r}"
        )
    optimizer_kwargs(type_name, section.get("params", {}))

    zero = config.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) > 0 and not config.get("zero_allow_untested_optimizer", False):
        raise ValueError(
            f"DeepSpeed config: ZeRO stage {zero['stage']} with {type_name} needs "
            '"zero_allow_untested_optimizer": true (DeepSpeed asserts it for optimizers outside '
            "its tested list)"
        )
    clipping = config.get("gradient_clipping")
    if clipping is None:
        warnings.warn(
            'DeepSpeed config: "gradient_clipping" is not set, and DeepSpeed\'s default is 1.0: '
            f"the gradients are rescaled before {type_name} and its trust ratios change. "
            'Set "gradient_clipping": 0 (or the clipping you want).',
            UserWarning,
            stacklevel=2,
        )
    elif not isinstance(clipping, (int, float)) or isinstance(clipping, bool) or clipping < 0:
        raise ValueError(
            f"DeepSpeed config: invalid gradient_clipping={clipping!r}; expected a number >= 0"
        )
    elif clipping > 0 and issubclass(JSON_TYPES[type_name], (TVLARS, LARS)):
        warnings.warn(
            f"DeepSpeed config: gradient_clipping={clipping} rescales the gradients before "
            f"{type_name}; with weight decay that changes every trust ratio "
            "eta*||w||/||g + wd*w||. Use 0 unless you mean it.",
            UserWarning,
            stacklevel=2,
        )
    return config


def load_config(path: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """Read a DeepSpeed JSON, replace its ``"auto"`` entries by ``values`` (by key name, e.g.
    ``lr=0.1, train_micro_batch_size_per_gpu=64``) and ``check_config`` it.

    accelerate fills ``"auto"`` itself; this is for plain ``deepspeed.initialize``. A value that
    matches no ``"auto"`` entry, or an ``"auto"`` entry left without a value, is an error.
    """
    config = _read(path)
    unused = set(values)

    def fill(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                fill(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value == "auto":
                if key not in values:
                    raise ValueError(
                        f"DeepSpeed config {os.fspath(path)}: {prefix}{key} is 'auto'; pass "
                        f"load_config(..., {key}=...)"
                    )
                node[key] = values[key]
                unused.discard(key)

    fill(config, "")
    if unused:
        raise ValueError(
            f"DeepSpeed config {os.fspath(path)}: no 'auto' entry for {', '.join(sorted(unused))}"
        )
    return check_config(config)


def _read(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
