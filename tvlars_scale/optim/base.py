"""``LayerwiseOptimizer``: the step that TVLARS, LARS and LAMB share.

Per ``step()`` call (docs/design.md, section 2)::

    work      = each group's plan (plan.py; cached) and this step's local views
    mode      = host or device decision, fused or eager   (mode.py; once per step)
    local     = partial sums of squares per layer          (the rule, per group)
    reduce    = one all-reduce per set of ranks, with the decision scalar   (reduction.py)
    decision  = apply / skip (non-finite) / no-op (all zero), alike on every rank of the model
    update    = the rule's update from the true norms, masked by the decision on the device

A rule (``lars.py``, ``lamb.py``) supplies ``_local`` and ``_update`` and says whether it
``decides_first`` (LAMB updates its moments in its local pass, so it decides before it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import functional as F
from ..fused import FusedStep
from ..groups import ModelGroup, check_model_group, resolve_model_group
from ..layouts import check_layout_name
from ..reduction import reduce_decision, reduce_layer_sums
from ..telemetry import LayerStats
from ..validation import check_flag
from . import plan as plans
from .identity import Originals, check_no_duplicates, portable_model_group
from .loading import check_loadable
from .mode import Decision, StepMode, resolve_mode

__all__ = ["LayerwiseOptimizer", "Work"]


@dataclass
class Work:
    """What one param group carries through a step."""

    group: dict[str, Any]
    plan: plans.Plan
    pieces: plans.Pieces
    #: Whether this group runs the multi-tensor kernels (``StepMode.kernels``).
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
    #: Hyperparameters that groups saved before they existed lack, with the value that steps
    #: as those runs stepped (``load_state_dict`` and unpickling fill them in).
    added_later: ClassVar[Mapping[str, Any]] = MappingProxyType({"maximize": False})

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
            self.decide_on_host = decide_on_host
        check_model_group(owner, model_group)
        # Properties of the run, not hyperparameters: kept out of param_groups (and so out of
        # state_dict), so that checkpoints move freely between modes and jobs.
        self.fused = fused
        self.model_group = model_group
        self._model: ModelGroup | bool | None = False  # False: not resolved yet
        self._fused_step = FusedStep(owner) if fused else None
        self._originals = Originals()
        self._plans = plans.Plans()
        self._last_stats: dict[tuple, Callable[[], LayerStats]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ the rule's part
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_saved_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a saved group whose hyperparameters the rule refuses, and
        change nothing: ``load_state_dict`` asks it of every group before it loads any."""
        self._validate_group(group)

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
        """The update from the true per-layer ``sums`` (2, layers), masked by
        ``decision.skip`` on the device. Returns the per-layer scale and a function giving the
        trust ratios (telemetry, computed when asked)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, model = self._begin(), self._model_group()
        if not work:  # every group empty (ZeRO-3 between its sub-group steps)
            if model is not None:  # this rank still takes its part in the decision
                reduce_decision(torch.zeros(()), model)
            return loss
        mode = resolve_mode(self.decide_on_host, self._fused_step, work[0].plan.device)
        for w in work:
            w.kernels = mode.kernels(w.plan, w.pieces)
        decision = self._decide_first(work, mode, model) if self.decides_first else None
        sums: list[Tensor | None] = [None] * len(work)
        if decision is None or decision.taken is not False:
            sums, decision = self._reduce(work, mode, model, decision)
        for w, s in zip(work, sums, strict=True):
            self._finish(w, s, decision, mode)
        return loss

    def _decide_first(self, work: list[Work], mode: StepMode, model: ModelGroup | None) -> Decision:
        """The decision on the gradients alone (the rule then reads the step it takes, for
        LAMB's bias corrections, from the counters)."""
        local = [
            F.squared_norm(w.pieces.grads, traced=mode.compiling, multi_tensor=w.kernels)
            for w in work
            if w.plan.segments
        ]
        decision = mode.decide(reduce_decision(_total(local, work), model), work[0].plan)
        for w in work:
            _count(w.group, decision)
        return decision

    def _reduce(
        self, work: list[Work], mode: StepMode, model: ModelGroup | None, decision: Decision | None
    ) -> tuple[list[Tensor], Decision]:
        """Every group's local pass, the reduction, and the decision if not taken already."""
        for w in work:
            if w.plan.segments:
                self._local(w, mode, decision)
            else:  # no local piece has a gradient: this rank adds nothing to the sums
                w.local = w.plan.no_pieces()
        reduced = reduce_layer_sums(
            [w.local[: 2 * w.plan.n_layers].view(2, -1) for w in work],
            [w.plan.buckets for w in work],
            model,
            None if decision else _total([w.local[-1] for w in work], work),
        )
        return reduced.layer_sums, decision or mode.decide(reduced.grad_sq_total, work[0].plan)

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
            _count(group, decision)
        if plan.layout.counters_owner is not None:
            plans.store_counters(group, self.state[group["params"][plan.layout.counters_owner]])

    # Bookkeeping in Python, run once per step: a step compiled by the caller runs it eagerly
    # (torch 2.9's dynamo cannot trace the writes to the optimizer's own objects).
    @torch.compiler.disable
    def _begin(self) -> list[Work]:
        """Every group that holds parameters, with its plan, counters and pieces for this step."""
        work = []
        for group, plan in self._plans.for_step(self):
            plans.ensure_counters(group, plan, self.state)
            pieces = plans.pieces_of(plan, group["params"], self.state, self.state_buffers)
            work.append(Work(group, plan, pieces))
        return work

    def _model_group(self) -> ModelGroup | None:
        """The ranks that take every step's decision together (resolved once)."""
        if self._model is False:
            self._model = resolve_model_group(self.model_group)
        return self._model

    # ------------------------------------------------------------------ torch's contract
    def _is_original(self, t: Tensor) -> bool:
        """Whether ``t`` came in through ``add_param_group`` (layout discovery asks)."""
        return t in self._originals

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_no_duplicates(type(self).__name__, len(self.param_groups), param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            check_layout_name(type(self).__name__, group.get("layout"))
        except ValueError:
            self.param_groups.pop()  # as if never added: the optimizer stays usable
            raise
        self._originals.add(group["params"])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # as torch: defaults, state, param_groups; no hooks
        return {
            **state,
            "fused": self.fused,
            "model_group": portable_model_group(self.model_group),
            "decide_on_host": self.decide_on_host,
            "_original_positions": self._originals.positions(self.param_groups),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        positions = state.pop("_original_positions", [])
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", plans.Plans())
        self.__dict__.setdefault("_last_stats", {})
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("model_group", None)
        if self.__dict__.get("decide_on_host") is None:
            self.__dict__.pop("decide_on_host", None)  # the class default
        if "fused" in state or "_fused_step" not in self.__dict__:  # unpickled, not reloaded
            self._model = False
            self._fused_step = FusedStep(type(self).__name__) if self.fused else None
            self._originals = Originals.at(self.param_groups, positions)
        for group in self.param_groups:
            for name, value in self.added_later.items():
                group.setdefault(name, value)

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
        """As torch's, but a state dict that does not fit (another model, optimizer or layout;
        a malformed counter or buffer) is refused before anything changes, naming what does
        not fit (``loading.check_loadable``)."""
        # The last pre-hook: it checks the dict the caller's hooks leave, as torch loads it.
        check = self.register_load_state_dict_pre_hook(check_loadable)
        try:
            super().load_state_dict(state_dict)
        finally:
            check.remove()
        for group in self.param_groups:  # counted in place: never share the caller's tensors
            for name in plans.COUNTERS:
                if isinstance(group.get(name), Tensor):
                    group[name] = group[name].clone()
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


def _count(group: dict[str, Any], decision: Decision) -> None:
    # In place, as torch's optimizers count their steps: a step captured in a CUDA graph
    # advances the tensors its replays read.
    group["step"].add_(decision.apply)
    group["skipped_steps"].add_(decision.nonfinite)


def _total(values: list[Tensor], work: list[Work]) -> Tensor:
    """The 0-d sum of ``values`` on the first group's device (a new 0 for none: the sum is
    all-reduced in place)."""
    if not values:
        return torch.zeros((), device=work[0].plan.device)
    total = values[0]
    for value in values[1:]:
        total = total + value.to(total.device)
    return total


def _stats(names: list[str], sums: Tensor, ratio: Tensor, scale: Tensor) -> LayerStats:
    norms = sums.clamp(min=0).sqrt()
    return LayerStats(names, norms[0], norms[1], ratio, scale)
