"""What exact layer-wise norms cost when parameters are sharded: collectives, bytes, step time.

1. Bytes per step for the norms, against the model's size, for torchvision ResNet shapes. The
   optimizer all-reduces one fp32 vector per shard group per step: 2 floats per layer (one per
   original parameter) + 1. FSDP itself moves the parameters twice (all-gather in forward and
   backward) and the gradients once (reduce-scatter) every step.
2. Measured on 2 and 4 CPU ranks (gloo, one thread each) with a torchvision model sharded two ways:
   - ``fsdp2``: ``fully_shard`` per residual block plus the root; every parameter is a
     ``DTensor(Shard(0))``.
   - ``zero2``: ``deepspeed.initialize`` with ZeRO stage 2; the basic optimizer steps DeepSpeed's
     flat fp32 partition (one slice of many layers per rank).
   For each, the collectives issued inside ``step()`` (count and payload bytes, per rank), and the
   median ``step()`` time of TVLARS against ``torch.optim.SGD`` (momentum, weight decay, foreach)
   on the same sharded parameters and gradients (LARS and LAMB too under FSDP2, and AdamW for
   scale). Optimizers take turns step by step, so load from other processes hits them alike.
3. The two alternatives, run on the same shards and process group, computing the same per-layer
   ||w||^2 and ||g||^2:
   - ``per-param all-reduce``: one all-reduce of 2 floats per parameter (what other distributed
     LAMBs do, e.g. ColossalAI's ``DistributedLamb``);
   - ``gather full params``: all-gather every parameter and gradient, then take norms locally
     (what ``DTensor.full_tensor()`` / ``safe_get_full_*`` code does).

Payload bytes are the tensors handed to the collective on one rank; a ring all-reduce moves about
2 (ws - 1) / ws of that per rank, an all-gather (ws - 1) / ws of its output.

Run: ``PYTHONPATH=. python benchmarks/comm_bytes.py [--world-sizes 2 4] [--engines fsdp2 zero2]
[--model resnet50] [--steps 8] [--device cpu|cuda] [--out results.json]`` (~4 min on 2 cores).
``--device cuda`` puts rank r on GPU r (so it needs one GPU per rank) and keeps gloo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torchvision
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multirank import run_ranks

import tvlars_scale.deepspeed as tds
from tvlars_scale import LAMB, LARS, TVLARS

MODELS = ("resnet18", "resnet50", "resnet101", "resnet152")
OPTIMIZERS: dict[str, Callable] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True),
    "TVLARS": lambda p: TVLARS(p, lr=0.1),
    "LARS": lambda p: LARS(p, lr=0.1),
    "LAMB": lambda p: LAMB(p, lr=1e-3),
    # what LAMB adds trust ratios to
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-4, foreach=True),
}
#: Under ZeRO-2 DeepSpeed builds one engine per optimizer; TVLARS is the one we measure, and the
#: torch baselines step the same flat partitions.
ZERO2_OPTIMIZERS = ("SGD", "TVLARS", "AdamW")


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


# --------------------------------------------------------------------------- sharded setups
class Sharded:
    """One rank's view of a sharded model: the tensors each optimizer steps, with gradients,
    and per-layer local pieces for the alternatives (``pieces[i]`` = (local w, local g) slices
    of layer i on this rank, possibly empty)."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], pieces, full_numel: int, gather):
        self.params, self.grads, self.pieces, self.full_numel = params, grads, pieces, full_numel
        self.gather = gather  # the (w, g) tensors the "gather full params" alternative gathers

    def load_grads(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g


def _model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().to(device)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [
        block
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for block in stage
    ]


def _fsdp2(model_name: str, device: torch.device) -> tuple[Sharded, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = _model(model_name, device)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # One real backward gives every parameter its sharded DTensor gradient; the steps reuse it.
    model(torch.randn(2, 3, 64, 64, device=device)).sum().backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    pieces = [(p.to_local().detach().reshape(-1), p.grad.to_local().reshape(-1)) for p in params]
    # Gathering means one all-gather per parameter and gradient (``DTensor.full_tensor()``).
    sharded = Sharded(params, grads, pieces, sum(p.numel() for p in params), gather=pieces)
    return sharded, {name: OPTIMIZERS[name] for name in OPTIMIZERS}


def _zero2(model_name: str, device: torch.device) -> tuple[Sharded, dict]:
    import deepspeed

    model = _model(model_name, device)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "TVLARS", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    tds.bind(engine)  # we step the basic optimizer directly, outside engine.step()
    flats = list(engine.optimizer.single_partition_of_fp32_groups)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    grads = [torch.randn(f.shape, generator=gen, device=device) * 1e-2 for f in flats]
    # Per-layer local pieces of the flat partition, from DeepSpeed's own fragment map.
    pieces = []
    for p in model.parameters():
        frag = getattr(p, "_hp_mapping", None)
        if frag is None:
            empty = flats[0].new_empty(0)
            pieces.append((empty, empty))
            continue
        i, addr = frag.param_group_index, frag.hp_fragment_address
        pieces.append(
            (flats[i].narrow(0, addr.start, addr.numel), grads[i].narrow(0, addr.start, addr.numel))
        )
    # Gathering means all-gathering the flat partitions (equal-sized) and their gradients.
    full = sum(p.numel() for p in model.parameters())
    sharded = Sharded(flats, grads, pieces, full, gather=list(zip(flats, grads, strict=True)))
    baselines = {name: OPTIMIZERS[name] for name in ZERO2_OPTIMIZERS if name != "TVLARS"}
    return sharded, {"TVLARS": lambda _: engine.basic_optimizer, **baselines}


ENGINES = {"fsdp2": _fsdp2, "zero2": _zero2}


# --------------------------------------------------------------------------- alternatives
@torch.no_grad()
def _per_param_all_reduce(s: Sharded) -> tuple[int, int]:
    """One all-reduce of (||w||^2, ||g||^2) per parameter."""
    calls = nbytes = 0
    for w, g in s.pieces:
        sums = torch.stack([w.pow(2).sum(), g.pow(2).sum()])
        dist.all_reduce(sums)
        calls, nbytes = calls + 1, nbytes + sums.numel() * sums.element_size()
    return calls, nbytes


def _piece_sizes(s: Sharded) -> list[int]:
    """The largest local piece of each layer over the ranks (static: exchanged once)."""
    device = s.pieces[0][0].device
    sizes = torch.tensor([w.numel() for w, _ in s.gather], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    return sizes.tolist()


@torch.no_grad()
def _gather_full(s: Sharded, sizes: list[int]) -> tuple[int, int]:
    """All-gather every parameter and gradient (pieces padded to equal size), norms locally."""
    ws = dist.get_world_size()
    calls = nbytes = 0
    for (w, g), longest in zip(s.gather, sizes, strict=True):
        for local in (w, g):
            padded = local.new_zeros(longest)
            padded[: local.numel()] = local
            out = padded.new_empty(ws * longest)
            dist.all_gather_into_tensor(out, padded)
            out.pow(2).sum()
            calls, nbytes = calls + 1, nbytes + out.numel() * out.element_size()
    return calls, nbytes


ALTERNATIVES = ("per-param all-reduce", "gather full params")


# --------------------------------------------------------------------------- measurement
class _CollectiveLog:
    """Counts the collectives (and payload bytes) issued while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def __enter__(self):
        self._saved = {n: getattr(dist, n) for n in self.NAMES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            t = tensor[0] if isinstance(tensor, list) else tensor
            self.bytes += (
                t.numel() * t.element_size() * (len(tensor) if isinstance(tensor, list) else 1)
            )
            return fn(tensor, *args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(rank: int, world_size: int, engine: str, model: str, steps: int, device: str):
    device = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sharded, makers = ENGINES[engine](model, device)
    optimizers = {name: make(sharded.params) for name, make in makers.items()}
    work: dict[str, Callable[[], object]] = {name: opt.step for name, opt in optimizers.items()}
    sizes = _piece_sizes(sharded)
    work["per-param all-reduce"] = lambda: _per_param_all_reduce(sharded)
    work["gather full params"] = lambda: _gather_full(sharded, sizes)
    times: dict[str, list[float]] = {name: [] for name in work}
    counts: dict[str, tuple[int, int]] = {}
    for i in range(steps + 2):  # 2 warm-up rounds (layout discovery, state allocation)
        for name, fn in work.items():
            sharded.load_grads()
            dist.barrier()
            _sync(device)
            with _CollectiveLog() as log:
                start = time.perf_counter()
                fn()
                _sync(device)
                elapsed = time.perf_counter() - start
            if i >= 2:
                times[name].append(elapsed)
            counts[name] = (log.calls, log.bytes)
    return {
        name: dict(step_s=statistics.median(t), calls=counts[name][0], bytes=counts[name][1])
        for name, t in times.items()
    } | {
        "layers": len(sharded.pieces),
        "local_numel": sum(w.numel() for w, _ in sharded.pieces),
        "full_numel": sharded.full_numel,
    }


def measure(engine: str, world_size: int, model: str, steps: int, device: str) -> dict:
    ranks = run_ranks(_measure, world_size, engine, model, steps, device)
    out = {k: ranks[0][k] for k in ("layers", "local_numel", "full_numel")}
    for name in ranks[0]:
        if isinstance(ranks[0][name], dict):
            out[name] = ranks[0][name] | {"step_s": max(r[name]["step_s"] for r in ranks)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-size-table", action="store_true")
    parser.add_argument("--out", default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)

    print(
        f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, device {args.device}"
    )
    report: dict = {"date": str(datetime.date.today()), "device": args.device, "measured": {}}
    if not args.no_size_table:
        table = report["size_table"] = size_table()
        print(
            "| model | layers | params | model MB | norm bytes/step | FSDP MB/step | norms / FSDP |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in table:
            print(
                f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} M | "
                f"{r['model_bytes'] / 1e6:.1f} | {r['norm_bytes']} | {r['fsdp_bytes'] / 1e6:.0f} | "
                f"{r['norm_over_fsdp']:.1e} |"
            )

    print(
        f"\n{args.model}, median over {args.steps} steps (slowest rank); calls and payload bytes "
        "per rank per step inside step() / the alternative"
    )
    print(
        "| engine | ranks | what | collectives | payload bytes | ms (step, or norms only) | / SGD step |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for engine in args.engines:
        for ws in args.world_sizes:
            m = measure(engine, ws, args.model, args.steps, args.device)
            report["measured"][f"{engine}_{ws}ranks"] = m
            sgd = m["SGD"]["step_s"]
            for name in [*OPTIMIZERS, *ALTERNATIVES]:
                if name not in m:
                    continue
                r = m[name]
                print(
                    f"| {engine} | {ws} | {name} | {r['calls']} | {r['bytes']:,} | "
                    f"{r['step_s'] * 1e3:.1f} | {r['step_s'] / sgd:.2f} |",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
