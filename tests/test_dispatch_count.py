"""Issue #22: one optimizer step launches a constant number of GPU kernels.

Counted on the CPU with ``benchmarks/dispatch_count.py`` (fake CUDA tensors under a dispatch
mode; see its docstring): for TVLARS, LARS and LAMB on the path accelerators take (the skip
decision kept on the device), one steady-state step must be a handful of ops on ResNet-50's
161 tensors, no more on a 1,000-tensor list, with one foreach op only on the per-tensor slow
route (the per-layer scale) and no read of a device value on the host. Controls show that the counter can fail: a
per-parameter loop and a per-tensor scalar list are caught, torch's SGD(foreach) passes.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tvlars_scale

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` (a script, not a package) as module ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


dc = _load_benchmark("dispatch_count")

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="ResNet-50 shapes need torchvision: pip install torchvision",
)

#: The bound of issue #22 on ResNet-50's shapes, and the slack allowed on a list 6x as long.
MAX_OPS = 24
MAX_GROWTH = 4

OURS = {
    "TVLARS": lambda ps: dc.device_decision(tvlars_scale.TVLARS, ps, lr=1.0, total_steps=1000),
    "LARS": lambda ps: dc.device_decision(tvlars_scale.LARS, ps, lr=1.0),
    "LAMB": lambda ps: dc.device_decision(tvlars_scale.LAMB, ps, lr=1e-3),
}


@functools.cache
def _shapes(shape_set: str) -> tuple[torch.Size, ...]:
    return tuple(dc.shapes(shape_set))


@functools.cache
def _counts(optimizer: str, shape_set: str):
    return dc.count_step(OURS[optimizer], _shapes(shape_set))


def _summary(counts) -> str:
    slow = dict(counts.slow) or "none"
    return f"{counts.num_ops} ops {dict(counts.ops.most_common(6))}, slow route: {slow}"


# ------------------------------------------------------------------ controls
class _PerTensorLoop(torch.optim.Optimizer):
    """Plain SGD, one parameter at a time: one op per tensor, and a host read per tensor when
    ``read`` (the count must see both)."""

    def __init__(self, params, read: bool = False):
        super().__init__(params, {"lr": 0.1})
        self.read = read

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if self.read and not torch.isfinite(p.grad).all():
                    continue
                p.add_(p.grad, alpha=-group["lr"])


class _ScalarListForeach(torch.optim.Optimizer):
    """One foreach op per step, but with a 0-d tensor per parameter as the scalars: CUDA runs
    it on the per-tensor slow route. ``shared`` uses one 0-d tensor instead (the fast route)."""

    def __init__(self, params, shared: bool = False):
        super().__init__(params, {})
        self.shared = shared

    @torch.no_grad()
    def step(self):
        params = [p for g in self.param_groups for p in g["params"]]
        if not hasattr(self, "scales"):
            self.scales = [torch.full((), 0.9, device=p.device) for p in params]
        torch._foreach_mul_(params, self.scales[0] if self.shared else self.scales)


def test_counter_sees_a_per_tensor_loop_and_its_host_reads():
    shapes = _shapes("list1000")
    loop = dc.count_step(_PerTensorLoop, shapes)
    assert loop.num_ops >= len(shapes) and loop.host_reads == 0
    reading = dc.count_step(lambda ps: _PerTensorLoop(ps, read=True), shapes)
    assert reading.host_reads >= len(shapes)


def test_counter_sees_a_foreach_op_on_the_slow_route():
    shapes = _shapes("list1000")
    slow = dc.count_step(_ScalarListForeach, shapes)
    assert slow.num_ops == 1 and slow.launches == len(shapes)
    assert slow.slow == {"_foreach_mul_": len(shapes)}
    fast = dc.count_step(lambda ps: _ScalarListForeach(ps, shared=True), shapes)
    assert fast.num_ops == 1 and fast.launches == 1 and not fast.slow


def test_torch_sgd_foreach_is_a_few_ops():
    sgd = dc.count_step(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True),
        _shapes("list1000"),
    )
    ops, launches, host_reads = sgd.num_ops, sgd.launches, sgd.host_reads
    assert ops <= 5 and launches == ops and host_reads == 0, _summary(sgd)


# ------------------------------------------------------------------ issue #22
@needs_torchvision
@pytest.mark.parametrize("optimizer", list(OURS))
def test_step_is_a_constant_number_of_ops(optimizer):
    resnet, long_list = _counts(optimizer, "resnet50"), _counts(optimizer, "list1000")
    resnet_ops, long_list_ops = resnet.num_ops, long_list.num_ops
    assert resnet_ops <= MAX_OPS, f"resnet50: {_summary(resnet)}"
    assert long_list_ops <= resnet_ops + MAX_GROWTH, (
        f"list1000: {_summary(long_list)}; resnet50: {resnet_ops} ops"
    )


@needs_torchvision
@pytest.mark.parametrize("optimizer", list(OURS))
def test_step_reads_nothing_on_the_host(optimizer):
    for shape_set in ("resnet50", "list1000"):
        counts = _counts(optimizer, shape_set)
        host_reads = counts.host_reads
        assert host_reads == 0, f"{shape_set}: {_summary(counts)}"


@needs_torchvision
@pytest.mark.parametrize("optimizer", list(OURS))
def test_one_foreach_op_takes_the_per_tensor_route(optimizer):
    """A foreach op whose lists do not line up (a 0-d tensor per parameter as the scalars,
    mixed dtypes or strides) is one op but a launch per tensor on CUDA. The eager step has
    exactly one: each piece scaled by its own layer's device scalar, for which torch has no
    multi-tensor kernel (``functional.masked.scale_pieces_``; ``fused=True`` compiles it into
    one graph, which fake tensors cannot count)."""
    for shape_set in ("resnet50", "list1000"):
        counts = _counts(optimizer, shape_set)
        assert counts.slow == {"_foreach_mul_": len(_shapes(shape_set))}, _summary(counts)
        assert counts.launches == counts.num_ops - 1 + len(_shapes(shape_set))
