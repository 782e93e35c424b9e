"""Faults that must not split the ranks: a non-finite gradient on ONE rank of a sharded run.

Under FSDP2 each rank holds a shard of the (already reduce-scattered) gradient, and under
DeepSpeed ZeRO-2 each rank steps its own flat fp32 partition, so a NaN can sit in one rank's
piece only. The optimizer's single all-reduce carries ||g||² to every rank, so all ranks see the
NaN and skip the same step; without it one rank would update and the shards would silently
diverge. One spawned world runs both engines.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from deepspeed_common import batches as ds_batches
from deepspeed_common import loss_fn, make_model
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


def _bad_gradient_on_rank1(rank, world_size):
    return {
        engine: {str(bad): train(rank, world_size, bad) for bad in BAD_VALUES}
        for engine, train in (("fsdp2", _fsdp2), ("zero2", _zero2))
    }


def _fsdp2(rank, world_size, bad):
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


def _zero2(rank, world_size, bad):
    """DeepSpeed ZeRO-2, TVLARS from the JSON: poison rank 1's flat fp32 gradient partition
    (what the basic optimizer steps) at POISONED_STEP, inside the basic step, i.e. after
    DeepSpeed's own overflow check (which catches a NaN already in the reduced gradients, and
    counts it in ``engine.skipped_steps``; tests/test_elastic.py covers that path)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute JIT build
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "TVLARS", "params": {"lr": 0.5, "eta": 0.1, "lmbda": 0.5}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**6,
    }
    model = make_model()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    basic = engine.basic_optimizer
    step_basic, calls = basic.step, []

    def poisoned_step(*args, **kwargs):
        if len(calls) == POISONED_STEP and rank == 1:
            for flat in engine.optimizer.single_partition_of_fp32_groups:
                flat.grad.view(-1)[0] = bad
        calls.append(1)
        return step_basic(*args, **kwargs)

    basic.step = poisoned_step
    full = lambda: [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]  # noqa: E731
    history = []
    for x, y in ds_batches(STEPS):
        rows = slice(rank * 4, (rank + 1) * 4)
        before = full()
        engine.backward(loss_fn(engine(x[rows]), y[rows]))
        engine.step()
        history.append(all(torch.equal(a, b) for a, b in zip(before, full(), strict=True)))
    return {
        "unchanged": history,
        "step": basic.param_groups[0]["step"].item(),
        "skipped": basic.skipped_steps.item(),
        "params": full(),
    }


@pytest.fixture(scope="module")
def per_rank():
    return run_ranks(_bad_gradient_on_rank1, 2)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2"])
def test_nan_on_one_rank_skips_the_step_on_every_rank(per_rank, engine):
    for bad in BAD_VALUES:
        results = [r[engine][str(bad)] for r in per_rank]
        for r in results:
            assert r["unchanged"] == [i == POISONED_STEP for i in range(STEPS)]
            assert r["step"] == STEPS - 1 and r["skipped"] == 1
            assert all(torch.isfinite(p).all() for p in r["params"])
        for a, b in zip(results[0]["params"], results[1]["params"], strict=True):
            assert torch.equal(a, b)
