"""Train 3 steps with Lightning, ``configure_optimizers`` returning TVLARS, on 2 CPU ranks.

    torchrun --nproc_per_node 2 lightning_script.py OUT ROUTE [ROUTE ...]

Routes, run one after the other in the same two processes: ``ddp`` (``DDPStrategy``) and
``fsdp2`` (``ModelParallelStrategy``: ``fully_shard`` in ``configure_model``, DTensor shards).
Rank 0 writes, per route, the optimizer's class name, its step counter and the trained
parameters (full tensors) to OUT. The model, the data and the hyperparameters are shared with
the test's single-process reference.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

STEPS, PER_RANK, WORLD = 3, 8, 2
LR, LMBDA = 2.0, 0.1


def make_body() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = STEPS * PER_RANK * WORLD
    return torch.utils.data.TensorDataset(
        torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)
    )


def main(out: str, routes: list[str]) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    import tvlars_scale

    torch.set_num_threads(1)

    class Regressor(pl.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            self.body = make_body()
            self.shard = shard

        def configure_model(self) -> None:
            if self.shard:  # FSDP2, as Lightning's ModelParallelStrategy documents it
                mesh = self.device_mesh["data_parallel"]
                for layer in self.body:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(self.body, mesh=mesh)

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.mse_loss(self.body(x), y)

        def configure_optimizers(self):
            return tvlars_scale.TVLARS(self.parameters(), lr=LR, lmbda=LMBDA)

    strategies = {
        "ddp": lambda: DDPStrategy(process_group_backend="gloo"),
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
    }
    results = {}
    for route in routes:
        model = Regressor(shard=route == "fsdp2")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=strategies[route](),
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,  # Lightning's would shuffle: the order is ours
        )
        sampler = torch.utils.data.DistributedSampler(
            dataset(), num_replicas=WORLD, rank=int(os.environ["RANK"]), shuffle=False
        )
        loader = torch.utils.data.DataLoader(dataset(), batch_size=PER_RANK, sampler=sampler)
        trainer.fit(model, loader)
        optimizer = trainer.optimizers[0]
        params = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()
        }
        results[route] = {
            "optimizer": type(optimizer).__name__,
            "step": float(optimizer.param_groups[0]["step"]),
            "placements": [
                str(getattr(p, "placements", "")) for p in optimizer.param_groups[0]["params"]
            ],
            "params": params,
        }
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    # Left to the interpreter's exit, gloo's threads were once torn down while still joinable
    # ("terminate called without an active exception", exit -6 after training had finished).
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
