"""HF transformers Trainer: TVLARS by both documented routes, 3 steps each, against a plain run.

- DeepSpeed: a config whose ``"optimizer"`` is ``{"type": "TVLARS"}`` (ZeRO-2, one gloo rank);
- without DeepSpeed: ``Trainer(optimizer_cls_and_kwargs=(TVLARS, {...}))``, which builds the
  optimizer over the Trainer's two param groups (weight decay, and 0 for biases and norms), and
  ``Trainer(optimizers=(TVLARS(...), None))``.

Each route runs in a subprocess (``hf_trainer_script.py``): the Trainer sets up accelerate's
process-wide state and, with DeepSpeed, a process group.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_trainer_script import LMBDA, LR, STEPS, WEIGHT_DECAY, Regressor, batches
from multirank import free_port

import tvlars_scale

pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install -e '.[test]'"
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def launch(tmp_path, *routes: str, distributed: bool = False) -> dict:
    out = tmp_path / "result.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    if distributed:  # one rank of a gloo world, as DeepSpeed needs a process group
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "hf_trainer_script.py"), str(out), *routes],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return torch.load(out, weights_only=True)


def plain_run(groups) -> dict[str, torch.Tensor]:
    """The same model and batches with TVLARS built by hand, in a plain loop."""
    model = Regressor()
    opt = tvlars_scale.TVLARS(groups(model), lr=LR, lmbda=LMBDA, weight_decay=WEIGHT_DECAY)
    for batch in batches():
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.step()
    return dict(model.named_parameters())


def trainer_groups(model):
    """The Trainer's grouping: no weight decay for biases and LayerNorm weights."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def assert_same_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in got.items():
        # same math; the Trainer's loss and DeepSpeed's flat buffers may add in another order
        torch.testing.assert_close(value, want[name].detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_without_deepspeed_optimizer_class_and_object(tmp_path):
    results = launch(tmp_path, "optimizer-cls", "optimizer-object")
    cls_run = results["optimizer-cls"]
    assert cls_run["optimizer"] == "TVLARS"
    assert cls_run["steps"] == [STEPS, STEPS]
    assert cls_run["weight_decays"] == [WEIGHT_DECAY, 0.0]
    assert_same_params(cls_run["params"], plain_run(trainer_groups))

    object_run = results["optimizer-object"]
    assert object_run["optimizer"] == "TVLARS" and object_run["steps"] == [STEPS]
    # built by hand with the default weight decay (5e-4), so not the same numbers as above
    model = Regressor()
    reference = tvlars_scale.TVLARS(model.parameters(), lr=LR, lmbda=LMBDA)
    for batch in batches():
        reference.zero_grad()
        model(**batch)["loss"].backward()
        reference.step()
    assert_same_params(object_run["params"], dict(model.named_parameters()))


def test_deepspeed_json_names_tvlars(tmp_path):
    run = launch(tmp_path, "deepspeed-json", distributed=True)["deepspeed-json"]
    assert run["optimizer"] == "TVLARS"  # DeepSpeed built ours from the JSON
    assert run["steps"] == [STEPS] and run["weight_decays"] == [WEIGHT_DECAY]  # "auto" filled
    assert_same_params(run["params"], plain_run(lambda model: model.parameters()))
