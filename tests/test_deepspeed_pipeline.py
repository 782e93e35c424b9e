"""DeepSpeed pipeline parallelism: ``PipelineModule`` + ``PipelineEngine`` with ZeRO-1 and the
optimizer named in the JSON, 2 stages x 2 data-parallel ranks on 4 CPU ranks (gloo).

Each stage's ZeRO-1 wrapper cuts the stage's flat fp32 buffer across its 2 dp ranks, so layers
are split and their norms must be reduced over the stage's dp group (the ``deepspeed`` layout);
the step decision spans all 4 ranks. The run equals a single-process run on the same global
batches (``equivalence``: fp32, rtol 1e-5); with per-partition norms (a test adapter that maps
each flat partition to one layer) it misses. A NaN gradient in the last stage on the second
step is caught by DeepSpeed itself (its overflow check spans the pipeline) and every stage skips
the step with equal counters. The exact run binds the engine (``tvlars_scale.deepspeed.bind``);
the others find DeepSpeed's wrapper among the callers of ``step()``, the fallback.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from equivalence import OPTIMIZERS, assert_matches, misses, recorded_all_reduce, single_process
from multirank import run_ranks
from torch import nn
from torch.torch_version import TorchVersion

from tvlars_scale import UnmappableLayoutError

STEPS = 3
MICRO = 2  # samples per micro-batch per dp rank
GAS = 2  # micro-batches per step
DP = 2
KW = OPTIMIZERS["TVLARS"][1]  # the comparator's TVLARS settings, as JSON params


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = DP * GAS * MICRO
    return [(torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)) for _ in range(STEPS)]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def poison_head(step: int, weight_grad: torch.Tensor) -> torch.Tensor:
    return weight_grad * math.nan if step == 1 else weight_grad


def _config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "TVLARS", "params": dict(KW)},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**6,
    }


def _per_partition_adapter():
    """Each flat partition as one layer: what a layer-wise optimizer unaware of ZeRO does."""
    from tvlars_scale.layouts import GroupLayout, Layer, Segment, register_adapter

    def per_tensor(params, ctx):
        if all(ctx.is_original(p) for p in params):
            return None
        layers_ = [Layer(f"flat{j}", (1, p.numel())) for j, p in enumerate(params)]
        return GroupLayout(layers_, [Segment(j, j) for j in range(len(params))], kind="naive")

    return register_adapter("naive", per_tensor)


def _run(
    rank: int, world_size: int, naive: bool = False, poison: bool = False, bind: bool = False
) -> dict:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import tvlars_scale.deepspeed

    model = PipelineModule(layers=layers(), num_stages=2, loss_fn=loss_fn)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=_config()
    )
    if bind:  # the explicit binding; the other runs find the wrapper among step()'s callers
        tvlars_scale.deepspeed.bind(engine)
    handle = _per_partition_adapter() if naive else None
    basic = engine.basic_optimizer
    calls: list[list] = []
    inner_step = basic.step

    def step(*args, **kwargs):  # record the all-reduces of the optimizer's own step only
        calls.append([])
        with recorded_all_reduce(calls[-1]):
            return inner_step(*args, **kwargs)

    basic.step = step
    current = {"step": 0}
    if poison and engine.is_last_stage():
        head = list(model.parameters())[-2]
        head.register_hook(lambda g: poison_head(current["step"], g))
    dp_rank = engine.grid.get_data_parallel_rank()
    for index, (x, y) in enumerate(batches()):
        current["step"] = index
        rows = slice(dp_rank * GAS * MICRO, (dp_rank + 1) * GAS * MICRO)
        micro = list(zip(x[rows].split(MICRO), y[rows].split(MICRO), strict=True))
        engine.train_batch(iter(micro))
    if handle is not None:
        handle.remove()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "stats": basic.layer_stats().to_dict(),
        "steps": [float(g["step"]) for g in basic.param_groups],
        "skipped": [float(g["skipped_steps"]) for g in basic.param_groups],
        "kinds": sorted({plan.layout.kind for plan in basic._plans.values()}),
        "calls": calls,
        "dp_group": tuple(dist.get_process_group_ranks(engine.optimizer.real_dp_process_group[0])),
        "wrapper": type(engine.optimizer).__name__,
    }


def _world(rank: int, world_size: int) -> dict:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-min JIT build
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the world multirank started
    if TorchVersion(deepspeed.__version__) < "0.19":  # refused there (docs/compatibility.md)
        try:
            _run(rank, world_size, bind=True)
        except UnmappableLayoutError as exc:
            return {"refused": str(exc)}
    return {
        "exact": _run(rank, world_size, bind=True),
        "naive": _run(rank, world_size, naive=True),
        "nan": _run(rank, world_size, poison=True),
    }


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("deepspeed", reason='pip install -e ".[test]" installs DeepSpeed')
    return run_ranks(_world, 2 * DP)


def _reference(poisoned: bool = False) -> dict:
    def poison(step, net):
        if step == 1:
            net[4].weight.grad.view(-1)[0] = math.nan

    return single_process(
        lambda: nn.Sequential(*layers()),
        "TVLARS",
        batches(),
        loss_fn,
        poison if poisoned else None,
    )


def _ran(world) -> list[dict]:
    if "refused" in world[0]:
        pytest.skip(world[0]["refused"])
    return world


def test_refused_before_deepspeed_0_19(world):
    """DeepSpeed 0.16.9's pipeline run differed from one process: older releases are refused
    at the first step; from 0.19 the run goes ahead (and the tests below compare it)."""
    import deepspeed

    if TorchVersion(deepspeed.__version__) < "0.19":
        for result in world:
            assert "DeepSpeed's PipelineEngine needs deepspeed >= 0.19" in result["refused"]
    else:
        assert all("refused" not in result for result in world)


def test_pipeline_stages_match_single_process(world):
    ref = _reference()
    for result in _ran(world):
        exact = result["exact"]
        assert exact["wrapper"] == "DeepSpeedZeroOptimizer"
        assert exact["kinds"] == ["deepspeed_zero12"]
        assert_matches(exact, ref, list(exact["params"]))
        assert misses(result["naive"], ref)


def test_one_norm_reduction_per_stage_and_one_decision(world):
    for result in _ran(world):
        exact = result["exact"]
        n_layers = len(exact["params"])
        expected = sorted([(exact["dp_group"], 2 * n_layers), ((0, 1, 2, 3), 1)])
        assert exact["calls"] == [expected] * STEPS


def test_a_nan_in_one_stage_skips_every_stage(world):
    ref = _reference(poisoned=True)
    for result in _ran(world):
        nan = result["nan"]
        assert nan["steps"] == [STEPS - 1.0]  # every stage: the same step skipped (by DeepSpeed)
        assert_matches(nan, ref, list(nan["params"]))
