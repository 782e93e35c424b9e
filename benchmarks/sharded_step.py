"""Time one optimizer step under FSDP2 on several CPU ranks, against torch's own optimizers.

Every rank shards torchvision's ResNet-50 with ``fully_shard`` (per residual block plus the
root: every parameter is a ``DTensor(Shard(0))``), takes one real backward so that every
parameter has its sharded gradient, and then steps each optimizer on its own copy of the shards
(same values, same gradients), interleaved: one step of each per round, with a barrier before
every step, repeated. Reported per optimizer: the median step time of the slowest rank and the
median over rounds of its time over that of ``SGD(foreach)`` and of ``AdamW(foreach)`` in the
same round (torch's optimizers step the DTensor parameters themselves; ours step their local
shards). ``--profile`` adds, per optimizer, where a step spends its time (``torch.profiler``
over ``--profile-steps`` steps on rank 0, the operators with the most self CPU time per step).

    PYTHONPATH=. python benchmarks/sharded_step.py --ranks 2 --repeats 15 --profile

``--clock cpu`` times a step by the CPU time of the rank's process (see ``step_time.py``).
Each rank runs one torch thread (``tests/multirank.py``), gloo.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multirank import run_ranks

from tvlars_scale import LAMB, LARS, TVLARS

OPTIMIZERS: dict[str, Callable] = {
    "SGD(foreach)": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True
    ),
    "AdamW(foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=True),
    "TVLARS": lambda p: TVLARS(p, lr=1.0),
    "LARS": lambda p: LARS(p, lr=1.0),
    "LAMB": lambda p: LAMB(p, lr=1e-3),
    "TVLARS(fused)": lambda p: TVLARS(p, lr=1.0, fused=True),
    "LAMB(fused)": lambda p: LAMB(p, lr=1e-3, fused=True),
}


def _sharded_model(name: str) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    return model


def _profile(step: Callable[[], object], top: int, steps: int) -> list[tuple[str, float, float]]:
    """(operator, self CPU ms per step, calls per step) over ``steps`` steps, the ``top``
    costliest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(r.key, r.self_cpu_time_total / 1e3 / steps, r.count / steps) for r in rows[:top]]


def _measure(rank: int, world_size: int, model: str, names: list[str], repeats: int, args):
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    reference = _sharded_model(model)
    optimizers = {}
    for name in names:
        copy = _sharded_model(model)
        with torch.no_grad():
            for p, q in zip(copy.parameters(), reference.parameters(), strict=True):
                p.copy_(q)
                p.grad = q.grad.clone()
        optimizers[name] = OPTIMIZERS[name](list(copy.parameters()))
    first = {}
    for name, opt in optimizers.items():
        dist.barrier()
        start = time.perf_counter()
        opt.step()  # state, layout discovery, (fused) compilation
        first[name] = time.perf_counter() - start
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            dist.barrier()
            start = clock()
            opt.step()
            times[name].append(clock() - start)
    profiles = {}
    if args.profile and rank == 0:
        profiles = {
            name: _profile(opt.step, args.top, args.profile_steps)
            for name, opt in optimizers.items()
        }
    elif args.profile:
        for opt in optimizers.values():
            for _ in range(args.profile_steps):
                opt.step()  # the collectives of rank 0's profiled steps
    return dict(times=times, first=first, profiles=profiles, numel=reference_numel(reference))


def reference_numel(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return len(params), sum(p.to_local().numel() for p in params)


def _ratio(times: list[float], base: list[float]) -> str:
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--profile", action="store_true", help="where one step spends its time")
    parser.add_argument("--top", type=int, default=8, help="operators per profile")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps per profile")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0]
    ranks = run_ranks(_measure, args.ranks, args.model, args.optimizers, args.repeats, args)
    slowest = {
        name: [max(r["times"][name][i] for r in ranks) for i in range(args.repeats)]
        for name in args.optimizers
    }
    tensors, local = ranks[0]["numel"]
    print(
        f"{args.model} under FSDP2 on {args.ranks} CPU ranks (gloo, 1 thread each): {tensors} "
        f"DTensor parameters, {local / 1e6:.1f}M elements on rank 0; repeats={args.repeats}, "
        f"clock={args.clock}, {datetime.date.today()}, {platform.machine()}, "
        f"torch {torch.__version__}, load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    bases = [b for b in ("SGD(foreach)", "AdamW(foreach)") if b in slowest]
    print(
        f"| optimizer | median step (ms, {args.clock}, slowest rank) | "
        + "".join(f"x {b} [IQR] | " for b in bases)
        + "first step (s) |"
    )
    print("|---|---:|" + "---:|" * len(bases) + "---:|")
    for name, times in slowest.items():
        cells = "".join(f"{_ratio(times, slowest[b])} | " for b in bases)
        first = max(r["first"][name] for r in ranks)
        print(f"| {name} | {statistics.median(times) * 1e3:.1f} | {cells}{first:.2f} |")
    for name, rows in ranks[0]["profiles"].items():
        print(f"\n{name}, per step on rank 0 (self CPU ms, calls), {args.profile_steps} steps:")
        for op, ms, calls in rows:
            print(f"  {ms:8.2f}  {calls:6.0f}  {op}")


if __name__ == "__main__":
    main()
