"""Layers with a trust ratio held in bfloat16 or float16 (no float32 master copy) get one
warning per optimizer, at its first step: a step of about 1e-3 of a layer's norm is near their
spacing, so it largely rounds away. Float32 tensors, and low-precision layers without a trust
ratio, get none; nor does FSDP2 with a MixedPrecisionPolicy, whose sharded parameters (what the
optimizer holds) stay float32."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tvlars_scale import LAMB, LARS, TVLARS

CLASSES = {"TVLARS": TVLARS, "LARS": LARS, "LAMB": LAMB}


def make_net() -> nn.Module:
    """Three weights (trust ratio) and three biases (excluded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "no float32 master copy" in str(w.message)]


def train(opt, net: nn.Module, steps: int, dtype: torch.dtype) -> list[str]:
    """``steps`` steps, recording every warning; the messages of ours."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            net(torch.randn(5, 4, dtype=dtype)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    return ours(caught)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CLASSES))
def test_low_precision_layers_warn_once(name, dtype):
    net = make_net().to(dtype)
    opt = CLASSES[name](net.parameters())
    messages = train(opt, net, 3, dtype)
    assert len(messages) == 1
    (message,) = messages
    assert message.startswith(f"{name}: 3 layers with a trust ratio are held in {dtype}")
    for advice in ("MixedPrecisionPolicy", "torch.autocast", "DeepSpeed", "accelerate#3979"):
        assert advice in message
    spacing = {torch.bfloat16: "3.9e-03", torch.float16: "4.9e-04"}[dtype]
    assert f"one below {spacing} of the element's magnitude" in message


def test_once_per_optimizer_even_when_its_plans_are_rebuilt():
    """A load replaces the state (plans are rebuilt) and new tensors make new plans: still one
    warning; a second optimizer warns for itself."""
    net = make_net().bfloat16()
    opt = TVLARS(net.parameters())
    assert len(train(opt, net, 1, torch.bfloat16)) == 1
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 3, dtype=torch.bfloat16))]})
    assert train(opt, net, 2, torch.bfloat16) == []
    assert len(train(TVLARS(net.parameters()), net, 1, torch.bfloat16)) == 1


def test_a_model_cast_to_bfloat16_after_its_first_steps_warns_then():
    net = make_net()
    opt = TVLARS(net.parameters())
    assert train(opt, net, 2, torch.float32) == []
    net.bfloat16()  # in place (p.data): the next step makes new plans
    assert len(train(opt, net, 2, torch.bfloat16)) == 1


def test_counts_each_dtype_and_skips_excluded_layers():
    net = make_net()
    net[0].bfloat16()
    net[2].half()
    net[4].bias.data = net[4].bias.data.bfloat16()  # excluded: no trust ratio, not counted
    opt = LARS(net.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    (message,) = ours(caught)
    assert message.startswith(
        "LARS: 2 layers with a trust ratio are held in low precision (1 in torch.bfloat16, "
        "1 in torch.float16)"
    )
    assert "3.9e-03" in message and "4.9e-04" in message


@pytest.mark.parametrize("name", list(CLASSES))
def test_float32_layers_do_not_warn(name):
    net = make_net()
    assert train(CLASSES[name](net.parameters()), net, 2, torch.float32) == []


def test_low_precision_layers_without_a_trust_ratio_do_not_warn():
    """Biases and norm gains (1-D) are excluded: a bfloat16 one costs no trust ratio. With
    ``exclude_bias_and_norm=False`` they get one, and count."""
    biases = [nn.Parameter(torch.randn(8, dtype=torch.bfloat16)) for _ in range(2)]
    weights = [nn.Parameter(torch.randn(8, 4))]
    for p in biases + weights:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TVLARS(biases + weights).step()
        assert ours(caught) == []
        TVLARS(biases, exclude_bias_and_norm=False).step()
    (message,) = ours(caught)
    assert message.startswith("TVLARS: 2 layers with a trust ratio are held in torch.bfloat16")


def test_the_warning_points_at_the_callers_step():
    net = make_net().bfloat16()
    opt = LAMB(net.parameters())
    net(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()
    with pytest.warns(UserWarning, match="no float32 master copy") as caught:
        opt.step()
    assert caught[0].filename == __file__


# ------------------------------------------------------------------ FSDP2 on two ranks
def _fsdp2_warnings(rank: int, world_size: int) -> dict[str, list[str]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    found = {}
    for case, net, kw in (
        ("mixed precision", make_net(), dict(mp_policy=policy)),  # float32 shards
        ("bfloat16 shards", make_net().bfloat16(), {}),
    ):
        model = fully_shard(net, mesh=mesh, **kw)
        opt = TVLARS(model.parameters(), lr=1.0)
        dtype = torch.float32 if case == "mixed precision" else torch.bfloat16
        found[case] = train(opt, model, 2, dtype)
    return found


def test_fsdp2_mixed_precision_does_not_warn():
    from multirank import run_ranks

    for found in run_ranks(_fsdp2_warnings, 2):
        assert found["mixed precision"] == []
        (message,) = found["bfloat16 shards"]
        assert message.startswith("TVLARS: 3 layers with a trust ratio are held in torch.bfloat16")
