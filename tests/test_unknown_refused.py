"""Unknown stays refused, per parameter (issue #23, item 3).

- Tensor-parallel tags: a parameter tagged as a TP slice (Megatron's ``tensor_model_parallel=True``
  or the older ``model_parallel``, DeepSpeed AutoTP's metadata with ``replicated=False``) is
  refused at the first step, naming it, where the ``replicated`` layout would take it (one
  process, DDP) and where it sits as a plain tensor among DTensors (left out of ``fully_shard``).
  ``tensor_model_parallel=False`` and AutoTP's ``replicated=True`` train exactly as untagged.
- Unknown placements: stand-ins for torch's proposed ``RaggedShard`` (a ``Shard`` subclass) and
  torchtitan's ``Owned`` (a ``Placement``), and torch's own ``_MaskPartial`` (a ``Partial``), each
  on one parameter of an otherwise fine FSDP2 group, refuse the group at its first step, naming
  the parameter and its placement, before anything is updated.
- ``Shard`` next to ``Replicate``: torch 2.14's ``fully_shard`` refuses ``Replicate()`` from a
  ``shard_placement_fn`` (``ValueError: Invalid shard_placement_fn result``); pytorch#183366 maps
  it to the all-reduced param group that ``replicate()`` builds. So the same group is built with
  ``replicate()`` on the LayerNorm next to ``fully_shard`` on the Linears (and through
  ``shard_placement_fn`` where torch accepts it): one optimizer over both trains 3 steps equal to
  one process, and the ``Replicate`` gradients are identical on every rank (the engine all-reduces
  them), which is what lets their norms go unreduced.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_matches, make_optimizer, result_of, single_process
from multirank import run_ranks
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _MaskPartial

from tvlars_scale import UnmappableLayoutError
from tvlars_scale.layouts.tensor_parallel import AUTOTP_META

STEPS, GLOBAL_BATCH = 3, 8


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


#: Tags that say "this rank holds one slice of the layer".
SLICE_TAGS = {
    "megatron": {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1},
    "megatron-old": {"model_parallel": True},
    "autotp": {AUTOTP_META: {"partition_dim": 0, "logical_shape": (16, 16), "replicated": False}},
}
#: Tags that say "every TP rank holds all of it" (Megatron's defaults, AutoTP's replicated).
WHOLE_TAGS = {
    "megatron": {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1},
    "autotp": {AUTOTP_META: {"partition_dim": None, "logical_shape": (8,), "replicated": True}},
}


def tag(p: torch.Tensor, tags: dict) -> None:
    for key, value in tags.items():
        setattr(p, key, value)


class RaggedShard(Shard):
    """Stand-in for torch's proposed ``RaggedShard``: says it is a ``Shard``, but its pieces are
    not ``torch.chunk``'s."""


class Owned(Placement):
    """Stand-in for torchtitan's ``Owned``: one rank holds the whole parameter, the others an
    empty tensor."""

    def __init__(self, owner_rank: int) -> None:
        super().__init__()
        self.owner_rank = owner_rank

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Owned) and other.owner_rank == self.owner_rank

    def __hash__(self) -> int:
        return hash((Owned, self.owner_rank))

    def __repr__(self) -> str:
        return f"Owned({self.owner_rank})"


def _error_of(fn) -> str:
    try:
        fn()
    except UnmappableLayoutError as exc:
        return str(exc)
    return "no error raised"


# ---------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("source", SLICE_TAGS)
def test_a_tp_slice_is_refused_in_one_process(source):
    net = make_net()
    tag(net[2].weight, SLICE_TAGS[source])
    opt = make_optimizer("LARS", net.named_parameters())
    x, y = batches()[0]
    F.mse_loss(net(x), y).backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    message = r"parameter '2\.weight' \(\(8, 16\)\) is tagged as a tensor-parallel slice"
    with pytest.raises(UnmappableLayoutError, match=message + r".*'replicated' layout"):
        opt.step()
    torch.testing.assert_close(dict(net.named_parameters()), before, rtol=0, atol=0)
    assert not opt.state  # refused before any state was allocated


def test_tags_that_say_whole_train_as_untagged():
    def tagged_net() -> nn.Sequential:
        net = make_net()
        tag(net[0].weight, WHOLE_TAGS["megatron"])
        tag(net[3].weight, WHOLE_TAGS["autotp"])
        return net

    for opt_name in ("TVLARS", "LAMB"):
        ref = single_process(make_net, opt_name, batches(), F.mse_loss)
        assert_matches(single_process(tagged_net, opt_name, batches(), F.mse_loss), ref)


# ---------------------------------------------------------------------------------- 2 ranks
def run_mixed(rank, ws, opt_name, build):
    """FSDP2 ``Shard(0)`` parameters next to ``Replicate()`` ones, trained on this rank's half of
    each global batch; ``build``: ``"replicate"`` (the LayerNorm under ``replicate()``) or
    ``"shard_placement_fn"`` (every 1-D parameter ``Replicate()``, where torch accepts it)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    net = make_net()
    if build == "replicate":
        replicate(net[3], mesh=mesh)
        for index in (0, 2, 4):
            fully_shard(net[index], mesh=mesh)
        fully_shard(net, mesh=mesh)
    else:
        try:
            fully_shard(
                net, mesh=mesh, shard_placement_fn=lambda p: Replicate() if p.ndim == 1 else None
            )
        except ValueError as exc:
            return {"refused": str(exc)}
    opt = make_optimizer(opt_name, net.named_parameters())
    replicated = [n for n, p in net.named_parameters() if p.placements == (Replicate(),)]
    grads = []
    for x, y in batches():
        opt.zero_grad()
        F.mse_loss(net(x.chunk(ws)[rank]), y.chunk(ws)[rank]).backward()
        grads.append({n: net.get_parameter(n).grad.to_local().clone() for n in replicated})
        opt.step()
    result = result_of(opt, {n: p.full_tensor() for n, p in net.named_parameters()}, [])
    result["placements"] = {n: str(p.placements) for n, p in net.named_parameters()}
    result["replicate_grads"] = grads
    return result


def fsdp2_net(mesh) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    net = make_net()
    for index in (0, 2, 4):
        fully_shard(net[index], mesh=mesh)
    return fully_shard(net, mesh=mesh)


#: name -> (placement, this rank's local piece of a (4, 2) parameter on 2 ranks)
UNKNOWN = {
    "RaggedShard": lambda rank: (RaggedShard(0), torch.ones(3 - 2 * rank, 2)),  # rows 3 + 1
    "Owned": lambda rank: (Owned(0), torch.ones(4 if rank == 0 else 0, 2)),
    "_MaskPartial": lambda rank: (_MaskPartial(offset_shape=torch.Size([4, 2])), torch.ones(4, 2)),
}


def unknown_placement_run(rank, ws, kind) -> dict:
    """One parameter placed ``kind``, in the middle of an FSDP2 model's group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (ws,))
    net = fsdp2_net(mesh)
    placement, local = UNKNOWN[kind](rank)

    def place(t):  # nn.Parameter would rebuild the placements as known ones: keep the DTensor
        return DTensor.from_local(t, mesh, [placement], shape=(4, 2), stride=(2, 1))

    odd = place(local).requires_grad_()
    odd.grad = place(torch.ones_like(local))
    named = list(net.named_parameters())
    opt = make_optimizer("TVLARS", [*named[:3], ("odd", odd), *named[3:]])
    x, y = batches()[0]
    F.mse_loss(net(x.chunk(ws)[rank]), y.chunk(ws)[rank]).backward()
    before = {n: p.full_tensor() for n, p in named}
    error = _error_of(opt.step)
    unchanged = all(torch.equal(p.full_tensor(), before[n]) for n, p in named)
    return {"error": error, "unchanged": unchanged, "state": len(opt.state)}


def ddp_tp_slice_error(rank, ws, source) -> str:
    """A plain DDP run of a Megatron-style (or AutoTP-tagged) model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_net()
    tag(net[2].weight, SLICE_TAGS[source])
    model = DDP(net)
    opt = make_optimizer("LAMB", net.named_parameters())
    x, y = batches()[0]
    F.mse_loss(model(x.chunk(ws)[rank]), y.chunk(ws)[rank]).backward()
    return _error_of(opt.step)


def fsdp2_ignored_tp_slice_error(rank, ws) -> str:
    """A tagged parameter left out of ``fully_shard``: a plain tensor in a DTensor group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    net = make_net()
    tag(net[2].weight, SLICE_TAGS["megatron"])
    fully_shard(net, mesh=mesh, ignored_params={net[2].weight})
    opt = make_optimizer("LARS", net.named_parameters())
    x, y = batches()[0]
    F.mse_loss(net(x.chunk(ws)[rank]), y.chunk(ws)[rank]).backward()
    return _error_of(opt.step)


MIXED = [(opt, "replicate") for opt in ("TVLARS", "LARS", "LAMB")] + [("LARS", "spf")]


def world_2(rank, ws) -> dict:
    out = {}
    for opt_name, build in MIXED:
        kind = "shard_placement_fn" if build == "spf" else build
        out[f"mixed-{build}-{opt_name}"] = run_mixed(rank, ws, opt_name, kind)
    for kind in UNKNOWN:
        out[f"unknown-{kind}"] = unknown_placement_run(rank, ws, kind)
    for source in ("megatron", "autotp"):
        out[f"ddp-{source}"] = ddp_tp_slice_error(rank, ws, source)
    out["fsdp2-ignored"] = fsdp2_ignored_tp_slice_error(rank, ws)
    return out


@pytest.fixture(scope="module")
def world2():
    return run_ranks(world_2, 2)


@pytest.mark.parametrize(("opt_name", "build"), MIXED)
def test_shard_next_to_replicate_matches_one_process(world2, opt_name, build):
    runs = [result[f"mixed-{build}-{opt_name}"] for result in world2]
    if "refused" in runs[0]:
        assert "Invalid shard_placement_fn result" in runs[0]["refused"]
        pytest.skip(f"torch {torch.__version__} refuses Replicate() from shard_placement_fn")
    placements = set(runs[0]["placements"].values())
    assert placements == {"(Shard(dim=0),)", "(Replicate(),)"}
    # The engine all-reduced the Replicate gradients: the same on every rank, every step.
    assert runs[0]["replicate_grads"][0]
    for mine, theirs in zip(runs[0]["replicate_grads"], runs[1]["replicate_grads"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    ref = single_process(make_net, opt_name, batches(), F.mse_loss)
    for run in runs:
        assert_matches(run, ref)


@pytest.mark.parametrize("kind", UNKNOWN)
def test_an_unknown_placement_refuses_its_group_at_the_first_step(world2, kind):
    for result in world2:
        run = result[f"unknown-{kind}"]
        assert "parameter 'odd'" in run["error"] and kind in run["error"], run["error"]
        expected = "unreduced values" if kind == "_MaskPartial" else "not a placement tvlars"
        assert expected in run["error"]
        assert run["unchanged"] and run["state"] == 0


@pytest.mark.parametrize("source", ["megatron", "autotp"])
def test_ddp_refuses_a_tp_slice(world2, source):
    for result in world2:
        message = result[f"ddp-{source}"]
        assert "parameter '2.weight' ((8, 16)) is tagged as a tensor-parallel slice" in message
        assert f"({source}:" in message and "'replicated' layout" in message
        # Megatron tags its layers at TP size 1 too: the message says how to untag them.
        assert ("tensor_model_parallel = False" in message) == (source == "megatron")


def test_a_tp_slice_left_out_of_fsdp2_is_refused(world2):
    for result in world2:
        message = result["fsdp2-ignored"]
        assert "parameter '2.weight'" in message and "'dtensor' layout" in message
