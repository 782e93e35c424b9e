"""Fault injection for the reliability tests: a dying machine, and a batch that blows up.

- ``TVLARS_FAULT_KILL="RANK:STEP"`` makes process ``RANK`` SIGKILL itself right after optimizer
  step ``STEP`` (after that step's checkpoint, if it has one), on the first attempt of a
  torchrun elastic job only (``TORCHELASTIC_RESTART_COUNT`` is 0 or unset), so the restarted
  attempt runs through.
- ``TVLARS_FAULT_NAN="RANK:STEP"`` makes the loss of process ``RANK`` NaN in optimizer step
  ``STEP`` (1-based, as in metrics.jsonl), so its gradients are NaN before the engine reduces
  them, as with a bad batch on one rank: every rank must skip that step (``skipped_steps``).

Unset (the normal case) each costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

from torch import Tensor

__all__ = ["after_step", "poisoned"]


def _matches(variable: str, step: int, rank: int) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    fault_rank, fault_step = (int(x) for x in spec.split(":"))
    return (rank, step) == (fault_rank, fault_step)


def after_step(step: int, rank: int) -> None:
    """Called after optimizer step ``step`` (1-based)."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and _matches("TVLARS_FAULT_KILL", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(loss: Tensor, step: int, rank: int) -> Tensor:
    """The loss of a micro-batch of optimizer step ``step`` (1-based), NaN if asked."""
    return loss * float("nan") if _matches("TVLARS_FAULT_NAN", step, rank) else loss
