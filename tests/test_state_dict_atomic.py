"""``load_state_dict`` refuses a state dict that does not fit, naming what, before anything in
the optimizer changes: its state, param groups, counters and parameters are as they were, and it
steps on exactly as an untouched copy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tvlars_scale import LAMB, LARS, TVLARS

CASES = {
    "TVLARS": (TVLARS, dict(lr=1.0, total_steps=20)),
    "LARS": (LARS, dict(lr=1.0)),
    "LAMB": (LAMB, dict(lr=1e-2)),
}
NAMES = list(CASES)


def make_params() -> list[torch.nn.Parameter]:
    """Two layers: weights (6, 4) and (3, 6), biases (6,) and (3,)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6,), (3, 6), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def build(name: str, params: list[torch.Tensor], cls: type | None = None) -> Any:
    """Weights in group 0, biases (no decay) in group 1."""
    default_cls, kw = CASES[name]
    groups = [{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}]
    return (cls or default_cls)(groups, **(kw if cls is None else {}))


def params_of(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def copies_of(opt) -> list[torch.nn.Parameter]:
    """Copies of ``opt``'s parameters, in ``make_params``' order (``build`` groups them)."""
    weights, biases = (g["params"] for g in opt.param_groups)
    return [
        torch.nn.Parameter(p.detach().clone())
        for pair in zip(weights, biases, strict=True)
        for p in pair
    ]


def train(opt, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        for p in params_of(opt):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def stepped(name: str) -> Any:
    opt = build(name, make_params())
    train(opt, 3)
    return opt


def snapshot(opt, identity: bool = True) -> dict[str, Any]:
    """Everything a load could change: the state dict, the live groups' values (parameters by
    identity, unless comparing two optimizers) and the parameters' values."""
    return {
        "state_dict": copy.deepcopy(opt.state_dict()),
        "groups": [
            {
                k: [id(p) for p in v] if k == "params" and identity else copy.deepcopy(v)
                for k, v in g.items()
                if k != "params" or identity
            }
            for g in opt.param_groups
        ],
        "params": [p.detach().clone() for p in params_of(opt)],
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------ what does not fit
def drop_last_group(sd, opt):
    del sd["param_groups"][-1]
    return r"it holds 1 param group, this optimizer 2$"


def extra_group(sd, opt):
    sd["param_groups"].append({**sd["param_groups"][-1], "params": []})
    return r"it holds 3 param groups, this optimizer 2"


def group_one_param_short(sd, opt):
    dropped = sd["param_groups"][0]["params"].pop()
    sd["state"].pop(dropped, None)
    return r"param group 0 holds 1 parameter, this optimizer's 2$"


def buffer_of_another_model(sd, opt):
    sd["state"][0][opt.state_buffers[0]] = torch.zeros(7, 7)  # params[0] is (6, 4)
    name = opt.state_buffers[0]
    return (
        rf"the state of params\[0\] of param group 0 \(id 0\)\['{name}'\] has shape \(7, 7\), "
        r"its parameter \(6, 4\) \(a state dict of another model"
    )


def buffer_of_integers(sd, opt):
    sd["state"][1][opt.state_buffers[0]] = torch.zeros(3, 6, dtype=torch.int64)
    return (
        r"the state of params\[1\] of param group 0 \(id 1\)\['\w+'\] is torch.int64; "
        r"expected a floating tensor, as its parameter \(torch.float32\)"
    )


def complex_buffer(sd, opt):
    sd["state"][1][opt.state_buffers[0]] = torch.zeros(3, 6, dtype=torch.complex64)
    return r"the state of .* \(id 1\)\['\w+'\] is torch.complex64; expected a floating tensor"


def buffer_not_a_tensor(sd, opt):
    sd["state"][0][opt.state_buffers[0]] = None
    return r"the state of .* \(id 0\)\['\w+'\] is None; expected a tensor shaped like its parameter"


def buffer_missing(sd, opt):
    del sd["state"][0][opt.state_buffers[-1]]
    if len(opt.state_buffers) == 1:  # a parameter without state is fine; one counter is not
        del sd["param_groups"][0]["step"]
        return r"param group 0 holds 'skipped_steps' but not 'step'"
    return rf"the state of .* \(id 0\) holds 'exp_avg' but not '{opt.state_buffers[-1]}'"


def counters_missing(sd, opt):
    for name in ("step", "skipped_steps"):
        del sd["param_groups"][1][name]
    return r"param group 1 has state but no step counters \('step', 'skipped_steps'\)"


def one_counter_missing(sd, opt):
    del sd["param_groups"][0]["skipped_steps"]
    return r"param group 0 holds 'step' but not 'skipped_steps'"


def counter(value: Any) -> Callable:
    def case(sd, opt):
        sd["param_groups"][1]["step"] = value
        return r"param group 1\['step'\] is .*; expected a step count"

    return case


def counter_in_state(sd, opt):
    sd["state"][0].update(step="3", skipped_steps=0)  # where ZeRO-3 sub-groups keep them
    return r"the state of .* \(id 0\)\['step'\] is '3'; expected a step count"


def foreign_state_key(sd, opt):
    foreign = "exp_avg_sq" if opt.state_buffers[0] == "momentum_buffer" else "momentum_buffer"
    sd["state"][0][foreign] = torch.zeros(6, 4)
    return rf"the state of .* \(id 0\) holds '{foreign}'; {type(opt).__name__} keeps .*another optimizer"


def missing_hyperparameter(sd, opt):
    del sd["param_groups"][0]["weight_decay"]
    return rf"param group 0 lacks 'weight_decay', which every {type(opt).__name__} group holds"


def invalid_hyperparameter(sd, opt):
    sd["param_groups"][1]["lr"] = -1.0
    return r"param group 1: invalid lr=-1.0; expected a finite number"


def other_layout(sd, opt):
    sd["param_groups"][0]["layout"] = "dtensor"
    return r"param group 0 was saved with layout='dtensor', this optimizer's has layout=None"


def state_of_an_unlisted_id(sd, opt):
    sd["state"][99] = sd["state"].pop(3)
    return r"'state' holds parameter id 99, which no param group lists"


def id_listed_twice(sd, opt):
    sd["param_groups"][1]["params"][0] = sd["param_groups"][0]["params"][0]
    return r"parameter id 0 is listed twice \(param group 0 and param group 1\)"


def not_a_state_dict(sd, opt):
    del sd["state"]
    return r"expected 'state' \(a dict\) and 'param_groups' \(a list\)"


def group_not_a_dict(sd, opt):
    sd["param_groups"][1] = [0, 1]
    return r"param group 1 is \[0, 1\]; expected a dict with a 'params' list"


BAD = {
    f.__name__: f
    for f in (
        drop_last_group,
        extra_group,
        group_one_param_short,
        buffer_of_another_model,
        buffer_of_integers,
        complex_buffer,
        buffer_not_a_tensor,
        buffer_missing,
        counters_missing,
        one_counter_missing,
        counter_in_state,
        foreign_state_key,
        missing_hyperparameter,
        invalid_hyperparameter,
        other_layout,
        state_of_an_unlisted_id,
        id_listed_twice,
        not_a_state_dict,
        group_not_a_dict,
    )
}
BAD.update(
    {
        f"counter {label}": counter(value)
        for label, value in {
            "str": "3",
            "bool": True,
            "None": None,
            "list": [3],
            "negative": -1,
            "nan tensor": torch.tensor(float("nan")),
            "two-element tensor": torch.tensor([1.0, 2.0]),
            "bool tensor": torch.tensor(True),
            "complex tensor": torch.tensor(1 + 0j),
        }.items()
    }
)


def assert_refused_atomically(opt, bad: dict[str, Any], match: str) -> None:
    untouched = copy.deepcopy(opt)
    before, groups, state = snapshot(opt), list(opt.param_groups), opt.state
    entries = {id(p): dict(opt.state[p]) for p in params_of(opt)}
    with pytest.raises(
        ValueError, match=rf"{type(opt).__name__}: cannot load the state dict: {match}"
    ):
        opt.load_state_dict(bad)
    assert_same(snapshot(opt), before)
    # Not replaced, either: the same group dicts, state dict and buffer tensors.
    assert opt.state is state and all(a is b for a, b in zip(opt.param_groups, groups, strict=True))
    for p in params_of(opt):
        assert opt.state[p].keys() == entries[id(p)].keys()
        assert all(opt.state[p][k] is v for k, v in entries[id(p)].items())
    train(opt, 2, first=3)
    train(untouched, 2, first=3)
    assert_same(snapshot(opt, identity=False), snapshot(untouched, identity=False))


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("name", NAMES)
def test_a_state_dict_that_does_not_fit_is_refused_before_anything_changes(name, case):
    opt = stepped(name)
    bad = copy.deepcopy(opt.state_dict())
    match = BAD[case](bad, opt)
    assert_refused_atomically(opt, bad, match)


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [("LAMB", "TVLARS"), ("LAMB", "LARS"), ("TVLARS", "LAMB"), ("LARS", "TVLARS")],
)
def test_a_state_dict_of_another_optimizer_is_refused(saved, loaded):
    other = stepped(saved)
    opt = stepped(loaded)
    missing = {"TVLARS": "'momentum'", "LARS": "'momentum'", "LAMB": "'betas'"}[loaded]
    if saved == "LARS":
        missing = "'lmbda'"
    match = rf"param group 0 lacks .*{missing}.*, which every {loaded} group holds"
    assert_refused_atomically(opt, copy.deepcopy(other.state_dict()), match)


def test_a_group_that_names_its_layout_refuses_another():
    params = make_params()
    opt = TVLARS([{"params": params, "layout": "replicated"}], lr=1.0)
    train(opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0]["layout"]
    assert_refused_atomically(
        opt,
        saved,
        r"param group 0 was saved with layout=None, this optimizer's has layout='replicated'",
    )


def test_a_loaded_decay_is_checked_at_the_load_not_at_the_next_step():
    """TVLARS resolves a loaded group's decay at its next step; a decay it would refuse there is
    refused by the load instead, while the optimizer still holds its own state."""
    opt = stepped("TVLARS")
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["final_factor"] = 2.0  # above phi at the delay
    assert_refused_atomically(opt, bad, r"param group 0: invalid final_factor=2.0")


# ------------------------------------------------------------------ what fits, as before
@pytest.mark.parametrize("name", NAMES)
def test_a_good_state_dict_loads_after_a_refused_one(name):
    opt, twin = stepped(name), stepped(name)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["step"] = "3"
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    resumed = build(name, copies_of(twin))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(resumed, 2, first=3)
    train(twin, 2, first=3)
    assert_same(snapshot(resumed, identity=False), snapshot(twin, identity=False))


@pytest.mark.parametrize("name", NAMES)
def test_older_and_annotated_state_dicts_still_load(name):
    """Groups saved before ``maximize`` (and TVLARS' description over the run) existed, keys an
    LR scheduler added (``initial_lr``), counters saved as numbers, and a fresh optimizer's
    state dict (no counters, no state) load as torch loads them."""
    opt = stepped(name)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["maximize"]
        group["initial_lr"] = group["lr"]
        group["step"], group["skipped_steps"] = 3, 0
        if name == "TVLARS":
            group["lmbda"], group["delay_steps"] = 0.01, 0.0
            for key in ("total_steps", "delay_fraction", "final_factor"):
                del group[key]
    fresh = build(name, make_params())
    fresh.load_state_dict(saved)
    assert [g["maximize"] for g in fresh.param_groups] == [False, False]
    assert fresh.param_groups[0]["initial_lr"] == fresh.param_groups[0]["lr"]
    train(fresh, 1, first=3)
    assert [float(g["step"]) for g in fresh.param_groups] == [4.0, 4.0]
    fresh.load_state_dict(build(name, make_params()).state_dict())
    assert not fresh.state and "step" not in fresh.param_groups[0]


def test_a_pre_hook_may_mend_the_state_dict_first():
    """The check runs after the caller's load pre-hooks: what it sees is what torch loads."""
    opt = stepped("LARS")
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        group["lars_eta"] = group.pop("eta")  # a renamed key, as an old version might save it

    def rename(optimizer, state_dict):
        for group in state_dict["param_groups"]:
            group["eta"] = group.pop("lars_eta")

    opt.register_load_state_dict_pre_hook(rename)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["eta"] == 1e-3
