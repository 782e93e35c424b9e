"""Core behaviour that DeepSpeed ZeRO-3 relies on, in one process and without DeepSpeed.

ZeRO-3 steps ONE param group once per sub-group: it sets ``group["params"] = [flat_sg]``,
calls ``step()``, and empties the group again. The core must keep one plan per (group, tensors)
(no re-discovery on every call), keep the step counters per tensor when the layout says so
(``GroupLayout.counters_owner``), and leave empty groups alone.
"""

from __future__ import annotations

import pytest
import torch

from tvlars_scale import TVLARS
from tvlars_scale.layouts import GroupLayout, Layer, Segment, register_adapter

CALLS: list[int] = []


def _flat_layout(params, ctx):
    """Each tagged tensor is one 2-D layer, counters kept in its own state."""
    if not params or not all(getattr(p, "_sub_group_test", False) for p in params):
        return None
    CALLS.append(sum(p.numel() for p in params))
    layers = [Layer(f"flat{j}", (1, p.numel())) for j, p in enumerate(params)]
    segments = [Segment(j, j) for j in range(len(params))]
    return GroupLayout(layers, segments, kind="sub_groups", counters_owner=0)


@pytest.fixture(autouse=True)
def flat_adapter():
    handle = register_adapter("test_sub_groups", _flat_layout)
    yield
    handle.remove()


HYPER = dict(lr=0.5, weight_decay=0.01, eta=0.1, lmbda=0.5)


def _flat(seed: int, n: int) -> torch.Tensor:
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    t._sub_group_test = True
    return t


def _grad(seed: int, step: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 * seed + step))


def test_one_group_stepped_once_per_sub_group():
    flats = [_flat(1, 5), _flat(2, 7)]
    original = torch.nn.Parameter(torch.zeros(3))
    optimizer = TVLARS([original], **HYPER)
    group = optimizer.param_groups[0]
    for step in range(3):
        for seed, flat in enumerate(flats, start=1):
            flat.grad = _grad(seed, step, flat.numel())
            group["params"] = [flat]
            optimizer.step()
            group["params"] = []
        optimizer.step()  # every group empty: nothing happens, no counter moves

    assert CALLS == [5, 7]  # one discovery per sub-group, then cached plans
    assert [float(optimizer.state[f]["step"]) for f in flats] == [3.0, 3.0]
    assert float(group["step"]) == 3.0  # mirrored from the last sub-group stepped

    for seed, flat in enumerate(flats, start=1):  # each equals its own 3-step run
        alone = torch.nn.Parameter(_flat(seed, flat.numel()).view(1, -1).clone())
        reference = TVLARS([alone], **HYPER)
        for step in range(3):
            alone.grad = _grad(seed, step, flat.numel()).view(1, -1)
            reference.step()
        torch.testing.assert_close(flat, alone.detach().view(-1), rtol=0, atol=0)


@pytest.mark.parametrize("decide_on_host", [True, False])
def test_counters_kept_in_state_are_not_shared_after_a_load(decide_on_host):
    """Counters are counted in place; ones kept in a tensor's state are taken as a copy, so two
    optimizers loaded from one state_dict (and the state_dict itself) count apart."""

    def step(optimizer, flat, seed):
        flat.grad = _grad(1, seed, flat.numel())
        optimizer.param_groups[0]["params"] = [flat]
        optimizer.step()
        optimizer.param_groups[0]["params"] = []

    def build():
        return TVLARS([torch.nn.Parameter(torch.zeros(3))], **HYPER, decide_on_host=decide_on_host)

    flat, source = _flat(1, 5), build()
    for seed in range(2):
        step(source, flat, seed)
    source.param_groups[0]["params"] = [flat]
    saved = source.state_dict()
    copies = [_flat(1, 5), _flat(1, 5)]
    loaded = [build(), build()]
    for optimizer, copy in zip(loaded, copies, strict=True):
        optimizer.param_groups[0]["params"] = [copy]
        optimizer.load_state_dict(saved)
        optimizer.param_groups[0]["params"] = []
    step(loaded[0], copies[0], 2)
    counts = [float(o.state[c]["step"]) for o, c in zip(loaded, copies, strict=True)]
    assert counts == [3.0, 2.0] and float(saved["state"][0]["step"]) == 2.0
