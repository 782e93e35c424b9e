"""DeepSpeed with tensor parallelism: the TP slices among a DeepSpeed layout's layers.

A Megatron-style model (an ``mpu`` handed to ``deepspeed.initialize``) or DeepSpeed's AutoTP
(whose ``mpu`` is ``deepspeed.utils.groups``) holds each rank's TP slice as a plain tensor, tagged
(``layouts.tensor_parallel``; the tags live on the model's parameter, not on the fp32 master);
ZeRO then partitions the slice over the data-parallel group only. Such a layer's sums are
completed over the ZeRO group (the slice's), then over the engine's TP group (the layer's):
``Layer.tp_group``.

The TP stage all-reduces one vector per param group, so every TP peer must list the same slices
in the same order; and only the peers together know a layer's whole shape (AutoTP cuts unevenly,
and may leave a rank none of a layer, which DeepSpeed's wrappers then leave out of their
groups). Both are settled by one gather of what each peer lists, at the group's first step
(``all_gather_object`` over the TP group, kept on the binding: never per step). Whatever cannot
line up is refused on every peer at once, so none is left waiting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

from ..groups import ranks_of
from . import DiscoveryContext, GroupLayout, Layer, UnmappableLayoutError
from .tensor_parallel import tp_slice

if TYPE_CHECKING:
    from .deepspeed_zero import Binding

__all__ = ["with_tensor_parallel"]


@dataclass(frozen=True)
class _Listed:
    """One parameter as a rank lists it, for its TP peers."""

    name: str
    split: bool  # a TP slice
    shape: tuple[int, ...]  # this rank's (its slice's, when split)
    partition_dim: int | None
    logical_shape: tuple[int, ...] | None  # from the tags (AutoTP), else None
    source: str | None  # which tags ("megatron", "autotp"), None: untagged

    def describe(self) -> str:
        if not self.split:
            return f"{self.name!r} (not a TP slice, {self.shape})"
        return f"{self.name!r} (a TP slice {self.shape} cut along dim {self.partition_dim})"


@dataclass(frozen=True)
class _Listing:
    """What one rank lists for one param group, and what it found wrong (reported by every
    peer, so that all of them refuse together instead of leaving one waiting)."""

    call: tuple  # which step() call: (layout kind, param group[, ZeRO-3 sub-groups, of how many])
    layers: tuple[_Listed, ...]  # in the layout's order
    #: Its TP slices of no element that no layer lists (DeepSpeed's wrappers drop them,
    #: ``is_optimized_parameter``): a peer that holds elements of one finds it here.
    empty: tuple[_Listed, ...]
    problems: tuple[str, ...]


def _tp_group(binding: Binding) -> Any | None:
    """The engine's tensor-parallel group, from its ``mpu`` (the user's Megatron-style one, or
    ``deepspeed.utils.groups`` under AutoTP) or else the wrapper's; None without one."""
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_group

    for owner in (binding.engine, binding.wrapper):
        mpu = getattr(owner, "mpu", None)
        if mpu is not None:
            try:
                return bwc_tensor_model_parallel_group(mpu)
            except (AttributeError, AssertionError):  # an mpu without a (set-up) TP group
                return None
    return None


def _shape(p: Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 empties a partitioned parameter


def _listed(name: str, p: Tensor, shape: tuple[int, ...], problems: list[str]) -> _Listed:
    try:
        tags = tp_slice(p, name)
    except UnmappableLayoutError as exc:  # reported with the peers'
        problems.append(str(exc))
        tags = None
    split = tags is not None and tags.split
    return _Listed(
        name,
        split,
        shape,
        tags.partition_dim if split else None,
        tags.logical_shape if tags is not None else None,
        tags.source if tags is not None else None,
    )


def with_tensor_parallel(
    layout: GroupLayout,
    params: Sequence[Tensor],
    names: dict | None,
    binding: Binding,
    ctx: DiscoveryContext,
    call: tuple,
) -> GroupLayout:
    """``layout`` (a layer per model parameter ``params[i]``, with its local shape) with the
    whole shape and the TP group of each TP slice among its layers, and a layer of no piece for
    each slice of no element of this rank's that a TP peer steps here. ``names`` are the model's
    parameter names; ``call`` says which step() call of the wrapper this is."""
    owner = f"{type(ctx.optimizer).__name__}: param group {ctx.group_index}"
    problems: list[str] = []
    listed = [
        _listed(layer.name, p, layer.shape, problems)
        for layer, p in zip(layout.layers, params, strict=True)
    ]
    group = _tp_group(binding)
    if group is None or dist.get_world_size(group=group) == 1:
        _check_whole(listed, problems, group, owner)
        return layout
    problems += _partitioned_over_peers(layout.layers, listed, group)
    held = {id(p) for p in params}
    empty = [
        _listed(name, p, _shape(p), problems)
        for p, name in (names or {}).items()
        if id(p) not in held and math.prod(_shape(p)) == 0
    ]
    mine = _Listing(call, tuple(listed), tuple(e for e in empty if e.split), tuple(problems))
    peers = _tp_peers(binding, group, mine)
    order, shapes = _line_up(peers, dist.get_process_group_ranks(group), owner)
    return _with_tp_layers(layout, order, shapes, group)


def _check_whole(listed: list[_Listed], problems: list[str], group, owner: str) -> None:
    """Without TP peers every layer is held whole: a slice tagged otherwise is refused (with no
    ``mpu`` there may be peers this rank cannot see)."""
    if problems:
        raise UnmappableLayoutError(f"{owner}: {problems[0]}")
    for item in listed:
        if not item.split or item.logical_shape == item.shape:
            continue  # whole, or its tags say it is
        if group is not None:  # a TP group of one rank: the slice is the layer
            if item.logical_shape is None:
                continue
            raise UnmappableLayoutError(
                f"{owner}: parameter {item.name!r} {item.shape} is a tensor-parallel slice of "
                f"{item.logical_shape} ({item.source} tags), but the engine's TP group has 1 rank."
            )
        raise UnmappableLayoutError(
            f"{owner}: parameter {item.name!r} {item.shape} is tagged as a tensor-parallel "
            f"slice ({item.source}: tensor_model_parallel / partition_dim), but DeepSpeed has no "
            "mpu to name its TP group, so only this slice's norm could be taken (silently wrong "
            "trust ratios). Pass the model-parallel unit: deepspeed.initialize(..., mpu=mpu), "
            "or use AutoTP (tensor_parallel.autotp_size)."
        )


def _partitioned_over_peers(layers: list[Layer], listed: list[_Listed], group) -> list[str]:
    """Slices that ZeRO partitions over a group holding their TP peers (a parameter converted
    by ``deepspeed.zero.Init`` before AutoTP split it): its pieces would be of several slices."""
    peers = set(ranks_of(group))
    found = []
    for layer, item in zip(layers, listed, strict=True):
        if not item.split or layer.reduce_group is None:
            continue
        shared = peers & set(ranks_of(layer.reduce_group))
        if len(shared) > 1:
            found.append(
                f"parameter {layer.name!r} is a tensor-parallel slice that ZeRO partitions over "
                f"ranks {ranks_of(layer.reduce_group)}, which include its TP peers "
                f"{sorted(shared)}: its pieces cannot be told apart by slice."
            )
    return found


def _tp_peers(binding: Binding, group, mine: _Listing) -> list[_Listing]:
    """What every rank of the TP group lists for this param group (in group-rank order). Every
    peer maps the group at the same step() call, so the gather pairs up; it is made once per
    listing, so a plan rebuilt on one rank alone does not gather again."""
    peers = binding.tp_peers.get(mine)
    if peers is None:
        peers = [None] * dist.get_world_size(group=group)
        dist.all_gather_object(peers, mine, group=group)
        binding.tp_peers[mine] = peers
    return peers


_WHY = (
    "The TP slices' partial sums are all-reduced over the TP group as one vector, so every TP "
    "peer must step the same slices, in the same order (the same param groups and parameter "
    "order on every TP rank; under ZeRO-3 a sub_group_size that cuts slices of unequal size "
    "at different places breaks this: raise it)."
)


def _line_up(
    peers: list[_Listing], ranks: list[int], owner: str
) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The TP slices of the param group in the one order every peer reduces them in, and their
    whole shapes. Every peer reaches the same verdict from the same listings, so all of them
    refuse together."""
    problems = [
        f"rank {r}: {p}" for r, listing in zip(ranks, peers, strict=True) for p in listing.problems
    ]
    if problems:
        raise UnmappableLayoutError(f"{owner}: " + "; ".join(problems))
    for r, listing in zip(ranks[1:], peers[1:], strict=True):
        if listing.call != peers[0].call:
            raise UnmappableLayoutError(
                f"{owner}: TP ranks {ranks[0]} and {r} are in different step() calls here "
                f"({peers[0].call} and {listing.call}: layout, param group, ZeRO-3 sub-groups of "
                f"how many). {_WHY}"
            )
    # Merged in peer order: a peer's slices that earlier peers lack (they hold none of it) go
    # in where that peer has them; two slices in opposite orders cannot line up.
    order: list[str] = []
    for r, listing in zip(ranks, peers, strict=True):
        at = 0
        for item in listing.layers:
            if not item.split:
                continue
            if item.name not in order:
                order.insert(at, item.name)
            elif order.index(item.name) < at:
                raise UnmappableLayoutError(
                    f"{owner}: TP rank {r} lists the slice {order[at - 1]!r} before "
                    f"{item.name!r}, and another TP rank lists them the other way round. {_WHY}"
                )
            at = order.index(item.name) + 1
    by_name = [{item.name: item for item in (*p.empty, *p.layers)} for p in peers]
    shapes = {}
    for name in order:
        column = [entries.get(name) for entries in by_name]
        for r, item in zip(ranks, column, strict=True):
            if item is None or not item.split:
                found = "nothing" if item is None else item.describe()
                raise UnmappableLayoutError(
                    f"{owner}: a TP peer steps {name!r} here as a tensor-parallel slice, but TP "
                    f"rank {r} has {found}. {_WHY}"
                )
        shapes[name] = _logical_shape(column, ranks, owner)
    _check_replicated(peers, ranks, owner)
    return order, shapes


def _check_replicated(peers: list[_Listing], ranks: list[int], owner: str) -> None:
    """A parameter no tag calls a slice must be the same shape on every TP peer (an untagged
    slice would otherwise pass for a whole layer)."""
    seen: dict[str, tuple[int, _Listed]] = {}
    for r, listing in zip(ranks, peers, strict=True):
        for item in listing.layers:
            if item.split:
                continue
            first = seen.setdefault(item.name, (r, item))
            if first[1].shape != item.shape:
                raise UnmappableLayoutError(
                    f"{owner}: parameter {item.name!r} is not tagged as a tensor-parallel slice, "
                    f"but TP rank {first[0]} holds {first[1].shape} of it and TP rank {r} "
                    f"{item.shape}. Tag it (tensor_model_parallel=True, partition_dim) or "
                    "replicate it."
                )


def _logical_shape(column: list[_Listed], ranks: list[int], owner: str) -> tuple[int, ...]:
    """One TP-split layer's whole shape from its TP peers' slices (in TP-group order)."""
    first = column[0]
    dim, ndim = first.partition_dim, len(first.shape)
    shapes = ", ".join(f"rank {r}: {item.shape}" for r, item in zip(ranks, column, strict=True))
    tagged = {item.logical_shape for item in column} - {None}
    if any((item.partition_dim, len(item.shape)) != (dim, ndim) for item in column):
        raise UnmappableLayoutError(
            f"{owner}: the TP slices of {first.name!r} disagree on how it was cut: "
            + ", ".join(
                f"rank {r}: {item.describe()}" for r, item in zip(ranks, column, strict=True)
            )
        )
    if dim is None or not -ndim <= dim < ndim:
        if len(tagged) == 1 and len(next(iter(tagged))) == ndim:
            return next(iter(tagged))
        raise UnmappableLayoutError(
            f"{owner}: parameter {first.name!r} is tagged as a tensor-parallel slice, but its "
            f"tags give no usable partition_dim ({dim!r}, for {ndim} dims) nor a whole shape."
        )
    dim %= ndim
    if len({item.shape[:dim] + item.shape[dim + 1 :] for item in column}) > 1:
        raise UnmappableLayoutError(
            f"{owner}: parameter {first.name!r} is tagged as cut along dim {dim}, but its TP "
            f"slices differ in another dim ({shapes})."
        )
    whole = list(first.shape)
    whole[dim] = sum(item.shape[dim] for item in column)
    if tagged and tagged != {tuple(whole)}:
        raise UnmappableLayoutError(
            f"{owner}: parameter {first.name!r}: its tags give the whole shape as "
            f"{sorted(tagged)}, but its TP slices ({shapes}) add up to {tuple(whole)} along "
            f"dim {dim}."
        )
    return tuple(whole)


def _with_tp_layers(
    layout: GroupLayout, order: list[str], shapes: dict[str, tuple[int, ...]], group
) -> GroupLayout:
    """``layout`` with its TP slices whole-shaped and reduced over ``group``, and a layer of no
    piece for each slice in ``order`` that this rank holds none of, placed so that the slices
    come in ``order`` (the TP stage's vector follows the layers' order)."""
    mine = {layer.name for layer in layout.layers} & shapes.keys()
    before: dict[str, list[str]] = {}  # the empty slices that go before each held one
    pending: list[str] = []
    for name in order:
        if name in mine:
            before[name], pending = pending, []
        else:
            pending.append(name)

    def empty(name: str) -> Layer:  # nothing to reduce over the ZeRO group
        return Layer(name, shapes[name], None, group)

    layers: list[Layer] = []
    index = []
    for layer in layout.layers:
        if layer.name in mine:
            layers += map(empty, before[layer.name])
            layer = dataclasses.replace(layer, shape=shapes[layer.name], tp_group=group)
        index.append(len(layers))
        layers.append(layer)
    layers += map(empty, pending)
    segments = [dataclasses.replace(s, layer=index[s.layer]) for s in layout.segments]
    return dataclasses.replace(layout, layers=layers, segments=segments)
