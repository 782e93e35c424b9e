"""Issue #22: ``optimizer.step()`` captured in a CUDA graph replays as the eager step does.

A step that keeps its decision on the device, updates its state and counters in place and
makes no host sync can be captured once and replayed every iteration (``torch.cuda.graph``),
the way torch's ``capturable`` optimizers are. For TVLARS, LARS and LAMB: two copies of a
small model's parameters on the GPU; one steps eagerly, the other replays a graph of one
``step()`` after fresh gradients are copied into its static ``.grad`` tensors. Parameters,
state and the group counters (``step``, ``skipped_steps``) must agree after every step, and a
step with a NaN gradient must be skipped by both: a graph that froze a value read on the host
at capture time (the step count of a schedule, say), replaced a counter instead of updating
it, or baked in the decision to apply would drift from the eager twin.

Follows torch's recipe for whole-network capture (docs "CUDA Graphs"): warm-up steps on a side
stream, then the capture, then ``replay()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tvlars_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WARMUP_STEPS = 3
#: Steps compared after the capture; the second has a NaN gradient.
GRADS_NAN = (False, True, False)


def _device_decision(cls: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """On CUDA the decision stays on the device by default; say so (the step a graph captures
    must keep it there)."""
    return cls(params, decide_on_host=False, **kwargs)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    # A short run, so that phi(t) changes visibly from one step to the next.
    "TVLARS": lambda ps: _device_decision(tvlars_scale.TVLARS, ps, lr=1.0, total_steps=10),
    "LARS": lambda ps: _device_decision(tvlars_scale.LARS, ps, lr=1.0),
    # Its bias corrections change with the step count.
    "LAMB": lambda ps: _device_decision(tvlars_scale.LAMB, ps, lr=1e-3),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Weights (adapted) and biases/norm weights (excluded), as the rules treat them apart.
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 8)).cuda()


def _gradients(params: list[nn.Parameter], nan: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    grads = [torch.randn(p.shape, device="cuda", generator=g) * 1e-2 for p in params]
    if nan:
        grads[0].view(-1)[3] = float("nan")
    return grads


def _counters(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    return [
        {k: float(torch.as_tensor(g[k]).item()) for k in ("step", "skipped_steps") if k in g}
        for g in optimizer.param_groups
    ]


def _assert_same(graphed: torch.optim.Optimizer, eager: torch.optim.Optimizer, when: str) -> None:
    graphed_params = [p for g in graphed.param_groups for p in g["params"]]
    eager_params = [p for g in eager.param_groups for p in g["params"]]
    for i, (a, b) in enumerate(zip(graphed_params, eager_params, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{when}: parameter {i}")
        for name, value in eager.state[b].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    graphed.state[a][name], value, rtol=1e-5, atol=1e-6, msg=f"{when}: {name} {i}"
                )
    assert _counters(graphed) == _counters(eager), when


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_captured_step_replays_like_the_eager_step(name):
    model = _model()
    graphed_params = list(model.parameters())
    eager_params = list(copy.deepcopy(model).parameters())
    for p in graphed_params + eager_params:
        p.grad = torch.zeros_like(p)  # static: the graph reads these very tensors
    graphed, eager = OPTIMIZERS[name](graphed_params), OPTIMIZERS[name](eager_params)

    def feed(params: list[nn.Parameter], step: int, nan: bool = False) -> None:
        for p, grad in zip(params, _gradients(params, nan, seed=step), strict=True):
            p.grad.copy_(grad)

    # Warm-up on a side stream: the first steps create the state and any lazily built
    # buffers outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP_STEPS):
            feed(graphed_params, step)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(WARMUP_STEPS):
        feed(eager_params, step)
        eager.step()
    torch.cuda.synchronize()
    _assert_same(graphed, eager, "after the warm-up")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()  # recorded, not run: the state is still that of the warm-up

    for i, nan in enumerate(GRADS_NAN):
        step = WARMUP_STEPS + i
        before = [p.detach().clone() for p in graphed_params]
        feed(graphed_params, step, nan)
        graph.replay()
        feed(eager_params, step, nan)
        eager.step()
        torch.cuda.synchronize()
        _assert_same(graphed, eager, f"step {step} (NaN gradient: {nan})")
        changed = [not torch.equal(b, p) for b, p in zip(before, graphed_params, strict=True)]
        if nan:
            assert not any(changed), f"step {step}: a NaN gradient's step was not skipped"
        else:
            assert any(changed), f"step {step}: the replay changed no parameter"

    counters = _counters(eager)[0]
    assert counters["step"] == WARMUP_STEPS + len(GRADS_NAN) - sum(GRADS_NAN)
    assert counters.get("skipped_steps", sum(GRADS_NAN)) == sum(GRADS_NAN)
