"""Constructor validation, the torch.optim registry, create_optimizer and the schedules."""

from __future__ import annotations

import math
import re

import pytest
import torch

import tvlars_scale
from tvlars_scale import LAMB, LARS, TVLARS, create_optimizer, schedules


def params():
    return [torch.nn.Parameter(torch.randn(3, 2))]


BAD_TVLARS = [
    ("lr", -0.1),
    ("lr", math.nan),
    ("lr", math.inf),
    ("lr", "0.1"),
    ("momentum", -0.5),
    ("momentum", 1.0),
    ("weight_decay", -1e-4),
    ("weight_decay", math.nan),
    ("eta", 0.0),
    ("eta", -1e-3),
    ("eta", math.nan),
    ("lmbda", -1e-3),
    ("lmbda", math.nan),
    ("delay_steps", math.inf),
    ("alpha", -0.1),
    ("gamma_min", -0.01),
    ("norm_clip", 0.0),
    ("norm_clip", -1.0),
    ("trust_denominator", "l2"),
    ("nesterov", "yes"),
    ("exclude_bias_and_norm", 1),
    ("phi_on_excluded", None),
    ("preset", "paper"),
]


@pytest.mark.parametrize("name,value", BAD_TVLARS)
def test_tvlars_rejects_bad_hyperparameters(name, value):
    kwargs = {"lr": 0.1, name: value}
    with pytest.raises(ValueError, match=f"TVLARS: invalid {name}=") as info:
        TVLARS(params(), **kwargs)
    assert "expected" in str(info.value)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        LARS(params(), lr=0.1, momentum=0.0, nesterov=True)


def test_preset_conflicts_are_named():
    with pytest.raises(
        ValueError, match=re.escape("preset='official' fixes alpha=0.1; got alpha=0.5")
    ):
        TVLARS(params(), lr=0.1, preset="official", alpha=0.5)
    opt = TVLARS(params(), lr=0.1, preset="official", alpha=0.1)  # agreeing is fine
    assert opt.defaults["norm_clip"] == 10.0 and opt.defaults["phi_on_excluded"] is False


def test_group_overrides_are_validated_too():
    with pytest.raises(ValueError, match="TVLARS: invalid lr=-1"):
        TVLARS([{"params": params(), "lr": -1.0}], lr=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(betas=(0.9, 1.0)), "betas\\[1\\]=1.0"),
        (dict(betas=(-0.1, 0.9)), "betas\\[0\\]=-0.1"),
        (dict(betas=0.9), "betas=0.9; expected a pair"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=math.nan), "weight_decay=nan"),
    ],
)
def test_lamb_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=f"LAMB: invalid {match}"):
        LAMB(params(), lr=0.1, **kwargs)


def test_registered_in_torch_optim():
    assert torch.optim.TVLARS is TVLARS
    assert torch.optim.tvlars is TVLARS
    assert torch.optim.LARS is LARS
    assert torch.optim.LAMB is LAMB
    assert torch.optim.LayerwiseLAMB is LAMB


def test_register_never_shadows_torch(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(torch.optim, "LARS", sentinel)
    names = tvlars_scale.register()
    assert torch.optim.LARS is sentinel
    assert "LARS" not in names and "TVLARS" in names
    assert torch.optim.SGD.__module__.startswith("torch.optim")


def test_create_optimizer():
    assert isinstance(create_optimizer("tvlars", params(), lr=0.1), TVLARS)
    assert isinstance(create_optimizer("LayerwiseLAMB", params(), lr=0.1), LAMB)
    with pytest.raises(
        ValueError, match="unknown optimizer name='adamw'; known names: TVLARS, LARS"
    ):
        create_optimizer("adamw", params(), lr=0.1)


def test_warmup_cosine():
    f = schedules.warmup_cosine(warmup_steps=4, total_steps=14, final_factor=0.001)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(14) == pytest.approx(0.001) and f(100) == pytest.approx(0.001)


def test_polynomial_decay_and_lambda_lr():
    f = schedules.polynomial_decay(total_steps=10, power=2.0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.25) and f(10) == 0.0
    opt = LARS(params(), lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for _ in range(5):
        opt.step()  # no gradients: a no-op, but the order LambdaLR expects
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_sqrt_scaling_rule():
    assert schedules.sqrt_scaled_lr(3.0, 2048, 512) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="batch_size=0"):
        schedules.sqrt_scaled_lr(3.0, 0, 512)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: schedules.warmup_cosine(20, 10), "warmup_steps=20 exceeds total_steps=10"),
        (lambda: schedules.warmup_cosine(-1, 10), "warmup_steps=-1"),
        (lambda: schedules.polynomial_decay(0), "total_steps=0"),
        (lambda: schedules.polynomial_decay(10, power=0.0), "power=0.0"),
    ],
)
def test_schedule_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
