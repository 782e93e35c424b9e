"""The process setup of a launch: the ``Accelerator``, and FSDP2 for torchrun launches.

``make_accelerator`` picks what the launch asked for and refuses what would be silently wrong:

- GPUs: whatever the accelerate config says (DDP, DeepSpeed, FSDP).
- CPU: DDP over gloo. Without CUDA the recipe always asks for ``cpu=True``, so a
  ``--multi_gpu`` launch runs ranks 0..N-1 instead of N copies of rank 0 of 1.
- DeepSpeed on CPU: gloo, created before the ``Accelerator`` (otherwise every rank believes
  it is rank 0 of 1), and DeepSpeed's shared-memory op (a ~2 min JIT build) switched off.
- accelerate's FSDP plugin silently does nothing on CPU: refused with the alternative
  (torchrun + ``--fsdp2``, which calls ``fully_shard`` here).
- accelerate's ``ParallelismConfig`` with tp_size > 1: the recipes' models have no TP plan, so
  the tp ranks would train separate copies (``check_parallelism``).

A launch whose ``WORLD_SIZE`` differs from the processes the ``Accelerator`` sees (distributed
type NO under a multi-process launcher: N independent runs) is an error.

torchrun elastic restarts (``--max-restarts``): every attempt's workers rendezvous through the
agent's one TCPStore, whose keys outlive the attempt, so a restarted rank can read the dead
attempt's gloo addresses and fail to connect ("Connection refused"). From the second attempt on
the process group is created here over a per-attempt prefix of that store.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ConfigError

if TYPE_CHECKING:
    from accelerate.parallelism_config import ParallelismConfig

__all__ = [
    "check_hsdp",
    "check_parallelism",
    "launched_world_size",
    "make_accelerator",
    "model_input_dtype",
    "requires_gradient_sync",
    "shard_fsdp2",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_world_size() -> int:
    """Processes started by the launcher (torchrun, accelerate, deepspeed); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(mixed_precision: str | None, grad_accum: int, fsdp2: bool):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    deepspeed, fsdp = _flag("ACCELERATE_USE_DEEPSPEED"), _flag("ACCELERATE_USE_FSDP")
    if fsdp2 and (deepspeed or fsdp):
        raise ConfigError(
            "--fsdp2 shards the model with fully_shard itself; launch it with torchrun (or an "
            "accelerate DDP config), not with an accelerate DeepSpeed/FSDP config"
        )
    if fsdp and not cuda:
        raise ConfigError(
            "accelerate's FSDP plugin does not run on CPU (it silently falls back to DDP). On CPU "
            "use `torchrun --nproc_per_node N launch/train_classification.py --fsdp2 ...`"
        )
    # DDP warns for every conv with one input channel (its (C,1,k,k) grad has equivalent strides
    # that differ from the bucket's): harmless, and noise in every run on grayscale data.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if deepspeed:
        _check_deepspeed_json(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"))
    handlers = []
    if deepspeed and not cuda:
        import deepspeed.ops

        # The shared-memory collective is a CPU-only speed-up that JIT-compiles for minutes.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    _init_restarted_process_group("gloo" if not cuda else "nccl")
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=handlers,
    )
    launched = launched_world_size()
    if accelerator.num_processes != launched:
        # e.g. distributed type NO under a launcher of N processes: N independent runs, each
        # training on its own batches with no gradient averaging.
        raise ConfigError(
            f"WORLD_SIZE={launched} (processes started by the launcher) but accelerate's "
            f"distributed type is {accelerator.distributed_type.value} with "
            f"{accelerator.num_processes} process(es): each process would train alone; launch "
            "with a config of launch/configs/ (cpu_2proc.yaml on a machine without GPUs) or "
            "torchrun, or unset WORLD_SIZE if your shell exported it"
        )
    check_parallelism(accelerator.parallelism_config)
    return accelerator


def check_parallelism(config: ParallelismConfig | None) -> None:
    """A launch config's ``parallelism_config`` (accelerate's ``ParallelismConfig``, FSDP2 only):
    data-parallel dims and cp, no tp.

    The recipes' models have no tensor-parallel plan. With tp_size > 1 accelerate then skips its
    TP preparation ("The model parameters are not sharded by DTensor, we skip the TP
    preparation") and shards over dp_replicate x dp_shard x cp alone: the ranks of one tp group
    would hold copies of the same shards that no gradient average joins, while the recipe gives
    every rank its own samples. cp ranks join FSDP's shard group (``dp_shard_cp``); a CNN has no
    sequence to split, so cp > 1 is FSDP over more ranks.
    """
    if config is not None and config.tp_size > 1:
        raise ConfigError(
            f"parallelism_config_tp_size={config.tp_size}: the recipes' models have no "
            "tensor-parallel plan, so accelerate would skip tensor parallelism and the ranks of "
            "each tp group would train separate copies of the model on different batches; set "
            "parallelism_config_tp_size: 1 (dp_replicate x dp_shard x cp = the processes)"
        )


def _check_deepspeed_json(path: str) -> None:
    """accelerate reads the DeepSpeed JSON deep inside ``Accelerator()``: read it first, so that
    a missing file or a syntax error is one line naming the file, line and column."""
    import json

    if path == "none":
        return
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as exc:
        raise ConfigError(f"DeepSpeed config {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path}: not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object at the top level")


def _init_restarted_process_group(backend: str) -> None:
    """A restarted torchrun attempt: the default group over a prefix of the agent's store."""
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"tvlars_attempt_{attempt}", store),
        rank=rank,
        world_size=world,
    )


def _fsdp2_units(model: nn.Module) -> list[nn.Module]:
    """Modules that become their own FSDP2 unit: ResNet blocks and the small CNN's conv blocks."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from .models import SmallCNN

    units = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    for m in model.modules():
        if isinstance(m, SmallCNN):
            units += [b for b in m.features if any(True for _ in b.parameters())]
    return units


def check_hsdp(replicate: int, world: int) -> None:
    """The (replicate, shard) mesh of ``--fsdp2-replicate`` must tile the world exactly."""
    if replicate < 1 or world % replicate:
        raise ConfigError(
            f"invalid --fsdp2-replicate={replicate}; expected a divisor of the world size {world} "
            f"(the HSDP mesh is replicate x shard = {world} processes)"
        )


def shard_fsdp2(model: nn.Module, replicate: int = 1) -> nn.Module:
    """``fully_shard`` each block, then the root, over all ranks; HSDP when ``replicate`` > 1.

    Modules that are already FSDP2 units (a backbone sharded for pre-training, reused by the
    linear probe) are left as they are.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    world = dist.get_world_size()
    check_hsdp(replicate, world)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if replicate > 1:
        mesh = init_device_mesh(
            device_type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    for unit in _fsdp2_units(model):
        if not isinstance(unit, FSDPModule):
            fully_shard(unit, mesh=mesh)
    if not isinstance(model, FSDPModule):
        fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def requires_gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP2's ``no_sync``: skip the reduce-scatter on all but the last micro-batch."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    yield


def model_input_dtype(model: nn.Module) -> torch.dtype:
    """What inputs must be cast to: DeepSpeed bf16/fp16 engines hold 16-bit weights, no autocast."""
    if getattr(model, "bfloat16_enabled", lambda: False)():
        return torch.bfloat16
    if getattr(model, "fp16_enabled", lambda: False)():
        return torch.float16
    return torch.float32
