"""A step the caller compiles, on sharded layouts: ``torch.compile(optimizer.step)`` and a whole
compiled train step equal the eager step, and no graph break reads the decision (CPU, gloo).

Two spawned worlds (one launch each) train ``test_parallelism``'s model (biases, a LayerNorm, a
head FSDP2 splits unevenly) for 3 steps, the second with a NaN in the batch, which every rank
skips: FSDP2 (``fully_shard``) and TP (colwise -> rowwise) on 2 ranks, HSDP on a 2x2 mesh on 4
ranks. Per layout and optimizer, the eager step (``fused=False``; the decision read on the host,
as on any CPU) is the reference for four compiled runs (the decision kept a tensor):
``torch.compile(opt.step)`` ("step") and one compiled function holding forward, backward and
step ("whole"), each with ``fused=False`` and ``fused=True`` (inside the caller's graph a fused
optimizer compiles nothing of its own, so both trace the same step).

What torch 2.14 compiles of a whole step on CPU, and so what is tested:

- compiled autograd off (torch's default): dynamo does not trace ``loss.backward()``, so the
  step runs as the forward graph, its AOT backward (run by the autograd engine, with FSDP2's
  hooks) and the optimizer step's graphs. With ``torch._dynamo.config.compiled_autograd = True``
  FSDP2 neither reshards nor reduce-scatters after the backward: the module is left holding
  plain unsharded parameters, and the sharded ones the optimizer holds get no gradient after the
  first step (TVLARS counts 1 step of 3; torch's SGD leaves them unchanged too).
- TP: the eager backward calls ``DTensor.__tensor_unflatten__``, which dynamo compiles as a frame
  of its own; recompiled with dynamic shapes it fails inside torch ("SymNodeVariable() is not a
  constant", with no optimizer in the step at all), so the TP whole step is ``dynamic=False``.

Graph breaks are read from dynamo's counters. In the optimizer's step the only ones are the two
functions it runs eagerly by design (``torch.compiler.disable``): the plan's bookkeeping
(``LayerwiseOptimizer._begin``) and LAMB's bias corrections; the decision stays a tensor.
"""

from __future__ import annotations

import math
import re
from itertools import product

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import OPTIMIZERS, assert_matches, make_optimizer, result_of
from multirank import run_ranks
from test_parallelism import POISONED_STEP, batches, full, make_net, tp_plan
from torch._dynamo.utils import counters

LAYOUTS = {2: ("fsdp2", "tp"), 4: ("hsdp",)}
COMPILED = ("step", "whole")
#: What breaks a compiled optimizer step: the functions it runs eagerly on purpose.
STEP_BREAKS = {
    "TVLARS": {"LayerwiseOptimizer._begin"},
    "LARS": {"LayerwiseOptimizer._begin"},
    "LAMB": {"LayerwiseOptimizer._begin", "_bias_corrections"},
}
#: Graph breaks that read a tensor on the host, as reading the decision there would.
HOST_READS = ("Tensor.item()", "Tensor.tolist()", "Tensor.numpy()", "Data-dependent")


def graph_breaks() -> set[str]:
    """What broke the graphs compiled since the counters were cleared: the function for a
    ``torch.compiler.disable``'d one, else the reason's first line."""
    labels = set()
    for reason in counters["graph_break"]:
        disabled = re.search(r"<function ([\w.]+) at", reason)
        labels.add(disabled[1] if disabled else reason.splitlines()[0].strip())
    return labels


def shard(layout: str, net: torch.nn.Module, world_size: int) -> tuple[int, int]:
    """Shard ``net`` in place; returns this rank's data-parallel index and the dp degree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if layout == "tp":  # every rank sees the whole batch
        parallelize_module(net, init_device_mesh("cpu", (world_size,)), tp_plan())
        return 0, 1
    if layout == "hsdp":  # replicated over the mesh's first dim, sharded over its second
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    for index in (0, 2, 4):
        fully_shard(net[index], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return dist.get_rank(), world_size


def train(
    layout: str, world_size: int, opt_name: str, compiled: str | None = None, fused: bool = False
) -> dict:
    """3 steps (the second on a NaN) with the step or the whole train step ``compiled``."""
    torch._dynamo.reset()  # graphs and guards of the last run must not stand in for this one
    counters.clear()
    net = make_net()
    dp, degree = shard(layout, net, world_size)
    opt = make_optimizer(opt_name, net.named_parameters(), fused=fused)
    step = torch.compile(opt.step) if compiled == "step" else opt.step

    def train_step(x, y):
        F.mse_loss(net(x), y).backward()
        step()

    if compiled == "whole":  # TP: dynamic shapes fail in torch (module docstring)
        train_step = torch.compile(train_step, dynamic=False if layout == "tp" else None)
    for index, (x, y) in enumerate(batches()):
        if index == POISONED_STEP:  # rank 0's first sample (every rank's under TP)
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        train_step(x.chunk(degree)[dp], y.chunk(degree)[dp])
    result = result_of(opt, {name: full(p) for name, p in net.named_parameters()}, [])
    return {**result, "breaks": graph_breaks()}


def world(rank: int, world_size: int) -> dict:
    results = {}
    for layout, opt_name in product(LAYOUTS[world_size], OPTIMIZERS):
        results[layout, opt_name] = train(layout, world_size, opt_name)
        for compiled, fused in product(COMPILED, (False, True)):
            key = (layout, opt_name, compiled, fused)
            results[key] = train(layout, world_size, opt_name, compiled, fused)
    return results


@pytest.fixture(scope="module")
def world2():
    return run_ranks(world, 2)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(world, 4)


CASES = list(product(("fsdp2", "hsdp", "tp"), OPTIMIZERS, COMPILED, (False, True)))


@pytest.mark.parametrize(
    "case", CASES, ids=["-".join([*c[:3], "fused" if c[3] else "eager"]) for c in CASES]
)
def test_compiled_step_equals_the_eager_step(request, case):
    layout, opt_name, compiled, _ = case
    for results in request.getfixturevalue("world4" if layout == "hsdp" else "world2"):
        got, eager = results[case], results[layout, opt_name]
        assert_matches(got, eager)
        # the NaN step was skipped on every rank, its counters as the eager step's
        assert got["steps"] == eager["steps"] == [2.0]
        assert got["skipped"] == eager["skipped"] == [1.0]
        # The decision stays a tensor: a compiled step breaks only at its eager bookkeeping;
        # a whole step also where torch breaks (backward, FSDP2's hooks, DTensor), none a read.
        breaks = got["breaks"]
        if compiled == "step":
            assert breaks == STEP_BREAKS[opt_name]
        assert STEP_BREAKS[opt_name] <= breaks
        assert not [b for b in breaks if any(read in b for read in HOST_READS)]
