"""Exact layer-wise norms under FSDP1 over a tensor-parallel model (CPU, gloo), the 2-D recipe
from before FSDP2: ``parallelize_module`` on ``mesh["tp"]``, then ``FullyShardedDataParallel``
with ``device_mesh=mesh["dp"]`` and ``tvlars_scale.fsdp.bind(model)``.

One spawned 4-rank world (tp 2, data-parallel 2) trains ``test_parallelism``'s model (Colwise ->
Rowwise, then a LayerNorm and an uneven head that TP leaves whole; every Linear its own FSDP1
unit) for 3 steps with TVLARS, LARS and LAMB, each with ``use_orig_params`` False and True, and
compares every run with a single process on the same global batches (``equivalence``). FSDP1
flattens a TP layer's local slice, so its sums are completed in two stages: over the shard
group, then over the tp group. With the tp stage dropped the runs miss the tolerance: the
comparisons can fail. NO_SHARD (the tp stage alone) and HYBRID_SHARD run too, and the same
world checks the refusals.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from equivalence import OPTIMIZERS, assert_matches, make_optimizer, misses, result_of
from multirank import run_ranks
from test_fsdp import fsdp1_full_params
from test_parallelism import STEPS, batches, full, make_net, reference, step_all, tp_plan
from torch import nn

import tvlars_scale.fsdp
from tvlars_scale import UnmappableLayoutError

#: The layers (of 8) that ColwiseParallel and RowwiseParallel split: their sums need the tp stage.
TP_LAYERS = ("0.weight", "0.bias", "2.weight")
N_LAYERS = 8
TP = 2
WORLD = (0, 1, 2, 3)

#: FSDP1 layouts: (mesh shape, mesh dim names, sharding strategy). FSDP1 wraps over every dim
#: but "tp", the innermost, so a rank's data-parallel index is rank // TP. HYBRID_SHARD shards
#: over "shard" and replicates over "rep" (of size 1 here, to keep 4 ranks: with a 1-rank
#: "shard" instead, torch 2.14 falls back to NO_SHARD and then leaves the replicas' gradients
#: unreduced).
LAYOUTS = {
    "full": ((2, 2), ("dp", "tp"), "FULL_SHARD"),
    "noshard": ((2, 2), ("dp", "tp"), "NO_SHARD"),
    "hybrid": ((1, 2, 2), ("rep", "shard", "tp"), "HYBRID_SHARD"),
}


def make_mesh(layout: str):
    from torch.distributed.device_mesh import init_device_mesh

    shape, names, _ = LAYOUTS[layout]
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def fsdp1_tp_model(layout: str, use_orig_params: bool, fsdp_dims=None, tag=None):
    """(mesh, model): ``make_net`` under TP over ``mesh["tp"]``, then FSDP1 over the other
    mesh dims (or ``fsdp_dims``); ``tag(net)`` may edit the net before either wraps it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor.parallel import parallelize_module

    mesh, strategy = make_mesh(layout), LAYOUTS[layout][2]
    net = make_net()
    if tag is not None:
        tag(net)
    model = FSDP(
        parallelize_module(net, mesh["tp"], tp_plan()),
        device_mesh=mesh[fsdp_dims or tuple(d for d in mesh.mesh_dim_names if d != "tp")],
        sharding_strategy=getattr(ShardingStrategy, strategy),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),  # 4 units: 3 Linears and the root
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )
    return mesh, model


def run_fsdp1_tp(rank, ws, opt_name, use_orig_params, layout, drop_tp=False):
    """3 steps on this rank's data-parallel half of each batch; ``drop_tp`` drops the
    all-reduces over the tp group (the layers' second stage, nothing else)."""
    mesh, model = fsdp1_tp_model(layout, use_orig_params)
    tvlars_scale.fsdp.bind(model)
    opt = make_optimizer(opt_name, model.named_parameters())
    dp = rank // TP
    mine = [(x.chunk(ws // TP)[dp], y.chunk(ws // TP)[dp]) for x, y in batches()]
    tp_group = tuple(dist.get_process_group_ranks(mesh.get_group("tp")))
    skip = (lambda ranks: set(ranks) == set(tp_group)) if drop_tp else False
    calls = step_all(model, opt, mine, skip)
    full_params = {name: full(p) for name, p in fsdp1_full_params(model).items()}
    sharded = LAYOUTS[layout][2] != "NO_SHARD"
    return {
        **result_of(opt, full_params, calls),
        "shard_group": tuple(dist.get_process_group_ranks(model.process_group)) if sharded else (),
        "tp_group": tp_group,
        "kinds": sorted({plan.layout.kind for plan in opt._plans.values()}),
    }


def error_of(use_orig_params: bool, fsdp_dims=None, bind=True, tag=None) -> str:
    """The error of the first step under FSDP1 (FULL_SHARD) + TP, or "no error raised"."""
    _, model = fsdp1_tp_model("full", use_orig_params, fsdp_dims, tag)
    if bind:
        tvlars_scale.fsdp.bind(model)
    opt = make_optimizer("LARS", model.named_parameters())
    try:
        step_all(model, opt, batches()[:1])
    except UnmappableLayoutError as exc:
        return str(exc)
    return "no error raised"


def megatron_tag(net: nn.Module) -> None:
    """The head tagged as a Megatron TP slice, which FSDP1's layout cannot map."""
    net[4].weight.tensor_model_parallel = True


#: name -> (optimizer, use_orig_params, layout): every optimizer both ways under FULL_SHARD; two
#: more under NO_SHARD (flat only: torch 2.14's use_orig_params=True fails there over TP, "Cannot
#: writeback when the parameter shape changes") and HYBRID_SHARD.
RUNS = {
    f"{layout}-{kind}-{opt_name}": (opt_name, kind == "orig", layout)
    for layout, kind, opt_name in [
        *(("full", kind, opt_name) for kind in ("flat", "orig") for opt_name in OPTIMIZERS),
        ("noshard", "flat", "TVLARS"),
        ("noshard", "flat", "LAMB"),
        ("hybrid", "orig", "TVLARS"),
        ("hybrid", "flat", "LARS"),
    ]
}


def world_4(rank, ws):
    out = {name: run_fsdp1_tp(rank, ws, *args) for name, args in RUNS.items()}
    for name, args in RUNS.items():
        out[f"tp-dropped-{name}"] = run_fsdp1_tp(rank, ws, *args, drop_tp=True)
    out["errors"] = {
        "unbound-flat": error_of(False, bind=False),
        "fsdp-over-tp": error_of(False, fsdp_dims=("tp",)),
        "megatron-tagged": error_of(True, tag=megatron_tag),
    }
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world_4, 4)


def opt_name_of(run: str) -> str:
    return RUNS[run][0]


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp1_tp_matches_single_process(world4, run):
    ref = reference(opt_name_of(run))
    for result in world4:
        assert result[run]["kinds"] == ["fsdp1"]
        assert_matches(result[run], ref)


@pytest.mark.parametrize("run", list(RUNS))
def test_two_stages_one_all_reduce_each(world4, run):
    """Per step: the decision over the world; every layer's sums over the shard group, then
    the TP layers' over the tp group (stage 1, last). Unsharded (NO_SHARD), the TP layers are
    reduced over the tp group alone."""
    for result in world4:
        run_result = result[run]
        shard_group, tp = run_result["shard_group"], (run_result["tp_group"], 2 * len(TP_LAYERS))
        if shard_group:
            expected = [(WORLD, 1), (shard_group, 2 * N_LAYERS), tp]
        else:
            expected = [(WORLD, 1), tp]
        for calls in run_result["calls"]:
            assert sorted(calls) == sorted(expected)
            assert not shard_group or calls[-1] == tp
        assert len(run_result["calls"]) == STEPS


@pytest.mark.parametrize("run", list(RUNS))
def test_without_the_tp_stage_the_comparison_fails(world4, run):
    ref = reference(opt_name_of(run))
    assert all(misses(result[f"tp-dropped-{run}"], ref) for result in world4)


def test_unbound_flat_parameter_asks_for_bind(world4):
    message = world4[0]["errors"]["unbound-flat"]
    assert "sharded over 2 of 4 ranks" in message and "tensor parallelism" in message
    assert "tvlars_scale.fsdp.bind(model)" in message


def test_fsdp1_over_the_tp_dim_is_refused(world4):
    """FSDP1 sharding over the ranks that also split the TP layer mixes slices in a flat shard."""
    message = world4[0]["errors"]["fsdp-over-tp"]
    assert "split it over ranks (0, 1) too" in message and 'mesh["dp"]' in message


def test_megatron_tagged_parameter_is_refused(world4):
    message = world4[0]["errors"]["megatron-tagged"]
    assert "'4.weight'" in message and "tagged as a tensor-parallel slice" in message
    assert "'fsdp1' layout cannot see its TP group" in message
