"""DeepSpeed JSON handling in one process: the names DeepSpeed resolves, the checks of the
optimizer section, "auto" filling, and the shipped ds_configs files."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from deepspeed_common import DS_CONFIGS

import tvlars_scale
import tvlars_scale.deepspeed as tds

CONFIG_FILES = sorted(f for f in os.listdir(DS_CONFIGS) if f.endswith(".json"))
GOOD = {"lr": 0.1, "weight_decay": 5e-4}


def minimal(stage: int = 2, **top) -> dict:
    return {
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "TVLARS", "params": dict(GOOD)},
        "zero_optimization": {"stage": stage},
        **top,
    }


def test_deepspeed_resolves_our_names_and_keeps_lamb():
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    assert set(DEEPSPEED_OPTIMIZERS) <= set(tds._RESERVED)  # DeepSpeed lower-cases these
    for name, cls in tds.JSON_TYPES.items():
        assert name.lower() not in DEEPSPEED_OPTIMIZERS
        assert getattr(torch.optim, name) is cls  # DeepSpeed's fallback lookup
    assert tds.JSON_TYPES["LayerwiseLAMB"] is tvlars_scale.LAMB
    assert "LAMB" not in tds.JSON_TYPES  # DeepSpeed builds its FusedLamb for any "lamb"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {**GOOD, "momentun": 0.9},
            r"unknown key optimizer\.params\.momentun \(did you mean 'momentum'",
        ),
        ({**GOOD, "eta": math.nan}, r"invalid eta=nan"),
        ({**GOOD, "lr": "auto"}, r"optimizer\.params\.lr is still 'auto'.*load_config"),
        ({**GOOD, "max_grad_norm": 1.0}, r"max_grad_norm.*gradient_clipping"),
        ({**GOOD, "trust_denominator": "both"}, r"invalid trust_denominator='both'"),
    ],
)
def test_bad_optimizer_params_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        tds.optimizer_kwargs("TVLARS", params)


def test_json_lists_become_tuples():
    kwargs = tds.optimizer_kwargs("LayerwiseLAMB", {"lr": 1e-3, "betas": [0.9, 0.98]})
    assert kwargs["betas"] == (0.9, 0.98)


def test_check_config_requires_untested_optimizer_flag_under_zero():
    config = minimal()
    del config["zero_allow_untested_optimizer"]
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer"):
        tds.check_config(config)
    del config["zero_optimization"]  # stage 0: DeepSpeed does not ask
    tds.check_config(config)


def test_check_config_warns_about_gradient_clipping():
    config = minimal()
    del config["gradient_clipping"]
    with pytest.warns(UserWarning, match="default is 1.0"):
        tds.check_config(config)
    with pytest.warns(UserWarning, match="trust ratio"):
        tds.check_config(minimal(gradient_clipping=1.0))
    lamb = minimal(gradient_clipping=1.0)
    lamb["optimizer"] = {"type": "LayerwiseLAMB", "params": {"lr": 1e-3}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Adam-normalised updates: no trust-ratio warning
        tds.check_config(lamb)
    with pytest.raises(ValueError, match="gradient_clipping=-1"):
        tds.check_config(minimal(gradient_clipping=-1))


def test_check_config_names_and_spelling():
    lamb = minimal()
    lamb["optimizer"]["type"] = "Lamb"
    with pytest.warns(UserWarning, match="LayerwiseLAMB"):
        tds.check_config(lamb)
    wrong_case = minimal()
    wrong_case["optimizer"]["type"] = "Tvlars"
    with pytest.raises(ValueError, match="write 'TVLARS'"):
        tds.check_config(wrong_case)
    other = minimal()
    other["optimizer"] = {"type": "SGD", "params": {"lr": 0.1, "whatever": 1}}
    assert tds.check_config(other) == other  # not ours to check


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs(name):
    path = os.path.join(DS_CONFIGS, name)
    with open(path) as f:
        raw = json.load(f)
    assert raw["optimizer"]["type"] == "TVLARS"
    assert raw["gradient_clipping"] == 0
    assert raw["zero_allow_untested_optimizer"] is True
    assert raw["zero_force_ds_cpu_optimizer"] is False
    stage, precision = name.removesuffix(".json").split("_")
    assert raw["zero_optimization"]["stage"] == int(stage.removeprefix("zero"))
    assert raw["bf16"]["enabled"] is (precision == "bf16")
    with pytest.raises(ValueError, match="is 'auto'; pass load_config"):
        tds.load_config(path)
    config = tds.load_config(
        path,
        lr=0.2,
        weight_decay=1e-4,
        train_micro_batch_size_per_gpu=32,
        gradient_accumulation_steps=2,
    )
    assert config["optimizer"]["params"]["lr"] == 0.2
    assert config["train_micro_batch_size_per_gpu"] == 32
    with pytest.raises(ValueError, match="no 'auto' entry for momentum"):
        tds.load_config(
            path,
            lr=0.2,
            weight_decay=0.0,
            train_micro_batch_size_per_gpu=1,
            gradient_accumulation_steps=1,
            momentum=0.5,
        )


def test_bind_refuses_a_foreign_optimizer():
    class Engine:
        basic_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        optimizer = basic_optimizer

    with pytest.raises(TypeError, match=r"SGD, not a tvlars_scale optimizer"):
        tds.bind(Engine())
