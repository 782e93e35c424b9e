"""The opt-in fused step (``fused=True``): the functional math, compiled with ``torch.compile``.

Eagerly, every foreach operation of a step is one pass over parameter-sized tensors, so the step
costs what its passes cost (the step is memory-bound). The fused step compiles the two halves of
the step separately, per param group, with inductor (C++/OpenMP on CPU, Triton on CUDA):

- the local pass (``functional.lars_piece_sums``, ``functional.lamb_local``): partial sums of
  squares per piece, reading w and g (LAMB: and its moments) once;
- the update pass (``functional.lars_update_``, ``functional.lamb_update_``): scales from the
  reduced norms, then one read of g, w and the state and one write of the state and w.

Between them the optimizer core runs the sharded-norm reduction eagerly, exactly as on the eager
path (``reduction.reduce_layer_sums``: one all-reduce per process group). The compiled functions
are the eager ones, so there is one copy of the math.

Compiled graphs are reused, never rebuilt per step: every scalar that changes during training is a
tensor (the step counter and phi already are; the learning rate is passed as a 0-d tensor that is
refilled each step), shapes are static, and each param group compiles into its own dynamo cache
(one graph per pass and per set of local shapes). If compilation fails (no C++ compiler, an
inductor error, a recompile limit), the optimizer warns once and runs the eager step from then on.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedStep"]


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc  # imported on failure only

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


def _own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object.

    Dynamo keeps compiled graphs, and counts its recompile limit, per code object. Without a copy
    every param group of every optimizer in the process would share one cache of the same
    function, and a few groups of different shapes would exhaust it.
    """
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the cause
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"[:200]


class FusedStep:
    """Compiled versions of the step functions of one optimizer, per param group."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Set after a failed compilation: every later call runs the eager function.
        self.disabled = False
        self._compiled: dict[tuple[int, Callable], Callable] = {}
        self._lr: dict[int, Tensor] = {}

    def clear(self) -> None:
        """Forget compiled functions and scalars (param groups were replaced)."""
        self._compiled.clear()
        self._lr.clear()

    def kernel(self, fn: Callable, group: dict[str, Any]) -> Callable:
        """``fn`` compiled for ``group``: call it like ``fn``."""
        key = (id(group), fn)
        compiled = self._compiled.get(key)
        if compiled is None and not self.disabled:
            try:
                compiled = torch.compile(
                    _own_code(fn), backend="inductor", fullgraph=True, dynamic=False
                )
            except RuntimeError as exc:  # e.g. dynamo does not support this Python
                self._give_up(exc)
            else:
                self._compiled[key] = compiled
        if compiled is None or self.disabled:
            return fn

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:
                if not isinstance(exc, _compile_errors()):
                    raise
                # Raised while tracing or compiling, before the graph ran: nothing was mutated,
                # so the eager function can take the step.
                self._give_up(exc)
                return fn(*args, **kwargs)

        return run

    def lr(self, group: dict[str, Any], device: torch.device) -> Tensor:
        """The group's learning rate as a 0-d tensor: a schedule changes it every step, and dynamo
        may specialise a Python float (``specialize_float``) and recompile for each value.
        Refilled in place, which needs no host-to-device copy."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return lr.to(device=device, dtype=torch.float32)
        buffer = self._lr.get(id(group))
        if buffer is None or buffer.device != device:
            buffer = self._lr[id(group)] = torch.zeros((), dtype=torch.float32, device=device)
        return buffer.fill_(lr)

    def _give_up(self, exc: BaseException) -> None:
        if not self.disabled:
            self.disabled = True
            warnings.warn(
                f"{self.owner}(fused=True): torch.compile failed ({_reason(exc)}); "
                "using the eager step.",
                RuntimeWarning,
                stacklevel=4,
            )
