"""Lightning (the ``lightning`` package): ``configure_optimizers`` returning TVLARS.

- ``DDPStrategy`` on 2 CPU processes, and FSDP2 through ``ModelParallelStrategy``
  (``fully_shard`` in ``configure_model``, DTensor shards, norms reduced across the ranks): both
  train 3 steps (``lightning_script.py``, one torchrun launch) and must equal a single-process
  TVLARS run on the same global batches.
- ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy`` are CUDA-only in Lightning: it refuses
  them on CPU. These tests pin that refusal, the reason docs/integrations.md gives for not
  running them here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from lightning_script import LMBDA, LR, PER_RANK, STEPS, WORLD, dataset, make_body
from torch import nn

import tvlars_scale

pl = pytest.importorskip(
    "lightning.pytorch", reason="lightning is not installed: pip install -e '.[test]'"
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning") / "result.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), os.path.join(HERE, "lightning_script.py"), str(out), "ddp", "fsdp2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return torch.load(out, weights_only=True)


def single_process() -> dict[str, torch.Tensor]:
    """TVLARS in a plain loop over the global batches (both ranks' samples of each step)."""
    body = make_body()
    opt = tvlars_scale.TVLARS(body.parameters(), lr=LR, lmbda=LMBDA)
    x, y = dataset().tensors
    for step in range(STEPS):
        rows = slice(step * PER_RANK * WORLD, (step + 1) * PER_RANK * WORLD)
        opt.zero_grad()
        nn.functional.mse_loss(body(x[rows]), y[rows]).backward()
        opt.step()
    return {f"body.{n}": p.detach() for n, p in body.named_parameters()}


@pytest.mark.parametrize("route", ["ddp", "fsdp2"])
def test_two_ranks_equal_a_single_process_run(two_ranks, route):
    run = two_ranks[route]
    assert run["optimizer"] == "TVLARS" and run["step"] == STEPS
    # FSDP2: the optimizer stepped row shards (each layer's norm summed over both ranks)
    sharded = route == "fsdp2"
    assert all(("Shard(dim=0)" in p) == sharded for p in run["placements"]), run["placements"]
    want = single_process()
    assert run["params"].keys() == want.keys()
    for name, value in run["params"].items():
        # the global mean is taken as the mean of the ranks' means: float summation order only
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


def _module():
    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_body()

        def training_step(self, batch, index):
            return nn.functional.mse_loss(self.body(batch[0]), batch[1])

        def configure_optimizers(self):
            return tvlars_scale.TVLARS(self.parameters(), lr=LR)

    return Regressor()


def test_fsdp_strategy_is_cuda_only_in_lightning():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=1, strategy="fsdp")


@mock.patch.dict(os.environ)  # Lightning writes LOCAL_RANK, MASTER_ADDR... into this process
def test_deepspeed_strategy_is_cuda_only_in_lightning(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install -e .")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = {
        "optimizer": {"type": "TVLARS", "params": {"lr": LR}},
        "zero_optimization": {"stage": 2},
    }
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DeepSpeedStrategy(config=config),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(dataset(), batch_size=PER_RANK)
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        trainer.fit(_module(), loader)
