"""TVLARS, LARS and LAMB honour the contract of torch.optim optimizers.

Code that copies, pickles, schedules, hooks or checkpoints an optimizer (EMA/SWA helpers,
checkpoint tools, compiled training loops, gradient logging and clipping) assumes what
``torch.optim.SGD`` does. Each test here checks one item of that contract for the three
optimizers, eagerly and (where compilation changes the code path) with ``fused=True``, mostly
by comparing two runs that must agree bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch
from test_fused import GRAPHS, compiled_graphs, fused_params
from test_optimizers import DECISION_PATHS, grad_sequence, make_params, run, two_groups

from tvlars_scale import LAMB, LARS, TVLARS, UnmappableLayoutError

# Hyperparameters that make every part of each rule matter: weight decay, a fast phi decay.
CASES = {
    "TVLARS": (TVLARS, dict(lr=4.0, lmbda=0.1, weight_decay=0.01)),
    "LARS": (LARS, dict(lr=4.0, weight_decay=0.01, nesterov=True)),
    "LAMB": (LAMB, dict(lr=0.05, weight_decay=0.01)),
}
NAMES = list(CASES)


@pytest.fixture(params=list(DECISION_PATHS))
def decision_path(request):
    """The skip decision read on the host (CPU default) or kept as a device tensor (the masked
    path accelerators run; forced here on CPU), as the constructor keywords that pick it: every
    optimizer the test builds takes them."""
    return dict(DECISION_PATHS[request.param])


def build(name, params, fused=False, **overrides):
    cls, kw = CASES[name]
    return cls(two_groups(params), fused=fused, **{**kw, **overrides})


def snapshot(opt, params):
    """Weights and every state tensor, cloned, in a fixed order."""
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)
    ]


def assert_identical(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), (g - w).abs().max()


# ------------------------------------------------------------------ copy and pickle
def _pickle_copy(opt):
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("how", [copy.deepcopy, _pickle_copy], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_steps_and_equals_the_original(name, how):
    params = make_params()
    opt = build(name, params)
    grads = grad_sequence(params, steps=4)
    run(opt, params, grads[:2])

    clone = how(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(clone_params, params, strict=True))
    run(clone, clone_params, grads[2:])
    run(opt, params, grads[2:])
    assert_identical(snapshot(clone, clone_params), snapshot(opt, params))
    assert [g["step"].item() for g in clone.param_groups] == [4, 4]


def test_a_fused_copy_steps_and_equals_the_original():
    params = make_params()
    opt = build("TVLARS", params, fused=True)
    grads = grad_sequence(params, steps=3)
    run(opt, params, grads[:1])
    clone = copy.deepcopy(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    run(clone, clone_params, grads[1:])
    run(opt, params, grads[1:])
    assert clone.fused and not clone._fused_step.disabled
    assert_identical(snapshot(clone, clone_params), snapshot(opt, params))


def test_a_copy_still_refuses_a_tensor_it_was_not_built_with():
    """What a copy keeps is which tensors came in through the constructor: a tensor an engine
    swapped into param_groups afterwards (a flat buffer) stays unmappable in the copy, rather
    than being taken for a whole parameter (per-tensor norms, silently wrong)."""
    params = make_params()
    opt = TVLARS(params, lr=1.0)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params[:2]]))
    opt.param_groups[0]["params"][:2] = [flat]
    for candidate in (opt, copy.deepcopy(opt), _pickle_copy(opt)):
        for p in candidate.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        with pytest.raises(UnmappableLayoutError, match="cannot map param group 0"):
            candidate.step()


# ------------------------------------------------------------------ learning rate
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr(name, decision_path):
    grads = grad_sequence(make_params())
    lr = CASES[name][1]["lr"]
    float_params, tensor_params = make_params(), make_params()
    run(build(name, float_params, **decision_path), float_params, grads)
    run(build(name, tensor_params, lr=torch.tensor(lr), **decision_path), tensor_params, grads)
    for f, t in zip(float_params, tensor_params, strict=True):
        torch.testing.assert_close(t, f, rtol=1e-6, atol=1e-7)


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))


@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_drive_a_tensor_lr(name):
    grads = grad_sequence(make_params())
    lr = CASES[name][1]["lr"]
    runs = {}
    for kind, value in (("float", lr), ("tensor", torch.tensor(lr))):
        params = make_params()
        opt = build(name, params, lr=value)
        lrs = [g["lr"] for g in opt.param_groups]
        scheduler = schedule(opt)
        for step_grads in grads:
            run(opt, params, [step_grads])
            scheduler.step()
        runs[kind] = params
        if kind == "tensor":  # updated in place, as a compiled loop holding it expects
            assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs, strict=True))
            assert opt.param_groups[0]["lr"].item() == pytest.approx(lr / (1 + len(grads)))
    for f, t in zip(runs["float"], runs["tensor"], strict=True):
        torch.testing.assert_close(t, f, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["TVLARS", "LAMB"])
def test_fused_tensor_lr_changed_by_a_scheduler_compiles_once(name):
    """On the masked device path a scheduler that changes a tensor lr every step compiles each
    graph once (per param group, the per-piece scale: the lr enters torch's fused kernels, not
    a graph)."""
    grads = grad_sequence(fused_params(), steps=5)
    eager_params, fused_params_ = fused_params(), fused_params()
    for params, fused in ((eager_params, False), (fused_params_, True)):
        lr = torch.tensor(CASES[name][1]["lr"])
        opt = build(name, params, fused=fused, lr=lr, **DECISION_PATHS["device"])
        scheduler = schedule(opt)
        before = compiled_graphs()
        for step_grads in grads:
            run(opt, params, [step_grads])
            scheduler.step()
    rule = "LAMB" if name == "LAMB" else "LARS"
    assert compiled_graphs() - before == GRAPHS[rule, "device"] * len(opt.param_groups)
    assert not opt._fused_step.disabled
    for e, f in zip(eager_params, fused_params_, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)  # the lr did change


@pytest.mark.parametrize(
    ("name", "fused"),
    [*((name, False) for name in NAMES), ("TVLARS", True)],
    ids=[*NAMES, "TVLARS-fused"],
)
def test_a_step_compiled_by_the_caller_equals_the_eager_step(name, fused, decision_path):
    """``torch.compile`` around ``optimizer.step()`` (torch's "compiling the optimizer" recipe)
    takes the same steps as the eager optimizer under ``OneCycleLR`` (which changes lr and
    momentum, or LAMB's beta1, every step), a skipped non-finite step included; also with
    ``fused=True`` (LARS runs the same functions; LAMB compiles none).

    The compiled graphs sum in another order: float32 rounding, far below what a wrong trust
    ratio or moment changes (tens of percent of an update)."""
    torch._dynamo.reset()  # a graph compiled by another test must not stand in for this one
    grads = grad_sequence(make_params(), steps=5)
    grads[2][0][0, 0, 0, 0] = math.nan
    runs = []
    for compiled in (False, True):
        params = make_params()
        opt = build(name, params, fused=fused, **decision_path)
        # lr and momentum (LAMB: beta1) change every step
        lr = CASES[name][1]["lr"]
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(grads))
        step = torch.compile(opt.step) if compiled else opt.step
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            step()
            schedule.step()
        runs.append(snapshot(opt, params))
        assert opt.param_groups[0]["step"].item() == 4  # the non-finite step was skipped
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "lr", "doc"),
    [(TVLARS, 1.0, "Default 1.0"), (LARS, 1.0, "Default 1.0"), (LAMB, 1e-3, "Default 1e-3")],
    ids=["TVLARS", "LARS", "LAMB"],
)
def test_default_lr(cls, lr, doc):
    """Each optimizer has a default lr, like torch's, and its docstring says which and why."""
    assert inspect.signature(cls).parameters["lr"].default == lr
    assert doc in " ".join(inspect.getdoc(cls).split())
    params = make_params()
    opt = cls(params)
    assert opt.defaults["lr"] == lr
    run(opt, params, grad_sequence(params, steps=1))
    assert opt.param_groups[0]["step"].item() == 1


@pytest.mark.parametrize(
    "bad", [torch.tensor([0.1, 0.2]), torch.tensor(-0.1), torch.tensor(1), torch.tensor(math.nan)]
)
@pytest.mark.parametrize("cls", [TVLARS, LARS, LAMB])
def test_bad_tensor_lr_is_refused(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: invalid lr="):
        cls(make_params(), lr=bad)


# ------------------------------------------------------------------ gradients are read only
def _grads_for(params, kind):
    grads = grad_sequence(params, steps=1, seed=3)[0]
    if kind == "nan":
        grads[2][3] = math.nan
        grads[0][0, 0, 0, 0] = math.inf
    elif kind == "zero":
        grads = [torch.zeros_like(g) for g in grads]
    return grads


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_never_written(name, fused, decision_path):
    """On every path (host or device decision, eager or fused, normal, all-zero or non-finite
    gradients, maximize): p.grad keeps its values and its version counter; a skipped step
    leaves weights and state bit for bit unchanged, with no host sync on the device path."""
    params = make_params()
    opt = build(name, params, fused=fused, maximize=name == "LARS", **decision_path)
    run(opt, params, grad_sequence(params, steps=1))
    for kind in ("finite", "zero", "nan"):
        grads = _grads_for(params, kind)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        versions = [p.grad._version for p in params]
        before = snapshot(opt, params)
        opt.step()
        for p, g, v in zip(params, grads, versions, strict=True):
            assert p.grad._version == v
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
        if kind != "finite":
            assert_identical(snapshot(opt, params), before)
    assert opt.skipped_steps.item() == 1
    assert opt.param_groups[0]["step"].item() == 2
    assert not fused or not opt._fused_step.disabled


# ------------------------------------------------------------------ maximize
@pytest.mark.parametrize("name", NAMES)
def test_maximize_steps_along_the_gradient(name, decision_path):
    """maximize=True with gradient g is the default step with gradient -g, as torch's SGD."""
    grads = grad_sequence(make_params())
    maximizing, minimizing = make_params(), make_params()
    opt = build(name, maximizing, maximize=True, **decision_path)
    run(opt, maximizing, grads)
    minimizer = build(name, minimizing, **decision_path)
    run(minimizer, minimizing, [[-g for g in step] for step in grads])
    assert_identical(maximizing, minimizing)
    assert opt.state_dict()["param_groups"][0]["maximize"] is True


def test_maximize_ascends_like_sgd():
    """The sign convention of torch.optim.SGD(maximize=True): the objective goes up."""
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    opt = TVLARS([w], lr=50.0, maximize=True, weight_decay=0.0)
    start = (w**2).sum().item()
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert (w**2).sum().item() > start


# ------------------------------------------------------------------ closure
@pytest.mark.parametrize("name", NAMES)
def test_step_with_a_closure_returns_its_loss_and_steps_on_its_gradients(name):
    """``step(closure)`` (what Lightning calls, and LBFGS-style loops) evaluates the closure with
    gradients enabled, even under ``no_grad``, and returns its loss."""
    targets = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in make_params()
    ]
    runs = []
    for with_closure in (False, True):
        params = make_params()
        opt = build(name, params)

        def closure(params=params, opt=opt):
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
            loss.backward()
            return loss

        for _ in range(3):
            if with_closure:
                with torch.no_grad():
                    loss = opt.step(closure)
                assert loss.requires_grad and loss.item() > 0
            else:
                closure()
                assert opt.step() is None
        runs.append(snapshot(opt, params))
    assert_identical(*runs)


# ------------------------------------------------------------------ hooks
@pytest.mark.parametrize("name", NAMES)
def test_hooks_run_as_torchs(name):
    params = make_params()
    opt = build(name, params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd-pre", o is opt)))

    def tag_state_dict(o, sd):
        sd["tag"] = "saved"
        return sd

    opt.register_state_dict_post_hook(tag_state_dict)

    def drop_tag(o, sd):
        calls.append(("load-pre", sd.pop("tag")))
        return sd

    opt.register_load_state_dict_pre_hook(drop_tag)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o is opt)))

    run(opt, params, grad_sequence(params, steps=1))
    sd = opt.state_dict()
    assert sd["tag"] == "saved"
    opt.load_state_dict(sd)
    assert calls == [
        ("pre", True),
        ("post", True),
        ("sd-pre", True),
        ("load-pre", "saved"),
        ("load-post", True),
    ]

    handle = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("removed"))
    handle.remove()
    run(opt, params, grad_sequence(params, steps=1))
    assert "removed" not in calls


# ------------------------------------------------------------------ param groups
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_steps(name):
    """A group added after two steps starts its own counter (phi, bias correction) at 0 and
    steps like a fresh optimizer over it; the existing group is unaffected."""
    grads = grad_sequence(make_params(), steps=4)
    first, second = make_params()[:3], make_params()[3:]
    cls, kw = CASES[name]
    opt = cls(first, **kw)
    run(opt, first, [g[:3] for g in grads[:2]])
    opt.add_param_group({"params": second, "weight_decay": 0.0})
    run(opt, first + second, grads[2:])

    alone_first, alone_second = make_params()[:3], make_params()[3:]
    run(cls(alone_first, **kw), alone_first, [g[:3] for g in grads])
    run(cls(alone_second, **{**kw, "weight_decay": 0.0}), alone_second, [g[3:] for g in grads[2:]])
    assert_identical(first + second, alone_first + alone_second)
    assert [g["step"].item() for g in opt.param_groups] == [4, 2]


@pytest.mark.parametrize("name", NAMES)
def test_empty_param_groups(name):
    params = make_params()
    cls, kw = CASES[name]
    opt = cls([{"params": []}, {"params": params}, {"params": []}], **kw)
    alone = make_params()
    grads = grad_sequence(params, steps=2)
    run(opt, params, grads)
    run(cls(alone, **kw), alone, grads)
    assert_identical(params, alone)
    restored = cls([{"params": []}, {"params": make_params()}, {"params": []}], **kw)
    restored.load_state_dict(opt.state_dict())
    cls([{"params": []}], **kw).step()  # nothing to do, as torch.optim.SGD


@pytest.mark.parametrize("cls", [TVLARS, LARS, LAMB])
def test_duplicated_and_non_leaf_params_are_refused_like_torch(cls):
    p, q = make_params()[:2]
    with pytest.raises(
        ValueError, match=r"holds the same tensor twice \(params\[0\] and params\[2\]"
    ):
        cls([p, q, p])
    with pytest.raises(ValueError, match="holds the same tensor twice"):
        cls([("a", p), ("b", p)])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's check
        cls([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):  # torch's check
        cls([p * 2])
    with pytest.raises(TypeError, match="ordered collections"):  # torch's check
        cls([{"params": {p, q}}])
    opt = cls([p])
    with pytest.raises(ValueError, match="invalid lr=-1"):
        opt.add_param_group({"params": [q], "lr": -1.0})
    assert len(opt.param_groups) == 1  # a refused group is not half-added
    opt.add_param_group({"params": (t for t in [q])})  # a generator, as torch allows
    assert opt.param_groups[1]["params"] == [q]


# ------------------------------------------------------------------ dtypes
@pytest.mark.filterwarnings("ignore:.*no float32 master copy")  # tests/test_low_precision.py
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", ["TVLARS", "LAMB"])
def test_mixed_bf16_and_fp32_params_in_one_group(name, fused):
    """bf16 and fp32 parameters share a group. The fp32 layers step exactly as in an fp32-only
    run; the bf16 layer's norms are accumulated in fp32 (a bf16 sum of 4096 squares is off by
    ~1e-3), and its update matches the fp32 rule up to bf16 arithmetic (the update and, for
    LAMB, the moments are bf16, as torch's optimizers keep state in the parameter's dtype)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (16, 8), (16,)]
    fp32 = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    grads[0] = grads[0].bfloat16().float()  # the values a bf16 gradient holds
    mixed = [torch.nn.Parameter(fp32[0].bfloat16())] + [
        torch.nn.Parameter(t.clone()) for t in fp32[1:]
    ]
    upcast = [torch.nn.Parameter(mixed[0].detach().float())] + [
        torch.nn.Parameter(t.clone()) for t in fp32[1:]
    ]
    cls, kw = CASES[name]
    opts = [cls(mixed, fused=fused, **kw), cls(upcast, **kw)]
    for opt, params in zip(opts, (mixed, upcast), strict=True):
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.to(p.dtype)
        opt.step()
    stats, want = opts[0].layer_stats(), opts[1].layer_stats()
    torch.testing.assert_close(stats.weight_norm, want.weight_norm, rtol=1e-6, atol=0)
    # fp32 layers: bit for bit eagerly; fused sums add in another order than BLAS
    for m, u in zip(mixed[1:], upcast[1:], strict=True):
        torch.testing.assert_close(m, u, rtol=1e-6 if fused else 0, atol=1e-7 if fused else 0)
    for key, buffer in opts[0].state[mixed[0]].items():
        want = opts[1].state[upcast[0]][key]
        assert buffer.dtype == torch.bfloat16  # state in the parameter's dtype, as torch's
        torch.testing.assert_close(buffer.float(), want, rtol=2**-6, atol=1e-3 * want.abs().max())
    # the weights: within bf16 roundings of the start, the update and the result
    got, want, start = mixed[0].detach().float(), upcast[0].detach(), fp32[0].bfloat16().float()
    assert ((got - want).abs() <= 2**-7 * (start.abs() + (want - start).abs() + want.abs())).all()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_step_as_pairs_of_reals(name, fused, decision_path):
    """As torch's optimizers do, a complex parameter steps as the real tensor of its (real,
    imaginary) pairs (``torch.view_as_real``): the same norms and updates, bit for bit. Which
    layers are excluded from the trust ratio follows the complex shape (a 1-D complex bias is
    still a bias)."""
    reals = make_params()
    imags = make_params(seed=1)
    grads = [
        [torch.complex(a, b) for a, b in zip(step, other, strict=True)]
        for step, other in zip(
            grad_sequence(reals, steps=3), grad_sequence(reals, steps=3, seed=2), strict=True
        )
    ]
    complex_params = [
        torch.nn.Parameter(torch.complex(a.detach(), b.detach()))
        for a, b in zip(reals, imags, strict=True)
    ]
    pairs = [torch.nn.Parameter(torch.view_as_real(c).detach().clone()) for c in complex_params]
    # Every layer adapted: the real pairs of a 1-D bias are 2-D, so exclusion would differ.
    build_all = dict(fused=fused, exclude_bias_and_norm=False, **decision_path)
    opt_c = build(name, complex_params, **build_all)
    opt_r = build(name, pairs, **build_all)
    run(opt_c, complex_params, grads)
    run(opt_r, pairs, [[torch.view_as_real(g) for g in step] for step in grads])
    assert all(p.dtype == torch.complex64 for p in complex_params)
    assert_identical(
        [torch.view_as_real(t) for t in snapshot(opt_c, complex_params)], snapshot(opt_r, pairs)
    )

    copies = [torch.nn.Parameter(c.detach().clone()) for c in complex_params]
    excluding = build(name, copies, **decision_path)
    run(excluding, [p for g in excluding.param_groups for p in g["params"]], grads[:1])
    trust = excluding.layer_stats().trust_ratio  # 1 exactly where a layer is excluded
    assert [bool(q == 1) for q in trust] == [c.ndim == 1 for c in complex_params]


@pytest.mark.parametrize("name", NAMES)
def test_a_conjugate_gradient_is_read_resolved(name, decision_path):
    """A complex parameter used only through ``.mH`` gets its gradient as a conjugate view
    (``grad.is_conj()``): it steps as the same gradient resolved, and is left a view."""
    x = torch.randn(5, 4, dtype=torch.cfloat, generator=torch.Generator().manual_seed(0))
    start = torch.randn(3, 4, dtype=torch.cfloat, generator=torch.Generator().manual_seed(1))
    viewed, resolved = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    (x @ viewed.mH).real.sum().backward()
    assert viewed.grad.is_conj()
    resolved.grad = viewed.grad.resolve_conj().clone()
    for p in (viewed, resolved):
        build(name, [p], **decision_path).step()
    assert viewed.grad.is_conj()
    assert_identical([viewed.detach()], [resolved.detach()])


def test_a_sparse_gradient_is_refused_whenever_it_appears():
    """Also after steps on dense gradients of the same parameters (the plan is then cached)."""
    embedding = torch.nn.Embedding(10, 4)
    opt = TVLARS(embedding.named_parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    opt.step()
    opt.zero_grad()
    embedding.sparse = True
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"layer 'weight' has a torch\.sparse_coo gradient"):
        opt.step()
    assert torch.equal(embedding.weight, before)


def test_a_refused_step_leaves_no_state_in_earlier_groups():
    """A sparse gradient in the second group stops the step before the first group allocates
    its momentum buffers and counters: the optimizer is as it was."""
    dense, embedding = torch.nn.Linear(4, 3), torch.nn.Embedding(10, 4, sparse=True)
    opt = TVLARS([{"params": dense.parameters()}, {"params": embedding.parameters()}])
    embedding(torch.tensor([1, 2])).sum().backward()
    dense(torch.randn(2, 4)).sum().backward()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"has a torch\.sparse_coo gradient"):
        opt.step()
    assert not opt.state
    assert opt.state_dict() == before


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_with_weights_only(name, fused):
    grads = grad_sequence(make_params(), steps=4)
    straight = make_params()
    run(build(name, straight, lr=torch.tensor(CASES[name][1]["lr"])), straight, grads)

    params = make_params()
    opt = build(name, params, lr=torch.tensor(CASES[name][1]["lr"]))
    run(opt, params, grads[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(name, params, fused=fused)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert isinstance(resumed.param_groups[0]["lr"], torch.Tensor)
    run(resumed, params, grads[2:])
    if fused:
        for p, s in zip(params, straight, strict=True):
            torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-6)
    else:
        assert_identical(params, straight)


# ------------------------------------------------------------------ copies on several ranks
def _copy_keeps_the_model_group(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, group in (("mesh", mesh), ("process group", mesh.get_group(0))):
        params = make_params()
        opt = TVLARS(params, lr=1.0, model_group=group)
        clone = copy.deepcopy(opt)
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        grads = grad_sequence(params, steps=2, seed=rank)  # a different gradient per rank
        run(opt, params, grads)
        run(clone, clone_params, grads)
        results[name] = (clone.model_group, all(map(torch.equal, clone_params, params)))
    return results


def test_a_copy_keeps_its_model_group():
    """A model_group (a DeviceMesh or a ProcessGroup, which belong to their process) survives a
    copy as its ranks: the copy takes its decisions with the same ranks as the original."""
    from multirank import run_ranks

    for result in run_ranks(_copy_keeps_the_model_group, 2):
        assert result == {"mesh": ((0, 1), True), "process group": ((0, 1), True)}


# ------------------------------------------------------------------ memory layouts
def _strided(t):
    """``t``'s values in a non-contiguous layout: channels-last for 4-D tensors (what
    ``model.to(memory_format=torch.channels_last)`` makes), transposed storage for 2-D."""
    if t.ndim == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.ndim == 2:
        return t.t().contiguous().t()
    return t.clone()


@pytest.mark.parametrize("grad_layout", ["like the parameter", "contiguous"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_strided_parameters_step_like_contiguous_ones(name, fused, grad_layout, decision_path):
    """Parameters in channels-last or transposed layouts (as torch's optimizers take them),
    with gradients in the same layout (what autograd makes) or contiguous, get the same steps
    as contiguous ones and keep their layout. Pieces laid out alike in one block of memory
    (channels-last) are walked in memory order by the norms, torch's fused SGD kernel and the
    compiled buckets; other pieces in logical order. The norms may add in another order, hence
    a tolerance of a few float32 roundings."""
    grads = grad_sequence(make_params(), steps=3)
    plain = make_params()
    strided = [torch.nn.Parameter(_strided(p.detach())) for p in make_params()]
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    run(build(name, plain, fused=fused, **decision_path), plain, grads)
    if grad_layout == "like the parameter":
        grads = [[_strided(g) for g in step] for step in grads]
    run(build(name, strided, fused=fused, **decision_path), strided, grads)
    for got, want in zip(strided, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert strided[0].is_contiguous(memory_format=torch.channels_last)
    assert strided[2].t().is_contiguous()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_state_laid_out_unlike_its_parameter(name, fused, decision_path):
    """A contiguous run's state_dict loaded into channels-last / transposed parameters (torch
    keeps the saved strides of state tensors), as when a checkpoint is resumed after
    ``model.to(memory_format=torch.channels_last)``, continues exactly as the contiguous run:
    kernels that walk memory in order must not pair a moment with the wrong weight."""
    grads = grad_sequence(make_params(), steps=4)
    plain = make_params()
    opt = build(name, plain, fused=fused, **decision_path)
    run(opt, plain, grads[:1])
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    strided = [torch.nn.Parameter(_strided(p.detach())) for p in plain]
    resumed = build(name, strided, fused=fused, **decision_path)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert any(
        v.stride() != p.stride()
        for p in strided
        for v in resumed.state[p].values()
        if isinstance(v, torch.Tensor) and v.ndim > 1
    )
    run(opt, plain, grads[1:])
    run(resumed, strided, [[_strided(g) for g in step] for step in grads[1:]])
    for got, want in zip(strided, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_decide_on_host_is_validated_and_survives_a_copy(name):
    """``decide_on_host`` takes True, False or None, refused otherwise with the value named;
    like ``fused`` it belongs to the optimizer object, so copies and pickles keep it."""
    cls, kw = CASES[name]
    with pytest.raises(ValueError, match=r"invalid decide_on_host='yes'; expected True or False"):
        cls(make_params(), decide_on_host="yes", **kw)
    opt = cls(make_params(), decide_on_host=False, **kw)
    assert copy.deepcopy(opt).decide_on_host is False
    assert pickle.loads(pickle.dumps(opt)).decide_on_host is False
    assert cls(make_params(), **kw).decide_on_host is None
