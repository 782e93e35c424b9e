"""Turn per-rank partial sums into true per-layer sums, and one step decision per model.

Layers are bucketed by the ranks they must be reduced over (``Layer.reduce_group``), across every
param group of one ``step()`` call: one all-reduce per distinct set of ranks. Each bucket is one
flat fp32 vector ``[||w||² of its layers, ||d||² of its layers]``, two floats per layer.

A tensor-parallel slice that an engine shards again over its own data-parallel group (ZeRO or
FSDP1 over a Megatron-style model: ``Layer.tp_group``) is reduced in two *stages*: stage 0 over
the shard group completes this rank's slice, stage 1 over the TP group adds the other slices.
Every stage-0 all-reduce runs before any stage-1 one, so a stage-1 vector holds whole slices.

The decision (apply; skip on a non-finite gradient; no-op when every gradient is zero) rests on
one scalar: the sum of ||g||² over every local piece, all-reduced over the *model group*, the
ranks that train one model (``groups.ModelGroup``). It rides as one more float in the bucket
whose ranks are the model group when there is one (FSDP2 over the whole world: no extra
collective), and is otherwise one extra scalar all-reduce (DDP, HSDP, tensor and pipeline
parallelism). Every rank of the model then holds the same scalar, so every rank takes the same
decision, without a host sync. A rule that must decide before its local pass (LAMB, which
updates its moments in place) reduces the scalar alone first (``reduce_decision``).

The all-reduces run in the sorted order of (stage, ranks), the same total order on every rank, so
that ranks sharing several groups never wait on each other in a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import ModelGroup

__all__ = ["Bucket", "ReducedSums", "reduce_decision", "reduce_layer_sums"]


@dataclass(frozen=True)
class Bucket:
    """The layers of one param group that are reduced over the same ranks."""

    ranks: tuple[int, ...]  # global ranks; () for layers held whole (nothing to reduce)
    group: Any  # a process group over ``ranks`` (None for ())
    layers: Tensor  # long indices into the group's layers
    #: 0: the layers' sums are local partial sums; 1: they are completed by stage 0 first (the
    #: TP group of a TP slice sharded again by ZeRO or FSDP1, ``Layer.tp_group``).
    stage: int = 0


@dataclass
class ReducedSums:
    #: Per param group: (2, layers) true sums of squares, rows ||w||² and ||d||².
    layer_sums: list[Tensor]
    #: 0-d: sum of ||g||² over every piece of the model, the same on every rank of the model
    #: (None when no local sum was given: the decision was taken before).
    grad_sq_total: Tensor | None


def _comm_device(process_group, local: torch.device) -> torch.device:
    # NCCL cannot reduce CPU tensors (CPU offload keeps shards on the host): move the small
    # vector to the current CUDA device for the collective, as ColossalAI's DistributedLamb does.
    backend = str(dist.get_backend(process_group)).lower()
    if local.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return local


def _all_reduce(vector: Tensor, group: Any) -> Tensor:
    comm = vector.to(_comm_device(group, vector.device))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=group)
    return comm.to(vector.device)


def reduce_decision(grad_sq: Tensor, model: ModelGroup | None) -> Tensor:
    """The local sum of ||g||² (0-d), summed over the model group alone (one scalar all-reduce;
    none for a single process)."""
    if model is None:
        return grad_sq
    return _all_reduce(grad_sq.reshape(1), model.group)[0]


def reduce_layer_sums(
    partials: list[Tensor],
    buckets: list[list[Bucket]],
    model: ModelGroup | None,
    grad_sq: Tensor | None = None,
) -> ReducedSums:
    """``partials[i]`` is group i's local (2, layers) sums (rows ||w||², ||d||²), overwritten
    with the reduced sums; ``buckets[i]`` its buckets; ``grad_sq`` the local sum of ||g||² the
    decision rests on (None: decided already), summed over ``model``, the ranks that take the
    decision (None: this process alone)."""
    by_key: dict[tuple[int, tuple[int, ...]], tuple[Any, list[tuple[int, Tensor]]]] = {}
    for group_index, group_buckets in enumerate(buckets):
        for bucket in group_buckets:
            key = (bucket.stage, bucket.ranks)
            by_key.setdefault(key, (bucket.group, []))[1].append((group_index, bucket.layers))
    deciding = grad_sq is not None and model is not None
    if deciding:
        by_key.setdefault((0, model.ranks), (model.group, []))  # the decision's own all-reduce

    # Reduced in place: a layer is in one bucket per stage, and a stage-1 bucket reads the sums
    # its layers' stage-0 buckets wrote (the vectors are gathered just before each all-reduce).
    layer_sums = list(partials)
    grad_sq_total = grad_sq
    for key in sorted(k for k in by_key if k[1]):
        group, members = by_key[key]
        carries_decision = deciding and key == (0, model.ranks)
        pieces = [partials[g][:, idx].reshape(-1) for g, idx in members]
        if carries_decision:
            pieces.append(grad_sq.reshape(1))
        vector = _all_reduce(torch.cat(pieces), group)
        offset = 0
        for g, idx in members:
            n = idx.numel()
            layer_sums[g][:, idx] = vector[offset : offset + 2 * n].view(2, n)
            offset += 2 * n
        if carries_decision:
            grad_sq_total = vector[-1]
    return ReducedSums(layer_sums=layer_sums, grad_sq_total=grad_sq_total)
