"""``LayerwiseOptimizer``: the step that TVLARS, LARS and LAMB share.

Per ``step()`` call (docs/design.md, section 2)::

    plans     = each group's layout and indices            (plan.py; cached)
    mode      = host or device decision, fused or eager   (mode.py; once per step)
    local     = partial sums of squares per layer          (the rule, per group)
    reduce    = one all-reduce per set of ranks, with the decision scalar   (reduction.py)
    decision  = apply / skip (non-finite) / no-op (all zero), alike on every rank of the model
    update    = the rule's update from the true norms, masked by the decision on the device

A rule (``lars.py``, ``lamb.py``) supplies ``_local`` and ``_update`` and says whether it
``decides_first`` (LAMB updates its moments in its local pass, so it decides before it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .. import functional as F
from ..functional import masked as M
from ..fused import FusedStep
from ..groups import ModelGroup, check_model_group, ranks_of, resolve_model_group
from ..layouts import DiscoveryContext, check_layout_name, discover
from ..reduction import reduce_decision, reduce_layer_sums
from ..telemetry import LayerStats
from ..validation import check_flag
from . import plan as plans
from .mode import StepMode, resolve_mode

__all__ = ["Decision", "LayerwiseOptimizer", "Work"]


@dataclass
class Decision:
    """Apply, skip (a non-finite gradient) or no-op (every gradient zero), for the whole model."""

    apply: Tensor  # 0-d bool
    nonfinite: Tensor  # 0-d bool: the step is skipped and counted in skipped_steps
    #: ``apply`` read on the host (a bool), or kept on the device (the tensor itself).
    taken: bool | Tensor
    #: Device path: 0-d fp32, 1.0 where the step does not apply (the fused kernels' found_inf).
    skip: Tensor | None

    @classmethod
    def of(cls, grad_sq: Tensor, mode: StepMode, plan: plans.Plan) -> Decision:
        """The decision on the model's sum of ||g||² (>= 0, inf or NaN)."""
        finite = grad_sq < float("inf")  # isfinite takes four kernels; NaN < inf is False
        apply = finite & (grad_sq > 0)
        if mode.on_host:
            return cls(apply, ~finite, bool(apply), None)
        return cls(apply, ~finite, apply, torch.where(apply, plan.zero, plan.one))


@dataclass
class Work:
    """What one param group carries through a step."""

    group: dict[str, Any]
    plan: plans.Plan
    pieces: plans.Pieces
    #: Whether this group's step runs the masked multi-tensor kernels (``functional.masked``).
    kernels: bool = False
    #: The rule's (2L + 1,) local vector [||w||² per layer, ||den||² per layer, sum ||g||²].
    local: Tensor | None = None
    context: Any = None


class LayerwiseOptimizer(Optimizer):
    """Base class: per-layer norms that stay exact when layers are sharded across ranks."""

    #: Names of the per-parameter state buffers the rule keeps (same shape as the parameter).
    state_buffers: tuple[str, ...] = ()
    #: Whether the rule takes the step's decision before its local pass (it updates state in
    #: place there), at the cost of one more scalar all-reduce over the model group.
    decides_first: bool = False
    #: Read the skip decision on the host: None = for CPU tensors only (the constructor's
    #: ``decide_on_host`` sets it per optimizer).
    decide_on_host: bool | None = None

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        fused: bool = False,
        model_group: Any = None,
        decide_on_host: bool | None = None,
    ) -> None:
        owner = type(self).__name__
        check_flag(owner, "fused", fused)
        if decide_on_host is not None:
            check_flag(owner, "decide_on_host", decide_on_host)
        check_model_group(owner, model_group)
        # Properties of the run, not hyperparameters: kept out of param_groups (and so out of
        # state_dict), so that checkpoints move freely between modes and jobs.
        self.fused = fused
        self.model_group = model_group
        if decide_on_host is not None:
            self.decide_on_host = decide_on_host
        self._model: ModelGroup | bool | None = False  # False: not resolved yet
        self._fused_step = FusedStep(owner) if fused else None
        self._originals: dict[int, weakref.ref] = {}
        # Keyed by (id(group), ids of its tensors): ZeRO-3 steps one group once per sub-group,
        # each time holding a different flat tensor, and each sub-group keeps its own plan.
        self._plans: dict[tuple, plans.Plan] = {}
        self._last_stats: dict[tuple, Callable[[], LayerStats]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ the rule's part
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _sync_group(self, group: dict[str, Any]) -> None:
        """Bring values derived from the group's hyperparameters up to date with edits made in
        ``param_groups`` since the last step (called eagerly, once per group and step)."""

    def _local(self, work: Work, mode: StepMode, decision: Decision | None) -> None:
        """Set ``work.local`` (and any ``work.context`` for ``_update``). ``decision`` is the
        step's decision when the rule ``decides_first``, else None."""
        raise NotImplementedError

    def _update(
        self, work: Work, sums: Tensor, decision: Decision, mode: StepMode
    ) -> tuple[Tensor, Callable[[], Tensor]]:
        """The update from the true per-layer ``sums`` (2, layers), masked where
        ``decision.taken`` is a tensor. Returns the per-layer scale and a function giving the
        trust ratios (telemetry, computed when asked)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ for the rules
    @staticmethod
    def _kernels(mode: StepMode, pieces: plans.Pieces) -> bool:
        """Whether this step runs the masked multi-tensor kernels (``functional.masked``): the
        decision kept on the device, outside a caller's compile (whose graph cannot hold
        torch's fused kernels writing buffers it creates), on a device with torch's fused
        optimizer kernels, and every piece laid out like its weight."""
        if mode.on_host or mode.compiling or not pieces.weights:
            return False
        return all(map(F.kernel_ready, pieces.weights, pieces.grads, *pieces.state.values()))

    @staticmethod
    def _scale_pieces_(mode: StepMode, pieces: list[Tensor], scales: Tensor) -> None:
        """``pieces[i] *= scales[i]``: one compiled graph under ``fused=True``, else one foreach
        call (a kernel per piece on CUDA: ``functional.masked.scale_pieces_``)."""
        if mode.fused is not None:
            mode.fused.scale_(pieces, scales)
        else:
            M.scale_pieces_(pieces, scales)

    @staticmethod
    def _gather(plan: plans.Plan, rows: Tensor) -> Tensor:
        """The (2L + 1,) local vector from per-piece rows [||w||², ||den||², (||g||²)]."""
        flat = rows.to(plan.device).reshape(-1)
        return flat.new_zeros(2 * plan.n_layers + 1).index_add_(0, plan.slots[: flat.numel()], flat)

    @staticmethod
    def _lr(group: dict[str, Any], plan: plans.Plan, mode: StepMode) -> float | Tensor:
        """The learning rate as the step functions take it: a number or the group's tensor on
        the group's device (eager); a 0-d tensor refilled each step (fused, so that a schedule
        does not recompile the graphs)."""
        if mode.fused is not None:
            return mode.fused.scalar(group, "lr", plan.device)
        lr = group["lr"]
        return lr.to(plan.device) if isinstance(lr, Tensor) else lr

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._begin()
        model = self._model_group()
        if not work:  # every group empty (ZeRO-3 between its sub-group steps)
            if model is not None:
                # This rank still takes its part in the decision the other ranks wait for.
                reduce_decision(torch.zeros(()), model)
            return loss
        mode = resolve_mode(self.decide_on_host, self._fused_step, work[0].plan.device)
        for w in work:
            w.kernels = self._kernels(mode, w.pieces)
        decision = None
        if self.decides_first:  # on the gradients alone, before the local pass
            grad_sq = reduce_decision(self._grad_sq(work, mode), model)
            decision = Decision.of(grad_sq, mode, work[0].plan)
            for w in work:  # the rule reads the step it takes (LAMB: bias corrections)
                self._count(w.group, decision)
        sums: list[Tensor | None] = [None] * len(work)
        if decision is None or decision.taken is not False:
            for w in work:
                self._local_or_zeros(w, mode, decision)
            n = [w.plan.n_layers for w in work]
            reduced = reduce_layer_sums(
                [w.local[: 2 * k].view(2, k) for w, k in zip(work, n, strict=True)],
                [w.plan.buckets for w in work],
                model,
                None if decision else _total([w.local[-1] for w in work]),
            )
            decision = decision or Decision.of(reduced.grad_sq_total, mode, work[0].plan)
            sums = reduced.layer_sums
        for w, s in zip(work, sums, strict=True):
            self._finish(w, s, decision, mode)
        return loss

    @staticmethod
    def _grad_sq(work: list[Work], mode: StepMode) -> Tensor:
        """This rank's sum of ||g||² over every piece (0-d fp32, on the first group's device)."""
        squared_norm = F.squared_norm if mode.on_host else M.squared_norm
        sums = [squared_norm(w.pieces.grads) for w in work if w.plan.segments]
        return _total(sums) if sums else work[0].plan.zero

    @staticmethod
    def _count(group: dict[str, Any], decision: Decision) -> None:
        # In place, as torch's optimizers count their steps: a step captured in a CUDA graph
        # advances the tensors its replays read.
        group["step"].add_(decision.apply)
        group["skipped_steps"].add_(decision.nonfinite)

    def _local_or_zeros(self, w: Work, mode: StepMode, decision: Decision | None) -> None:
        if w.plan.segments:
            self._local(w, mode, decision)
        else:  # no local piece has a gradient: this rank adds nothing to the sums
            w.local = torch.zeros(2 * w.plan.n_layers + 1, device=w.plan.device)

    def _finish(self, w: Work, sums: Tensor | None, decision: Decision, mode: StepMode) -> None:
        """The update, the counters and the telemetry of one group. ``sums`` None: the step
        was decided away before the local pass, which keeps the last step's telemetry."""
        group, plan = w.group, w.plan
        if sums is not None:
            if plan.segments and decision.taken is not False:
                scale, ratio = self._update(w, sums, decision, mode)
            else:
                scale = torch.ones(plan.n_layers, device=plan.device)
                ratio = lambda: scale  # noqa: E731
            names = plan.layer_names
            self._last_stats[plans.cache_key(group)] = lambda: _stats(names, sums, ratio(), scale)
        if not self.decides_first:  # phi(t) of this step read the count before it
            self._count(group, decision)
        if plan.layout.counters_owner is not None:
            plans.store_counters(group, self.state[group["params"][plan.layout.counters_owner]])

    # ------------------------------------------------------------------ plans
    # Bookkeeping in Python, run once per step: a step compiled by the caller runs it eagerly
    # (torch 2.9's dynamo cannot trace the writes to the optimizer's own objects).
    @torch.compiler.disable
    def _begin(self) -> list[Work]:
        """Every group that holds parameters, with its plan and pieces for this step. New plans
        allocate their state only once every group is accepted, so that a refused group (a
        sparse gradient) stops the step before any state is allocated."""
        owner, model = type(self).__name__, self._model_group()
        chosen, made = [], []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue  # nothing to step (ZeRO-3 empties the groups it is not stepping)
            self._sync_group(group)
            # A gradient's layout is part of the key: a sparse one is refused whenever it comes.
            key = (
                tuple(map(id, params)),
                tuple(None if p.grad is None else p.grad.layout for p in params),
            )
            plan = self._plans.get(plans.cache_key(group))
            if plan is None or plan.key != key:
                layout = discover(
                    list(params), DiscoveryContext(self, index, group, self._is_original)
                )
                exclude = group["exclude_bias_and_norm"]
                plan = plans.make_plan(owner, key, layout, params, exclude, model)
                made.append((group, plan))
            chosen.append((group, plan))
        for group, plan in made:
            plans.allocate_state(self.state, group["params"], plan.segments, self.state_buffers)
            self._plans[plans.cache_key(group)] = plan
        work = []
        for group, plan in chosen:
            params, owner_index = group["params"], plan.layout.counters_owner
            if owner_index is not None:
                plans.load_counters(group, self.state[params[owner_index]])
            plans.ensure_counters(group, plan.device)
            work.append(
                Work(group, plan, plans.pieces_of(plan, params, self.state, self.state_buffers))
            )
        return work

    def _model_group(self) -> ModelGroup | None:
        """The ranks that take every step's decision together (resolved once)."""
        if self._model is False:
            self._model = resolve_model_group(self.model_group)
        return self._model

    # ------------------------------------------------------------------ param groups
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
            "decide_on_host": self.decide_on_host,
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
        if self.__dict__.get("decide_on_host") is None:
            self.__dict__.pop("decide_on_host", None)  # the class default
        if "fused" in state or "_fused_step" not in self.__dict__:  # unpickled, not reloaded
            self._model = False
            self._fused_step = FusedStep(type(self).__name__) if self.fused else None
        for group in self.param_groups:
            group.setdefault("maximize", False)  # state_dicts saved before the option existed
        for group, indices in zip(self.param_groups, positions or (), strict=False):
            for i in indices:
                p = group["params"][i]
                self._originals[id(p)] = weakref.ref(p)

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the step counters copied: they are updated in place (so that a
        captured step advances them), and a checkpoint keeps the count it was taken at."""
        state = super().state_dict()
        for group in state["param_groups"]:  # torch's own dicts, not the live groups
            for name in plans.COUNTERS:
                if isinstance(group.get(name), Tensor):
                    group[name] = group[name].clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()  # state buffers were replaced: re-create the views
        if self._fused_step is not None:
            self._fused_step.clear()  # so were the param group dicts

    # ------------------------------------------------------------------ telemetry
    def layer_stats(self) -> LayerStats:
        """True per-layer norms and ratios of the last step, on every rank; no host sync."""
        by_group: dict[int, list[Callable[[], LayerStats]]] = {}
        for (group_id, _), stats in self._last_stats.items():
            by_group.setdefault(group_id, []).append(stats)
        return LayerStats.concat([s() for g in self.param_groups for s in by_group.get(id(g), [])])

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped because a gradient was non-finite (a tensor). Every group of a step
        counts the same skip, so this is the largest group count, not their sum."""
        counts = [g["skipped_steps"] for g in self.param_groups if "skipped_steps" in g]
        return torch.stack(counts).max() if counts else torch.zeros(())


def _stats(names: list[str], sums: Tensor, ratio: Tensor, scale: Tensor) -> LayerStats:
    norms = sums.clamp(min=0).sqrt()
    return LayerStats(names, norms[0], norms[1], ratio, scale)


def _total(values: list[Tensor]) -> Tensor:
    """The 0-d sum of ``values`` on the first one's device."""
    total = values[0]
    for value in values[1:]:
        total = total + value.to(total.device)
    return total


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
