"""The step as accelerators run it: the decision stays on the device, and a step is a fixed
number of multi-tensor operations, however many tensors the model has.

The host path (``tvlars_scale.functional``) reads the decision and each layer's scale into
Python, which is free on a CPU; on an accelerator each read would drain the device's queue. Here
nothing is read: every changing number (the decision, phi, the counters, a tensor LR) is a
tensor, so the step can also be captured in a CUDA graph.

LARS and TVLARS, for one param group (``P`` local pieces, ``L`` layers)::

    D = g + wd*w (adapted pieces), g (excluded)      one _foreach_add, the only temporary
    ||w||, ||D||, ||g|| of every piece               one _foreach_norm
    per-layer sums [||w||², ||den||², sum ||g||²]    stack, square, index_add (2L + 1 floats)
    -- reduction over ranks, decision --
    per-layer scale s from the true norms            a few ops on (L,) vectors
    D *= s (per piece); m = mu*m + D; w -= lr*m      _foreach_mul_, torch's fused SGD kernel

``D`` is the gradient-sized temporary torch's own foreach SGD makes for weight decay; the
gradients themselves are never written (excluded pieces pair with a zero buffer, so ``D`` is a
copy there). A skipped step (a non-finite gradient) or a no-op (every gradient zero) is masked by
the fused kernel's ``found_inf``, which leaves weights and momentum bit-for-bit unchanged without
reading NaNs into them, so no gradient is copied to clean it.

LAMB decides first (its moments are updated in place), then: ``u = wd*w`` (zero for excluded
pieces) and torch's fused Adam kernel adds Adam's direction to ``u`` masked by ``found_inf``,
one ``_foreach_norm`` of w and u, the reduction, the per-layer ratio, ``u *= ratio`` and the
update through the fused SGD kernel (momentum 0, ``found_inf``).

One operation scales each piece by its own layer's device scalar (``scale_pieces_``): torch's
foreach kernels take their multi-tensor route only for lists of equal shapes, so on CUDA this one
runs a kernel per piece. ``fused=True`` compiles it into one graph call over all pieces.

Every function takes lists of local pieces of one dtype that are laid out alike
(``kernel_ready``); a group that is not (a gradient laid out unlike its weight, say) takes the
foreach passes of ``tvlars_scale.functional`` instead. Decided on the host, a group of many
small pieces runs these kernels too, unmasked (``skip`` None): per-piece passes would cost more
in Python and dispatch than in memory traffic there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import norms32

__all__ = [
    "lamb_directions_",
    "lars_directions",
    "norm_sums",
    "scale_pieces_",
    "step_update_",
]


def lars_directions(
    grads: list[Tensor], partners: list[Tensor], weight_decay: float, maximize: bool
) -> list[Tensor]:
    """``D = g + wd*partner`` per piece, new tensors in one multi-tensor pass. ``partners`` are
    the weights of adapted pieces and zeros for excluded ones. With ``maximize`` the result is
    ``g - wd*w``, which the update kernel negates (``-g + wd*w``, the maximising direction)."""
    return list(
        torch._foreach_add(grads, partners, alpha=-weight_decay if maximize else weight_decay)
    )


def norm_sums(tensors: list[Tensor], slots: Tensor, zeros: list[Tensor]) -> Tensor:
    """(len(zeros),) fp32: per entry, the sum of ||t||² over the ``tensors`` that ``slots``
    sends there.

    Norms accumulate in at least fp32 whatever the pieces' dtype (``norms32``); one
    multi-tensor kernel reads every tensor once. ``zeros`` are 0-d zeros on the device (views of a buffer that stays zero),
    stacked behind the norms so that the sums need no zero fill of their own.
    """
    norms = norms32(tensors)
    squares = torch.stack([*norms, *zeros]).square()
    return squares[len(norms) :].index_add_(0, slots, squares[: len(norms)])


def scale_pieces_(pieces: list[Tensor], scales: Tensor) -> None:
    """``pieces[i] *= scales[i]`` for a (pieces,) device vector. Eagerly one foreach call, which
    CUDA runs as a kernel per piece (a list of 0-d factors is not its fast route);
    ``fused=True`` runs it as one compiled graph (``tvlars_scale.fused``)."""
    torch._foreach_mul_(pieces, scales.unbind())


def step_update_(
    weights: list[Tensor],
    directions: list[Tensor],
    momenta: list[Tensor],
    skip: Tensor,
    *,
    lr: float | Tensor,
    momentum: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """``m = mu*m + D; w -= lr*m`` (Nesterov: ``w -= lr*(D + mu*m)``), or ``w -= lr*D`` with
    no momenta (the kernel takes none at momentum 0), by torch's fused SGD kernel; nothing
    changes where ``skip`` (0-d fp32, or None: the step applies) is 1. ``directions`` are read,
    never written."""
    torch._fused_sgd_(
        weights,
        directions,
        momenta,
        weight_decay=0.0,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=False,
        found_inf=skip,
    )


def lamb_directions_(
    weights: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    n_adapted: int,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: Tensor,
    skip: Tensor,
    maximize: bool,
) -> list[Tensor]:
    """Adam's moments, updated in place where ``skip`` is 0, and LAMB's direction
    ``u = m̂/(sqrt(v̂)+eps) + wd*w`` per piece (new tensors; no decay for excluded pieces, and
    ``u = wd*w`` where the step is skipped). ``step`` is the 1-based step for bias correction.

    torch's fused Adam kernel computes both in one pass: given ``u = wd*w`` as its parameter and
    lr = -1, it leaves ``u + m̂/(sqrt(v̂)+eps)`` there.
    """
    decays = [weight_decay] * n_adapted + [0.0] * (len(weights) - n_adapted)
    decayed = list(torch._foreach_mul(weights, decays))
    torch._fused_adam_(
        decayed,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [step] * len(decayed),
        lr=-1.0,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=maximize,
        found_inf=skip,
    )
    return decayed
