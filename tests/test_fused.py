"""The fused step (``fused=True``): the eager math compiled with torch.compile, in bounded buckets.

Every comparison runs the same optimizer eagerly and fused on the same parameters and gradients.
Both are float32; they differ only in summation order (inductor sums in its own blocks, BLAS in
its own) and in fused multiply-adds, ~1e-7 relative per operation, so the updates agree to
``RTOL`` = 1e-5 over a few steps. A wrong rule misses that by orders of magnitude (a 1% change of
eta is caught by the same check in test_optimizers.py). Each comparison also asserts that the
fused optimizer really compiled and did not fall back to eager, which would make the agreement
trivial.

The parameters hold every kind of piece the buckets treat apart (``fused_params``): adapted and
excluded layers (the latter run eagerly), layers above ``LARGE`` elements (the compiled local
pass), a one-element layer and the zero-initialised layer of the fallback. Buckets hold 2
pieces here (``small_buckets``), so that a few layers already span several buckets, padded ones
included. Compile cost is kept small: tiny graphs, and float hyperparameters are graph inputs,
so cases that differ only in them share inductor's cache.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from equivalence import recorded_all_reduce
from multirank import run_ranks
from test_optimizers import (
    DECISION_PATHS,
    grad_sequence,
    make_params,
    no_host_reads,
    run,
    two_groups,
)
from torch._dynamo.utils import counters

import tvlars_scale
import tvlars_scale.fused
from tvlars_scale import LAMB, LARS, TVLARS
from tvlars_scale.fused import LARGE
from tvlars_scale.layouts import GroupLayout, Layer, Segment, register_adapter

STEPS = 4
RTOL = 1e-5


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    monkeypatch.setattr(tvlars_scale.fused, "BUCKET", 2)


@pytest.fixture(params=list(DECISION_PATHS))
def decision_path(request):
    """The skip decision read on the host (CPU default) or kept as a device tensor (the masked
    update accelerators run), as the constructor keywords that pick it."""
    return dict(DECISION_PATHS[request.param])


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fused_params(seed=0, copies=1):
    """make_params' layers (index ``ZERO_LAYER`` is zero-initialised), then ``copies`` times: an
    adapted and an excluded layer above LARGE elements and a one-element layer."""
    params = make_params(seed)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(copies):
        for shape in [(72, 64), (LARGE + 8,), (1,)]:
            params.append(torch.nn.Parameter(torch.randn(shape, generator=g)))
    return params


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
#: Graphs per rule and decision path. Decided on the host, the LARS rule compiles the local pass
#: of its large adapted pieces (its update is torch's fused SGD kernel in either mode) and LAMB
#: nothing (torch's fused Adam kernel). Kept on the device, both run the masked multi-tensor
#: kernels and compile one graph per param group (specialised on its pieces' shapes): each
#: piece scaled by its layer's device scalar.
GRAPHS = {("LARS", "host"): 1, ("LARS", "device"): 1, ("LAMB", "host"): 0, ("LAMB", "device"): 1}


MATRIX = [(case, path) for case in CASES for path in ("host", "device")]


@pytest.mark.parametrize("case,path", MATRIX)
def test_fused_matches_eager(case, path):
    cls, kw, groups = CASES[case]
    kw = {**kw, **DECISION_PATHS[path]}
    initial = fused_params()
    grads = grad_sequence(initial, steps=STEPS)
    eager_params, fused = fused_params(), fused_params()
    eager = cls(groups(eager_params), **kw)
    opt = cls(groups(fused), fused=True, **kw)
    run(eager, eager_params, grads)
    before = compiled_graphs()
    run(opt, fused, grads[:1])
    assert opt.layer_stats().trust_ratio[ZERO_LAYER].item() == 1.0  # ||w|| = 0: fallback
    after_first = compiled_graphs() - before
    run(opt, fused, grads[1:])

    assert not opt._fused_step.disabled
    # Groups with other weight decays share the host path's graphs (a tensor input of each).
    per_group = len(opt.param_groups) if path == "device" else 1
    assert after_first == GRAPHS["LAMB" if cls is LAMB else "LARS", path] * per_group
    assert compiled_graphs() - before == after_first  # and nothing more after the first step
    assert max_update_error(fused, initial, eager_params) < RTOL
    for e, f in zip(eager_params, fused, strict=True):
        for name, buffer in eager.state[e].items():
            torch.testing.assert_close(opt.state[f][name], buffer, rtol=RTOL, atol=1e-7)
    assert [g["step"].item() for g in opt.param_groups] == [STEPS] * len(opt.param_groups)
    want, got = eager.layer_stats(), opt.layer_stats()
    torch.testing.assert_close(got.scale, want.scale, rtol=RTOL, atol=0)


def test_graphs_do_not_grow_with_the_number_of_tensors():
    """Three times the layers (and buckets) compile as many graphs (each optimizer compiles its
    own)."""
    compiled = []
    for copies in (1, 3):
        params = fused_params(copies=copies)
        grads = grad_sequence(params, steps=2)
        before = compiled_graphs()
        run(TVLARS(params, lr=1.0, fused=True, decide_on_host=False), params, grads)
        compiled.append(compiled_graphs() - before)
    assert compiled == [GRAPHS["LARS", "device"]] * 2


def test_resume_fused_from_an_eager_checkpoint():
    """A checkpoint carries no trace of the implementation: an eager run resumed fused continues
    phi from the saved step counter (lmbda is large, so a restarted counter would show)."""
    kw = dict(lr=4.0, lmbda=0.3, preset="official")
    grads = grad_sequence(fused_params(), steps=6)
    initial = fused_params()
    straight = fused_params()
    run(TVLARS(two_groups(straight), **kw), straight, grads)

    first = fused_params()
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
    params = fused_params()
    opt = cls(params, lr=1.0, fused=True, **decision_path)
    run(opt, params, grad_sequence(params, steps=2))
    weights = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    nan_grads = grad_sequence(params, steps=1, seed=5)
    nan_grads[0][6][3, 1] = math.nan  # the large layer: read by a compiled local pass
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


def test_no_recompilation_across_steps():
    """10 steps with every number a schedule changes changing every step (lr and momentum by
    ``OneCycleLR``, which cycles momentum by default; weight decay by hand, from 0, as DINO-style
    schedules do), phi changing with the counter and a skipped (NaN) step on the masked device
    path: each graph compiled once, at the first step, and shared by both groups. The counter
    does see a recompilation when a structural option changes."""
    grads = grad_sequence(fused_params(), steps=10)
    grads[4][0][0, 0, 0, 0] = math.nan
    initial = fused_params()

    def train(fused):
        params = fused_params()
        opt = TVLARS(two_groups(params), lr=4.0, lmbda=0.1, fused=fused, decide_on_host=False)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4.0, total_steps=len(grads))
        for t, step_grads in enumerate(grads):
            for group in opt.param_groups:
                group["weight_decay"] = 1e-3 * t
            run(opt, params, [step_grads])
            schedule.step()
        return opt, params

    _, eager_params = train(fused=False)
    before = compiled_graphs()
    opt, params = train(fused=True)
    assert compiled_graphs() - before == 2  # the graph of each group's pieces
    assert [g["skipped_steps"].item() for g in opt.param_groups] == [1, 1]
    # lr, momentum and weight decay did follow their schedules
    assert max_update_error(params, initial, eager_params) < RTOL

    params[0].grad = None  # other pieces: the graph of the first group is compiled again
    opt.step()
    assert compiled_graphs() - before == 3


def test_compiled_device_decision_reads_nothing_on_the_host():
    """The compiled path accelerators run never reads a tensor's value into Python once
    compiled: an applied step, a no-op and a skipped one."""
    params = fused_params()
    opt = TVLARS(two_groups(params), lr=1.0, fused=True, decide_on_host=False)
    run(opt, params, grad_sequence(params, steps=1))  # compiles
    nan = grad_sequence(params, steps=1, seed=4)
    nan[0][6][0, 0] = math.nan
    steps = [*grad_sequence(params, steps=1, seed=3), [torch.zeros_like(p) for p in params], *nan]
    for step_grads in steps:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        with no_host_reads():
            opt.step()
    assert not opt._fused_step.disabled
    assert opt.param_groups[0]["step"].item() == 2 and opt.skipped_steps.item() == 1


def test_compilation_failure_falls_back_with_one_warning():
    """No working C++ compiler (simulated; caches off so inductor has to call it): one warning,
    then the eager step, bit-for-bit."""
    import torch._inductor.config as inductor_config

    grads = grad_sequence(fused_params(), steps=3)
    eager_params, fused = fused_params(), fused_params()
    run(TVLARS(eager_params, lr=8.0), eager_params, grads)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",)}
    with (
        inductor_config.patch(no_compiler),
        torch.compiler.config.patch(force_disable_caches=True),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        opt = TVLARS(fused, lr=8.0, fused=True)
        run(opt, fused, grads)
    ours = [w for w in caught if "fused=True" in str(w.message)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)
    assert "eager" in str(ours[0].message) and opt._fused_step.disabled
    assert all(torch.equal(a, b) for a, b in zip(eager_params, fused, strict=True))


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


def run_flat(rank, world_size, path, naive=False):
    """``STEPS`` fused steps on this rank's flat partition of ``fused_params``, the decision
    taken on ``path``: the graphs compiled after each step, and the all-reduces of each step."""
    handle = register_adapter("test-flat", _flat_layout)
    try:
        params = fused_params()
        reduce_group = None if naive else dist.group.WORLD
        partition, (lo, hi) = flat_partition(params, rank, world_size, reduce_group)
        opt = TVLARS([partition], fused=True, decide_on_host=path == "host", **FLAT_KW)
        before, compiled, calls = compiled_graphs(), [], []
        for step_grads in grad_sequence(params, steps=STEPS):
            partition.grad = torch.cat([g.reshape(-1) for g in step_grads])[lo:hi].clone()
            calls.append([])
            with recorded_all_reduce(calls[-1], skip=naive):
                opt.step()
            compiled.append(compiled_graphs() - before)
    finally:
        handle.remove()
    return dict(
        flat=partition.detach().clone(),
        compiled=compiled,
        calls=calls,
        layers=len(params),
        stats=opt.layer_stats(),
    )


def run_fsdp2(rank, world_size):
    """FSDP2 ``fully_shard`` (DTensor shards, tvlars_scale.layouts.dtensor) with the fused step,
    decided on the device (the compiled update)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    net = fsdp2_net()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = TVLARS(net.parameters(), fused=True, decide_on_host=False, **FLAT_KW)
    before = compiled_graphs()
    for x, y in fsdp2_batches():
        opt.zero_grad()
        local = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        torch.nn.functional.mse_loss(net(x[local]), y[local]).backward()
        opt.step()
    # pieces too small for the compiled local pass: only the update compiles
    assert not opt._fused_step.disabled and compiled_graphs() - before == 1
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
        **{path: run_flat(rank, world_size, path) for path in ("host", "device")},
        "naive": run_flat(rank, world_size, "host", naive=True),
        "fsdp2": run_fsdp2(rank, world_size),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(world, 2)


def eager_flat_reference():
    params = fused_params()
    opt = TVLARS(params, **FLAT_KW)
    run(opt, params, grad_sequence(params, steps=STEPS))
    return torch.cat([p.detach().reshape(-1) for p in params]), opt.layer_stats()


def by_layer(flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat vector of ``fused_params`` cut back into its layers."""
    return list(flat.split([p.numel() for p in fused_params()]))


@pytest.mark.parametrize("path", ["host", "device"])
def test_two_ranks_flat_shards_fused_equal_single_process_eager(two_ranks, path):
    initial = by_layer(torch.cat([p.detach().reshape(-1) for p in fused_params()]))
    reference, stats = eager_flat_reference()
    gathered = by_layer(torch.cat([r[path]["flat"] for r in two_ranks]))
    for rank, r in enumerate(two_ranks):
        # every graph at the first step (pieces of one flat tensor; rank 1 holds no large
        # adapted piece, so no local pass), none after; and one all-reduce per step: 2 floats
        # per layer and the decision
        want = GRAPHS["LARS", path] - (rank if path == "host" else 0)
        assert r[path]["compiled"] == [want] * STEPS
        assert r[path]["calls"] == [[((0, 1), 2 * r[path]["layers"] + 1)]] * STEPS
    assert max_update_error(gathered, initial, by_layer(reference)) < RTOL
    for r in two_ranks:  # every rank holds the true (reduced) layer norms
        torch.testing.assert_close(r[path]["stats"].scale, stats.scale, rtol=RTOL, atol=0)


def test_two_ranks_per_shard_norms_would_fail(two_ranks):
    """The check above can fail: without the reduction (per-shard norms) it misses by far."""
    initial = by_layer(torch.cat([p.detach().reshape(-1) for p in fused_params()]))
    reference, _ = eager_flat_reference()
    gathered = by_layer(torch.cat([r["naive"]["flat"] for r in two_ranks]))
    assert max_update_error(gathered, initial, by_layer(reference)) > 100 * RTOL


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
