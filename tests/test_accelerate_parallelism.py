"""accelerate's ``ParallelismConfig`` under FSDP2, on 4 CPU ranks: the meshes and placements that
accelerate makes, trained with TVLARS and LAMB and compared with one process (``equivalence``).

accelerate refuses a ``ParallelismConfig`` on CPU: ``Accelerator(cpu=True, parallelism_config=
...)`` raises "ParallelismConfig is only compatible DistributedType.FSDP (version 2) or
DistributedType.Multi{Device} or DistributedType.DEEPSPEED, but got DistributedType.MULTI_CPU."
(accelerate 1.15.0, ``ParallelismConfig._validate_accelerator``; checked below). So each rank
builds an ``Accelerator(cpu=True)`` and sets what accelerate's own ``__init__`` sets for an FSDP2
launch on GPUs (``fsdp2_accelerator``): distributed type FSDP, an FSDP2 plugin, the config and
the mesh that the config builds, with device type "cpu"; accelerate's validation then passes.
Everything after that is accelerate's own code:

- ``ParallelismConfig.build_device_mesh``: one mesh over the enabled dims in the order
  ``(dp_replicate, dp_shard, cp, tp)``, with ``dp`` (replicate x shard), ``dp_shard_cp`` and
  ``dp_cp`` flattened from it;
- ``prepare(model, optimizer)``: with tp > 1 (``_prepare_tp``) every parameter outside the
  model's TP plan becomes a ``Replicate()`` DTensor on ``mesh["tp"]``; then ``fully_shard`` of each
  ``Block`` and the root over ``mesh[fsdp_dim_names]`` = ``("dp_replicate", "dp_shard_cp")`` or
  ``("dp_shard_cp",)``, so FSDP shards over the cp ranks too, and the optimizer's parameters are
  swapped for the sharded ones;
- ``prepare(DataLoader)``: tp and cp ranks get the same batch, the dp ranks their own;
  ``maybe_context_parallel`` then gives each cp rank its chunks of the sequence (torch's
  ``context_parallel``), and ``backward``.

The model is a TP block (``ColwiseParallel`` -> ``RowwiseParallel``, applied before ``prepare``
as ``from_pretrained(tp_plan=...)`` does), a LayerNorm and an uneven head (3 rows: FSDP splits them
2/1) outside the plan. It works token by token, so splitting the sequence over cp ranks splits the
loss like splitting the batch: the single process sees the same global batches.

The optimizer takes each layer's reduce group from its DTensor's mesh: TP-split layers over the
``dp_shard_cp`` x ``tp`` slice, the others over ``dp_shard_cp``, which holds the cp ranks (never a
group named after the config's ``dp_shard``); the decision over the world. Each configuration also
runs once with the optimizer's all-reduces dropped, and cp2_tp2 once with only the cp ranks'
all-reduce dropped (what a reduction over the config's ``dp_shard``, 1 rank there, would do): each
must miss the tolerance.

accelerate 1.15's ``_prepare_tp`` wraps the parameters outside the plan with transformers'
``ReplicateParallel``, which transformers 5 no longer has: with the CI lock's transformers 5.24,
FSDP2 + TP through ``prepare`` fails with "ImportError: cannot import name 'ReplicateParallel'
from 'transformers.integrations.tensor_parallel'". Where it is missing, this test supplies
transformers 4.57's class (``replicate_parallel``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from accelerate import Accelerator, ParallelismConfig
    from torch.distributed.device_mesh import DeviceMesh

pytest.importorskip("accelerate.parallelism_config")

STEPS = 3
GLOBAL_BATCH = 8  # sequences per step
SEQUENCE = 4  # tokens: 2 per cp rank (torch's load balancing cuts 2 x cp chunks)
FEATURES = 8
WORLD = 4
#: ParallelismConfig sizes that fill 4 ranks; accelerate refuses cp or tp with dp_replicate
#: alone, so cp with replicas would need 8.
CONFIGS: dict[str, dict[str, int]] = {
    "dp_shard2_tp2": dict(dp_shard_size=2, tp_size=2),
    "cp2_tp2": dict(cp_size=2, tp_size=2),
    "dp_shard2_cp2": dict(dp_shard_size=2, cp_size=2),
    "dp_replicate2_dp_shard2": dict(dp_replicate_size=2, dp_shard_size=2),
}
RUNS = [(config, "TVLARS") for config in CONFIGS] + [
    ("dp_shard2_tp2", "LAMB"),
    ("cp2_tp2", "LAMB"),
]
TP_SPLIT = ("block.up.weight", "block.up.bias", "block.down.weight")
N_LAYERS = 8


def over_two_ranks(ranks: tuple[int, ...]) -> bool:
    return len(ranks) == 2


#: Runs whose optimizer all-reduces are dropped (all, or those a predicate picks): each must
#: miss. In cp2_tp2 the 2-rank all-reduce is over the cp dim, dp_shard_cp there; the group a
#: config name would give, dp_shard, is 1 rank: dropping it is what reducing over that group does.
CONTROLS: dict[str, tuple[str, bool | Callable[[tuple[int, ...]], bool]]] = {
    **{f"naive-{config}": (config, True) for config in CONFIGS},
    "naive-cp2_tp2-without-cp": ("cp2_tp2", over_two_ranks),
}


class Block(nn.Module):
    """An FSDP unit (the plugin wraps ``Block``), with a TP plan for ``up`` and ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(FEATURES, 16)
        self.down = nn.Linear(16, FEATURES)
        self.norm = nn.LayerNorm(FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.tanh(self.up(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(FEATURES, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def global_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's global batch, one after the other: (STEPS * GLOBAL_BATCH, SEQUENCE, ...)."""
    g = torch.Generator().manual_seed(1)
    n = STEPS * GLOBAL_BATCH
    return (
        torch.randn(n, SEQUENCE, FEATURES, generator=g),
        torch.randn(n, SEQUENCE, 3, generator=g),
    )


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = global_data()
    return list(zip(x.split(GLOBAL_BATCH), y.split(GLOBAL_BATCH), strict=True))


# ---------------------------------------------------------------------------------- accelerate
def replicate_parallel() -> None:
    """Supply ``transformers.integrations.tensor_parallel.ReplicateParallel`` where transformers
    no longer has it (5.24), as transformers 4.57 defined it: the module's input becomes a
    ``Replicate()`` DTensor, its output a local tensor again."""
    import transformers.integrations.tensor_parallel as hf_tp

    if hasattr(hf_tp, "ReplicateParallel"):
        return
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def replicated_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> DTensor:
        x = inputs[0]
        return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (Replicate(),))

    def local_output(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return output.to_local() if isinstance(output, DTensor) else output

    class ReplicateParallel:
        def prepare_module_tp(self, module: nn.Module, mesh: DeviceMesh) -> None:
            distribute_module(module, mesh, input_fn=replicated_input, output_fn=local_output)

    hf_tp.ReplicateParallel = ReplicateParallel


def fsdp2_accelerator(config: ParallelismConfig) -> Accelerator:
    """An ``Accelerator`` as accelerate's ``__init__`` leaves it for an FSDP2 launch with
    ``config`` on GPUs, on CPU: the distributed type (in both of accelerate's shared states, as
    ``AcceleratorState.__init__`` writes it), the plugin, and the config's mesh."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    state = accelerator.state
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
    )
    state.parallelism_config = config
    state.device_mesh = config.get_device_mesh("cpu")
    config._validate_accelerator(accelerator)  # accelerate's own checks, FSDP2 now
    return accelerator


def train(
    rank: int,
    ws: int,
    config_name: str,
    opt_name: str,
    skip_reduce: bool | Callable[[tuple[int, ...]], bool] = False,
) -> dict:
    """3 steps through accelerate's prepare, data loader and context parallel; all-reduces of
    each ``step()``, and how accelerate placed every parameter."""
    from accelerate.parallelism_config import ParallelismConfig
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.utils.data import DataLoader, TensorDataset

    config = ParallelismConfig(**CONFIGS[config_name])
    accelerator = fsdp2_accelerator(config)
    mesh = accelerator.torch_device_mesh
    net = make_net()
    if config.tp_enabled:
        plan = {"block.up": ColwiseParallel(), "block.down": RowwiseParallel()}
        parallelize_module(net, mesh["tp"], plan)
    optimizer = make_optimizer(opt_name, net.named_parameters())
    net, prepared = accelerator.prepare(net, optimizer)  # prepared wraps optimizer
    per_dp_rank = GLOBAL_BATCH // config.data_parallel_size
    loader = accelerator.prepare(DataLoader(TensorDataset(*global_data()), per_dp_rank))
    per_step, shapes = [], set()
    for x, y in loader:
        prepared.zero_grad()
        with accelerator.maybe_context_parallel(
            buffers=[x, y], buffer_seq_dims=[1, 1], no_restore_buffers={x, y}
        ):
            shapes.add(tuple(x.shape))
            accelerator.backward(F.mse_loss(net(x), y))
        calls: list = []
        with recorded_all_reduce(calls, skip=skip_reduce):
            prepared.step()
        per_step.append(sorted(calls))
    named = dict(net.named_parameters())
    result = result_of(optimizer, {n: p.full_tensor() for n, p in named.items()}, per_step)
    result["placements"] = {
        n: (p.device_mesh.mesh_dim_names, p.placements) for n, p in named.items()
    }
    result["batch_shapes"] = shapes
    result["dp_shard_cp"] = tuple(dist.get_process_group_ranks(mesh["dp_shard_cp"].get_group()))
    return result


def cpu_error(rank: int, ws: int) -> str:
    """What accelerate says to a ParallelismConfig on CPU."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState

    try:
        Accelerator(cpu=True, parallelism_config=ParallelismConfig(dp_shard_size=ws))
    except ValueError as exc:
        return str(exc)
    finally:  # the refused config stays in accelerate's shared state otherwise
        AcceleratorState._reset_state(reset_partial_state=True)
    return "no error raised"


def world(rank: int, ws: int) -> dict:
    out = {"cpu-error": cpu_error(rank, ws)}
    replicate_parallel()
    for config, opt_name in RUNS:
        out[f"{config}-{opt_name}"] = train(rank, ws, config, opt_name)
    for name, (config, skip) in CONTROLS.items():
        out[name] = train(rank, ws, config, "TVLARS", skip)
    return out


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(world, WORLD)


_REFERENCES: dict[str, dict] = {}


def reference(opt_name: str) -> dict:
    if opt_name not in _REFERENCES:
        _REFERENCES[opt_name] = single_process(make_net, opt_name, global_batches(), F.mse_loss)
    return _REFERENCES[opt_name]


# ---------------------------------------------------------------------------------- tests
def test_accelerate_refuses_a_parallelism_config_on_cpu(world4):
    """1.15.0 lists DistributedType.DEEPSPEED among the types it takes; older ones do not."""
    for result in world4:
        message = result["cpu-error"]
        assert message.startswith("ParallelismConfig is only compatible DistributedType.FSDP")
        assert message.endswith("but got DistributedType.MULTI_CPU."), message


@pytest.mark.parametrize("run", [f"{c}-{o}" for c, o in RUNS])
def test_parallelism_config_matches_single_process(world4, run):
    ref = reference(run.rsplit("-", 1)[1])
    for result in world4:
        assert_matches(result[run], ref)


@pytest.mark.parametrize("control", list(CONTROLS))
def test_without_the_reduction_the_comparison_fails(world4, control):
    ref = reference("TVLARS")
    assert all(misses(result[control], ref) for result in world4)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_accelerate_splits_batches_over_dp_and_sequences_over_cp(world4, config):
    """Each rank's share of a global batch: its dp rank's sequences (tp and cp ranks get the
    same ones from accelerate's data loader), and its cp rank's tokens of them."""
    from accelerate.parallelism_config import ParallelismConfig

    sizes = ParallelismConfig(**CONFIGS[config])
    local = (GLOBAL_BATCH // sizes.data_parallel_size, SEQUENCE // sizes.cp_size, FEATURES)
    assert all(result[f"{config}-TVLARS"]["batch_shapes"] == {local} for result in world4)


def test_accelerate_places_parameters_on_its_fsdp_mesh(world4):
    """With tp, every parameter lives on ``(dp_shard_cp, tp)``: the plan's split over both, the
    others wrapped as ``Replicate()`` on tp, then sharded; HSDP replicates over dp_replicate."""
    from torch.distributed.tensor import Replicate, Shard

    for config in ("dp_shard2_tp2", "cp2_tp2"):
        placements = world4[0][f"{config}-TVLARS"]["placements"]
        for name, (dims, places) in placements.items():
            assert dims == ("dp_shard_cp", "tp"), (config, name)
            assert (type(places[1]) is Shard) == (name in TP_SPLIT), (config, name)
        assert placements["head.weight"][1] == (Shard(0), Replicate())
    for dims, places in world4[0]["dp_replicate2_dp_shard2-TVLARS"]["placements"].values():
        assert (dims, places) == (("dp_replicate", "dp_shard_cp"), (Replicate(), Shard(0)))
    for dims, places in world4[0]["dp_shard2_cp2-TVLARS"]["placements"].values():
        assert (dims, places) == (("dp_shard_cp",), (Shard(0),))


def expected_calls(config: str, opt_name: str, shard: tuple[int, ...]) -> list:
    """One step's all-reduces (ranks, floats): 2 floats per layer, the TP-split layers over
    dp_shard_cp x tp (here the world), the others over ``shard`` (accelerate's dp_shard_cp
    group); the decision rides on the world's bucket, or alone (LAMB: first, alone)."""
    everyone = tuple(range(WORLD))
    split = len(TP_SPLIT) if CONFIGS[config].get("tp_size", 1) > 1 else 0
    norms = {everyone: 2 * split} if split else {}
    norms[shard] = norms.get(shard, 0) + 2 * (N_LAYERS - split)
    if opt_name == "LAMB" or everyone not in norms:
        return sorted([(everyone, 1), *norms.items()])
    norms[everyone] += 1
    return sorted(norms.items())


def test_each_layer_is_reduced_over_its_own_mesh_slice(world4):
    """The groups come from each DTensor's mesh: with cp they hold the cp ranks."""
    everyone = tuple(range(WORLD))
    for rank, result in enumerate(world4):
        shards = {config: result[f"{config}-TVLARS"]["dp_shard_cp"] for config in CONFIGS}
        assert shards["cp2_tp2"] == (rank % 2, rank % 2 + 2)  # the cp dim of (cp, tp)
        assert shards["dp_shard2_cp2"] == everyone  # dp_shard x cp
        assert shards["dp_replicate2_dp_shard2"] == (rank & 2, (rank & 2) + 1)
        for config, opt_name in RUNS:
            calls = result[f"{config}-{opt_name}"]["calls"]
            assert calls == [expected_calls(config, opt_name, shards[config])] * STEPS, (
                rank,
                config,
                opt_name,
            )
