"""The math of TVLARS, LARS and LAMB as pure functions over lists of local pieces.

Every optimizer step runs in three passes, and this module holds the first and the last:

1. ``*_directions`` / ``piece_sums``: per local piece, the update direction and the partial sums
   of squares (||w||², ||d||², ||g||²) that a layer's norm is built from;
2. (in ``reduction``) one all-reduce per process group turns partial sums into true layer sums;
3. ``*_apply_``: per-layer scales from the true norms, then the foreach update.

Nothing here syncs with the host: every decision (zero-norm fallback, skipping a step whose
gradients are non-finite or all zero) is a tensor ``where`` or a multiplication by 0/1. Pieces
are views, so the same functions serve whole parameters and slices of flat shards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "lamb_apply_",
    "lamb_directions",
    "lars_apply_",
    "lars_directions",
    "lars_layer_scales",
    "piece_sums",
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


def piece_sums(
    weights: list[Tensor], directions: list[Tensor], grads: list[Tensor], n_adapted: int
) -> Tensor:
    """Partial sums of squares per piece, as a (3, pieces) fp32 tensor: ||w||², ||d||², ||g||².

    Excluded pieces (after ``n_adapted``) have d == g, so their ||g||² is not computed twice.
    """
    w_norms = torch._foreach_norm(weights)
    d_norms = torch._foreach_norm(directions)
    g_norms = list(torch._foreach_norm(grads[:n_adapted])) + list(d_norms[n_adapted:])
    sums = torch.stack([torch.stack(w_norms), torch.stack(d_norms), torch.stack(g_norms)])
    return sums.float().square()


def lars_directions(
    weights: list[Tensor], grads: list[Tensor], n_adapted: int, weight_decay: float
) -> list[Tensor]:
    """d = g + wd * w for adapted pieces, d = g for excluded ones; always fresh tensors."""
    adapted = (
        torch._foreach_add(grads[:n_adapted], weights[:n_adapted], alpha=weight_decay)
        if weight_decay != 0
        else torch._foreach_mul(grads[:n_adapted], 1.0)
    )
    excluded = torch._foreach_mul(grads[n_adapted:], 1.0)
    return list(adapted) + list(excluded)


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
    """Per-layer step scale s_k and trust ratio q_k (DESIGN.md section 1).

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


def lars_apply_(
    weights: list[Tensor],
    momenta: list[Tensor],
    directions: list[Tensor],
    piece_scales: list[Tensor],
    *,
    momentum: float,
    lr: float,
    nesterov: bool,
    apply: Tensor,
) -> None:
    """m = mu*m + s*d; w -= lr*m (or the Nesterov form), as no-ops where ``apply`` is False.

    ``piece_scales`` already carry ``apply`` (0 on a skipped step); ``directions`` are consumed.
    """
    zero_non_finite_(directions)
    momentum_eff = torch.where(apply, momentum, 1.0)
    neg_lr = torch.where(apply, -lr, 0.0)
    torch._foreach_mul_(momenta, momentum_eff)
    torch._foreach_addcmul_(momenta, directions, piece_scales)
    if nesterov:
        torch._foreach_mul_(directions, piece_scales)
        torch._foreach_add_(directions, momenta, alpha=momentum)
        step_direction = directions
    else:
        step_direction = momenta
    torch._foreach_addcmul_(weights, step_direction, [neg_lr] * len(weights))


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
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """LAMB's new moments (not yet committed) and its update u = m̂/(sqrt(v̂)+eps) + wd*w.

    ``step`` is the 1-based step for bias correction. The moments are computed out of place so
    that a step skipped after the reduction can leave the stored moments untouched.
    """
    beta1, beta2 = betas
    new_exp_avgs = list(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
    new_exp_avg_sqs = list(torch._foreach_mul(exp_avg_sqs, beta2))
    torch._foreach_addcmul_(new_exp_avg_sqs, grads, grads, value=1.0 - beta2)
    zero_non_finite_(new_exp_avgs)
    zero_non_finite_(new_exp_avg_sqs)

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
    apply: Tensor,
) -> None:
    """Commit the moments where ``apply``; w += coef * u, with coef = -lr * ratio * apply."""
    keep_new = [apply.to(torch.float32)] * len(exp_avgs)
    torch._foreach_lerp_(exp_avgs, new_exp_avgs, keep_new)
    torch._foreach_lerp_(exp_avg_sqs, new_exp_avg_sqs, keep_new)
    torch._foreach_addcmul_(weights, updates, piece_coefficients)
