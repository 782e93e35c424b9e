"""FSDP1 layout: ``FullyShardedDataParallel`` FlatParameters and their sharded views.

Each FSDP1 unit flattens its parameters into one ``FlatParameter`` and keeps, per original
parameter k, its FQN (``_fqns[k]``), ORIGINAL shape (``_shapes[k]``) and where its local piece
lies in this rank's shard (``_shard_param_infos[k]``: ``in_shard``, ``offset_in_shard``,
``numel_in_shard``; alignment and tail padding lie outside every piece).

- ``use_orig_params=False``: the optimizer holds the FlatParameter. Every original parameter of
  the unit is a layer; the pieces are element ranges of the flat shard.
- ``use_orig_params=True``: the optimizer holds the original parameters, whose data is a 1-D
  view of the local piece (size 0, with no gradient, when the rank holds none of it). Nothing on
  such a view leads back to its FlatParameter, so ``bind(model)`` records the mapping once.

Partial sums are reduced over the unit's shard ``process_group``: under HYBRID_SHARD that is the
intra-node group, never the inter-node (replicate) one, whose ranks hold identical pieces.
NO_SHARD needs no reduction. An unbound FlatParameter is reduced over the default group when its
shard world is the whole world (the usual FULL_SHARD / SHARD_GRAD_OP case); otherwise (HYBRID_SHARD,
a custom process group, the dp dim of a 2-D mesh) the adapter asks for ``bind(model)`` rather than
guess.

**Over a tensor-parallel model** (``parallelize_module`` on ``mesh["tp"]``, then FSDP1 with
``device_mesh=mesh["dp"]``, or HYBRID_SHARD with ``mesh["replicate", "shard"]``), FSDP1 flattens
each DTensor's LOCAL tensor (its TP slice) and keeps the DTensor's spec, mesh, placements and
global shape, in ``_param_extensions[k]``. Such a layer has its global shape, and its sums are
completed in two stages (``Layer.tp_group``): over the shard group (this rank's TP slice), then
over the mesh dims its placements split (``layouts.dtensor.split_group``: ``Shard`` and
``_StridedShard`` split, ``Replicate`` needs nothing, ``Partial`` and unknown placements are
refused). With no shard group (NO_SHARD) the TP group is the layer's only reduction.

Megatron-style and AutoTP slices (plain tensors tagged ``tensor_model_parallel`` or with AutoTP's
metadata, ``layouts.tensor_parallel``) are refused: their TP group belongs to another engine and
is not visible here. FSDP1 keeps the tagged Parameter objects only with ``use_orig_params=True``;
with ``False`` it discards them, tags included, when it flattens, so nothing is left to check.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..compat import import_internal, internal
from ..groups import ranks_of
from . import (
    DiscoveryContext,
    GroupLayout,
    Layer,
    Segment,
    UnmappableLayoutError,
    _register_builtin,
    describe_tensor,
)
from .dtensor import split_group
from .replicated import is_whole
from .tensor_parallel import refuse_tp_slices

__all__ = ["bind"]

_FLAT_PARAM_NAME = "_flat_param"


@dataclass(frozen=True)
class _Unit:
    """What ``bind`` learnt about one FSDP1 unit from the module tree."""

    flat_param: weakref.ref  # weak: the registry must not keep a freed model alive
    reduce_group: Any  # the shard process group; None when nothing is sharded
    prefix: str  # the unit's FQN prefix in the model, "" for the root


#: FlatParameter -> (its unit, -1); original parameter (use_orig_params=True) -> (unit, index k).
_BOUND: WeakIdKeyDictionary = WeakIdKeyDictionary()


def bind(model: nn.Module) -> nn.Module:
    """Record where the parameters of every FSDP1 unit in ``model`` come from; returns ``model``.

    Needed once after wrapping with ``use_orig_params=True`` (the optimizer then sees 1-D views
    that carry no layer shape) and with HYBRID_SHARD or a custom ``process_group``; harmless
    otherwise. Call it on every rank, before the first ``step()``.
    """
    FSDP = import_internal("torch.distributed.fsdp", "FullyShardedDataParallel", "torch")
    names = {module: name for name, module in model.named_modules()}
    units = [m for m in FSDP.fsdp_modules(model) if internal(m, "_handle", "torch") is not None]
    if not units:
        raise ValueError(
            "tvlars_scale.fsdp.bind: model has no FullyShardedDataParallel unit "
            f"holding parameters (got {type(model).__name__}); pass the FSDP1-wrapped model."
        )
    for module in units:
        handle = module._handle
        flat = internal(handle, "flat_param", "torch")
        group = internal(handle, "process_group", "torch")
        sharded = (
            internal(handle, "uses_sharded_strategy", "torch") and dist.get_world_size(group) > 1
        )
        prefix = _clean_tensor_name(names[module])
        unit = _Unit(weakref.ref(flat), group if sharded else None, prefix + "." if prefix else "")
        _BOUND[flat] = (unit, -1)
        for k, param in enumerate(internal(flat, "_params", "torch") or ()):
            _BOUND[param] = (unit, k)
    return model


def _clean_tensor_name(name: str) -> str:
    """``name`` without FSDP's and activation checkpointing's wrapper prefixes."""
    clean = import_internal("torch.distributed.fsdp._common_utils", "clean_tensor_name", "torch")
    return clean(name)


def _is_fsdp1(t: Tensor) -> bool:
    return bool(getattr(t, "_is_flat_param", False) or getattr(t, "_fsdp_flattened", False))


def _unbound_unit(flat: Tensor, index: int, ctx: DiscoveryContext) -> _Unit:
    """Infer a FlatParameter's shard group without the module tree, or ask for ``bind``."""
    padded = getattr(flat, "_padded_unsharded_size", None)  # set for sharded strategies only
    sharded_size = internal(flat, "_sharded_size", "torch")
    shard_world = padded.numel() // sharded_size.numel() if padded is not None else 1
    if shard_world == 1:
        reduce_group = None
    elif shard_world == dist.get_world_size():
        reduce_group = dist.group.WORLD  # every rank holds a piece: the same sum as its group
    else:
        raise UnmappableLayoutError(
            f"{type(ctx.optimizer).__name__}: FSDP1 FlatParameter {ctx.param_name(index)!r} is "
            f"sharded over {shard_world} of {dist.get_world_size()} ranks (HYBRID_SHARD, the dp "
            "dim of a 2-D mesh as in FSDP1 + tensor parallelism, or a custom process_group), and "
            "its shard group lives on the FSDP module. Call `tvlars_scale.fsdp.bind(model)` "
            "once after wrapping."
        )
    # Name its layers after the FlatParameter's FQN when the optimizer was given named
    # parameters ("0._flat_param" -> "0.weight"), else after its place in the group.
    name = _clean_tensor_name(ctx.param_name(index))
    prefix = name.removesuffix(_FLAT_PARAM_NAME) if name.endswith(_FLAT_PARAM_NAME) else f"{name}."
    return _Unit(weakref.ref(flat), reduce_group, prefix)


def _unbound_view_error(p: Tensor, index: int, ctx: DiscoveryContext) -> UnmappableLayoutError:
    return UnmappableLayoutError(
        f"{type(ctx.optimizer).__name__}: parameter {ctx.param_name(index)!r} "
        f"({describe_tensor(p)}) is a sharded view of an FSDP1 FlatParameter "
        "(use_orig_params=True): its layer shape and shard group live on the FSDP module, "
        "which the optimizer cannot reach. Call `tvlars_scale.fsdp.bind(model)` once "
        "after wrapping, or wrap with use_orig_params=False, or use FSDP2 `fully_shard`."
    )


def _unit_of(p: Tensor, index: int, ctx: DiscoveryContext) -> tuple[_Unit, Tensor, int]:
    """(unit, FlatParameter, k): k is -1 when ``p`` is the FlatParameter itself."""
    bound = _BOUND.get(p)
    if bound is not None:
        unit, k = bound
        flat = unit.flat_param()
        if flat is not None:
            return unit, flat, k
    if getattr(p, "_is_flat_param", False):
        return _unbound_unit(p, index, ctx), p, -1
    raise _unbound_view_error(p, index, ctx)


def _layer(unit: _Unit, flat: Tensor, k: int, owner: str) -> Layer:
    name = unit.prefix + internal(flat, "_fqns", "torch")[k]
    spec = internal(flat, "_param_extensions", "torch")[k]
    if spec is None:  # FSDP1 flattened the parameter itself
        return Layer(name, tuple(internal(flat, "_shapes", "torch")[k]), unit.reduce_group)
    return _tp_layer(unit, name, spec, owner)


def _tp_layer(unit: _Unit, name: str, spec: Any, owner: str) -> Layer:
    """A layer whose TP slice (a DTensor's local tensor) FSDP1 flattened: its spec gives the
    global shape and the mesh dims that split it."""
    spec_type = import_internal("torch.distributed.tensor._dtensor_spec", "DTensorSpec", "torch")
    if type(spec) is not spec_type:  # a custom FSDPExtensions (torch's _set_fsdp_extensions)
        raise UnmappableLayoutError(
            f"{owner}: FSDP1 flattened parameter {name!r} with extension metadata "
            f"{type(spec).__name__}, not a DTensorSpec; tvlars_scale cannot tell how it is "
            "split. Use FSDP2 `fully_shard` over DTensor tensor parallelism."
        )
    tp_group = split_group(spec.mesh, spec.placements, name, owner)
    if tp_group is None:  # replicated over the TP mesh: this rank's slice is the whole layer
        return Layer(name, tuple(spec.shape), unit.reduce_group)
    if unit.reduce_group is None:  # not sharded by FSDP1 (NO_SHARD): this rank holds its slice
        return Layer(name, tuple(spec.shape), tp_group)
    # The two stages are exact only if every rank of the shard group holds the same TP slice;
    # a shard group that also spans the TP split (FSDP1 over the tp dim) mixes slices.
    shared = set(ranks_of(unit.reduce_group)) & set(ranks_of(tp_group))
    if len(shared) > 1:
        raise UnmappableLayoutError(
            f"{owner}: FSDP1 shards parameter {name!r} over ranks {ranks_of(unit.reduce_group)}, "
            f"and its DTensor placements {spec.placements} split it over ranks "
            f"{ranks_of(tp_group)} too ({sorted(shared)} in both): each rank's flat shard then "
            "mixes different TP slices. Wrap with FSDP1 over the data-parallel mesh dim only "
            '(device_mesh=mesh["dp"]), or use FSDP2 `fully_shard`.'
        )
    return Layer(name, tuple(spec.shape), unit.reduce_group, tp_group)


def fsdp1_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if not any(_is_fsdp1(p) for p in params):
        return None
    owner = type(ctx.optimizer).__name__
    names = [ctx.param_name(i) for i in range(len(params))]
    refuse_tp_slices(params, [_clean_tensor_name(n) for n in names], "fsdp1", owner)
    layers: list[Layer] = []
    segments: list[Segment] = []
    for i, p in enumerate(params):
        if not _is_fsdp1(p):
            if not is_whole(p, ctx):
                return None
            segments.append(Segment(tensor=i, layer=len(layers)))
            layers.append(Layer(names[i], tuple(p.shape)))
            continue
        unit, flat, k = _unit_of(p, i, ctx)
        if k < 0:  # a FlatParameter: each of its parameters is a layer, maybe with a piece here
            for j, info in enumerate(internal(flat, "_shard_param_infos", "torch")):
                if info.in_shard:
                    start, numel = info.offset_in_shard, info.numel_in_shard
                    segments.append(Segment(i, len(layers), start, numel))
                layers.append(_layer(unit, flat, j, owner))
        else:  # a view: the whole tensor (maybe empty) is layer k's local piece
            layers.append(_layer(unit, flat, k, owner))
            _check_view(p, internal(flat, "_shard_param_infos", "torch")[k], layers[-1], ctx)
            segments.append(Segment(i, len(layers) - 1))
    return GroupLayout(layers=layers, segments=segments, kind="fsdp1")


def _check_view(p: Tensor, info: Any, layer: Layer, ctx: DiscoveryContext) -> None:
    # FSDP swaps the views for unsharded ones between forward and backward and inside
    # summon_full_params; a layout found there would describe pieces that are not the shard.
    expected = info.numel_in_shard if info.in_shard else 0
    if p.numel() != expected:
        raise UnmappableLayoutError(
            f"{type(ctx.optimizer).__name__}: parameter {layer.name!r} is {describe_tensor(p)}, "
            f"but its FSDP1 unit says this rank holds {expected} of its elements. Call "
            "`step()` outside forward/backward and outside `summon_full_params`."
        )


_register_builtin("fsdp1", fsdp1_layout)
