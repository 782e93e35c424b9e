"""The layout seam in one process: placement classification, the mesh slice a layer is reduced
over (on a stand-in 3-D mesh), the adapter registry and its order, named layouts, and the
``model_group`` argument. The multi-rank runs are in test_parallelism.py and test_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from tvlars_scale import LARS, TVLARS
from tvlars_scale.groups import slice_ranks
from tvlars_scale.layouts import (
    BUILTIN_ADAPTERS,
    GroupLayout,
    Layer,
    Segment,
    UnmappableLayoutError,
    adapter_names,
    register_adapter,
)
from tvlars_scale.layouts.dtensor import split_dims


# --------------------------------------------------------------------------- placements
@pytest.mark.parametrize(
    ("placements", "dims"),
    [
        ((Shard(0),), (0,)),  # FSDP2
        ((Replicate(), Shard(0)), (1,)),  # HSDP: never over the replicas
        ((_StridedShard(0, split_factor=2), Shard(0)), (0, 1)),  # FSDP2 + TP
        ((Shard(0), Shard(1)), (0, 1)),  # FSDP2 + TP, a Rowwise weight
        ((Shard(0), Replicate()), (0,)),  # FSDP2 + TP, a Rowwise bias
        ((Replicate(), _StridedShard(0, split_factor=2), Shard(0)), (1, 2)),  # HSDP + TP
        ((Replicate(), Replicate()), ()),
    ],
)
def test_split_dims(placements, dims):
    assert split_dims(placements, "w", "TVLARS") == dims


def test_partial_is_refused_with_the_parameter_named():
    with pytest.raises(UnmappableLayoutError, match=r"parameter 'w'.*Partial.*mesh dim 1"):
        split_dims((Shard(0), Partial()), "w", "TVLARS")


def test_unknown_placement_types_are_refused():
    class Blocked(Shard):  # a new placement type, even one that says it is a Shard
        pass

    class Odd:
        pass

    for placement in (Blocked(0), Odd()):
        with pytest.raises(UnmappableLayoutError, match="is not a placement tvlars_scale knows"):
            split_dims((placement,), "w", "LARS")


class StandInMesh:
    """The parts of a ``DeviceMesh`` that ``slice_ranks`` reads: the rank grid and this rank's
    coordinate."""

    def __init__(self, shape, coordinate):
        self.mesh = torch.arange(int(torch.tensor(shape).prod())).view(shape)
        self.coordinate = coordinate

    def get_coordinate(self):
        return self.coordinate


def test_a_layer_split_over_two_dims_of_a_3d_mesh_is_reduced_over_their_slice():
    """HSDP + TP on a (replicate=2, shard=2, tp=2) mesh: a TP weight is split over (shard, tp),
    so its norm is reduced once over the 4 ranks of this rank's replica, never the replicas."""
    placements = (Replicate(), _StridedShard(0, split_factor=2), Shard(0))
    dims = split_dims(placements, "w", "TVLARS")
    assert slice_ranks(StandInMesh((2, 2, 2), (1, 0, 1)), dims) == (4, 5, 6, 7)
    assert slice_ranks(StandInMesh((2, 2, 2), (0, 1, 0)), dims) == (0, 1, 2, 3)
    # the LayerNorm of that model, (Replicate(), Shard(0), Replicate()): the shard dim only
    norm_dims = split_dims((Replicate(), Shard(0), Replicate()), "n", "TVLARS")
    assert slice_ranks(StandInMesh((2, 2, 2), (1, 0, 1)), norm_dims) == (5, 7)


# --------------------------------------------------------------------------- the registry
def _tagged_layout(params, ctx):
    if not all(getattr(p, "_tagged", False) for p in params):
        return None
    layers = [Layer(f"tagged{j}", tuple(p.shape)) for j, p in enumerate(params)]
    return GroupLayout(layers, [Segment(j, j) for j in range(len(params))], kind="tagged")


def _param(tagged: bool) -> nn.Parameter:
    p = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    p._tagged = tagged
    p.grad = torch.ones_like(p)
    return p


def test_registered_adapters_are_asked_first_and_removed_by_their_handle():
    assert adapter_names() == list(BUILTIN_ADAPTERS)
    assert BUILTIN_ADAPTERS == ("deepspeed", "dtensor", "fsdp1", "replicated")
    handle = register_adapter("tagged", _tagged_layout)
    try:
        assert adapter_names() == ["tagged", *BUILTIN_ADAPTERS]
        opt = LARS([_param(tagged=True)], lr=0.1)
        opt.step()
        assert list(opt.layer_stats().to_dict()) == ["tagged0"]
        with pytest.raises(ValueError, match="'tagged' is already registered"):
            register_adapter("tagged", _tagged_layout)
    finally:
        handle.remove()
    assert adapter_names() == list(BUILTIN_ADAPTERS)


def test_a_param_group_can_name_its_layout():
    handle = register_adapter("tagged", _tagged_layout)
    try:
        plain = _param(tagged=False)
        opt = LARS([{"params": [plain], "layout": "replicated"}], lr=0.1)
        opt.step()  # the named adapter claims it
        opt = LARS([{"params": [plain], "layout": "tagged"}], lr=0.1)
        with pytest.raises(UnmappableLayoutError, match="names layout='tagged', which does not"):
            opt.step()  # the named adapter refuses: an error, not the next adapter
    finally:
        handle.remove()


def test_an_unknown_layout_name_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"invalid layout='fsdp3'.*one of deepspeed, dtensor"):
        TVLARS([{"params": [_param(False)], "layout": "fsdp3"}], lr=0.1)


# --------------------------------------------------------------------------- model_group
@pytest.mark.parametrize("bad", ["world", 2, [0, 1]])
def test_model_group_must_be_a_group_a_mesh_or_ranks(bad):
    with pytest.raises(TypeError, match=r"TVLARS: invalid model_group=.*ProcessGroup"):
        TVLARS([_param(False)], lr=0.1, model_group=bad)


@pytest.mark.parametrize("bad", [(), (0, 0), (-1,), (True,), (0.5,)])
def test_model_group_ranks_must_be_distinct_global_ranks(bad):
    with pytest.raises(ValueError, match=r"LARS: invalid model_group=.*distinct global ranks"):
        LARS([_param(False)], lr=0.1, model_group=bad)


def test_without_torch_distributed_the_decision_is_local():
    opt = TVLARS([_param(False)], lr=0.1)  # no process group: nothing to agree with
    opt.step()
    assert float(opt.param_groups[0]["step"]) == 1.0
