"""Process groups: which ranks a reduction spans, and the ranks that train one model.

The core identifies a reduction by the *global ranks* it spans, not by the group object: two
objects over the same ranks (the world, and a 1-D mesh that covers the world) are one reduction.

- ``ranks_of(group)``: the sorted global ranks of a process group.
- ``group_over(ranks)``: a process group over exactly these ranks, created once per set. A new
  group is made with ``use_local_synchronization=True``, so only its members take part: pipeline
  stages that need different groups never wait for each other.
- ``mesh_group(mesh, dims)``: the group of this rank's slice of a ``DeviceMesh`` along ``dims``:
  the mesh's own group for one dim, the flattened slice for several (one reduction, not one
  per dim).
- ``ModelGroup``: the ranks that train one model (data, tensor and pipeline parallel together),
  over which every step's apply/skip decision is agreed; see ``resolve_model_group``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = [
    "ModelGroup",
    "check_model_group",
    "group_over",
    "mesh_group",
    "ranks_of",
    "resolve_model_group",
    "slice_ranks",
]

Ranks = tuple[int, ...]

#: Groups created here, by their ranks (checked for liveness on use: a destroyed world drops them).
_CREATED: dict[Ranks, Any] = {}


def ranks_of(group: Any) -> Ranks:
    """Sorted global ranks of ``group`` (``None`` or ``dist.group.WORLD``: the world)."""
    return tuple(sorted(dist.get_process_group_ranks(group or dist.group.WORLD)))


def _alive(group: Any) -> bool:
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, RuntimeError, ValueError):
        return False
    return True


def group_over(ranks: Iterable[int]) -> Any:
    """A process group over exactly ``ranks`` (global ranks, this rank among them).

    The world when ``ranks`` is the world; else one group per set of ranks, created on first use
    by ``dist.new_group(..., use_local_synchronization=True)``: only the member ranks must call
    this, each with the same set.
    """
    ranks = tuple(sorted(ranks))
    if ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    group = _CREATED.get(ranks)
    if group is None or not _alive(group):
        group = dist.new_group(list(ranks), use_local_synchronization=True)
        _CREATED[ranks] = group
    return group


def slice_ranks(mesh: Any, dims: tuple[int, ...]) -> Ranks:
    """Global ranks of this rank's slice of ``mesh`` along ``dims``: every coordinate on those
    dims, this rank's coordinate on the others."""
    coordinate = mesh.get_coordinate()
    index = tuple(slice(None) if d in dims else c for d, c in enumerate(coordinate))
    return tuple(sorted(mesh.mesh[index].flatten().tolist()))


def mesh_group(mesh: Any, dims: tuple[int, ...]) -> Any:
    """The group of this rank's slice of ``mesh`` along ``dims`` (mesh dim indices).

    One dim: the mesh's own group for it. Several: one group over the flattened slice (the same
    ranks ``mesh[names]._flatten()`` would give, without needing every rank of the root mesh
    to take part in creating it).
    """
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    return group_over(slice_ranks(mesh, dims))


@dataclass(frozen=True)
class ModelGroup:
    """The ranks that train one model, and a process group over them."""

    ranks: Ranks
    group: Any


def resolve_model_group(spec: Any) -> ModelGroup | None:
    """The model group for an optimizer's ``model_group`` argument; None for a single process.

    ``spec`` is None (the world, when ``torch.distributed`` is initialised), a ``ProcessGroup``,
    a ``DeviceMesh`` (all of its ranks), or a tuple of global ranks (what a pickled optimizer
    keeps of a process group).
    """
    from torch.distributed.device_mesh import DeviceMesh

    if spec is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return ModelGroup(ranks_of(dist.group.WORLD), dist.group.WORLD)
    if isinstance(spec, DeviceMesh):
        ranks = tuple(sorted(spec.mesh.flatten().tolist()))
        group = mesh_group(spec, tuple(range(spec.ndim))) if len(ranks) > 1 else None
    elif isinstance(spec, tuple):
        ranks, group = tuple(sorted(spec)), group_over(spec) if len(spec) > 1 else None
    else:
        ranks, group = ranks_of(spec), spec
    return ModelGroup(ranks, group) if len(ranks) > 1 else None


def check_model_group(owner: str, spec: Any) -> None:
    """Validate an optimizer's ``model_group`` argument (at construction, before training)."""
    if spec is None or (isinstance(spec, tuple) and all(isinstance(r, int) for r in spec)):
        return
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(spec, (DeviceMesh, dist.ProcessGroup)):
        return
    raise TypeError(
        f"{owner}: invalid model_group={spec!r}; expected None (every rank of the job trains "
        "this model), a torch.distributed ProcessGroup, or a DeviceMesh (all of its ranks)"
    )
