"""The math of TVLARS, LARS and LAMB as pure functions over lists of local pieces.

Every optimizer step runs in passes over parameter-sized tensors, with the sharded-norm reduction
(``reduction``) between them:

- LARS and TVLARS: ``lars_piece_sums`` (per local piece, the partial sums of squares a layer's
  norms are built from), the reduction, then ``lars_scales`` (per-layer scales from the true
  norms) and the momentum update ``lars_apply_``.
- LAMB decides whether the step applies *before* it touches its moments, so that Adam's moments
  are updated in place: ``squared_norm`` of the gradients, the decision, then
  ``lamb_directions_`` (moments and the direction u in one pass of torch's fused Adam kernel),
  ``lamb_piece_sums``, the reduction, and ``lamb_update_``.

The same functions run eagerly and, under ``fused=True``, compiled with ``torch.compile``
(``tvlars_scale.fused``): they take every changing scalar (lr, phi, the step counter) as either a
Python number or a 0-d tensor, and they branch only on their arguments, which stay fixed during
training. The mode of the step comes in as arguments (``optim/mode.py``): ``mask`` is None when
the decision was read on the host (the update applies, and can use torch's fused optimizer
kernels directly), or the decision as a device bool tensor that masks the update, with no host
sync; ``traced`` says the function is being traced into a graph (by ``fused=True`` or by a
caller's ``torch.compile``), which takes graph-friendly forms and none of torch's fused kernels.
The multi-tensor kernels accelerators run are in ``functional.masked``. Pieces are views, so
the same functions serve whole parameters and slices of flat shards. Gradients are only read, never written (gradient logging, clipping and
accumulation rely on it), and norms are accumulated in fp32 whatever the parameters' dtype.

``maximize=True`` steps along +g, as ``torch.optim.SGD(maximize=True)`` does: every formula uses
-g in place of g (the gradient itself is not negated in place).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

__all__ = [
    "kernel_ready",
    "lamb_directions_",
    "lamb_piece_sums",
    "lamb_ratios",
    "lamb_update_",
    "lars_apply_",
    "lars_piece_sums",
    "lars_scales",
    "squared_norm",
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
    (then it stays on the tensor's device, with no host sync, in as few kernels as the formula
    allows: with alpha = 1 it is ``sigmoid(lmbda * (delay_steps - t))``, the same float
    operations in one kernel).
    """
    if isinstance(t, Tensor):
        if alpha == 1.0:
            phi = torch.sigmoid(torch.rsub(t, delay_steps).mul_(lmbda))
        else:
            phi = torch.exp(torch.sub(t, delay_steps).mul_(lmbda)).add_(alpha).reciprocal_()
        return phi + gamma_min if gamma_min else phi
    exponent = lmbda * (t - delay_steps)
    if exponent > 700.0:  # exp would overflow a double; 1/(alpha + e^700) is 0 in float64
        return gamma_min
    return 1.0 / (alpha + math.exp(exponent)) + gamma_min


def norms32(tensors: list[Tensor]) -> list[Tensor]:
    """||t|| of each tensor as 0-d fp32, accumulated in fp32 (bf16/fp16 pieces: a norm in their
    own precision would keep 8 or 11 bits) or, for fp64 pieces, in fp64 (torch's norm refuses to
    narrow): one multi-tensor call per kind."""
    wide = [t.dtype == torch.float64 for t in tensors]
    if not any(wide):  # foreach ops reject empty lists: none for a group without pieces
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32)) if tensors else []
    narrow = [t for t, w in zip(tensors, wide, strict=True) if not w]
    narrow_norms = iter(torch._foreach_norm(narrow, 2, dtype=torch.float32) if narrow else ())
    wide_norms = iter(torch._foreach_norm([t for t, w in zip(tensors, wide, strict=True) if w], 2))
    return [next(wide_norms).float() if w else next(narrow_norms) for w in wide]


def _vecdot32(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> of two 1-D tensors accumulated in (at least) fp32: a bf16/fp16 dot would round its
    sum to 8 or 11 bits. Low-precision pieces are upcast one at a time (memory: one piece)."""
    if x.element_size() < 4:
        x, y = x.float(), y.float()
    return torch.linalg.vecdot(x, y).float()


def one_dense_layout(piece: Sequence[Tensor]) -> bool:
    """Whether the tensors of one piece (one shape) fill one block of memory each and list
    their elements in the same order there: all contiguous, or all channels-last with equal
    strides (what ``model.to(memory_format=torch.channels_last)`` leaves conv weights, and
    autograd their gradients). Then walking their memory pairs their elements."""
    if all(t.is_contiguous() for t in piece):
        return True
    first = piece[0]
    return (
        first.ndim == 4
        and first.is_contiguous(memory_format=torch.channels_last)
        and all(t.stride() == first.stride() for t in piece)
    )


def flat_alike(piece: Sequence[Tensor]) -> list[Tensor]:
    """1-D aliases of one piece's tensors that list their elements in the same order: memory
    order when ``one_dense_layout`` (no copy, whatever the layout), else logical order
    (``reshape``: a copy of each tensor that is not contiguous)."""
    if piece[0].is_contiguous() or not one_dense_layout(piece):
        return [t.reshape(-1) for t in piece]
    return [t.as_strided((t.numel(),), (1,)) for t in piece]


def _piece_dots(*pairs: tuple[list[Tensor], list[Tensor]], traced: bool) -> list[Tensor]:
    """For each (xs, ys) of ``pairs`` (lists of the same pieces): <x_i, y_i> per piece, fp32.

    All products of one piece are taken together: ``traced`` (inside a graph being compiled),
    inductor fuses them into a single read of each tensor; on CPU, a BLAS dot each, one piece
    after the other, so that a piece is still in cache for its next product. Elsewhere, squares
    are batched foreach norms.
    """
    n = len(pairs[0][0])
    if not n:
        return [torch.zeros(0) for _ in pairs]
    if traced:
        table = [
            torch.stack([(xs[i].float() * ys[i].float()).sum() for xs, ys in pairs])
            for i in range(n)
        ]
        return list(torch.stack(table, dim=1))
    if pairs[0][0][0].device.type == "cpu":
        lists = list({id(t): t for pair in pairs for t in pair}.values())  # each flattened once
        columns = [flat_alike([tensors[i] for tensors in lists]) for i in range(n)]
        flat = {id(tensors): [c[j] for c in columns] for j, tensors in enumerate(lists)}
        products = [(flat[id(xs)], flat[id(ys)]) for xs, ys in pairs]
        dots = [_vecdot32(x[i], y[i]) for i in range(n) for x, y in products]
        return list(torch.stack(dots).view(n, len(pairs)).t())
    out = []
    for xs, ys in pairs:
        if xs is ys:
            out.append(torch.stack(norms32(xs)).square())
        else:
            pairs_i = zip(xs, ys, strict=True)
            out.append(torch.stack([_vecdot32(*flat_alike((x, y))) for x, y in pairs_i]))
    return out


def squared_norm(
    tensors: list[Tensor], *, traced: bool = False, multi_tensor: bool = False
) -> Tensor:
    """0-d fp32: the sum of ||t||² over ``tensors`` (the local part of a step decision);
    ``traced``: inside a graph being compiled. ``multi_tensor`` (a group on the multi-tensor
    kernels), or off the CPU: three kernels whatever the number of tensors (norms, stack,
    dot); else a BLAS dot per tensor, which reads large CPU tensors fastest."""
    if not tensors:
        return torch.zeros(())
    if traced or (tensors[0].device.type == "cpu" and not multi_tensor):
        return _piece_dots((tensors, tensors), traced=traced)[0].sum()
    norms = torch.stack(norms32(tensors))
    return torch.dot(norms, norms)


def lars_piece_sums(
    weights: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    weight_decay: float | Tensor,
    trust_denominator: str,
    maximize: bool = False,
    *,
    traced: bool = False,
) -> Tensor:
    """(3, pieces) fp32 partial sums for the LARS rule: ||w||², ||den||², ||g||².

    The direction d = g + wd*w is never materialised (on CPU a parameter-sized allocation per
    step costs as much as the whole SGD step): ||d||² = ||g||² + 2wd<g,w> + wd²||w||² adds up
    over pieces, so each piece contributes its own share and the reduction stays exact.
    ``den`` is d for ``"combined"`` and g for ``"sum"`` (where the ratio adds wd*||w||). With
    ``maximize`` d = -g + wd*w, so the cross term changes sign. ``traced``: inside a graph being
    compiled (``_piece_dots``).
    """
    if trust_denominator != "combined" or _no_decay(weight_decay) or not n_adapted:
        w_sq, g_sq = _piece_dots((weights, weights), (grads, grads), traced=traced)
        return torch.stack([w_sq, g_sq, g_sq])
    w, g = weights[:n_adapted], grads[:n_adapted]
    w_sq, g_sq, g_dot_w = _piece_dots((w, w), (g, g), (g, w), traced=traced)
    wd = weight_decay
    cross = -2 * wd if maximize else 2 * wd
    den_sq = (g_sq + cross * g_dot_w + wd * wd * w_sq).clamp(min=0)
    sums = torch.stack([w_sq, den_sq, g_sq])
    if n_adapted < len(weights):  # excluded pieces: no decay, so den = g
        w, g = weights[n_adapted:], grads[n_adapted:]
        w_sq, g_sq = _piece_dots((w, w), (g, g), traced=traced)
        sums = torch.cat([sums, torch.stack([w_sq, g_sq, g_sq])], dim=1)
    return sums


def _no_decay(weight_decay: float | Tensor) -> bool:
    """Whether weight decay is off, known for a number only. A tensor (what ``fused=True``
    passes, so that a schedule recompiles nothing) takes the decay terms, which add exact
    zeros at 0."""
    return not isinstance(weight_decay, Tensor) and weight_decay == 0


def _finite(tensors: list[Tensor], *, traced: bool) -> list[Tensor]:
    """``tensors`` with NaN/inf read as 0, so that a masked step multiplies only finite numbers
    by 0. ``traced`` (inside a graph being compiled): ``where(isfinite)``, which fuses into the
    pass that reads them (and, unlike ``nan_to_num``, inductor vectorises on CPU). Eagerly: a
    copy, because the caller's tensors (gradients) are never written. The multi-tensor kernels
    (``functional.masked``) need neither: their ``found_inf`` skips the step."""
    if traced:
        return [torch.where(torch.isfinite(t), t, 0.0) for t in tensors]
    return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in tensors]


def _axpy_(ys: list[Tensor], xs: list[Tensor], a: Tensor | float) -> None:
    """ys += a * xs for a device scalar (no host sync) or a Python number (fast path)."""
    if isinstance(a, Tensor):
        torch._foreach_addcmul_(ys, xs, [a] * len(ys))
    else:
        torch._foreach_add_(ys, xs, alpha=a)


#: Device types with torch's fused optimizer kernels (``torch.optim.SGD/Adam(fused=True)``).
_FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())


#: torch's CPU fused SGD kernel updates bf16/fp16 tensors wrongly before 2.14 (measured on
#: 2.9.1: momentum off by up to 0.6 for O(1) values, against ~4e-3 of bf16 rounding on 2.14.1);
#: there, low-precision pieces take the foreach passes.
_LOW_PRECISION_SGD_KERNEL = torch.torch_version.TorchVersion(torch.__version__) >= "2.14"


def kernel_ready(*tensors: Tensor) -> bool:
    """Whether torch's fused SGD kernel can take these tensors of one piece: it walks every
    tensor's memory in the same order, so all must be dense (contiguous or channels-last, as
    ``model.to(memory_format=torch.channels_last)`` leaves conv weights and autograd their
    gradients), with the same strides and one dtype."""
    first = tensors[0]
    precise = first.dtype in (torch.float32, torch.float64) or _LOW_PRECISION_SGD_KERNEL
    return (
        first.device.type in _FUSED_DEVICES
        and precise
        and all(t.dtype == first.dtype for t in tensors)
        and one_dense_layout(tensors)
    )


def _split(ready: list[bool], n_adapted: int, *lists: list) -> tuple[tuple, tuple]:
    """``lists`` cut by ``ready`` into two parts, each adapted-first, with its ``n_adapted``."""
    parts = []
    for want in (True, False):
        index = [i for i, r in enumerate(ready) if r is want]
        parts.append((sum(i < n_adapted for i in index), *([x[i] for i in index] for x in lists)))
    return parts[0], parts[1]


def _lars_fused_sgd_(
    weights: list[Tensor],
    momenta: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    scales: list[float],
    *,
    momentum: float,
    weight_decay: float,
    lr: float | Tensor,
    maximize: bool,
) -> None:
    """The LARS update, one pass per piece, by torch's fused SGD kernel.

    m = mu*m + s*(g + wd*w), w -= lr*m is SGD's momentum step with dampening 1 - s (the kernel
    takes 1 - dampening in double precision, so s survives exactly; its ``maximize`` negates g
    alone, as ours does). Pieces that share s and wd (the pieces of one layer, and every excluded
    piece) share a call.
    """
    calls: dict[tuple, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for i, (w, m, g) in enumerate(zip(weights, momenta, grads, strict=True)):
        key = (scales[i], weight_decay if i < n_adapted else 0.0, w.device, w.dtype)
        for bucket, t in zip(calls.setdefault(key, ([], [], [])), (w, m, g), strict=True):
            bucket.append(t)
    for (scale, decay, _, _), (ws, ms, gs) in calls.items():
        torch._fused_sgd_(
            ws,
            gs,
            ms,
            weight_decay=decay,
            momentum=momentum,
            lr=lr,
            dampening=1.0 - scale,
            nesterov=False,
            maximize=maximize,
            is_first_step=False,
        )


def lars_apply_(
    weights: list[Tensor],
    momenta: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    piece_scales: list[Tensor],
    *,
    momentum: float | Tensor,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    nesterov: bool,
    mask: Tensor | None,
    maximize: bool = False,
    traced: bool = False,
) -> None:
    """m = mu*m + s*(g + wd*w); w -= lr*m (or the Nesterov form). Only the first ``n_adapted``
    pieces get weight decay.

    ``mask`` is None (the step applies: decided on the host) or the decision as a bool tensor
    on the device, and then the step is a no-op where it is False: ``piece_scales`` carry it, and
    non-finite gradient entries are read as 0 (from a copy: ``grads`` are not written) so that
    a skipped step multiplies only finite numbers by 0 and leaves m and w bit-for-bit unchanged.
    Eagerly the copy is one gradient-sized temporary per step (torch's foreach optimizers make
    the same for ``maximize`` and weight decay); compiled, it fuses into the update pass.

    Decided on the host, the non-Nesterov update is one pass of torch's fused SGD kernel per
    piece (the scales are read once; free on CPU); otherwise, and ``traced`` (inside a graph
    being compiled, which cannot hold that kernel), it is a chain of foreach passes, which
    ``fused=True`` compiles into one.
    """
    if mask is None and not nesterov and momentum > 0 and weights and not traced:
        ready = [kernel_ready(*piece) for piece in zip(weights, momenta, grads, strict=True)]
        scales = torch.stack(piece_scales).tolist()
        (n_fused, *fused), (n_rest, *rest) = _split(
            ready, n_adapted, weights, momenta, grads, scales, piece_scales
        )
        if fused[0]:
            kw = dict(momentum=momentum, weight_decay=weight_decay, lr=lr, maximize=maximize)
            _lars_fused_sgd_(*fused[:3], n_fused, fused[3], **kw)
        if not rest[0]:
            return
        weights, momenta, grads, _, piece_scales = rest
        n_adapted = n_rest
    _lars_foreach_(
        weights,
        momenta,
        grads,
        n_adapted,
        piece_scales,
        momentum=momentum,
        weight_decay=weight_decay,
        lr=lr,
        nesterov=nesterov,
        mask=mask,
        maximize=maximize,
        traced=traced,
    )


def _lars_foreach_(
    weights: list[Tensor],
    momenta: list[Tensor],
    grads: list[Tensor],
    n_adapted: int,
    piece_scales: list[Tensor],
    *,
    momentum: float | Tensor,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    nesterov: bool,
    mask: Tensor | None,
    maximize: bool,
    traced: bool,
) -> None:
    """``lars_apply_`` as foreach operations (any device, either decision path)."""
    if mask is not None:
        grads = _finite(grads, traced=traced)
        momentum_eff = torch.where(mask, momentum, 1.0)
        neg_lr = torch.where(mask, -lr, 0.0)
    else:
        momentum_eff, neg_lr = momentum, -lr
    grad_scales = [-s for s in piece_scales] if maximize else piece_scales
    decay = not _no_decay(weight_decay)
    decay_scales = [s * weight_decay for s in piece_scales[:n_adapted]] if decay else []
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


def _laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` itself when it has ``like``'s dtype and strides, else a copy that has them (read
    only: a gradient is never written)."""
    if t.dtype == like.dtype and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


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
    mask: Tensor | None,
    maximize: bool = False,
    traced: bool = False,
) -> list[Tensor]:
    """Adam's moments, updated in place, and LAMB's direction u = m̂/(sqrt(v̂)+eps) + wd*w per
    piece (new tensors; no decay for excluded pieces).

    The step's decision is taken before (``mask``: None where it applies, decided on the host,
    or the decision as a bool tensor on the device), so the moments need no second copy: where
    it is False they are left bit-for-bit unchanged and u is wd*w. ``step`` is the 1-based step
    for bias correction. ``traced``: inside a graph being compiled.

    torch's fused Adam kernel computes both in one pass: given u = wd*w as its parameter and
    lr = -1, it leaves u + m̂/(sqrt(v̂)+eps) there, and its ``found_inf`` argument skips the
    update on the device; its ``maximize`` uses -g for m (v is the same). Gradients are read,
    never written.
    """
    beta1, beta2 = betas
    updates = list(torch._foreach_mul(weights[:n_adapted], weight_decay)) if n_adapted else []
    updates += [torch.zeros_like(w) for w in weights[n_adapted:]]
    if not updates:
        return updates
    step = step.to(torch.float32)
    # The kernel walks every tensor's memory in order: it takes a piece whose moments are laid
    # out like its direction (the gradient is copied to that layout when it is not). Moments
    # laid out otherwise (a state_dict of a contiguous run loaded into a channels-last model,
    # or a model moved to channels-last after some steps) take the foreach passes. So does
    # every piece of a step that the caller compiles (`torch.compile(optimizer.step)`): the
    # kernel cannot write the buffers the graph creates, and inductor fuses the passes anyway.
    groups: dict[tuple, tuple[list[Tensor], ...]] = {}
    rest: tuple[list[Tensor], ...] = ([], [], [], [])
    kernel = not traced
    for u, g, m, v in zip(updates, grads, exp_avgs, exp_avg_sqs, strict=True):
        fits = kernel and u.device.type in _FUSED_DEVICES and m.dtype == v.dtype == u.dtype
        if fits and one_dense_layout((u, m, v)):
            group = groups.setdefault((u.device, u.dtype), ([], [], [], []))
            g = _laid_out_like(g, u)
        else:
            group = rest
        for bucket, t in zip(group, (u, g, m, v), strict=True):
            bucket.append(t)
    if rest[0]:
        _adam_directions_foreach_(
            *rest, betas=betas, eps=eps, step=step, mask=mask, maximize=maximize, traced=traced
        )
    found_inf = None if mask is None else (~mask).to(torch.float32)
    for us, gs, ms, vs in groups.values():
        torch._fused_adam_(
            us,
            gs,
            ms,
            vs,
            [],
            [step] * len(us),
            lr=-1.0,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            amsgrad=False,
            maximize=maximize,
            found_inf=found_inf,
        )
    return updates


def _adam_directions_foreach_(
    updates: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    betas: tuple[float, float],
    eps: float,
    step: Tensor,
    mask: Tensor | None,
    maximize: bool,
    traced: bool,
) -> None:
    """``lamb_directions_`` where torch's fused Adam kernel cannot run: foreach passes, masked
    by a device decision (gradients read through a finite copy, never written)."""
    beta1, beta2 = betas
    if mask is not None:
        grads = _finite(grads, traced=traced)
        keep = mask.to(torch.float32)
        n = len(grads)
        signed = list(torch._foreach_neg(grads)) if maximize else grads
        torch._foreach_lerp_(exp_avgs, signed, [keep * (1.0 - beta1)] * n)
        torch._foreach_mul_(exp_avg_sqs, torch.where(mask, beta2, 1.0))
        torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, keep * (1 - beta2)), grads)
    else:
        signed = list(torch._foreach_neg(grads)) if maximize else grads
        torch._foreach_lerp_(exp_avgs, signed, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias_correction1, bias_correction2_sqrt = _bias_corrections(betas, step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bias_correction1)  # m / (bc1 * denom) = m̂ / (sqrt(v̂) + eps)
    directions = torch._foreach_div(exp_avgs, denom)
    if mask is not None:
        torch._foreach_mul_(directions, mask.to(torch.float32))
    torch._foreach_add_(updates, directions)


@torch.compiler.disable
def _bias_corrections(betas: tuple[float, float], step: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's 1 - beta1^t and sqrt(1 - beta2^t), 0-d tensors on ``step``'s device.

    Always computed eagerly: in a step the caller compiles, torch 2.14's dynamo keeps a beta
    that a schedule changes (``OneCycleLR`` cycles beta1) at its traced value inside ``pow``,
    which made the update wrong by 25% while the moments stayed right."""
    beta1, beta2 = betas
    return _one_minus_pow(beta1, step), _one_minus_pow(beta2, step).sqrt_()


def _one_minus_pow(beta: float, step: Tensor) -> Tensor:
    """1 - beta^step in ``step``'s fp32 without cancellation, as close as torch's fused Adam
    kernel gets it in double: ``1 - pow(beta, t)`` rounds beta to fp32 first, and 1 - beta keeps
    few of its digits (beta2 = 0.999 at t = 1: 1e-5 relative, the tests' whole tolerance)."""
    if beta == 0.0:
        return torch.ones_like(step)
    return torch.expm1(step * math.log(beta)).neg_()


def lamb_piece_sums(
    weights: list[Tensor], updates: list[Tensor], *, traced: bool = False
) -> Tensor:
    """(2, pieces) fp32 partial sums for LAMB: ||w||², ||u||² (``traced``: inside a graph being
    compiled)."""
    return torch.stack(_piece_dots((weights, weights), (updates, updates), traced=traced))


def lamb_update_(
    weights: list[Tensor],
    updates: list[Tensor],
    piece_ratios: Tensor,
    *,
    lr: float | Tensor,
    mask: Tensor | None,
) -> None:
    """``w -= lr * ratio * u`` per piece, ``piece_ratios`` holding each piece's layer ratio
    (``lamb_ratios``); a no-op where ``mask`` (the decision as a device bool) is False."""
    coefficients = piece_ratios * -lr
    if mask is not None:
        coefficients = torch.where(mask, coefficients, 0.0)
    torch._foreach_addcmul_(weights, updates, list(coefficients.unbind()))


def lars_scales(
    norms: Tensor,
    floor: Tensor,
    *,
    eta: float,
    phi: Tensor | float,
    fallback: Tensor,
    trust_denominator: str,
    weight_decay: float,
    norm_clip: float | None,
) -> Tensor:
    """Per-layer scale ``s`` of the LARS rule (docs/design.md, section 1) from the true norms
    (``norms``: rows ||w|| and ||den||, one column per layer): ``phi * eta * ||w|| / ||den||``
    where both norms are positive and the layer is adapted, else ``fallback`` (a tensor on the
    norms' device: a Python number would be copied there every step).

    ``floor`` (a plan constant) is 0 for adapted layers and +inf for excluded ones, so that one
    comparison ``min(||w||, ||den||) > floor`` tells where the ratio applies. Called on the
    reduced norms, so a rank that holds an empty shard never decides the fallback on its own
    zeros. The trust ratio q itself is ``phi = 1``, ``fallback = 1``.
    """
    weight_norm, den_norm = norms
    if trust_denominator == "sum":  # You et al.: ||g|| + wd*||w||
        den_norm = den_norm + weight_decay * weight_norm
    if norm_clip is not None:
        weight_norm, den_norm = weight_norm.clamp(max=norm_clip), den_norm.clamp(max=norm_clip)
    usable = torch.minimum(weight_norm, den_norm) > floor
    # floor + eta*||w||/||den||: the ratio on adapted layers (floor 0), and +inf or NaN on the
    # excluded ones, which `where` then replaces by the fallback.
    scale = torch.addcdiv(floor, weight_norm, den_norm, value=eta)
    if isinstance(phi, Tensor) or phi != 1.0:
        scale = scale * phi
    return torch.where(usable, scale, fallback)


def lamb_ratios(norms: Tensor, floor: Tensor, one: Tensor, norm_clip: float | None) -> Tensor:
    """Per-layer LAMB ratio ``||w|| / ||u||`` (rows of ``norms``); ``one`` (a 0-d 1.0 on the
    norms' device) where either norm is 0 and for excluded layers (``floor``: as in
    ``lars_scales``)."""
    weight_norm, update_norm = norms
    if norm_clip is not None:
        weight_norm, update_norm = (
            weight_norm.clamp(max=norm_clip),
            update_norm.clamp(max=norm_clip),
        )
    usable = torch.minimum(weight_norm, update_norm) > floor
    return torch.where(usable, weight_norm / update_norm, one)
