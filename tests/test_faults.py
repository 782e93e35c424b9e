"""Faults that must not split the ranks: a non-finite gradient on ONE rank of a sharded run.

Under FSDP2 each rank holds a shard of the (already reduce-scattered) gradient, so a NaN can sit
in one rank's shard only. The optimizer's single all-reduce carries ||g||² to every rank, so all
ranks see the NaN and skip the same step; without it one rank would update and the shards
would silently diverge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from multirank import run_ranks
from torch import nn

from tvlars_scale import TVLARS

STEPS = 4
POISONED_STEP = 2
BAD_VALUES = (math.nan, math.inf)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(STEPS)]


def _fsdp2_with_bad_gradient_on_rank1(rank, world_size):
    return {str(bad): _train_with_bad_gradient(rank, world_size, bad) for bad in BAD_VALUES}


def _train_with_bad_gradient(rank, world_size, bad):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_net(), mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = TVLARS(model.parameters(), lr=1.0, eta=0.02, lmbda=0.1)
    history = []
    for step, (x, y) in enumerate(_batches()):
        shard = slice(rank * 4, (rank + 1) * 4)
        optimizer.zero_grad()
        F.mse_loss(model(x[shard]), y[shard]).backward()
        if step == POISONED_STEP and rank == 1:
            model[0].weight.grad.to_local().view(-1)[0] = bad
        before = [p.full_tensor().clone() for p in model.parameters()]
        optimizer.step()
        after = [p.full_tensor().clone() for p in model.parameters()]
        history.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))
    return {
        "unchanged": history,
        "step": optimizer.param_groups[0]["step"].item(),
        "skipped": optimizer.skipped_steps.item(),
        "params": [p.full_tensor() for p in model.parameters()],
    }


def test_nan_on_one_rank_skips_the_step_on_every_rank():
    per_rank = run_ranks(_fsdp2_with_bad_gradient_on_rank1, 2)
    for bad in BAD_VALUES:
        results = [r[str(bad)] for r in per_rank]
        for r in results:
            assert r["unchanged"] == [i == POISONED_STEP for i in range(STEPS)]
            assert r["step"] == STEPS - 1 and r["skipped"] == 1
            assert all(torch.isfinite(p).all() for p in r["params"])
        for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
            assert torch.equal(a, b)
