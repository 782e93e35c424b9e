"""Exact norms and one decision under tensor and pipeline parallelism (CPU, gloo).

Two spawned worlds train one small model for 3 steps in each layout and return the full
parameters, the telemetry, the counters and every all-reduce the optimizer issued; each run is
compared with a single-process run on the same global batches (``equivalence``):

- 4 ranks: FSDP2 + TP on a 2x2 ``(dp, tp)`` mesh (TVLARS, LARS, LAMB), TP alone on 4 ranks, and
  2 pipeline stages x 2 dp ranks (FSDP2 per stage, ``torch.distributed.pipelining``);
- 2 ranks: 2 pipeline stages, 4 interleaved stages (2 per rank, one optimizer per rank over
  both), a NaN gradient in one stage, TP with a ``SequenceParallel`` LayerNorm, and refusals.

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
#: torch 2.9's own pipeline schedule fails on gloo at its first step, inside the stage
#: initialisation and before any optimizer code runs ("Received data size doesn't match
#: expected size"); TP, FSDP2 + TP and SequenceParallel pass there (docs/compatibility.md).
NO_PIPELINES = torch.torch_version.TorchVersion(torch.__version__) < "2.10"
NEEDS_PIPELINES = pytest.mark.skipif(
    NO_PIPELINES, reason=f"torch {torch.__version__}'s pipelining fails on gloo (torch 2.9)"
)
POISONED_STEP = 1  # the second step


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    )


#: Modules per pipeline stage: 0-2 on stage 0, 3-4 on stage 1.
STAGE_MODULES = ((0, 1, 2), (3, 4))
#: Modules per stage of the interleaved schedule: stages 0 and 2 on rank 0, 1 and 3 on rank 1.
INTERLEAVED_MODULES = ((0,), (1, 2), (3,), (4,))
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


def stage_module(stage: int, stages=STAGE_MODULES) -> nn.Sequential:
    """The whole net with the other stages' modules replaced by ``Identity``, so that parameter
    names match the single-process model's."""
    net = make_net()
    for index in range(len(net)):
        if index not in stages[stage]:
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


def run_interleaved(rank, ws, opt_name, poison=True):
    """4 stages on 2 ranks (``ScheduleInterleaved1F1B``); each rank builds ONE optimizer over
    both of its stages (a param group each), so one step() call decides for both."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    n_stages = len(INTERLEAVED_MODULES)
    parts = [stage_module(s, INTERLEAVED_MODULES) for s in range(rank, n_stages, ws)]
    stages = [
        PipelineStage(part, s, n_stages, torch.device("cpu"))
        for s, part in zip(range(rank, n_stages, ws), parts, strict=True)
    ]
    schedule = ScheduleInterleaved1F1B(stages, n_microbatches=2, loss_fn=F.mse_loss)
    opt = make_optimizer(opt_name, [{"params": list(p.named_parameters())} for p in parts])
    per_step = []
    for step, (x, y) in enumerate(batches()):
        opt.zero_grad()
        schedule.step(x) if rank == 0 else schedule.step(target=y)
        if poison and rank == (n_stages - 1) % ws:  # the head: stage 3
            poison_head(step, parts[-1])
        calls = []
        with recorded_all_reduce(calls):
            opt.step()
        per_step.append(calls)
    params = {n: p for part in parts for n, p in part.named_parameters()}
    return result_of(opt, params, per_step)


def run_sequence_parallel(rank, ws, opt_name):
    """TP with torchtitan's plan for norms: a ``SequenceParallel`` LayerNorm (its weight is
    Replicate, its gradient a Partial sum over tp), then Colwise -> Rowwise over the sequence
    shards. Each rank's loss is its sequence shard's mean / ws, so the ranks' losses add up to
    the single process's mean."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    plan = {
        "0": SequenceParallel(),
        "1": ColwiseParallel(input_layouts=Shard(1)),
        "3": RowwiseParallel(output_layouts=Shard(1)),
    }
    net = parallelize_module(make_sp_net(), mesh, plan)
    opt = make_optimizer(opt_name, net.named_parameters())
    per_step = []
    for x, y in sp_batches():
        opt.zero_grad()
        out = net(x.chunk(ws, dim=1)[rank])
        (F.mse_loss(out, y.chunk(ws, dim=1)[rank]) / ws).backward()
        calls = []
        with recorded_all_reduce(calls):
            opt.step()
        per_step.append(calls)
    result = result_of(opt, {n: full(p) for n, p in net.named_parameters()}, per_step)
    result["grad_placements"] = str(net[0].weight.grad.placements)
    return result


def make_sp_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def sp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g))] * STEPS


def group_names_stay_in_step(rank, ws) -> dict:
    """A process group the optimizer creates for some ranks only (here: a flattened slice that
    ranks 0 and 1 need) must not shift the names of groups the job creates afterwards: torch
    derives them from a counter that such a creation advances on its members only."""
    from torch.distributed import distributed_c10d

    from tvlars_scale.groups import group_over

    if rank < 2:
        group_over((0, 1))
    counts = [None] * ws
    dist.all_gather_object(counts, distributed_c10d._world.group_count)
    total = None
    if len(set(counts)) == 1:  # else a new world-wide group would hang: report instead
        later = dist.new_group(list(range(ws)))
        ones = torch.ones(1)
        dist.all_reduce(ones, group=later)
        total = float(ones)
    return {"counts": counts, "later_group_sum": total}


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


def model_group_without_this_rank_error(rank, ws) -> str:
    """Refused when the optimizer is built, before training starts."""
    try:
        make_optimizer("LARS", make_net().named_parameters(), model_group=((rank + 1) % ws,))
    except ValueError as exc:
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
    "naive-fsdp2_tp_LARS": (run_fsdp2_tp, ("LARS", True)),
    "naive-fsdp2_tp_LAMB": (run_fsdp2_tp, ("LAMB", True)),
    "naive-tp": (run_tp, ("TVLARS", True)),
    "naive-pp_dp": (run_pipeline, ("TVLARS", 2, True)),
}
SCENARIOS_2 = {
    "pp-TVLARS": (run_pipeline, ("TVLARS",)),
    "pp_nan-LARS": (run_pipeline, ("LARS", 1, False, True)),
    "naive-pp_nan": (run_pipeline, ("LARS", 1, True, True)),
    "interleaved_nan-TVLARS": (run_interleaved, ("TVLARS",)),
    "sp-LARS": (run_sequence_parallel, ("LARS",)),
}


def is_pipeline(scenario: str) -> bool:
    table = SCENARIOS_4 if scenario in SCENARIOS_4 else SCENARIOS_2
    return table[scenario][0] in (run_pipeline, run_interleaved)


def runnable(table: dict) -> dict:
    return {s: v for s, v in table.items() if not (NO_PIPELINES and is_pipeline(s))}


def scenarios(table: dict) -> list:
    """The scenarios of ``table`` that compare with a single process, as test parameters."""
    return [
        pytest.param(s, marks=NEEDS_PIPELINES) if is_pipeline(s) else s
        for s in table
        if not s.startswith("naive")
    ]


def world_4(rank, ws):
    out = {name: fn(rank, ws, *args) for name, (fn, args) in runnable(SCENARIOS_4).items()}
    out["group-names"] = group_names_stay_in_step(rank, ws)
    return out


def world_2(rank, ws):
    out = {name: fn(rank, ws, *args) for name, (fn, args) in runnable(SCENARIOS_2).items()}
    out["unknown-placement"] = unknown_placement_error(rank, ws)
    out["narrow-model-group"] = narrow_model_group_error(rank, ws)
    out["foreign-model-group"] = model_group_without_this_rank_error(rank, ws)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world_4, 4)


@pytest.fixture(scope="module")
def world2():
    return run_ranks(world_2, 2)


_REFERENCES: dict = {}


def reference(opt_name: str, poisoned: bool = False, sp: bool = False) -> dict:
    key = (opt_name, poisoned, sp)
    if key not in _REFERENCES:
        poison = poison_head if poisoned else None
        net, data = (make_sp_net, sp_batches()) if sp else (make_net, batches())
        _REFERENCES[key] = single_process(net, opt_name, data, F.mse_loss, poison)
    return _REFERENCES[key]


def stage_names(stage: int) -> list[str]:
    return [
        n for n, _ in make_net().named_parameters() if int(n.split(".")[0]) in STAGE_MODULES[stage]
    ]


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("scenario", scenarios(SCENARIOS_4))
def test_four_ranks_match_single_process(world4, scenario):
    opt_name = scenario.rsplit("-", 1)[1]
    ref = reference(opt_name, poisoned="nan" in scenario)
    for result in world4:
        stage = result[scenario].get("stage")
        assert_matches(result[scenario], ref, None if stage is None else stage_names(stage))


@pytest.mark.parametrize("scenario", scenarios(SCENARIOS_2))
def test_two_ranks_match_single_process(world2, scenario):
    opt_name = scenario.rsplit("-", 1)[1]
    ref = reference(opt_name, poisoned="nan" in scenario, sp=scenario.startswith("sp"))
    for result in world2:
        stage = result[scenario].get("stage")
        assert_matches(result[scenario], ref, None if stage is None else stage_names(stage))


def test_sequence_parallel_gradients_are_completed(world2):
    """The LayerNorm's gradient is a Partial sum over tp (what made it look unreduced)."""
    assert world2[0]["sp-LARS"]["grad_placements"] == "(Partial(sum),)"


def test_fsdp2_tp_placements_are_the_strided_ones(world4):
    """The case that was silently wrong: FSDP2's dp shard on top of a TP shard."""
    placements = world4[0]["fsdp2_tp-TVLARS"]["placements"]
    assert placements["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["3.weight"] == "(Shard(dim=0),)"  # the LayerNorm: dp only


@pytest.mark.parametrize(
    ("naive", "opt_name"),
    [
        ("fsdp2_tp", "TVLARS"),
        ("fsdp2_tp_LARS", "LARS"),
        ("fsdp2_tp_LAMB", "LAMB"),
        ("tp", "TVLARS"),
        pytest.param("pp_dp", "TVLARS", marks=NEEDS_PIPELINES),
    ],
)
def test_without_the_reduction_the_comparison_fails(world4, naive, opt_name):
    ref = reference(opt_name)
    assert all(misses(result[f"naive-{naive}"], ref) for result in world4)


@NEEDS_PIPELINES
def test_a_nan_in_one_stage_makes_every_stage_skip(world2, world4):
    """Every stage skips the poisoned step and keeps equal counters; per-rank decisions (the
    all-reduces dropped) would let stage 0 step while stage 1 skips."""
    runs = [r["pp_nan-LARS"] for r in world2] + [r["pp_dp_nan-TVLARS"] for r in world4]
    for run in runs:
        assert (run["steps"], run["skipped"]) == ([STEPS - 1.0], [1.0]), run["stage"]
    for result in world2:  # interleaved: one optimizer per rank, a param group per stage
        run = result["interleaved_nan-TVLARS"]
        assert (run["steps"], run["skipped"]) == ([STEPS - 1.0] * 2, [1.0] * 2)
    naive = [r["naive-pp_nan"] for r in world2]
    assert {r["stage"]: r["steps"] for r in naive} == {0: [3.0], 1: [2.0]}


def calls_of(result: dict) -> list:
    return result["calls"]


def test_collectives_per_step(world4):
    """1-D: one all-reduce carries the norms and the decision. 2-D: one per set of reduce ranks,
    the decision riding on the one over the whole model."""
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


@NEEDS_PIPELINES
def test_collectives_per_step_across_stages(world2, world4):
    """PP: the norms over each stage's shard group, plus one scalar over the model."""
    for result in world4:  # 2 stages x 2 dp: each stage's layers over its dp pair, then 1 float
        pp_dp = result["pp_dp-TVLARS"]
        n_stage = len(stage_names(pp_dp["stage"]))
        expected = sorted([(pp_dp["dp_group"], 2 * n_stage), ((0, 1, 2, 3), 1)])
        assert calls_of(pp_dp) == [expected] * STEPS
    for result in world2:  # 2 stages, whole layers: only the decision
        assert calls_of(result["pp-TVLARS"]) == [[((0, 1), 1)]] * STEPS


def test_groups_made_for_some_ranks_leave_later_group_names_alone(world4):
    counts = {tuple(r["group-names"]["counts"]) for r in world4}
    assert len(counts) == 1 and len(next(iter(counts))) == 4  # the same counter on every rank
    assert all(r["group-names"]["later_group_sum"] == 4.0 for r in world4)


def test_model_group_must_hold_every_piece(world2):
    message = world2[0]["narrow-model-group"]
    assert "is split over ranks (0, 1)" in message and "model_group" in message


def test_model_group_must_include_this_rank(world2):
    message = world2[0]["foreign-model-group"]
    assert "invalid model_group=(1,) on rank 0 of 2" in message and "include this rank" in message


def test_unknown_placement_is_refused(world2):
    message = world2[0]["unknown-placement"]
    assert "NewShard" in message and "is not a placement tvlars_scale knows" in message
    assert "'w'" in message  # names the parameter
