"""What a state dict must hold to load into a ``LayerwiseOptimizer``, checked before it loads.

torch's ``Optimizer.load_state_dict`` checks the number of param groups and of parameters in
each, then replaces ``state`` and ``param_groups`` whole: a state dict of another model or of
another optimizer loads, and fails (or steps wrongly) at the next step, with the optimizer's own
state already gone. ``check_loadable`` refuses such a state dict while nothing has changed,
naming what does not fit. ``LayerwiseOptimizer.load_state_dict`` runs it as the last load
pre-hook, so it sees the dict the caller's own hooks leave, as torch is about to load it.

What fits: the same groups (count, parameters per group, ``layout``), every hyperparameter the
rule keeps (or one that ``added_later`` fills in for older saves) with a value the rule accepts,
the step counters in pairs of counts, and per parameter either no state or all of the rule's
buffers, shaped like the parameter. Keys of the caller's own in a group (``initial_lr`` of an LR
scheduler, names) load as torch loads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .plan import COUNTERS

if TYPE_CHECKING:
    from .base import LayerwiseOptimizer

__all__ = ["check_loadable"]


def check_loadable(optimizer: LayerwiseOptimizer, state_dict: Any) -> None:
    """Raise ``ValueError`` naming the first thing in ``state_dict`` that does not fit
    ``optimizer``; change nothing."""
    owner = type(optimizer).__name__
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        got = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else state_dict
        raise _refused(
            owner, f"expected 'state' (a dict) and 'param_groups' (a list), got {_short(got)}"
        )
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise _refused(
            owner, f"it holds {_count_of(len(groups), 'param group')}, this optimizer {len(live)}"
        )
    # Saved parameter id -> (group index, position in the group, the parameter it loads into):
    # torch pairs them in order, group by group.
    target: dict[Any, tuple[int, int, Tensor]] = {}
    for index, (saved, group) in enumerate(zip(groups, live, strict=True)):
        _check_group(optimizer, index, saved, group)
        for position, (pid, param) in enumerate(zip(saved["params"], group["params"], strict=True)):
            if pid in target:
                raise _refused(
                    owner,
                    f"parameter id {pid!r} is listed twice (param group {target[pid][0]} and "
                    f"param group {index}); each id names one parameter",
                )
            target[pid] = (index, position, param)

    stepped: set[int] = set()
    for pid, entry in state.items():
        if pid not in target:
            raise _refused(owner, f"'state' holds parameter id {pid!r}, which no param group lists")
        index, position, param = target[pid]
        where = f"the state of params[{position}] of param group {index} (id {pid!r})"
        if _check_entry(optimizer, where, entry, param):
            stepped.add(index)
    for index in sorted(stepped):
        if "step" not in groups[index]:  # phi(t) and LAMB's bias corrections would restart
            raise _refused(
                owner,
                f"param group {index} has state but no step counters ('step', "
                "'skipped_steps'): they count the steps its state was built over",
            )


def _check_group(
    optimizer: LayerwiseOptimizer, index: int, saved: Any, group: dict[str, Any]
) -> None:
    owner, where = type(optimizer).__name__, f"param group {index}"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
        raise _refused(owner, f"{where} is {_short(saved)}; expected a dict with a 'params' list")
    n_saved, n_live = len(saved["params"]), len(group["params"])
    if n_saved != n_live:
        raise _refused(
            owner, f"{where} holds {_count_of(n_saved, 'parameter')}, this optimizer's {n_live}"
        )
    later = optimizer.added_later
    # The hyperparameters of the group it replaces (torch adds "differentiable" to the defaults
    # of a loaded optimizer, not to its groups).
    hyper = [name for name in optimizer.defaults if name in group]
    missing = [name for name in hyper if name not in saved and name not in later]
    if missing:
        others = [
            k for k in saved if k not in optimizer.defaults and k not in ("params", *COUNTERS)
        ]
        hint = f" (it holds {_names(others)}: saved by another optimizer?)" if others else ""
        raise _refused(
            owner, f"{where} lacks {_names(missing)}, which every {owner} group holds{hint}"
        )
    if saved.get("layout") != group.get("layout"):
        raise _refused(
            owner,
            f"{where} was saved with layout={saved.get('layout')!r}, this optimizer's has "
            f"layout={group.get('layout')!r}: its state was laid out for another engine",
        )
    _check_counters(owner, where, saved)
    try:
        optimizer._check_saved_group({**later, **saved})
    except ValueError as error:
        raise _refused(owner, f"{where}: {str(error).removeprefix(f'{owner}: ')}") from error


def _check_entry(optimizer: LayerwiseOptimizer, where: str, entry: Any, param: Tensor) -> bool:
    """Check one parameter's state; whether it holds the rule's buffers (it has stepped)."""
    owner, buffers = type(optimizer).__name__, optimizer.state_buffers
    if not isinstance(entry, Mapping):
        raise _refused(owner, f"{where} is {_short(entry)}; expected a dict")
    unknown = [k for k in entry if k not in buffers and k not in COUNTERS]
    if unknown:
        raise _refused(
            owner,
            f"{where} holds {_names(unknown)}; {owner} keeps {_names(buffers)} (saved by "
            "another optimizer?)",
        )
    held = [name for name in buffers if name in entry]
    if held and len(held) < len(buffers):
        absent = [name for name in buffers if name not in entry]
        raise _refused(owner, f"{where} holds {_names(held)} but not {_names(absent)}")
    for name in held:
        _check_buffer(owner, f"{where}[{name!r}]", entry[name], param)
    _check_counters(owner, where, entry)  # kept with a tensor's state by ZeRO-3 sub-groups
    return bool(held)


def _check_buffer(owner: str, where: str, value: Any, param: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise _refused(
            owner, f"{where} is {_short(value)}; expected a tensor shaped like its parameter"
        )
    if value.shape != param.shape:
        raise _refused(
            owner,
            f"{where} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)} (a state "
            "dict of another model, or of another sharding?)",
        )
    # torch casts a floating state to its parameter's dtype (a float32 checkpoint loads into
    # bfloat16 parameters); what it cannot cast without losing values is another kind.
    kind = "complex" if param.is_complex() else "floating"
    if value.is_complex() != param.is_complex() or not (
        value.is_floating_point() or value.is_complex()
    ):
        raise _refused(
            owner,
            f"{where} is {value.dtype}; expected a {kind} tensor, as its parameter ({param.dtype})",
        )
    if isinstance(param, DTensor) and (
        not isinstance(value, DTensor) or value.placements != param.placements
    ):
        got = value.placements if isinstance(value, DTensor) else "a plain tensor"
        raise _refused(owner, f"{where} is placed as {got}, its parameter as {param.placements}")


def _check_counters(owner: str, where: str, holder: Mapping) -> None:
    """Both step counters or neither, each a count: a number or a one-element real tensor,
    finite and >= 0 (``plan.ensure_counters`` makes it a tensor at the next step)."""
    present = [name for name in COUNTERS if name in holder]
    if present and len(present) < len(COUNTERS):
        absent = [name for name in COUNTERS if name not in holder]
        raise _refused(owner, f"{where} holds {_names(present)} but not {_names(absent)}")
    for name in present:
        value = holder[name]
        if isinstance(value, Tensor):
            real = value.dtype != torch.bool and not value.dtype.is_complex
            ok = value.numel() == 1 and real and _is_count(value.item())
        else:
            ok = isinstance(value, Real) and not isinstance(value, bool) and _is_count(value)
        if not ok:
            raise _refused(
                owner,
                f"{where}[{name!r}] is {_short(value)}; expected a step count (a number or a "
                "one-element tensor, finite and >= 0)",
            )


def _is_count(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _refused(owner: str, message: str) -> ValueError:
    return ValueError(f"{owner}: cannot load the state dict: {message}")


def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _names(keys: Any) -> str:
    return ", ".join(repr(k) for k in keys)


def _short(value: Any) -> str:
    """``value`` for a message: a tensor by its shape and dtype (its values if a few), anything
    else by a short repr."""
    if isinstance(value, Tensor) and (value.numel() > 4 or value.is_meta):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
