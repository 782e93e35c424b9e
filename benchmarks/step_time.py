"""Time one optimizer step on real model parameter shapes, against torch's own optimizers.

Every optimizer gets its own copy of the same parameters and gradients, and the steps are
interleaved (one step of each per round, repeated), so machine noise hits all of them alike; the
table reports median step times and, per optimizer, the median over rounds of its step time over
that of ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, foreach=True)`` and of
``torch.optim.AdamW(weight_decay=1e-2, foreach=True)`` in the same round (on a shared machine
the load drifts between rounds; within a round the steps are adjacent), with the interquartile
range of that ratio over the rounds; and the best (shortest) step of each, with the ratios of
best steps, which a busy machine disturbs least.
The first step of each optimizer is timed apart ("first step"): it creates the state buffers and,
for the ``(fused)`` optimizers, compiles the step (``--no-compile-cache`` makes that a cold
compile, as on a fresh machine; by default inductor's on-disk cache may serve earlier runs).

    python benchmarks/step_time.py --model resnet50 --threads 2 --repeats 15 --malloc retain

``--clock cpu`` times each step by the CPU time of the process (all threads) instead of the wall
clock, with OpenMP's idle threads sleeping (``OMP_WAIT_POLICY=PASSIVE``) rather than spinning:
on a machine shared with other jobs, a step then does not count the time it waited for a core,
and ratios stay stable when wall-clock ratios scatter by 2x. The first-step column is always
wall-clock time.

CPU caveat: SGD(foreach) allocates a parameter-sized tensor every step. With glibc's default
settings those pages go back to the OS and fault in again on every step, which can double its
time depending on what else the process allocated before; ``--malloc retain`` re-runs the
script with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised, so freed memory is
reused as it is in a long training process (and with jemalloc/tcmalloc or CUDA's caching
allocator). Report which one you ran.

``--device cuda`` times the step on one GPU (``torch.cuda.synchronize()`` around each step); the
ratios are then to ``SGD(fused)`` and ``AdamW(fused)`` (torch's single-kernel steps; set them
with ``--baselines``). ``--model list1000`` steps a 1,000-tensor list of small (256, 256) and
(256,) tensors, where a cost per tensor shows (``dispatch_count.py`` counts its ops).
``--check-syncs`` profiles one step for host syncs and, on CUDA, runs steady-state steps under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronizing call.
``--json PATH`` also writes the numbers, for scripts (``gpu_check.sh``).
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

# A sibling script, importable as this one runs from benchmarks/ (sys.path[0]).
from dispatch_count import SHAPE_SETS, device_decision
from dispatch_count import shapes as model_shapes

import tvlars_scale


class PerParameterLARS(torch.optim.Optimizer):
    """LARS written the way the authors' code runs it: a Python loop over parameters with a
    host sync (``.item()``) per parameter. A baseline for what the foreach core saves."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad if p.ndim <= 1 else p.grad.add(p, alpha=group["weight_decay"])
                ratio = 1.0
                if p.ndim > 1:
                    w_norm, d_norm = p.norm().item(), d.norm().item()
                    if w_norm > 0 and d_norm > 0:
                        ratio = group["eta"] * w_norm / d_norm
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d, alpha=ratio)
                p.add_(buf, alpha=-group["lr"])


OPTIMIZERS: dict[str, Callable] = {
    "SGD(foreach)": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True
    ),
    "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
    "SGD(fused)": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
    "TVLARS": lambda ps: tvlars_scale.TVLARS(ps, lr=1.0),
    "LARS": lambda ps: tvlars_scale.LARS(ps, lr=1.0),
    "LAMB": lambda ps: tvlars_scale.LAMB(ps, lr=1e-3),
    "TVLARS(fused)": lambda ps: tvlars_scale.TVLARS(ps, lr=1.0, fused=True),
    "LARS(fused)": lambda ps: tvlars_scale.LARS(ps, lr=1.0, fused=True),
    "LAMB(fused)": lambda ps: tvlars_scale.LAMB(ps, lr=1e-3, fused=True),
    # The path accelerators take: the skip decision stays a device tensor, and the step is a
    # fixed number of multi-tensor kernels masked by it; fused, the per-piece scale is one
    # compiled graph. (On CUDA the plain names take it too.)
    "TVLARS(device decision)": lambda ps: device_decision(tvlars_scale.TVLARS, ps, lr=1.0),
    "LARS(device decision)": lambda ps: device_decision(tvlars_scale.LARS, ps, lr=1.0),
    "LAMB(device decision)": lambda ps: device_decision(tvlars_scale.LAMB, ps, lr=1e-3),
    "TVLARS(fused, device decision)": lambda ps: device_decision(
        tvlars_scale.TVLARS, ps, lr=1.0, fused=True
    ),
    "LAMB(fused, device decision)": lambda ps: device_decision(
        tvlars_scale.LAMB, ps, lr=1e-3, fused=True
    ),
    "per-parameter LARS (.item())": lambda ps: PerParameterLARS(ps, lr=1.0),
}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


def time_steps(
    shapes: list[torch.Size],
    names: list[str],
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    channels_last: bool = False,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(first step time, steady-state step times) per optimizer, in seconds. With
    ``channels_last``, 4-D weights and gradients are channels-last, as a model moved with
    ``.to(memory_format=torch.channels_last)`` has them."""
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    if channels_last:
        weights, grads = ([_channels_last(t) for t in ts] for ts in (weights, grads))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs, first = {}, {}
    for name in names:
        params = [torch.nn.Parameter(w.to(device)) for w in weights]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.to(device)
        opt = OPTIMIZERS[name](params)
        sync()
        start = time.perf_counter()
        opt.step()  # creates state buffers, caches the layout and (fused) compiles
        sync()
        first[name] = time.perf_counter() - start
        opt.step()  # (fused) the second call runs the cached graphs once before timing
        runs[name] = (opt, [])

    for _ in range(repeats):
        for _name, (opt, times) in runs.items():
            sync()
            start = clock()
            opt.step()
            sync()
            times.append(clock() - start)
    return first, {name: times for name, (_, times) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="resnet50",
        choices=list(SHAPE_SETS),
        help="parameter shapes: a torchvision model's, or a list of 1,000 small tensors",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved steps per optimizer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=list(OPTIMIZERS),
        help="optimizers the ratios are taken to, those of them that run (default: "
        "SGD(foreach) and AdamW(foreach) on cpu, SGD(fused) and AdamW(fused) on cuda)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH (for scripts)"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="4-D weights and gradients channels-last (a model after "
        ".to(memory_format=torch.channels_last))",
    )
    parser.add_argument(
        "--malloc",
        choices=["default", "retain"],
        default="retain",
        help="glibc allocator settings: 'retain' keeps freed memory for reuse (see module doc)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall clock, or by process CPU time (robust to other jobs)",
    )
    parser.add_argument(
        "--check-syncs",
        action="store_true",
        help="profile one step of each optimizer and count its host syncs "
        "(cudaStreamSynchronize, cudaDeviceSynchronize, aten::_local_scalar_dense); on cuda "
        'also run steady-state steps under torch.cuda.set_sync_debug_mode("error")',
    )
    parser.add_argument(
        "--inductor-startup",
        action="store_true",
        help="first compile a one-line function and report its time: inductor's own start-up "
        "(paid once per process), which the (fused) first steps then no longer include",
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="disable torch.compile's caches so that the fused first step is a cold compile",
    )
    args = parser.parse_args()
    env = {}
    if args.malloc == "retain":
        env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 31))
    if args.clock == "cpu":
        env.update(OMP_WAIT_POLICY="PASSIVE")  # read when OpenMP starts: before torch runs
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        torch.compiler.config.force_disable_caches = True
    device = torch.device(args.device)
    shapes = model_shapes(args.model)
    numel = sum(s.numel() for s in shapes)
    startup = _inductor_startup(device) if args.inductor_startup else None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    first, results = time_steps(
        shapes, args.optimizers, args.repeats, device, clock, args.channels_last
    )
    syncs = count_syncs(shapes, args.optimizers, device) if args.check_syncs else {}
    debug = sync_debug(shapes, args.optimizers, device) if args.check_syncs else {}

    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.model}: {len(shapes)} tensors, {numel / 1e6:.1f}M params, device={device} "
        f"({machine}), threads={args.threads}, repeats={args.repeats}, malloc={args.malloc}, "
        f"memory format {'channels-last' if args.channels_last else 'contiguous'}, "
        f"clock={args.clock}, {datetime.date.today()}, torch {torch.__version__}, "
        f"compile cache {'off' if args.no_compile_cache else 'on'}, "
        f"load average {load:.1f} -> {end_load:.1f}"
    )
    if startup is not None:
        print(f"inductor start-up (a one-line function, compiled first): {startup:.2f} s")
    baselines = args.baselines or (
        ["SGD(fused)", "AdamW(fused)"]
        if device.type == "cuda"
        else ["SGD(foreach)", "AdamW(foreach)"]
    )
    bases = [b for b in baselines if b in results]
    print(
        f"| optimizer | median step (ms, {args.clock}) | "
        + "".join(f"x {b} [IQR] | " for b in bases)
        + "best step (ms) | "
        + "".join(f"best x {b} | " for b in bases)
        + "first step (s) |"
    )
    print("|---|---:|" + "---:|" * (2 * len(bases) + 2))
    for name, times in results.items():
        cells = [_ratio(times, results[b]) for b in bases]
        best = [f"{min(times) / min(results[b]):.2f}" for b in bases]
        print(
            f"| {name} | {statistics.median(times) * 1e3:.1f} | "
            + "".join(f"{c} | " for c in cells)
            + f"{min(times) * 1e3:.1f} | "
            + "".join(f"{c} | " for c in best)
            + f"{first[name]:.2f} |"
        )
    if syncs:
        _print_syncs(syncs)
    if args.check_syncs and device.type != "cuda":
        print(
            '\ntorch.cuda.set_sync_debug_mode("error"): skipped (CUDA only; on CPU a host read '
            "waits for nothing)"
        )
    elif debug:
        print('\n| optimizer | steady-state steps under set_sync_debug_mode("error") |')
        print("|---|---|")
        for name, verdict in debug.items():
            print(f"| {name} | {verdict} |")
    if args.json:
        report = {
            "model": args.model,
            "tensors": len(shapes),
            "params": numel,
            "device": str(device),
            "machine": machine,
            "torch": torch.__version__,
            "repeats": args.repeats,
            "clock": args.clock,
            "baselines": bases,
            "optimizers": {
                name: {
                    "median_ms": statistics.median(times) * 1e3,
                    "best_ms": min(times) * 1e3,
                    "first_s": first[name],
                    "ratios": {
                        b: statistics.median(
                            [t / u for t, u in zip(times, results[b], strict=True)]
                        )
                        for b in bases
                    },
                    "syncs": syncs.get(name),
                    "sync_debug": debug.get(name),
                }
                for name, times in results.items()
            },
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")
#: Runtime and driver calls that launch a kernel (triton's go through the driver), and copies.
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
COPY_EVENTS = ("cudaMemcpyAsync",)


def _warmed(name: str, shapes: list[torch.Size], device: torch.device) -> torch.optim.Optimizer:
    """Optimizer ``name`` over fresh parameters of ``shapes`` with gradients, after the two
    steps that create its state (and plans, and compiled graphs)."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = OPTIMIZERS[name](params)
    opt.step()
    opt.step()
    return opt


def count_syncs(shapes: list[torch.Size], names: list[str], device: torch.device) -> dict:
    """Per optimizer, how often one step (after two warm-up steps) calls each of
    ``SYNC_EVENTS``: on an accelerator each waits for the device. On CPU only the last can
    show, and means a value read on the host (free there). On CUDA also the step's kernel
    launches (``LAUNCH_EVENTS``) and ``cudaMemcpyAsync`` calls, as the profiler's CUDA activity
    records them: the real counterpart of ``dispatch_count.py``'s ``launches``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counts = {}
    for name in names:
        opt = _warmed(name, shapes, device)
        with profile(activities=activities) as prof:
            opt.step()
        found = {e.key: e.count for e in prof.key_averages()}
        counts[name] = {key: found.get(key, 0) for key in SYNC_EVENTS}
        if device.type == "cuda":
            counts[name]["kernel launches"] = sum(found.get(k, 0) for k in LAUNCH_EVENTS)
            counts[name]["cudaMemcpyAsync"] = sum(found.get(k, 0) for k in COPY_EVENTS)
    return counts


def sync_debug(
    shapes: list[torch.Size], names: list[str], device: torch.device, steps: int = 3
) -> dict[str, str]:
    """Per optimizer, ``"0 syncs"`` when ``steps`` steady-state steps (after two warm-up steps)
    run under ``torch.cuda.set_sync_debug_mode("error")``, else the error of the first
    synchronizing call (a ``.item()``, a copy to the host, a stream sync). CUDA only: empty on
    other devices."""
    if device.type != "cuda":
        return {}
    verdicts = {}
    for name in names:
        opt = _warmed(name, shapes, device)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(steps):
                opt.step()
            verdicts[name] = "0 syncs"
        except RuntimeError as exc:
            verdicts[name] = "sync: " + (str(exc).strip().splitlines() or [""])[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        del opt
    return verdicts


def _inductor_startup(device: torch.device) -> float:
    """Seconds to compile and run ``x + 1``: what inductor costs before any graph of ours (on
    CPU it probes the vector instruction sets by building test programs)."""
    start = time.perf_counter()
    torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(8, device=device))
    return time.perf_counter() - start


def _print_syncs(syncs: dict) -> None:
    keys = list(next(iter(syncs.values())))
    print("\n| optimizer | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, counts in syncs.items():
        print(f"| {name} | " + " | ".join(str(counts[k]) for k in keys) + " |")


def _ratio(times: list[float], base: list[float]) -> str:
    """Median over rounds of time / base time, with the interquartile range."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f} [{q[0]:.2f}-{q[2]:.2f}]"


if __name__ == "__main__":
    main()
