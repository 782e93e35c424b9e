"""LAMB (You et al. 2020): Adam's direction with a layer-wise trust ratio, exact under sharding.

LAMB updates Adam's moments in place during its local pass, so it takes the step's decision
first (``decides_first``; docs/design.md, section 2).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as F
from ..functional import masked as M
from ..validation import check_flag, check_lr, check_real
from .base import LayerwiseOptimizer, Work
from .mode import Decision, StepMode

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    r"""LAMB (You et al. 2020) with bias correction and exact layer-wise trust ratios.

    Per logical layer: Adam moments m, v (bias-corrected), u = m̂/(sqrt(v̂)+eps) + wd*w
    (no decay for excluded layers), ratio = ||w||/||u|| (1 if a norm is 0, and 1 for
    excluded layers), w -= lr * ratio * u.

    DeepSpeed maps any spelling of "lamb" in a JSON to its own FusedLamb; to get this one from a
    DeepSpeed JSON write ``"type": "LayerwiseLAMB"``.

    The step decides whether it applies *before* it touches the moments (one more scalar
    all-reduce over ``model_group`` when that spans several ranks), so that Adam's moments and
    the direction u come from one in-place pass of torch's fused Adam kernel. Decided on the
    host, nothing is left to compile and ``fused=True`` runs the same step; kept on the device,
    ``fused=True`` compiles the one per-piece operation (u scaled by its layer's ratio), as for
    ``LARS``.

    Args:
        params: parameters or param groups.
        lr: learning rate, a number or a one-element tensor (as for ``LARS``). Default 1e-3:
            the trust ratio makes an adapted layer move by ``lr`` times its norm per step, so
            this is the same 0.1% relative step as ``LARS``' default (and timm's LAMB default).
        betas: coefficients of the running averages of g and g², each in [0, 1).
        eps: added to sqrt(v̂), > 0.
        weight_decay: L2 weight decay added to the update of adapted layers.
        exclude_bias_and_norm, norm_clip, maximize, fused, model_group, decide_on_host: as for
            ``LARS``.
    """

    state_buffers = ("exp_avg", "exp_avg_sq")
    # Adam's moments are updated in place by the local pass, so the decision comes first.
    decides_first = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 5e-4,
        exclude_bias_and_norm: bool = True,
        norm_clip: float | None = None,
        *,
        maximize: bool = False,
        fused: bool = False,
        model_group: Any = None,
        decide_on_host: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            exclude_bias_and_norm=exclude_bias_and_norm,
            norm_clip=norm_clip,
            maximize=maximize,
        )
        super().__init__(
            params, defaults, fused=fused, model_group=model_group, decide_on_host=decide_on_host
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr("LAMB", group["lr"])
        check_flag("LAMB", "maximize", group["maximize"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"LAMB: invalid betas={betas!r}; expected a pair (beta1, beta2)")
        check_real("LAMB", "betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
        check_real("LAMB", "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
        check_real("LAMB", "eps", group["eps"], low=0.0, low_open=True)
        check_real("LAMB", "weight_decay", group["weight_decay"], low=0.0)
        check_real("LAMB", "norm_clip", group["norm_clip"], low=0.0, low_open=True, allow_none=True)
        check_flag("LAMB", "exclude_bias_and_norm", group["exclude_bias_and_norm"])

    def _local(self, work: Work, mode: StepMode, decision: Decision) -> None:
        group, plan, pieces = work.group, work.plan, work.pieces
        moments = (pieces.state["exp_avg"], pieces.state["exp_avg_sq"])
        options = dict(
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=group["step"],  # counted already (LAMB decides first): 1-based
            maximize=group["maximize"],
        )
        if work.kernels:
            work.context = updates = M.lamb_directions_(
                pieces.weights,
                pieces.grads,
                *moments,
                plan.n_adapted,
                skip=decision.skip,
                **options,
            )
            tensors = [*pieces.weights, *updates]
            work.local = M.norm_sums(tensors, plan.slots[: len(tensors)], plan.sum_zeros)
            return
        work.context = updates = F.lamb_directions_(
            pieces.weights,
            pieces.grads,
            *moments,
            plan.n_adapted,
            mask=decision.mask,
            traced=mode.compiling,
            **options,
        )
        work.local = plan.gather(F.lamb_piece_sums(pieces.weights, updates, traced=mode.compiling))

    def _update(self, work, sums, decision, mode):
        plan, pieces, updates = work.plan, work.pieces, work.context
        ratio = F.lamb_ratios(sums.sqrt(), plan.floor, plan.one, work.group["norm_clip"])
        lr = mode.lr(work.group, plan.device)
        piece_ratios = ratio.index_select(0, plan.piece_layer)
        if work.kernels:
            mode.scale_pieces_(updates, piece_ratios)
            M.step_update_(
                pieces.weights,
                updates,
                [],
                decision.skip,
                lr=lr,
                momentum=0.0,
                nesterov=False,
                maximize=False,
            )
        else:
            F.lamb_update_(pieces.weights, updates, piece_ratios, lr=lr, mask=decision.mask)
        return ratio, lambda: ratio
