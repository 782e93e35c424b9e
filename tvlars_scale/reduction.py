"""Turn per-rank partial sums of squares into true per-layer sums: one all-reduce per group.

Layers are bucketed by the process groups they must be reduced over (``Layer.reduce_over``),
across every param group of one ``step()`` call. Each bucket is one flat fp32 vector laid out as
``[||w||² of its layers, ||d||² of its layers, sum of ||g||² over its layers]``: two floats per
layer plus one scalar, which carries the "all gradients zero" and "some gradient non-finite"
signals to every rank, so every rank takes the same decision without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Bucket", "ReducedSums", "reduce_layer_sums"]


@dataclass(frozen=True)
class Bucket:
    """The layers of one param group that share a reduction key."""

    reduce_over: tuple
    layers: Tensor  # long indices into the group's layers


@dataclass
class ReducedSums:
    #: Per param group: (2, layers) true sums of squares, rows ||w||² and ||d||².
    layer_sums: list[Tensor]
    #: 0-d: sum of ||g||² over every layer of the step call, on every rank (None: no layers).
    grad_sq_total: Tensor | None


def _comm_device(process_group, local: torch.device) -> torch.device:
    # NCCL cannot reduce CPU tensors (CPU offload keeps shards on the host): move the small
    # vector to the current CUDA device for the collective, as ColossalAI's DistributedLamb does.
    backend = str(dist.get_backend(process_group)).lower()
    if local.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return local


def _all_reduce_over(vector: Tensor, process_groups: tuple) -> Tensor:
    for group in process_groups:
        device = _comm_device(group, vector.device)
        comm = vector.to(device)
        dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=group)
        vector = comm.to(vector.device)
    return vector


def reduce_layer_sums(partials: list[Tensor], buckets: list[list[Bucket]]) -> ReducedSums:
    """``partials[i]`` is group i's local (3, layers) sums; ``buckets[i]`` its reduction keys."""
    by_key: dict[tuple, list[tuple[int, Tensor]]] = {}
    for group_index, group_buckets in enumerate(buckets):
        for bucket in group_buckets:
            by_key.setdefault(bucket.reduce_over, []).append((group_index, bucket.layers))

    layer_sums = [p[:2].clone() for p in partials]
    grad_sq_total = None
    for key, members in by_key.items():
        pieces = [partials[g][:2, idx].reshape(-1) for g, idx in members]
        grad_sq = sum(partials[g][2, idx].sum() for g, idx in members)
        vector = torch.cat([*pieces, grad_sq.reshape(1)])
        if key:
            vector = _all_reduce_over(vector, key)
        offset = 0
        for g, idx in members:
            n = idx.numel()
            layer_sums[g][:, idx] = vector[offset : offset + 2 * n].view(2, n)
            offset += 2 * n
        grad_sq_total = vector[-1] if grad_sq_total is None else grad_sq_total + vector[-1]
    return ReducedSums(layer_sums=layer_sums, grad_sq_total=grad_sq_total)
