"""The fused step (``fused=True``): the eager math compiled with torch.compile, two graphs per group.

Every comparison runs the same optimizer eagerly and fused on the same parameters and gradients.
Both are float32; they differ only in summation order (inductor sums rows of 1024 elements, BLAS
its own blocks) and in fused multiply-adds, ~1e-7 relative per operation, so the updates agree to
``RTOL`` = 1e-5 over a few steps. A wrong rule misses that by orders of magnitude (a 1% change of
eta is caught by the same check in test_optimizers.py). Each comparison also asserts that the
fused optimizer really compiled (one graph per pass and group) and did not fall back to eager,
which would make the agreement trivial.

Compile cost is kept small: tiny parameters, few distinct graph structures (float
hyperparameters are graph inputs, so cases that differ only in them share inductor's cache).
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks
from test_optimizers import grad_sequence, make_params, run, two_groups
from torch._dynamo.utils import counters

import tvlars_scale
from tvlars_scale import LAMB, LARS, TVLARS
from tvlars_scale.layouts import GroupLayout, Layer, Segment, register_adapter

STEPS = 4
RTOL = 1e-5


@pytest.fixture(params=["host", "device"])
def decision_path(request, monkeypatch):
    """The skip decision read on the host (CPU default) or kept as a device tensor (the masked
    update accelerators run)."""
    if request.param == "device":
        monkeypatch.setattr(tvlars_scale.LayerwiseOptimizer, "decide_on_host", False)
    return request.param


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def max_update_error(params, initial, reference) -> float:
    """Largest |update - reference update| per tensor, relative to the reference's largest."""
    worst = 0.0
    for p, p0, ref in zip(params, initial, reference, strict=True):
        got, want = p.detach().double() - p0.double(), ref.detach().double() - p0.double()
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item())
    return worst


def one_group(params):
    return params


def second_group_differs(params):
    return two_groups(params, lr=2.0, weight_decay=0.01)


# make_params holds 1-D layers (excluded from the ratio) and a zero-initialised layer (q = 1).
CASES = {
    "tvlars-two-groups": (TVLARS, dict(lr=8.0, lmbda=0.05, delay_steps=2), second_group_differs),
    "tvlars-sum-nesterov": (
        TVLARS,
        # and the decay described over the run (phi from the derived lmbda / delay_steps)
        dict(
            lr=8.0,
            trust_denominator="sum",
            nesterov=True,
            gamma_min=0.1,
            total_steps=STEPS,
            final_factor=0.2,
        ),
        one_group,
    ),
    "tvlars-official": (TVLARS, dict(lr=8.0, lmbda=0.05, preset="official"), one_group),
    "lars-clip": (LARS, dict(lr=8.0, norm_clip=2.0), one_group),
    "lamb": (LAMB, dict(lr=0.05, weight_decay=0.01), one_group),
}
ZERO_LAYER = 4  # index of the zero-initialised layer in make_params (and in layer_stats)


# Every case on the host-decided path; two of them also on the masked device path (each case
# costs a compilation, so the matrix is not full).
MATRIX = [(case, "host") for case in CASES] + [("tvlars-two-groups", "device"), ("lamb", "device")]


@pytest.mark.parametrize("case,path", MATRIX)
def test_fused_matches_eager(case, path, monkeypatch):
    if path == "device":
        monkeypatch.setattr(tvlars_scale.LayerwiseOptimizer, "decide_on_host", False)
    cls, kw, groups = CASES[case]
    initial = make_params()
    grads = grad_sequence(initial, steps=STEPS)
    eager_params, fused_params = make_params(), make_params()
    eager = cls(groups(eager_params), **kw)
    fused = cls(groups(fused_params), fused=True, **kw)
    run(eager, eager_params, grads)
    before = compiled_graphs()
    run(fused, fused_params, grads[:1])
    assert fused.layer_stats().trust_ratio[ZERO_LAYER].item() == 1.0  # ||w|| = 0: fallback
    run(fused, fused_params, grads[1:])

    assert not fused._fused_step.disabled
    assert compiled_graphs() - before == 2 * len(fused.param_groups)  # local + update, once
    assert max_update_error(fused_params, initial, eager_params) < RTOL
    for e, f in zip(eager_params, fused_params, strict=True):
        for name, buffer in eager.state[e].items():
            torch.testing.assert_close(fused.state[f][name], buffer, rtol=RTOL, atol=1e-7)
    assert [g["step"].item() for g in fused.param_groups] == [STEPS] * len(fused.param_groups)
    want, got = eager.layer_stats(), fused.layer_stats()
    torch.testing.assert_close(got.scale, want.scale, rtol=RTOL, atol=0)


def test_resume_fused_from_an_eager_checkpoint():
    """A checkpoint carries no trace of the implementation: an eager run resumed fused continues
    phi from the saved step counter (lmbda is large, so a restarted counter would show)."""
    kw = dict(lr=4.0, lmbda=0.3, preset="official")
    grads = grad_sequence(make_params(), steps=6)
    initial = make_params()
    straight = make_params()
    run(TVLARS(two_groups(straight), **kw), straight, grads)

    first = make_params()
    opt = TVLARS(two_groups(first), **kw)
    run(opt, first, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = TVLARS(two_groups(first), fused=True, **kw)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, first, grads[3:])

    assert not resumed._fused_step.disabled
    assert resumed.param_groups[0]["step"].item() == 6
    assert max_update_error(first, initial, straight) < RTOL


@pytest.mark.parametrize("cls", [TVLARS, LAMB])
def test_skipped_steps_change_nothing(cls, decision_path):
    """All-zero gradients (no-op, not counted) and a NaN gradient (skipped, counted) leave
    weights, state and step counters bit-for-bit unchanged, then training goes on."""
    params = make_params()
    opt = cls(params, lr=1.0, fused=True)
    run(opt, params, grad_sequence(params, steps=2))
    weights = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    nan_grads = grad_sequence(params, steps=1, seed=5)
    nan_grads[0][2][3, 1] = math.nan
    run(opt, params, [[torch.zeros_like(p) for p in params], *nan_grads])

    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    for p, saved in zip(params, state, strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert opt.param_groups[0]["step"].item() == 2
    assert opt.skipped_steps.item() == 1
    run(opt, params, grad_sequence(params, steps=1, seed=6))
    assert opt.param_groups[0]["step"].item() == 3
    assert all(torch.isfinite(p).all() for p in params)
    assert not opt._fused_step.disabled


def test_no_recompilation_across_steps(monkeypatch):
    """10 steps with an LR schedule changing lr every step, phi changing with the counter and a
    skipped (NaN) step on the masked device path: one graph per pass and group, compiled once.
    The counter does see a recompilation when a structural option changes."""
    monkeypatch.setattr(tvlars_scale.LayerwiseOptimizer, "decide_on_host", False)
    grads = grad_sequence(make_params(), steps=10)
    grads[4][0][0, 0, 0, 0] = math.nan
    initial = make_params()

    def train(fused):
        params = make_params()
        opt = TVLARS(two_groups(params), lr=4.0, lmbda=0.1, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for step_grads in grads:
            run(opt, params, [step_grads])
            schedule.step()
        return opt, params

    _, eager_params = train(fused=False)
    before = compiled_graphs()
    opt, params = train(fused=True)
    assert compiled_graphs() - before == 4  # (local + update) x 2 groups
    assert [g["skipped_steps"].item() for g in opt.param_groups] == [1, 1]
    assert max_update_error(params, initial, eager_params) < RTOL  # lr did follow the schedule

    opt.param_groups[0]["nesterov"] = True
    run(opt, params, grad_sequence(params, steps=1, seed=7))
    assert compiled_graphs() - before == 5  # group 0's update pass, and nothing else


def test_compilation_failure_falls_back_with_one_warning():
    """No working C++ compiler (simulated; caches off so inductor has to call it): one warning,
    then the eager step, bit-for-bit."""
    import torch._inductor.config as inductor_config

    grads = grad_sequence(make_params(), steps=3)
    eager_params, fused_params = make_params(), make_params()
    run(TVLARS(eager_params, lr=8.0), eager_params, grads)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",)}
    with (
        inductor_config.patch(no_compiler),
        torch.compiler.config.patch(force_disable_caches=True),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        opt = TVLARS(fused_params, lr=8.0, fused=True)
        run(opt, fused_params, grads)
    ours = [w for w in caught if "fused=True" in str(w.message)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)
    assert "eager" in str(ours[0].message) and opt._fused_step.disabled
    assert all(torch.equal(a, b) for a, b in zip(eager_params, fused_params, strict=True))


def test_fused_flag_is_validated():
    with pytest.raises(ValueError, match="fused"):
        TVLARS(make_params(), lr=1.0, fused="yes")


def test_fused_is_an_attribute_of_the_optimizer_not_of_the_checkpoint():
    opt = LARS(make_params(), lr=1.0, fused=True)
    assert "fused" not in opt.state_dict()["param_groups"][0]
    assert copy.deepcopy(opt)._fused_step is not None  # but it survives pickling


# ---------------------------------------------------------------------------------- 2 ranks
# Flat sharding as DeepSpeed ZeRO-1/2 does it: every rank holds one flat fp32 partition of the
# concatenated parameters, so layers are cut at rank boundaries and many pieces are views of one
# tensor. A test-local adapter describes it; each layer is reduced over the world.
FLAT_KW = dict(lr=4.0, lmbda=0.1, weight_decay=0.01, eta=0.02)


def _flat_layout(params, ctx):
    return getattr(params[0], "_test_flat_layout", None) if len(params) == 1 else None


def flat_partition(params, rank, world_size, reduce_group):
    """This rank's flat partition as a parameter (carrying its layout) and its element range."""
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    per_rank = math.ceil(total / world_size)
    lo, hi = rank * per_rank, min((rank + 1) * per_rank, total)
    flat = torch.cat([p.detach().reshape(-1) for p in params])[lo:hi].clone()
    layers, segments, offset = [], [], 0
    for index, (p, n) in enumerate(zip(params, sizes, strict=True)):
        layers.append(Layer(f"layer{index}", tuple(p.shape), reduce_group))
        start, stop = max(offset, lo), min(offset + n, hi)
        if start < stop:
            segments.append(Segment(0, index, start - lo, stop - start))
        offset += n
    partition = torch.nn.Parameter(flat)
    partition._test_flat_layout = GroupLayout(layers, segments, kind="test-flat")
    return partition, (lo, hi)


def run_flat(rank, world_size, fused, naive=False):
    handle = register_adapter("test-flat", _flat_layout)
    try:
        params = make_params()
        reduce_group = None if naive else dist.group.WORLD
        partition, (lo, hi) = flat_partition(params, rank, world_size, reduce_group)
        opt = TVLARS([partition], fused=fused, **FLAT_KW)
        before = compiled_graphs()
        for step_grads in grad_sequence(params, steps=STEPS):
            partition.grad = torch.cat([g.reshape(-1) for g in step_grads])[lo:hi].clone()
            opt.step()
        compiled = compiled_graphs() - before
    finally:
        handle.remove()
    return dict(flat=partition.detach().clone(), compiled=compiled, stats=opt.layer_stats())


def run_fsdp2(rank, world_size):
    """FSDP2 ``fully_shard`` (DTensor shards, tvlars_scale.layouts.dtensor) with the fused step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    net = fsdp2_net()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = TVLARS(net.parameters(), fused=True, **FLAT_KW)
    before = compiled_graphs()
    for x, y in fsdp2_batches():
        opt.zero_grad()
        local = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        torch.nn.functional.mse_loss(net(x[local]), y[local]).backward()
        opt.step()
    assert not opt._fused_step.disabled and compiled_graphs() - before == 2
    return [p.full_tensor().detach() for p in net.parameters()]


def fsdp2_net():
    torch.manual_seed(0)  # 7 and 3 rows: under 2-way sharding pieces are uneven, one is empty
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1)
    )


def fsdp2_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]


def world(rank, world_size):
    return {
        "fused": run_flat(rank, world_size, fused=True),
        "naive": run_flat(rank, world_size, fused=True, naive=True),
        "fsdp2": run_fsdp2(rank, world_size),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(world, 2)


def eager_flat_reference():
    params = make_params()
    opt = TVLARS(params, **FLAT_KW)
    run(opt, params, grad_sequence(params, steps=STEPS))
    return torch.cat([p.detach().reshape(-1) for p in params]), opt.layer_stats()


def test_two_ranks_flat_shards_fused_equal_single_process_eager(two_ranks):
    initial = torch.cat([p.detach().reshape(-1) for p in make_params()])
    reference, stats = eager_flat_reference()
    gathered = torch.cat([r["fused"]["flat"] for r in two_ranks])
    assert all(r["fused"]["compiled"] == 2 for r in two_ranks)
    assert max_update_error([gathered], [initial], [reference]) < RTOL
    for r in two_ranks:  # every rank holds the true (reduced) layer norms
        torch.testing.assert_close(r["fused"]["stats"].scale, stats.scale, rtol=RTOL, atol=0)


def test_two_ranks_per_shard_norms_would_fail(two_ranks):
    """The check above can fail: without the reduction (per-shard norms) it misses by far."""
    initial = torch.cat([p.detach().reshape(-1) for p in make_params()])
    reference, _ = eager_flat_reference()
    gathered = torch.cat([r["naive"]["flat"] for r in two_ranks])
    assert max_update_error([gathered], [initial], [reference]) > 100 * RTOL


def test_two_ranks_fsdp2_fused_equal_single_process_eager(two_ranks):
    net = fsdp2_net()
    initial = [p.detach().clone() for p in net.parameters()]
    opt = TVLARS(net.parameters(), **FLAT_KW)
    for x, y in fsdp2_batches():  # the global batch: the mean of the ranks' equal halves
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    for result in two_ranks:
        assert max_update_error(result["fsdp2"], initial, list(net.parameters())) < RTOL
