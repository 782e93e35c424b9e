"""Soak: thousands of optimizer steps on 2 CPU ranks keep memory flat and telemetry bounded.

Two ranks (gloo, one thread each) train a small MLP under DDP with TVLARS for ``--steps``
optimizer steps, on fresh random batches, with the telemetry the recipes write: every
``--telemetry-every`` steps rank 0 appends ``optimizer.layer_stats().to_dict()`` as one JSON line.
Every ``--rss-every`` steps each rank records its resident set size (``VmRSS``). Reported per
rank: RSS after the first ``--warmup`` steps (allocator and caches settled) and at the end, its
growth per 1,000 steps by a least-squares fit over the samples after the warm-up, the
optimizer's host-side caches (layout plans, last layer stats: bounded by the number of param
groups), and the telemetry file's size per record (constant: the file grows linearly with the
records asked for, nothing else grows).

Run: ``PYTHONPATH=. python benchmarks/soak.py [--steps 2000] [--out soak.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multirank import run_ranks

from tvlars_scale import TVLARS


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _slope_per_1000(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(r for _, r in points) / n
    var = sum((s - mx) ** 2 for s, _ in points)
    return 1000 * sum((s - mx) * (r - my) for s, r in points) / var if var else 0.0


def _soak(rank: int, world_size: int, args: argparse.Namespace, telemetry: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip
    model = nn.parallel.DistributedDataParallel(model)
    optimizer = TVLARS(model.parameters(), lr=1.0, lmbda=1e-3, delay_steps=100)
    gen = torch.Generator().manual_seed(1 + rank)
    rss: list[tuple[int, float]] = []
    stream = open(telemetry, "w") if rank == 0 else None  # noqa: SIM115
    records = 0
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 64, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if stream is not None and step % args.telemetry_every == 0:
            stream.write(json.dumps({"step": step, "layers": optimizer.layer_stats().to_dict()}))
            stream.write("\n")
            records += 1
        if step % args.rss_every == 0 or step == 1:
            rss.append((step, _rss_mib()))
    seconds = time.perf_counter() - started
    if stream is not None:
        stream.close()
    dist.barrier()
    settled = [(s, r) for s, r in rss if s >= args.warmup]
    result = {
        "rank": rank,
        "steps": args.steps,
        "optimizer_step": float(optimizer.param_groups[0]["step"]),
        "seconds": round(seconds, 1),
        "rss_first_step_mib": rss[0][1],
        "rss_after_warmup_mib": settled[0][1],
        "rss_end_mib": rss[-1][1],
        "rss_max_mib": max(r for _, r in rss),
        "rss_growth_mib_per_1000_steps": round(_slope_per_1000(settled), 3),
        "cached_plans": len(optimizer._plans),
        "cached_layer_stats": len(optimizer._last_stats),
        "optimizer_state_tensors": sum(len(s) for s in optimizer.state.values()),
    }
    if rank == 0:
        size = os.path.getsize(telemetry)
        result.update(telemetry_records=records, telemetry_bytes=size,
                      telemetry_bytes_per_record=round(size / max(records, 1), 1))  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rss-every", type=int, default=100)
    parser.add_argument("--telemetry-every", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the per-rank results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_ranks(_soak, 2, args, os.path.join(tmp, "layers.jsonl"))
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
