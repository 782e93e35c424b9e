"""The one comparator every multi-rank layout test uses: a sharded run against a single process.

- ``OPTIMIZERS``: the three optimizers at settings where per-shard norms miss the tolerance
  (lr=1 and eta=0.02 move every layer by ~1% of its norm per step, and per-shard trust ratios
  change that by tens of percent).
- ``single_process``: the same init, the same global batches, the same optimizer, one process.
- ``assert_matches``: parameters and every layer's telemetry within ``RTOL``/``ATOL``.
- ``recorded_all_reduce``: records every ``dist.all_reduce`` as (ranks, numel); ``skip=True``
  drops them, which turns the optimizer into the naive per-shard-norm, per-rank-decision one;
  ``skip=predicate`` drops those over the ranks it picks (the TP stage alone, say).

Tolerance: every optimizer runs in fp32. Sharded and single-process runs differ only in
summation order (the gradient is a mean of per-rank means, the norms are sums of per-piece
sums): ~1e-7 relative per operation, a few operations per step; the largest difference seen after
3 steps is ~1.5e-7 absolute (weights ~0.3). rtol=1e-5, atol=1e-6 leave room for other CPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tvlars_scale import LAMB, LARS, TVLARS

OPTIMIZERS = {
    "TVLARS": (TVLARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-2, eta=0.02, lmbda=0.1)),
    "LARS": (LARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-2, eta=0.02)),
    "LAMB": (LAMB, dict(lr=0.02, weight_decay=1e-2)),
}
RTOL, ATOL = 1e-5, 1e-6


def make_optimizer(name: str, named_params, **kwargs):
    cls, defaults = OPTIMIZERS[name]
    return cls(named_params, **defaults, **kwargs)


@contextmanager
def recorded_all_reduce(calls: list, skip: bool | Callable[[tuple[int, ...]], bool] = False):
    """Record (ranks of the group, numel) of every ``dist.all_reduce``; ``skip`` drops them all
    (True), or those whose group's ranks it returns True for (a callable)."""
    original = dist.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        calls.append((ranks, tensor.numel()))
        if skip(ranks) if callable(skip) else skip:
            return None
        return original(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = original


def result_of(opt, params: dict, calls: list) -> dict:
    """What a run returns: full parameters, the telemetry, the collectives, the counters."""
    return {
        "params": {name: p.detach().clone() for name, p in params.items()},
        "stats": opt.layer_stats().to_dict(),
        "calls": calls,
        "steps": [float(g["step"]) for g in opt.param_groups],
        "skipped": [float(g["skipped_steps"]) for g in opt.param_groups],
    }


def single_process(
    make_net: Callable[[], nn.Module],
    opt_name: str,
    batches: Iterable,
    loss_fn: Callable,
    poison: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """One process, the same init and global batches; ``poison(step, net)`` may edit grads."""
    net = make_net()
    opt = make_optimizer(opt_name, net.named_parameters())
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        if poison is not None:
            poison(step, net)
        opt.step()
    return result_of(opt, dict(net.named_parameters()), [])


def assert_matches(result: dict, ref: dict, names: Iterable[str] | None = None) -> None:
    """``result``'s parameters and telemetry equal ``ref``'s (restricted to ``names``)."""
    names = list(result["params"] if names is None else names)
    torch.testing.assert_close(
        result["params"], {n: ref["params"][n] for n in names}, rtol=RTOL, atol=ATOL
    )
    # Telemetry: the true (reduced) norms of the whole tensors, on every rank.
    assert sorted(result["stats"]) == sorted(names)
    for name in names:
        got, want = result["stats"][name], ref["stats"][name]
        for key in ("lwn", "lgn", "trust_ratio", "scale"):
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), (name, key)


def misses(result: dict, ref: dict) -> bool:
    """True when ``result``'s parameters are outside the tolerance (for the naive runs)."""
    try:
        torch.testing.assert_close(
            result["params"], {n: ref["params"][n] for n in result["params"]}, rtol=RTOL, atol=ATOL
        )
    except AssertionError:
        return True
    return False


def recorded_steps(optimizer, skip=False) -> list[list]:
    """Per ``optimizer.step()`` call from now on, the all-reduces it issues (ranks, numel);
    ``skip`` drops some, as in ``recorded_all_reduce``. Collectives an engine issues around the
    step (DeepSpeed's gradient reduction) are not recorded."""
    calls: list[list] = []
    step = optimizer.step

    def recorded(*args, **kwargs):
        calls.append([])
        with recorded_all_reduce(calls[-1], skip=skip):
            return step(*args, **kwargs)

    optimizer.step = recorded
    return calls
