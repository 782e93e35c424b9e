"""Process groups: which ranks a reduction spans, and the ranks that train one model.

The core identifies a reduction by the *global ranks* it spans, not by the group object: two
objects over the same ranks (the world, and a 1-D mesh that covers the world) are one reduction.

- ``ranks_of(group)``: the sorted global ranks of a process group.
- ``group_over(ranks)``: a process group over exactly these ranks, created once per set. A new
  group is made with ``use_local_synchronization=True``, so only its members take part: pipeline
  stages that need different groups never wait for each other (``_new_member_group`` keeps that
  from shifting the names of the groups other code creates later).
- ``mesh_group(mesh, dims)``: the group of this rank's slice of a ``DeviceMesh`` along ``dims``:
  the mesh's own group for one dim, the flattened slice for several (one reduction, not one
  per dim).
- ``ModelGroup``: the ranks that train one model (data, tensor and pipeline parallel together),
  over which every step's apply/skip decision is agreed; see ``resolve_model_group``.
"""

from __future__ import annotations

import os
import warnings
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
        group = _new_member_group(ranks)
        _CREATED[ranks] = group
    return group


#: Salt for the names of the groups made here, beyond any value torch's own counter reaches.
_NAME_SALT = 1 << 48


def _new_member_group(ranks: Ranks) -> Any:
    """``dist.new_group(ranks, use_local_synchronization=True)``, called by the members only.

    torch names such a group by hashing its ranks with ``_world.group_count`` as a salt, and
    advances that counter on the ranks that call ``new_group``, i.e. on the members only. Later
    names (every ``new_group`` and ``init_device_mesh`` of the job) are derived from the same
    counter, so members and non-members would then disagree on a name and hang in the
    rendezvous. The counter is therefore left as it was, and the group is salted with a value
    the counter never reaches: the same on every member, unique per set of ranks (one group per
    set is made here). torch 2.x internals (``distributed_c10d._world``); where they are
    missing, the group is created as is.
    """
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)
    count = getattr(world, "group_count", None)
    if count is None:  # pragma: no cover - a torch without the counter
        return dist.new_group(list(ranks), use_local_synchronization=True)
    world.group_count = _NAME_SALT
    try:
        return dist.new_group(list(ranks), use_local_synchronization=True)
    finally:
        world.group_count = count


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
    a ``DeviceMesh`` (all of its ranks), or a tuple of global ranks (also what a copied or
    pickled optimizer keeps of a group or mesh; ``(dist.get_rank(),)``: this process alone).
    """
    from torch.distributed.device_mesh import DeviceMesh

    if spec is None:
        if not (dist.is_available() and dist.is_initialized()):
            _warn_if_launched_alone()
            return None
        if dist.get_world_size() == 1:
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


def _warn_if_launched_alone() -> None:
    """A launcher started several processes but this one has no process group, so nothing is
    averaged: e.g. ``Accelerator()`` without ``cpu=True`` under ``accelerate launch
    --multi_gpu`` on a machine without GPUs (distributed type NO). Every process would then
    train its own copy on its own batches, with no error anywhere."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        warnings.warn(
            f"WORLD_SIZE={world}: a launcher started {world} processes, but torch.distributed "
            "is not initialised in this one, so each process trains its own copy of the model "
            "on its own batches and nothing is averaged. With accelerate on a machine without "
            "GPUs create Accelerator(cpu=True) (or launch with ACCELERATE_USE_CPU=1); with torch "
            "alone call torch.distributed.init_process_group before the first step",
            RuntimeWarning,
            stacklevel=1,  # this line: the default filter then shows it once per process
        )


def check_model_group(owner: str, spec: Any) -> None:
    """Validate an optimizer's ``model_group`` argument, before training starts: its type, and
    (once ``torch.distributed`` is initialised) that this rank is one of its ranks."""
    from torch.distributed.device_mesh import DeviceMesh

    if spec is None:
        return
    initialised = dist.is_available() and dist.is_initialized()
    if isinstance(spec, tuple):
        valid = bool(spec) and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in spec
        )
        if not valid or len(set(spec)) != len(spec):
            raise ValueError(
                f"{owner}: invalid model_group={spec!r}; a tuple must list distinct global "
                "ranks (ints >= 0), e.g. (dist.get_rank(),) for this process alone"
            )
        if initialised:
            world = dist.get_world_size()
            if max(spec) >= world or dist.get_rank() not in spec:
                raise ValueError(
                    f"{owner}: invalid model_group={spec!r} on rank {dist.get_rank()} of "
                    f"{world}; expected global ranks below {world} that include this rank"
                )
        return
    if isinstance(spec, DeviceMesh):
        member = spec.get_coordinate() is not None
    elif isinstance(spec, dist.ProcessGroup):
        member = not initialised or dist.get_rank(group=spec) >= 0
    else:
        raise TypeError(
            f"{owner}: invalid model_group={spec!r}; expected None (every rank of the job trains "
            "this model), a torch.distributed ProcessGroup, a DeviceMesh (all of its ranks), or "
            "a tuple of global ranks"
        )
    if not member:
        raise ValueError(
            f"{owner}: model_group={spec!r} does not include this rank ({dist.get_rank()}); "
            "pass the group of the ranks that train the model this optimizer steps"
        )
