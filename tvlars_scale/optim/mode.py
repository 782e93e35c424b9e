"""How one step runs, decided once per step and handed to one-mode kernels.

Three questions, answered before any math runs (as ``torch.optim.SGD`` picks its single-tensor,
foreach or fused function once):

- **Where the decision is read.** On the host (``on_host``: free on a CPU, which has no queue to
  drain): a skipped step does nothing at all and an applied one runs unmasked kernels
  (``tvlars_scale.functional``). On the device (accelerators): the decision stays a tensor and
  the update is masked (``tvlars_scale.functional.masked``), with no host sync, so that the step
  can be captured in a CUDA graph. ``decide_on_host`` (a constructor keyword) forces either.
- **Fused or eager.** ``fused=True`` runs the passes that pay for it compiled
  (``tvlars_scale.fused``), unless compilation failed once (then eager, with a warning).
- **Inside a caller's compile.** In a step the caller compiles (``torch.compile(opt.step)``) the
  caller's graph holds the math: nothing compiles its own graphs, and kernels that a graph
  cannot hold (torch's fused optimizer kernels writing buffers the graph creates) are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fused import FusedStep

__all__ = ["StepMode", "resolve_mode"]


@dataclass(frozen=True)
class StepMode:
    """The mode of one ``step()`` call."""

    #: Read the decision (and per-layer scales) on the host; else keep them on the device.
    on_host: bool
    #: Compiled passes (``fused=True``), or None for the eager functions.
    fused: FusedStep | None
    #: Inside a step the caller compiles.
    compiling: bool


def resolve_mode(
    decide_on_host: bool | None, fused: FusedStep | None, device: torch.device
) -> StepMode:
    """The mode of a step whose first group lives on ``device``. ``decide_on_host`` None reads
    the decision on the host only for CPU tensors."""
    compiling = torch.compiler.is_compiling()
    on_host = device.type == "cpu" if decide_on_host is None else decide_on_host
    usable = fused is not None and not fused.disabled and not compiling
    return StepMode(on_host=on_host, fused=fused if usable else None, compiling=compiling)
