"""Exact norms and one decision under tensor and pipeline parallelism (CPU, gloo).

Two spawned worlds train one small model for 3 steps in each layout and return the full
parameters, the telemetry, the counters and every all-reduce the optimizer issued; each run is
compared with a single-process run on the same global batches (``equivalence``):

- 4 ranks: FSDP2 + TP on a 2x2 ``(dp, tp)`` mesh (TVLARS, LARS, LAMB), TP alone on 4 ranks, and
  2 pipeline stages x 2 dp ranks (FSDP2 per stage, ``torch.distributed.pipelining``);
- 2 ranks: 2 pipeline stages, a NaN gradient in one stage, and an unknown placement.

Each layout also runs once with the all-reduces dropped (per-shard norms, per-rank decisions),
which must miss the tolerance: the comparisons can fail. The model is a TP block
(``ColwiseParallel`` -> ``RowwiseParallel``), a LayerNorm kept replicated over the tp dim, and an
uneven head (3 rows: FSDP2 splits it 2/1). Sizes are divisible by the tp degree, which
``RowwiseParallel`` needs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import (
    assert_matches,
    make_optimizer,
    misses,
    recorded_all_reduce,
    result_of,
    single_process,
)
from multirank import run_ranks
from torch import nn

from tvlars_scale import UnmappableLayoutError

STEPS = 3
GLOBAL_BATCH = 8
POISONED_STEP = 1  # the second step


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    )


#: Layer names per pipeline stage: modules 0-2 on stage 0, 3-4 on stage 1.
STAGE_MODULES = ((0, 1, 2), (3, 4))
N_LAYERS = 8


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


def poison_head(step: int, net: nn.Module) -> None:
    """A NaN in the head's gradient (pipeline stage 1) on the second step."""
    if step == POISONED_STEP:
        grad = net[4].weight.grad
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        grad.view(-1)[0] = math.nan


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step_all(model, opt, rank_batches, skip_reduce=False, poison=None) -> list[list]:
    """3 steps of plain data-parallel training on this rank's batches; all-reduces per step."""
    per_step = []
    for step, (x, y) in enumerate(rank_batches):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if poison is not None:
            poison(step, model)
        calls = []
        with recorded_all_reduce(calls, skip=skip_reduce):
            opt.step()
        per_step.append(calls)
    return per_step


def tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"0": ColwiseParallel(), "2": RowwiseParallel()}


# ---------------------------------------------------------------------------------- layouts
def run_fsdp2_tp(rank, ws, opt_name, skip_reduce=False):
    """torchtitan's order: TP on mesh["tp"], then FSDP2 on mesh["dp"]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    net = parallelize_module(make_net(), mesh["tp"], tp_plan())
    for index in (0, 2, 4):
        fully_shard(net[index], mesh=mesh["dp"])
    fully_shard(net, mesh=mesh["dp"])
    opt = make_optimizer(opt_name, net.named_parameters())
    dp = mesh["dp"].get_local_rank()
    mine = [(x.chunk(2)[dp], y.chunk(2)[dp]) for x, y in batches()]
    calls = step_all(net, opt, mine, skip_reduce)
    result = result_of(opt, {n: full(p) for n, p in net.named_parameters()}, calls)
    result["placements"] = {n: str(p.placements) for n, p in net.named_parameters()}
    result["dp_group"] = tuple(dist.get_process_group_ranks(mesh.get_group("dp")))
    return result


def run_tp(rank, ws, opt_name, skip_reduce=False):
    """TP alone on 4 ranks: every rank sees the whole batch; the LayerNorm and head stay plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    net = parallelize_module(make_net(), mesh, tp_plan())
    opt = make_optimizer(opt_name, net.named_parameters())
    calls = step_all(net, opt, batches(), skip_reduce)
    return result_of(opt, {n: full(p) for n, p in net.named_parameters()}, calls)


def stage_module(stage: int) -> nn.Sequential:
    """The whole net with the other stage's modules replaced by ``Identity``, so that parameter
    names match the single-process model's."""
    net = make_net()
    for index in range(len(net)):
        if index not in STAGE_MODULES[stage]:
            net[index] = nn.Identity()
    return net


def run_pipeline(rank, ws, opt_name, dp=1, skip_reduce=False, poison=False):
    """2 stages (``PipelineStage`` + ``ScheduleGPipe``, 2 micro-batches), one optimizer per
    stage; with ``dp=2`` each stage is ``fully_shard``ed over its own pair of ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh("cpu", (2, dp), mesh_dim_names=("pp", "dp"))
    stage_index = mesh["pp"].get_local_rank()
    dp_rank = mesh["dp"].get_local_rank()
    net = stage_module(stage_index)
    if dp > 1:
        fully_shard(net, mesh=mesh["dp"])
    stage = PipelineStage(net, stage_index, 2, torch.device("cpu"), group=mesh.get_group("pp"))
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=F.mse_loss)
    opt = make_optimizer(opt_name, net.named_parameters())
    per_step = []
    for step, (x, y) in enumerate(batches()):
        x, y = x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank]
        opt.zero_grad()
        if stage_index == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        if poison and stage_index == 1:
            poison_head(step, net)
        calls = []
        with recorded_all_reduce(calls, skip=skip_reduce):
            opt.step()
        per_step.append(calls)
    params = {n: full(p) for n, p in net.named_parameters()}
    result = result_of(opt, params, per_step)
    result["stage"] = stage_index
    result["dp_group"] = tuple(dist.get_process_group_ranks(mesh.get_group("dp")))
    return result


# ---------------------------------------------------------------------------------- errors
def unknown_placement_error(rank, ws) -> str:
    """A new placement type (here a stand-in subclass of Shard) is refused, not guessed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    class NewShard(Shard):
        pass

    mesh = init_device_mesh("cpu", (ws,))
    # (nn.Parameter() would rebuild the placements as plain Shard: keep the DTensor itself)
    p = DTensor.from_local(torch.ones(3, 2), mesh, [NewShard(0)]).requires_grad_()
    p.grad = DTensor.from_local(torch.ones(3, 2), mesh, [NewShard(0)])
    opt = make_optimizer("TVLARS", [("w", p)])
    try:
        opt.step()
    except UnmappableLayoutError as exc:
        return str(exc)
    return "no error raised"


def narrow_model_group_error(rank, ws) -> str:
    """A model group that leaves out ranks holding pieces of a layer is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws, 1), mesh_dim_names=("shard", "alone"))
    net = fully_shard(make_net(), mesh=mesh["shard"])
    opt = make_optimizer("LARS", net.named_parameters(), model_group=mesh["alone"])
    F.mse_loss(net(batches()[0][0]), batches()[0][1]).backward()
    try:
        opt.step()
    except UnmappableLayoutError as exc:
        return str(exc)
    return "no error raised"


# ---------------------------------------------------------------------------------- worlds
SCENARIOS_4 = {
    "fsdp2_tp-TVLARS": (run_fsdp2_tp, ("TVLARS",)),
    "fsdp2_tp-LARS": (run_fsdp2_tp, ("LARS",)),
    "fsdp2_tp-LAMB": (run_fsdp2_tp, ("LAMB",)),
    "tp-TVLARS": (run_tp, ("TVLARS",)),
    "pp_dp-TVLARS": (run_pipeline, ("TVLARS", 2)),
    "pp_dp_nan-TVLARS": (run_pipeline, ("TVLARS", 2, False, True)),
    "naive-fsdp2_tp": (run_fsdp2_tp, ("TVLARS", True)),
    "naive-tp": (run_tp, ("TVLARS", True)),
    "naive-pp_dp": (run_pipeline, ("TVLARS", 2, True)),
}
SCENARIOS_2 = {
    "pp-TVLARS": (run_pipeline, ("TVLARS",)),
    "pp_nan-LARS": (run_pipeline, ("LARS", 1, False, True)),
    "naive-pp_nan": (run_pipeline, ("LARS", 1, True, True)),
}


def world_4(rank, ws):
    return {name: fn(rank, ws, *args) for name, (fn, args) in SCENARIOS_4.items()}


def world_2(rank, ws):
    out = {name: fn(rank, ws, *args) for name, (fn, args) in SCENARIOS_2.items()}
    out["unknown-placement"] = unknown_placement_error(rank, ws)
    out["narrow-model-group"] = narrow_model_group_error(rank, ws)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world_4, 4)


@pytest.fixture(scope="module")
def world2():
    return run_ranks(world_2, 2)


_REFERENCES: dict = {}


def reference(opt_name: str, poisoned: bool = False) -> dict:
    key = (opt_name, poisoned)
    if key not in _REFERENCES:
        poison = poison_head if poisoned else None
        _REFERENCES[key] = single_process(make_net, opt_name, batches(), F.mse_loss, poison)
    return _REFERENCES[key]


def stage_names(stage: int) -> list[str]:
    return [
        n for n, _ in make_net().named_parameters() if int(n.split(".")[0]) in STAGE_MODULES[stage]
    ]


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS_4 if not s.startswith("naive")])
def test_four_ranks_match_single_process(world4, scenario):
    opt_name = scenario.rsplit("-", 1)[1]
    ref = reference(opt_name, poisoned="nan" in scenario)
    for result in world4:
        stage = result[scenario].get("stage")
        assert_matches(result[scenario], ref, None if stage is None else stage_names(stage))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS_2 if not s.startswith("naive")])
def test_two_pipeline_stages_match_single_process(world2, scenario):
    opt_name = scenario.rsplit("-", 1)[1]
    ref = reference(opt_name, poisoned="nan" in scenario)
    for result in world2:
        assert_matches(result[scenario], ref, stage_names(result[scenario]["stage"]))


def test_fsdp2_tp_placements_are_the_strided_ones(world4):
    """The case that was silently wrong: FSDP2's dp shard on top of a TP shard."""
    placements = world4[0]["fsdp2_tp-TVLARS"]["placements"]
    assert placements["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["3.weight"] == "(Shard(dim=0),)"  # the LayerNorm: dp only


@pytest.mark.parametrize("layout", ["fsdp2_tp", "tp", "pp_dp"])
def test_without_the_reduction_the_comparison_fails(world4, layout):
    ref = reference("TVLARS")
    assert all(misses(result[f"naive-{layout}"], ref) for result in world4)


def test_a_nan_in_one_stage_makes_every_stage_skip(world2, world4):
    """Every stage skips the poisoned step and keeps equal counters; per-rank decisions (the
    all-reduces dropped) would let stage 0 step while stage 1 skips."""
    runs = [r["pp_nan-LARS"] for r in world2] + [r["pp_dp_nan-TVLARS"] for r in world4]
    for run in runs:
        assert (run["steps"], run["skipped"]) == ([STEPS - 1.0], [1.0]), run["stage"]
    naive = [r["naive-pp_nan"] for r in world2]
    assert {r["stage"]: r["steps"] for r in naive} == {0: [3.0], 1: [2.0]}


def calls_of(result: dict) -> list:
    return result["calls"]


def test_collectives_per_step(world2, world4):
    """1-D: one all-reduce carries the norms and the decision. 2-D: one per set of reduce ranks,
    the decision riding on the one over the whole model. PP: the norms over each stage's shard
    group, plus one scalar over the model."""
    everyone = (0, 1, 2, 3)
    for result in world4:
        # TP alone: the TP layers (2 weights, 1 bias: 6 floats) + the decision, over the world;
        # the Rowwise bias, the LayerNorm and the head are whole on every rank.
        assert calls_of(result["tp-TVLARS"]) == [[(everyone, 2 * 3 + 1)]] * STEPS
        # FSDP2 + TP: the TP weights and the Colwise bias split over dp x tp = the world
        # (3 layers + the decision); the Rowwise bias, LayerNorm and head over dp only (4).
        dp_group = result["fsdp2_tp-TVLARS"]["dp_group"]
        expected = sorted([(everyone, 2 * 3 + 1), (dp_group, 2 * 5)])
        assert calls_of(result["fsdp2_tp-TVLARS"]) == [expected] * STEPS
        # 2 stages x 2 dp: each stage's layers over its dp pair, then the decision (1 float).
        pp_dp = result["pp_dp-TVLARS"]
        n_stage = len(stage_names(pp_dp["stage"]))
        expected = sorted([(pp_dp["dp_group"], 2 * n_stage), (everyone, 1)])
        assert calls_of(pp_dp) == [expected] * STEPS
    for result in world2:  # 2 stages, whole layers: only the decision
        assert calls_of(result["pp-TVLARS"]) == [[((0, 1), 1)]] * STEPS


def test_model_group_must_hold_every_piece(world2):
    message = world2[0]["narrow-model-group"]
    assert "is split over ranks (0, 1)" in message and "model_group" in message


def test_unknown_placement_is_refused(world2):
    message = world2[0]["unknown-placement"]
    assert "NewShard" in message and "is not a placement tvlars_scale knows" in message
    assert "'w'" in message  # names the parameter
