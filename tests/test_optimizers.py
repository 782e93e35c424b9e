"""TVLARS, LARS and LAMB against float64 references written from the spec (tests/reference.py)."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from reference import ReferenceLAMB, ReferenceLARSFamily

import tvlars_scale
from tvlars_scale import LAMB, LARS, TVLARS

STEPS = 6


#: The constructor keywords that pick each skip-decision path: the default (read on the host
#: for CPU tensors) and the masked tensor path accelerators take (no host sync), forced on CPU.
DECISION_PATHS = {"host": {}, "device": {"decide_on_host": False}}


@pytest.fixture(params=list(DECISION_PATHS), autouse=True)
def decision_path(request):
    """Run every test on both skip-decision paths. The value is the keywords that pick the
    path: every optimizer a test builds takes them."""
    return dict(DECISION_PATHS[request.param])


@pytest.fixture(params=["torch kernels", "foreach"])
def update_kernels(request, monkeypatch):
    """The update through torch's fused SGD/Adam kernels (CPU, CUDA, ...), or the foreach
    passes a device without them takes (forced here by hiding the kernels)."""
    if request.param == "foreach":
        monkeypatch.setattr(tvlars_scale.functional, "_FUSED_DEVICES", frozenset())
    return request.param


def make_params(seed=0):
    """Several layer kinds: 4-D conv, 2-D linear, 1-D bias/norm gains, and a zero-init layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (10, 8), (10,), (5, 10), (10,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[4].zero_()  # ||w|| = 0: exercises the q = 1 fallback
    return params


def grad_sequence(params, steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


def two_groups(params, **second):
    return [{"params": params[:3]}, {"params": params[3:], **second}]


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value into Python (``item``, ``tolist``, ``bool()``,
    ``float()``, ``int()``): on an accelerator each is a host sync. CPU tensors go through the
    same calls, so this checks the accelerator's path on CPU."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a host sync inside step(): Tensor.{name}")

        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def run(opt, params, grads):
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        opt.step()


def assert_updates_close(params, initial, reference_params, rtol=2e-5):
    # Compare the UPDATES (p - p0), not the params: a wrong ratio changes the update by far
    # more than this, while float32 vs float64 rounding stays ~1e-6 relative.
    for p, p0, ref in zip(params, initial, reference_params, strict=True):
        got = (p.detach().double() - p0.double()).flatten()
        want = (ref - p0.double()).flatten()
        scale = want.abs().max().clamp(min=1e-30)
        assert ((got - want).abs().max() / scale) < rtol, (got - want).abs().max() / scale


LARS_CASES = {
    "tvlars-default": dict(cls=TVLARS, kw=dict(lr=8.0, lmbda=0.05, delay_steps=2)),
    "tvlars-sum": dict(cls=TVLARS, kw=dict(lr=8.0, trust_denominator="sum", gamma_min=0.1)),
    "tvlars-official": dict(cls=TVLARS, kw=dict(lr=8.0, lmbda=0.05, preset="official")),
    "tvlars-nesterov": dict(cls=TVLARS, kw=dict(lr=8.0, nesterov=True, phi_on_excluded=False)),
    "tvlars-clip-alpha": dict(cls=TVLARS, kw=dict(lr=8.0, norm_clip=2.0, alpha=0.5, lmbda=0.1)),
    "lars": dict(cls=LARS, kw=dict(lr=8.0)),
    "lars-sum-nesterov": dict(cls=LARS, kw=dict(lr=8.0, trust_denominator="sum", nesterov=True)),
}


def reference_kwargs(cls, kw):
    ref = dict(kw)
    preset = ref.pop("preset", None)
    if preset == "official":
        ref.update(
            alpha=0.1,
            delay_steps=-1,
            gamma_min=0.0,
            norm_clip=10.0,
            phi_on_excluded=False,
            official=True,
        )
    return dict(ref, tvlars=cls is TVLARS)


@pytest.mark.parametrize("case", list(LARS_CASES))
def test_lars_family_matches_reference(case, update_kernels, decision_path):
    cls, kw = LARS_CASES[case]["cls"], LARS_CASES[case]["kw"]
    params = make_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params)
    ref = ReferenceLARSFamily(params, **reference_kwargs(cls, kw))
    opt = cls(two_groups(params), **kw, **decision_path)
    run(opt, params, grads)
    for step_grads in grads:
        ref.step(step_grads)
    assert_updates_close(params, initial, ref.params)
    assert opt.param_groups[0]["step"].item() == STEPS


def test_param_groups_use_their_own_hyperparameters(decision_path):
    params = make_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params)
    first = ReferenceLARSFamily(params[:3], lr=8.0)
    second = ReferenceLARSFamily(params[3:], lr=2.0, weight_decay=0.0, eta=0.01)
    opt = TVLARS(two_groups(params, lr=2.0, weight_decay=0.0, eta=0.01), lr=8.0, **decision_path)
    run(opt, params, grads)
    for step_grads in grads:
        first.step(step_grads[:3])
        second.step(step_grads[3:])
    assert_updates_close(params, initial, first.params + second.params)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_matches_reference(weight_decay, update_kernels, decision_path):
    params = make_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params)
    opt = LAMB(two_groups(params), lr=0.05, weight_decay=weight_decay, **decision_path)
    ref = ReferenceLAMB(params, lr=0.05, weight_decay=weight_decay)
    run(opt, params, grads)
    for step_grads in grads:
        ref.step(step_grads)
    assert_updates_close(params, initial, ref.params, rtol=1e-4)


def many_small_params(seed=0):
    """300 small layers, (3, 4) weights and (3,) biases in turn, one weight zero: enough small
    pieces that the host path runs the multi-tensor kernels too (docs/fused.md)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4) if i % 2 == 0 else (3,) for i in range(300)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[10].zero_()
    return params


def fused_sgd_calls(opt):
    """How many times one step() calls torch's fused SGD kernel (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_fused_sgd_")


@pytest.mark.parametrize("case", ["tvlars-default", "tvlars-sum", "tvlars-official", "lars"])
def test_many_small_pieces_match_reference(case, decision_path):
    """On either decision path, a model of many small layers steps through the multi-tensor
    kernels (one fused SGD call per step, not one per layer) and matches the reference."""
    cls, kw = LARS_CASES[case]["cls"], LARS_CASES[case]["kw"]
    params = many_small_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params, steps=4)
    ref = ReferenceLARSFamily(params, **reference_kwargs(cls, kw))
    opt = cls(params, **kw, **decision_path)
    run(opt, params, grads[:3])
    for p, g in zip(params, grads[3], strict=True):
        p.grad = g.clone()
    assert fused_sgd_calls(opt) == 1
    for step_grads in grads:
        ref.step(step_grads)
    assert_updates_close(params, initial, ref.params)


def test_many_small_pieces_lamb_matches_reference(decision_path):
    params = many_small_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params, steps=4)
    opt = LAMB(params, lr=0.05, weight_decay=0.01, **decision_path)
    ref = ReferenceLAMB(params, lr=0.05, weight_decay=0.01)
    run(opt, params, grads)
    for step_grads in grads:
        ref.step(step_grads)
    assert_updates_close(params, initial, ref.params, rtol=1e-4)


def test_reference_check_can_fail(decision_path):
    """The comparison must catch a wrong ratio: per-layer norms of half the layer differ."""
    params = make_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params)
    ref = ReferenceLARSFamily(params, lr=8.0, eta=1.01e-3)  # a 1% different eta
    run(TVLARS(params, lr=8.0, **decision_path), params, grads)
    for step_grads in grads:
        ref.step(step_grads)
    with pytest.raises(AssertionError):
        assert_updates_close(params, initial, ref.params)


@pytest.mark.parametrize("cls", [TVLARS, LARS, LAMB])
def test_all_zero_gradients_change_nothing(cls, decision_path):
    params = make_params()
    opt = cls(params, lr=1.0, **decision_path)
    run(opt, params, grad_sequence(params, steps=2))
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    run(opt, params, [[torch.zeros_like(p) for p in params]])
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state_before.items())
    assert opt.param_groups[0]["step"].item() == 2
    assert opt.skipped_steps.item() == 0


@pytest.mark.parametrize("cls", [TVLARS, LARS, LAMB])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_skips_the_step(cls, bad, decision_path):
    params = make_params()
    opt = cls(params, lr=1.0, **decision_path)
    run(opt, params, grad_sequence(params, steps=2))
    before = [p.detach().clone() for p in params]
    buffers = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    grads = grad_sequence(params, steps=1, seed=5)
    grads[0][2][3, 1] = bad
    run(opt, params, grads)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    for p, saved in zip(params, buffers, strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert opt.param_groups[0]["step"].item() == 2
    assert opt.skipped_steps.item() == 1
    run(opt, params, grad_sequence(params, steps=1, seed=6))  # and training goes on
    assert opt.param_groups[0]["step"].item() == 3
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("cls", [TVLARS, LARS, LAMB])
def test_the_device_decision_reads_nothing_on_the_host(cls, decision_path):
    """What accelerators run (the decision kept on the device) never reads a tensor's value into
    Python: an applied step, a no-op and a skipped one."""
    if decision_path != DECISION_PATHS["device"]:
        pytest.skip("the host path reads the decision by design")
    params = make_params()
    opt = cls(two_groups(params), lr=1.0, **decision_path)
    run(opt, params, grad_sequence(params, steps=1))  # discovery, state
    grads = grad_sequence(params, steps=1, seed=3)
    nan = grad_sequence(params, steps=1, seed=4)
    nan[0][0][0, 0, 0, 0] = math.nan
    for step_grads in [*grads, [torch.zeros_like(p) for p in params], *nan]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        with no_host_reads():
            opt.step()
    assert opt.param_groups[0]["step"].item() == 2
    assert opt.skipped_steps.item() == 1


@pytest.mark.parametrize(
    "cls,kw",
    [(TVLARS, dict(lmbda=0.05)), (TVLARS, dict(preset="official")), (LARS, {}), (LAMB, {})],
)
def test_state_dict_resume_is_bit_exact(cls, kw, decision_path):
    grads = grad_sequence(make_params(), steps=6)

    straight = make_params()
    opt = cls(two_groups(straight), lr=4.0, **kw, **decision_path)
    run(opt, straight, grads)

    first = make_params()
    opt = cls(two_groups(first), lr=4.0, **kw, **decision_path)
    run(opt, first, grads[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = make_params(seed=123)  # different init: everything must come from the checkpoint
    with torch.no_grad():
        for p, saved in zip(resumed, checkpoint["params"], strict=True):
            p.copy_(saved)
    opt = cls(two_groups(resumed), lr=4.0, **kw, **decision_path)
    opt.load_state_dict(checkpoint["optimizer"])
    assert opt.param_groups[0]["step"].item() == 3
    run(opt, resumed, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_state_dict_is_a_snapshot(decision_path):
    params = make_params()
    opt = TVLARS(params, lr=1.0, **decision_path)
    run(opt, params, grad_sequence(params, steps=2))
    snapshot = opt.state_dict()
    run(opt, params, grad_sequence(params, steps=1, seed=9))
    assert snapshot["param_groups"][0]["step"].item() == 2


def test_telemetry_reports_layer_norms(decision_path):
    params = make_params()
    grads = grad_sequence(params, steps=1)
    weights = [p.detach().double().clone() for p in params]
    opt = TVLARS(params, lr=1.0, weight_decay=0.01, **decision_path)
    run(opt, params, grads)
    stats = opt.layer_stats()
    assert stats.names == [f"0.{i}" for i in range(len(params))]
    for i, (w, g) in enumerate(zip(weights, grads[0], strict=True)):
        d = g.double() + (0.01 * w if w.ndim > 1 else 0)
        assert stats.weight_norm[i].item() == pytest.approx(w.norm().item(), rel=1e-5)
        assert stats.grad_norm[i].item() == pytest.approx(d.norm().item(), rel=1e-5)
    table = stats.to_dict()
    assert table["0.4"]["trust_ratio"] == 1.0  # zero-init layer falls back
    assert table["0.1"]["trust_ratio"] == 1.0  # excluded bias


def test_named_parameters_name_the_layers(decision_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    opt = LARS(model.named_parameters(), lr=0.1, **decision_path)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.layer_stats().names == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_params_without_grad_are_left_alone(decision_path):
    params = make_params()
    opt = TVLARS(params, lr=1.0, **decision_path)
    grads = grad_sequence(params, steps=1)
    params[0].grad = None
    for p, g in zip(params[1:], grads[0][1:], strict=True):
        p.grad = g
    before = params[0].detach().clone()
    opt.step()
    assert torch.equal(params[0], before)
    assert "momentum_buffer" not in opt.state[params[0]]


def test_tvlars_factor():
    assert tvlars_scale.tvlars_factor(0, 1e-3, 0, 1.0, 0.0) == pytest.approx(0.5)
    assert tvlars_scale.tvlars_factor(0, 1e-3, -1, 0.1, 0.0) == pytest.approx(
        1 / (0.1 + math.exp(1e-3))
    )
    assert tvlars_scale.tvlars_factor(10**9, 1.0, 0, 1.0, 0.2) == 0.2
    t = torch.tensor(100.0)
    assert tvlars_scale.tvlars_factor(t, 0.01, 50, 1.0, 0.05).item() == pytest.approx(
        1 / (1 + math.exp(0.5)) + 0.05
    )


def test_unmappable_flat_buffer_is_an_error(decision_path):
    params = make_params()
    opt = TVLARS(params, lr=1.0, **decision_path)
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what a ZeRO engine does behind our back
    with pytest.raises(tvlars_scale.UnmappableLayoutError, match="bind\\(engine\\)"):
        opt.step()


@pytest.mark.parametrize("case", ["tvlars-default", "lars"])
def test_float64_and_momentum_zero_match_reference(case, decision_path):
    """float64 pieces (whose norms torch refuses to narrow to fp32) and momentum 0 (for which
    torch's fused SGD kernel takes no momentum buffers), on both paths and with many pieces."""
    cls, kw = LARS_CASES[case]["cls"], LARS_CASES[case]["kw"]
    for params, extra in ((make_params(), dict(momentum=0.0)), (many_small_params(), {})):
        params = [torch.nn.Parameter(p.detach().double()) for p in params]
        initial = [p.detach().clone() for p in params]
        grads = [[g.double() for g in step] for step in grad_sequence(params, steps=3)]
        ref = ReferenceLARSFamily(params, **reference_kwargs(cls, {**kw, **extra}))
        run(cls(params, **kw, **extra, **decision_path), params, grads)
        for step_grads in grads:
            ref.step(step_grads)
        assert_updates_close(params, initial, ref.params)


def test_a_model_moved_to_channels_last_mid_training_matches_reference(decision_path):
    """``model.to(memory_format=torch.channels_last)`` after some steps swaps the conv weight's
    data, leaving its momentum laid out as before: the step must still pair their elements."""
    params = make_params()
    initial = [p.detach().clone() for p in params]
    grads = grad_sequence(params)
    opt = TVLARS(params, lr=8.0, **decision_path)
    ref = ReferenceLARSFamily(params, lr=8.0, tvlars=True)
    run(opt, params, grads[:2])
    with torch.no_grad():
        params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    run(
        opt,
        params,
        [
            [g.contiguous(memory_format=torch.channels_last) if g.ndim == 4 else g for g in step]
            for step in grads[2:]
        ],
    )
    for step_grads in grads:
        ref.step(step_grads)
    assert_updates_close(params, initial, ref.params)
