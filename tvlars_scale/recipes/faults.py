"""Fault injection for the reliability tests: kill a rank mid-run, as a dying machine would.

``TVLARS_FAULT_KILL="RANK:STEP"`` makes process ``RANK`` SIGKILL itself right after optimizer
step ``STEP`` (after that step's checkpoint, if it has one), on the first attempt of a torchrun
elastic job only (``TORCHELASTIC_RESTART_COUNT`` is 0 or unset), so the restarted attempt runs
through. Unset (the normal case) it costs one dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

__all__ = ["after_step"]

_ENV = "TVLARS_FAULT_KILL"


def after_step(step: int, rank: int) -> None:
    spec = os.environ.get(_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_rank, kill_step = (int(x) for x in spec.split(":"))
    if (rank, step) == (kill_rank, kill_step):
        os.kill(os.getpid(), signal.SIGKILL)
