"""The math of TVLARS, LARS and LAMB as pure functions over lists of local pieces.

Every optimizer step runs in three passes, and this module holds the first and the last:

1. ``*_piece_sums`` (and LAMB's ``lamb_local``): per local piece, the partial sums of
   squares (||w||², ||d||², ||g||²) that a layer's norms are built from;
2. (in ``reduction``) one all-reduce per process group turns partial sums into true layer sums;
3. ``*_update_``: per-layer scales from the true norms, then the foreach update (``*_apply_``).

The same functions run eagerly and, under ``fused=True``, compiled with ``torch.compile``
(``tvlars_scale.fused``): they take every changing scalar (lr, phi, the step counter) as either a
Python number or a 0-d tensor, and they branch only on things that stay fixed during training.
Nothing here syncs with the host: every decision (zero-norm fallback, skipping a step whose
gradients are non-finite or all zero) is a tensor ``where`` or a multiplication by 0/1. Pieces
are views, so the same functions serve whole parameters and slices of flat shards. Gradients are
only read, never written (gradient logging, clipping and accumulation rely on it), and norms are
accumulated in fp32 whatever the parameters' dtype.

``maximize=True`` steps along +g, as ``torch.optim.SGD(maximize=True)`` does: every formula uses
-g in place of g (the gradient itself is not negated in place).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "lamb_apply_",
    "lamb_directions",
    "lamb_local",
    "lamb_piece_sums",
    "lamb_update_",
    "lars_apply_",
    "lars_layer_scales",
    "lars_piece_sums",
    "lars_update_",
    "trust_ratio",
    "tvlars_factor",
]


def tvlars_factor(
    t: float | Tensor,
    lmbda: float,
    delay_steps: float = 0.0,
    alpha: float = 1.0,
    gamma_min: float = 0.0,
) -> float | Tensor:
    """phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min.

    ``t`` counts optimizer steps already taken (0-based). Works on Python numbers and on tensors
    (then it stays on the tensor's device, with no host sync).
    """
    if isinstance(t, Tensor):
        return 1.0 / (alpha + torch.exp(lmbda * (t - delay_steps))) + gamma_min
    exponent = lmbda * (t - delay_steps)
    if exponent > 700.0:  # exp would overflow a double; 1/(alpha + e^700) is 0 in float64
        return gamma_min
    return 1.0 / (alpha + math.exp(exponent)) + gamma_min


def trust_ratio(
    numerator_norm: Tensor, denominator_norm: Tensor, eta: float, norm_clip: float | None
) -> Tensor:
    """eta * ||w|| / ||d|| per layer, and 1 where either norm is 0.

    Called on the reduced (true) norms, so a rank that holds an empty shard never decides the
    fallback on its own zeros.
    """
    if norm_clip is not None:
        numerator_norm = numerator_norm.clamp(max=norm_clip)
        denominator_norm = denominator_norm.clamp(max=norm_clip)
    usable = (numerator_norm > 0) & (denominator_norm > 0)
    ratio = eta * numerator_norm / torch.where(usable, denominator_norm, 1.0)
    return torch.where(usable, ratio, 1.0)


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    # foreach ops reject empty lists; a group may have no adapted (or no excluded) pieces
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32)) if tensors else []


def _vecdot32(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> accumulated in (at least) fp32: a bf16/fp16 dot would round its sum to 8 or 11
    bits. Low-precision pieces are upcast one at a time, so the extra memory is one piece."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.element_size() < 4:
        x, y = x.float(), y.float()
    return torch.linalg.vecdot(x, y).float()


#: Row length of the dot products in compiled code (see ``_row_dot``).
_ROW = 1024


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> as a sum of row sums over rows of ``_ROW`` elements, for compiled code.

    Inductor turns a whole-tensor sum on CPU into one cascade-summation chain, which runs at
    about a third of memory speed; a short row is summed in registers. Row sums added up are
    also pairwise-like, so no less accurate. The last row is zero-padded (compiled, a masked
    load, not a copy), which keeps one reduction per piece rather than adding one for a tail.
    """
    x, y = x.reshape(-1).float(), y.reshape(-1).float()  # free when compiled; fp32 sums
    if x.numel() <= _ROW:
        return (x * y).sum()
    pad = -x.numel() % _ROW
    if pad:
        x, y = torch.nn.functional.pad(x, (0, pad)), torch.nn.functional.pad(y, (0, pad))
    return (x.view(-1, _ROW) * y.view(-1, _ROW)).sum(1).sum()


def _dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """<x_i, y_i> per pair, fp32. On CPU a BLAS dot per tensor reads memory ~1.6x faster than
    torch._foreach_norm; elsewhere the squared foreach norm keeps kernel launches batched."""
    if not xs:
        return torch.zeros(0)
    if xs is ys and xs[0].device.type != "cpu":
        return torch.stack(_norms(xs)).square()
    return torch.stack([_vecdot32(x, y) for x, y in zip(xs, ys, strict=True)])


def _piece_dots(*pairs: tuple[list[Tensor], list[Tensor]]) -> list[Tensor]:
    """For each (xs, ys) of ``pairs`` (lists of the same pieces): <x_i, y_i> per piece, fp32.

    Compiled, all products of one piece are summed in one expression, which inductor fuses
    into a single read of each tensor (taken list by list, it may read a tensor once per sum).
    """
    n = len(pairs[0][0])
    if n and torch.compiler.is_compiling():
        table = [torch.stack([_row_dot(xs[i], ys[i]) for xs, ys in pairs]) for i in range(n)]
        return list(torch.stack(table, dim=1).float())
    return [_dots(xs, ys) for xs, ys in pairs]


def lars_piece_sums(
    weights: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    weight_decay: float,
    trust_denominator: str,
    maximize: bool = False,
) -> Tensor:
    """(3, pieces) fp32 partial sums for the LARS rule: ||w||², ||den||², ||g||².

    The direction d = g + wd*w is never materialised (on CPU a parameter-sized allocation per
    step costs as much as the whole SGD step): ||d||² = ||g||² + 2wd<g,w> + wd²||w||² adds up
    over pieces, so each piece contributes its own share and the reduction stays exact.
    ``den`` is d for ``"combined"`` and g for ``"sum"`` (where the ratio adds wd*||w||). With
    ``maximize`` d = -g + wd*w, so the cross term changes sign.
    """
    if trust_denominator != "combined" or weight_decay == 0 or not n_adapted:
        w_sq, g_sq = _piece_dots((weights, weights), (grads, grads))
        return torch.stack([w_sq, g_sq, g_sq])
    w, g = weights[:n_adapted], grads[:n_adapted]
    w_sq, g_sq, g_dot_w = _piece_dots((w, w), (g, g), (g, w))
    wd = weight_decay
    cross = -2 * wd if maximize else 2 * wd
    den_sq = (g_sq + cross * g_dot_w + wd * wd * w_sq).clamp(min=0)
    sums = torch.stack([w_sq, den_sq, g_sq])
    if n_adapted < len(weights):  # excluded pieces: no decay, so den = g
        w, g = weights[n_adapted:], grads[n_adapted:]
        w_sq, g_sq = _piece_dots((w, w), (g, g))
        sums = torch.cat([sums, torch.stack([w_sq, g_sq, g_sq])], dim=1)
    return sums


def lamb_piece_sums(weights: list[Tensor], updates: list[Tensor], grads: list[Tensor]) -> Tensor:
    """(3, pieces) fp32 partial sums for LAMB: ||w||², ||u||², ||g||²."""
    return torch.stack(_piece_dots((weights, weights), (updates, updates), (grads, grads)))


def lars_layer_scales(
    weight_norm: Tensor,
    denominator_norm: Tensor,
    excluded: Tensor,
    *,
    eta: float,
    phi: Tensor | float,
    phi_on_excluded: bool,
    phi_in_ratio: bool,
    norm_clip: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-layer step scale s_k and trust ratio q_k (docs/design.md, section 1).

    ``phi_in_ratio`` reproduces the authors' code: phi multiplies the ratio itself, so where the
    ratio falls back to 1 the scale is 1, not phi.
    """
    q = trust_ratio(weight_norm, denominator_norm, eta, norm_clip)
    scale = q * phi
    if phi_in_ratio:
        fallback = (weight_norm == 0) | (denominator_norm == 0)
        scale = torch.where(fallback, 1.0, scale)
    excluded_scale = phi if phi_on_excluded else 1.0
    q = torch.where(excluded, 1.0, q)
    return torch.where(excluded, excluded_scale, scale), q


def zero_non_finite_(tensors: list[Tensor]) -> None:
    """Replace NaN/inf by 0 in place, so that a skipped step (scale 0) multiplies only finite
    numbers. A no-op on the finite tensors of a normal step."""
    for t in tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def _finite(tensors: list[Tensor], *, owned: bool) -> list[Tensor]:
    """``tensors`` with NaN/inf read as 0.

    Compiled: out of place, which fuses into the pass that reads them instead of adding a write
    (and ``where(isfinite)``, unlike ``nan_to_num``, is vectorised by inductor on CPU). Eagerly:
    in place only for ``owned`` tensors (temporaries of this step); anything else (gradients)
    is read into a copy, because the caller's tensors are never written.
    """
    if torch.compiler.is_compiling():
        return [torch.where(torch.isfinite(t), t, 0.0) for t in tensors]
    if owned:
        zero_non_finite_(tensors)
        return tensors
    return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in tensors]


def _axpy_(ys: list[Tensor], xs: list[Tensor], a: Tensor | float) -> None:
    """ys += a * xs for a device scalar (no host sync) or a Python number (fast path)."""
    if isinstance(a, Tensor):
        torch._foreach_addcmul_(ys, xs, [a] * len(ys))
    else:
        torch._foreach_add_(ys, xs, alpha=a)


def lars_apply_(
    weights: list[Tensor],
    momenta: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    piece_scales: list[Tensor],
    *,
    momentum: float,
    weight_decay: float,
    lr: float | Tensor,
    nesterov: bool,
    apply: Tensor | bool,
    maximize: bool = False,
) -> None:
    """m = mu*m + s*(g + wd*w); w -= lr*m (or the Nesterov form). Only the first ``n_adapted``
    pieces get weight decay.

    ``apply`` is either ``True`` (decided on the host) or a bool tensor decided on the device,
    and then the step is a no-op where it is False: ``piece_scales`` already carry it, and
    non-finite gradient entries are read as 0 (from a copy: ``grads`` are not written) so that
    a skipped step multiplies only finite numbers by 0 and leaves m and w bit-for-bit unchanged.
    Eagerly the copy is one gradient-sized temporary per step (torch's foreach optimizers make
    the same for ``maximize`` and weight decay); compiled, it fuses into the update pass.
    """
    if isinstance(apply, Tensor):
        grads = _finite(grads, owned=False)
        momentum_eff = torch.where(apply, momentum, 1.0)
        neg_lr = torch.where(apply, -lr, 0.0)
    else:
        momentum_eff, neg_lr = momentum, -lr
    grad_scales = [-s for s in piece_scales] if maximize else piece_scales
    decay_scales = [s * weight_decay for s in piece_scales[:n_adapted]] if weight_decay else []
    torch._foreach_mul_(momenta, momentum_eff)
    torch._foreach_addcmul_(momenta, grads, grad_scales)
    if decay_scales:
        torch._foreach_addcmul_(momenta[:n_adapted], weights[:n_adapted], decay_scales)
    if nesterov:  # w -= lr * (s*wd*w + s*g + mu*m); the decay term first, while w is still w
        if decay_scales:
            shrink = [neg_lr * s for s in decay_scales]
            torch._foreach_addcmul_(weights[:n_adapted], weights[:n_adapted], shrink)
        torch._foreach_addcmul_(weights, grads, [neg_lr * s for s in grad_scales])
        _axpy_(weights, momenta, neg_lr * momentum)
    else:
        _axpy_(weights, momenta, neg_lr)


def lars_update_(
    weights: list[Tensor],
    momenta: list[Tensor],
    grads: list[Tensor],
    norms: Tensor,
    excluded: Tensor,
    piece_layer: Tensor,
    n_adapted: int,
    *,
    eta: float,
    phi: Tensor | float,
    phi_on_excluded: bool,
    phi_in_ratio: bool,
    norm_clip: float | None,
    trust_denominator: str,
    momentum: float,
    weight_decay: float,
    lr: float | Tensor,
    nesterov: bool,
    apply: Tensor | bool,
    maximize: bool = False,
) -> tuple[Tensor, Tensor]:
    """The LARS step after the reduction: per-layer scales from the true ``norms`` (rows ||w||
    and ||den||, one column per layer), then ``lars_apply_``. Returns (trust ratio, scale)."""
    weight_norm, denominator_norm = norms
    if trust_denominator == "sum":
        denominator_norm = denominator_norm + weight_decay * weight_norm
    scale, ratio = lars_layer_scales(
        weight_norm,
        denominator_norm,
        excluded,
        eta=eta,
        phi=phi,
        phi_on_excluded=phi_on_excluded,
        phi_in_ratio=phi_in_ratio,
        norm_clip=norm_clip,
    )
    piece_scales = (scale * apply).index_select(0, piece_layer).unbind()
    lars_apply_(
        weights,
        momenta,
        grads,
        n_adapted,
        list(piece_scales),
        momentum=momentum,
        weight_decay=weight_decay,
        lr=lr,
        nesterov=nesterov,
        apply=apply,
        maximize=maximize,
    )
    return ratio, scale


def lamb_directions(
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
    maximize: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """LAMB's new moments (not yet committed) and its update u = m̂/(sqrt(v̂)+eps) + wd*w.

    ``step`` is the 1-based step for bias correction. The moments are computed out of place so
    that a step skipped after the reduction can leave the stored moments untouched.
    """
    beta1, beta2 = betas
    signed_grads = list(torch._foreach_neg(grads)) if maximize else grads
    new_exp_avgs = list(torch._foreach_lerp(exp_avgs, signed_grads, 1.0 - beta1))
    new_exp_avg_sqs = list(torch._foreach_mul(exp_avg_sqs, beta2))
    torch._foreach_addcmul_(new_exp_avg_sqs, grads, grads, value=1.0 - beta2)
    new_exp_avgs = _finite(new_exp_avgs, owned=True)
    new_exp_avg_sqs = _finite(new_exp_avg_sqs, owned=True)

    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step))
    denom = torch._foreach_sqrt(new_exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = list(torch._foreach_div(new_exp_avgs, denom))
    torch._foreach_div_(updates, bias_correction1)
    if weight_decay != 0 and n_adapted:
        torch._foreach_add_(updates[:n_adapted], weights[:n_adapted], alpha=weight_decay)
    return new_exp_avgs, new_exp_avg_sqs, updates


def lamb_apply_(
    weights: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    new_exp_avgs: list[Tensor],
    new_exp_avg_sqs: list[Tensor],
    updates: list[Tensor],
    piece_coefficients: list[Tensor],
    *,
    apply: Tensor | bool,
) -> None:
    """Commit the moments (where ``apply``); w += coef * u, with coef = -lr * ratio (* apply)."""
    if isinstance(apply, Tensor):
        keep_new = [apply.to(torch.float32)] * len(exp_avgs)
        torch._foreach_lerp_(exp_avgs, new_exp_avgs, keep_new)
        torch._foreach_lerp_(exp_avg_sqs, new_exp_avg_sqs, keep_new)
    else:
        torch._foreach_copy_(exp_avgs, new_exp_avgs)
        torch._foreach_copy_(exp_avg_sqs, new_exp_avg_sqs)
    torch._foreach_addcmul_(weights, updates, piece_coefficients)


LambDirections = tuple[list[Tensor], list[Tensor], list[Tensor]]


def lamb_local(
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
    keep_directions: bool = True,
    maximize: bool = False,
) -> tuple[Tensor, LambDirections | None]:
    """LAMB before the reduction: (3, pieces) partial sums, and the directions for
    ``lamb_update_`` if ``keep_directions`` (else None: the update recomputes them, which
    the fused path prefers to storing three parameter-sized tensors between the passes)."""
    directions = lamb_directions(
        weights,
        grads,
        exp_avgs,
        exp_avg_sqs,
        n_adapted,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        maximize=maximize,
    )
    sums = lamb_piece_sums(weights, directions[2], grads)
    return sums, (directions if keep_directions else None)


def lamb_update_(
    weights: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    directions: LambDirections | None,
    norms: Tensor,
    excluded: Tensor,
    piece_layer: Tensor,
    n_adapted: int,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: Tensor,
    lr: float | Tensor,
    norm_clip: float | None,
    apply: Tensor | bool,
    maximize: bool = False,
) -> tuple[Tensor, Tensor]:
    """The LAMB step after the reduction: ratio ||w||/||u|| per layer, then ``lamb_apply_``.
    ``directions`` come from ``lamb_local`` or, if None, are recomputed from the same inputs.
    Returns (trust ratio, scale), which are the same for LAMB."""
    if directions is None:
        directions = lamb_directions(
            weights,
            grads,
            exp_avgs,
            exp_avg_sqs,
            n_adapted,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            maximize=maximize,
        )
    new_exp_avgs, new_exp_avg_sqs, updates = directions
    weight_norm, update_norm = norms
    ratio = trust_ratio(weight_norm, update_norm, 1.0, norm_clip)
    ratio = torch.where(excluded, 1.0, ratio)
    coefficient = -lr * ratio
    if isinstance(apply, Tensor):
        coefficient = torch.where(apply, coefficient, 0.0)
    lamb_apply_(
        weights,
        exp_avgs,
        exp_avg_sqs,
        new_exp_avgs,
        new_exp_avg_sqs,
        updates,
        list(coefficient.index_select(0, piece_layer).unbind()),
        apply=apply,
    )
    return ratio, ratio
