"""What exact layer-wise norms cost under FSDP2: bytes on the wire and optimizer step time.

1. Bytes per step for the norms, against the model's size, for torchvision ResNet shapes. The
   optimizer all-reduces one fp32 vector per shard group per step: 2 floats per layer (one per
   original parameter) + 1. FSDP itself moves the parameters twice (all-gather in forward and
   backward) and the gradients once (reduce-scatter) every step.
2. Measured on 2 CPU ranks (gloo, one thread each), ResNet-50 under FSDP2 ``fully_shard``
   (one unit per bottleneck block, plus the root): the bytes every all-reduce inside ``step()``
   carried, and the median ``step()`` time of TVLARS, LARS and LAMB against ``torch.optim.SGD``
   (momentum, weight decay, foreach) on the same sharded parameters and gradients, with
   ``torch.optim.AdamW`` for scale. The optimizers take turns step by step, so that load from
   other processes and cache effects hit them alike.

Run: ``PYTHONPATH=. python benchmarks/comm_bytes.py [--steps 10] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multirank import run_ranks

from tvlars_scale import LAMB, LARS, TVLARS

MODELS = ("resnet18", "resnet50", "resnet101", "resnet152")
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True),
    "TVLARS": lambda p: TVLARS(p, lr=0.1),
    "LARS": lambda p: LARS(p, lr=0.1),
    "LAMB": lambda p: LAMB(p, lr=1e-3),
    # what LAMB adds trust ratios to
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-4, foreach=True),
}


def size_table() -> list[dict]:
    rows = []
    for name in MODELS:
        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        params = list(model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in params)
        norm_bytes = (2 * len(params) + 1) * 4
        rows.append(
            dict(
                model=name,
                layers=len(params),
                params=sum(p.numel() for p in params),
                model_bytes=model_bytes,
                norm_bytes=norm_bytes,
                # per rank, ring algorithms: (ws-1)/ws of the payload; the ratio is the same
                fsdp_bytes=3 * model_bytes,
                norm_over_fsdp=norm_bytes / (3 * model_bytes),
            )
        )
    return rows


def _sharded_resnet50(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _measure(rank: int, world_size: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    model = _sharded_resnet50(mesh)
    # One real backward gives every parameter its sharded DTensor gradient; the steps below
    # reuse it (the step time does not depend on the values).
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = [p.grad for p in model.parameters()]

    payload: dict[str, list[int]] = {name: [] for name in OPTIMIZERS}
    original = dist.all_reduce

    def timed_step(name: str, opt) -> float:
        def counting_all_reduce(tensor, *args, **kwargs):
            payload[name].append(tensor.numel() * tensor.element_size())
            return original(tensor, *args, **kwargs)

        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        dist.barrier()
        payload[name].clear()
        dist.all_reduce = counting_all_reduce
        try:
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start
        finally:
            dist.all_reduce = original

    optimizers = {name: make(model.parameters()) for name, make in OPTIMIZERS.items()}
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for i in range(steps + 2):  # 2 warm-up rounds (layout discovery, state allocation)
        for name, opt in optimizers.items():
            elapsed = timed_step(name, opt)
            if i >= 2:
                times[name].append(elapsed)
    out = {
        name: dict(step_s=statistics.median(t), all_reduce_bytes=payload[name])
        for name, t in times.items()
    }
    out["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the numbers as JSON")
    args = parser.parse_args()

    table = size_table()
    print("| model | layers | params | model MB | norm bytes/step | FSDP MB/step | norms / FSDP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} M | "
            f"{r['model_bytes'] / 1e6:.1f} | {r['norm_bytes']} | {r['fsdp_bytes'] / 1e6:.0f} | "
            f"{r['norm_over_fsdp']:.1e} |"
        )

    ranks = run_ranks(_measure, 2, args.steps)
    print(f"\nResNet-50, FSDP2 on 2 CPU ranks, median step() over {args.steps} steps")
    print("| optimizer | step ms (slowest rank) | / SGD | all-reduce bytes in step() |")
    print("|---|---:|---:|---|")
    measured = {}
    for name in OPTIMIZERS:
        step = max(r[name]["step_s"] for r in ranks)
        measured[name] = dict(step_s=step, all_reduce_bytes=ranks[0][name]["all_reduce_bytes"])
    for name, m in measured.items():
        ratio = m["step_s"] / measured["SGD"]["step_s"]
        print(f"| {name} | {m['step_s'] * 1e3:.1f} | {ratio:.2f} | {m['all_reduce_bytes']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(size_table=table, resnet50_fsdp2_2ranks=measured), f, indent=1)


if __name__ == "__main__":
    main()
