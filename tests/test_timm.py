"""timm: ``timm.optim.create_optimizer_v2(model, NAME, ...)`` builds our optimizers.

Each run trains 3 steps through timm's factory and compares the parameters with a plain run of
our optimizer over the param groups timm's weight-decay filtering is documented to build.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tvlars_scale
from tvlars_scale import LAMB, LARS, TVLARS

timm_optim = pytest.importorskip(
    "timm.optim", reason="timm is not installed: pip install -e '.[test]' (or pip install timm)"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


class Net(nn.Module):
    """Conv, norm and linear layers, and a 2-D parameter the model exempts from weight decay
    (timm's ``no_weight_decay()``, as ViTs do for position embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.pos = nn.Parameter(torch.randn(4, 6, 6) * 0.1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.norm(self.conv(x)) + self.pos).flatten(1))


def train(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def timm_groups(model: Net, weight_decay: float) -> list[dict]:
    """What timm's filtering is documented to build: no decay for 1-D parameters and for
    ``no_weight_decay()`` names, ``weight_decay`` for the rest."""
    named = list(model.named_parameters())
    exempt = [p for n, p in named if p.ndim <= 1 or n in model.no_weight_decay()]
    decayed = [p for n, p in named if not (p.ndim <= 1 or n in model.no_weight_decay())]
    return [{"params": exempt, "weight_decay": 0.0}, {"params": decayed}]


@pytest.mark.parametrize(
    ("name", "cls", "kwargs"),
    [
        ("tvlars", TVLARS, dict(lr=2.0, lmbda=0.1)),
        ("layerwiselars", LARS, dict(lr=2.0, nesterov=True)),
        ("layerwiselamb", LAMB, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-5)),
    ],
)
def test_create_optimizer_v2_builds_ours(name, cls, kwargs):
    model = Net()
    opt = timm_optim.create_optimizer_v2(model, name, weight_decay=0.01, **kwargs)
    assert type(opt) is cls
    trained = train(model, opt)
    # timm adds momentum=0.9 for optimizers with momentum (our default too), nothing else
    reference = Net()
    plain = train(reference, cls(timm_groups(reference, 0.01), weight_decay=0.01, **kwargs))
    for (n, p), q in zip(trained.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_weight_decay_filtering_is_timms():
    """1-D parameters and no_weight_decay() names in a group with weight decay 0; without a
    model (plain parameters) timm passes weight_decay through; lr omitted: our default."""
    model = Net()
    opt = timm_optim.create_optimizer_v2(model, "tvlars", weight_decay=0.01)
    exempt = {id(p) for p in opt.param_groups[0]["params"]}
    assert (
        opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.01
    )
    assert exempt == {id(model.pos), id(model.conv.bias), id(model.norm.weight),
                      id(model.norm.bias), id(model.head.bias)}  # fmt: skip
    assert opt.defaults["lr"] == 1.0
    plain = timm_optim.create_optimizer_v2(model.parameters(), "layerwiselamb", weight_decay=0.02)
    assert plain.param_groups[0]["weight_decay"] == 0.02 and plain.defaults["lr"] == 1e-3


def test_timms_own_lars_and_lamb_are_untouched(monkeypatch):
    assert timm_optim.get_optimizer_info("lars").opt_class is timm_optim.Lars
    assert timm_optim.get_optimizer_info("lamb").opt_class is timm_optim.Lamb
    assert set(tvlars_scale.timm.register()) == {"tvlars", "layerwiselars", "layerwiselamb"}
    monkeypatch.setitem(tvlars_scale.timm.TIMM_NAMES, "lars", LARS)  # a clash, were it ours
    with pytest.warns(RuntimeWarning, match="timm already has an optimizer named 'lars'"):
        assert "lars" not in tvlars_scale.timm.register()
    assert timm_optim.get_optimizer_info("lars").opt_class is timm_optim.Lars


def test_import_stays_lazy_and_registers_when_timm_is_imported():
    """``import tvlars_scale`` does not import timm; importing timm afterwards is enough."""
    code = (
        "import sys, tvlars_scale\n"
        "assert 'timm' not in sys.modules\n"
        "import timm.optim\n"
        "print(sorted(timm.optim.list_optimizers('*la*s')))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'layerwiselars'" in out.stdout and "'tvlars'" in out.stdout
