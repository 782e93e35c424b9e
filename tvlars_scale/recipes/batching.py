"""Global batch arithmetic and the order in which samples are drawn.

``plan_global_batch`` splits ``--global-batch-size`` into per-device batch x gradient
accumulation steps x world size, and refuses anything that does not divide exactly: a silently
smaller global batch would change the experiment (the LR table and TVLARS' lambda are per
global batch and per optimizer step).

Sampling is a pure function of (seed, epoch, step, micro-batch, rank): every epoch is one seeded
permutation of the training set, optimizer step ``s`` consumes its slice
``[s * B, (s + 1) * B)`` (``B`` = global batch, the incomplete tail is dropped), and inside that
slice micro-batch ``a`` of rank ``r`` takes ``per_device`` consecutive samples at
``(a * world + r) * per_device``. So the samples of one optimizer step do not depend on how the
global batch is split, and a resumed run needs nothing but the step number to continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ConfigError

__all__ = [
    "BatchPlan",
    "epoch_permutation",
    "eval_shard",
    "micro_batch_indices",
    "plan_global_batch",
]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_device: int
    grad_accum: int
    world_size: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.per_device} per device x "
            f"{self.grad_accum} accumulation step(s) x {self.world_size} process(es)"
        )


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"invalid {name}={value!r}; expected an integer >= 1")
    return value


def plan_global_batch(
    global_batch: int,
    world_size: int,
    per_device: int | None = None,
    grad_accum: int | None = None,
    max_per_device: int = 256,
) -> BatchPlan:
    """Split ``global_batch`` into per-device batch x accumulation x world size, exactly.

    Give ``per_device`` and/or ``grad_accum`` to fix them; what is left is derived. With neither,
    the accumulation is the smallest that keeps the per-device batch <= ``max_per_device``.
    """
    global_batch = _positive_int("--global-batch-size", global_batch)
    world_size = _positive_int("world_size", world_size)
    max_per_device = _positive_int("--max-per-device-batch-size", max_per_device)
    if per_device is not None:
        _positive_int("--per-device-batch-size", per_device)
    if grad_accum is not None:
        _positive_int("--grad-accum", grad_accum)
    if global_batch % world_size:
        raise ConfigError(
            f"--global-batch-size={global_batch} is not divisible by the world size {world_size} "
            f"(processes); use a multiple of {world_size}"
        )
    per_rank = global_batch // world_size  # samples per rank per optimizer step

    if per_device is not None and grad_accum is not None:
        if per_device * grad_accum * world_size != global_batch:
            raise ConfigError(
                f"--per-device-batch-size={per_device} x --grad-accum={grad_accum} x world size "
                f"{world_size} = {per_device * grad_accum * world_size}, not "
                f"--global-batch-size={global_batch}"
            )
    elif per_device is not None:
        if per_rank % per_device:
            raise ConfigError(
                f"--global-batch-size={global_batch} over {world_size} process(es) is {per_rank} "
                f"per process, not a multiple of --per-device-batch-size={per_device}"
            )
        grad_accum = per_rank // per_device
    elif grad_accum is not None:
        if per_rank % grad_accum:
            raise ConfigError(
                f"--global-batch-size={global_batch} over {world_size} process(es) is {per_rank} "
                f"per process, not divisible by --grad-accum={grad_accum}"
            )
        per_device = per_rank // grad_accum
    else:
        grad_accum = next(
            a
            for a in range(1, per_rank + 1)
            if per_rank % a == 0 and per_rank // a <= max_per_device
        )
        per_device = per_rank // grad_accum
    return BatchPlan(global_batch, per_device, grad_accum, world_size)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The training order of one epoch: the same on every rank, different every epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def micro_batch_indices(
    permutation: Tensor, plan: BatchPlan, step_in_epoch: int, micro: int, rank: int
) -> Tensor:
    """Indices of micro-batch ``micro`` of ``rank`` in optimizer step ``step_in_epoch``."""
    start = step_in_epoch * plan.global_batch + (micro * plan.world_size + rank) * plan.per_device
    return permutation[start : start + plan.per_device]


def eval_shard(
    num_samples: int, rank: int, world_size: int, batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s evaluation batches: indices ``rank::world_size``, and a validity mask.

    Every sample is evaluated exactly once across ranks. Every rank gets the same number of
    batches (sharded engines such as FSDP and ZeRO-3 need every rank in every forward), so the
    last batches of some ranks are padded with repeats whose mask is False.
    """
    own = torch.arange(rank, num_samples, world_size)
    per_rank = -(-num_samples // world_size)
    batches = max(1, -(-per_rank // batch_size))
    padded = torch.full((batches * batch_size,), own[0].item() if len(own) else 0)
    padded[: len(own)] = own
    valid = torch.zeros(batches * batch_size, dtype=torch.bool)
    valid[: len(own)] = True
    return [
        (padded[i : i + batch_size], valid[i : i + batch_size])
        for i in range(0, batches * batch_size, batch_size)
    ]
