"""Launched by test_deepspeed.py with ``accelerate launch --use_deepspeed --deepspeed_config_file
ds_configs/zero2_fp32.json``: TVLARS comes from the JSON, lr and weight_decay from DummyOptim,
the micro-batch size from the dataloader. Rank 0 saves the trained parameters to argv[1].
"""

import sys

import deepspeed.ops
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DummyOptim
from deepspeed_common import MICRO, batches, loss_fn, make_model
from torch.utils.data import DataLoader, TensorDataset

import tvlars_scale  # noqa: F401  (registers "TVLARS" for the JSON)

STEPS = 3
LR, WEIGHT_DECAY = 0.5, 0.01


def main(out: str) -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute JIT build
    torch.set_num_threads(1)
    PartialState(backend="gloo")  # on CPU, without it every rank thinks it is rank 0 of 1
    accelerator = Accelerator()
    data = batches(STEPS)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    # Rank r gets rows [4r, 4r + 4) of each global batch of 8, as in the other DeepSpeed tests.
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False)
    model = make_model()
    optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for xb, yb in loader:
        accelerator.backward(loss_fn(model(xb), yb))
        optimizer.step()
        optimizer.zero_grad()
    if accelerator.is_main_process:
        basic = model.basic_optimizer
        torch.save(
            {
                "distributed_type": accelerator.distributed_type.name,
                "num_processes": accelerator.num_processes,
                "wrapper": type(model.optimizer).__name__,
                "kinds": sorted({plan.layout.kind for plan in basic._plans.values()}),
                "lr": LR,
                "weight_decay": WEIGHT_DECAY,
                "steps": STEPS,
                "params": [p.detach().float().clone() for p in model.module.parameters()],
            },
            out,
        )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
