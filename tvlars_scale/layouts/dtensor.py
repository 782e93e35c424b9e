"""DTensor layout: any parameter that is a ``DTensor``, whatever built its mesh.

FSDP2 ``fully_shard``, HSDP, tensor parallelism (``parallelize_module``) and their compositions
(FSDP2 + TP on a ``(dp, tp)`` mesh, HSDP + TP on ``(replicate, shard, tp)``, per-stage meshes
under pipelining) all hand the optimizer DTensors. A DTensor keeps its global shape (so bias and
norm exclusion by ``ndim`` just works) and holds an unpadded local piece (``to_local()``, possibly
empty). Each parameter is one layer and one segment.

A layer's partial sums are reduced over the mesh dims that split it, and only those. Every
placement is classified explicitly, by its exact type:

==========================================  ==========================================
placement on a mesh dim                     for the layer's norms
==========================================  ==========================================
``Shard(d)``, ``_StridedShard(d, sf)``      the ranks of that dim hold disjoint pieces:
                                            reduced over it
``Replicate()``                             they hold identical pieces: not reduced
``Partial(...)`` and its subclasses         unreduced values, which cannot be normed
                                            piecewise: refused
anything else, subclasses of the above      refused (``UnmappableLayoutError``): a new
too (a ``RaggedShard``, torchtitan's        type's meaning is never guessed
``Owned``)
==========================================  ==========================================

Each parameter is classified on its own, when the layout is discovered (the first step): one
unknown placement refuses its group, naming the parameter. ``Shard`` and ``Replicate``
parameters side by side (``replicate()`` next to ``fully_shard``; a ``shard_placement_fn``
returning ``Replicate()``, which torch 2.14 refuses and pytorch#183366 maps to ``replicate``'s
all-reduce) need nothing more: the engine all-reduces a ``Replicate`` parameter's gradient.

A plain tensor among DTensors (a parameter left out of ``fully_shard``) is a whole layer, unless
it is tagged as a tensor-parallel slice (``layouts.tensor_parallel``): refused. A DTensor's own
placements count, whatever tags an engine copied onto it (Megatron-FSDP keeps
``tensor_model_parallel`` on DTensors whose mesh holds the TP split, or whose global shape is
the whole layer at TP size 1).

A gradient is placed like its parameter on the same mesh, or, per mesh dim, more fully:

==========================  ==========================  ====================================
gradient on a mesh dim      parameter there             before the norms
==========================  ==========================  ====================================
the parameter's placement   any known one               nothing
``Partial(...)``            ``Replicate()``             completed: one all-reduce over the
                                                        dim (sequence parallelism: a norm
                                                        layer's gradient when no FSDP
                                                        reduces it)
``Replicate()``             ``Shard(d)``,               sliced: each rank keeps its own
                            ``_StridedShard(d, sf)``    piece, with no communication
                                                        (transformers' vocab-parallel
                                                        embedding under ``tp_plan="auto"``)
anything else, or another   -                           refused when the layout is
mesh                                                    discovered (again whenever a
                                                        gradient's placements change)
==========================  ==========================  ====================================

Both are DTensor's own ``redistribute`` to the parameter's placements, so pieces come out as the
parameter's (uneven ones too), and a partial sum costs what torch's own optimizers pay inside
DTensor's dispatch. The user's gradient is read, never changed.

A layer split over several mesh dims (FSDP2 + TP: ``(_StridedShard(0, sf=2), Shard(0))``) is
reduced once, over the group of its flattened slice (``groups.mesh_group``), not once per dim.
Size-1 dims need nothing. Parameters that share a reduction share one all-reduce per step.
Mixed precision (``MixedPrecisionPolicy`` keeps fp32 shards) and ``CPUOffloadPolicy`` (local
pieces on the host) need nothing special here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..groups import mesh_group
from . import (
    DiscoveryContext,
    GroupLayout,
    Layer,
    Segment,
    UnmappableLayoutError,
    _register_builtin,
    describe_tensor,
)
from .replicated import is_whole
from .tensor_parallel import refuse_tp_slices

try:  # torch >= 2.5; a split of a split (FSDP2 over a tensor-parallel shard)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch: no such placement to meet
    _StridedShard = None

__all__ = ["REPLICATING", "SPLITTING", "split_dims", "split_group"]

#: Placement types whose mesh dim holds disjoint pieces of the tensor (exact types).
SPLITTING: tuple[type, ...] = tuple(t for t in (Shard, _StridedShard) if t is not None)
#: Placement types whose mesh dim holds identical copies (exact types).
REPLICATING: tuple[type, ...] = (Replicate,)


def split_dims(placements: tuple[Any, ...], name: str, owner: str) -> tuple[int, ...]:
    """Indices of the mesh dims over which a DTensor with ``placements`` is split.

    Raises ``UnmappableLayoutError`` for a ``Partial`` placement and for any placement type not
    listed in ``SPLITTING`` or ``REPLICATING`` (a subclass too: its meaning is not known here).
    """
    dims = []
    for dim, placement in enumerate(placements):
        kind = type(placement)
        if kind in SPLITTING:
            dims.append(dim)
        elif kind in REPLICATING:
            continue
        elif isinstance(placement, Partial):
            raise UnmappableLayoutError(
                f"{owner}: parameter {name!r} has placements {placements}; {placement} on mesh "
                f"dim {dim} holds unreduced values whose pieces cannot be normed one by one. "
                "Redistribute it to Shard or Replicate before the optimizer step."
            )
        else:
            raise UnmappableLayoutError(
                f"{owner}: parameter {name!r} has placements {placements}, and {placement!r} "
                f"(type {kind.__module__}.{kind.__qualname__}) on mesh dim {dim} is not a "
                f"placement tvlars_scale knows: known are "
                f"{', '.join(t.__name__ for t in SPLITTING + REPLICATING)} (and Partial, "
                "refused). Redistribute the parameter to Shard or Replicate placements, or "
                "name its layout with a registered adapter (tvlars_scale.layouts)."
            )
    return tuple(dims)


def _grad_fits(grad: Any, param: Any) -> bool:
    """Whether a gradient placed ``grad`` on a mesh dim where its parameter is placed ``param``
    holds what ``_grad_to_local`` needs: the parameter's own placement, a ``Partial`` sum to
    complete over a ``Replicate`` dim, or a ``Replicate`` copy to slice over a split one."""
    kind, target = type(grad), type(param)
    if kind is target:
        return grad == param
    return (kind is Partial and target is Replicate) or (kind is Replicate and target in SPLITTING)


def _check_grad(p: DTensor, name: str, owner: str) -> None:
    grad = p.grad
    if grad is None:
        return
    if (
        isinstance(grad, DTensor)
        and grad.device_mesh == p.device_mesh
        and all(_grad_fits(g, q) for g, q in zip(grad.placements, p.placements, strict=True))
    ):
        return
    found = grad.placements if isinstance(grad, DTensor) else describe_tensor(grad)
    raise UnmappableLayoutError(
        f"{owner}: the gradient of {name!r} has placements {found}, the parameter "
        f"{p.placements}. Layer norms need the gradient placed like the parameter on its mesh, "
        "or more fully: a Partial sum over a Replicate dim (completed), a Replicate copy over a "
        "split one (sliced). Step only after the gradients are reduced: under FSDP2 not inside "
        "`set_requires_gradient_sync(False)`; with your own parallelism, redistribute the "
        "gradient to the parameter's placements first."
    )


def _grad_to_local(grad: Tensor, param: Tensor) -> Tensor:
    """The piece of ``grad`` that pairs with ``param``'s local piece. A gradient placed more
    fully (``_check_grad``) is redistributed to the parameter's placements by DTensor itself: a
    ``Partial`` sum is completed (one all-reduce over its dim, as torch's own optimizers pay
    inside DTensor's dispatch of their update), a ``Replicate`` copy chunked locally into a new
    tensor (no collective). ``grad`` itself is left as it is."""
    if not isinstance(grad, DTensor):
        return grad
    if grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def split_group(mesh: Any, placements: tuple[Any, ...], name: str, owner: str) -> Any:
    """The group to reduce the partial sums of a tensor placed ``placements`` on ``mesh`` over,
    or None (it is whole on every rank). FSDP1 keeps a DTensor's mesh and placements when it
    flattens its local tensor (``layouts.fsdp1``)."""
    dims = tuple(d for d in split_dims(placements, name, owner) if mesh.size(d) > 1)
    return mesh_group(mesh, dims) if dims else None


def _to_local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def dtensor_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if not any(isinstance(p, DTensor) for p in params):
        return None
    owner = type(ctx.optimizer).__name__
    layers = []
    for i, p in enumerate(params):
        name = ctx.param_name(i)
        if isinstance(p, DTensor):
            group = split_group(p.device_mesh, p.placements, name, owner)
            _check_grad(p, name, owner)
        elif is_whole(p, ctx):  # e.g. a parameter left out of fully_shard / parallelize_module
            group = None
        else:
            return None
        layers.append(Layer(name=name, shape=tuple(p.shape), reduce_group=group))
    # A plain tensor is taken whole, so a TP-tagged one would lend its layer the slice's norm;
    # a DTensor's placements count, whatever tags an engine copied onto it.
    plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
    refuse_tp_slices([params[i] for i in plain], [layers[i].name for i in plain], "dtensor", owner)
    segments = [Segment(tensor=i, layer=i) for i in range(len(params))]
    return GroupLayout(
        layers=layers,
        segments=segments,
        to_local=_to_local,
        grad_to_local=_grad_to_local,
        kind="dtensor",
    )


_register_builtin("dtensor", dtensor_layout)
