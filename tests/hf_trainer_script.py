"""Train 3 steps with the HF transformers Trainer and our optimizer, by one route, in its own process.

    python hf_trainer_script.py OUT ROUTE [ROUTE ...]

Routes: ``deepspeed-json`` (a DeepSpeed config whose ``"optimizer"`` names TVLARS; one rank,
gloo; alone in its process), ``optimizer-cls`` (``Trainer(optimizer_cls_and_kwargs=(TVLARS,
{...}))``) and ``optimizer-object`` (``Trainer(optimizers=(TVLARS(...), None))``). Writes, per
route, the optimizer's class name, the trained parameters, the step counters and the groups'
weight decays to OUT (``torch.save``). The model, the data and the hyperparameters are shared
with the test's plain reference run.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

STEPS, BATCH = 3, 8
LR, WEIGHT_DECAY, LMBDA = 2.0, 0.01, 0.1


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def samples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(6, generator=g), "labels": torch.randn(2, generator=g)}
        for _ in range(STEPS * BATCH)
    ]


def batches() -> list[dict[str, torch.Tensor]]:
    rows = samples()
    return [
        {k: torch.stack([r[k] for r in rows[i : i + BATCH]]) for k in rows[0]}
        for i in range(0, len(rows), BATCH)
    ]


def deepspeed_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # the Trainer's max_grad_norm: 0, no clipping
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},  # fp32, as the plain run (transformers 4 enables fp16 on
        "fp16": {"enabled": False},  # DeepSpeed's CPU accelerator otherwise)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {
            "type": "TVLARS",
            "params": {"lr": "auto", "weight_decay": "auto", "lmbda": LMBDA},
        },
    }


def train(route: str, out_dir: str) -> dict:
    from transformers import Trainer, TrainingArguments

    import tvlars_scale  # registers torch.optim.TVLARS, which DeepSpeed resolves

    model = Regressor()
    args = dict(
        output_dir=os.path.join(out_dir, route),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        remove_unused_columns=False,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer_kwargs = {}
    if route == "deepspeed-json":
        args.update(deepspeed=deepspeed_config(), ddp_backend="gloo")
    else:
        args.update(use_cpu=True)
    if route == "optimizer-cls":
        trainer_kwargs["optimizer_cls_and_kwargs"] = (
            tvlars_scale.TVLARS,
            {"lr": LR, "lmbda": LMBDA},
        )
    elif route == "optimizer-object":
        optimizer = tvlars_scale.TVLARS(model.parameters(), lr=LR, lmbda=LMBDA)
        trainer_kwargs["optimizers"] = (optimizer, None)

    class SequentialTrainer(Trainer):  # transformers 4 has no option for it
        def _get_train_sampler(self, *_, **__):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer_cls = SequentialTrainer  # the samples in order, as the plain run takes them
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:  # transformers 5
        args.update(train_sampling_strategy="sequential")
        trainer_cls = Trainer
    trainer = trainer_cls(
        model=model, args=TrainingArguments(**args), train_dataset=samples(), **trainer_kwargs
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    if route == "deepspeed-json":
        optimizer = trainer.model_wrapped.optimizer.optimizer  # DeepSpeed's ZeRO wraps it
        torch.distributed.destroy_process_group()
    return {
        "optimizer": type(optimizer).__name__,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "steps": [float(g["step"]) for g in optimizer.param_groups],
        "weight_decays": [g["weight_decay"] for g in optimizer.param_groups],
    }


def main(out: str, routes: list[str]) -> None:
    torch.set_num_threads(1)
    if "deepspeed-json" in routes:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-min JIT build
    torch.save({route: train(route, os.path.dirname(out)) for route in routes}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
