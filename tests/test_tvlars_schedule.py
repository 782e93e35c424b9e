"""TVLARS' decay described over the run (``schedules.TVLARSSchedule``, ``TVLARS(total_steps=...)``).

phi is read where training sees it: the step scale of an excluded (1-D) layer, which is phi(t)
itself with ``phi_on_excluded=True`` (``layer_stats().scale``).
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle

import pytest
import torch

import tvlars_scale
from tvlars_scale import TVLARS, TVLARSSchedule
from tvlars_scale.deepspeed import check_config, load_config, optimizer_kwargs


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen)),  # adapted
        torch.nn.Parameter(torch.randn(4, generator=gen)),  # excluded: scale = phi(t)
    ]


def _train(opt: TVLARS, steps: int, first: int = 0) -> list[float]:
    """``steps`` steps on fixed per-step gradients; phi(t) of each step."""
    phis = []
    for t in range(first, first + steps):
        gen = torch.Generator().manual_seed(1000 + t)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        phis.append(opt.layer_stats().scale[1].item())
    return phis


def test_phi_at_a_fraction_of_training_is_the_same_at_every_batch_size():
    dataset, epochs = 8192, 4
    fractions = [k / 8 for k in range(8)]
    at_fraction, per_step = {}, {}
    for batch in (256, 1024, 4096):  # 32, 8 and 2 steps per epoch
        total = epochs * (dataset // batch)
        kw = dict(total_steps=total, delay_fraction=0.25, final_factor=0.02)
        phis = _train(TVLARS(_params(), lr=0.1, **kw), total)
        at_fraction[batch] = [phis[round(f * total)] for f in fractions]
        schedule = TVLARSSchedule(**kw)
        assert phis == pytest.approx([schedule(t) for t in range(total)], rel=1e-6)
        assert schedule(schedule.delay_steps) == pytest.approx(0.5)
        assert schedule(total) == pytest.approx(0.02)
        # The paper's per-step lambda, for contrast: its phi depends on the batch size.
        phis = _train(TVLARS(_params(), lr=0.1, lmbda=0.05, delay_steps=0.25 * total), total)
        per_step[batch] = [phis[round(f * total)] for f in fractions]
    for batch in (1024, 4096):
        assert at_fraction[batch] == pytest.approx(at_fraction[256], rel=1e-6)
        assert per_step[batch] != pytest.approx(per_step[256], rel=1e-2)


def test_resumed_run_continues_phi_exactly():
    kw = dict(lr=0.1, total_steps=20, delay_fraction=0.2, final_factor=0.01)
    full = TVLARS(_params(), **kw)
    expected = _train(full, 20)

    first = TVLARS(_params(), **kw)
    phis = _train(first, 10)
    saved = copy.deepcopy(first.state_dict())
    # Built without the description (as after a restart that forgot it): the state_dict carries
    # the group's decay and step counter, as torch's optimizers carry their hyperparameters.
    params = [p.detach().clone().requires_grad_() for p in first.param_groups[0]["params"]]
    resumed = TVLARS(params, lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["total_steps"] == 20
    phis += _train(resumed, 10, first=10)

    assert phis == expected  # bit for bit
    for a, b in zip(params, full.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_of_older_versions_loads():
    opt = TVLARS(_params(), lr=0.1, lmbda=0.2)
    _train(opt, 2)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("total_steps", "delay_fraction", "final_factor"):
            del group[key]
    fresh = TVLARS(_params(), lr=0.1)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["total_steps"] is None and fresh.param_groups[0]["lmbda"] == 0.2


def test_groups_describe_their_own_decay():
    a, b, c = _params(0), _params(1), _params(2)
    opt = TVLARS(
        [
            {"params": a},
            {"params": b, "total_steps": 400},
            {"params": c, "total_steps": None, "lmbda": 0.01},
        ],
        lr=0.1,
        total_steps=100,
    )
    g = opt.param_groups
    assert g[0]["lmbda"] == pytest.approx(TVLARSSchedule(100).lmbda)
    assert g[1]["lmbda"] == pytest.approx(TVLARSSchedule(400).lmbda)
    assert g[1]["delay_steps"] == pytest.approx(40.0)
    assert (g[2]["lmbda"], g[2]["delay_steps"]) == (0.01, 0)
    # A group copied from a resolved one agrees with itself.
    opt.add_param_group({**g[0], "params": _params(3)})
    # A mixture that disagrees is refused, and the optimizer stays as it was.
    with pytest.raises(ValueError, match="TVLARS: delay_steps=5 contradicts total_steps=100"):
        opt.add_param_group({"params": _params(4), "delay_steps": 5})
    assert len(opt.param_groups) == 4


def test_explicit_values_that_agree_are_accepted():
    s = TVLARSSchedule(300, delay_fraction=0.2, final_factor=0.1)
    opt = TVLARS(
        _params(),
        total_steps=300,
        delay_fraction=0.2,
        final_factor=0.1,
        lmbda=s.lmbda,
        delay_steps=60,
    )
    assert opt.param_groups[0]["lmbda"] == s.lmbda


def test_alpha_and_gamma_min_enter_the_mapping():
    s = TVLARSSchedule(1000, delay_fraction=0.0, final_factor=0.3, alpha=0.5, gamma_min=0.1)
    assert s(0) == pytest.approx(1 / 1.5 + 0.1) and s(1000) == pytest.approx(0.3)
    opt = TVLARS(
        _params(), total_steps=1000, delay_fraction=0.0, final_factor=0.3, alpha=0.5, gamma_min=0.1
    )
    assert opt.param_groups[0]["lmbda"] == pytest.approx(s.lmbda)
    assert s(torch.tensor([0.0, 1000.0])).tolist() == pytest.approx([s(0), s(1000)])


BAD = [
    (dict(total_steps=0), "invalid total_steps=0; expected an integer in [1, 2**24]"),
    (dict(total_steps=-5), "invalid total_steps=-5; expected an integer in [1, 2**24]"),
    (dict(total_steps=2.5), "invalid total_steps=2.5; expected an integer in [1, 2**24]"),
    (dict(total_steps=True), "invalid total_steps=True; expected an integer in [1, 2**24]"),
    (dict(total_steps="100"), "invalid total_steps='100'; expected an integer in [1, 2**24]"),
    (dict(total_steps=100, delay_fraction=1.0), "invalid delay_fraction=1.0; expected a finite"),
    (dict(total_steps=100, delay_fraction=-0.1), "invalid delay_fraction=-0.1; expected a fin"),
    (dict(total_steps=100, delay_fraction=math.nan), "invalid delay_fraction=nan"),
    (dict(total_steps=100, final_factor=0.0), "invalid final_factor=0.0; expected a number in "
     "(0, 0.5): above gamma_min=0 (phi's floor) and below 1/(alpha + 1) + gamma_min = 0.5"),
    (dict(total_steps=100, final_factor=0.5), "invalid final_factor=0.5; expected a number in "
     "(0, 0.5)"),
    (dict(total_steps=100, final_factor=0.15, gamma_min=0.2), "invalid final_factor=0.15; "
     "expected a number in (0.2, 0.7)"),
    (dict(total_steps=100, final_factor=math.inf), "invalid final_factor=inf"),
    (dict(total_steps=100, final_factor="0.1"), "invalid final_factor='0.1'; expected a number "
     "in (0, 0.5)"),
    (dict(total_steps=100, final_factor=math.nan), "invalid final_factor=nan; expected a number "
     "in (0, 0.5)"),
    (dict(total_steps=2**24 + 1), "invalid total_steps=16777217; expected an integer in "
     "[1, 2**24] (the optimizer steps of the run; the step counter is a float32 tensor"),
    (dict(total_steps=10**400), "invalid total_steps=1000000"),
    # Inside the interval, but within rounding of an end: no decay, or an infinite one.
    (dict(total_steps=100, final_factor=1e-310), "invalid final_factor=1e-310; it gives the "
     "decay coefficient lmbda=inf in float64, which must be finite and > 0"),
    (dict(total_steps=100, final_factor=0.909090909090909, alpha=0.1), "invalid final_factor="
     "0.909090909090909; it gives the decay coefficient lmbda=0.0"),
    # alpha = 0 leaves phi(0) = exp(lmbda * delay_steps) unbounded.
    (dict(total_steps=100, alpha=0.0, delay_fraction=0.99, final_factor=1e-3), "invalid "
     "alpha=0.0 with lmbda=6.907755278982137 and delay_steps=99.0: phi(0) = 1/(alpha + "
     "exp(-lmbda * delay_steps)) + gamma_min = 1/1e-297 overflows float32; expected alpha > 0"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,match", BAD)
@pytest.mark.parametrize("owner", ["TVLARS", "TVLARSSchedule"])
def test_bad_arguments_are_named(owner, kwargs, match):
    with pytest.raises(ValueError) as info:
        if owner == "TVLARS":
            TVLARS(_params(), lr=0.1, **kwargs)
        else:
            TVLARSSchedule(**kwargs)
    assert str(info.value).startswith(f"{owner}: {match}"), str(info.value)


def test_a_per_step_decay_whose_start_overflows_is_refused():
    with pytest.raises(ValueError, match=r"^TVLARS: invalid alpha=0\.0 with lmbda=1\.0 and "):
        TVLARS(_params(), alpha=0.0, lmbda=1.0, delay_steps=200)
    opt = TVLARS(_params(), alpha=0.0, lmbda=1.0, delay_steps=20)  # phi(0) = e^20: allowed
    assert math.isfinite(_train(opt, 1)[0])


def test_values_that_agree_up_to_rounding_are_accepted():
    # 0.07 * 100 = 7.000000000000001 in float64
    opt = TVLARS(_params(), total_steps=100, delay_fraction=0.07, delay_steps=7)
    assert opt.param_groups[0]["delay_steps"] == 0.07 * 100


def test_numpy_numbers_are_stored_as_python_numbers():
    """A state_dict must load with ``torch.load(weights_only=True)``, which refuses numpy."""
    np = pytest.importorskip("numpy")
    opt = TVLARS(
        [
            {"params": _params(0), "alpha": np.float64(0.5)},
            {
                "params": _params(1),
                "total_steps": None,
                "delay_fraction": None,
                "lmbda": np.float64(1e-3),
            },
        ],
        total_steps=np.int64(100),
        delay_fraction=np.float32(0.25),
        delay_steps=None,
    )
    opt.param_groups[1]["delay_steps"] = np.int64(5)  # an edit, validated at the step
    _train(opt, 1)
    names = ("total_steps", "delay_fraction", "final_factor", "lmbda", "delay_steps", "alpha")
    for group in opt.param_groups:
        for name in (*names, "gamma_min"):
            assert type(group[name]) in (int, float, type(None)), name
    group = opt.param_groups[0]
    expected = TVLARSSchedule(100, delay_fraction=float(np.float32(0.25)), alpha=0.5)
    assert group["lmbda"] == expected.lmbda
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_an_edited_decay_takes_effect_at_the_next_step():
    """As an edited ``lr`` does: the derived ``lmbda`` and ``delay_steps`` follow an edit of
    the description over the run, before the first step or during training."""
    opt = TVLARS(_params(), lr=0.1)  # the per-step default, until the run's length is known
    opt.param_groups[0]["total_steps"] = 400
    phis = _train(opt, 5)
    opt.param_groups[0]["final_factor"] = 0.2
    phis += _train(opt, 5, first=5)
    before, after = TVLARSSchedule(400), TVLARSSchedule(400, final_factor=0.2)
    expected = [before(t) for t in range(5)] + [after(t) for t in range(5, 10)]
    assert phis == pytest.approx(expected, rel=1e-6)
    group = opt.param_groups[0]
    assert (group["lmbda"], group["delay_steps"]) == (after.lmbda, after.delay_steps)
    # The state_dict holds the edited description, and a resumed run continues it.
    resumed = TVLARS(_params(), lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    assert _train(resumed, 1, first=10) == pytest.approx([after(10)], rel=1e-6)


@pytest.mark.parametrize("route", ["load_state_dict", "deepcopy", "pickle", "new dict"])
def test_an_edit_not_stepped_yet_survives_a_copy(route):
    """An edit saved, copied or made on a replaced group dict before the next step: the group
    is validated at that step, its description over the run deriving the decay."""
    opt = TVLARS(_params(), lr=0.1, total_steps=100)
    _train(opt, 2)
    if route == "new dict":
        opt.param_groups[0] = dict(opt.param_groups[0], total_steps=800)
    else:
        opt.param_groups[0]["total_steps"] = 800
    if route == "load_state_dict":
        copied = TVLARS(_params(), lr=0.1)
        copied.load_state_dict(opt.state_dict())
    elif route == "deepcopy":
        copied = copy.deepcopy(opt)
    elif route == "pickle":
        copied = pickle.loads(pickle.dumps(opt))
    else:
        copied = opt
    assert _train(copied, 1, first=2) == pytest.approx([TVLARSSchedule(800)(2)], rel=1e-6)
    assert copied.param_groups[0]["lmbda"] == TVLARSSchedule(800).lmbda


def test_an_edit_that_contradicts_itself_is_refused_at_the_step():
    opt = TVLARS(_params(), lr=0.1, total_steps=50)
    _train(opt, 2)
    weights = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    opt.param_groups[0]["lmbda"] = 0.5  # by hand, while the group is described over the run
    with pytest.raises(ValueError, match=r"^TVLARS: lmbda=0\.5 contradicts total_steps=50"):
        opt.step()
    for p, w in zip(opt.param_groups[0]["params"], weights, strict=True):
        assert torch.equal(p, w)
    assert opt.param_groups[0]["lmbda"] == 0.5  # left as the caller wrote it
    # Loaded elsewhere, the description over the run decides: the refused value is not taken.
    loaded = TVLARS(_params(), lr=0.1)
    loaded.load_state_dict(opt.state_dict())
    _train(loaded, 1, first=2)
    assert loaded.param_groups[0]["lmbda"] == TVLARSSchedule(50).lmbda
    opt.param_groups[0]["final_factor"] = 2.0
    with pytest.raises(ValueError, match=r"^TVLARS: invalid final_factor=2\.0"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(final_factor=0.1), "final_factor=0.1 describes phi over a run and needs total_steps"),
        (dict(delay_fraction=0.3), "delay_fraction=0.3 describes phi over a run and needs total"),
        (dict(total_steps=100, lmbda=1e-3), "lmbda=0.001 contradicts total_steps=100, "
         "delay_fraction=0.1, final_factor=0.05, which give lmbda=0.0327"),
        (dict(total_steps=100, delay_steps=0), "delay_steps=0 contradicts total_steps=100, "
         "delay_fraction=0.1, final_factor=0.05, which give delay_steps=10.0"),
        (dict(total_steps=100, preset="official"), "preset='official' fixes delay_steps and takes"
         " the per-step lmbda; it cannot be combined with total_steps=100"),
        (dict(preset="official", delay_steps=0), "preset='official' fixes delay_steps=-1; got "
         "delay_steps=0"),
    ],
)  # fmt: skip
def test_contradictory_descriptions_are_refused(kwargs, match):
    with pytest.raises(ValueError) as info:
        TVLARS(_params(), lr=0.1, **kwargs)
    assert str(info.value).startswith(f"TVLARS: {match}"), str(info.value)


def test_deepspeed_json_route(tmp_path):
    params = {"lr": 2.0, "total_steps": 1000, "delay_fraction": 0.2, "final_factor": 0.01}
    kwargs = optimizer_kwargs("TVLARS", params)
    # What DeepSpeed does with a JSON "type" it does not know: torch.optim.<type>(params, **p).
    opt = torch.optim.TVLARS(_params(), **kwargs)
    expected = TVLARSSchedule(1000, delay_fraction=0.2, final_factor=0.01)
    assert opt.param_groups[0]["lmbda"] == expected.lmbda
    assert opt.param_groups[0]["delay_steps"] == expected.delay_steps

    config = {
        "gradient_clipping": 0.0,
        "optimizer": {"type": "TVLARS", "params": {**params, "final_factor": 0.9}},
    }
    with pytest.raises(ValueError, match=r"TVLARS: invalid final_factor=0.9; expected a number"):
        check_config(config)
    config["optimizer"]["params"] = {"lr": 2.0, "lmbda": 0.01, "total_steps": 1000}
    with pytest.raises(ValueError, match=r"TVLARS: lmbda=0\.01 contradicts total_steps=1000"):
        check_config(config)

    # A file that leaves the run's length to the script: load_config fills it.
    path = tmp_path / "ds.json"
    config["optimizer"]["params"] = {"lr": "auto", "total_steps": "auto", "final_factor": 0.02}
    path.write_text(json.dumps(config))
    loaded = load_config(path, lr=1.0, total_steps=640)
    assert loaded["optimizer"]["params"]["total_steps"] == 640
    with pytest.raises(ValueError, match=r"invalid total_steps=640\.0; expected an integer"):
        load_config(path, lr=1.0, total_steps=640.0)


def test_exported():
    assert tvlars_scale.TVLARSSchedule is TVLARSSchedule
    assert tvlars_scale.schedules.TVLARSSchedule is TVLARSSchedule
