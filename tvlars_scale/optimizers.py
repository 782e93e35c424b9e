"""TVLARS, LARS and LAMB: one layer-wise optimizer core, three update rules.

``LayerwiseOptimizer`` owns what the three share:

- lazy layout discovery at ``step()`` time (engines such as accelerate and DeepSpeed rewrite
  ``param_groups`` after construction), cached per group and re-validated by identity;
- the local pass (directions and partial sums of squares), then ONE reduction per set of ranks
  for the whole ``step()`` call (``reduction``), then ratios and the update; a rule that
  updates state in place during its local pass (LAMB) takes the step's decision first;
- the per-group step counter (``group["step"]``, in ``state_dict``), the skip rule (a step
  whose gradients are all zero changes nothing; a step with a non-finite gradient is skipped and
  counted in ``group["skipped_steps"]``), taken alike by every rank of the model group (data,
  tensor and pipeline parallel ranks together: ``model_group``), and telemetry.

docs/design.md describes the rule, the layout protocol, the reduction and the decision.

A subclass supplies two functions: ``_directions`` (local, before the reduction) and ``_apply``
(after it), and says whether it ``decides_first``. The math itself lives in ``functional``;
with ``fused=True`` the same functions run compiled (``fused``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .fused import FusedStep
from .groups import ModelGroup, check_model_group, ranks_of, resolve_model_group
from .layouts import (
    DiscoveryContext,
    GroupLayout,
    Segment,
    UnmappableLayoutError,
    check_layout_name,
    discover,
)
from .reduction import Bucket, reduce_decision, reduce_layer_sums
from .schedules import (
    DEFAULT_DELAY_FRACTION,
    DEFAULT_FINAL_FACTOR,
    TVLARSSchedule,
    check_schedule,
    check_start,
)
from .telemetry import LayerStats
from .validation import check_choice, check_flag, check_lr, check_real

__all__ = ["LAMB", "LARS", "TVLARS", "LayerwiseOptimizer"]

TRUST_DENOMINATORS = ("combined", "sum")
PRESETS = {
    # opt/tvlars.py of the authors' repository at its last version: phi = 1/(0.1 + e^{lmbda(t+1)}),
    # both norms clamped to 10, phi inside the ratio, excluded layers without phi.
    "official": dict(
        alpha=0.1, delay_steps=-1, gamma_min=0.0, norm_clip=10.0, phi_on_excluded=False
    ),
}


@dataclass
class _Plan:
    """A group's layout, restricted to the pieces that have gradients this step."""

    key: tuple
    layout: GroupLayout
    segments: list[Segment]  # adapted pieces first, then excluded ones
    n_adapted: int
    piece_layer: Tensor  # (pieces,) long: the layer of each piece
    excluded: Tensor  # (layers,) bool
    buckets: list[Bucket]
    device: torch.device
    layer_names: list[str]
    #: How ``fused=True`` cuts these pieces into compiled buckets (``FusedStep``).
    fused_cache: dict = field(default_factory=dict)


@dataclass
class _GroupWork:
    """What one param group carries from the local pass to the update pass of a step."""

    group: dict[str, Any]
    plan: _Plan
    pieces: _Pieces
    context: Any = None
    partial: Tensor | None = None  # (2, layers): local ||w||², ||den||² per layer


@dataclass
class _Decision:
    """Apply, skip (a non-finite gradient) or no-op (every gradient zero), for the whole model."""

    finite: Tensor  # 0-d bool
    apply: Tensor  # 0-d bool
    #: ``apply`` read on the host (a bool), or kept on the device (the tensor itself).
    taken: bool | Tensor


@dataclass
class _Pieces:
    """Local views for one step: weights, gradients and the rule's state buffers."""

    weights: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor]]


class LayerwiseOptimizer(Optimizer):
    """Base class: per-layer norms that stay exact when layers are sharded across ranks."""

    #: Names of the per-parameter state buffers the rule keeps (same shape as the parameter).
    state_buffers: tuple[str, ...] = ()
    #: Whether the rule takes the step's decision before its local pass (it updates state in
    #: place there), at the cost of one more scalar all-reduce over the model group.
    decides_first: bool = False
    #: Whether to read the skip decision on the host: None = only for CPU tensors (free there).
    #: False forces the masked device path that accelerators use (tests set it on CPU).
    decide_on_host: bool | None = None

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        fused: bool = False,
        model_group: Any = None,
    ) -> None:
        check_flag(type(self).__name__, "fused", fused)
        check_model_group(type(self).__name__, model_group)
        # An implementation choice, not a hyperparameter: kept out of param_groups (and so out
        # of state_dict), so that checkpoints move freely between the fused and eager steps.
        self.fused = fused
        # Like `fused`, a property of the run, not of the checkpoint. Resolved at the first step.
        self.model_group = model_group
        self._model: ModelGroup | bool | None = False  # False: not resolved yet
        self._fused_step = FusedStep(type(self).__name__) if fused else None
        self._originals: dict[int, weakref.ref] = {}
        # Keyed by (id(group), ids of its tensors): ZeRO-3 steps one group once per sub-group,
        # each time holding a different flat tensor, and each sub-group keeps its own plan.
        self._plans: dict[tuple, _Plan] = {}
        self._last_stats: dict[tuple, LayerStats] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _sync_group(self, group: dict[str, Any]) -> None:
        """Bring values derived from the group's hyperparameters up to date with edits made
        in ``param_groups`` since the last step (called eagerly, once per group and step)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_no_duplicates(type(self).__name__, len(self.param_groups), param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            check_layout_name(type(self).__name__, group.get("layout"))
        except ValueError:
            self.param_groups.pop()  # as if never added: the optimizer stays usable
            raise
        for p in group["params"]:
            self._remember_original(p)

    def _remember_original(self, p: Tensor) -> None:
        self._originals[id(p)] = weakref.ref(p)

    def _is_original(self, t: Tensor) -> bool:
        ref = self._originals.get(id(t))
        return ref is not None and ref() is t

    # Which tensors of ``param_groups`` came in through ``add_param_group`` (rather than being
    # swapped in later by an engine: DeepSpeed's flat partitions) is part of the optimizer's
    # state, and must survive copy.deepcopy and pickle like the rest of it. The identity cache
    # that answers it cannot be copied (ids and weak references belong to this process), so the
    # copy carries it as positions in param_groups and rebuilds it for its own tensors.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # as torch: defaults, state, param_groups; no hooks
        originals = [
            [i for i, p in enumerate(g["params"]) if self._is_original(p)]
            for g in self.param_groups
        ]
        return {
            **state,
            "fused": self.fused,
            "model_group": _portable_model_group(self.model_group),
            "_original_positions": originals,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        positions = state.pop("_original_positions", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_originals", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_last_stats", {})
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("model_group", None)
        if "fused" in state or "_fused_step" not in self.__dict__:  # unpickled, not reloaded
            self._model = False
            self._fused_step = FusedStep(type(self).__name__) if self.fused else None
        for group in self.param_groups:
            group.setdefault("maximize", False)  # state_dicts saved before the option existed
        for group, indices in zip(self.param_groups, positions or (), strict=False):
            for i in indices:
                self._remember_original(group["params"][i])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()  # state buffers were replaced: re-create the views
        if self._fused_step is not None:
            self._fused_step.clear()  # so were the param group dicts

    # ------------------------------------------------------------------ discovery
    # Bookkeeping in Python, run once per step: a step compiled by the caller runs it eagerly
    # (torch 2.9's dynamo cannot trace the writes to the optimizer's own objects).
    @torch.compiler.disable
    def _step_plans(self) -> list[tuple[dict[str, Any], _Plan]]:
        """Every group that holds parameters, with its plan for this step's gradients. New
        plans allocate their state only once every group is accepted, so that a refused group
        (a sparse gradient, ``_make_plan``) stops the step before any state is allocated."""
        plans, made = [], []
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue  # nothing to step (ZeRO-3 empties the groups it is not stepping)
            self._sync_group(group)
            # A gradient's layout is part of the key, so that a sparse one is refused whenever
            # it appears.
            layouts = tuple(None if p.grad is None else p.grad.layout for p in params)
            key = (tuple(map(id, params)), layouts)
            plan = self._plans.get(_cache_key(group))
            if plan is None or plan.key != key:
                ctx = DiscoveryContext(self, group_index, group, self._is_original)
                plan = self._make_plan(key, discover(list(params), ctx), group)
                made.append((group, plan))
            plans.append((group, plan))
        for group, plan in made:
            self._allocate_state(group["params"], plan.segments)
            self._plans[_cache_key(group)] = plan
        return plans

    def _make_plan(self, key: tuple, layout: GroupLayout, group: dict[str, Any]) -> _Plan:
        params = group["params"]
        exclude = group["exclude_bias_and_norm"]
        excluded = [exclude and layer.ndim <= 1 for layer in layout.layers]

        def local_numel(seg: Segment) -> int:
            return (
                seg.numel if seg.start is not None else layout.to_local(params[seg.tensor]).numel()
            )

        active = [
            s for s in layout.segments if params[s.tensor].grad is not None and local_numel(s) > 0
        ]
        for s in active:
            grad = params[s.tensor].grad
            if grad.layout != torch.strided:  # torch's Adam refuses them too
                raise RuntimeError(
                    f"{type(self).__name__}: layer {layout.layers[s.layer].name!r} has a "
                    f"{grad.layout} gradient; layer-wise trust ratios need dense gradients "
                    "(for nn.Embedding / nn.EmbeddingBag, build it with sparse=False)"
                )
        adapted = [s for s in active if not excluded[s.layer]]
        segments = adapted + [s for s in active if excluded[s.layer]]

        device = _group_device(params, layout)
        buckets = self._buckets(layout, device)
        return _Plan(
            key=key,
            layout=layout,
            segments=segments,
            n_adapted=len(adapted),
            piece_layer=torch.tensor([s.layer for s in segments], dtype=torch.long, device=device),
            excluded=torch.tensor(excluded, dtype=torch.bool, device=device),
            buckets=buckets,
            device=device,
            layer_names=[layer.name for layer in layout.layers],
        )

    def _allocate_state(self, params: list[Tensor], segments: list[Segment]) -> None:
        for i in sorted({s.tensor for s in segments}):
            state = self.state[params[i]]
            for name in self.state_buffers:
                if name not in state:
                    state[name] = torch.zeros_like(params[i], memory_format=torch.preserve_format)

    def _model_group(self) -> ModelGroup | None:
        """The ranks that take every step's decision together (resolved once)."""
        if self._model is False:
            self._model = resolve_model_group(self.model_group)
        return self._model

    def _buckets(self, layout: GroupLayout, device: torch.device) -> list[Bucket]:
        """The layout's layers by the ranks they are reduced over, which must lie within the
        model group (else a rank outside it would hold a piece of the model)."""
        model = self._model_group()
        by_ranks: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        for index, layer in enumerate(layout.layers):
            group = layer.reduce_group
            ranks = ranks_of(group) if group is not None else ()
            if len(ranks) == 1:
                ranks, group = (), None
            if ranks and (model is None or not set(ranks) <= set(model.ranks)):
                raise UnmappableLayoutError(
                    f"{type(self).__name__}: layer {layer.name!r} is split over ranks {ranks}, "
                    f"but model_group spans {model.ranks if model else 'this rank only'}. Pass "
                    "a model_group holding every rank that trains this model (None: the world)."
                )
            by_ranks.setdefault(ranks, (group, []))[1].append(index)
        return [
            Bucket(ranks, group, torch.tensor(layers, dtype=torch.long, device=device))
            for ranks, (group, layers) in by_ranks.items()
        ]

    def _pieces(self, group: dict[str, Any], plan: _Plan) -> _Pieces:
        params = group["params"]
        pieces = plan.layout.local_pieces
        held = [self.state[p] if p.grad is not None else None for p in params]
        return _Pieces(
            weights=pieces(params, plan.segments),
            grads=pieces([p.grad for p in params], plan.segments, grads=True),
            state={
                name: pieces([s.get(name) if s is not None else None for s in held], plan.segments)
                for name in self.state_buffers
            },
        )

    # ------------------------------------------------------------------ the step
    @property
    def _fusing(self) -> bool:
        return self._fused_step is not None and not self._fused_step.disabled

    def _lr(self, group: dict[str, Any], plan: _Plan) -> float | Tensor:
        """The learning rate as the step functions take it: a float or the group's tensor on the
        group's device (eager), always a 0-d tensor (fused, so that a schedule does not
        recompile the graph)."""
        if self._fusing:
            return self._fused_step.scalar(group, "lr", plan.device)
        lr = group["lr"]
        return lr.to(plan.device) if isinstance(lr, Tensor) else lr

    def _directions(self, group, plan: _Plan, pieces: _Pieces, apply) -> tuple[Tensor, Any]:
        """Local work before the reduction: returns per-piece sums of squares, rows ||w||² and
        ||den||² (and ||g||² unless the rule ``decides_first``), and a context for ``_apply``.
        ``apply`` is the decision when the rule ``decides_first`` (True or a device bool
        tensor), else None."""
        raise NotImplementedError

    def _apply(self, group, plan: _Plan, pieces: _Pieces, context, norms: Tensor, apply):
        """Update after the reduction. ``norms`` is (2, layers); ``apply`` is True or a device
        bool tensor (the update must then be a no-op where it is False). Returns the per-layer
        (trust ratio, scale)."""
        raise NotImplementedError

    def _decide(self, grad_sq: Tensor) -> _Decision:
        finite = torch.isfinite(grad_sq)
        apply = finite & (grad_sq > 0)
        # CPU tensors have no device queue to drain, so reading the decision costs nothing and
        # spares the masking passes; on accelerators it stays a tensor (no host sync).
        on_host = self.decide_on_host
        if on_host is None:
            on_host = apply.device.type == "cpu"
        return _Decision(finite, apply, bool(apply) if on_host else apply)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for group, plan in self._step_plans():
            if plan.layout.counters_owner is not None:
                _load_counters(group, self.state[group["params"][plan.layout.counters_owner]])
            _ensure_counters(group, plan.device)
            work.append(_GroupWork(group, plan, self._pieces(group, plan)))

        model = self._model_group()
        if not work:  # every group empty (ZeRO-3 between its sub-group steps)
            if model is not None:
                # This rank still takes its part in the decision (the scalar all-reduce over
                # the model group that every rule makes): the other ranks are waiting for it.
                reduce_decision(torch.zeros(()), model)
            return loss
        decision = None
        if self.decides_first:  # on the gradients alone, before the local pass
            grads = [F.squared_norm(w.pieces.grads) for w in work if w.plan.segments]
            decision = self._decide(reduce_decision(_total(grads, work[0].plan.device), model))
        layer_sums: list[Tensor | None] = [None] * len(work)
        if decision is None or decision.taken is not False:
            grad_sq = self._local_pass(work, decision)
            reduced = reduce_layer_sums(
                [w.partial for w in work], [w.plan.buckets for w in work], model, grad_sq
            )
            decision = decision or self._decide(reduced.grad_sq_total)
            layer_sums = reduced.layer_sums
        for w, sums in zip(work, layer_sums, strict=True):
            self._finish(w, sums, decision)
        return loss

    def _local_pass(self, work: list[_GroupWork], decision: _Decision | None) -> Tensor | None:
        """Every group's partial sums per layer; returns this rank's sum of ||g||² when the
        decision is still to be taken (else None)."""
        grad_sq = []
        for w in work:
            w.partial = torch.zeros(2, len(w.plan.layout.layers), device=w.plan.device)
            if w.plan.segments:
                taken = None if decision is None else decision.taken
                sums, w.context = self._directions(w.group, w.plan, w.pieces, taken)
                sums = sums.to(w.plan.device)
                w.partial.index_add_(1, w.plan.piece_layer, sums[:2])
                if decision is None:
                    grad_sq.append(sums[2].sum())
        return None if decision is not None else _total(grad_sq, work[0].plan.device)

    def _finish(self, w: _GroupWork, sums: Tensor | None, decision: _Decision) -> None:
        """The update from the true layer ``sums`` (None: the step was decided away before the
        local pass, which leaves the last step's telemetry), the counters and the telemetry."""
        group = w.group
        if sums is not None:
            norms = sums.clamp(min=0).sqrt()
            if w.plan.segments and decision.taken is not False:
                ratio, scale = self._apply(
                    group, w.plan, w.pieces, w.context, norms, decision.taken
                )
            else:
                ratio = scale = torch.ones_like(norms[0])
            self._last_stats[_cache_key(group)] = LayerStats(
                names=w.plan.layer_names,
                weight_norm=norms[0],
                grad_norm=norms[1],
                trust_ratio=ratio,
                scale=scale,
            )
        # Replaced, not updated in place: a state_dict taken earlier keeps its value.
        group["step"] = group["step"] + decision.apply.to(group["step"].dtype)
        skipped = (~decision.finite).to(group["step"].dtype)
        group["skipped_steps"] = group["skipped_steps"] + skipped
        if w.plan.layout.counters_owner is not None:
            _store_counters(group, self.state[group["params"][w.plan.layout.counters_owner]])

    # ------------------------------------------------------------------ telemetry
    def layer_stats(self) -> LayerStats:
        """True per-layer norms and ratios of the last step, on every rank; no host sync."""
        stats_by_group: dict[int, list[LayerStats]] = {}
        for (group_id, _), stats in self._last_stats.items():
            stats_by_group.setdefault(group_id, []).append(stats)
        return LayerStats.concat(
            [s for g in self.param_groups for s in stats_by_group.get(id(g), [])]
        )

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped because a gradient was non-finite (a tensor). Every group of a step
        counts the same skip, so this is the largest group count, not their sum."""
        counts = [g["skipped_steps"] for g in self.param_groups if "skipped_steps" in g]
        return torch.stack(counts).max() if counts else torch.zeros(())


def _total(values: list[Tensor], device: torch.device) -> Tensor:
    """The 0-d sum of ``values`` on ``device`` (0 for none)."""
    total = torch.zeros((), device=device)
    for value in values:
        total = total + value.to(device)
    return total


def _group_device(params, layout: GroupLayout) -> torch.device:
    for p in params:
        return layout.to_local(p).device
    return torch.device("cpu")


def _cache_key(group: dict[str, Any]) -> tuple:
    return id(group), tuple(map(id, group["params"]))


def _portable_model_group(spec: Any) -> Any:
    """``model_group`` as a copy or a pickle can hold it: a process group or a device mesh belongs
    to this process, so its global ranks are kept (``resolve_model_group`` takes a tuple)."""
    if isinstance(spec, dist.ProcessGroup):
        return ranks_of(spec)
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(spec, DeviceMesh):
        return tuple(sorted(spec.mesh.flatten().tolist()))
    return spec


def _check_no_duplicates(owner: str, index: int, param_group: Any) -> None:
    """A tensor listed twice in a group would be stepped twice and counted twice in its layer's
    norm. torch only warns (and says it will raise); we raise now, as torch does for a tensor
    in two groups. Anything else malformed is left to torch's own checks."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        return
    params = param_group["params"]
    if isinstance(params, (Tensor, set)):
        return
    params = param_group["params"] = list(params)  # may be a generator (torch does the same)
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        t = p[1] if isinstance(p, tuple) else p
        j = first.setdefault(id(t), i)
        if j != i:
            raise ValueError(
                f"{owner}: param group {index} holds the same tensor twice (params[{j}] and "
                f"params[{i}]); each parameter must appear once in an optimizer"
            )


_COUNTERS = ("step", "skipped_steps")


def _load_counters(group: dict[str, Any], owner_state: dict[str, Any]) -> None:
    """Counters kept in a tensor's state (``GroupLayout.counters_owner``) drive this step."""
    for name in _COUNTERS:
        group[name] = owner_state.get(name, 0)


def _store_counters(group: dict[str, Any], owner_state: dict[str, Any]) -> None:
    for name in _COUNTERS:
        owner_state[name] = group[name]


def _ensure_counters(group: dict[str, Any], device: torch.device) -> None:
    for name in _COUNTERS:
        value = group.get(name)
        if not isinstance(value, Tensor):
            group[name] = torch.tensor(float(value or 0), dtype=torch.float32, device=device)
        elif value.device != device:
            group[name] = value.to(device)


class _LarsFamily(LayerwiseOptimizer):
    """The LARS rule with a time-varying factor phi(t); LARS is phi = 1."""

    state_buffers = ("momentum_buffer",)
    _name = "LARS"

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

    def _directions(self, group, plan, pieces, apply):
        lists = [pieces.weights, pieces.grads]
        options = (group["trust_denominator"], group["maximize"])
        if self._fusing:
            decay = self._fused_step.scalar(group, "weight_decay", plan.device)
            sums = self._fused_step.piece_sums(
                F.lars_piece_sums, plan.fused_cache, lists, plan.n_adapted, decay, *options
            )
        else:
            sums = F.lars_piece_sums(*lists, plan.n_adapted, group["weight_decay"], *options)
        return sums, None

    def _apply(self, group, plan, pieces, context, norms, apply):
        ratio, scale, piece_scales = F.lars_piece_scales(
            norms,
            plan.excluded,
            plan.piece_layer,
            eta=group["eta"],
            phi=self._phi(group),
            phi_on_excluded=group.get("phi_on_excluded", False),
            phi_in_ratio=group.get("preset") == "official",
            norm_clip=group["norm_clip"],
            trust_denominator=group["trust_denominator"],
            weight_decay=group["weight_decay"],
            apply=apply,
        )
        lists = [pieces.weights, pieces.state["momentum_buffer"], pieces.grads]
        kwargs = dict(nesterov=group["nesterov"], apply=apply, maximize=group["maximize"])
        # Decided on the host, lars_apply_ is already one pass (torch's fused SGD kernel); a
        # decision kept on the device masks a chain of foreach passes, which fusing compiles.
        if self._fusing and apply is not True:
            numbers = {
                name: self._fused_step.scalar(group, name, plan.device)
                for name in ("momentum", "weight_decay", "lr")
            }
            self._fused_step.apply_(
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
                lr=self._lr(group, plan),
                **kwargs,
            )
        return ratio, scale


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
        super().__init__(params, defaults, fused=fused, model_group=model_group)


_TVLARS_DEFAULTS = dict(alpha=1.0, gamma_min=0.0, norm_clip=None, phi_on_excluded=True)
#: The paper's per-step description of the decay, and the description over a run.
_PER_STEP = ("lmbda", "delay_steps")
_OVER_RUN = ("total_steps", "delay_fraction", "final_factor")
_DEFAULT_LMBDA = 1e-3


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

    The decay is given one of two ways (per param group; mixing them is refused):

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

    _name = "TVLARS"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta: float = 1e-3,
        lmbda: float | None = None,
        delay_steps: float | None = None,
        alpha: float = 1.0,
        gamma_min: float = 0.0,
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
            for name, value in given.items():
                if value != _TVLARS_DEFAULTS.get(name) and value != fixed[name]:
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
        #: Per group: its description of the decay as last validated (``_sync_group``).
        self._described: dict[int, tuple] = {}
        super().__init__(params, defaults, fused=fused, model_group=model_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_flag("TVLARS", "phi_on_excluded", group["phi_on_excluded"])
        _validate_decay(group)
        self._remember_decay(group)

    def _remember_decay(self, group: dict[str, Any]) -> None:
        self._described[id(group)] = (group, *_decay_of(group))

    def _sync_group(self, group: dict[str, Any]) -> None:
        """An edit of the decay in ``param_groups`` takes effect at the next step, as an edited
        ``lr`` does. A group described over the run (``total_steps`` set) derives ``lmbda`` and
        ``delay_steps`` again from its description; values edited by hand since the last step
        must agree with it, as at construction. A group this optimizer has not validated yet
        (loaded by ``load_state_dict``, copied, unpickled, or a replaced dict) is validated
        the same way, its description over the run taking precedence."""
        seen = self._described.get(id(group))
        known = seen is not None and seen[0] is group
        if known and seen[1:] == _decay_of(group):
            return
        before = dict(group)
        if group["total_steps"] is not None:
            for i, name in enumerate(_PER_STEP):
                if not known or group[name] == seen[2][i]:  # not edited by hand: derive it
                    group[name] = None
        try:
            _validate_decay(group)
        except ValueError:
            group.update(before)  # the optimizer stays as it was
            raise
        self._remember_decay(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._described = {}  # the next step validates every group (``_sync_group``)
        for group in self.param_groups:
            for name in _OVER_RUN:  # state_dicts saved before the run description existed
                group.setdefault(name, None)

    def _phi(self, group: dict[str, Any]) -> Tensor:
        return F.tvlars_factor(
            group["step"], group["lmbda"], group["delay_steps"], group["alpha"], group["gamma_min"]
        )


def _decay_of(group: dict[str, Any]) -> tuple[tuple, tuple]:
    """The group's description of the decay: over the run (with alpha, gamma_min), per step."""
    return (
        tuple(group[name] for name in (*_OVER_RUN, "alpha", "gamma_min")),
        tuple(group[name] for name in _PER_STEP),
    )


def _validate_decay(group: dict[str, Any]) -> None:
    check_real("TVLARS", "alpha", group["alpha"], low=0.0)
    check_real("TVLARS", "gamma_min", group["gamma_min"], low=0.0)
    _resolve_decay(group)
    check_real("TVLARS", "lmbda", group["lmbda"], low=0.0)
    check_real("TVLARS", "delay_steps", group["delay_steps"])
    check_start("TVLARS", group["lmbda"], group["delay_steps"], group["alpha"])
    for name in ("alpha", "gamma_min", *_PER_STEP):
        # Python numbers: numpy ones would fail ``torch.load(weights_only=True)`` of a state_dict
        if type(group[name]) not in (int, float):
            group[name] = float(group[name])


def _resolve_decay(group: dict[str, Any]) -> None:
    """Fill the group's ``lmbda`` and ``delay_steps`` (what phi reads) from whichever
    description it was given, refusing a mixture that disagrees."""
    if group["total_steps"] is None:
        for name in ("delay_fraction", "final_factor"):
            if group[name] is not None:
                raise ValueError(
                    f"TVLARS: {name}={group[name]!r} describes phi over a run and needs "
                    "total_steps (the run's optimizer steps); give total_steps too, or describe "
                    "the decay per step with lmbda and delay_steps"
                )
        if group["lmbda"] is None:
            group["lmbda"] = _DEFAULT_LMBDA
        if group["delay_steps"] is None:
            group["delay_steps"] = 0
        return
    if group["preset"] is not None:
        raise ValueError(
            f"TVLARS: preset={group['preset']!r} fixes delay_steps and takes the per-step "
            f"lmbda; it cannot be combined with total_steps={group['total_steps']!r}. Drop "
            "the preset or total_steps."
        )
    if group["delay_fraction"] is None:
        group["delay_fraction"] = DEFAULT_DELAY_FRACTION
    if group["final_factor"] is None:
        group["final_factor"] = DEFAULT_FINAL_FACTOR
    described = {name: group[name] for name in _OVER_RUN}
    check_schedule("TVLARS", **described, alpha=group["alpha"], gamma_min=group["gamma_min"])
    schedule = TVLARSSchedule(**described, alpha=group["alpha"], gamma_min=group["gamma_min"])
    for name in _OVER_RUN:
        group[name] = getattr(schedule, name)  # as Python numbers
    for name in _PER_STEP:
        derived = getattr(schedule, name)
        given = group[name]
        # Agreement up to rounding: the caller may have computed the value in another order.
        if given is not None and not (
            isinstance(given, Real) and math.isclose(given, derived, rel_tol=1e-9, abs_tol=1e-12)
        ):
            over_run = ", ".join(f"{k}={v!r}" for k, v in described.items())
            raise ValueError(
                f"TVLARS: {name}={group[name]!r} contradicts {over_run}, which give "
                f"{name}={derived!r}. Describe the decay one way: lmbda and delay_steps (per "
                "optimizer step) or total_steps, delay_fraction and final_factor (over the run)."
            )
        group[name] = derived


class LAMB(LayerwiseOptimizer):
    r"""LAMB (You et al. 2020) with bias correction and exact layer-wise trust ratios.

    Per logical layer: Adam moments m, v (bias-corrected), u = m̂/(sqrt(v̂)+eps) + wd*w
    (no decay for excluded layers), ratio = ||w||/||u|| (1 if a norm is 0, and 1 for
    excluded layers), w -= lr * ratio * u.

    DeepSpeed maps any spelling of "lamb" in a JSON to its own FusedLamb; to get this one from a
    DeepSpeed JSON write ``"type": "LayerwiseLAMB"``.

    The step decides whether it applies *before* it touches the moments (one more scalar
    all-reduce over ``model_group`` when that spans several ranks), so that Adam's moments and
    the direction u come from one in-place pass of torch's fused Adam kernel; nothing is left to
    compile, and ``fused=True`` runs the same step.

    Args:
        params: parameters or param groups.
        lr: learning rate, a number or a one-element tensor (as for ``LARS``). Default 1e-3:
            the trust ratio makes an adapted layer move by ``lr`` times its norm per step, so
            this is the same 0.1% relative step as ``LARS``' default (and timm's LAMB default).
        betas: coefficients of the running averages of g and g², each in [0, 1).
        eps: added to sqrt(v̂), > 0.
        weight_decay: L2 weight decay added to the update of adapted layers.
        exclude_bias_and_norm, norm_clip, maximize, fused, model_group: as for ``LARS``.
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
        super().__init__(params, defaults, fused=fused, model_group=model_group)

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

    def _directions(self, group, plan, pieces, apply):
        updates = F.lamb_directions_(
            pieces.weights,
            pieces.grads,
            pieces.state["exp_avg"],
            pieces.state["exp_avg_sq"],
            plan.n_adapted,
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=group["step"] + 1,
            apply=apply,
            maximize=group["maximize"],
        )
        return F.lamb_piece_sums(pieces.weights, updates), updates

    def _apply(self, group, plan, pieces, context, norms, apply):
        return F.lamb_update_(
            pieces.weights,
            context,
            norms,
            plan.excluded,
            plan.piece_layer,
            lr=self._lr(group, plan),
            norm_clip=group["norm_clip"],
            apply=apply,
        )
