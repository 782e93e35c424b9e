"""How one step runs, decided once per step and handed to one-mode kernels.

Three questions, answered before any math runs (as ``torch.optim.SGD`` picks its single-tensor,
foreach or fused function once):

- **Where the decision is read.** On the host (``on_host``: free on a CPU, which has no queue to
  drain): a skipped step does nothing at all and an applied one runs unmasked kernels. On the
  device (accelerators): the decision stays a tensor and the update is masked, with no host
  sync, so that the step can be captured in a CUDA graph. ``decide_on_host`` (a constructor
  keyword) forces either.
- **Fused or eager.** ``fused=True`` runs the passes that pay for it compiled
  (``tvlars_scale.fused``), unless compilation failed once (then eager, with a warning).
- **Inside a caller's compile.** In a step the caller compiles (``torch.compile(opt.step)``, or
  a whole train step) the caller's graph holds the math: the decision stays a tensor whatever
  ``decide_on_host`` says (a host read would break the caller's graph, and the graph fuses the
  masking into its passes), nothing compiles its own graphs, and kernels that a graph cannot
  hold (torch's fused optimizer kernels writing buffers the graph creates) are not used.

Per param group, the mode then says which kernels run (``kernels``): the multi-tensor kernels
of ``functional.masked`` wherever torch's fused optimizer kernels can take the pieces, else the
passes of ``functional`` (the host path's per-piece passes, or masked foreach passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..functional import masked as M
from ..fused import FusedStep
from .plan import Pieces, Plan

__all__ = ["Decision", "StepMode", "resolve_mode"]


@dataclass
class Decision:
    """Apply, skip (a non-finite gradient) or no-op (every gradient zero), for the whole model."""

    apply: Tensor  # 0-d bool
    nonfinite: Tensor  # 0-d bool: the step is skipped and counted in skipped_steps
    #: ``apply`` read on the host (a bool), or kept on the device (the tensor itself).
    taken: bool | Tensor
    #: On the device: ``apply``, which masks the update. None on the host, where a step that
    #: does not apply is not run.
    mask: Tensor | None
    #: On the device: 0-d fp32, 1.0 where the step does not apply (the fused kernels'
    #: ``found_inf``). None on the host, where a step that does not apply is not run.
    skip: Tensor | None


@dataclass(frozen=True)
class StepMode:
    """The mode of one ``step()`` call."""

    #: Read the decision (and per-layer scales) on the host; else keep them on the device.
    on_host: bool
    #: Compiled passes (``fused=True``), or None for the eager functions.
    fused: FusedStep | None
    #: Inside a step the caller compiles.
    compiling: bool

    def decide(self, grad_sq: Tensor, plan: Plan) -> Decision:
        """The decision on the model's sum of ||g||² (>= 0, inf or NaN)."""
        finite = grad_sq < float("inf")  # isfinite takes four kernels; NaN < inf is False
        apply = finite & (grad_sq > 0)
        if self.on_host:
            return Decision(apply, ~finite, bool(apply), None, None)
        return Decision(apply, ~finite, apply, apply, torch.where(apply, plan.zero, plan.one))

    def kernels(self, plan: Plan, pieces: Pieces) -> bool:
        """Whether a group runs the multi-tensor kernels (``functional.masked``): outside a
        caller's compile (whose graph cannot hold torch's fused kernels writing buffers it
        creates), on a device with torch's fused optimizer kernels, every piece laid out like
        its weight, one dtype (as torch's fused kernels take them), and the decision kept on the
        device or the pieces many and small (on the host, whose per-piece passes read large
        pieces fewer times)."""
        if self.compiling or not pieces.weights or (self.on_host and not plan.many_small_pieces):
            return False
        if plan.kernel_ready is None:  # what it depends on is in the plan's key: once
            weights = pieces.weights
            plan.kernel_ready = len({(w.dtype, w.device) for w in weights}) == 1 and all(
                map(F.kernel_ready, weights, pieces.grads, *pieces.state.values())
            )
        return plan.kernel_ready

    def scale_pieces_(self, pieces: list[Tensor], scales: Tensor) -> None:
        """``pieces[i] *= scales[i]``: one compiled graph under ``fused=True``, else one foreach
        call (a kernel per piece on CUDA: ``functional.masked.scale_pieces_``)."""
        if self.fused is not None:
            self.fused.scale_(pieces, scales)
        else:
            M.scale_pieces_(pieces, scales)

    def lr(self, group: dict[str, Any], device: torch.device) -> float | Tensor:
        """The learning rate as the step functions take it: a number or the group's tensor on
        ``device`` (eager); a 0-d tensor refilled each step (fused, so that a schedule does not
        recompile the graphs)."""
        if self.fused is not None:
            return self.fused.scalar(group, "lr", device)
        lr = group["lr"]  # torch's fused kernels read a tensor LR as fp32
        return lr.to(device, torch.float32) if isinstance(lr, Tensor) else lr


def resolve_mode(
    decide_on_host: bool | None, fused: FusedStep | None, device: torch.device
) -> StepMode:
    """The mode of a step whose first group lives on ``device``. ``decide_on_host`` None reads
    the decision on the host only for CPU tensors, and never inside a caller's compile."""
    compiling = torch.compiler.is_compiling()
    host = device.type == "cpu" if decide_on_host is None else decide_on_host
    on_host = host and not compiling
    usable = fused is not None and not fused.disabled and not compiling
    return StepMode(on_host=on_host, fused=fused if usable else None, compiling=compiling)
