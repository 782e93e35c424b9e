"""FSDP2 / HSDP layout: DTensor parameters (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` turns every parameter into a DTensor that keeps its global shape (so bias/norm
exclusion by ``ndim`` just works) and holds an unpadded local piece, possibly with zero rows.
Each parameter is one layer and one segment; partial sums come from ``to_local()``.

A layer is reduced over the mesh dimensions whose placement is ``Shard``, and only those: under
HSDP, placements ``(Replicate(), Shard(0))``, the replicas already hold identical pieces, so
reducing over the whole world would make every norm sqrt(replicas) too large. Parameters that
share a mesh and placements share a reduction key, so the core issues one all-reduce per shard
process group per step. ``Partial`` placements (unreduced values) cannot be normed piecewise and
are refused. Mixed precision (``MixedPrecisionPolicy`` keeps the sharded parameters in fp32) and
``CPUOffloadPolicy`` (local pieces on the host) need nothing special here.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor

from . import (
    DiscoveryContext,
    GroupLayout,
    Layer,
    Segment,
    UnmappableLayoutError,
    describe_tensor,
    register_adapter,
)
from .replicated import is_whole


def shard_groups(t: DTensor) -> tuple:
    """The process groups of the mesh dims that shard ``t`` (size-1 dims need no reduction)."""
    mesh = t.device_mesh
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(t.placements)
        if placement.is_shard() and mesh.size(dim) > 1
    )


def _check_placements(p: DTensor, name: str, ctx: DiscoveryContext) -> None:
    owner = type(ctx.optimizer).__name__
    if any(placement.is_partial() for placement in p.placements):
        raise UnmappableLayoutError(
            f"{owner}: parameter {name!r} is {describe_tensor(p)} with placements "
            f"{p.placements}; a Partial placement holds unreduced values whose pieces cannot be "
            "normed one by one. Redistribute it to Shard or Replicate before the optimizer step."
        )
    grad = p.grad
    if grad is not None and (not isinstance(grad, DTensor) or grad.placements != p.placements):
        found = grad.placements if isinstance(grad, DTensor) else describe_tensor(grad)
        raise UnmappableLayoutError(
            f"{owner}: the gradient of {name!r} has placements {found}, the parameter "
            f"{p.placements}. Layer norms need the gradient sharded like the parameter: step "
            "only after the engine has reduced the gradients (e.g. not inside "
            "`set_requires_gradient_sync(False)`)."
        )


def _to_local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def fsdp2_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if not any(isinstance(p, DTensor) for p in params):
        return None
    layers = []
    for i, p in enumerate(params):
        name = ctx.param_name(i)
        if isinstance(p, DTensor):
            _check_placements(p, name, ctx)
            reduce_over = shard_groups(p)
        elif is_whole(p, ctx):  # e.g. a parameter `fully_shard(..., ignored_params=...)` left alone
            reduce_over = ()
        else:
            return None
        layers.append(Layer(name=name, shape=tuple(p.shape), reduce_over=reduce_over))
    segments = [Segment(tensor=i, layer=i) for i in range(len(params))]
    return GroupLayout(layers=layers, segments=segments, to_local=_to_local, kind="fsdp2")


register_adapter("fsdp2", fsdp2_layout, priority=10)
