"""A DeepSpeed JSON ``"optimizer": {"type": "TVLARS"}`` builds our optimizer (ZeRO stage 0)."""

from __future__ import annotations

import torch
from multirank import run_ranks

STEPS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    )


def _batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(STEPS)
    ]


def _train_with_deepspeed(rank, world_size):
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute JIT build
    import tvlars_scale

    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "TVLARS", "params": {"lr": 5.0, "lmbda": 0.05, "weight_decay": 1e-3}},
    }
    engine, optimizer, _, _ = deepspeed.initialize(
        model=_model(), model_parameters=None, config=config, dist_init_required=False
    )
    assert isinstance(optimizer, tvlars_scale.TVLARS), type(optimizer)
    for x, y in _batches():
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
    return {
        "params": [p.detach().clone() for p in engine.module.parameters()],
        "step": optimizer.param_groups[0]["step"].item(),
    }


def test_deepspeed_json_type_tvlars_trains_like_plain_tvlars():
    import tvlars_scale

    (result,) = run_ranks(_train_with_deepspeed, 1)
    model = _model()
    opt = tvlars_scale.TVLARS(model.parameters(), lr=5.0, lmbda=0.05, weight_decay=1e-3)
    for x, y in _batches():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert result["step"] == STEPS
    for got, want in zip(result["params"], model.parameters(), strict=True):
        # Same fp32 math in the same order on one rank: only op scheduling may differ.
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
