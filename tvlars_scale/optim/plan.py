"""Plans: what one param group's step works on, made at its first step and cached.

A plan holds the group's layout (``tvlars_scale.layouts``), restricted to the pieces that have
gradients, and every index the step needs on the device, built once so that a step copies
nothing from the host. It is rebuilt when the group's tensors change, or how they or their
gradients are laid out (``_laid_out``). This module also
allocates the rules' state, takes the local views of a step, and keeps the step counters;
making plans, it warns (once per optimizer) of layers held in a dtype too coarse for their steps.

Pieces of adapted layers come first, then those of excluded layers (biases, norm gains), so
that the rules slice them apart with no index.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..errors import UnmappableLayoutError
from ..groups import ModelGroup, ranks_of
from ..layouts import DiscoveryContext, GroupLayout, Segment, discover
from ..reduction import Bucket

__all__ = [
    "Pieces",
    "Plan",
    "Plans",
    "allocate_state",
    "ensure_counters",
    "make_plan",
    "pieces_of",
    "store_counters",
    "warn_coarse",
]

COUNTERS = ("step", "skipped_steps")
#: Parameter dtypes whose spacing is near a layer-wise step (``warn_coarse``).
COARSE_DTYPES = (torch.bfloat16, torch.float16)
#: What ``Plan.many_small_pieces`` counts as many pieces, and as small (elements on average).
MANY_PIECES, SMALL_PIECE = 256, 4096


@dataclass
class Plan:
    """A group's layout, restricted to the pieces that have gradients this step."""

    key: tuple
    layout: GroupLayout
    segments: list[Segment]  # the local pieces: adapted ones first, then excluded ones
    n_adapted: int
    piece_layer: Tensor  # (pieces,) long: the layer of each piece
    excluded: Tensor  # (layers,) bool
    #: (layers,) fp32: 0 for adapted layers, +inf for excluded ones (``functional.lars_scales``).
    floor: Tensor
    #: Where each norm of [w of every piece, den of every piece, g of every piece] goes in the
    #: local vector [||w||² per layer, ||den||² per layer, sum of ||g||²] (``norm_sums``).
    slots: Tensor
    #: 0-d zeros, one per entry of that local vector (views of a buffer that stays zero).
    sum_zeros: list[Tensor]
    #: 0-d fp32 constants 0 and 1 on the device: a Python number in a tensor expression is
    #: copied to the device every time.
    zero: Tensor
    one: Tensor
    buckets: list[Bucket]
    device: torch.device
    layer_names: list[str]
    #: Every piece is a whole real tensor held as it is (single process, DDP, pipeline
    #: stages): its local views are the tensors themselves, taken with no per-piece work.
    whole: bool
    #: Hundreds of pieces of a few thousand elements or fewer on average: decided on the host,
    #: such a group runs the multi-tensor kernels too. The host path's per-piece passes (a BLAS
    #: dot each, a fused SGD call per layer) read large pieces fewer times, but cost ~6 us of
    #: Python and dispatch per piece, which dominates there (benchmarks/RESULTS.md, tiny1000).
    many_small_pieces: bool
    #: Whether the pieces (weights, gradients, state) suit torch's fused kernels: one dtype,
    #: laid out alike (``functional.kernel_ready``). Found at the first step that asks (the
    #: state exists by then); what it depends on is in ``key``.
    kernel_ready: bool | None = None
    #: Zero pieces shaped like the excluded ones (the partners of their gradients in
    #: ``functional.masked.lars_directions``), made at the first device step that needs them.
    zeros: list[Tensor] | None = None
    #: How ``fused=True`` cuts these pieces into compiled buckets (``FusedStep``).
    fused_cache: dict = field(default_factory=dict)
    #: Adapted layers this rank holds in a dtype too coarse for their steps, by dtype.
    coarse_layers: dict[torch.dtype, int] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layout.layers)

    def gather(self, rows: Tensor) -> Tensor:
        """The (2L + 1,) local vector from per-piece rows [||w||², ||den||², (||g||²)]."""
        flat = rows.to(self.device).reshape(-1)
        zeros = flat.new_zeros(2 * self.n_layers + 1)
        return zeros.index_add_(0, self.slots[: flat.numel()], flat)

    def no_pieces(self) -> Tensor:
        """The local vector of a rank whose pieces have no gradient: it adds nothing."""
        return torch.zeros(2 * self.n_layers + 1, device=self.device)


@dataclass
class Pieces:
    """Local views for one step: weights, gradients and the rule's state buffers."""

    weights: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor]]


class Plans:
    """Each param group's plan, made at its first step and kept while its tensors, and which of
    them have gradients, stay the same. Keyed by (id(group), ids of its tensors): ZeRO-3 steps
    one group once per sub-group, each time holding a different flat tensor, and each sub-group
    keeps its own plan."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Plan] = {}
        self._warned_coarse = False  # once per optimizer: kept by ``clear``

    def clear(self) -> None:
        """Forget every plan (state buffers or param groups were replaced)."""
        self._by_key.clear()

    def values(self):
        """The plans made so far (which layouts the groups were mapped to, say)."""
        return self._by_key.values()

    def for_step(self, optimizer: Any) -> list[tuple[dict[str, Any], Plan]]:
        """Every group of ``optimizer`` (a ``LayerwiseOptimizer``) that holds parameters, with
        its plan for this step's gradients. New plans allocate their state only once every
        group is accepted, so that a refused group (a sparse gradient) stops the step before
        any state is allocated."""
        chosen, made = [], []
        for index, group in enumerate(optimizer.param_groups):
            params = group["params"]
            if not params:
                continue  # nothing to step (ZeRO-3 empties the groups it is not stepping)
            optimizer._sync_group(group)
            key = (tuple(map(id, params)), tuple(map(_laid_out, params)))
            plan = self._by_key.get(cache_key(group))
            if plan is None or plan.key != key:
                ctx = DiscoveryContext(optimizer, index, group, optimizer._is_original)
                plan = make_plan(
                    type(optimizer).__name__,
                    key,
                    discover(list(params), ctx),
                    params,
                    group["exclude_bias_and_norm"],
                    optimizer._model_group(),
                )
                made.append((group, plan))
            chosen.append((group, plan))
        for group, plan in made:
            allocate_state(optimizer.state, group["params"], plan.segments, optimizer.state_buffers)
            self._by_key[cache_key(group)] = plan
        if made and not self._warned_coarse:
            self._warned_coarse = warn_coarse(type(optimizer).__name__, [p for _, p in made])
        return chosen


def warn_coarse(owner: str, made: list[Plan]) -> bool:
    """Warn if ``made`` holds adapted layers in bfloat16 or float16 (the tensors the optimizer
    steps: engines that keep float32 masters hand it those); whether it warned."""
    counts: dict[torch.dtype, int] = {}
    for plan in made:
        for dtype, n in plan.coarse_layers.items():
            counts[dtype] = counts.get(dtype, 0) + n
    if not counts:
        return False
    total = sum(counts.values())
    if len(counts) == 1:
        held = f"held in {next(iter(counts))}"
    else:
        held = "held in low precision (" + ", ".join(f"{n} in {d}" for d, n in counts.items()) + ")"
    # An update below half the spacing of neighbouring values rounds away: eps/2 relative.
    spacing = "; ".join(f"in {d}, one below {torch.finfo(d).eps / 2:.1e}" for d in counts)
    warnings.warn(
        f"{owner}: {total} layer{'s' if total > 1 else ''} with a trust ratio "
        f"{'are' if total > 1 else 'is'} {held}, with no float32 master copy. A layer-wise step "
        "moves a layer by about lr*eta ~ 1e-3 of its norm, and an update smaller than half the "
        f"spacing between neighbouring values rounds away ({spacing} of the element's "
        "magnitude, at worst): much of each step is lost. Keep the parameters "
        "in float32 and compute in low precision: torch.autocast, FSDP2's "
        "MixedPrecisionPolicy(param_dtype=torch.bfloat16) over float32 parameters, or "
        "DeepSpeed's bf16 (which steps float32 masters). accelerate 1.13's FSDP2 upcast to "
        "float32 silently did nothing (huggingface/accelerate#3979): check the dtype of the "
        "tensors the optimizer holds.",
        UserWarning,
        stacklevel=_outside_stacklevel(),
    )
    return True


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside this package and torch (the line that
    called ``step()``), for its caller."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "tvlars_scale",
        "torch",
    ):
        frame, level = frame.f_back, level + 1
    return level


def _laid_out(p: Tensor) -> tuple:
    """What a plan holds for ``p`` besides its identity: its dtype and strides, which
    ``model.to(...)`` may change in place (``p.data = ...``, leaving the state laid out as
    before), and its gradient's layout (a sparse one is refused whenever it comes), dtype and
    strides (which decide whether torch's fused kernels can take the piece), and a DTensor
    gradient's placements (which its layout checks against the parameter's)."""
    g = p.grad
    if g is None:
        return p.dtype, p.stride(), None
    strides = g.stride() if g.layout == torch.strided else ()
    placements = g.placements if isinstance(g, DTensor) else None
    return p.dtype, p.stride(), g.layout, g.dtype, strides, placements


def make_plan(
    owner: str,
    key: tuple,
    layout: GroupLayout,
    params: list[Tensor],
    exclude_bias_and_norm: bool,
    model: ModelGroup | None,
) -> Plan:
    """The plan of one group for the gradients it holds now. Raises ``RuntimeError`` for a
    sparse gradient and ``UnmappableLayoutError`` for a layer split over ranks outside
    ``model`` (the ranks that take the step's decision)."""
    excluded = [exclude_bias_and_norm and layer.ndim <= 1 for layer in layout.layers]

    def local_numel(seg: Segment) -> int:
        if seg.start is not None:
            return seg.numel
        return layout.to_local(params[seg.tensor]).numel()

    active = [
        s for s in layout.segments if params[s.tensor].grad is not None and local_numel(s) > 0
    ]
    for s in active:
        if params[s.tensor].grad.layout != torch.strided:  # torch's Adam refuses them too
            raise RuntimeError(
                f"{owner}: layer {layout.layers[s.layer].name!r} has a "
                f"{params[s.tensor].grad.layout} gradient; layer-wise trust ratios need dense "
                "gradients (for nn.Embedding / nn.EmbeddingBag, build it with sparse=False)"
            )
    segments = [s for s in active if not excluded[s.layer]]
    n_adapted = len(segments)
    segments += [s for s in active if excluded[s.layer]]
    device = _group_device(params, layout)
    coarse: dict[torch.dtype, set[int]] = {}
    for s in layout.segments:
        if not excluded[s.layer] and params[s.tensor].dtype in COARSE_DTYPES:
            coarse.setdefault(params[s.tensor].dtype, set()).add(s.layer)
    n_layers, layer_of = len(layout.layers), [s.layer for s in segments]
    total = 2 * n_layers
    slots = layer_of + [n_layers + i for i in layer_of] + [total] * len(segments)
    return Plan(
        key=key,
        layout=layout,
        segments=segments,
        n_adapted=n_adapted,
        piece_layer=torch.tensor(layer_of, dtype=torch.long, device=device),
        excluded=torch.tensor(excluded, dtype=torch.bool, device=device),
        floor=torch.tensor([float("inf") if e else 0.0 for e in excluded], device=device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        sum_zeros=list(torch.zeros(total + 1, device=device).unbind()),
        zero=torch.zeros((), device=device),
        one=torch.ones((), device=device),
        buckets=_buckets(owner, layout, device, model),
        device=device,
        layer_names=[layer.name for layer in layout.layers],
        whole=layout.whole_tensors and not any(params[s.tensor].is_complex() for s in segments),
        many_small_pieces=len(segments) >= MANY_PIECES
        and sum(map(local_numel, segments)) <= SMALL_PIECE * len(segments),
        coarse_layers={dtype: len(layers) for dtype, layers in coarse.items()},
    )


def _buckets(
    owner: str, layout: GroupLayout, device: torch.device, model: ModelGroup | None
) -> list[Bucket]:
    """The layout's layers by the ranks they are reduced over (and the stage: a TP slice
    sharded again is reduced over its shard group, then over its TP group), which must lie
    within the model group (else a rank outside it would hold a piece of the model)."""
    by_key: dict[tuple[int, tuple[int, ...]], tuple[Any, list[int]]] = {}
    for index, layer in enumerate(layout.layers):
        for stage, group in enumerate((layer.reduce_group, layer.tp_group)):
            ranks = ranks_of(group) if group is not None else ()
            if len(ranks) <= 1:
                continue
            if model is None or not set(ranks) <= set(model.ranks):
                raise UnmappableLayoutError(
                    f"{owner}: layer {layer.name!r} is split over ranks {ranks}, but model_group "
                    f"spans {model.ranks if model else 'this rank only'}. Pass a model_group "
                    "holding every rank that trains this model (None: the world)."
                )
            by_key.setdefault((stage, ranks), (group, []))[1].append(index)
    return [
        Bucket(ranks, group, torch.tensor(layers, dtype=torch.long, device=device), stage)
        for (stage, ranks), (group, layers) in by_key.items()
    ]


def allocate_state(
    state: dict, params: list[Tensor], segments: list[Segment], names: tuple[str, ...]
) -> None:
    """Zero state buffers ``names`` (laid out like their parameter) for every tensor with a
    piece in ``segments`` that has none yet."""
    for i in sorted({s.tensor for s in segments}):
        held = state[params[i]]
        for name in names:
            if name not in held:
                held[name] = torch.zeros_like(params[i], memory_format=torch.preserve_format)


def pieces_of(plan: Plan, params: list[Tensor], state: dict, names: tuple[str, ...]) -> Pieces:
    """The local views of this step's weights, gradients and state buffers ``names``."""
    if plan.whole:
        index = [s.tensor for s in plan.segments]
        held = [state[params[i]] for i in index]
        return Pieces(
            weights=[params[i] for i in index],
            grads=[params[i].grad for i in index],
            state={name: [s[name] for s in held] for name in names},
        )
    local = plan.layout.local_pieces
    held = [state[p] if p.grad is not None else None for p in params]
    return Pieces(
        weights=local(params, plan.segments),
        grads=local(params, plan.segments, grads=True),
        state={
            name: local([s.get(name) if s is not None else None for s in held], plan.segments)
            for name in names
        },
    )


def zero_partners(plan: Plan, pieces: Pieces) -> list[Tensor]:
    """Per piece, what multiplies the weight decay in ``lars_directions``: the weight of an
    adapted piece, a zero piece shaped like the gradient of an excluded one (made once per
    plan)."""
    if plan.zeros is None:
        plan.zeros = _zeros_like(pieces.grads[plan.n_adapted :])
    return pieces.weights[: plan.n_adapted] + plan.zeros


def _zeros_like(tensors: list[Tensor]) -> list[Tensor]:
    """Contiguous zero tensors shaped like ``tensors``: views of one buffer per dtype and
    device, so that a model's many biases cost one allocation."""
    sizes: dict[tuple, int] = {}
    for t in tensors:
        sizes[(t.dtype, t.device)] = sizes.get((t.dtype, t.device), 0) + t.numel()
    buffers = {kind: torch.zeros(n, dtype=kind[0], device=kind[1]) for kind, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in tensors:
        kind, start = (t.dtype, t.device), offsets[(t.dtype, t.device)]
        views.append(buffers[kind][start : start + t.numel()].view(t.shape))
        offsets[kind] = start + t.numel()
    return views


def _group_device(params: list[Tensor], layout: GroupLayout) -> torch.device:
    for p in params:
        return layout.to_local(p).device
    return torch.device("cpu")


def cache_key(group: dict[str, Any]) -> tuple:
    return id(group), tuple(map(id, group["params"]))


# ---------------------------------------------------------------------- counters
def ensure_counters(group: dict[str, Any], plan: Plan, state: dict) -> None:
    """The group's counters for this step, as 0-d fp32 tensors on the plan's device: from the
    state of ``plan.layout.counters_owner`` when the engine keeps them there (ZeRO-3 steps one
    group once per sub-group), else from the group (a loaded state_dict may hold numbers, or
    tensors elsewhere)."""
    owner = plan.layout.counters_owner
    if owner is not None:
        held = state[group["params"][owner]]
        for name in COUNTERS:  # a copy: counted in place, and the state may be a checkpoint's
            value = held.get(name, 0)
            group[name] = value.clone() if isinstance(value, Tensor) else value
    for name in COUNTERS:
        value = group.get(name)
        if not isinstance(value, Tensor):
            group[name] = torch.tensor(float(value or 0), dtype=torch.float32, device=plan.device)
        elif value.device != plan.device:
            group[name] = value.to(plan.device)


def store_counters(group: dict[str, Any], owner_state: dict[str, Any]) -> None:
    """Hand this step's counters back to the tensor state that keeps them."""
    for name in COUNTERS:
        owner_state[name] = group[name]
