"""A gradient placed more fully than its parameter is sliced, not refused (issue #26).

transformers' vocab-parallel embedding (``tp_plan="auto"``) leaves its ``Shard(0)`` weight a
``Replicate`` gradient: every rank of the tp group holds all of it. The ``dtensor`` layout now
takes each rank's own piece (DTensor's ``redistribute`` to the parameter's placements, a local
chunk) and steps exactly.

One 4-rank world holds a small net's parameters as DTensors placed as FSDP2 and TP place them
(``Shard(0)``, ``Shard(1)``, ``_StridedShard``; uneven pieces, empty ones) on a 1-D mesh of 4
and on a 2x2 mesh. Every rank computes the whole gradient of the global batch (as the ranks of
a tp group do) and hands it to the parameters either ``Replicate`` (on every mesh dim, or on
some: ``SLICED``) or placed like the parameter, which was exact before. Against one process
(``equivalence``):

- both equal one process, with TVLARS, LARS and LAMB;
- per step they issue the same all-reduces (recorded) and the same collectives of any kind
  (DTensor's ``CommDebugMode``): slicing communicates nothing;
- after each step, the gradients are the same objects, placements and values (torch.optim's
  contract: gradients are read, never written);
- with the reduction dropped (per-piece norms) the comparison misses.

Every other mismatch is still refused at discovery, naming the parameter, and so is one that
appears at a later step (a gradient's placements are part of the plan's key).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from tvlars_scale import UnmappableLayoutError

STEPS, GLOBAL_BATCH, WORLD = 3, 8, 4
FSDP2_TP_HIDDEN = 16  # RowwiseParallel needs a width the tp degree divides
R, S0, S1 = Replicate(), Shard(0), Shard(1)
SS0 = _StridedShard(0, split_factor=2)  # FSDP2's shard of a dim-0 TP shard


def make_net(hidden: int = 15) -> nn.Sequential:
    """At the default width every split below is uneven (15 rows over 4 ranks: 4/4/4/3; the
    head's 3 over 4 leaves a rank empty)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


#: mesh -> parameter -> (its placements, its gradient's when sliced)
SLICED: dict[str, dict[str, tuple[tuple, tuple]]] = {
    "1d": {
        "0.weight": ((S0,), (R,)),
        "0.bias": ((SS0,), (R,)),
        "2.weight": ((S1,), (R,)),
        "2.bias": ((S0,), (S0,)),  # placed like it, next to sliced ones
        "3.weight": ((R,), (R,)),
        "3.bias": ((S0,), (R,)),
        "4.weight": ((S0,), (R,)),  # 3 rows: rank 3 holds none
        "4.bias": ((SS0,), (R,)),  # 2/1/0/0
    },
    "2d": {  # ("dp", "tp"): FSDP2 over TP
        "0.weight": ((SS0, S0), (R, R)),  # over a Colwise shard
        "0.bias": ((SS0, S0), (R, S0)),  # replicated over dp only
        "2.weight": ((S0, S1), (R, R)),  # over a Rowwise shard
        "2.bias": ((S0, R), (S0, R)),
        "3.weight": ((S0, R), (R, R)),
        "3.bias": ((R, R), (R, R)),
        "4.weight": ((S0, S1), (S0, R)),  # replicated over tp only
        "4.bias": ((S0, S0), (R, R)),  # 3 elements over 4 ranks
    },
}


def mesh_of(kind: str):
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "1d":
        return init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    return init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("dp", "tp"))


def placed(net: nn.Module, mesh, layout: dict) -> dict[str, DTensor]:
    """The net's parameters as DTensors placed as ``layout`` says (leaves, as FSDP2's are).
    Every rank holds the same init: each takes its piece with no communication."""
    from torch.distributed.tensor import distribute_tensor

    return {
        name: distribute_tensor(
            p.detach(), mesh, layout[name][0], src_data_rank=None
        ).requires_grad_()
        for name, p in net.named_parameters()
    }


def replicated(grad: torch.Tensor, mesh) -> DTensor:
    return DTensor.from_local(grad, mesh, [R] * mesh.ndim)


def run_steps(opt, params: dict[str, DTensor], hand, skip_reduce: bool = False) -> dict[str, Any]:
    """3 steps, ``hand(x, y)`` setting the gradients of each; per step the recorded all-reduces
    and DTensor's count of every collective, and whether the step left the gradients alone."""
    from torch.distributed.tensor.debug import CommDebugMode

    calls, counted, untouched = [], [], True
    for x, y in batches():
        opt.zero_grad()
        hand(x, y)
        handed = {
            n: (p.grad, p.grad.placements, p.grad.to_local().clone()) for n, p in params.items()
        }
        calls.append([])
        with CommDebugMode() as comm, recorded_all_reduce(calls[-1], skip=skip_reduce):
            opt.step()
        counted.append({str(op): n for op, n in comm.get_comm_counts().items() if n})
        for name, (grad, placements, values) in handed.items():
            now = params[name].grad
            untouched &= now is grad and now.placements == placements
            untouched &= torch.equal(now.to_local(), values)
    result = result_of(opt, {n: p.full_tensor() for n, p in params.items()}, calls)
    result["collectives"] = counted
    result["untouched"] = untouched
    result["grad_placements"] = {n: str(p.grad.placements) for n, p in params.items()}
    return result


def train(
    rank: int, ws: int, kind: str, opt_name: str, sliced: bool, skip_reduce: bool = False
) -> dict[str, Any]:
    """The net placed as ``SLICED[kind]``. Every rank computes the whole gradient of the global
    batch from the current weights and hands each parameter its gradient placed as the layout
    says when ``sliced`` (a local chunk of the whole one where that is split: nothing reduced),
    else like the parameter."""
    layout, mesh, net = SLICED[kind], mesh_of(kind), make_net()
    params = placed(net, mesh, layout)
    grad_placements = {n: layout[n][1] if sliced else layout[n][0] for n in layout}

    def hand(x, y):
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name].full_tensor())
        net.zero_grad()
        F.mse_loss(net(x), y).backward()
        for name, p in net.named_parameters():
            whole = replicated(p.grad, mesh)
            params[name].grad = whole.redistribute(mesh, grad_placements[name])

    opt = make_optimizer(opt_name, list(params.items()))
    return run_steps(opt, params, hand, skip_reduce)


def train_fsdp2_tp(rank: int, ws: int, opt_name: str) -> dict[str, Any]:
    """torchtitan's FSDP2 + TP (tests/test_parallelism.py), so FSDP2's own ``_StridedShard``
    pieces; after each backward every reduced gradient is swapped for the whole one,
    ``Replicate`` on the parameter's mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    net = make_net(FSDP2_TP_HIDDEN)
    parallelize_module(net, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for index in (0, 2, 4):
        fully_shard(net[index], mesh=mesh["dp"])
    fully_shard(net, mesh=mesh["dp"])
    params, dp = dict(net.named_parameters()), mesh["dp"].get_local_rank()

    def hand(x, y):
        F.mse_loss(net(x.chunk(2)[dp]), y.chunk(2)[dp]).backward()
        for p in params.values():
            p.grad = replicated(p.grad.full_tensor(), p.device_mesh)

    opt = make_optimizer(opt_name, list(params.items()))
    result = run_steps(opt, params, hand)
    result["placements"] = {n: str(p.placements) for n, p in params.items()}
    return result


# ------------------------------------------------------------------------- still refused
def _error_of(fn) -> str:
    try:
        fn()
    except UnmappableLayoutError as exc:
        return str(exc)
    return "no error raised"


def refused(rank: int, ws: int, case: str) -> dict[str, Any]:
    """One parameter whose gradient is placed in a way the layout does not take; the other
    parameters are untouched by the refused step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    placements, grad_of = REFUSED[case]
    w = distribute_tensor(torch.randn(4, 6), mesh, placements).requires_grad_()
    whole = torch.ones(4, 6)
    w.grad = grad_of(whole, mesh)
    opt = make_optimizer("TVLARS", [("w", w)])
    before = w.full_tensor()
    error = _error_of(opt.step)
    return {"error": error, "unchanged": torch.equal(w.full_tensor(), before)}


def _dtensor(placements, on=None):
    """A gradient from the whole one: placed ``placements`` on the parameter's mesh, or on the
    sub-mesh ``on``."""

    def grad_of(whole: torch.Tensor, mesh) -> DTensor:
        target = mesh[on] if on else mesh
        ones = DTensor.from_local(whole, target, [R] * target.ndim)
        return ones.redistribute(target, placements)

    return grad_of


#: case -> (parameter placements on the 2x2 mesh, its gradient from the whole one)
REFUSED = {
    "shard-on-other-dim": ((S0, S0), _dtensor((S0, S1))),
    "shard-on-replicate": ((S0, R), _dtensor((S0, S0))),
    "partial-on-shard": (
        (S0, S0),
        lambda whole, mesh: DTensor.from_local(whole.chunk(2)[0], mesh, [S0, Partial()]),
    ),
    "other-mesh": ((R, S0), _dtensor((S0,), on="tp")),
    "plain-tensor": ((S0, S0), lambda whole, mesh: whole),
}


def placement_changes_later(rank: int, ws: int) -> dict[str, Any]:
    """A Replicate gradient at the first step (sliced), a Shard(1) one on the Shard(0)
    parameter at the second: refused then too, as the plan is remade for it."""
    from torch.distributed.tensor import distribute_tensor

    mesh = mesh_of("1d")
    w = distribute_tensor(torch.randn(8, 8), mesh, [S0]).requires_grad_()
    opt = make_optimizer("LARS", [("w", w)])
    whole = DTensor.from_local(torch.ones(8, 8), mesh, [R])
    w.grad = whole
    opt.step()
    w.grad = whole.redistribute(mesh, [S1])
    return {"steps": float(opt.param_groups[0]["step"]), "error": _error_of(opt.step)}


# ------------------------------------------------------------------------- the world
OPTIMIZERS = ("TVLARS", "LARS", "LAMB")
RUNS = {
    f"{kind}-{grads}-{opt}": (kind, opt, grads == "sliced")
    for kind in SLICED
    for grads in ("sliced", "matched")
    for opt in OPTIMIZERS
}


def world(rank: int, ws: int) -> dict[str, Any]:
    out = {name: train(rank, ws, *args) for name, args in RUNS.items()}
    for kind in SLICED:
        for opt in OPTIMIZERS:
            out[f"naive-{kind}-{opt}"] = train(rank, ws, kind, opt, True, skip_reduce=True)
    for opt in ("TVLARS", "LAMB"):
        out[f"fsdp2_tp-sliced-{opt}"] = train_fsdp2_tp(rank, ws, opt)
    out.update({f"refused-{case}": refused(rank, ws, case) for case in REFUSED})
    out["later"] = placement_changes_later(rank, ws)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world, WORLD)


_REFERENCES: dict[tuple[str, int], dict] = {}


def reference(opt_name: str, hidden: int = 15) -> dict:
    if (opt_name, hidden) not in _REFERENCES:
        make = lambda: make_net(hidden)  # noqa: E731
        _REFERENCES[opt_name, hidden] = single_process(make, opt_name, batches(), F.mse_loss)
    return _REFERENCES[opt_name, hidden]


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("run", list(RUNS))
def test_matches_one_process(world4, run):
    ref = reference(run.rsplit("-", 1)[1])
    for result in world4:
        assert_matches(result[run], ref)


@pytest.mark.parametrize("opt_name", ["TVLARS", "LAMB"])
def test_fsdp2_tp_pieces_with_whole_gradients_match_one_process(world4, opt_name):
    ref = reference(opt_name, FSDP2_TP_HIDDEN)
    for result in world4:
        run = result[f"fsdp2_tp-sliced-{opt_name}"]
        assert run["placements"]["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert run["grad_placements"]["0.weight"] == "(Replicate(), Replicate())"
        assert run["untouched"]
        assert_matches(run, ref)


@pytest.mark.parametrize("kind", list(SLICED))
def test_the_gradients_were_handed_replicated(world4, kind):
    """What the optimizer saw: a Replicate gradient on every split parameter but one."""
    placements = world4[0][f"{kind}-sliced-TVLARS"]["grad_placements"]
    expected = {n: str(grad) for n, (_, grad) in SLICED[kind].items()}
    assert placements == expected


@pytest.mark.parametrize("kind", list(SLICED))
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_slicing_adds_no_collective(world4, kind, opt_name):
    for result in world4:
        sliced, matched = result[f"{kind}-sliced-{opt_name}"], result[f"{kind}-matched-{opt_name}"]
        assert sliced["calls"] == matched["calls"]
        assert sliced["collectives"] == matched["collectives"]
        # DTensor's count is the optimizer's own all-reduces, one per distinct set of ranks
        for recorded, counted in zip(sliced["calls"], sliced["collectives"], strict=True):
            assert counted == {"c10d.allreduce_": len(recorded)}


@pytest.mark.parametrize("run", [r for r in RUNS if "-sliced-" in r])
def test_the_gradients_are_left_as_they_were(world4, run):
    assert all(result[run]["untouched"] for result in world4)


@pytest.mark.parametrize("kind", list(SLICED))
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_without_the_reduction_the_comparison_fails(world4, kind, opt_name):
    ref = reference(opt_name)
    assert all(misses(result[f"naive-{kind}-{opt_name}"], ref) for result in world4)


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_gradient_placements_are_refused(world4, case):
    for result in world4:
        run = result[f"refused-{case}"]
        assert "the gradient of 'w' has placements" in run["error"], run["error"]
        assert run["unchanged"]


def test_a_placement_that_changes_later_is_refused_then(world4):
    for result in world4:
        later = result["later"]
        assert later["steps"] == 1.0
        assert "the gradient of 'w' has placements (Shard(dim=1),)" in later["error"]
