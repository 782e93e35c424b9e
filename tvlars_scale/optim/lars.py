"""The LARS rule, and TVLARS: LARS with a time-varying factor phi(t) on every layer's step.

Per logical layer k (docs/design.md, section 1)::

    d_k = g_k + wd * w_k                  (no decay for excluded layers)
    s_k = phi(t) * eta * ||w_k|| / ||d_k||  (phi(t) or 1 for excluded layers and zero norms)
    m_k = momentum * m_k + s_k * d_k ;  w_k -= lr * m_k

LARS is phi = 1. The rule has two local passes, one per decision path (``mode.py``): the masked
multi-tensor kernels of ``functional.masked`` (the device path), and the host path of
``functional`` (CPU), which reads the scales and runs torch's fused SGD kernel unmasked; the
foreach passes of ``functional`` serve a step the caller compiles and devices or layouts the
kernels do not take.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..functional import masked as M
from ..schedules import TVLARSPhi
from ..validation import check_choice, check_flag, check_lr, check_real
from .base import LayerwiseOptimizer, Work
from .mode import Decision, StepMode
from .plan import zero_partners

__all__ = ["LARS", "PRESETS", "TRUST_DENOMINATORS", "TVLARS"]

TRUST_DENOMINATORS = ("combined", "sum")
PRESETS = {
    # opt/tvlars.py of the authors' repository at its last version: phi = 1/(0.1 + e^{lmbda(t+1)}),
    # both norms clamped to 10, phi inside the ratio, excluded layers without phi.
    "official": dict(
        alpha=0.1, delay_steps=-1, gamma_min=0.0, norm_clip=10.0, phi_on_excluded=False
    ),
}


class _LarsFamily(LayerwiseOptimizer):
    """The LARS rule with a time-varying factor phi(t); LARS is phi = 1."""

    state_buffers = ("momentum_buffer",)

    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_lr(owner, group["lr"])
        check_flag(owner, "maximize", group["maximize"])
        check_real(owner, "momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_real(owner, "weight_decay", group["weight_decay"], low=0.0)
        check_real(owner, "eta", group["eta"], low=0.0, low_open=True)
        check_real(owner, "norm_clip", group["norm_clip"], low=0.0, low_open=True, allow_none=True)
        check_choice(owner, "trust_denominator", group["trust_denominator"], TRUST_DENOMINATORS)
        check_flag(owner, "nesterov", group["nesterov"])
        check_flag(owner, "exclude_bias_and_norm", group["exclude_bias_and_norm"])
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError(f"{owner}: nesterov=True requires momentum > 0 (got momentum=0)")

    def _phi(self, group: dict[str, Any]) -> Tensor | float:
        return 1.0

    def _local(self, work: Work, mode: StepMode, decision: Decision | None) -> None:
        group, plan, pieces = work.group, work.plan, work.pieces
        if work.kernels:
            # d = g + wd*w, the one temporary; its norms, and those of w and g, in one pass
            work.context = directions = M.lars_directions(
                pieces.grads, zero_partners(plan, pieces), group["weight_decay"], group["maximize"]
            )
            den = directions if group["trust_denominator"] == "combined" else pieces.grads
            work.local = M.norm_sums(
                [*pieces.weights, *den, *pieces.grads], plan.slots, plan.sum_zeros
            )
            return
        lists = [pieces.weights, pieces.grads]
        options = (group["trust_denominator"], group["maximize"])
        if mode.fused is not None:
            decay = mode.fused.scalar(group, "weight_decay", plan.device)
            sums = mode.fused.piece_sums(
                F.lars_piece_sums, plan.fused_cache, lists, plan.n_adapted, decay, *options
            )
        else:
            sums = F.lars_piece_sums(
                *lists, plan.n_adapted, group["weight_decay"], *options, traced=mode.compiling
            )
        work.local = plan.gather(sums)

    def _update(self, work, sums, decision, mode):
        group, plan = work.group, work.plan
        options = dict(
            eta=group["eta"],
            trust_denominator=group["trust_denominator"],
            weight_decay=group["weight_decay"],
            norm_clip=group["norm_clip"],
        )
        norms, phi = sums.sqrt(), self._phi(group)  # sums of squares: >= 0
        scale = F.lars_scales(
            norms, plan.floor, phi=phi, fallback=self._fallback(group, plan, phi), **options
        )
        (self._apply_kernels if work.kernels else self._apply_passes)(work, scale, decision, mode)
        return scale, lambda: F.lars_scales(
            norms, plan.floor, phi=1.0, fallback=plan.one, **options
        )

    @staticmethod
    def _apply_kernels(work: Work, scale: Tensor, decision: Decision, mode: StepMode) -> None:
        """d *= s per piece; m = mu*m + d; w -= lr*m, masked by ``decision.skip``."""
        group, plan, directions = work.group, work.plan, work.context
        mode.scale_pieces_(directions, scale.index_select(0, plan.piece_layer))
        momenta = work.pieces.state["momentum_buffer"] if group["momentum"] else []
        M.step_update_(
            work.pieces.weights,
            directions,
            momenta,  # torch's kernel takes none at momentum 0
            decision.skip,
            lr=mode.lr(group, plan.device),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )

    @staticmethod
    def _apply_passes(work: Work, scale: Tensor, decision: Decision, mode: StepMode) -> None:
        """The update over the pieces the kernels do not take: decided on the host, torch's
        fused SGD kernel per distinct scale (one pass); kept on the device, a chain of masked
        foreach passes, which ``fused=True`` compiles."""
        group, plan, pieces = work.group, work.plan, work.pieces
        mask = decision.mask
        masked = scale if mask is None else scale * mask
        piece_scales = list(masked.index_select(0, plan.piece_layer).unbind())
        lists = [pieces.weights, pieces.state["momentum_buffer"], pieces.grads]
        kwargs = dict(nesterov=group["nesterov"], mask=mask, maximize=group["maximize"])
        if mode.fused is not None and mask is not None:
            numbers = {
                name: mode.fused.scalar(group, name, plan.device)
                for name in ("momentum", "weight_decay", "lr")
            }
            mode.fused.apply_(
                F.lars_apply_,
                plan.fused_cache,
                lists,
                plan.n_adapted,
                piece_scales,
                **numbers,
                **kwargs,
            )
        else:
            F.lars_apply_(
                *lists,
                plan.n_adapted,
                piece_scales,
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                lr=mode.lr(group, plan.device),
                traced=mode.compiling,
                **kwargs,
            )

    @staticmethod
    def _fallback(group: dict[str, Any], plan, phi: Tensor | float) -> Tensor:
        """The scale where the ratio does not apply: phi for an adapted layer with a zero norm
        (1 under ``preset="official"``, whose phi sits inside the ratio), and phi or 1 for an
        excluded layer (``phi_on_excluded``)."""
        phi = phi if isinstance(phi, Tensor) else plan.one  # LARS: phi = 1
        adapted = plan.one if group.get("preset") == "official" else phi
        excluded = phi if group.get("phi_on_excluded", False) else plan.one
        return adapted if adapted is excluded else torch.where(plan.excluded, excluded, adapted)


class LARS(_LarsFamily):
    r"""LARS (You et al.) with momentum, as in barlowtwins / the TVLARS authors' baseline.

    Per logical layer k: d = g + wd*w (no decay for excluded 1-D layers),
    q = eta*||w||/||d|| (1 if a norm is 0), m = momentum*m + q*d, w -= lr*m.
    Norms are exact when the layer is sharded (see ``tvlars_scale.layouts``).

    Args:
        params: parameters or param groups.
        lr: learning rate, a number or a one-element tensor (which LR schedulers update in
            place; with ``fused=True`` changing it recompiles nothing). Default 1.0: with the
            default ``eta=1e-3`` an adapted layer moves by about ``lr * eta`` = 0.1% of its
            norm per step (as under ``LAMB``'s default); it is also the smallest target LR of
            the paper's grid (batch 512). Scale it yourself, e.g. with
            ``schedules.sqrt_scaled_lr``.
        momentum: momentum factor in [0, 1).
        weight_decay: L2 weight decay added to the gradient of adapted layers.
        eta: LARS coefficient, > 0.
        exclude_bias_and_norm: give 1-D parameters (biases, norm gains; ORIGINAL shape under
            sharding) no weight decay and no trust ratio.
        trust_denominator: ``"combined"`` = ||g + wd*w|| (default, barlowtwins and the authors'
            code) or ``"sum"`` = ||g|| + wd*||w|| (You et al., Eq. 2 of the paper).
        norm_clip: clamp both norms to [0, norm_clip] before the ratio; None disables.
        nesterov: Nesterov momentum.
        maximize: maximize the objective (step along +g), as ``torch.optim.SGD``.
        fused: compile the step with ``torch.compile`` (two passes over the parameters instead
            of one per operation; same math, see ``tvlars_scale.fused`` and docs/fused.md). The
            first step pays the compilation; falls back to the eager step with a warning if
            compilation fails.
        model_group: the ranks that train this model together (data, tensor and pipeline
            parallel ranks alike), which take every step's apply/skip decision together and
            keep equal step counters. None (default): every rank of the job, when
            ``torch.distributed`` is initialised. Else a ``ProcessGroup`` or a ``DeviceMesh``
            (all of its ranks), e.g. when one job trains several models on disjoint ranks.
            Costs at most one scalar all-reduce per step, none when a layer's norms are
            already reduced over exactly these ranks (docs/design.md).
        decide_on_host: read each step's apply/skip decision on the host (True), or keep it a
            device tensor and mask the update (False: no host sync, a fixed number of
            multi-tensor kernels per step, capturable in a CUDA graph). None (default): on the
            host for CPU tensors only, where reading it is free. A step the caller compiles
            keeps it a tensor either way (a host read would break the caller's graph).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta: float = 1e-3,
        exclude_bias_and_norm: bool = True,
        trust_denominator: str = "combined",
        norm_clip: float | None = None,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        fused: bool = False,
        model_group: Any = None,
        decide_on_host: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            exclude_bias_and_norm=exclude_bias_and_norm,
            trust_denominator=trust_denominator,
            norm_clip=norm_clip,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(
            params, defaults, fused=fused, model_group=model_group, decide_on_host=decide_on_host
        )


class TVLARS(_LarsFamily):
    r"""Time-Varying LARS (Do et al., "Revisiting LARS for Large Batch Training Generalization").

    LARS whose per-layer step is multiplied by a decaying factor, so training starts at the
    target LR with no warm-up::

        phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min
        s_k    = phi(t) * eta * ||w_k|| / ||d_k||      (adapted layers)
               = phi(t) if phi_on_excluded else 1      (excluded 1-D layers)
        m_k    = momentum * m_k + s_k * d_k ;  w_k -= lr * m_k

    ``t`` counts optimizer steps taken by the param group (``group["step"]``, saved in
    ``state_dict`` so a resumed run continues phi exactly).

    The decay is given one of two ways (per param group, each resolved by
    ``schedules.TVLARSPhi``; mixing them is refused):

    - **over the run** (recommended): ``total_steps``, ``delay_fraction`` and ``final_factor``
      (``schedules.TVLARSSchedule``): phi is centred at ``delay_fraction`` of the run and
      reaches ``final_factor`` at ``total_steps``, so the same three numbers give the same phi
      at the same fraction of training at every batch size. ``lmbda`` and ``delay_steps`` are
      derived from them and stored in the group.
    - **per step** (the paper's): ``lmbda`` and ``delay_steps`` count optimizer steps, so the
      same ``lmbda`` decays faster in epochs at small batch sizes (more steps per epoch). The
      paper gives the delay in epochs (multiply by steps per epoch) and sweeps lmbda in
      1e-6..1e-2 per step.

    Default 1.0 for ``lr``, as for ``LARS``: the paper's smallest target LR (batch 512); with the
    default alpha, phi(0) = 1/2 halves it at the start.

    Args (beyond ``LARS``):
        lmbda: decay coefficient lambda per optimizer step, >= 0. Default: 1e-3, or derived
            from ``total_steps`` when that is given (an explicit value must then equal it).
        delay_steps: optimizer steps before the decay centre (may be negative). Default: 0, or
            ``delay_fraction * total_steps``.
        alpha: >= 0; phi(-inf) = 1/alpha + gamma_min, so alpha = 1 starts at ~target LR / 2
            for small lmbda * delay_steps and alpha < 1 raises the initial factor.
        gamma_min: floor of phi, >= 0.
        phi_on_excluded: also scale excluded layers' step by phi.
        preset: ``"official"`` reproduces ``opt/tvlars.py`` of the authors' code (alpha=0.1,
            delay_steps=-1, gamma_min=0, norm_clip=10, phi_on_excluded=False, and phi inside the
            ratio, so the zero-norm fallback is s = 1). It fixes those five arguments, so it
            takes the per-step description only.
        total_steps: optimizer steps of the run, an integer in [1, 2**24] (keyword only).
            Setting it selects the description over the run.
        delay_fraction: the decay centre as a fraction of the run, in [0, 1); default 0.1 (the
            paper's 10 of 100 epochs). Needs ``total_steps``.
        final_factor: phi at ``total_steps``, in (gamma_min, gamma_min + 1/(alpha + 1));
            default 0.05. Needs ``total_steps``.

    Raises:
        ValueError: at construction (or ``add_param_group``), naming the argument, its value and
            what is allowed; also for ``delay_fraction``/``final_factor`` without
            ``total_steps``, for ``lmbda``/``delay_steps`` that contradict ``total_steps``
            (beyond rounding), for ``preset`` with ``total_steps``, and for a phi(0) that
            overflows float32 (``alpha = 0`` with a long delay). ``step()`` raises the same
            after an edit of ``param_groups`` that contradicts itself.

    The decay may be edited in ``param_groups`` during training, as ``lr`` may: after an edit
    of ``total_steps``, ``delay_fraction``, ``final_factor``, ``alpha`` or ``gamma_min``, the
    next step derives ``lmbda`` and ``delay_steps`` again.

    Example::

        # the same phi at every global batch size: T = epochs * steps per epoch
        optimizer = TVLARS(model.parameters(), lr=4.0, total_steps=T, final_factor=0.05)
    """

    #: Groups saved before the decay could be described over the run lack that description.
    added_later = MappingProxyType(
        {**LayerwiseOptimizer.added_later, **dict.fromkeys(TVLARSPhi.OVER_RUN)}
    )

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta: float = 1e-3,
        lmbda: float | None = None,
        delay_steps: float | None = None,
        alpha: float = TVLARSPhi.DEFAULT_ALPHA,
        gamma_min: float = TVLARSPhi.DEFAULT_GAMMA_MIN,
        exclude_bias_and_norm: bool = True,
        phi_on_excluded: bool = True,
        trust_denominator: str = "combined",
        norm_clip: float | None = None,
        nesterov: bool = False,
        preset: str | None = None,
        *,
        total_steps: int | None = None,
        delay_fraction: float | None = None,
        final_factor: float | None = None,
        maximize: bool = False,
        fused: bool = False,
        model_group: Any = None,
        decide_on_host: bool | None = None,
    ) -> None:
        check_choice("TVLARS", "preset", preset, [None, *PRESETS])
        chosen = dict(
            alpha=alpha,
            gamma_min=gamma_min,
            norm_clip=norm_clip,
            phi_on_excluded=phi_on_excluded,
        )
        if preset is not None:
            fixed = PRESETS[preset]
            given = dict(chosen, delay_steps=delay_steps)
            # This signature's defaults (delay_steps: None) stand for "not given".
            unset = dict(
                alpha=TVLARSPhi.DEFAULT_ALPHA,
                gamma_min=TVLARSPhi.DEFAULT_GAMMA_MIN,
                norm_clip=None,
                phi_on_excluded=True,
                delay_steps=None,
            )
            for name, value in given.items():
                if value != unset[name] and value != fixed[name]:
                    raise ValueError(
                        f"TVLARS: preset={preset!r} fixes {name}={fixed[name]!r}; "
                        f"got {name}={value!r}. Drop the argument or the preset."
                    )
            chosen = dict(fixed)
            delay_steps = chosen.pop("delay_steps")
        # The decay stays as given (None: not given) in the defaults, and each param group
        # resolves its own (``_validate_group``), so a group may describe it either way.
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            lmbda=lmbda,
            delay_steps=delay_steps,
            total_steps=total_steps,
            delay_fraction=delay_fraction,
            final_factor=final_factor,
            exclude_bias_and_norm=exclude_bias_and_norm,
            trust_denominator=trust_denominator,
            nesterov=nesterov,
            preset=preset,
            maximize=maximize,
            **chosen,
        )
        #: Per group: (the group, its description of the decay as last resolved).
        self._described: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        super().__init__(
            params, defaults, fused=fused, model_group=model_group, decide_on_host=decide_on_host
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_flag("TVLARS", "phi_on_excluded", group["phi_on_excluded"])
        self._resolve_decay(group)

    def _check_saved_group(self, group: dict[str, Any]) -> None:
        # As the first step after the load resolves the decay (``_sync_group``), kept nowhere.
        super()._validate_group(group)
        check_flag("TVLARS", "phi_on_excluded", group["phi_on_excluded"])
        derive = TVLARSPhi.PER_STEP if group["total_steps"] is not None else ()
        TVLARSPhi.from_group(group, derive=derive)

    def _resolve_decay(self, group: dict[str, Any], derive: tuple[str, ...] = ()) -> None:
        """Resolve the group's description of the decay (``TVLARSPhi``; the fields in
        ``derive`` derived again) into the group. Refused, it leaves the group as it was."""
        TVLARSPhi.from_group(group, derive=derive).store(group)
        self._described[id(group)] = (group, TVLARSPhi.described_by(group))

    def _sync_group(self, group: dict[str, Any]) -> None:
        """An edit of the decay in ``param_groups`` takes effect at the next step, as an edited
        ``lr`` does. A group described over the run (``total_steps`` set) derives ``lmbda`` and
        ``delay_steps`` again from its description; values edited by hand since the last step
        must agree with it, as at construction. A group this optimizer has not validated yet
        (loaded by ``load_state_dict``, copied, unpickled, or a replaced dict) is validated
        the same way, its description over the run taking precedence."""
        seen = self._described.get(id(group))
        known = seen is not None and seen[0] is group
        now = TVLARSPhi.described_by(group)
        if known and now == seen[1]:
            return
        derive = ()
        if group["total_steps"] is not None:  # derive the values not edited by hand
            derive = tuple(n for n in TVLARSPhi.PER_STEP if not known or now[n] == seen[1][n])
        self._resolve_decay(group, derive)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._described = {}  # the next step validates every group (``_sync_group``)

    def _phi(self, group: dict[str, Any]) -> Tensor:
        # phi of the values ``TVLARSPhi`` resolved into the group, read from the group itself
        # (no object per step: a step the caller compiles traces this).
        return F.tvlars_factor(
            group["step"], group["lmbda"], group["delay_steps"], group["alpha"], group["gamma_min"]
        )
